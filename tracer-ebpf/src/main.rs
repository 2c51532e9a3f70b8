//! Kernel side of tcplens: a classic tracepoint program on `sock:inet_sock_set_state` that
//! copies every TCP transition into the `EVENTS` ring buffer, and three programs on the
//! `timer:*` tracepoints that follow timewait sockets, which that tracepoint never shows.
//!
//! Field offsets come from the tracepoints' format files and the kernel's BTF, filled into
//! `CONFIG` and `TIMEWAIT` by the loader; the `-4/-6`, `-L` and `-D` filters are applied here
//! so that filtered-out events cost no ring buffer space. A full ring is never silent: the
//! drop is counted per CPU in `LOST`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_buf, generated,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    AF_INET, AF_INET6, Config, Event, IPPROTO_TCP, MAX_FILTER_PORTS, MAX_RECORD_SIZE, MAX_TW_READ,
    TimewaitLayout, kind,
};

/// Default ring size; userspace resizes it with `--ring-size` before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static LPORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);

#[map]
static RPORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_FILTER_PORTS, 0);

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config::EMPTY);

/// All zero (a handler address no timer has) until the loader turns timewait tracking on.
#[unsafe(no_mangle)]
static TIMEWAIT: Global<TimewaitLayout> = Global::new(TimewaitLayout::EMPTY);

const RECORD: usize = MAX_RECORD_SIZE as usize;
const TW_READ: usize = MAX_TW_READ as usize;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let cfg = CONFIG.load();
    let layout = &cfg.layout;

    // One copy of the whole record, then plain loads at the configured offsets.
    let mut rec = [0u8; RECORD];
    let size = (layout.record_size as usize).min(RECORD);
    let Some(dst) = rec.get_mut(..size) else {
        return 0;
    };
    // SAFETY: the context of a classic tracepoint points at the record, `size` bytes long.
    if unsafe { bpf_probe_read_kernel_buf(ctx.as_ptr() as *const u8, dst) }.is_err() {
        return 0;
    }

    if field_u16(&rec, layout.protocol) != IPPROTO_TCP {
        return 0;
    }
    let family = field_u16(&rec, layout.family);
    if cfg.family != 0 && family != cfg.family {
        return 0;
    }
    let sport = field_u16(&rec, layout.sport);
    let dport = field_u16(&rec, layout.dport);
    if cfg.filter_lport != 0 && LPORTS.get_ptr(sport).is_none() {
        return 0;
    }
    if cfg.filter_rport != 0 && RPORTS.get_ptr(dport).is_none() {
        return 0;
    }

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(&ctx);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at reserved, 8-aligned ring memory of `size_of::<Event>()` bytes;
    // every field is written before submit.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = field_u64(&rec, layout.skaddr);
        (*ev).pid_tgid = bpf_get_current_pid_tgid();
        generated::bpf_get_current_comm((*ev).comm.as_mut_ptr().cast(), 16);
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev).oldstate = field_u32(&rec, layout.oldstate) as u8;
        (*ev).newstate = field_u32(&rec, layout.newstate) as u8;
        (*ev).kind = kind::SET_STATE;
        (*ev)._pad = [0; 7];
        (*ev).saddr = address(&rec, family, layout.saddr, layout.saddr_v6);
        (*ev).daddr = address(&rec, family, layout.daddr, layout.daddr_v6);
        (*ev).expires = 0;
        (*ev).jiffies = 0;
    }
    submit(entry, cfg.wakeup_bytes);
    0
}

// The timer tracepoints fire for every kernel timer on the host, so each program rejects
// timers that are not a timewait socket's in its first instructions: one 8-byte read and a
// compare with the address of `tw_timer_handler`.

/// A timer is armed: a new timewait socket, or a re-arm of one.
#[tracepoint]
pub fn tw_timer_start(ctx: TracePointContext) -> u32 {
    let tw = TIMEWAIT.load();
    if record_u64(&ctx, tw.start_function) != Some(tw.handler) || tw.handler == 0 {
        return 0;
    }
    let (Some(timer), Some(expires), Some(now)) = (
        record_u64(&ctx, tw.start_timer),
        record_u64(&ctx, tw.start_expires),
        record_u64(&ctx, tw.start_now),
    ) else {
        return 0;
    };
    emit_timewait(&ctx, &tw, kind::TW_ARM, timer, expires, now);
    0
}

