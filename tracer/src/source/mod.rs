//! Sources: where events come from (the kernel, or a record file) and what the host says
//! of its sockets (sock_diag, /proc). Everything kernel-specific (BTF, loading and
//! attaching the eBPF programs, the ring buffer, netlink) lives here.

pub mod btf;
pub mod cgroup;
pub mod host;
pub mod kernel;
pub mod netstat;
pub mod procs;
pub mod record;
mod request;
pub mod sockdiag;
pub mod timewait;
