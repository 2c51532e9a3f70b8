//! Record files of versions 1 and 2, written before tcplens read socket cookies.
//!
//! Their events (88 and 104 bytes) have no cookie, namespace or CPU. So that one tracker
//! serves every file, the reader gives them the identities the kernel would have: a new
//! cookie per socket address until its CLOSE, and to a timewait socket the cookie of the
//! closing socket with its 4-tuple (its timer is armed just before that socket's CLOSE).
//! A timer armed again at the same timewait address within 1 ms of its cancel, for the same
//! 4-tuple, is a re-arm. That is how those versions joined TIME_WAIT, with the same limits
//! (a reused 4-tuple can still be misjoined); files of version 3 carry the kernel's own.

use std::collections::HashMap;

use tracer_common::kind;

use crate::decode::{DecodeError, addresses, task};
use crate::model::{KernelEvent, SocketId, TcpState, TimerOp, TimewaitEvent, Transition, Via};
use crate::tracker::Tuple;

/// Version 2's event: version 1's 88 bytes, then the timer's `expires` and `jiffies`.
const V2_SIZE: usize = 104;
const V1_SIZE: usize = 88;
/// A re-arm follows its cancel within the same locked section of the timer code.
const REARM_NS: u64 = 1_000_000;

pub(super) struct Legacy {
    event_size: usize,
    next_cookie: u64,
    /// Full sockets: address -> cookie, until their CLOSE.
    by_sk: HashMap<u64, u64>,
    /// Sockets on their way to a timewait socket (FIN_WAIT1/2, CLOSING): 4-tuple -> cookie.
    closing: HashMap<Tuple, u64>,
    /// Timewait sockets: address -> (cookie, 4-tuple, time of an unresolved cancel).
    by_tw: HashMap<u64, (u64, Tuple, Option<u64>)>,
}

impl Legacy {
    pub(super) fn new(version: u16) -> Self {
        Legacy {
            event_size: if version == 1 { V1_SIZE } else { V2_SIZE },
            next_cookie: 0,
            by_sk: HashMap::new(),
            closing: HashMap::new(),
            by_tw: HashMap::new(),
        }
    }

    pub(super) fn event_size(&self) -> usize {
        self.event_size
    }

    fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Decodes one old event and gives it its identity.
    pub(super) fn decode(&mut self, b: &[u8]) -> Result<KernelEvent, DecodeError> {
        if b.len() != self.event_size {
            return Err(DecodeError::Length { got: b.len() });
        }
        let u16_at = |off: usize| u16::from_ne_bytes([b[off], b[off + 1]]);
        let u64_at = |off: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&b[off..off + 8]);
            u64::from_ne_bytes(raw)
        };
        let bytes16 = |off: usize| {
            let mut raw = [0u8; 16];
            raw.copy_from_slice(&b[off..off + 16]);
            raw
        };
        let (ts_ns, sk, pid_tgid) = (u64_at(0), u64_at(8), u64_at(16));
        let (family, saddr, daddr) = addresses(u16_at(76), &bytes16(24), &bytes16(40))?;
        let (sport, dport) = (u16_at(72), u16_at(74));
        let (oldstate, newstate, ev_kind) = (b[78], b[79], b[80]);
        let (expires, jiffies) = match self.event_size {
            V2_SIZE => (u64_at(88), u64_at(96)),
            _ => (0, 0),
        };
        let new = TcpState::from_kernel(newstate).ok_or(DecodeError::State(newstate))?;
        let task = task(pid_tgid, bytes16(56));
        let tuple = (saddr, sport, daddr, dport);
        // Version-1 and 2 recordings had no namespace.
        let id = |cookie| SocketId {
            cookie,
            netns: 0,
            family,
            saddr,
            sport,
            daddr,
            dport,
        };
        let op = match ev_kind {
            kind::SET_STATE => {
                let old = TcpState::from_kernel(oldstate).ok_or(DecodeError::State(oldstate))?;
                let cookie = if let Some(&c) = self.by_sk.get(&sk) {
                    c
                } else {
                    let c = self.cookie();
                    self.by_sk.insert(sk, c);
                    c
                };
                match new {
                    TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing => {
                        self.closing.insert(tuple, cookie);
                    }
                    TcpState::Close => {
                        self.by_sk.remove(&sk);
                        if self.closing.get(&tuple) == Some(&cookie) {
                            self.closing.remove(&tuple);
                        }
                    }
                    _ => {}
                }
                return Ok(KernelEvent::Transition(Transition {
                    ts_ns,
                    sk,
                    id: id(cookie),
                    old,
                    new,
                    task,
                    via: Via::Tracepoint,
                    cpu: None,
                    jiffies,
                    cgroup: 0,
                    facts: None,
                }));
            }
            kind::TW_ARM if self.event_size == V2_SIZE => TimerOp::Arm,
            kind::TW_CANCEL if self.event_size == V2_SIZE => TimerOp::Cancel,
            kind::TW_EXPIRE if self.event_size == V2_SIZE => TimerOp::Expire,
            other => return Err(DecodeError::Kind(other)),
        };
        let known = self.by_tw.get(&sk).copied();
        let cookie = match (op, known) {
            (TimerOp::Arm, Some((c, t, cancel)))
                if t == tuple && cancel.is_none_or(|at| ts_ns.saturating_sub(at) <= REARM_NS) =>
            {
                c
            }
            (TimerOp::Arm, _) => match self.closing.get(&tuple) {
                Some(&c) => c,
                None => self.cookie(),
            },
            (_, Some((c, _, _))) => c,
            (_, None) => self.cookie(),
        };
        match op {
            TimerOp::Expire => {
                self.by_tw.remove(&sk);
            }
            TimerOp::Cancel => {
                self.by_tw.insert(sk, (cookie, tuple, Some(ts_ns)));
            }
            TimerOp::Arm => {
                self.by_tw.insert(sk, (cookie, tuple, None));
            }
        }
        Ok(KernelEvent::Timewait(TimewaitEvent {
            ts_ns,
            op,
            tw: sk,
            id: id(cookie),
            substate: new,
            expires,
            jiffies,
            cpu: None,
            task,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracer_common::AF_INET;

    /// A version 2 event.
    fn v2(k: u8, sk: u64, ts: u64, sport: u16, old: u8, new: u8) -> Vec<u8> {
        let mut b = vec![0u8; V2_SIZE];
        b[0..8].copy_from_slice(&ts.to_ne_bytes());
        b[8..16].copy_from_slice(&sk.to_ne_bytes());
        b[16..24].copy_from_slice(&((42u64 << 32) | 0x2a).to_ne_bytes());
        b[24..28].copy_from_slice(&[127, 0, 0, 1]);
        b[40..44].copy_from_slice(&[127, 0, 0, 1]);
        b[56..60].copy_from_slice(b"srv\0");
        b[72..74].copy_from_slice(&sport.to_ne_bytes());
        b[74..76].copy_from_slice(&40001u16.to_ne_bytes());
        b[76..78].copy_from_slice(&AF_INET.to_ne_bytes());
        (b[78], b[79], b[80]) = (old, new, k);
        b
    }

    fn cookie(ev: &KernelEvent) -> u64 {
        match ev {
            KernelEvent::Transition(t) => t.id.cookie,
            KernelEvent::Timewait(tw) => tw.id.cookie,
            KernelEvent::Request(r) => r.listener,
        }
    }

    #[test]
    fn gives_sockets_and_their_timewait_sockets_one_identity() {
        let mut l = Legacy::new(2);
        let (fw1, fw2, close) = (4, 5, 7);
        let mut got = Vec::new();
        for (k, sk, ts, sport, old, new) in [
            (kind::SET_STATE, 0xa, 10, 8080, 1, fw1),
            (kind::SET_STATE, 0xa, 20, 8080, fw1, fw2),
            (kind::TW_ARM, 0xbeef, 30, 8080, 0, fw2),
            (kind::SET_STATE, 0xa, 31, 8080, fw2, close),
            // Its address serves another socket, the timewait socket is killed, and a new
            // timewait socket gets the same address a second later: three identities.
            (kind::SET_STATE, 0xa, 40, 9090, 1, fw1),
            (kind::TW_CANCEL, 0xbeef, 50, 8080, 0, 6),
            (kind::TW_ARM, 0xbeef, 1_000_000_050, 8080, 0, 6),
            (kind::TW_CANCEL, 0xbeef, 2_000_000_000, 8080, 0, 6),
            (kind::TW_EXPIRE, 0xbeef, 2_000_000_001, 8080, 0, 6),
        ] {
            got.push(cookie(&l.decode(&v2(k, sk, ts, sport, old, new)).unwrap()));
        }
        assert_eq!(got, [1, 1, 1, 1, 2, 1, 3, 3, 3]);
        // A re-arm right after its cancel keeps the identity.
        let mut l = Legacy::new(2);
        l.decode(&v2(kind::TW_ARM, 0xbeef, 10, 8080, 0, 5)).unwrap();
        l.decode(&v2(kind::TW_CANCEL, 0xbeef, 20, 8080, 0, 6))
            .unwrap();
        let rearm = l.decode(&v2(kind::TW_ARM, 0xbeef, 30, 8080, 0, 6)).unwrap();
        assert_eq!(cookie(&rearm), 1);
    }

    #[test]
    fn version_1_has_no_timer_events() {
        let mut l = Legacy::new(1);
        let ev = v2(kind::SET_STATE, 0xa, 10, 8080, 7, 2);
        assert!(matches!(
            l.decode(&ev[..V1_SIZE]),
            Ok(KernelEvent::Transition(t)) if t.id.cookie == 1 && t.id.netns == 0 && t.cpu.is_none()
        ));
        let tw = v2(kind::TW_ARM, 0xbeef, 10, 8080, 0, 6);
        assert_eq!(
            l.decode(&tw[..V1_SIZE]),
            Err(DecodeError::Kind(kind::TW_ARM))
        );
        assert_eq!(l.decode(&tw), Err(DecodeError::Length { got: V2_SIZE }));
    }
}
