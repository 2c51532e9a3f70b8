//! The binary contract between the tcplens eBPF programs and their userspace.
//!
//! Everything here is `#[repr(C)]` and shared verbatim by both sides: the kernel writes
//! [`Event`]s into the ring buffer, userspace reads them back (see `tracer::decode`), and the
//! loader fills [`Config`] and [`TimewaitLayout`] into the programs' read-only data before
//! they are loaded. Every offset in them comes from the running kernel's BTF: nothing of one
//! kernel's layout is compiled in.
#![no_std]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `AF_INET`, as in `sock_common.skc_family`.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as in `sock_common.skc_family`.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`: the tracepoint also fires for SCTP and MPTCP, which are ignored.
pub const IPPROTO_TCP: u16 = 6;

/// Largest number of ports in one of the `-L`/`-D` filter lists.
pub const MAX_FILTER_PORTS: u32 = 64;
/// Largest prefix of a socket (`struct sock` or `struct inet_timewait_sock`) the programs
/// copy to read its addresses, ports, family, cookie, namespace and timewait substate.
pub const MAX_HEAD: u32 = 160;

/// Name of the ring buffer map carrying [`Event`]s.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU `u64` counter of events dropped because the ring buffer was full.
pub const LOST_MAP: &str = "LOST";
/// Names of the `u16 -> u8` hash maps holding the local and remote port filters.
pub const LPORTS_MAP: &str = "LPORTS";
pub const RPORTS_MAP: &str = "RPORTS";
/// Name of the per-CPU `u64` array counting, per [`tracepoint`], the events the nested
/// programs handled (events their primary program was skipped for).
pub const NESTED_MAP: &str = "NESTED";
/// Name of the [`Config`] global.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the [`TimewaitLayout`] global.
pub const TIMEWAIT_GLOBAL: &str = "TIMEWAIT";
/// Name of the [`RequestLayout`] global.
pub const REQUEST_GLOBAL: &str = "REQUEST";

/// Where the fields tcplens reads sit in a socket's `struct sock_common` (which starts both
/// `struct sock` and `struct inet_timewait_sock`), as byte offsets from the socket's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockLayout {
    /// `skc_daddr`, `skc_rcv_saddr`: IPv4 addresses, network order.
    pub daddr: u32,
    pub rcv_saddr: u32,
    /// `skc_dport`: the remote port, network order.
    pub dport: u32,
    /// The local port, network order: `inet_sock.inet_sport` (the tracepoint's own source:
    /// `skc_num` is zeroed when the port is released at CLOSE) or
    /// `inet_timewait_sock.tw_sport`. It may lie past `head` (then it is read apart).
    pub sport: u32,
    pub family: u32,
    /// `skc_v6_daddr`, `skc_v6_rcv_saddr`.
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    /// `skc_cookie`: the socket cookie (a timewait socket's is its full socket's).
    pub cookie: u32,
    /// `skc_net.net`: the `struct net *` of the socket's network namespace.
    pub net: u32,
    /// Bytes of the socket to copy: past the last field the program reads, at most
    /// [`MAX_HEAD`].
    pub head: u32,
}

impl SockLayout {
    pub const EMPTY: SockLayout = SockLayout {
        daddr: 0,
        rcv_saddr: 0,
        dport: 0,
        sport: 0,
        family: 0,
        v6_daddr: 0,
        v6_rcv_saddr: 0,
        cookie: 0,
        net: 0,
        head: 0,
    };
}

/// Where a full socket keeps its cgroup and its connection's counters, as byte offsets
/// (all 0 when the kernel's BTF lacks them: then the programs read none of it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnLayout {
    /// `offsetof(struct sock, sk_cgrp_data.cgroup)`: the socket's cgroup v2 (`struct
    /// cgroup *`), the cgroup of the task that created it (or its listener's, for an
    /// accepted socket), for its whole life.
    pub sk_cgroup: u32,
    /// `offsetof(struct cgroup, kn)` and `offsetof(struct kernfs_node, id)`: the cgroup id
    /// (its directory's inode number).
    pub cgroup_kn: u32,
    pub kn_id: u32,
    /// `offsetof(struct cgroup, self.parent)`: the parent cgroup (`self` starts `struct
    /// cgroup`, so the parent's `self` is the parent).
    pub cgroup_parent: u32,
    /// `struct tcp_sock` counters: `bytes_acked`, `bytes_received` (u64), `srtt_us`,
    /// `rtt_min.s[0].v`, `total_retrans` (u32).
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub srtt_us: u32,
    pub rtt_min: u32,
    pub total_retrans: u32,
    /// Zero: keeps the size a multiple of 8.
    #[allow(clippy::pub_underscore_fields)]
    pub _pad: u32,
    /// Non-zero: keep only sockets whose cgroup is this one (its id) or below it.
    pub filter_cgroup: u64,
}

