//! Bytes from the ring buffer (or a recording) into typed [`KernelEvent`]s, and back.
//!
//! The bytes are a [`tracer_common::Event`], the struct the kernel programs write: decoding
//! reads that struct and validates its fields, so no offset is written down twice.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;
use tracer_common::{AF_INET, AF_INET6, EVENT_SIZE, Event, kind};

use crate::model::{
    Comm, ConnFacts, Family, KernelEvent, RequestEvent, SocketId, Task, TcpState, TimerOp,
    TimewaitEvent, Transition, Via,
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

/// Decodes one ring buffer record. Arbitrary bytes give an error, never a panic.
pub fn decode(b: &[u8]) -> Result<KernelEvent, DecodeError> {
    // A ring record is read where it lies; other bytes (unaligned) are copied first.
    if let Some(ev) = Event::ref_from(b) {
        return decode_event(ev);
    }
    let ev = Event::from_bytes(b).ok_or(DecodeError::Length { got: b.len() })?;
    decode_event(&ev)
}

/// Validates the fields of one [`Event`].
pub fn decode_event(e: &Event) -> Result<KernelEvent, DecodeError> {
    // (timer operation, of a request's timer)
    let op = match e.kind {
        kind::SET_STATE => None,
        kind::TW_ARM => Some((TimerOp::Arm, false)),
        kind::TW_CANCEL => Some((TimerOp::Cancel, false)),
        kind::TW_EXPIRE => Some((TimerOp::Expire, false)),
        kind::REQ_ARM => Some((TimerOp::Arm, true)),
        kind::REQ_CANCEL => Some((TimerOp::Cancel, true)),
        kind::REQ_EXPIRE => Some((TimerOp::Expire, true)),
        other => return Err(DecodeError::Kind(other)),
    };
    let (family, saddr, daddr) = addresses(e.family, &e.saddr, &e.daddr)?;
    let id = SocketId {
        cookie: e.cookie,
        netns: e.netns,
        family,
        saddr,
        sport: e.sport,
        daddr,
        dport: e.dport,
    };
    let new = TcpState::from_kernel(e.newstate).ok_or(DecodeError::State(e.newstate))?;
    let task = task(e.pid_tgid, e.comm);
    if let Some((op, true)) = op {
        return Ok(KernelEvent::Request(RequestEvent {
            ts_ns: e.ts_ns,
            op,
            req: e.skaddr,
            listener: e.cookie,
            id: SocketId { cookie: 0, ..id },
            retrans: e.retrans,
            cgroup: e.cgroup,
            expires: e.expires,
            jiffies: e.jiffies,
            cpu: cpu(e.cpu),
            task,
        }));
    }
    if let Some((op, false)) = op {
        return Ok(KernelEvent::Timewait(TimewaitEvent {
            ts_ns: e.ts_ns,
            op,
            tw: e.skaddr,
            id,
            substate: new,
            expires: e.expires,
            jiffies: e.jiffies,
            cpu: cpu(e.cpu),
            task,
        }));
    }
    let old = TcpState::from_kernel(e.oldstate).ok_or(DecodeError::State(e.oldstate))?;
    Ok(KernelEvent::Transition(Transition {
        ts_ns: e.ts_ns,
        sk: e.skaddr,
        id,
        old,
        new,
        task,
        via: Via::Tracepoint,
        cpu: cpu(e.cpu),
        jiffies: e.jiffies,
        cgroup: e.cgroup,
        facts: (e.facts != 0).then_some(ConnFacts {
            bytes_acked: e.bytes_acked,
            bytes_received: e.bytes_received,
            srtt_us: e.srtt_us8 >> 3,
            min_rtt_us: (e.rtt_min_us != u32::MAX).then_some(e.rtt_min_us),
            retrans: e.total_retrans,
        }),
    }))
}

/// The family and the two addresses (IPv4 in the first 4 bytes).
pub fn addresses(
    family: u16,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> Result<(Family, IpAddr, IpAddr), DecodeError> {
    match family {
        AF_INET => Ok((Family::Ipv4, v4(saddr), v4(daddr))),
        AF_INET6 => Ok((
            Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(*saddr)),
            IpAddr::V6(Ipv6Addr::from(*daddr)),
        )),
        other => Err(DecodeError::Family(other)),
    }
}

/// The task from `bpf_get_current_pid_tgid()` and `comm`.
pub fn task(pid_tgid: u64, comm: [u8; 16]) -> Task {
    Task {
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: Comm::new(comm),
    }
}

/// What [`encode`] writes for an unknown CPU.
const NO_CPU: u32 = u32::MAX;

fn cpu(raw: u32) -> Option<u32> {
    (raw != NO_CPU).then_some(raw)
}

fn v4(raw: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
}

/// Encodes an event back into the kernel's record: the inverse of [`decode`], used by the
/// recorder and by tests.
pub fn encode(ev: &KernelEvent) -> [u8; EVENT_SIZE] {
    let timer_kind = |op: TimerOp, arm: u8| match op {
        TimerOp::Arm => arm,
        TimerOp::Cancel => arm + 1,
        TimerOp::Expire => arm + 2,
    };
    // (time, address, identity, task, cpu, jiffies), then (old, new, kind, expires, retrans).
    let ((ts_ns, skaddr, id, task, cpu, jiffies), (oldstate, newstate, kind, expires, retrans)) =
        match ev {
            KernelEvent::Transition(t) => (
                (t.ts_ns, t.sk, t.id, t.task, t.cpu, t.jiffies),
                (t.old as u8, t.new as u8, kind::SET_STATE, 0, 0),
            ),
            KernelEvent::Timewait(tw) => (
                (tw.ts_ns, tw.tw, tw.id, tw.task, tw.cpu, tw.jiffies),
                (
                    0,
                    tw.substate as u8,
                    timer_kind(tw.op, kind::TW_ARM),
                    tw.expires,
                    0,
                ),
            ),
            KernelEvent::Request(r) => (
                (
                    r.ts_ns,
                    r.req,
                    SocketId {
                        cookie: r.listener,
                        ..r.id
                    },
                    r.task,
                    r.cpu,
                    r.jiffies,
                ),
                (
                    0,
                    TcpState::NewSynRecv as u8,
                    timer_kind(r.op, kind::REQ_ARM),
                    r.expires,
                    r.retrans,
                ),
            ),
        };
    let (cgroup, facts) = match ev {
        KernelEvent::Transition(t) => (t.cgroup, t.facts),
        KernelEvent::Request(r) => (r.cgroup, None),
        KernelEvent::Timewait(_) => (0, None),
    };
    let f = facts.unwrap_or_default();
    Event {
        ts_ns,
        skaddr,
        cookie: id.cookie,
        cgroup,
        bytes_acked: f.bytes_acked,
        bytes_received: f.bytes_received,
        // The kernel's srtt_us is 8 times the RTT: the low bits are lost on the way out.
        srtt_us8: f.srtt_us << 3,
        rtt_min_us: match facts {
            Some(f) => f.min_rtt_us.unwrap_or(u32::MAX),
            None => 0,
        },
        total_retrans: f.retrans,
        facts: u8::from(facts.is_some()),
        pid_tgid: (u64::from(task.pid) << 32) | u64::from(task.tid),
        expires,
        jiffies,
        saddr: addr16(id.saddr),
        daddr: addr16(id.daddr),
        comm: task.comm.raw(),
        netns: id.netns,
        cpu: cpu.unwrap_or(NO_CPU),
        sport: id.sport,
        dport: id.dport,
        family: match id.family {
            Family::Ipv4 => AF_INET,
            Family::Ipv6 => AF_INET6,
        },
        oldstate,
        newstate,
        kind,
        retrans,
        _pad: 0,
    }
    .to_bytes()
}

/// An address as the kernel program writes it: IPv4 in the first 4 bytes.
pub fn addr16(a: IpAddr) -> [u8; 16] {
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

    fn raw_kind(k: u8, family: u16, saddr: [u8; 16], old: u8, new: u8) -> [u8; EVENT_SIZE] {
        Event {
            ts_ns: 431_492_173_553,
            skaddr: 0xffff_8881_02cf_b780,
            cookie: 4242,
            pid_tgid: (13_212u64 << 32) | 0x339f, // tid 13215
            expires: if k == kind::SET_STATE {
                0
            } else {
                4_296_890_675
            },
            jiffies: 4_296_875_675,
            saddr,
            daddr: saddr,
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
            netns: 4_026_531_840,
            cpu: 1,
            sport: 59682,
            dport: 7794,
            family,
            oldstate: old,
            newstate: new,
            kind: k,
            retrans: 0,
            cgroup: 0,
            bytes_acked: 0,
            bytes_received: 0,
            srtt_us8: 0,
            rtt_min_us: 0,
            total_retrans: 0,
            facts: 0,
            _pad: 0,
        }
        .to_bytes()
    }

    fn raw_event(family: u16, saddr: [u8; 16], old: u8, new: u8) -> [u8; EVENT_SIZE] {
        raw_kind(kind::SET_STATE, family, saddr, old, new)
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
        assert_eq!(
            (t.id.cookie, t.id.netns, t.cpu),
            (4242, 4_026_531_840, Some(1))
        );
        assert_eq!(t.key(), 4242);
        assert_eq!(t.jiffies, 4_296_875_675);
        assert_eq!(t.id.family, Family::Ipv4);
        assert_eq!(t.id.saddr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(t.id.daddr, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!((t.id.sport, t.id.dport), (59682, 7794));
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
            assert_eq!((tw.id.cookie, tw.key(), tw.cpu), (4242, 4242, Some(1)));
            assert_eq!(tw.substate, TcpState::TimeWait);
            assert_eq!(tw.id.saddr, "10.0.0.2".parse::<IpAddr>().unwrap());
            assert_eq!((tw.id.sport, tw.id.dport), (59682, 7794));
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
        assert_eq!(t.id.family, Family::Ipv6);
        assert_eq!(t.id.saddr, IpAddr::V6(addr));
        assert_eq!((t.old, t.new), (TcpState::Listen, TcpState::Close));
    }

    #[test]
    fn rejects_bad_records() {
        let ok = raw_event(AF_INET, [0; 16], 1, 4);
        assert_eq!(decode(&ok[..87]), Err(DecodeError::Length { got: 87 }));
        assert_eq!(
            decode(&ok[..EVENT_SIZE - 1]),
            Err(DecodeError::Length {
                got: EVENT_SIZE - 1
            })
        );
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
        let mut bad_kind = Event::from_bytes(&ok).unwrap();
        bad_kind.kind = 9;
        assert_eq!(decode(&bad_kind.to_bytes()), Err(DecodeError::Kind(9)));
    }

    #[test]
    fn a_record_decodes_the_same_in_place_and_copied() {
        #[repr(C, align(8))]
        struct Aligned([u8; EVENT_SIZE + 8]);
        // Ring records are 8-aligned (read in place), a recording's bytes need not be.
        let raw = raw_event(
            AF_INET,
            [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            2,
            1,
        );
        let mut buf = Aligned([0; EVENT_SIZE + 8]);
        let bytes = &mut buf.0;
        bytes[..EVENT_SIZE].copy_from_slice(&raw);
        let aligned = &bytes[..EVENT_SIZE];
        assert!(Event::ref_from(aligned).is_some());
        let in_place = decode(aligned).unwrap();
        bytes.copy_within(..EVENT_SIZE, 1);
        let unaligned = &bytes[1..=EVENT_SIZE];
        assert!(Event::ref_from(unaligned).is_none());
        assert_eq!(decode(unaligned).unwrap(), in_place);
        assert!(
            matches!(in_place, KernelEvent::Transition(ref t) if t.new == TcpState::Established)
        );
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
            for k in [kind::REQ_ARM, kind::REQ_CANCEL, kind::REQ_EXPIRE] {
                let mut ev = Event::from_bytes(&raw_kind(k, family, raw16, 0, 12)).unwrap();
                ev.retrans = 2;
                let raw = ev.to_bytes();
                let r = decode(&raw).expect("valid event");
                assert_eq!(encode(&r), raw);
            }
        }
    }

    #[test]
    fn a_request_event_carries_its_listeners_cookie_and_retransmissions() {
        let mut ev =
            Event::from_bytes(&raw_kind(kind::REQ_EXPIRE, AF_INET, [0; 16], 0, 12)).unwrap();
        ev.retrans = 3;
        let KernelEvent::Request(r) = decode(&ev.to_bytes()).unwrap() else {
            panic!("a request event");
        };
        assert_eq!(
            (r.op, r.listener, r.id.cookie, r.retrans, r.req),
            (TimerOp::Expire, 4242, 0, 3, 0xffff_8881_02cf_b780)
        );
        assert_eq!(
            (r.id.sport, r.id.dport, r.id.netns),
            (59682, 7794, 4_026_531_840)
        );
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
