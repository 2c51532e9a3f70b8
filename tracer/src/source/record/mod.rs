//! The record file: the raw event stream of `tcplens record`, replayed by `--from FILE`.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! header, 32 bytes:
//!   0  magic       8 bytes  "TCPLENS\0"
//!   8  version     u16      5 (versions 1 to 4 are still read)
//!  10  header_len  u16      32
//!  12  event_size  u16      size of one event payload (152 in 5; 120 in 3 and 4; 104 in 2,
//!                           88 in 1)
//!  14  hz          u16      version 2: the kernel's HZ when TIME_WAIT was tracked; else 0
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
//! `decode.rs`): state transitions and the raw timewait timer events, with their cookies
//! and CPUs, so a replay derives TIME_WAIT exactly as the live run did (HZ is learned from
//! the events, as live), and, from version 4, the request sockets' timer events (version 3
//! is the same layout without them), and, from version 5, each socket's cgroup and its
//! connection's counters (versions 3 and 4 read with neither). A lost record carries the kernel's loss so far (u64, ring buffer
//! drops and recursion misses); the last one holds the total. Versions 1 and 2 had no
//! cookies, namespaces or CPUs: see `legacy.rs`.

mod legacy;

use std::io::{self, Read, Write};

use thiserror::Error;
use tracer_common::EVENT_SIZE;

use crate::clock::WallClock;
use crate::decode::{DecodeError, decode, encode};
use crate::model::KernelEvent;

pub const MAGIC: [u8; 8] = *b"TCPLENS\0";
pub const VERSION: u16 = 5;
/// The event of versions 3 and 4: version 5's without the cgroup and the counters.
const V4_SIZE: usize = 120;
pub const HEADER_LEN: usize = 32;
const REC_EVENT: u8 = 1;
const REC_LOST: u8 = 2;

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("not a tcplens record file (bad magic)")]
    Magic,
    #[error(
        "record file version {0} is not supported (this tcplens reads versions 1 to {VERSION})"
    )]
    Version(u16),
    #[error("corrupt header at byte {offset}: {what}")]
    Header { offset: u64, what: String },
    #[error("truncated at byte {offset}: {what}")]
    Truncated { offset: u64, what: &'static str },
    #[error("corrupt record at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error("bad event at byte {offset}: {error}")]
    Event { offset: u64, error: DecodeError },
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

    pub fn event(&mut self, t: &KernelEvent) -> io::Result<()> {
        let mut rec = [0u8; 4 + EVENT_SIZE];
        rec[0] = REC_EVENT;
        rec[2..4].copy_from_slice(&(EVENT_SIZE as u16).to_le_bytes());
        rec[4..].copy_from_slice(&encode(t));
        self.out.write_all(&rec)
    }

    /// Records the kernel's loss total when it changed.
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
    Event(KernelEvent),
    /// The kernel's loss so far.
    Lost(u64),
}

