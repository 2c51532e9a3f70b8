//! `record -o FILE`: the raw event stream to a file (format in `source/record.rs`).

use std::io::{self, Write};

use super::{Sink, View};
use crate::model::KernelEvent;
use crate::source::record::RecordWriter;

pub struct RecordSink<W: Write> {
    pub writer: RecordWriter<W>,
    pub events: u64,
}

impl<W: Write> Sink for RecordSink<W> {
    fn event(&mut self, ev: &KernelEvent) -> io::Result<()> {
        self.events += 1;
        self.writer.event(ev)
    }

    fn batch_done(&mut self, _: &View<'_>) -> io::Result<()> {
        self.writer.flush()
    }

    fn interval(&mut self, _now: u64, v: &View<'_>) -> io::Result<()> {
        self.writer.lost(v.totals.lost.total())
    }

    fn finish(&mut self, _now: u64, v: &View<'_>) -> io::Result<()> {
        self.writer.lost(v.totals.lost.total())?;
        self.writer.flush()
    }
}
