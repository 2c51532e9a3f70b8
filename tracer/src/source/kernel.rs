//! The live source: loads the eBPF programs, attaches them as BTF tracepoints to
//! `sock:inet_sock_set_state` (and, for TIME_WAIT, to `timer:timer_start`, `timer_cancel` and
//! `timer_expire_entry`: `timewait.rs`) and reads raw event records from their ring buffer. It also reads
//! what the kernel lost: ring buffer drops and each program's recursion misses.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, MapData, MapType, PerCpuArray, RingBuf};
use aya::programs::{BtfTracePoint, ProgramError, ProgramFd};
use aya::{Btf, Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tracer_common::{
    AF_INET, AF_INET6, CONFIG_GLOBAL, Config, ConnLayout, EVENTS_MAP, LOST_MAP, LPORTS_MAP,
    MAX_FILTER_PORTS, NESTED_MAP, REQUEST_GLOBAL, RPORTS_MAP, RequestLayout, TIMEWAIT_GLOBAL,
    TimewaitLayout, tracepoint,
};

use super::btf::{self, KernelBtf, LayoutError, VMLINUX_BTF};
use super::cgroup::{CgroupFilter, CgroupNames};
use super::timewait;
use crate::model::{Family, SocketId};

/// The eBPF object built by `build.rs`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
/// A tracepoint and its two programs (see `tracer-ebpf`): the primary, and the nested one
/// for the events the primary is skipped for, attached after it.
#[derive(Clone, Copy)]
pub(super) struct Tracepoint {
    /// Its index in `tracer_common::tracepoint` (and in the `NESTED` counters).
    pub(super) index: u32,
    pub(super) name: &'static str,
    pub(super) primary: &'static str,
    pub(super) nested: &'static str,
}

const TRANSITIONS: Tracepoint = Tracepoint {
    index: tracepoint::SET_STATE,
    name: "inet_sock_set_state",
    primary: "inet_sock_set_state",
    nested: "inet_sock_set_state_nested",
};
/// Default ring buffer size: at this machine's top churn (~150 k transitions/s of 128
/// bytes each) it holds about half a second of events, so a stalled reader loses nothing.
pub const DEFAULT_RING_SIZE: u32 = 8 << 20;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error(
        "permission denied: tcplens needs root, or CAP_BPF and CAP_PERFMON, to load its eBPF programs"
    )]
    NotPrivileged,
    #[error(
        "this kernel has no BTF ({VMLINUX_BTF}: {0}); tcplens needs a kernel built with CONFIG_DEBUG_INFO_BTF (Linux 5.12 or later)"
    )]
    NoBtf(io::Error),
    // Messages carry their cause themselves, and chain none (no `#[from]` or `source`):
    // anyhow's `{:#}` would print it a second time.
    #[error("this kernel's BTF lacks what tcplens reads: {0}")]
    Layout(btf::LayoutError),
    #[error(
        "this kernel has no BPF ring buffer (BPF_MAP_TYPE_RINGBUF); tcplens needs Linux 5.12 or later"
    )]
    NoRingBuf,
    #[error("this kernel has no tracepoint {0} (tcplens needs Linux 5.12 or later)")]
    NoTracepoint(&'static str),
    // The underlying errors are shown in the message, not chained: one line, said once.
    #[error(
        "the kernel rejected the eBPF program {name}: {error} (tcplens needs Linux 5.12 or later; RUST_LOG=debug shows the verifier log)"
    )]
    Verifier { name: String, error: io::Error },
    #[error("{what}: {error}")]
    Bpf {
        what: &'static str,
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the ring buffer: {0}")]
    Io(io::Error),
}

impl From<btf::LayoutError> for SourceError {
    fn from(e: btf::LayoutError) -> Self {
        SourceError::Layout(e)
    }
}

impl From<io::Error> for SourceError {
    fn from(e: io::Error) -> Self {
        SourceError::Io(e)
    }
}

