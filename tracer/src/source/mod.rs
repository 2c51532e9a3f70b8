//! Sources: where events come from (the kernel, or a record file) and what the host says
//! of its sockets (sock_diag, /proc). Everything kernel-specific (BTF, loading and
//! attaching the eBPF programs, the ring buffer, netlink) lives here.

pub mod btf;
pub mod host;
pub mod kernel;
pub mod procs;
pub mod record;
pub mod sockdiag;

use crate::model::TcpState;
use procs::{Holder, OwnerIndex};
use sockdiag::{DiagError, DiagSocket};

/// Sockets in a state right now, each with the process holding it: what `leaks` reports.
pub trait SocketSnapshot {
    fn sockets(&mut self, state: TcpState) -> Result<Vec<(DiagSocket, Option<Holder>)>, DiagError>;
}

/// The live host: sock_diag in every network namespace, holders from /proc (cached).
#[derive(Default)]
pub struct HostSockets {
    pub owners: OwnerIndex,
}

impl SocketSnapshot for HostSockets {
    fn sockets(&mut self, state: TcpState) -> Result<Vec<(DiagSocket, Option<Holder>)>, DiagError> {
        let found = sockdiag::dump_all(&[state])?;
        let inodes: std::collections::HashSet<u64> = found.iter().map(|s| s.inode).collect();
        self.owners.resolve(inodes.iter().copied());
        self.owners.retain(&inodes);
        Ok(found
            .into_iter()
            .map(|s| {
                let holder = self.owners.holder(s.inode).cloned();
                (s, holder)
            })
            .collect())
    }
}
