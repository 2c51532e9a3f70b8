//! tcplens: an eBPF TCP state transition tracer.
//!
//! The pipeline of `shared/design.md`, one module per stage:
//!
//! ```text
//! source ──► decode ──► tracker ──► sink
//! ```
//!
//! - [`source`]: where raw events come from (the kernel ring buffer; tracefs and loading);
//! - [`decode`]: bytes into typed [`model::Transition`]s;
//! - [`tracker`]: the pure per-socket state machine (durations, owners);
//! - [`sink`]: printers and aggregates;
//! - [`app`]: the wiring and the live loop; [`cli`]: the command line.

pub mod app;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod model;
pub mod sink;
pub mod source;
pub mod tracker;
