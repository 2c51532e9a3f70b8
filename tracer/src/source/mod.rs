//! Sources: where transitions come from: the kernel, or a record file. Everything kernel-specific (tracefs, loading and
//! attaching the eBPF program, the ring buffer) lives here.

pub mod kernel;
pub mod record;
pub mod tracefs;
