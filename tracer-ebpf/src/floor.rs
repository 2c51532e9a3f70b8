//! The floor of tracing at all: programs on the same tracepoints as tcplens's that return
//! at once. `cargo xtask bench` attaches them (`tcplens floor`, hidden) to measure what any
//! tracer of these tracepoints costs the traced workload before it does any work.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn floor_set_state(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_start")]
pub fn floor_timer_start(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn floor_timer_cancel(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn floor_timer_expire(_ctx: BtfTracePointContext) -> i32 {
    0
}
