//! The typed vocabulary of the pipeline: TCP states and decoded transitions.

use std::fmt;
use std::net::IpAddr;

/// A TCP state, numbered as in `include/net/tcp_states.h`, named as Linux names it without
/// the `TCP_` prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
}

impl TcpState {
    /// Every state, in kernel order.
    pub const ALL: [TcpState; 12] = [
        TcpState::Established,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::Listen,
        TcpState::Closing,
        TcpState::NewSynRecv,
    ];

    /// The state with kernel number `n`, if there is one.
    pub fn from_kernel(n: u8) -> Option<TcpState> {
        Self::ALL.get(usize::from(n).checked_sub(1)?).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
        }
    }

    /// Parses a state name as [`TcpState::name`] prints it (case-insensitive, `TCP_` prefix
    /// and `-` for `_` accepted).
    pub fn parse(s: &str) -> Option<TcpState> {
        let upper = s.trim().to_ascii_uppercase().replace('-', "_");
        let bare = upper.strip_prefix("TCP_").unwrap_or(&upper);
        Self::ALL.into_iter().find(|st| st.name() == bare)
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// Address family of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// The task that was on the CPU when an event fired: `tgid` is what users call the pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub pid: u32,
    pub tid: u32,
    pub comm: Comm,
}

impl Task {
    /// Whether a task is known: a transition that only sock_diag showed has none (the idle
    /// task, pid 0, has a name: `swapper/N`).
    pub fn is_known(&self) -> bool {
        !self.comm.as_bytes().is_empty()
    }
}

/// A task's `comm`: up to 15 bytes, kept inline so decoding allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Comm([u8; 16]);

impl Comm {
    pub const EMPTY: Comm = Comm([0; 16]);

    pub fn new(raw: [u8; 16]) -> Self {
        Comm(raw)
    }

    /// From a name, truncated to 15 bytes as the kernel does.
    pub fn from_name(name: &str) -> Self {
        let mut raw = [0u8; 16];
        let n = name.len().min(15);
        raw[..n].copy_from_slice(&name.as_bytes()[..n]);
        Comm(raw)
    }

    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        &self.0[..end]
    }

    /// The name, with invalid UTF-8 replaced.
    pub fn to_str_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.as_bytes())
    }

    pub fn raw(&self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_str_lossy())
    }
}

/// For people: control characters escaped (any user can set a task's `comm`).
impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&crate::sink::escaped(&self.to_str_lossy()))
    }
}

/// One TCP state transition, as the kernel reported it (or derived from a timewait socket's
/// timer, see [`Via`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Address of the kernel `struct sock`.
    pub sk: u64,
    pub id: SocketId,
    pub old: TcpState,
    pub new: TcpState,
    /// The task on the CPU (in softirq, often unrelated to the socket).
    pub task: Task,
    pub via: Via,
    /// The CPU the kernel reported it on (`None` for derived transitions and old
    /// recordings).
    pub cpu: Option<u32>,
    /// Jiffies when it happened (0 when unknown).
    pub jiffies: u64,
    /// The socket's cgroup v2 id, read from the socket (0: unknown; a derived transition
    /// carries its life's).
    pub cgroup: u64,
    /// The connection's counters as the transition found them (`None` for derived
    /// transitions, kernels without them and old recordings).
    pub facts: Option<ConnFacts>,
}

/// A TCP connection's counters, read from its `struct tcp_sock` at a transition: at its
/// last one (→ CLOSE, also when it lives on as a timewait socket, which keeps none of
/// them) they are final. The byte counts are the kernel's, in sequence space (as `ss -i`
/// and tcplife show them): see each field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnFacts {
    /// `bytes_acked`: what the peer acknowledged: the payload sent, plus 1 for this side's
    /// SYN when it opened the connection (`connect()`), plus 1 for its FIN once acked.
    /// Retransmitted bytes count once.
    pub bytes_acked: u64,
    /// `bytes_received`: the payload received in order, plus 1 for the peer's FIN.
    pub bytes_received: u64,
    /// Smoothed RTT, µs (`srtt_us >> 3`, what `ss -i` shows as rtt; 0: no sample).
    pub srtt_us: u32,
    /// The lowest RTT sample, µs (`None`: no sample yet).
    pub min_rtt_us: Option<u32>,
    /// Segments retransmitted (`total_retrans`; a passive socket's SYN-ACK retransmissions
    /// included).
    pub retrans: u32,
}