/// A timer is detached. The record has only the timer, so its `function` is read from the
/// timer itself (still set at this point, also on `timer_shutdown_sync`).
#[tracepoint]
pub fn tw_timer_cancel(ctx: TracePointContext) -> u32 {
    let tw = TIMEWAIT.load();
    let Some(timer) = record_u64(&ctx, tw.cancel_timer) else {
        return 0;
    };
    if kernel_u64(timer.wrapping_add(u64::from(tw.timer_function))) != Some(tw.handler)
        || tw.handler == 0
    {
        return 0;
    }
    let Some(expires) = kernel_u64(timer.wrapping_add(u64::from(tw.timer_expires))) else {
        return 0;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { generated::bpf_jiffies64() };
    emit_timewait(&ctx, &tw, kind::TW_CANCEL, timer, expires, now);
    0
}

/// A timer runs out: the timewait socket's natural end.
#[tracepoint]
pub fn tw_timer_expire_entry(ctx: TracePointContext) -> u32 {
    let tw = TIMEWAIT.load();
    if record_u64(&ctx, tw.expire_function) != Some(tw.handler) || tw.handler == 0 {
        return 0;
    }
    let (Some(timer), Some(now)) = (
        record_u64(&ctx, tw.expire_timer),
        record_u64(&ctx, tw.expire_now),
    ) else {
        return 0;
    };
    let Some(expires) = kernel_u64(timer.wrapping_add(u64::from(tw.timer_expires))) else {
        return 0;
    };
    emit_timewait(&ctx, &tw, kind::TW_EXPIRE, timer, expires, now);
    0
}

/// Reads the timewait socket that owns `timer`, applies the filters and writes one event.
#[inline(always)]
fn emit_timewait(
    ctx: &TracePointContext,
    tw: &TimewaitLayout,
    ev_kind: u8,
    timer: u64,
    expires: u64,
    jiffies: u64,
) {
    let sk = timer.wrapping_sub(u64::from(tw.tw_timer));
    let mut buf = [0u8; TW_READ];
    let size = (tw.read_size as usize).min(TW_READ);
    let Some(dst) = buf.get_mut(..size) else {
        return;
    };
    // SAFETY: `sk` is the live timewait socket whose timer fired this tracepoint;
    // bpf_probe_read_kernel faults safely anyway.
    if unsafe { bpf_probe_read_kernel_buf(sk as *const u8, dst) }.is_err() {
        return;
    }
    let cfg = CONFIG.load();
    let family = u16::from_ne_bytes(field(&buf, tw.skc_family));
    if cfg.family != 0 && family != cfg.family {
        return;
    }
    let sport = u16::from_ne_bytes(field(&buf, tw.skc_num));
    let dport = u16::from_be_bytes(field(&buf, tw.skc_dport));
    if cfg.filter_lport != 0 && LPORTS.get_ptr(sport).is_none() {
        return;
    }
    if cfg.filter_rport != 0 && RPORTS.get_ptr(dport).is_none() {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(ctx);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as in `inet_sock_set_state`: reserved, aligned, every field written.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).skaddr = sk;
        (*ev).pid_tgid = bpf_get_current_pid_tgid();
        generated::bpf_get_current_comm((*ev).comm.as_mut_ptr().cast(), 16);
        (*ev).sport = sport;
        (*ev).dport = dport;
        (*ev).family = family;
        (*ev).oldstate = 0;
        (*ev).newstate = field::<1, TW_READ>(&buf, tw.tw_substate)[0];
        (*ev).kind = ev_kind;
        (*ev)._pad = [0; 7];
        (*ev).saddr = address(&buf, family, tw.skc_rcv_saddr, tw.skc_v6_rcv_saddr);
        (*ev).daddr = address(&buf, family, tw.skc_daddr, tw.skc_v6_daddr);
        (*ev).expires = expires;
        (*ev).jiffies = jiffies;
    }
    submit(entry, cfg.wakeup_bytes);
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

/// A u64 of the tracepoint record at `off`.
#[inline(always)]
fn record_u64(ctx: &TracePointContext, off: u32) -> Option<u64> {
    // SAFETY: the record is readable; bpf_probe_read_kernel faults safely past its end.
    unsafe { ctx.read_at::<u64>(off as usize) }.ok()
}

/// A u64 of kernel memory at `addr`.
#[inline(always)]
fn kernel_u64(addr: u64) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    unsafe { bpf_probe_read_kernel(addr as *const u64) }.ok()
}

/// Counts one event lost to a full ring; says so once per CPU through aya-log, off the
/// per-event path (only the first drop on a CPU logs).
#[inline(always)]
fn count_lost(ctx: &TracePointContext) {
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

/// The IPv4 address in its first 4 bytes (rest zero), or the IPv6 address.
#[inline(always)]
fn address<const B: usize>(rec: &[u8; B], family: u16, off_v4: u32, off_v6: u32) -> [u8; 16] {
    match family {
        AF_INET6 => field::<16, B>(rec, off_v6),
        AF_INET => {
            let [a, b, c, d] = field::<4, B>(rec, off_v4);
            [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        }
        _ => [0; 16],
    }
}

#[inline(always)]
fn field<const N: usize, const B: usize>(rec: &[u8; B], off: u32) -> [u8; N] {
    let off = off as usize;
    let mut out = [0u8; N];
    if let Some(src) = rec.get(off..off + N) {
        out.copy_from_slice(src);
    }
    out
}

#[inline(always)]
fn field_u16(rec: &[u8; RECORD], off: u32) -> u16 {
    u16::from_ne_bytes(field(rec, off))
}

#[inline(always)]
fn field_u32(rec: &[u8; RECORD], off: u32) -> u32 {
    u32::from_ne_bytes(field(rec, off))
}

#[inline(always)]
fn field_u64(rec: &[u8; RECORD], off: u32) -> u64 {
    u64::from_ne_bytes(field(rec, off))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
