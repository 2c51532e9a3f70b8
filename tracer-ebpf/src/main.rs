//! Kernel side of tcplens: BTF tracepoint programs (`tp_btf`) that copy every TCP state
//! transition (`sock:inet_sock_set_state`) and every event of a timewait socket's timer
//! (`timer:timer_start`, `timer_cancel`, `timer_expire_entry`, in `timer.rs`; that
//! tracepoint never shows TIME_WAIT), and of a request socket's (a SYN queued at a listener,
//! `request.rs`), into the `EVENTS` ring buffer.
//!
//! Every tracepoint has two programs, attached in this order: the primary, and a nested one
//! for the events the primary is skipped for. The kernel runs a tracing program at most once
//! at a time per CPU and skips (and counts as `recursion_misses`) an event that comes while
//! it runs, e.g. a softirq's transition that interrupts a `close()`'s. The primary records
//! each event it handles (a key from the event's arguments) in a per-CPU ring; the nested
//! program runs right after it for the same event, and handles the event only if the ring
//! does not have it: exactly the events the primary was skipped for. It counts them in
//! `NESTED`. What neither handled (the nested program was busy too) is the primary's misses
//! less that count: exact loss.
//!
//! Each event carries the socket cookie (a transition asks the kernel for it with
//! `bpf_get_socket_cookie`, which creates it if nobody has yet; a timewait socket carries its
//! full socket's copy) and the inode number of the socket's network namespace. Field offsets
//! come from the kernel's BTF, filled into `CONFIG` and `TIMEWAIT` by the loader; the
//! `-4/-6`, `-L`, `-D` and `--netns` filters are applied here so that filtered-out events
//! cost no ring buffer space. A full ring is never silent: the drop is counted per CPU in
//! `LOST`.
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_kernel, generated,
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    AF_INET, AF_INET6, Config, Event, HANDLED_RING, Handled, MAX_CGROUP_DEPTH, MAX_FILTER_PORTS,
    MAX_HEAD, SockLayout, kind, tracepoint,
};

/// Default ring size; userspace resizes it with `--ring-size` before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per tracepoint: events the nested program handled.
#[map]
static NESTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(tracepoint::COUNT, 0);

#[map]
static LPORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);

#[map]
static RPORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);

// Read-only data the loader fills in. Plain statics, read field by field (`get!`), so the
// busy timer programs read the one address they reject foreign timers on, not the whole
// layout.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::EMPTY;

/// A volatile read of a loader-filled value: never folded to its compile-time default.
macro_rules! get {
    ($place:expr) => {
        rd(&raw const $place)
    };
}

#[inline(always)]
fn rd<T: Copy>(p: *const T) -> T {
    // SAFETY: `p` points at a field of an initialized static.
    unsafe { core::ptr::read_volatile(p) }
}

const HEAD: usize = MAX_HEAD as usize;

/// Per CPU, per timer program (tracepoint x primary/nested): the copy of a timewait or
/// request socket's head. Off the stack: before Linux 6.13 the verifier limits a program's
/// stack and its callees' together to 512 bytes.
#[map]
static HEADS: PerCpuArray<[u8; HEAD]> = PerCpuArray::with_max_entries(2 * tracepoint::COUNT, 0);

/// This CPU's head buffer of the timer program (`tp`, `nested_run`); a program never
/// interrupts itself, and no two programs share a slot.
#[inline(always)]
fn head_buffer(tp: u32, nested_run: bool) -> Option<&'static mut [u8; HEAD]> {
    let ptr = HEADS.get_ptr_mut(2 * tp + u32::from(nested_run))?;
    // SAFETY: this CPU's slot of this program, see above.
    Some(unsafe { &mut *ptr })
}

mod floor;
mod request;
mod timer;

/// Per tracepoint, per CPU: the events the primary handled last.
#[map]
static HANDLED: PerCpuArray<Handled> = PerCpuArray::with_max_entries(tracepoint::COUNT, 0);

/// The primary program of tracepoint `tp`: records that it handles the event `key`, then
/// does.
#[inline(always)]
fn primary(tp: u32, key: [u64; 2], f: impl FnOnce()) {
    if let Some(ring) = HANDLED.get_ptr_mut(tp) {
        // SAFETY: this CPU's entry; tracing programs run with migration disabled, and an
        // interrupting run of this program is skipped by the kernel.
        unsafe {
            let next = (*ring).next;
            if let Some(slot) = (*ring).keys.get_mut((next % HANDLED_RING as u64) as usize) {
                *slot = key;
            }
            (*ring).next = next.wrapping_add(1);
        }
    }
    f();
}

