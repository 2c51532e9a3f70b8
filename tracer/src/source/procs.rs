//! Which process holds a socket: `/proc/<pid>/fd/<fd>` links to `socket:[inode]`, as
//! `ss -p` finds it. Pids are the host's (tcplens reads the host's /proc), so processes in
//! containers show with their host pid.
//!
//! Owners are cached by inode and re-checked with one `readlink` each; a walk over every
//! process's fds happens only when some inode is not in the cache.

use std::collections::{HashMap, HashSet};

/// A process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub fd: u32,
    pub comm: String,
    pub cmdline: String,
}

#[derive(Default)]
pub struct OwnerIndex {
    by_inode: HashMap<u64, Holder>,
}

fn still_holds(h: &Holder, inode: u64) -> bool {
    std::fs::read_link(format!("/proc/{}/fd/{}", h.pid, h.fd))
        .is_ok_and(|t| t.to_str() == Some(format!("socket:[{inode}]").as_str()))
}

fn info(proc: &procfs::process::Process) -> (String, String) {
    let comm = proc.stat().map(|s| s.comm).unwrap_or_default();
    let cmdline = proc.cmdline().map(|c| c.join(" ")).unwrap_or_default();
    (comm, cmdline)
}

impl OwnerIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `holder()` answer for every inode in `inodes` that some process holds.
    pub fn resolve(&mut self, inodes: impl IntoIterator<Item = u64>) {
        let mut missing: HashSet<u64> = HashSet::new();
        for inode in inodes {
            match self.by_inode.get(&inode) {
                Some(h) if still_holds(h, inode) => {}
                _ => {
                    self.by_inode.remove(&inode);
                    if inode != 0 {
                        missing.insert(inode);
                    }
                }
            }
        }
        if missing.is_empty() {
            return;
        }
        let Ok(procs) = procfs::process::all_processes() else {
            return;
        };
        for proc in procs.flatten() {
            let Ok(fds) = proc.fd() else {
                continue;
            };
            let mut described: Option<(String, String)> = None;
            for fd in fds.flatten() {
                if let procfs::process::FDTarget::Socket(inode) = fd.target
                    && missing.remove(&inode)
                {
                    let (comm, cmdline) = described.get_or_insert_with(|| info(&proc)).clone();
                    self.by_inode.insert(
                        inode,
                        Holder {
                            pid: proc.pid() as u32,
                            fd: fd.fd as u32,
                            comm,
                            cmdline,
                        },
                    );
                }
            }
            if missing.is_empty() {
                break;
            }
        }
    }

    pub fn holder(&self, inode: u64) -> Option<&Holder> {
        self.by_inode.get(&inode)
    }

    /// Forgets inodes not in `keep` (sockets that left the report).
    pub fn retain(&mut self, keep: &HashSet<u64>) {
        self.by_inode.retain(|inode, _| keep.contains(inode));
    }
}
