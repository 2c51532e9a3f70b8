//! The live source: loads the eBPF programs, attaches them to `sock:inet_sock_set_state`
//! (and, for TIME_WAIT, to `timer:timer_start`, `timer_cancel` and `timer_expire_entry`) and
//! reads raw event records from their ring buffer.

use std::io;

use aya::maps::{HashMap as BpfHashMap, MapData, MapType, PerCpuArray, RingBuf};
use aya::programs::{ProgramError, TracePoint};
use aya::{Ebpf, EbpfLoader};
use aya_log::EbpfLogger;
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tracer_common::{
    AF_INET, AF_INET6, CONFIG_GLOBAL, Config, EVENTS_MAP, LOST_MAP, LPORTS_MAP, MAX_FILTER_PORTS,
    RPORTS_MAP, TIMEWAIT_GLOBAL, TimewaitLayout,
};

use super::timewait::{self, TimewaitSetup};
use super::tracefs::{self, TracefsError};
use crate::model::Family;

/// The eBPF object built by `build.rs`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
const PROGRAM_NAME: &str = "inet_sock_set_state";
/// The timewait programs and the `timer:*` tracepoints they attach to.
const TIMEWAIT_PROGRAMS: [(&str, &str); 3] = [
    ("tw_timer_start", "timer_start"),
    ("tw_timer_cancel", "timer_cancel"),
    ("tw_timer_expire_entry", "timer_expire_entry"),
];

/// Default ring buffer size: at this machine's top churn (~150 k transitions/s of 96 bytes
/// each) it holds over half a second of events, so a stalled reader loses nothing.
pub const DEFAULT_RING_SIZE: u32 = 8 << 20;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error(
        "permission denied: tcplens needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN for tracefs) to load its eBPF program"
    )]
    NotPrivileged,
    #[error(
        "this kernel has no BPF ring buffer (BPF_MAP_TYPE_RINGBUF); tcplens needs Linux 5.8 or later"
    )]
    NoRingBuf,
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("the kernel rejected the eBPF program: {0} (RUST_LOG=debug shows the verifier log)")]
    Verifier(io::Error),
    #[error("{what}: {source}")]
    Bpf {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the ring buffer: {0}")]
    Io(#[from] io::Error),
}

/// What the kernel program keeps; everything else it drops before using ring space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelFilter {
    pub family: Option<Family>,
    /// Keep only these local ports (empty: all).
    pub lports: Vec<u16>,
    /// Keep only these remote ports (empty: all).
    pub rports: Vec<u16>,
}

#[derive(Clone, Debug)]
pub struct KernelOptions {
    pub filter: KernelFilter,
    /// Ring buffer bytes: a power of two, a multiple of the page size.
    pub ring_size: u32,
    /// Follow timewait sockets through the timer tracepoints (off: `--no-timewait`).
    pub timewait: bool,
}

/// How often the reader drains the ring when the kernel has not woken it: the most a
/// quiet event waits before it is printed.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Unread bytes at which the kernel wakes the reader early: an eighth of the ring (at most
/// 1 MiB), far below full, so a burst never outruns the reader's timer.
pub fn wakeup_bytes(ring_size: u32) -> u32 {
    (ring_size / 8).min(1 << 20)
}

/// The loaded, attached program and its maps. Dropping it detaches the program.
pub struct KernelSource {
    pub events: EventRing,
    pub logs: KernelLogs,
    pub lost: LostCounter,
    /// TIME_WAIT tracking, when on: the kernel's HZ (timer expiries are in jiffies).
    pub timewait_hz: Option<u32>,
    // Owns the program and its link.
    _ebpf: Ebpf,
}

/// The ring buffer of raw [`tracer_common::Event`] records.
pub struct EventRing(AsyncFd<RingBuf<MapData>>);

