//! Sockets as they are now, from the kernel's sock_diag netlink interface (what `ss`
//! uses), in every network namespace on the host.
//!
//! sock_diag answers for the namespace of the asking socket, which is the namespace of the
//! thread that created it: a dump of another namespace enters it (`setns`) on the calling
//! thread and comes back before returning. No socket is kept in another namespace (it would
//! keep the namespace alive), and a namespace that goes away meanwhile is skipped.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, SocketId as RequestId, StateFlags,
};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use thiserror::Error;

use crate::model::{Family, SocketId, TcpState};

#[derive(Debug, Error)]
pub enum DiagError {
    // Messages carry their cause themselves and chain none (see `SourceError`).
    #[error("sock_diag netlink: {0}")]
    Io(io::Error),
    #[error("sock_diag netlink: undecodable reply: {0}")]
    Decode(String),
    #[error("sock_diag netlink: the kernel answered error {0}")]
    Kernel(i32),
    #[error(
        "sock_diag has no TCP support in this kernel: the inet_diag and tcp_diag modules are not loaded (modprobe tcp_diag)"
    )]
    NoTcpDiag,
    #[error("returning to tcplens's own network namespace: {0}")]
    Home(nix::Error),
}

impl From<io::Error> for DiagError {
    fn from(e: io::Error) -> Self {
        DiagError::Io(e)
    }
}

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Its cookie (sock_diag creates it if nobody has yet), namespace and 4-tuple.
    pub id: SocketId,
    /// Its state; for a timewait socket, its substate (TIME_WAIT or FIN_WAIT2).
    pub state: TcpState,
    /// The socket's inode: `socket:[inode]` in `/proc/<pid>/fd`. 0 for sockets no file
    /// refers to any more (orphans, timewait).
    pub inode: u64,
    pub uid: u32,
    /// A timewait socket: milliseconds until its timer runs out.
    pub tw_expires_ms: Option<u32>,
}

impl DiagSocket {
    pub fn is_timewait(&self) -> bool {
        self.tw_expires_ms.is_some()
    }
}

/// `idiag_timer` of a timewait socket.
const TIMER_TIME_WAIT: u8 = 3;
/// Offsets in a reply: the netlink header, then `struct inet_diag_msg`.
const NLMSG_HDR: usize = 16;
const IDIAG_TIMER: usize = 2;
const IDIAG_EXPIRES: usize = 52;

fn state_flags(states: &[TcpState]) -> StateFlags {
    let mut flags = StateFlags::empty();
    for s in states {
        flags |= StateFlags::from_bits_truncate(1 << (*s as u32));
    }
    flags
}

fn send(socket: &mut Socket, req: InetRequest, flags: u16) -> Result<(), DiagError> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, SockDiagMessage::InetRequest(req).into());
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// A sock_diag socket of the calling thread's network namespace (inode `netns`).
pub struct Diag {
    socket: Socket,
    netns: u32,
}

