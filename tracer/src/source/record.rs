//! The record file: the raw event stream of `tcplens record`, replayed by `--from FILE`.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! header, 32 bytes:
//!   0  magic       8 bytes  "TCPLENS\0"
//!   8  version     u16      1
//!  10  header_len  u16      32
//!  12  event_size  u16      size of one event payload (88)
//!  14  reserved    u16      0
//!  16  boot_offset i64      Unix-epoch ns at kernel monotonic 0 on the recording host
//!  24  reserved    u64      0
//! records, each:
//!   0  type        u8       1 = event, 2 = lost-events total
//!   1  reserved    u8       0
//!   2  len         u16      payload bytes (event: event_size; lost: 8)
//!   4  payload
//! ```
//!
//! An event payload is `tracer_common::Event` exactly as the kernel wrote it (see
//! `decode.rs`). A lost record carries the kernel's drop count so far (u64); the last one
//! holds the total.

use std::io::{self, Read, Write};

use thiserror::Error;
use tracer_common::EVENT_SIZE;

use crate::clock::WallClock;
use crate::decode::{DecodeError, decode, encode};
use crate::model::Transition;

pub const MAGIC: [u8; 8] = *b"TCPLENS\0";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;
const REC_EVENT: u8 = 1;
const REC_LOST: u8 = 2;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("not a tcplens record file (bad magic)")]
    Magic,
    #[error("record file version {0} is not supported (this tcplens reads version {VERSION})")]
    Version(u16),
    #[error("corrupt header at byte {offset}: {what}")]
    Header { offset: u64, what: String },
    #[error("truncated at byte {offset}: {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error("corrupt record at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("bad event at byte {offset}: {source}")]
    Event { offset: u64, source: DecodeError },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes a record file.
pub struct RecordWriter<W: Write> {
    out: W,
    last_lost: u64,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(mut out: W, clock: WallClock) -> io::Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        h[12..14].copy_from_slice(&(EVENT_SIZE as u16).to_le_bytes());
        let offset = i64::try_from(clock.boot_offset_ns).unwrap_or(0);
        h[16..24].copy_from_slice(&offset.to_le_bytes());
        out.write_all(&h)?;
        Ok(RecordWriter { out, last_lost: 0 })
    }

    pub fn event(&mut self, t: &Transition) -> io::Result<()> {
        let mut rec = [0u8; 4 + EVENT_SIZE];
        rec[0] = REC_EVENT;
        rec[2..4].copy_from_slice(&(EVENT_SIZE as u16).to_le_bytes());
        rec[4..].copy_from_slice(&encode(t));
        self.out.write_all(&rec)
    }

    /// Records the kernel's drop total when it changed.
    pub fn lost(&mut self, total: u64) -> io::Result<()> {
        if total == self.last_lost {
            return Ok(());
        }
        self.last_lost = total;
        let mut rec = [0u8; 12];
        rec[0] = REC_LOST;
        rec[2..4].copy_from_slice(&8u16.to_le_bytes());
        rec[4..].copy_from_slice(&total.to_le_bytes());
        self.out.write_all(&rec)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// What one record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    Event(Transition),
    /// The kernel's drop count so far.
    Lost(u64),
}

/// Reads a record file, item by item, with byte offsets in every error.
pub struct RecordReader<R: Read> {
    input: R,
    offset: u64,
    pub clock: WallClock,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> RecordReader<R> {
    pub fn new(mut input: R) -> Result<Self, RecordError> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut input, &mut h)?;
        if got < 8 || h[0..8] != MAGIC {
            return Err(RecordError::Magic);
        }
        if got < HEADER_LEN {
            return Err(RecordError::Truncated {
                offset: got as u64,
                what: "in the header",
            });
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        let header_len = u16::from_le_bytes([h[10], h[11]]);
        if usize::from(header_len) != HEADER_LEN {
            return Err(RecordError::Header {
                offset: 10,
                what: format!("header length {header_len}, expected {HEADER_LEN}"),
            });
        }
        let event_size = u16::from_le_bytes([h[12], h[13]]);
        if usize::from(event_size) != EVENT_SIZE {
            return Err(RecordError::Header {
                offset: 12,
                what: format!("event size {event_size}, expected {EVENT_SIZE}"),
            });
        }
        let mut off = [0u8; 8];
        off.copy_from_slice(&h[16..24]);
        Ok(RecordReader {
            input,
            offset: HEADER_LEN as u64,
            clock: WallClock {
                boot_offset_ns: i128::from(i64::from_le_bytes(off)),
            },
        })
    }