/// What the kernel programs keep; everything else they drop before using ring space.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelFilter {
    pub family: Option<Family>,
    /// Keep only these local ports (empty: all).
    pub lports: Vec<u16>,
    /// Keep only these remote ports (empty: all).
    pub rports: Vec<u16>,
    /// Keep only this network namespace (its inode number).
    pub netns: Option<u32>,
    /// Keep only sockets of this cgroup and those below it.
    pub cgroup: Option<CgroupFilter>,
}

impl KernelFilter {
    /// The kernel's test, in userspace (replay of a record file, sock_diag snapshots).
    pub fn keeps(&self, family: Family, sport: u16, dport: u16, netns: u32) -> bool {
        self.keeps_local(family, sport, netns)
            && (self.rports.is_empty() || self.rports.contains(&dport))
    }

    /// The filters that apply to a listener: family, local port, namespace (a listener has
    /// no remote port; `-D` applies to its connections).
    pub fn keeps_listener(&self, id: &SocketId) -> bool {
        self.keeps_local(id.family, id.sport, id.netns)
    }

    /// The kernel's test, for a socket sock_diag lists (with its cgroup id, 0 for none).
    pub fn keeps_listed(&self, id: &SocketId, cgroup: u64, names: &mut CgroupNames) -> bool {
        self.keeps(id.family, id.sport, id.dport, id.netns) && self.keeps_cgroup(cgroup, names)
    }

    /// As [`KernelFilter::keeps_listed`], for a listener (see
    /// [`KernelFilter::keeps_listener`]).
    pub fn keeps_listed_listener(
        &self,
        id: &SocketId,
        cgroup: u64,
        names: &mut CgroupNames,
    ) -> bool {
        self.keeps_listener(id) && self.keeps_cgroup(cgroup, names)
    }

    /// `--cgroup`'s test (0: no cgroup, kept only without `--cgroup`).
    fn keeps_cgroup(&self, cgroup: u64, names: &mut CgroupNames) -> bool {
        self.cgroup.as_ref().is_none_or(|c| c.keeps(cgroup, names))
    }

    fn keeps_local(&self, family: Family, sport: u16, netns: u32) -> bool {
        self.family.is_none_or(|f| f == family)
            && (self.lports.is_empty() || self.lports.contains(&sport))
            && self.netns.is_none_or(|n| n == netns)
    }
}

#[derive(Clone, Debug)]
pub struct KernelOptions {
    pub filter: KernelFilter,
    /// Ring buffer bytes: a power of two, a multiple of the page size.
    pub ring_size: u32,
    /// Follow timewait sockets through the timer tracepoints (off: `--no-timewait`).
    pub timewait: bool,
    /// Follow request sockets (SYNs queued at listeners) through the same tracepoints
    /// (off: `--no-requests`).
    pub requests: bool,
}

/// How often the reader drains the ring when the kernel has not woken it: the most a
/// quiet event waits before it is printed.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Unread bytes at which the kernel wakes the reader early: an eighth of the ring (at most
/// 1 MiB), far below full, so a burst never outruns the reader's timer.
pub fn wakeup_bytes(ring_size: u32) -> u32 {
    (ring_size / 8).min(1 << 20)
}

/// The loaded, attached programs and their maps. Dropping it detaches them.
pub struct KernelSource {
    pub events: EventRing,
    pub logs: KernelLogs,
    pub lost: KernelLoss,
    /// Whether timewait sockets are followed (the timer programs are attached).
    pub timewait: bool,
    /// Whether request sockets are followed (the listen path; the timer programs too).
    pub requests: bool,
    // Owns the programs and their links.
    _ebpf: Ebpf,
}

/// The ring buffer of raw [`tracer_common::Event`] records.
pub struct EventRing(AsyncFd<RingBuf<MapData>>);

/// The aya-log ring of the kernel programs, when they have one.
pub struct KernelLogs(Option<AsyncFd<EbpfLogger<&'static dyn log::Log>>>);

/// Events the kernel lost, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lost {
    /// Dropped by a program because the ring buffer was full.
    pub ring_full: u64,
    /// Events neither program of a tracepoint handled: the kernel skipped the primary
    /// because it was already running on that CPU (`recursion_misses`) and the nested one
    /// did not take the event over (it was busy too). A timer program's loss may have been
    /// a timer tcplens would have ignored: it counts all the same.
    pub recursion: u64,
}

