//! The listen path: a request socket (`struct request_sock`, state NEW_SYN_RECV) is what a
//! listener keeps for a SYN until the handshake completes. The kernel reports no state
//! transition for it, but it arms the request's `rsk_timer` (`reqsk_timer_handler`) when
//! the SYN is queued, re-arms it after each SYN-ACK retransmission and detaches it when the
//! request ends: the timer programs (`timer.rs`) hand those events here. The loader fills
//! `REQUEST` from the kernel's BTF and `/proc/kallsyms`; userspace follows each request to
//! its end and joins it to the child socket (`tracer/src/tracker/request.rs`).

use aya_ebpf::{helpers::bpf_probe_read_kernel_buf, programs::BtfTracePointContext};
use tracer_common::{RequestLayout, kind};

use super::{
    CONFIG, Copied, Extra, Fields as _, HEAD, cgroup_id, emit, head_buffer, in_cgroup, kernel,
    nested, no_facts, primary, rd, read_sock,
};

/// `TCP_NEW_SYN_RECV`: a request socket's state.
const NEW_SYN_RECV: u8 = 12;

/// All zero (a handler address no timer has) until the loader turns request tracking on.
#[unsafe(no_mangle)]
pub(crate) static REQUEST: RequestLayout = RequestLayout::EMPTY;

/// One event of the request whose timer is at `timer` (`tw_kind`: the timewait kind of the
/// same timer operation), in the primary or the nested program of tracepoint `tp`.
#[inline(always)]
pub(crate) fn on_request(
    ctx: &BtfTracePointContext,
    tp: u32,
    tw_kind: u8,
    nested_run: bool,
    timer: u64,
    expires: u64,
) {
    let ev_kind = tw_kind + (kind::REQ_ARM - kind::TW_ARM);
    let req = timer - u64::from(get!(REQUEST.rsk_timer));
    let Some(head) = head_buffer(tp, nested_run) else {
        return;
    };
    let size = (get!(REQUEST.sock.head) as usize).min(HEAD);
    let Some(dst) = head.get_mut(..size) else {
        return;
    };
    // SAFETY: bpf_probe_read_kernel faults safely on any address.
    if unsafe { bpf_probe_read_kernel_buf(req as *const u8, dst) }.is_err() {
        return;
    }
    let fields = Copied(head);
    // A request's local port is `skc_num`, in host order.
    let Some(s) = read_sock(&fields, &REQUEST.sock, false) else {
        return;
    };
    let retrans = fields.u8_at(get!(REQUEST.num_retrans));
    let listener = fields.u64_at(get!(REQUEST.listener));
    let cookie = kernel::<u64>(listener + u64::from(get!(REQUEST.listener_cookie))).unwrap_or(0);
    // A request has no cgroup; its listener's is its child's.
    let at = get!(CONFIG.conn.sk_cgroup);
    let cgroup = if at == 0 {
        0
    } else {
        kernel::<u64>(listener + u64::from(at)).unwrap_or(0)
    };
    if !in_cgroup(cgroup) {
        return;
    }
    let extra = Extra {
        cgroup: cgroup_id(cgroup),
        retrans,
    };
    let send = || {
        emit(
            ctx,
            &fields,
            &s,
            req,
            cookie,
            ev_kind,
            0,
            NEW_SYN_RECV,
            expires,
            &extra,
            no_facts,
        );
    };
    if nested_run {
        nested(tp, [req, expires], send);
    } else {
        primary(tp, [req, expires], send);
    }
}