/// Reads a record file, item by item, with byte offsets in every error.
pub struct RecordReader<R: Read> {
    input: R,
    offset: u64,
    /// Versions 1 and 2: their events' layout, and the identities they lack.
    legacy: Option<legacy::Legacy>,
    /// Size of one event in this file.
    event_size: usize,
    pub clock: WallClock,
    /// The recording kernel's HZ, when the file says (version 2 with TIME_WAIT).
    pub hz: Option<u32>,
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
        let legacy = match version {
            1 | 2 => Some(legacy::Legacy::new(version)),
            3..=VERSION => None,
            other => return Err(RecordError::Version(other)),
        };
        let want_size = match (&legacy, version) {
            (Some(old), _) => old.event_size(),
            (None, 3 | 4) => V4_SIZE,
            (None, _) => EVENT_SIZE,
        };
        let header_len = u16::from_le_bytes([h[10], h[11]]);
        if usize::from(header_len) != HEADER_LEN {
            return Err(RecordError::Header {
                offset: 10,
                what: format!("header length {header_len}, expected {HEADER_LEN}"),
            });
        }
        let event_size = u16::from_le_bytes([h[12], h[13]]);
        if usize::from(event_size) != want_size {
            return Err(RecordError::Header {
                offset: 12,
                what: format!("event size {event_size}, expected {want_size}"),
            });
        }
        let hz = match (version, u16::from_le_bytes([h[14], h[15]])) {
            (2, hz) if hz > 0 => Some(u32::from(hz)),
            _ => None,
        };
        let mut off = [0u8; 8];
        off.copy_from_slice(&h[16..24]);
        Ok(RecordReader {
            input,
            offset: HEADER_LEN as u64,
            legacy,
            event_size: want_size,
            clock: WallClock {
                boot_offset_ns: i128::from(i64::from_le_bytes(off)),
            },
            hz,
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
            REC_EVENT => (REC_EVENT, self.event_size),
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
        let decoded = match &mut self.legacy {
            None if len == V4_SIZE => decode(&widen_v4(&payload[..V4_SIZE])),
            None => decode(&payload),
            Some(old) => old.decode(&payload[..len]),
        };
        decoded
            .map(|t| Some(Item::Event(t)))
            .map_err(|error| RecordError::Event {
                offset: start + 4,
                error,
            })
    }
}

/// A version 3 or 4 event in today's layout: no cgroup, no counters.
fn widen_v4(b: &[u8]) -> [u8; EVENT_SIZE] {
    let u64_at = |off: usize| u64::from_ne_bytes(b[off..off + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |off: usize| u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or([0; 4]));
    let u16_at = |off: usize| u16::from_ne_bytes([b[off], b[off + 1]]);
    let b16 = |off: usize| <[u8; 16]>::try_from(&b[off..off + 16]).unwrap_or([0; 16]);
    tracer_common::Event {
        ts_ns: u64_at(0),
        skaddr: u64_at(8),
        cookie: u64_at(16),
        pid_tgid: u64_at(24),
        expires: u64_at(32),
        jiffies: u64_at(40),
        cgroup: 0,
        bytes_acked: 0,
        bytes_received: 0,
        saddr: b16(48),
        daddr: b16(64),
        comm: b16(80),
        netns: u32_at(96),
        cpu: u32_at(100),
        srtt_us8: 0,
        rtt_min_us: 0,
        total_retrans: 0,
        sport: u16_at(104),
        dport: u16_at(106),
        family: u16_at(108),
        oldstate: b[110],
        newstate: b[111],
        kind: b[112],
        retrans: b[113],
        facts: 0,
        _pad: 0,
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TcpState;
    use crate::tracker::tests::tr;
    use proptest::prelude::*;

    fn ev(t: crate::model::Transition) -> KernelEvent {
        KernelEvent::Transition(t)
    }

    /// The second event of `sample_file`: with a cgroup and the connection's counters.
    fn established() -> crate::model::Transition {
        let mut t = tr(1, 20, TcpState::SynSent, TcpState::Established, 5);
        t.cgroup = 4242;
        t.facts = Some(crate::model::ConnFacts {
            bytes_acked: 1,
            bytes_received: 0,
            srtt_us: 41,
            min_rtt_us: Some(30),
            retrans: 2,
        });
        t
    }

    fn sample_file() -> Vec<u8> {
        let clock = WallClock {
            boot_offset_ns: 1_795_000_000_000_000_000,
        };
        let mut w = RecordWriter::new(Vec::new(), clock).unwrap();
        w.event(&ev(tr(1, 10, TcpState::Close, TcpState::SynSent, 5)))
            .unwrap();
        w.lost(3).unwrap();
        w.lost(3).unwrap(); // unchanged: not written again
        w.event(&ev(established())).unwrap();
        w.out
    }

    /// `sample_file` as version 4 wrote it: 120-byte events, without the cgroup and the
    /// counters.
    fn sample_file_v4() -> Vec<u8> {
        let v5 = sample_file();
        let mut out = v5[..32].to_vec();
        out[8] = 4;
        out[12..14].copy_from_slice(&120u16.to_le_bytes());
        let mut at = 32;
        while at < v5.len() {
            let len = usize::from(u16::from_le_bytes([v5[at + 2], v5[at + 3]]));
            let payload = &v5[at + 4..at + 4 + len];
            if v5[at] == REC_EVENT {
                let e = tracer_common::Event::from_bytes(payload).unwrap();
                out.extend_from_slice(&[REC_EVENT, 0]);
                out.extend_from_slice(&120u16.to_le_bytes());
                for field in [
                    e.ts_ns, e.skaddr, e.cookie, e.pid_tgid, e.expires, e.jiffies,
                ] {
                    out.extend_from_slice(&field.to_ne_bytes());
                }
                for field in [e.saddr, e.daddr, e.comm] {
                    out.extend_from_slice(&field);
                }
                out.extend_from_slice(&e.netns.to_ne_bytes());
                out.extend_from_slice(&e.cpu.to_ne_bytes());
                for field in [e.sport, e.dport, e.family] {
                    out.extend_from_slice(&field.to_ne_bytes());
                }
                out.extend_from_slice(&[
                    e.oldstate, e.newstate, e.kind, e.retrans, 0, 0, 0, 0, 0, 0,
                ]);
            } else {
                out.extend_from_slice(&v5[at..at + 4 + len]);
            }
            at += 4 + len;
        }
        out
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
        assert_eq!(bytes.len(), 32 + 156 + 12 + 156);
        let r = RecordReader::new(&bytes[..]).unwrap();
        assert_eq!(r.clock.boot_offset_ns, 1_795_000_000_000_000_000);
        assert_eq!(r.hz, None, "learned from the events");
        let (items, end) = read_all(&bytes);
        end.unwrap();
        assert_eq!(
            items,
            [
                Item::Event(ev(tr(1, 10, TcpState::Close, TcpState::SynSent, 5))),
                Item::Lost(3),
                Item::Event(ev(established())),
            ]
        );
    }

    /// A file of version 1 or 2: events in that version's layout, as tcplens wrote them.
    fn legacy_file(version: u16, hz: u16, events: &[crate::model::Transition]) -> Vec<u8> {
        let size: u16 = if version == 1 { 88 } else { 104 };
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&version.to_le_bytes());
        f.extend_from_slice(&32u16.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&hz.to_le_bytes());
        f.extend_from_slice(&[0; 16]);
        for t in events {
            let mut b = vec![0u8; usize::from(size)];
            b[0..8].copy_from_slice(&t.ts_ns.to_ne_bytes());
            b[8..16].copy_from_slice(&t.sk.to_ne_bytes());
            let pid_tgid = (u64::from(t.task.pid) << 32) | u64::from(t.task.tid);
            b[16..24].copy_from_slice(&pid_tgid.to_ne_bytes());
            b[24..40].copy_from_slice(&crate::decode::addr16(t.id.saddr));
            b[40..56].copy_from_slice(&crate::decode::addr16(t.id.daddr));
            b[56..72].copy_from_slice(&t.task.comm.raw());
            b[72..74].copy_from_slice(&t.id.sport.to_ne_bytes());
            b[74..76].copy_from_slice(&t.id.dport.to_ne_bytes());
            b[76..78].copy_from_slice(&tracer_common::AF_INET.to_ne_bytes());
            (b[78], b[79], b[80]) = (t.old as u8, t.new as u8, tracer_common::kind::SET_STATE);
            f.extend_from_slice(&[REC_EVENT, 0]);
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&b);
        }
        f
    }

    /// Files of versions 1 and 2 (written before tcplens read cookies) read as the same
    /// transitions, each socket given an identity of its own.
    #[test]
    fn reads_version_1_and_2_files() {
        use TcpState::*;
        let events = [
            tr(0xa, 10, Close, SynSent, 5),
            tr(0xa, 20, SynSent, Close, 5),
            tr(0xa, 30, Close, SynSent, 5), // the same address, a new socket
        ];
        for (version, hz) in [(1, 0), (2, 250)] {
            let file = legacy_file(version, hz, &events);
            let r = RecordReader::new(&file[..]).unwrap();
            assert_eq!(r.hz, (version == 2).then_some(250));
            let (items, end) = read_all(&file);
            end.unwrap();
            let got: Vec<_> = items
                .iter()
                .map(|i| match i {
                    Item::Event(KernelEvent::Transition(t)) => (t.ts_ns, t.id.cookie, t.id.netns),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                got,
                [(10, 1, 0), (20, 1, 0), (30, 2, 0)],
                "version {version}"
            );
        }
    }

    #[test]
    fn errors_name_the_byte_offset() {
        let good = sample_file();
        // Cut inside the last event: the first two items are still read.
        let (items, end) = read_all(&good[..good.len() - 5]);
        assert_eq!(items.len(), 2);
        assert_eq!(
            end.unwrap_err().to_string(),
            "truncated at byte 200: in a record"
        );
        // An unknown record type.
        let mut bad = good.clone();
        bad[188] = 9;
        let (items, end) = read_all(&bad);
        assert_eq!(items.len(), 1);
        assert_eq!(
            end.unwrap_err().to_string(),
            "corrupt record at byte 188: unknown record type 9"
        );
        // A bad state inside an event payload (its `oldstate`, in the first record).
        let mut bad = good.clone();
        bad[32 + 4 + std::mem::offset_of!(tracer_common::Event, oldstate)] = 42;
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
        let mut v6 = good.clone();
        v6[8] = 6;
        let (_, end) = read_all(&v6);
        assert_eq!(
            end.unwrap_err().to_string(),
            "record file version 6 is not supported (this tcplens reads versions 1 to 5)"
        );
        // Versions 3 and 4 (3 is 4 without request events): the same events, without
        // cgroup and counters.
        let without = |items: Vec<Item>| -> Vec<Item> {
            items
                .into_iter()
                .map(|i| match i {
                    Item::Event(KernelEvent::Transition(mut t)) => {
                        t.cgroup = 0;
                        t.facts = None;
                        Item::Event(KernelEvent::Transition(t))
                    }
                    other => other,
                })
                .collect()
        };
        let want = without(read_all(&good).0);
        assert_eq!(want.len(), 3);
        for version in [3, 4] {
            let mut old = sample_file_v4();
            old[8] = version;
            let (events, end) = read_all(&old);
            assert!(end.is_ok(), "version {version}: {end:?}");
            assert_eq!(events, want, "version {version}");
        }
        // A version 4 header with version 5's event size is corrupt.
        let mut mixed = good.clone();
        mixed[8] = 4;
        let (_, end) = read_all(&mixed);
        assert_eq!(
            end.unwrap_err().to_string(),
            "corrupt header at byte 12: event size 152, expected 120"
        );
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