impl ConnLayout {
    pub const EMPTY: ConnLayout = ConnLayout {
        sk_cgroup: 0,
        cgroup_kn: 0,
        kn_id: 0,
        cgroup_parent: 0,
        bytes_acked: 0,
        bytes_received: 0,
        srtt_us: 0,
        rtt_min: 0,
        total_retrans: 0,
        _pad: 0,
        filter_cgroup: 0,
    };
}

/// Deepest cgroup below the `--cgroup` one whose sockets the filter still keeps (cgroup
/// trees are a handful of levels deep: a Kubernetes container's is 4).
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Load-time configuration of the transition program (and the filters of all programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `struct sock`'s common part.
    pub sock: SockLayout,
    /// A full socket's cgroup and counters, and the cgroup filter.
    pub conn: ConnLayout,
    /// `offsetof(struct sock, sk_protocol)` (a `u16` since Linux 5.6).
    pub sk_protocol: u32,
    /// `offsetof(struct net, ns.inum)`: the namespace's inode number.
    pub net_inum: u32,
    /// Non-zero: keep only sockets of the network namespace with this inode number.
    pub netns: u32,
    /// Wake the reader only once this many bytes wait in the ring; below it the reader
    /// drains on its own timer. Batching wakeups is what keeps the per-event cost low at
    /// high churn (one wakeup per event costs microseconds on both sides).
    pub wakeup_bytes: u32,
    /// Keep only this family (`AF_INET`/`AF_INET6`); 0 keeps both.
    pub family: u16,
    /// Non-zero: keep only events whose local port is in `LPORTS`.
    pub filter_lport: u8,
    /// Non-zero: keep only events whose remote port is in `RPORTS`.
    pub filter_rport: u8,
}

impl Config {
    /// All offsets zero, no filter: what the program holds until the loader fills it in.
    pub const EMPTY: Config = Config {
        sock: SockLayout::EMPTY,
        conn: ConnLayout::EMPTY,
        sk_protocol: 0,
        net_inum: 0,
        netns: 0,
        wakeup_bytes: 0,
        family: 0,
        filter_lport: 0,
        filter_rport: 0,
    };
}

/// What the timewait programs need: the address of `tw_timer_handler` (from
/// /proc/kallsyms), which tells a timewait socket's timer from every other kernel timer,
/// and the offsets of `struct timer_list` and `struct inet_timewait_sock` (from BTF).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimewaitLayout {
    /// Address of `tw_timer_handler`; 0 turns timewait tracking off (no timer has it).
    pub handler: u64,
    /// `offsetof(struct timer_list, function)` and `expires`.
    pub timer_function: u32,
    pub timer_expires: u32,
    /// `offsetof(struct inet_timewait_sock, tw_timer)`.
    pub tw_timer: u32,
    /// `offsetof(struct inet_timewait_sock, tw_substate)` (one byte); `sock.head` covers it.
    pub tw_substate: u32,
    /// The timewait socket's common part.
    pub sock: SockLayout,
}

impl TimewaitLayout {
    /// All zero: timewait tracking off.
    pub const EMPTY: TimewaitLayout = TimewaitLayout {
        handler: 0,
        timer_function: 0,
        timer_expires: 0,
        tw_timer: 0,
        tw_substate: 0,
        sock: SockLayout::EMPTY,
    };
}