    /// Byte offset of the next record.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next item; `Ok(None)` at a clean end of file.
    pub fn next_item(&mut self) -> Result<Option<Item>, RecordError> {
        let start = self.offset;
        let mut head = [0u8; 4];
        match read_full(&mut self.input, &mut head)? {
            0 => return Ok(None),
            4 => {}
            _ => {
                return Err(RecordError::Truncated {
                    offset: start,
                    what: "in a record header",
                });
            }
        }
        let len = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let (kind, want) = match head[0] {
            REC_EVENT => (REC_EVENT, EVENT_SIZE),
            REC_LOST => (REC_LOST, 8),
            other => {
                return Err(RecordError::Corrupt {
                    offset: start,
                    what: format!("unknown record type {other}"),
                });
            }
        };
        if len != want || head[1] != 0 {
            return Err(RecordError::Corrupt {
                offset: start,
                what: format!("record type {kind} with length {len}, expected {want}"),
            });
        }
        let mut payload = [0u8; EVENT_SIZE];
        if read_full(&mut self.input, &mut payload[..len])? < len {
            return Err(RecordError::Truncated {
                offset: start,
                what: "in a record",
            });
        }
        self.offset = start + 4 + len as u64;
        if kind == REC_LOST {
            let mut n = [0u8; 8];
            n.copy_from_slice(&payload[..8]);
            return Ok(Some(Item::Lost(u64::from_le_bytes(n))));
        }
        decode(&payload)
            .map(|t| Some(Item::Event(t)))
            .map_err(|source| RecordError::Event {
                offset: start + 4,
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TcpState;
    use crate::tracker::tests::tr;
    use proptest::prelude::*;

    fn sample_file() -> Vec<u8> {
        let clock = WallClock {
            boot_offset_ns: 1_795_000_000_000_000_000,
        };
        let mut w = RecordWriter::new(Vec::new(), clock).unwrap();
        w.event(&tr(1, 10, TcpState::Close, TcpState::SynSent, 5))
            .unwrap();
        w.lost(3).unwrap();
        w.lost(3).unwrap(); // unchanged: not written again
        w.event(&tr(1, 20, TcpState::SynSent, TcpState::Established, 5))
            .unwrap();
        w.out
    }

    fn read_all(bytes: &[u8]) -> (Vec<Item>, Result<(), RecordError>) {
        let mut items = Vec::new();
        let mut r = match RecordReader::new(bytes) {
            Ok(r) => r,
            Err(e) => return (items, Err(e)),
        };
        loop {
            match r.next_item() {
                Ok(Some(i)) => items.push(i),
                Ok(None) => return (items, Ok(())),
                Err(e) => return (items, Err(e)),
            }
        }
    }

    #[test]
    fn round_trip() {
        let bytes = sample_file();
        assert_eq!(bytes.len(), 32 + 92 + 12 + 92);
        let r = RecordReader::new(&bytes[..]).unwrap();
        assert_eq!(r.clock.boot_offset_ns, 1_795_000_000_000_000_000);
        let (items, end) = read_all(&bytes);
        end.unwrap();
        assert_eq!(
            items,
            [
                Item::Event(tr(1, 10, TcpState::Close, TcpState::SynSent, 5)),
                Item::Lost(3),
                Item::Event(tr(1, 20, TcpState::SynSent, TcpState::Established, 5)),
            ]
        );
    }

    #[test]
    fn errors_name_the_byte_offset() {
        let good = sample_file();
        // Cut inside the last event: the first two items are still read.
        let (items, end) = read_all(&good[..good.len() - 5]);
        assert_eq!(items.len(), 2);
        assert_eq!(
            end.unwrap_err().to_string(),
            "truncated at byte 136: in a record"
        );
        // An unknown record type.
        let mut bad = good.clone();
        bad[124] = 9;
        let (items, end) = read_all(&bad);
        assert_eq!(items.len(), 1);
        assert_eq!(
            end.unwrap_err().to_string(),
            "corrupt record at byte 124: unknown record type 9"
        );
        // A bad state inside an event payload (byte 4 + 78 of the first record).
        let mut bad = good.clone();
        bad[32 + 4 + 78] = 42;
        let (_, end) = read_all(&bad);
        assert_eq!(
            end.unwrap_err().to_string(),
            "bad event at byte 36: unknown TCP state 42"
        );
        // Foreign files and other versions.
        let (_, end) = read_all(b"GIF89a....");
        assert_eq!(
            end.unwrap_err().to_string(),
            "not a tcplens record file (bad magic)"
        );
        let mut v2 = good.clone();
        v2[8] = 2;
        let (_, end) = read_all(&v2);
        assert!(matches!(end, Err(RecordError::Version(2))));
        let (_, end) = read_all(&good[..20]);
        assert_eq!(
            end.unwrap_err().to_string(),
            "truncated at byte 20: in the header"
        );
    }

    proptest! {
        /// Corpus-free fuzzing of the reader: arbitrary bytes, alone or after a valid
        /// header, never panic and always end in a clean end or an error.
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..2048), with_header in any::<bool>()) {
            let mut bytes = if with_header { sample_file()[..32].to_vec() } else { Vec::new() };
            bytes.extend_from_slice(&tail);
            let _ = read_all(&bytes);
        }

        #[test]
        fn decode_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = crate::decode::decode(&bytes);
        }
    }
}
