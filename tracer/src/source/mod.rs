//! Sources: where transitions come from. Everything kernel-specific (tracefs, loading and
//! attaching the eBPF program, the ring buffer) lives here.

pub mod kernel;
pub mod tracefs;