/// The aya-log ring of the kernel program, when it has one.
pub struct KernelLogs(Option<AsyncFd<EbpfLogger<&'static dyn log::Log>>>);

/// The per-CPU counter of events dropped on a full ring.
pub struct LostCounter(PerCpuArray<MapData, u64>);

fn bpf_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> SourceError {
    move |e| {
        if is_permission_error(&e) {
            SourceError::NotPrivileged
        } else {
            SourceError::Bpf {
                what,
                source: Box::new(e),
            }
        }
    }
}

/// EPERM/EACCES anywhere in an error's chain.
fn is_permission_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc_eperm) if libc_eperm == nix::libc::EPERM || libc_eperm == nix::libc::EACCES)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl KernelSource {
    /// Loads and attaches the program. Must be called inside a tokio runtime.
    pub fn open(opts: &KernelOptions) -> Result<Self, SourceError> {
        let root = tracefs::ensure_mounted().map_err(|e| match e {
            TracefsError::Mount(nix::Error::EPERM | nix::Error::EACCES) => {
                SourceError::NotPrivileged
            }
            other => other.into(),
        })?;
        let layout = tracefs::read_inet_sock_set_state(&root).map_err(|e| match e {
            TracefsError::NoTracepoint { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                SourceError::NotPrivileged
            }
            other => other.into(),
        })?;

        match aya::sys::is_map_supported(MapType::RingBuf) {
            Ok(false) => return Err(SourceError::NoRingBuf),
            Err(e) if is_permission_error(&e) => return Err(SourceError::NotPrivileged),
            _ => {}
        }

        let f = &opts.filter;
        let config = Config {
            layout,
            family: match f.family {
                None => 0,
                Some(Family::Ipv4) => AF_INET,
                Some(Family::Ipv6) => AF_INET6,
            },
            filter_lport: u8::from(!f.lports.is_empty()),
            filter_rport: u8::from(!f.rports.is_empty()),
            wakeup_bytes: wakeup_bytes(opts.ring_size),
        };
        let timewait = if opts.timewait {
            match timewait::discover(&root) {
                Ok(setup) => Some(setup),
                Err(why) => {
                    log::warn!("TIME_WAIT tracking unavailable ({why}); running without it");
                    None
                }
            }
        } else {
            None
        };
        let tw_layout = timewait.map_or(TimewaitLayout::EMPTY, |t| t.layout);
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &config, true)
            .override_global(TIMEWAIT_GLOBAL, &tw_layout, true)
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
            if ports.len() > MAX_FILTER_PORTS as usize {
                return Err(SourceError::Bpf {
                    what: "port filter",
                    source: format!("at most {MAX_FILTER_PORTS} ports per list").into(),
                });
            }
            let map = ebpf.map_mut(name).ok_or_else(|| SourceError::Bpf {
                what: "port filter",
                source: format!("map {name} missing from the eBPF object").into(),
            })?;
            let mut map: BpfHashMap<_, u16, u8> =
                BpfHashMap::try_from(map).map_err(bpf_err("port filter map"))?;
            for &port in ports {
                map.insert(port, 1, 0).map_err(bpf_err("port filter map"))?;
            }
        }

        load_tracepoint(&mut ebpf, PROGRAM_NAME)?
            .attach("sock", "inet_sock_set_state")
            .map_err(bpf_err("attaching to sock:inet_sock_set_state"))?;
        let timewait_hz = match timewait {
            Some(setup) => match attach_timewait(&mut ebpf, setup) {
                Ok(hz) => Some(hz),
                Err(e) => {
                    log::warn!("TIME_WAIT tracking unavailable ({e}); running without it");
                    None
                }
            },
            None => None,
        };

        let ring = ebpf.take_map(EVENTS_MAP).ok_or_else(|| SourceError::Bpf {
            what: "ring buffer",
            source: "map EVENTS missing".into(),
        })?;
        let ring = RingBuf::try_from(ring).map_err(bpf_err("ring buffer"))?;
        // SAFETY: the ring buffer owns its fd and keeps it open while the AsyncFd lives.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let lost = ebpf.take_map(LOST_MAP).ok_or_else(|| SourceError::Bpf {
            what: "drop counter",
            source: "map LOST missing".into(),
        })?;
        let lost = PerCpuArray::try_from(lost).map_err(bpf_err("drop counter"))?;

        Ok(KernelSource {
            events: EventRing(ring),
            logs: KernelLogs(logger),
            lost: LostCounter(lost),
            timewait_hz,
            _ebpf: ebpf,
        })
    }
}

/// Loads the tracepoint program `name` of the object. A refusal is the verifier's
/// (its log at RUST_LOG=debug), unless the kernel says EPERM: no privilege to load at all.
/// (The verifier refuses some accesses with EACCES, which is not a privilege problem.)
fn load_tracepoint<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut TracePoint, SourceError> {
    let program: &mut TracePoint = ebpf
        .program_mut(name)
        .ok_or_else(|| SourceError::Bpf {
            what: "loading the eBPF object",
            source: format!("program {name} missing").into(),
        })?
        .try_into()
        .map_err(bpf_err("loading the eBPF object"))?;
    match program.load() {
        Ok(()) => Ok(program),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            log::debug!("verifier log of {name}:\n{verifier_log}");
            if io_error.raw_os_error() == Some(nix::libc::EPERM) {
                return Err(SourceError::NotPrivileged);
            }
            Err(SourceError::Verifier(io_error))
        }
        Err(e) => Err(bpf_err("loading the eBPF program")(e)),
    }
}

/// Loads the three timer programs, then attaches them: a verifier refusal leaves none
/// attached. (Should an attach fail after another succeeded, the reader ignores the
/// timewait events: `timewait_hz` is then `None`.)
fn attach_timewait(ebpf: &mut Ebpf, setup: TimewaitSetup) -> Result<u32, SourceError> {
    for (name, _) in TIMEWAIT_PROGRAMS {
        load_tracepoint(ebpf, name)?;
    }
    for (name, tracepoint) in TIMEWAIT_PROGRAMS {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| SourceError::Bpf {
                what: "attaching to a timer tracepoint",
                source: format!("program {name} missing").into(),
            })?;
        program
            .attach("timer", tracepoint)
            .map_err(bpf_err("attaching to a timer tracepoint"))?;
    }
    Ok(setup.hz)
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

    /// Reads whatever the ring buffer holds now, without waiting (the final drain at exit).
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

impl LostCounter {
    /// Events the kernel dropped because the ring buffer was full, summed over CPUs.
    pub fn get(&self) -> Result<u64, SourceError> {
        let per_cpu = self
            .0
            .get(&0, 0)
            .map_err(bpf_err("reading the drop counter"))?;
        Ok(per_cpu.iter().sum())
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