impl Transition {
    /// The socket's key in the tracker (see [`key`]).
    pub fn key(&self) -> u64 {
        key(self.id.cookie, self.sk)
    }
}

/// Which socket: its cookie, network namespace, family and 4-tuple. Every event, life and
/// sock_diag listing carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketId {
    /// The socket cookie: the socket's identity for its whole life, kept by the timewait
    /// socket it may become (0: unknown, in recordings made before tcplens read it).
    pub cookie: u64,
    /// Inode number of the socket's network namespace (0: unknown, as `cookie`).
    pub netns: u32,
    pub family: Family,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// A socket's key in the tracker: its cookie, or its kernel address when the cookie is
/// unknown (cookies are small counters, addresses kernel pointers: they never meet).
pub fn key(cookie: u64, addr: u64) -> u64 {
    if cookie != 0 { cookie } else { addr }
}

/// Where a transition comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Reported by the kernel on `sock:inet_sock_set_state`.
    Tracepoint,
    /// Derived from a timewait socket's timer: → TIME_WAIT, and TIME_WAIT (or the FIN_WAIT2
    /// substate) → CLOSE, which the tracepoint never reports.
    Timewait,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::Tracepoint => "tracepoint",
            Via::Timewait => "timewait",
        }
    }
}

/// What happened to a timewait socket's timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerOp {
    /// Armed: a new timewait socket, or a re-arm of one.
    Arm,
    /// Detached: before its expiry, before a re-arm, or because the socket was killed.
    Cancel,
    /// Ran out.
    Expire,
}

/// One event of a timewait socket's timer, as the kernel reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitEvent {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub op: TimerOp,
    /// Address of the kernel `struct inet_timewait_sock`.
    pub tw: u64,
    /// The cookie in it is the full socket's (the kernel copies it).
    pub id: SocketId,
    /// `tw_substate`: TIME_WAIT, or FIN_WAIT2 for an orphan waiting out `tcp_fin_timeout`.
    pub substate: TcpState,
    /// The timer's expiry, in jiffies.
    pub expires: u64,
    /// Jiffies when the event fired.
    pub jiffies: u64,
    /// The CPU it fired on (`None` in old recordings).
    pub cpu: Option<u32>,
    pub task: Task,
}

impl TimewaitEvent {
    /// The socket's key in the tracker (see [`key`]).
    pub fn key(&self) -> u64 {
        key(self.id.cookie, self.tw)
    }
}

/// One event of a request socket's timer (a SYN queued at a listener), as the kernel
/// reported it: arm (the SYN queued, or a re-arm after a SYN-ACK retransmission), cancel
/// (before an expiry, or the request ended early), expire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestEvent {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub op: TimerOp,
    /// Address of the kernel `struct request_sock`: the request's identity while it lives.
    pub req: u64,
    /// The listener's cookie (0: unknown).
    pub listener: u64,
    /// The request's namespace and 4-tuple; its cookie is 0 (a request has none until
    /// sock_diag asks).
    pub id: SocketId,
    /// SYN-ACKs retransmitted so far (`num_retrans`).
    pub retrans: u8,
    /// The listener's cgroup v2 id (a request has none; its child gets its listener's).
    pub cgroup: u64,
    /// The timer's expiry, in jiffies.
    pub expires: u64,
    /// Jiffies when the event fired.
    pub jiffies: u64,
    pub cpu: Option<u32>,
    pub task: Task,
}

/// One decoded ring buffer record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEvent {
    Transition(Transition),
    Timewait(TimewaitEvent),
    Request(RequestEvent),
}

impl KernelEvent {
    pub fn ts_ns(&self) -> u64 {
        match self {
            KernelEvent::Transition(t) => t.ts_ns,
            KernelEvent::Timewait(tw) => tw.ts_ns,
            KernelEvent::Request(r) => r.ts_ns,
        }
    }
}
