//! Bytes from the ring buffer (or a recording) into typed [`KernelEvent`]s.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;
use tracer_common::{AF_INET, AF_INET6, EVENT_SIZE, kind};

use crate::model::{
    Comm, Family, KernelEvent, Task, TcpState, TimerOp, TimewaitEvent, Transition, Via,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {got} bytes, expected {EVENT_SIZE}")]
    Length { got: usize },
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u16),
    #[error("unknown TCP state {0}")]
    State(u8),
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(raw)
}

fn bytes16(b: &[u8], off: usize) -> [u8; 16] {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&b[off..off + 16]);
    raw
}

/// Decodes one [`tracer_common::Event`] record. The length is checked first; every other
/// field is validated, so arbitrary bytes give an error, never a panic.
pub fn decode(b: &[u8]) -> Result<KernelEvent, DecodeError> {
    if b.len() != EVENT_SIZE {
        return Err(DecodeError::Length { got: b.len() });
    }
    // Offsets of `tracer_common::Event` (checked against the struct in the tests).
    let ts_ns = u64_at(b, 0);
    let sk = u64_at(b, 8);
    let pid_tgid = u64_at(b, 16);
    let saddr = bytes16(b, 24);
    let daddr = bytes16(b, 40);
    let comm = bytes16(b, 56);
    let sport = u16_at(b, 72);
    let dport = u16_at(b, 74);
    let family_raw = u16_at(b, 76);
    let (oldstate, newstate, ev_kind) = (b[78], b[79], b[80]);
    let expires = u64_at(b, 88);
    let jiffies = u64_at(b, 96);

    let op = match ev_kind {
        kind::SET_STATE => None,
        kind::TW_ARM => Some(TimerOp::Arm),
        kind::TW_CANCEL => Some(TimerOp::Cancel),
        kind::TW_EXPIRE => Some(TimerOp::Expire),
        other => return Err(DecodeError::Kind(other)),
    };
    let (family, saddr, daddr) = match family_raw {
        AF_INET => (Family::Ipv4, v4(&saddr), v4(&daddr)),
        AF_INET6 => (
            Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(saddr)),
            IpAddr::V6(Ipv6Addr::from(daddr)),
        ),
        other => return Err(DecodeError::Family(other)),
    };
    let new = TcpState::from_kernel(newstate).ok_or(DecodeError::State(newstate))?;
    let task = Task {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: Comm::new(comm),
    };
    if let Some(op) = op {
        return Ok(KernelEvent::Timewait(TimewaitEvent {
            ts_ns,
            op,
            tw: sk,
            family,
            saddr,
            sport,
            daddr,
            dport,
            substate: new,
            expires,
            jiffies,
            task,
        }));
    }
    let old = TcpState::from_kernel(oldstate).ok_or(DecodeError::State(oldstate))?;
    Ok(KernelEvent::Transition(Transition {
        ts_ns,
        sk,
        family,
        saddr,
        sport,
        daddr,
        dport,
        old,
        new,
        task,
        via: Via::Tracepoint,
    }))
}

fn v4(raw: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
}