/// The nested program of tracepoint `tp`: handles the event `key` only if the primary did
/// not (it was skipped: the event came while it ran on this CPU).
#[inline(always)]
fn nested(tp: u32, key: [u64; 2], f: impl FnOnce()) {
    if let Some(ring) = HANDLED.get_ptr(tp) {
        // SAFETY: this CPU's entry, read only.
        let handled = unsafe { &*ring };
        let mut i = 1u64;
        while i <= HANDLED_RING as u64 {
            let at = (handled.next.wrapping_sub(i) % HANDLED_RING as u64) as usize;
            if handled.keys.get(at) == Some(&key) {
                return; // the primary handled it
            }
            i += 1;
        }
    }
    if let Some(n) = NESTED.get_ptr_mut(tp) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *n += 1 };
    }
    f();
}

/// A transition's key: the socket's cookie (unique to its life, unlike its address) and
/// its states.
#[inline(always)]
fn set_state_key(ctx: &BtfTracePointContext) -> [u64; 2] {
    let sk: *const c_void = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    // SAFETY: `sk` is the tracepoint's own `struct sock *` argument, untouched, as the
    // helper requires (it creates the cookie when nobody has asked for it yet).
    let cookie = unsafe { generated::bpf_get_socket_cookie(sk as *mut c_void) };
    [cookie, ((old & 0xff) << 8) | (new & 0xff)]
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let key = set_state_key(&ctx);
    primary(tracepoint::SET_STATE, key, || on_set_state(&ctx, key[0]));
    0
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_nested(ctx: BtfTracePointContext) -> i32 {
    let key = set_state_key(&ctx);
    nested(tracepoint::SET_STATE, key, || on_set_state(&ctx, key[0]));
    0
}

#[inline(always)]
fn on_set_state(ctx: &BtfTracePointContext, cookie: u64) {
    let sk: *const c_void = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    // The socket as a `struct tcp_sock`, whose fields (its `inet_sport` past `struct sock`
    // too) are then plain loads the verifier checks against the kernel's BTF; NULL for
    // SCTP and MPTCP, which this tracepoint reports too.
    // SAFETY: `sk` is the tracepoint's own `struct sock *` argument.
    let tcp = unsafe { generated::bpf_skc_to_tcp_sock(sk as *mut c_void) };
    if tcp.is_null() {
        return;
    }
    let fields = Direct(tcp as *const u8);
    let Some(s) = read_sock(&fields, &CONFIG.sock, true) else {
        return;
    };
    let cgroup = fields.cgroup();
    if !in_cgroup(cgroup) {
        return;
    }
    let extra = Extra {
        cgroup: cgroup_id(cgroup),
        retrans: 0,
    };
    emit(
        ctx,
        &fields,
        &s,
        sk as u64,
        cookie,
        kind::SET_STATE,
        old as u8,
        new as u8,
        0,
        &extra,
        |ev| conn_facts(&fields, ev),
    );
}

/// Copies the connection's counters from a full TCP socket (zeros when the kernel's BTF
/// lacks them).
#[inline(always)]
fn conn_facts(tcp: &Direct, ev: *mut Event) {
    let c = &CONFIG.conn;
    // SAFETY: `ev` is the reserved event being filled.
    unsafe {
        if get!(c.bytes_acked) == 0 {
            no_facts(ev);
            return;
        }
        (*ev).bytes_acked = tcp.u64_at(get!(c.bytes_acked));
        (*ev).bytes_received = tcp.u64_at(get!(c.bytes_received));
        (*ev).srtt_us8 = tcp.u32_at(get!(c.srtt_us));
        (*ev).rtt_min_us = tcp.u32_at(get!(c.rtt_min));
        (*ev).total_retrans = tcp.u32_at(get!(c.total_retrans));
        (*ev).facts = 1;
    }
}

/// An event without the connection's counters (timer events: no full socket).
#[inline(always)]
fn no_facts(ev: *mut Event) {
    // SAFETY: `ev` is the reserved event being filled.
    unsafe {
        (*ev).bytes_acked = 0;
        (*ev).bytes_received = 0;
        (*ev).srtt_us8 = 0;
        (*ev).rtt_min_us = 0;
        (*ev).total_retrans = 0;
        (*ev).facts = 0;
    }
}

impl Direct {
    /// The socket's `struct cgroup *` (0 when the kernel's BTF has no socket cgroup).
    #[inline(always)]
    fn cgroup(&self) -> u64 {
        let at = get!(CONFIG.conn.sk_cgroup);
        if at == 0 {
            return 0;
        }
        let cgroup: *const u8 = self.load(at);
        cgroup as u64
    }
}

/// The id of the cgroup at `cgroup` (its directory's inode number); 0 for none.
#[inline(always)]
fn cgroup_id(cgroup: u64) -> u64 {
    if cgroup == 0 {
        return 0;
    }
    let kn = kernel::<u64>(cgroup + u64::from(get!(CONFIG.conn.cgroup_kn))).unwrap_or(0);
    if kn == 0 {
        return 0;
    }
    kernel::<u64>(kn + u64::from(get!(CONFIG.conn.kn_id))).unwrap_or(0)
}

/// Whether the cgroup at `cgroup` passes the `--cgroup` filter: it is the wanted cgroup or
/// lies below it (at most [`MAX_CGROUP_DEPTH`] levels).
#[inline(always)]
fn in_cgroup(mut cgroup: u64) -> bool {
    let want = get!(CONFIG.conn.filter_cgroup);
    if want == 0 {
        return true;
    }
    let parent = u64::from(get!(CONFIG.conn.cgroup_parent));
    let mut depth = 0;
    while depth <= MAX_CGROUP_DEPTH && cgroup != 0 {
        if cgroup_id(cgroup) == want {
            return true;
        }
        cgroup = kernel::<u64>(cgroup + parent).unwrap_or(0);
        depth += 1;
    }
    false
}

/// What an event carries besides the socket's identity and states.
struct Extra {
    /// The socket's cgroup id.
    cgroup: u64,
    /// Request kinds: SYN-ACKs retransmitted.
    retrans: u8,
}

/// Where a socket's fields are read: at byte offsets from `SockLayout`.
trait Fields {
    fn u8_at(&self, off: u32) -> u8;
    fn u16_at(&self, off: u32) -> u16;
    fn u32_at(&self, off: u32) -> u32;
    fn u64_at(&self, off: u32) -> u64;
    /// The inode number of the network namespace `struct net *` at `off` points at.
    fn netns_at(&self, off: u32) -> u32;

    /// The IPv4 address in its first 4 bytes (rest zero), or the IPv6 address.
    #[inline(always)]
    fn address(&self, family: u16, off_v4: u32, off_v6: u32) -> [u8; 16] {
        let mut out = [0u8; 16];
        let words: &[u32] = match family {
            AF_INET6 => &[0, 4, 8, 12],
            AF_INET => &[0],
            _ => &[],
        };
        let base = if family == AF_INET6 { off_v6 } else { off_v4 };
        for (i, &w) in words.iter().enumerate() {
            if let Some(dst) = out.get_mut(i * 4..i * 4 + 4) {
                dst.copy_from_slice(&self.u32_at(base + w).to_ne_bytes());
            }
        }
        out
    }
}

/// A socket the program has a BTF pointer to: plain loads (no helper call), which the
/// verifier checks against the kernel's BTF at these offsets (known constants to it: they
/// come from the frozen read-only data) and the JIT guards against faults.
struct Direct(*const u8);

impl Direct {
    #[inline(always)]
    fn load<T: Copy>(&self, off: u32) -> T {
        // SAFETY: see the type: a checked, fault-guarded load from a kernel object.
        unsafe { core::ptr::read_volatile(self.0.add(off as usize).cast::<T>()) }
    }
}

impl Fields for Direct {
    fn u8_at(&self, off: u32) -> u8 {
        self.load(off)
    }
    fn u16_at(&self, off: u32) -> u16 {
        self.load(off)
    }
    fn u32_at(&self, off: u32) -> u32 {
        self.load(off)
    }
    fn u64_at(&self, off: u32) -> u64 {
        self.load(off)
    }
    fn netns_at(&self, off: u32) -> u32 {
        let net: *const u8 = self.load(off);
        if net.is_null() {
            return 0;
        }
        Direct(net).load(get!(CONFIG.net_inum))
    }
}

/// A socket copied with `bpf_probe_read_kernel` (its first `SockLayout::head` bytes).
struct Copied<'a>(&'a [u8; HEAD]);