/// What the timer programs need to follow request sockets (a SYN queued at a listener, its
/// SYN-ACK retransmissions, its end): the address of `reqsk_timer_handler` (from
/// /proc/kallsyms), which tells a request's timer from every other kernel timer, and the
/// offsets of `struct request_sock` (from BTF). The timer's own offsets are
/// [`TimewaitLayout`]'s, which the loader fills whenever the timer programs run (its
/// `handler` 0 when only requests are followed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestLayout {
    /// Address of `reqsk_timer_handler`; 0 turns request tracking off.
    pub handler: u64,
    /// `offsetof(struct request_sock, rsk_timer)`.
    pub rsk_timer: u32,
    /// `offsetof(struct request_sock, num_retrans)` (one byte: SYN-ACKs retransmitted);
    /// `sock.head` covers it.
    pub num_retrans: u32,
    /// `__req_common.skc_listener`: the listener's `struct sock *`; `sock.head` covers it.
    pub listener: u32,
    /// `offsetof(struct sock, sk_cookie)`: the listener's cookie.
    pub listener_cookie: u32,
    /// The request's common part. Its `sport` is `skc_num`, in host order (a request has
    /// no `inet_sport`).
    pub sock: SockLayout,
}

impl RequestLayout {
    /// All zero: request tracking off.
    pub const EMPTY: RequestLayout = RequestLayout {
        handler: 0,
        rsk_timer: 0,
        num_retrans: 0,
        listener: 0,
        listener_cookie: 0,
        sock: SockLayout::EMPTY,
    };
}

/// The tracepoints, as indexes of the per-CPU busy depths and of `NESTED`.
pub mod tracepoint {
    pub const SET_STATE: u32 = 0;
    pub const TIMER_START: u32 = 1;
    pub const TIMER_CANCEL: u32 = 2;
    pub const TIMER_EXPIRE: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Events each primary program remembers having handled, per CPU: its nested program
/// looks its own event up there. A nested program would take over an event the primary
/// did handle only if more than this many of that tracepoint's events came between the two
/// programs' runs for it (interrupts within a few instructions).
pub const HANDLED_RING: usize = 16;

/// Name of the per-CPU array (one entry per [`tracepoint`]) of [`Handled`] rings.
pub const HANDLED_MAP: &str = "HANDLED";

/// The events a primary program handled last on a CPU: (first, second) keys from the
/// event's own arguments, newest at `next - 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Handled {
    pub next: u64,
    pub keys: [[u64; 2]; HANDLED_RING],
}

/// What an [`Event`] reports.
pub mod kind {
    /// A `sock:inet_sock_set_state` transition.
    pub const SET_STATE: u8 = 1;
    /// A timewait socket's timer was armed (`timer:timer_start`): a new timewait socket, or
    /// a re-arm (the FIN_WAIT2 substate turning TIME_WAIT, or TIME_WAIT restarted).
    pub const TW_ARM: u8 = 2;
    /// A timewait socket's timer was detached (`timer:timer_cancel`): just before its
    /// expiry, before a re-arm, or because the socket was killed early.
    pub const TW_CANCEL: u8 = 3;
    /// A timewait socket's timer ran out (`timer:timer_expire_entry`).
    pub const TW_EXPIRE: u8 = 4;
    /// A request socket's timer was armed: a SYN queued at a listener (a new request), or
    /// a re-arm after a SYN-ACK retransmission.
    pub const REQ_ARM: u8 = 5;
    /// A request socket's timer was detached: before its expiry, or because the request
    /// ended early (its handshake completed, an RST, its listener closed).
    pub const REQ_CANCEL: u8 = 6;
    /// A request socket's timer ran out: a SYN-ACK retransmission follows (and a re-arm), or
    /// the request is dropped (retries exhausted).
    pub const REQ_EXPIRE: u8 = 7;
}

