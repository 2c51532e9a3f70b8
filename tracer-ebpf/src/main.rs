//! Kernel side of tcplens: one classic tracepoint program on `sock:inet_sock_set_state` that
//! copies every TCP transition into the `EVENTS` ring buffer.
//!
//! Field offsets come from the tracepoint's format file, filled into `CONFIG` by the loader;
//! the `-4/-6`, `-L` and `-D` filters are applied here so that filtered-out events cost no
//! ring buffer space. A full ring is never silent: the drop is counted per CPU in `LOST`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf, generated},
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    AF_INET, AF_INET6, Config, Event, IPPROTO_TCP, MAX_FILTER_PORTS, MAX_RECORD_SIZE, kind,
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

const RECORD: usize = MAX_RECORD_SIZE as usize;

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
    }
    // Wake the reader only when enough has piled up; it also drains on a timer.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= u64::from(cfg.wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags.into());
    0
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
fn address(rec: &[u8; RECORD], family: u16, off_v4: u32, off_v6: u32) -> [u8; 16] {
    match family {
        AF_INET6 => field::<16>(rec, off_v6),
        AF_INET => {
            let [a, b, c, d] = field::<4>(rec, off_v4);
            [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        }
        _ => [0; 16],
    }
}

#[inline(always)]
fn field<const N: usize>(rec: &[u8; RECORD], off: u32) -> [u8; N] {
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