impl Lost {
    pub fn total(&self) -> u64 {
        self.ring_full + self.recursion
    }
}

impl std::fmt::Display for Lost {
    /// `0 lost`, or `12 lost (ring buffer full 10, recursion 2)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} lost", self.total())?;
        if self.total() > 0 {
            write!(
                f,
                " (ring buffer full {}, recursion {})",
                self.ring_full, self.recursion
            )?;
        }
        Ok(())
    }
}

/// Where losses are read from: the kernel ([`KernelLoss`]), or a stand-in in tests.
pub trait LossSource {
    fn lost(&self) -> Result<Lost, SourceError>;
}

/// The per-CPU ring drop counter, the primary programs' `recursion_misses` and the events
/// their nested programs took over.
pub struct KernelLoss {
    ring: PerCpuArray<MapData, u64>,
    nested: PerCpuArray<MapData, u64>,
    /// Each attached tracepoint's index and primary program.
    primaries: Vec<(u32, ProgramFd)>,
}

impl LossSource for KernelLoss {
    fn lost(&self) -> Result<Lost, SourceError> {
        let sum = |map: &PerCpuArray<MapData, u64>, index: u32| -> Result<u64, SourceError> {
            Ok(map
                .get(&index, 0)
                .map_err(bpf_err("reading the loss counters"))?
                .iter()
                .sum())
        };
        let ring_full = sum(&self.ring, 0)?;
        let mut recursion = 0;
        for (index, p) in &self.primaries {
            let missed = recursion_misses(p).map_err(|e| SourceError::Bpf {
                what: "reading a program's recursion misses",
                error: Box::new(e),
            })?;
            let taken_over = sum(&self.nested, *index)?;
            if missed > 0 {
                log::debug!(
                    "tracepoint {index}: primary skipped {missed} events, nested program took {taken_over}"
                );
            }
            recursion += missed.saturating_sub(taken_over);
        }
        Ok(Lost {
            ring_full,
            recursion,
        })
    }
}

/// `bpf_prog_info.recursion_misses` of a loaded program (Linux 5.12+; aya 0.14 does not
/// expose it).
fn recursion_misses(p: &ProgramFd) -> io::Result<u64> {
    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: zeroed plain-data kernel structs; the kernel writes at most `info_len` bytes
    // of `info`, which lives until the call returns.
    unsafe {
        let mut info: bpf_prog_info = std::mem::zeroed();
        let mut attr: bpf_attr = std::mem::zeroed();
        attr.info.bpf_fd = p.as_fd().as_raw_fd() as u32;
        attr.info.info_len = std::mem::size_of::<bpf_prog_info>() as u32;
        attr.info.info = (&raw mut info) as u64;
        let r = nix::libc::syscall(
            nix::libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as nix::libc::c_int,
            &raw mut attr,
            std::mem::size_of::<bpf_attr>(),
        );
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info.recursion_misses)
    }
}

fn bpf_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> SourceError {
    move |e| {
        if is_permission_error(&e) {
            SourceError::NotPrivileged
        } else {
            SourceError::Bpf {
                what,
                error: Box::new(e),
            }
        }
    }
}