/// One record in the ring buffer. 152 bytes, 8-aligned, no implicit padding: any bit
/// pattern is a valid `Event` (zerocopy's derives check both at compile time), so
/// userspace reads one straight from the ring's bytes.
///
/// For the timewait kinds, `skaddr` is the `inet_timewait_sock`, the 4-tuple and cookie are
/// the timewait socket's (its cookie is the full socket's, copied by the kernel),
/// `oldstate` is 0 and `newstate` is its `tw_substate` (FIN_WAIT2 or TIME_WAIT); a
/// timewait socket has no cgroup (`cgroup` 0: its full socket's carries over).
///
/// For the request kinds, `skaddr` is the `request_sock`, the 4-tuple is the request's,
/// `cookie` and `cgroup` are its **listener's** (a request has no cookie until sock_diag
/// asks, and no cgroup), `newstate` is NEW_SYN_RECV and `retrans` the SYN-ACKs
/// retransmitted so far.
///
/// The connection's counters (`bytes_acked` … `total_retrans`) are the `tcp_sock`'s as the
/// transition found them, on `SET_STATE` events when `facts` is 1 (0 everywhere else).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket: its identity while it lives.
    pub skaddr: u64,
    /// The socket cookie: its identity for its whole life, TIME_WAIT included (as
    /// sock_diag and `ss -e` report it).
    pub cookie: u64,
    /// `bpf_get_current_pid_tgid()` of the task on the CPU: tgid in the high half.
    pub pid_tgid: u64,
    /// Timewait kinds: the timer's `expires`, in jiffies (0 for `SET_STATE`).
    pub expires: u64,
    /// Jiffies when the event fired (`bpf_jiffies64()`): with `ts_ns`, what maps the
    /// kernel's tick to monotonic time.
    pub jiffies: u64,
    /// The socket's cgroup v2 id (read from the socket, so right in softirq too); 0 when
    /// unknown.
    pub cgroup: u64,
    /// `tcp_sock.bytes_acked`: sequence space the peer acked (payload, plus 1 for this
    /// side's SYN of an active open and 1 for its FIN, once acked).
    pub bytes_acked: u64,
    /// `tcp_sock.bytes_received`: sequence space received in order (payload, plus 1 for
    /// the peer's FIN).
    pub bytes_received: u64,
    /// Local address: 4 bytes for IPv4 (rest zero), 16 for IPv6; network order.
    pub saddr: [u8; 16],
    /// Remote address, as `saddr`.
    pub daddr: [u8; 16],
    /// `comm` of the task on the CPU, NUL-padded.
    pub comm: [u8; 16],
    /// Inode number of the socket's network namespace.
    pub netns: u32,
    /// The CPU the event fired on: events of one CPU reach the ring in the order they
    /// happened.
    pub cpu: u32,
    /// `tcp_sock.srtt_us`: the smoothed RTT in µs, times 8 (0: no sample yet).
    pub srtt_us8: u32,
    /// `tcp_sock.rtt_min`'s best sample, µs (`u32::MAX`: no sample yet).
    pub rtt_min_us: u32,
    /// `tcp_sock.total_retrans`: segments retransmitted (SYN-ACKs of a passive open
    /// included).
    pub total_retrans: u32,
    /// Local port, host order.
    pub sport: u16,
    /// Remote port, host order.
    pub dport: u16,
    pub family: u16,
    /// `TCP_*` state numbers as in `include/net/tcp_states.h`.
    pub oldstate: u8,
    pub newstate: u8,
    /// One of [`kind`].
    pub kind: u8,
    /// Request kinds: `num_retrans` of the request (0 otherwise).
    pub retrans: u8,
    /// 1: the connection's counters were read.
    pub facts: u8,
    /// Zero: makes the size a multiple of 8 with no implicit padding.
    #[allow(clippy::pub_underscore_fields)]
    pub _pad: u8,
}

/// Size of [`Event`] in bytes: what userspace expects of every ring buffer record.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();
const _: () = assert!(EVENT_SIZE == 152);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

impl Event {
    /// Reads an event from exactly [`EVENT_SIZE`] bytes (of any alignment).
    pub fn from_bytes(b: &[u8]) -> Option<Event> {
        Event::read_from_bytes(b).ok()
    }

    /// The event in `b` itself, without a copy, when `b` is exactly [`EVENT_SIZE`] bytes
    /// at an 8-aligned address (a ring buffer record is).
    pub fn ref_from(b: &[u8]) -> Option<&Event> {
        Event::ref_from_bytes(b).ok()
    }

    /// The event's bytes, as the kernel writes them.
    pub fn to_bytes(&self) -> [u8; EVENT_SIZE] {
        zerocopy::transmute!(*self)
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data `#[repr(C)]` structs without padding holes that matter to the
    // kernel (every byte is written by the loader before use).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TimewaitLayout {}
    unsafe impl aya::Pod for super::RequestLayout {}
}