impl Copied<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: u32) -> [u8; N] {
        let off = off as usize;
        let mut out = [0u8; N];
        if let Some(src) = self.0.get(off..off + N) {
            out.copy_from_slice(src);
        }
        out
    }
}

impl Fields for Copied<'_> {
    fn u8_at(&self, off: u32) -> u8 {
        self.bytes::<1>(off)[0]
    }
    fn u16_at(&self, off: u32) -> u16 {
        u16::from_ne_bytes(self.bytes(off))
    }
    fn u32_at(&self, off: u32) -> u32 {
        u32::from_ne_bytes(self.bytes(off))
    }
    fn u64_at(&self, off: u32) -> u64 {
        u64::from_ne_bytes(self.bytes(off))
    }
    fn netns_at(&self, off: u32) -> u32 {
        let net = self.u64_at(off);
        kernel::<u32>(net + u64::from(get!(CONFIG.net_inum))).unwrap_or(0)
    }
}

/// What the filters and the event need of a socket, besides its fields.
struct Sock {
    layout: &'static SockLayout,
    family: u16,
    sport: u16,
    dport: u16,
    netns: u32,
}

/// Reads a socket's family, ports and namespace and applies the filters: `None` when it
/// is filtered out. Its local port is in network order (`sport_be`) or in host order.
#[inline(always)]
fn read_sock(f: &impl Fields, l: &'static SockLayout, sport_be: bool) -> Option<Sock> {
    let family = f.u16_at(get!(l.family));
    let want = get!(CONFIG.family);
    if want != 0 && family != want {
        return None;
    }
    let sport = f.u16_at(get!(l.sport));
    let sport = if sport_be { u16::from_be(sport) } else { sport };
    let dport = u16::from_be(f.u16_at(get!(l.dport)));
    if get!(CONFIG.filter_lport) != 0 && LPORTS.get_ptr(sport).is_none() {
        return None;
    }
    if get!(CONFIG.filter_rport) != 0 && RPORTS.get_ptr(dport).is_none() {
        return None;
    }
    let netns = f.netns_at(get!(l.net));
    let want = get!(CONFIG.netns);
    if want != 0 && netns != want {
        return None;
    }
    Some(Sock {
        layout: l,
        family,
        sport,
        dport,
        netns,
    })
}

