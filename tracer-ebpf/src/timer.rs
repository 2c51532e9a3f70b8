//! The programs on the `timer:*` tracepoints. They follow a timewait socket through its
//! timer (`sock:inet_sock_set_state` never shows TIME_WAIT), here, and a request socket
//! through its SYN-ACK timer (`request.rs`). The loader fills `TIMEWAIT` from the kernel's
//! BTF and `/proc/kallsyms`; userspace joins the events to the socket's life
//! (`tracer/src/tracker/timewait.rs`).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{TimewaitLayout, kind, tracepoint};

use super::{
    Copied, Extra, Fields as _, HEAD, emit, head_buffer, nested, no_facts, primary, rd, read_sock,
    request,
};

/// The timer's offsets, filled whenever the timer programs run; `handler` all zero (an
/// address no timer has) until the loader turns timewait tracking on.
#[unsafe(no_mangle)]
static TIMEWAIT: TimewaitLayout = TimewaitLayout::EMPTY;

// The timer tracepoints fire for every kernel timer on the host, so the programs reject
// timers that are not a timewait socket's or a request's first: one read of the timer's
// `function` and a compare with the addresses of `tw_timer_handler` and
// `reqsk_timer_handler`. Their first argument is the timer on
// every kernel version (the rest differ).

/// A timer is armed: a new timewait socket, or a re-arm of one.
#[btf_tracepoint(function = "timer_start")]
pub fn tw_timer_start(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, tracepoint::TIMER_START, kind::TW_ARM, false);
    0
}

#[btf_tracepoint(function = "timer_start")]
pub fn tw_timer_start_nested(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, tracepoint::TIMER_START, kind::TW_ARM, true);
    0
}

/// A timer is detached: just before its expiry, before a re-arm, or to kill its socket.
/// (The timer's `function` is still set here, also on `timer_shutdown_sync`.)
#[btf_tracepoint(function = "timer_cancel")]
pub fn tw_timer_cancel(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, tracepoint::TIMER_CANCEL, kind::TW_CANCEL, false);
    0
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn tw_timer_cancel_nested(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, tracepoint::TIMER_CANCEL, kind::TW_CANCEL, true);
    0
}

/// A timer runs out: the timewait socket's natural end.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tw_timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, tracepoint::TIMER_EXPIRE, kind::TW_EXPIRE, false);
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn tw_timer_expire_entry_nested(ctx: BtfTracePointContext) -> i32 {
    on_timer(&ctx, tracepoint::TIMER_EXPIRE, kind::TW_EXPIRE, true);
    0
}

/// One timer event, in the primary (`nested == false`) or the nested program of
/// tracepoint `tp`. Foreign timers (nearly all of them) are rejected first, by one load of
/// the timer's `function` straight from the tracepoint's BTF pointer (no helper call): only
/// a timewait socket's events go through the primary's record and the nested program's
/// look-up, keyed by the socket's cookie and the timer's expiry.
#[inline(always)]
fn on_timer(ctx: &BtfTracePointContext, tp: u32, ev_kind: u8, nested_run: bool) {
    let timer: *const u8 = ctx.arg(0);
    let handler = get!(TIMEWAIT.handler);
    // SAFETY: a load from the kernel's timer at a BTF offset of `struct timer_list`, which
    // the verifier checks against the kernel's BTF (and the JIT guards against faults).
    let function = unsafe {
        core::ptr::read_volatile(
            timer
                .add(get!(TIMEWAIT.timer_function) as usize)
                .cast::<u64>(),
        )
    };
    let requests = get!(request::REQUEST.handler);
    if function == 0 || (function != handler && function != requests) {
        return;
    }
    // SAFETY: as above, `struct timer_list.expires`.
    let expires = unsafe {
        core::ptr::read_volatile(
            timer
                .add(get!(TIMEWAIT.timer_expires) as usize)
                .cast::<u64>(),
        )
    };
    if function == requests {
        request::on_request(ctx, tp, ev_kind, nested_run, timer_address(ctx), expires);
        return;
    }
    // The timewait socket around the timer: a copy of its head (the verifier follows no
    // pointer arithmetic from the timer back to it).
    let tw = timer_address(ctx) - u64::from(get!(TIMEWAIT.tw_timer));
    let Some(head) = head_buffer(tp, nested_run) else {
        return;
    };
    let size = (get!(TIMEWAIT.sock.head) as usize).min(HEAD);
    let Some(dst) = head.get_mut(..size) else {
        return;
    };
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    if unsafe { bpf_probe_read_kernel_buf(tw as *const u8, dst) }.is_err() {
        return;
    }
    let fields = Copied(head);
    let Some(s) = read_sock(&fields, &TIMEWAIT.sock, true) else {
        return;
    };
    let cookie = fields.u64_at(get!(TIMEWAIT.sock.cookie));
    let substate = fields.u8_at(get!(TIMEWAIT.tw_substate));
    // A timewait socket has no cgroup: userspace carries its full socket's over (and
    // applies `--cgroup` to it).
    let extra = Extra {
        cgroup: 0,
        retrans: 0,
    };
    let send = || {
        emit(
            ctx, &fields, &s, tw, cookie, ev_kind, 0, substate, expires, &extra, no_facts,
        )
    };
    if nested_run {
        nested(tp, [cookie, expires], send);
    } else {
        primary(tp, [cookie, expires], send);
    }
}

/// The timer's address as a number (the verifier allows no arithmetic across to the
/// timewait socket on the argument pointer itself).
#[inline(always)]
fn timer_address(ctx: &BtfTracePointContext) -> u64 {
    // SAFETY: the context is the tracepoint's argument array; bpf_probe_read_kernel faults
    // safely anyway.
    unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const u64) }.unwrap_or(0)
}