/// EPERM/EACCES anywhere in an error's chain.
fn is_permission_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(c) if c == nix::libc::EPERM || c == nix::libc::EACCES)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl KernelSource {
    /// Loads and attaches the programs. Must be called inside a tokio runtime.
    pub fn open(opts: &KernelOptions) -> Result<Self, SourceError> {
        let btf_path = Path::new(VMLINUX_BTF);
        if let Err(e) = std::fs::metadata(btf_path) {
            return Err(SourceError::NoBtf(e));
        }
        match aya::sys::is_map_supported(MapType::RingBuf) {
            Ok(false) => return Err(SourceError::NoRingBuf),
            Err(e) if is_permission_error(&e) => return Err(SourceError::NotPrivileged),
            _ => {}
        }
        // Start-up reads the BTF twice (btf-rs for the layouts here, aya's for the
        // programs' loads) and /proc/kallsyms, which the kernel writes slowly: the last two
        // on threads of their own meanwhile.
        let kallsyms = (opts.timewait || opts.requests).then(|| {
            std::thread::Builder::new()
                .name("tcplens-kallsyms".into())
                .spawn(timewait::handler_addresses)
        });
        let aya_btf = std::thread::Builder::new()
            .name("tcplens-btf".into())
            .spawn(Btf::from_sys_fs);
        let kernel_btf = KernelBtf::open(btf_path)?;
        let offsets = btf::sock_offsets(&kernel_btf)?;
        let f = &opts.filter;
        let conn = match btf::conn_layout(&kernel_btf) {
            Ok(conn) => ConnLayout {
                filter_cgroup: f.cgroup.as_ref().map_or(0, |c| c.id),
                ..conn
            },
            Err(why) if f.cgroup.is_some() => {
                return Err(SourceError::Layout(LayoutError(format!(
                    "--cgroup: this kernel does not show a socket's cgroup ({why})"
                ))));
            }
            Err(why) => {
                log::warn!(
                    "sockets' cgroups and connection counters unavailable ({why}); running without them"
                );
                ConnLayout::EMPTY
            }
        };
        let config = Config {
            sock: offsets.sock,
            conn,
            sk_protocol: offsets.sk_protocol,
            net_inum: offsets.net_inum,
            netns: f.netns.unwrap_or(0),
            wakeup_bytes: wakeup_bytes(opts.ring_size),
            family: match f.family {
                None => 0,
                Some(Family::Ipv4) => AF_INET,
                Some(Family::Ipv6) => AF_INET6,
            },
            filter_lport: u8::from(!f.lports.is_empty()),
            filter_rport: u8::from(!f.rports.is_empty()),
        };
        let timers = kallsyms.map(|reading| {
            let found = match reading {
                Ok(thread) => thread.join().unwrap_or_else(|_| {
                    Err(LayoutError(format!("reading {} failed", btf::KALLSYMS)))
                }),
                Err(e) => Err(LayoutError(format!("{}: {e}", btf::KALLSYMS))),
            };
            timewait::layouts(
                &kernel_btf,
                &offsets.sock,
                &found,
                opts.timewait,
                opts.requests,
            )
        });
        let timers = timers.flatten();
        drop(kernel_btf);
        for ports in [&f.lports, &f.rports] {
            if ports.len() > MAX_FILTER_PORTS as usize {
                return Err(SourceError::Bpf {
                    what: "port filter",
                    error: format!("at most {MAX_FILTER_PORTS} ports per list").into(),
                });
            }
        }

        let (tw_layout, request_layout) =
            timers.unwrap_or((TimewaitLayout::EMPTY, RequestLayout::EMPTY));
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &config, true)
            .override_global(TIMEWAIT_GLOBAL, &tw_layout, true)
            .override_global(REQUEST_GLOBAL, &request_layout, true)
            .map_max_entries(EVENTS_MAP, opts.ring_size)
            .load(PROGRAM)
            .map_err(bpf_err("loading the eBPF object"))?;

        // Kernel-side log records (rare: e.g. the first drop on a CPU) go to the `log` crate.
        let logger = match EbpfLogger::init(&mut ebpf) {
            // SAFETY: the logger owns its ring buffer map fd for its whole life.
            Ok(l) => Some(
                unsafe { AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE) }
                    .map_err(|e| e.into_parts().1)?,
            ),
            Err(e) => {
                log::warn!("kernel-side logging unavailable: {e}");
                None
            }
        };

        for (name, ports) in [(LPORTS_MAP, &f.lports), (RPORTS_MAP, &f.rports)] {
            let map = ebpf.map_mut(name).ok_or_else(|| SourceError::Bpf {
                what: "port filter",
                error: format!("map {name} missing from the eBPF object").into(),
            })?;
            let mut map: BpfHashMap<_, u16, u8> =
                BpfHashMap::try_from(map).map_err(bpf_err("port filter map"))?;
            for &port in ports {
                map.insert(port, 1, 0).map_err(bpf_err("port filter map"))?;
            }
        }

        let btf = aya_btf
            .map_err(bpf_err("reading the kernel BTF"))?
            .join()
            .map_err(|_| SourceError::Bpf {
                what: "reading the kernel BTF",
                error: "its thread failed".into(),
            })?
            .map_err(bpf_err("reading the kernel BTF"))?;
        let mut primaries = vec![(TRANSITIONS.index, load(&mut ebpf, &btf, TRANSITIONS)?)];
        attach(
            &mut ebpf,
            TRANSITIONS,
            "attaching to sock:inet_sock_set_state",
        )?;
        let timers = match timers {
            Some(_) => match timewait::attach(&mut ebpf, &btf) {
                Ok(fds) => {
                    primaries.extend(fds);
                    true
                }
                Err(e) => {
                    log::warn!(
                        "TIME_WAIT and request tracking unavailable ({e}); running without them"
                    );
                    false
                }
            },
            None => false,
        };

        let ring = ebpf.take_map(EVENTS_MAP).ok_or_else(|| SourceError::Bpf {
            what: "ring buffer",
            error: "map EVENTS missing".into(),
        })?;
        let ring = RingBuf::try_from(ring).map_err(bpf_err("ring buffer"))?;
        // SAFETY: the ring buffer owns its fd and keeps it open while the AsyncFd lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let mut counter = |name: &'static str| -> Result<PerCpuArray<MapData, u64>, SourceError> {
            let map = ebpf.take_map(name).ok_or_else(|| SourceError::Bpf {
                what: "loss counters",
                error: format!("map {name} missing").into(),
            })?;
            PerCpuArray::try_from(map).map_err(bpf_err("loss counters"))
        };
        let ring_lost = counter(LOST_MAP)?;
        let nested = counter(NESTED_MAP)?;

        Ok(KernelSource {
            events: EventRing(ring),
            logs: KernelLogs(logger),
            lost: KernelLoss {
                ring: ring_lost,
                nested,
                primaries,
            },
            timewait: timers && tw_layout.handler != 0,
            requests: timers && request_layout.handler != 0,
            _ebpf: ebpf,
        })
    }
}