/// Writes one event straight into reserved ring memory.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit<C: aya_ebpf::EbpfContext>(
    ctx: &C,
    f: &impl Fields,
    s: &Sock,
    skaddr: u64,
    cookie: u64,
    ev_kind: u8,
    old: u8,
    new: u8,
    expires: u64,
    extra: &Extra,
    facts: impl FnOnce(*mut Event),
) {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(ctx);
        return;
    };
    let l = s.layout;
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at reserved, 8-aligned ring memory of `size_of::<Event>()` bytes;
    // every field is written before submit.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = skaddr;
        (*ev).cookie = cookie;
        (*ev).pid_tgid = bpf_get_current_pid_tgid();
        (*ev).expires = expires;
        (*ev).jiffies = generated::bpf_jiffies64();
        (*ev).saddr = f.address(s.family, get!(l.rcv_saddr), get!(l.v6_rcv_saddr));
        (*ev).daddr = f.address(s.family, get!(l.daddr), get!(l.v6_daddr));
        generated::bpf_get_current_comm((*ev).comm.as_mut_ptr().cast(), 16);
        (*ev).netns = s.netns;
        (*ev).cpu = bpf_get_smp_processor_id();
        (*ev).sport = s.sport;
        (*ev).dport = s.dport;
        (*ev).family = s.family;
        (*ev).oldstate = old;
        (*ev).newstate = new;
        (*ev).kind = ev_kind;
        (*ev).retrans = extra.retrans;
        (*ev).cgroup = extra.cgroup;
        (*ev)._pad = 0;
    }
    facts(ev);
    submit(entry, get!(CONFIG.wakeup_bytes));
}

/// Submits an event, waking the reader only when enough has piled up; it also drains on a
/// timer.
#[inline(always)]
fn submit(entry: RingBufEntry<Event>, wakeup_bytes: u32) {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= u64::from(wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
}

/// A value of kernel memory at `addr`.
#[inline(always)]
fn kernel<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// Counts one event lost to a full ring; says so once per CPU through aya-log, off the
/// per-event path (only the first drop on a CPU logs).
#[inline(always)]
fn count_lost<C: aya_ebpf::EbpfContext>(ctx: &C) {
    if let Some(lost) = LOST.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            if *lost == 0 {
                warn!(ctx, "ring buffer full: dropping events");
            }
            *lost += 1;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
