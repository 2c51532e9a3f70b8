//! `record -o FILE`: the raw event stream to a file (format in `source/record.rs`).

use std::io::{self, Write};

use super::Sink;
use crate::app::Totals;
use crate::model::KernelEvent;
use crate::source::record::RecordWriter;
use crate::tracker::Tracker;

pub struct RecordSink<W: Write> {
    pub writer: RecordWriter<W>,
    pub events: u64,
}

impl<W: Write> Sink for RecordSink<W> {
    fn event(&mut self, ev: &KernelEvent) -> io::Result<()> {
        self.events += 1;
        self.writer.event(ev)
    }

    fn batch_done(
        &mut self,
        _: &crate::app::Totals,
        _: &crate::tracker::Tracker,
    ) -> io::Result<()> {
        self.writer.flush()
    }

    fn interval(&mut self, _now: u64, totals: &Totals, _tracker: &Tracker) -> io::Result<()> {
        self.writer.lost(totals.lost.total())
    }

    fn finish(&mut self, _now: u64, totals: &Totals, _tracker: &Tracker) -> io::Result<()> {
        self.writer.lost(totals.lost.total())?;
        self.writer.flush()
    }
}