impl Diag {
    pub fn here(netns: u32) -> Result<Diag, DiagError> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Diag { socket, netns })
    }

    /// TCP sockets in `states`.
    pub fn dump(&mut self, states: &[TcpState]) -> Result<Vec<DiagSocket>, DiagError> {
        let mut out = Vec::new();
        for family in [AF_INET, AF_INET6] {
            let req = InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: state_flags(states),
                socket_id: if family == AF_INET {
                    RequestId::new_v4()
                } else {
                    RequestId::new_v6()
                },
            };
            send(&mut self.socket, req, NLM_F_REQUEST | NLM_F_DUMP)?;
            match receive(&mut self.socket, self.netns, &mut out) {
                // No handler for TCP dumps: the modules are missing.
                Err(DiagError::Kernel(code)) if code == -nix::libc::ENOENT => {
                    return Err(DiagError::NoTcpDiag);
                }
                other => other?,
            }
        }
        Ok(out)
    }

    /// The one socket with this 4-tuple and cookie, if it still exists.
    pub fn lookup(
        &mut self,
        family: Family,
        (saddr, sport, daddr, dport): (IpAddr, u16, IpAddr, u16),
        cookie: u64,
    ) -> Result<Option<DiagSocket>, DiagError> {
        let mut id = match family {
            Family::Ipv4 => RequestId::new_v4(),
            Family::Ipv6 => RequestId::new_v6(),
        };
        id.source_address = saddr;
        id.source_port = sport;
        id.destination_address = daddr;
        id.destination_port = dport;
        // `idiag_cookie` is two native-endian u32s, low half first.
        id.cookie[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
        id.cookie[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        let req = InetRequest {
            family: match family {
                Family::Ipv4 => AF_INET,
                Family::Ipv6 => AF_INET6,
            },
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        };
        send(&mut self.socket, req, NLM_F_REQUEST)?;
        let mut out = Vec::new();
        match receive(&mut self.socket, self.netns, &mut out) {
            Ok(()) => Ok(out.pop()),
            // No such socket (any more).
            Err(DiagError::Kernel(code)) if code == -nix::libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// TCP sockets in `states` in the calling thread's network namespace (inode `netns`).
pub fn dump_here(states: &[TcpState], netns: u32) -> Result<Vec<DiagSocket>, DiagError> {
    Diag::here(netns)?.dump(states)
}

fn receive(socket: &mut Socket, netns: u32, out: &mut Vec<DiagSocket>) -> Result<(), DiagError> {
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
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => return Err(DiagError::Kernel(code.get())),
                    None => return Ok(()), // an ACK: the end of a single answer
                },
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let h = &r.header;
                    let raw = &buf[off..(off + len).min(n)];
                    if let Some(state) = TcpState::from_kernel(h.state) {
                        out.push(DiagSocket {
                            id: SocketId {
                                cookie: cookie_of(h.socket_id.cookie),
                                netns,
                                family: if h.family == AF_INET {
                                    Family::Ipv4
                                } else {
                                    Family::Ipv6
                                },
                                saddr: h.socket_id.source_address,
                                sport: h.socket_id.source_port,
                                daddr: h.socket_id.destination_address,
                                dport: h.socket_id.destination_port,
                            },
                            state,
                            inode: u64::from(h.inode),
                            uid: h.uid,
                            tw_expires_ms: timewait_expires(raw),
                        });
                    }
                    if off + len >= n && single_answer(&msg.header) {
                        return Ok(());
                    }
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

/// An answer to a non-dump request is one message, without a closing DONE.
fn single_answer(h: &NetlinkHeader) -> bool {
    h.flags & netlink_packet_core::NLM_F_MULTIPART == 0
}

fn cookie_of(raw: [u8; 8]) -> u64 {
    let lo = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let hi = u32::from_ne_bytes([raw[4], raw[5], raw[6], raw[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `idiag_expires` of a timewait socket's reply (netlink-packet-sock-diag drops it for
/// TIME_WAIT timers), from the raw message.
fn timewait_expires(msg: &[u8]) -> Option<u32> {
    if *msg.get(NLMSG_HDR + IDIAG_TIMER)? != TIMER_TIME_WAIT {
        return None;
    }
    let raw = msg.get(NLMSG_HDR + IDIAG_EXPIRES..NLMSG_HDR + IDIAG_EXPIRES + 4)?;
    Some(u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// The network namespaces on the host: inode number -> a path that enters it
/// (`/proc/<pid>/task/<tid>/ns/net`, or a bind mount under /run/netns).
pub fn namespaces() -> BTreeMap<u32, std::path::PathBuf> {
    let mut found = BTreeMap::new();
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
                        found.entry(m.ino() as u32).or_insert(path);
                    }
                    Err(e) if e.kind() == io::ErrorKind::PermissionDenied => warn_unreachable(),
                    Err(_) => {}
                }
            }
        }
    }
    if let Ok(named) = std::fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            if let Ok(m) = std::fs::metadata(entry.path()) {
                found.entry(m.ino() as u32).or_insert(entry.path());
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
            .is_ok_and(|s| {
                let want = (1 << CAP_SYS_PTRACE) | (1 << CAP_SYS_ADMIN);
                s.capeff & want == want
            })
    })
}

/// The calling thread's network namespace, to come back to.
struct Home {
    file: File,
    netns: u32,
}

impl Home {
    fn here() -> Result<Home, DiagError> {
        let file = File::open("/proc/thread-self/ns/net")?;
        let netns = file.metadata()?.ino() as u32;
        Ok(Home { file, netns })
    }

    /// Runs `f` inside the namespace at `path` (inode `ino`); `None` when the namespace
    /// cannot be entered (gone, or no permission: said once).
    fn visit<T>(
        &self,
        path: &std::path::Path,
        f: impl FnOnce() -> T,
    ) -> Result<Option<T>, DiagError> {
        let Ok(ns) = File::open(path) else {
            return Ok(None); // gone meanwhile
        };
        match nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET) {
            Ok(()) => {}
            Err(nix::Error::EPERM) => {
                warn_unreachable();
                return Ok(None);
            }
            Err(e) => {
                log::debug!("entering network namespace {}: {e}", path.display());
                return Ok(None);
            }
        }
        let out = f();
        nix::sched::setns(&self.file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(DiagError::Home)?;
        Ok(Some(out))
    }
}

/// What a dump over namespaces found.
#[derive(Debug, Default)]
pub struct Dump {
    pub sockets: Vec<DiagSocket>,
    /// The namespaces whose sockets were all listed.
    pub netns: HashSet<u32>,
}

/// TCP sockets in `states`, in every network namespace (or only those in `only`).
/// tcplens's own namespace must answer; another that cannot be entered or dumped (it went
/// away, or no permission) is skipped and left out of [`Dump::netns`].
pub fn dump(states: &[TcpState], only: Option<&HashSet<u32>>) -> Result<Dump, DiagError> {
    let mut out = Dump::default();
    for_each_netns(only, |ino| -> Result<(), DiagError> {
        out.sockets.extend(dump_here(states, ino)?);
        out.netns.insert(ino);
        Ok(())
    })?;
    Ok(out)
}

/// Runs `f` in tcplens's own namespace (errors are the caller's) and in every other one
/// (or those in `only`; their errors are skipped, at debug level).
pub fn for_each_netns(
    only: Option<&HashSet<u32>>,
    mut f: impl FnMut(u32) -> Result<(), DiagError>,
) -> Result<(), DiagError> {
    let home = Home::here()?;
    let wanted = |ino: u32| only.is_none_or(|o| o.contains(&ino));
    if wanted(home.netns) {
        f(home.netns)?;
    }
    for (ino, path) in namespaces() {
        if ino == home.netns || !wanted(ino) {
            continue;
        }
        if let Some(Err(e)) = home.visit(&path, || f(ino))? {
            log::debug!("sock_diag in network namespace {ino}: {e}");
        }
    }
    Ok(())
}

/// TCP sockets in `states`, in every network namespace (the sockets only).
pub fn dump_all(states: &[TcpState]) -> Result<Vec<DiagSocket>, DiagError> {
    dump(states, None).map(|d| d.sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_two_native_u32s_low_first() {
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&7u32.to_ne_bytes());
        raw[4..].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(cookie_of(raw), (1 << 32) | 7);
    }

    #[test]
    fn timewait_expiry_is_read_from_the_raw_reply() {
        let mut msg = vec![0u8; NLMSG_HDR + 72];
        msg[NLMSG_HDR + IDIAG_TIMER] = TIMER_TIME_WAIT;
        msg[NLMSG_HDR + IDIAG_EXPIRES..NLMSG_HDR + IDIAG_EXPIRES + 4]
            .copy_from_slice(&59_996u32.to_ne_bytes());
        assert_eq!(timewait_expires(&msg), Some(59_996));
        msg[NLMSG_HDR + IDIAG_TIMER] = 1; // a retransmit timer
        assert_eq!(timewait_expires(&msg), None);
        assert_eq!(timewait_expires(&msg[..10]), None);
    }

    /// The real kernel: a socket in a namespace of the test's own is found by a dump and by
    /// its cookie, and no longer once closed.
    #[test]
    fn dump_and_lookup_by_cookie() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let netns = Home::here().unwrap().netns;
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(lo.success());
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let listed = dump_here(&[TcpState::Listen], netns).unwrap();
            assert_eq!(listed.len(), 1, "{listed:?}");
            let s = &listed[0];
            assert_eq!(
                (s.id.sport, s.id.netns, s.state),
                (port, netns, TcpState::Listen)
            );
            assert_ne!(s.id.cookie, 0);
            let tuple = (s.id.saddr, s.id.sport, s.id.daddr, s.id.dport);
            let mut diag = Diag::here(netns).unwrap();
            let found = diag.lookup(Family::Ipv4, tuple, s.id.cookie).unwrap();
            assert_eq!(found.map(|f| f.id.cookie), Some(s.id.cookie));
            // Another cookie, or no socket: none.
            assert_eq!(
                diag.lookup(Family::Ipv4, tuple, s.id.cookie + 1).unwrap(),
                None
            );
            drop(l);
            assert_eq!(diag.lookup(Family::Ipv4, tuple, s.id.cookie).unwrap(), None);
        })
        .join()
        .expect("namespace thread");
    }
}
