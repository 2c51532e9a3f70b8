//! The binary contract between the tcplens eBPF program and its userspace.
//!
//! Everything here is `#[repr(C)]` and shared verbatim by both sides: the kernel writes
//! [`Event`]s into the ring buffer, userspace reads them back (see `tracer::decode`), and the
//! loader fills [`Config`] into the program's read-only data before it is loaded.
#![no_std]

/// `AF_INET`, as in the tracepoint's `family` field.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as in the tracepoint's `family` field.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`: the tracepoint also fires for SCTP and MPTCP, which are ignored.
pub const IPPROTO_TCP: u16 = 6;

/// Largest tracepoint record the kernel program copies (the 6.x record is 72 bytes).
pub const MAX_RECORD_SIZE: u32 = 128;
/// Largest number of ports in one of the `-L`/`-D` filter lists.
pub const MAX_FILTER_PORTS: u32 = 64;

/// Name of the ring buffer map carrying [`Event`]s.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU `u64` counter of events dropped because the ring buffer was full.
pub const LOST_MAP: &str = "LOST";
/// Names of the `u16 -> u8` hash maps holding the local and remote port filters.
pub const LPORTS_MAP: &str = "LPORTS";
pub const RPORTS_MAP: &str = "RPORTS";
/// Name of the [`Config`] global.
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the [`TimewaitLayout`] global (kept apart from [`Config`] so that the programs
/// on the busy `timer:*` tracepoints load only what they filter on).
pub const TIMEWAIT_GLOBAL: &str = "TIMEWAIT";

/// Byte offsets of the fields of `sock:inet_sock_set_state`, read at start-up from the
/// tracepoint's format file so that no kernel's layout is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointLayout {
    /// Bytes of the record to copy (the end of its last field), at most [`MAX_RECORD_SIZE`].
    pub record_size: u32,
    pub skaddr: u32,
    pub oldstate: u32,
    pub newstate: u32,
    pub sport: u32,
    pub dport: u32,
    pub family: u32,
    pub protocol: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
}

/// What the timewait programs need to know, all found at start-up: the address of
/// `tw_timer_handler` (from /proc/kallsyms), the record offsets of the `timer:*` tracepoints
/// (from their format files) and the struct offsets of `inet_timewait_sock`, `sock_common`
/// and `timer_list` (from the kernel's BTF). Nothing here is compiled in for one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimewaitLayout {
    /// Address of `tw_timer_handler`: the `function` of every timewait socket's timer.
    pub handler: u64,
    /// `timer:timer_start` record: `timer`, `function`, `expires`, `now`.
    pub start_timer: u32,
    pub start_function: u32,
    pub start_expires: u32,
    pub start_now: u32,
    /// `timer:timer_cancel` record: `timer`.
    pub cancel_timer: u32,
    /// `timer:timer_expire_entry` record: `timer`, `function`, `now`.
    pub expire_timer: u32,
    pub expire_function: u32,
    pub expire_now: u32,
    /// `offsetof(struct inet_timewait_sock, tw_timer)`.
    pub tw_timer: u32,
    /// `offsetof(struct inet_timewait_sock, tw_substate)` (one byte).
    pub tw_substate: u32,
    /// `offsetof(struct timer_list, expires)` and `function`.
    pub timer_expires: u32,
    pub timer_function: u32,
    /// Offsets in `struct sock_common` (which starts the timewait socket).
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_family: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// Bytes of the timewait socket to copy: past the last field above, at most
    /// [`MAX_TW_READ`].
    pub read_size: u32,
}

impl TimewaitLayout {
    /// All zero: timewait tracking off (no timer matches a zero handler address).
    pub const EMPTY: TimewaitLayout = TimewaitLayout {
        handler: 0,
        start_timer: 0,
        start_function: 0,
        start_expires: 0,
        start_now: 0,
        cancel_timer: 0,
        expire_timer: 0,
        expire_function: 0,
        expire_now: 0,
        tw_timer: 0,
        tw_substate: 0,
        timer_expires: 0,
        timer_function: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        read_size: 0,
    };
}

/// Largest prefix of a timewait socket the kernel program copies.
pub const MAX_TW_READ: u32 = 256;

/// Load-time configuration of the kernel program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub layout: TracepointLayout,
    /// Keep only this family (`AF_INET`/`AF_INET6`); 0 keeps both.
    pub family: u16,
    /// Non-zero: keep only events whose local port is in `LPORTS`.
    pub filter_lport: u8,
    /// Non-zero: keep only events whose remote port is in `RPORTS`.
    pub filter_rport: u8,
    /// Wake the reader only once this many bytes wait in the ring; below it the reader
    /// drains on its own timer. Batching wakeups is what keeps the per-event cost low at
    /// high churn (one wakeup per event costs microseconds on both sides).
    pub wakeup_bytes: u32,
}

impl Config {
    /// All offsets zero, no filter: what the program holds until the loader fills it in.
    pub const EMPTY: Config = Config {
        layout: TracepointLayout {
            record_size: 0,
            skaddr: 0,
            oldstate: 0,
            newstate: 0,
            sport: 0,
            dport: 0,
            family: 0,
            protocol: 0,
            saddr: 0,
            daddr: 0,
            saddr_v6: 0,
            daddr_v6: 0,
        },
        family: 0,
        filter_lport: 0,
        filter_rport: 0,
        wakeup_bytes: 0,
    };
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
}

/// One record in the ring buffer. 104 bytes, 8-aligned, no implicit padding.
///
/// For the timewait kinds, `skaddr` is the `inet_timewait_sock`, the 4-tuple is the
/// timewait socket's, `oldstate` is 0 and `newstate` is its `tw_substate` (FIN_WAIT2 or
/// TIME_WAIT).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// `bpf_get_current_pid_tgid()` of the task on the CPU: tgid in the high half.
    pub pid_tgid: u64,
    /// Local address: 4 bytes for IPv4 (rest zero), 16 for IPv6; network order.
    pub saddr: [u8; 16],
    /// Remote address, as `saddr`.
    pub daddr: [u8; 16],
    /// `comm` of the task on the CPU, NUL-padded.
    pub comm: [u8; 16],
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
    pub _pad: [u8; 7],
    /// Timewait kinds: the timer's `expires`, in jiffies (0 for `SET_STATE`).
    pub expires: u64,
    /// Timewait kinds: jiffies when the event fired (0 for `SET_STATE`).
    pub jiffies: u64,
}

/// Size of [`Event`] in bytes: what userspace expects of every ring buffer record.
pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();
const _: () = assert!(EVENT_SIZE == 104);
const _: () = assert!(core::mem::align_of::<Event>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data `#[repr(C)]` structs without padding holes that matter to the
    // kernel (every byte is written by the loader before use).
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::TracepointLayout {}
    unsafe impl aya::Pod for super::TimewaitLayout {}
}