/// Encodes an event back into the kernel's record layout: the inverse of [`decode`], used
/// by the recorder and by tests.
pub fn encode(ev: &KernelEvent) -> [u8; EVENT_SIZE] {
    let mut b = [0u8; EVENT_SIZE];
    let (ts_ns, sk, task, family, saddr, daddr, sport, dport) = match ev {
        KernelEvent::Transition(t) => (
            t.ts_ns, t.sk, t.task, t.family, t.saddr, t.daddr, t.sport, t.dport,
        ),
        KernelEvent::Timewait(tw) => (
            tw.ts_ns, tw.tw, tw.task, tw.family, tw.saddr, tw.daddr, tw.sport, tw.dport,
        ),
    };
    b[0..8].copy_from_slice(&ts_ns.to_ne_bytes());
    b[8..16].copy_from_slice(&sk.to_ne_bytes());
    let pid_tgid = (u64::from(task.pid) << 32) | u64::from(task.tid);
    b[16..24].copy_from_slice(&pid_tgid.to_ne_bytes());
    b[24..40].copy_from_slice(&addr16(saddr));
    b[40..56].copy_from_slice(&addr16(daddr));
    b[56..72].copy_from_slice(&task.comm.raw());
    b[72..74].copy_from_slice(&sport.to_ne_bytes());
    b[74..76].copy_from_slice(&dport.to_ne_bytes());
    let family = match family {
        Family::Ipv4 => AF_INET,
        Family::Ipv6 => AF_INET6,
    };
    b[76..78].copy_from_slice(&family.to_ne_bytes());
    match ev {
        KernelEvent::Transition(t) => {
            b[78] = t.old as u8;
            b[79] = t.new as u8;
            b[80] = kind::SET_STATE;
        }
        KernelEvent::Timewait(tw) => {
            b[79] = tw.substate as u8;
            b[80] = match tw.op {
                TimerOp::Arm => kind::TW_ARM,
                TimerOp::Cancel => kind::TW_CANCEL,
                TimerOp::Expire => kind::TW_EXPIRE,
            };
            b[88..96].copy_from_slice(&tw.expires.to_ne_bytes());
            b[96..104].copy_from_slice(&tw.jiffies.to_ne_bytes());
        }
    }
    b
}

fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut raw = [0u8; 16];
            raw[..4].copy_from_slice(&v4.octets());
            raw
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use tracer_common::Event;

    #[test]
    fn offsets_match_the_abi_struct() {
        assert_eq!(offset_of!(Event, ts_ns), 0);
        assert_eq!(offset_of!(Event, skaddr), 8);
        assert_eq!(offset_of!(Event, pid_tgid), 16);
        assert_eq!(offset_of!(Event, saddr), 24);
        assert_eq!(offset_of!(Event, daddr), 40);
        assert_eq!(offset_of!(Event, comm), 56);
        assert_eq!(offset_of!(Event, sport), 72);
        assert_eq!(offset_of!(Event, dport), 74);
        assert_eq!(offset_of!(Event, family), 76);
        assert_eq!(offset_of!(Event, oldstate), 78);
        assert_eq!(offset_of!(Event, newstate), 79);
        assert_eq!(offset_of!(Event, kind), 80);
        assert_eq!(offset_of!(Event, expires), 88);
        assert_eq!(offset_of!(Event, jiffies), 96);
    }

    fn raw_event(family: u16, saddr: [u8; 16], old: u8, new: u8) -> [u8; EVENT_SIZE] {
        raw_kind(kind::SET_STATE, family, saddr, old, new)
    }

    fn raw_kind(k: u8, family: u16, saddr: [u8; 16], old: u8, new: u8) -> [u8; EVENT_SIZE] {
        let ev = Event {
            ts_ns: 431_492_173_553,
            skaddr: 0xffff_8881_02cf_b780,
            pid_tgid: (13212u64 << 32) | 13215,
            saddr,
            daddr: saddr,
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
            sport: 59682,
            dport: 7794,
            family,
            oldstate: old,
            newstate: new,
            kind: k,
            _pad: [0; 7],
            expires: if k == kind::SET_STATE {
                0
            } else {
                4_296_890_675
            },
            jiffies: if k == kind::SET_STATE {
                0
            } else {
                4_296_875_675
            },
        };
        // SAFETY: `Event` is `repr(C)` plain data of exactly EVENT_SIZE bytes.
        unsafe { std::mem::transmute::<Event, [u8; EVENT_SIZE]>(ev) }
    }

    fn transition(b: &[u8]) -> Transition {
        match decode(b) {
            Ok(KernelEvent::Transition(t)) => t,
            other => panic!("not a transition: {other:?}"),
        }
    }

    #[test]
    fn decodes_an_ipv4_event() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let t = transition(&raw_event(AF_INET, addr, 2, 1));
        assert_eq!(t.ts_ns, 431_492_173_553);
        assert_eq!(t.sk, 0xffff_8881_02cf_b780);
        assert_eq!(t.family, Family::Ipv4);
        assert_eq!(t.saddr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(t.daddr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((t.sport, t.dport), (59682, 7794));
        assert_eq!((t.old, t.new), (TcpState::SynSent, TcpState::Established));
        assert_eq!((t.task.pid, t.task.tid), (13212, 13215));
        assert_eq!(t.task.comm.to_str_lossy(), "python3");
        assert_eq!(t.via, Via::Tracepoint);
    }

    #[test]
    fn decodes_timewait_events() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        for (k, op) in [
            (kind::TW_ARM, TimerOp::Arm),
            (kind::TW_CANCEL, TimerOp::Cancel),
            (kind::TW_EXPIRE, TimerOp::Expire),
        ] {
            let Ok(KernelEvent::Timewait(tw)) = decode(&raw_kind(k, AF_INET, addr, 0, 6)) else {
                panic!("kind {k} is a timewait event");
            };
            assert_eq!(tw.op, op);
            assert_eq!(tw.tw, 0xffff_8881_02cf_b780);
            assert_eq!(tw.substate, TcpState::TimeWait);
            assert_eq!(tw.saddr, "10.0.0.2".parse::<IpAddr>().unwrap());
            assert_eq!((tw.sport, tw.dport), (59682, 7794));
            assert_eq!((tw.expires, tw.jiffies), (4_296_890_675, 4_296_875_675));
        }
        // The substate must be a state.
        assert_eq!(
            decode(&raw_kind(kind::TW_ARM, AF_INET, addr, 0, 0)),
            Err(DecodeError::State(0))
        );
    }

    #[test]
    fn decodes_an_ipv6_event() {
        let addr: Ipv6Addr = "2001:db8::42".parse().unwrap();
        let t = transition(&raw_event(AF_INET6, addr.octets(), 10, 7));
        assert_eq!(t.family, Family::Ipv6);
        assert_eq!(t.saddr, IpAddr::V6(addr));
        assert_eq!((t.old, t.new), (TcpState::Listen, TcpState::Close));
    }

    #[test]
    fn rejects_bad_records() {
        let ok = raw_event(AF_INET, [0; 16], 1, 4);
        assert_eq!(decode(&ok[..87]), Err(DecodeError::Length { got: 87 }));
        assert_eq!(decode(&ok[..103]), Err(DecodeError::Length { got: 103 }));
        assert_eq!(decode(&[]), Err(DecodeError::Length { got: 0 }));
        assert_eq!(
            decode(&raw_event(3, [0; 16], 1, 4)),
            Err(DecodeError::Family(3))
        );
        assert_eq!(
            decode(&raw_event(AF_INET, [0; 16], 0, 4)),
            Err(DecodeError::State(0))
        );
        assert_eq!(
            decode(&raw_event(AF_INET, [0; 16], 1, 13)),
            Err(DecodeError::State(13))
        );
        let mut bad_kind = ok;
        bad_kind[80] = 9;
        assert_eq!(decode(&bad_kind), Err(DecodeError::Kind(9)));
    }

    #[test]
    fn encode_is_the_inverse_of_decode() {
        for (family, addr) in [(AF_INET, [10, 1, 2, 3]), (AF_INET6, [0x20, 1, 0xd, 0xb8])] {
            let mut raw16 = [0u8; 16];
            raw16[..4].copy_from_slice(&addr);
            if family == AF_INET6 {
                raw16[15] = 7;
            }
            let raw = raw_event(family, raw16, 8, 9);
            let t = decode(&raw).expect("valid event");
            assert_eq!(encode(&t), raw);
            for k in [kind::TW_ARM, kind::TW_CANCEL, kind::TW_EXPIRE] {
                let raw = raw_kind(k, family, raw16, 0, 5);
                let tw = decode(&raw).expect("valid event");
                assert_eq!(encode(&tw), raw);
            }
        }
    }

    #[test]
    fn state_names_round_trip() {
        for st in TcpState::ALL {
            assert_eq!(TcpState::from_kernel(st as u8), Some(st));
            assert_eq!(TcpState::parse(st.name()), Some(st));
        }
        assert_eq!(TcpState::parse("tcp_close-wait"), Some(TcpState::CloseWait));
        assert_eq!(TcpState::parse("OPEN"), None);
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(13), None);
    }
}
