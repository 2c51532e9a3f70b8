//! tcplens: an eBPF TCP state transition tracer.
//!
//! The pipeline of `shared/design.md`, one module per stage:
//!
//! ```text
//! source ──► decode ──► tracker ──► sink
//! ```
//!
//! - [`source`]: where raw events come from (the kernel ring buffer, loading and BTF, a
//!   record file) and the host's word on its sockets (sock_diag, /proc, on a thread of
//!   their own);
//! - [`decode`]: bytes into typed [`model::Transition`]s;
//! - [`tracker`]: the pure per-socket state machine (durations, owners, TIME_WAIT);
//! - [`sink`]: printers and aggregates;
//! - [`pipeline`]: one event through tracker and sinks; [`app`]: the live and replay
//!   loops and the commands; [`cli`]: the command line.

pub mod app;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod model;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod tracker;
