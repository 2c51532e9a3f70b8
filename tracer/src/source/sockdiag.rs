//! Sockets as they are now, from the kernel's sock_diag netlink interface (what `ss`
//! uses), in every network namespace on the host.
//!
//! sock_diag answers for the namespace of the asking thread, so a dump of another
//! namespace runs on a short-lived thread that has `setns()` into it.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use thiserror::Error;

use crate::model::{Family, TcpState};

#[derive(Debug, Error)]
pub enum DiagError {
    #[error("sock_diag netlink: {0}")]
    Io(#[from] io::Error),
    #[error("sock_diag netlink: undecodable reply: {0}")]
    Decode(String),
    #[error("sock_diag netlink: the kernel answered error {0}")]
    Kernel(i32),
    #[error("entering network namespace {path}: {source}")]
    Setns { path: PathBuf, source: nix::Error },
}

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    pub family: Family,
    pub state: TcpState,
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
    /// The socket's inode: `socket:[inode]` in `/proc/<pid>/fd`. 0 for sockets no file
    /// refers to any more (orphans, timewait).
    pub inode: u64,
    pub uid: u32,
    /// Inode of the network namespace the socket lives in.
    pub netns: u64,
}

/// TCP sockets in `states` in the calling thread's network namespace.
pub fn dump_here(states: &[TcpState], netns: u64) -> Result<Vec<DiagSocket>, DiagError> {
    let mut flags = StateFlags::empty();
    for s in states {
        flags |= StateFlags::from_bits_truncate(1 << (*s as u32));
    }
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut packet = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: flags.clone(),
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        socket.send(&buf, 0)?;
        receive(&mut socket, netns, &mut out)?;
    }
    Ok(out)
}

fn receive(socket: &mut Socket, netns: u64, out: &mut Vec<DiagSocket>) -> Result<(), DiagError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut off = 0;
        while off < n {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..n])
                .map_err(|e| DiagError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(DiagError::Kernel(e.code.map_or(0, |c| c.get())));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    let Some(state) = TcpState::from_kernel(h.state) else {
                        continue;
                    };
                    out.push(DiagSocket {
                        family: if h.family == AF_INET {
                            Family::Ipv4
                        } else {
                            Family::Ipv6
                        },
                        state,
                        saddr: h.socket_id.source_address,
                        sport: h.socket_id.source_port,
                        daddr: h.socket_id.destination_address,
                        dport: h.socket_id.destination_port,
                        inode: u64::from(h.inode),
                        uid: h.uid,
                        netns,
                    });
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// The network namespaces on the host: namespace inode -> a path that enters it
/// (`/proc/<pid>/task/<tid>/ns/net`, or a bind mount under /run/netns).
pub fn namespaces() -> BTreeMap<u64, PathBuf> {
    let mut found = BTreeMap::new();
    let ns_inode = |p: &std::path::Path| -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(p).ok().map(|m| m.ino())
    };
    if let Ok(procs) = procfs::process::all_processes() {
        for proc in procs.flatten() {
            let pid = proc.pid();
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            for task in tasks.flatten() {
                let path = task.path().join("ns/net");
                match std::fs::metadata(&path) {
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt as _;
                        found.entry(m.ino()).or_insert(path);
                    }
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => warn_unreachable(),
                    Err(_) => {}
                }
            }
        }
    }
    if let Ok(named) = std::fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            if let Some(ino) = ns_inode(&entry.path()) {
                found.entry(ino).or_insert(entry.path());
            }
        }
    }
    found
}

/// Says once that other network namespaces cannot be listed or entered: their sockets
/// are missing from every listing, which must not go unnoticed.
/// (A task that is exiting can refuse access for a moment even to root: only a missing
/// capability is worth the warning.)
fn warn_unreachable() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !has_namespace_caps() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::warn!(
            "cannot reach other network namespaces (needs CAP_SYS_ADMIN and CAP_SYS_PTRACE): their sockets are not listed"
        );
    }
}

/// Whether this process holds CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE (other tasks'
/// /proc entries).
fn has_namespace_caps() -> bool {
    const CAP_SYS_PTRACE: u64 = 19;
    const CAP_SYS_ADMIN: u64 = 21;
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        procfs::process::Process::myself()
            .and_then(|p| p.status())
            .map(|s| {
                let want = (1 << CAP_SYS_PTRACE) | (1 << CAP_SYS_ADMIN);
                s.capeff & want == want
            })
            .unwrap_or(false)
    })
}

/// TCP sockets in `states`, in every network namespace.
pub fn dump_all(states: &[TcpState]) -> Result<Vec<DiagSocket>, DiagError> {
    let own = {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0)
    };
    let mut all = dump_here(states, own)?;
    for (ino, path) in namespaces() {
        if ino == own {
            continue;
        }
        let states = states.to_vec();
        let dumped = std::thread::spawn(move || -> Result<Vec<DiagSocket>, DiagError> {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    warn_unreachable();
                    return Ok(Vec::new());
                }
                Err(_) => return Ok(Vec::new()), // the namespace went away meanwhile
            };
            match nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
                Ok(()) => dump_here(&states, ino),
                Err(nix::Error::EPERM) => {
                    warn_unreachable();
                    Ok(Vec::new())
                }
                Err(source) => Err(DiagError::Setns {
                    path: path.clone(),
                    source,
                }),
            }
        })
        .join()
        .map_err(|_| DiagError::Decode("namespace dump thread panicked".into()))?;
        all.extend(dumped?);
    }
    Ok(all)
}
