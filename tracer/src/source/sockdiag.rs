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
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponse, SocketId as RequestId, StateFlags,
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
    #[error("{0}")]
    Netstat(super::netstat::NetstatError),
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
    /// Its cgroup v2 id (0: none, as for timewait sockets, or not shown).
    pub cgroup: u64,
}

impl DiagSocket {
    pub fn is_timewait(&self) -> bool {
        self.tw_expires_ms.is_some()
    }
}

/// A listener's queues, as sock_diag reports them (what `ss -lnt` shows, and `ss -lntm`'s
/// `d` of `skmem`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerQueue {
    /// Its cookie, namespace and local address (the peer is the unspecified address, port 0).
    pub id: SocketId,
    /// The socket's inode (`socket:[inode]` in `/proc/<pid>/fd`).
    pub inode: u64,
    /// Its cgroup v2 id (0: not shown).
    pub cgroup: u64,
    /// Children waiting for accept() (`idiag_rqueue` = `sk_ack_backlog`; `ss` Recv-Q).
    /// The queue is full when this exceeds `backlog`.
    pub accept_queue: u32,
    /// The listen() backlog, capped by `net.core.somaxconn` (`idiag_wqueue` =
    /// `sk_max_ack_backlog`; `ss` Send-Q).
    pub backlog: u32,
    /// The listener's `sk_drops` (INET_DIAG_SKMEMINFO, SK_MEMINFO_DROPS; `ss -lntm`'s `d`):
    /// each `tcp_listendrop()` on this listener (its share of the namespace's ListenDrops),
    /// but also every other segment the listener discarded: checked on 6.18, a bare ACK
    /// dropped by TCP_DEFER_ACCEPT counts here and not in ListenDrops. Equal to ListenDrops
    /// when SYNs meet a full accept queue and nothing else is dropped.
    pub drops: u32,
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
        let netns = self.netns;
        self.dump_with(states, &ExtensionFlags::empty(), |r, raw| {
            if let Some(s) = diag_socket(r, raw, netns) {
                out.push(s);
            }
        })?;
        Ok(out)
    }

    /// The LISTEN sockets (IPv4 and IPv6) with their queues and drop counts.
    pub fn listeners(&mut self) -> Result<Vec<ListenerQueue>, DiagError> {
        let mut out = Vec::new();
        let mut failed = None;
        let netns = self.netns;
        self.dump_with(&[TcpState::Listen], &ExtensionFlags::SKMEMINFO, |r, raw| {
            match listener_queue(r, raw, netns) {
                Ok(found) => out.extend(found),
                Err(e) => failed = Some(e),
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Dumps the TCP sockets in `states` of both families, with `extensions`; `each`
    /// sees every reply, decoded and raw.
    fn dump_with(
        &mut self,
        states: &[TcpState],
        extensions: &ExtensionFlags,
        mut each: impl FnMut(&InetResponse, &[u8]),
    ) -> Result<(), DiagError> {
        for family in [AF_INET, AF_INET6] {
            let req = InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: extensions.clone(),
                states: state_flags(states),
                socket_id: if family == AF_INET {
                    RequestId::new_v4()
                } else {
                    RequestId::new_v6()
                },
            };
            send(&mut self.socket, req, NLM_F_REQUEST | NLM_F_DUMP)?;
            match receive(&mut self.socket, &mut each) {
                // No handler for TCP dumps: the modules are missing.
                Err(DiagError::Kernel(code)) if code == -nix::libc::ENOENT => {
                    return Err(DiagError::NoTcpDiag);
                }
                other => other?,
            }
        }
        Ok(())
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
        let netns = self.netns;
        let found = receive(&mut self.socket, |r, raw| {
            out.extend(diag_socket(r, raw, netns));
        });
        match found {
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

/// Reads the answer to one request, handing each socket's reply to `each` (decoded, and
/// the raw message for what the crate leaves out).
fn receive(
    socket: &mut Socket,
    mut each: impl FnMut(&InetResponse, &[u8]),
) -> Result<(), DiagError> {
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
                    each(&r, &buf[off..(off + len).min(n)]);
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

/// The socket of one reply (`None` for a state tcplens doesn't know).
fn diag_socket(r: &InetResponse, raw: &[u8], netns: u32) -> Option<DiagSocket> {
    let h = &r.header;
    let state = TcpState::from_kernel(h.state)?;
    Some(DiagSocket {
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
        cgroup: cgroup_id(r),
    })
}

/// `INET_DIAG_CGROUP_ID` (Linux 5.7+): the socket's cgroup v2 id, which the kernel adds to
/// every full socket's reply; 0 for timewait and request sockets (they have none).
const INET_DIAG_CGROUP_ID: u16 = 21;

fn cgroup_id(r: &InetResponse) -> u64 {
    use netlink_packet_core::Nla as _;
    r.nlas
        .iter()
        .find_map(|n| match n {
            Nla::Other(a) if a.kind() == INET_DIAG_CGROUP_ID && a.value_len() == 8 => {
                let mut raw = [0u8; 8];
                a.emit_value(&mut raw);
                Some(u64::from_ne_bytes(raw))
            }
            _ => None,
        })
        .unwrap_or(0)
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

/// The listener of one reply to a dump with INET_DIAG_SKMEMINFO (`None` for another state).
fn listener_queue(
    r: &InetResponse,
    raw: &[u8],
    netns: u32,
) -> Result<Option<ListenerQueue>, DiagError> {
    let Some(s) = diag_socket(r, raw, netns).filter(|s| s.state == TcpState::Listen) else {
        return Ok(None);
    };
    // SK_MEMINFO_DROPS as netlink-packet-sock-diag parses it: `Nla::MemInfo` is the
    // attribute's u32 array in the kernel's order (SK_MEMINFO_RMEM_ALLOC … SK_MEMINFO_DROPS),
    // `drops` its 9th. (A kernel without SK_MEMINFO_DROPS, before 4.x, sends 8 and the whole
    // reply is undecodable.)
    let drops = r
        .nlas
        .iter()
        .find_map(|n| match n {
            Nla::MemInfo(m) => Some(m.drops),
            _ => None,
        })
        .ok_or_else(|| DiagError::Decode("a listener without INET_DIAG_SKMEMINFO".into()))?;
    Ok(Some(ListenerQueue {
        id: s.id,
        inode: s.inode,
        cgroup: s.cgroup,
        accept_queue: r.header.recv_queue,
        backlog: r.header.send_queue,
        drops,
    }))
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

/// The LISTEN sockets (IPv4 and IPv6) of every network namespace, with their queues and
/// drop counts. Only these dumps ask for INET_DIAG_SKMEMINFO: [`dump`] stays as it was.
/// Namespaces are visited as by [`dump`] (tcplens's own must answer, others that cannot be
/// entered are skipped).
pub fn listener_queues() -> Result<Vec<ListenerQueue>, DiagError> {
    let mut out = Vec::new();
    for_each_netns(None, |ino| -> Result<(), DiagError> {
        out.extend(Diag::here(ino)?.listeners()?);
        Ok(())
    })?;
    Ok(out)
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

    /// A listener's reply as the kernel lays it out: `struct inet_diag_msg` (72 bytes),
    /// then INET_DIAG_SKMEMINFO (type 7): 9 native u32s, SK_MEMINFO_DROPS last.
    fn listener_reply(meminfo: Option<[u32; 9]>) -> Vec<u8> {
        let mut msg = vec![0u8; 72];
        msg[0] = AF_INET;
        msg[1] = TcpState::Listen as u8;
        msg[4..6].copy_from_slice(&7102u16.to_be_bytes()); // sport
        msg[8..12].copy_from_slice(&[127, 0, 0, 1]); // src
        msg[44..48].copy_from_slice(&5u32.to_ne_bytes()); // cookie, low half
        msg[56..60].copy_from_slice(&2u32.to_ne_bytes()); // idiag_rqueue
        msg[60..64].copy_from_slice(&1u32.to_ne_bytes()); // idiag_wqueue
        msg[68..72].copy_from_slice(&4242u32.to_ne_bytes()); // idiag_inode
        if let Some(m) = meminfo {
            msg.extend_from_slice(&40u16.to_ne_bytes()); // nla_len
            msg.extend_from_slice(&7u16.to_ne_bytes()); // nla_type
            for v in m {
                msg.extend_from_slice(&v.to_ne_bytes());
            }
        }
        msg
    }

    #[test]
    fn listener_queues_and_drops_are_read_from_the_reply() {
        use netlink_packet_core::Parseable as _;
        let raw = listener_reply(Some([1, 2, 3, 4, 5, 6, 7, 8, 9]));
        let r = InetResponse::parse(&raw[..]).unwrap();
        let q = listener_queue(&r, &raw, 77).unwrap().unwrap();
        assert_eq!(
            (q.accept_queue, q.backlog, q.drops, q.inode),
            (2, 1, 9, 4242)
        );
        assert_eq!(
            (q.id.netns, q.id.cookie, q.id.sport, q.id.family),
            (77, 5, 7102, Family::Ipv4)
        );
        assert_eq!(q.id.saddr, IpAddr::from([127, 0, 0, 1]));
        let raw = listener_reply(None);
        let r = InetResponse::parse(&raw[..]).unwrap();
        assert!(matches!(
            listener_queue(&r, &raw, 77),
            Err(DiagError::Decode(_))
        ));
    }

    /// Runs `f` on a thread in a new network namespace with loopback up (its inode given).
    fn in_new_netns(f: impl FnOnce(u32) + Send + 'static) {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip");
            assert!(lo.success());
            f(Home::here().unwrap().netns);
        })
        .join()
        .expect("namespace thread");
    }

    /// The real kernel: a socket in a namespace of the test's own is found by a dump and by
    /// its cookie, and no longer once closed.
    #[test]
    fn dump_and_lookup_by_cookie() {
        in_new_netns(|netns| {
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
        });
    }

    /// The real kernel: listeners of both families, with their backlogs, in a namespace
    /// of the test's own.
    #[test]
    fn listeners_of_both_families() {
        in_new_netns(|netns| {
            let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
            let _client = std::net::TcpStream::connect(v4.local_addr().unwrap()).unwrap();
            let mut found = Diag::here(netns).unwrap().listeners().unwrap();
            found.sort_by_key(|q| q.id.family == Family::Ipv6);
            let got: Vec<_> = found
                .iter()
                .map(|q| (q.id.family, q.id.sport, q.accept_queue, q.backlog, q.drops))
                .collect();
            // std's TcpListener asks for 128.
            assert_eq!(
                got,
                [
                    (Family::Ipv4, v4.local_addr().unwrap().port(), 1, 128, 0),
                    (Family::Ipv6, v6.local_addr().unwrap().port(), 0, 128, 0),
                ]
            );
            assert!(found.iter().all(|q| q.id.netns == netns && q.inode != 0));
        });
    }
}