/// The floor of tracing at all: a program that returns at once on each tracepoint tcplens
/// uses (`tracer-ebpf/src/floor.rs`), attached while this lives. `cargo xtask bench`
/// measures every mode against it.
pub struct Floor {
    _ebpf: Ebpf,
}

impl Floor {
    pub fn attach() -> Result<Floor, SourceError> {
        let mut ebpf = EbpfLoader::new()
            .load(PROGRAM)
            .map_err(bpf_err("loading the eBPF object"))?;
        let btf = Btf::from_sys_fs().map_err(bpf_err("reading the kernel BTF"))?;
        for (name, tracepoint) in [
            ("floor_set_state", "inet_sock_set_state"),
            ("floor_timer_start", "timer_start"),
            ("floor_timer_cancel", "timer_cancel"),
            ("floor_timer_expire", "timer_expire_entry"),
        ] {
            let p = program(&mut ebpf, name)?;
            p.load(tracepoint, &btf)
                .map_err(bpf_err("loading a floor program"))?;
            p.attach().map_err(bpf_err("attaching a floor program"))?;
        }
        Ok(Floor { _ebpf: ebpf })
    }
}

/// Loads the two programs of tracepoint `tp`; returns a handle on the primary for its
/// recursion misses. A refusal is the verifier's (its log at RUST_LOG=debug), unless the
/// kernel says EPERM: no privilege to load at all. (The verifier refuses some accesses with
/// EACCES, which is not a privilege problem.)
pub(super) fn load(ebpf: &mut Ebpf, btf: &Btf, tp: Tracepoint) -> Result<ProgramFd, SourceError> {
    for name in [tp.primary, tp.nested] {
        let program = program(ebpf, name)?;
        match program.load(tp.name, btf) {
            Ok(()) => {}
            Err(ProgramError::LoadError {
                io_error,
                verifier_log,
            }) => {
                log::debug!("verifier log of {name}:\n{verifier_log}");
                if io_error.raw_os_error() == Some(nix::libc::EPERM) {
                    return Err(SourceError::NotPrivileged);
                }
                return Err(SourceError::Verifier {
                    name: name.to_string(),
                    error: io_error,
                });
            }
            Err(ProgramError::Btf(_)) => return Err(SourceError::NoTracepoint(tp.name)),
            Err(e) => return Err(bpf_err("loading an eBPF program")(e)),
        }
    }
    program(ebpf, tp.primary)?
        .fd()
        .and_then(|fd| fd.try_clone().map_err(Into::into))
        .map_err(bpf_err("loading an eBPF program"))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut BtfTracePoint, SourceError> {
    ebpf.program_mut(name)
        .ok_or_else(|| SourceError::Bpf {
            what: "loading the eBPF object",
            error: format!("program {name} missing").into(),
        })?
        .try_into()
        .map_err(bpf_err("loading the eBPF object"))
}

/// Attaches the primary program of `tp`, then the nested one: the kernel calls them in that
/// order.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    tp: Tracepoint,
    what: &'static str,
) -> Result<(), SourceError> {
    for name in [tp.primary, tp.nested] {
        program(ebpf, name)?
            .attach()
            .map(drop)
            .map_err(|e| match bpf_err(what)(e) {
                SourceError::Bpf { error, .. } => SourceError::Bpf { what, error },
                other => other,
            })?;
    }
    Ok(())
}

impl EventRing {
    /// Waits until the ring buffer has records, then hands each to `f` until it is empty.
    /// Returns how many records were read.
    pub async fn next_batch(&mut self, mut f: impl FnMut(&[u8])) -> Result<usize, SourceError> {
        let mut guard = self.0.readable_mut().await?;
        let n = drain(guard.get_inner_mut(), &mut f);
        guard.clear_ready();
        Ok(n)
    }

    /// Reads whatever the ring buffer holds now, without waiting.
    pub fn drain_now(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        drain(self.0.get_mut(), &mut f)
    }
}

impl KernelLogs {
    /// Forwards kernel-side log records once the log ring has any; never resolves when
    /// kernel logging is unavailable.
    pub async fn forward_logs(&mut self) -> Result<(), SourceError> {
        match &mut self.0 {
            Some(logger) => {
                let mut guard = logger.readable_mut().await?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
                Ok(())
            }
            None => std::future::pending().await,
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, f: &mut impl FnMut(&[u8])) -> usize {
    let mut n = 0;
    while let Some(item) = ring.next() {
        f(&item);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_their_cause_once() {
        let e = anyhow::Error::from(SourceError::from(io::Error::from_raw_os_error(
            nix::libc::EINVAL,
        )));
        assert_eq!(
            format!("{e:#}"),
            "reading the ring buffer: Invalid argument (os error 22)"
        );
        let e = anyhow::Error::from(SourceError::Bpf {
            what: "port filter",
            error: "at most 64 ports per list".into(),
        });
        assert_eq!(format!("{e:#}"), "port filter: at most 64 ports per list");
    }

    #[test]
    fn loss_is_reported_by_reason_and_zero_only_when_both_are() {
        assert_eq!(Lost::default().to_string(), "0 lost");
        let l = Lost {
            ring_full: 0,
            recursion: 3,
        };
        assert_eq!(l.total(), 3);
        assert_eq!(l.to_string(), "3 lost (ring buffer full 0, recursion 3)");
        let l = Lost {
            ring_full: 10,
            recursion: 2,
        };
        assert_eq!(l.to_string(), "12 lost (ring buffer full 10, recursion 2)");
    }

    #[test]
    fn the_filter_in_userspace_is_the_kernels() {
        let f = KernelFilter {
            family: Some(Family::Ipv4),
            lports: vec![80],
            rports: vec![],
            netns: Some(4_026_531_840),
            cgroup: None,
        };
        assert!(f.keeps(Family::Ipv4, 80, 5555, 4_026_531_840));
        assert!(!f.keeps(Family::Ipv6, 80, 5555, 4_026_531_840));
        assert!(!f.keeps(Family::Ipv4, 81, 5555, 4_026_531_840));
        assert!(!f.keeps(Family::Ipv4, 80, 5555, 4_026_532_000));
        assert!(KernelFilter::default().keeps(Family::Ipv6, 1, 2, 3));
    }
}
