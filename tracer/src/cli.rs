//! The command line (clap derive): `tcplens <command> [options]`.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

use crate::model::{Family, TcpState};
use crate::sink::Format;
use crate::sink::stats::By;
use crate::source::cgroup::CgroupFilter;
use crate::source::kernel::{DEFAULT_RING_SIZE, KernelFilter};
use crate::tracker::DEFAULT_MAX_SOCKETS;

#[derive(Debug, Parser)]
#[command(
    name = "tcplens",
    version,
    about = "eBPF TCP state transition tracer: live transitions, per-socket timelines, time-in-state histograms",
    long_about = None,
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// One line per TCP state transition, live (the tcpstates view).
    Watch(WatchArgs),
    /// One record per socket when its life ends: every state, when and how long, owner,
    /// how it ended (still-open sockets are printed at exit).
    Timeline(TimelineArgs),
    /// HDR histograms of time in each state, handshakes and lifetimes, every --interval
    /// and at exit.
    Stats(StatsArgs),
    /// The raw event stream to a file, for `--from FILE` later (no root needed there).
    Record(RecordArgs),
    /// Sockets sitting in CLOSE_WAIT (or --state) for at least --threshold, with the
    /// process, fd and command line holding each, refreshed every --interval.
    Leaks(LeaksArgs),
    /// The listen path per listener, every --interval: the SYN queue (requests waiting,
    /// completed, expired, aborted, SYN-ACKs retransmitted), the accept queue and backlog,
    /// drops, and each namespace's listen counters.
    Listen(ListenArgs),
    /// A live dashboard on the terminal: sockets per state with their recent history,
    /// a table per process, container or listener (sortable, filterable), time-in-state
    /// percentiles of the selected row, and the oldest CLOSE_WAIT sockets with pid and fd.
    Top(TopArgs),
    /// For `cargo xtask bench`: programs that return at once on tcplens's tracepoints,
    /// until SIGINT, SIGTERM or --duration (the floor of tracing at all).
    #[command(hide = true)]
    Floor(FloorArgs),
    /// A Prometheus/OpenMetrics endpoint: transitions, sockets per state, time-in-state
    /// histograms, CLOSE_WAIT holders, lost events.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Address to serve /metrics on (loopback by default: the endpoint has no
    /// authentication).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub listen: std::net::SocketAddr,
    #[command(flatten)]
    pub cap: CapArg,
}

#[derive(Debug, Args)]
pub struct FloorArgs {
    /// Stop by itself after this long.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Refresh the screen (rates, sparklines, the leaks pane) this often; keys redraw at
    /// once.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    /// With --from: start paused; `n` replays the next interval as fast as it reads, space
    /// goes on at the recorded speed.
    #[arg(long, requires = "from")]
    pub step: bool,
}

/// `--serve ADDR` of the commands that can export metrics alongside their own output.
#[derive(Debug, Args)]
pub struct MetricsArg {
    /// Also serve Prometheus/OpenMetrics metrics on this address (as `tcplens serve`).
    #[arg(long, value_name = "ADDR")]
    pub serve: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub metrics: MetricsArg,
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub output: FormatArg,
    /// Report sockets in the state for at least this long.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub threshold: Duration,
    /// Refresh the report this often (and once more at exit).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub interval: Duration,
    /// The state to watch (any TCP state: FIN_WAIT2, LAST_ACK, ESTABLISHED…).
    #[arg(long, value_parser = parse_state, default_value = "CLOSE_WAIT")]
    pub state: TcpState,
    #[command(flatten)]
    pub owner: PidArg,
    /// Exit with code 2 at the end (--duration, SIGINT, SIGTERM) if any report listed a
    /// socket: for health checks and CI pipelines.
    #[arg(long)]
    pub fail_on_leak: bool,
    #[command(flatten)]
    pub cap: CapArg,
}

#[derive(Debug, Args)]
pub struct ListenArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    #[command(flatten)]
    pub output: FormatArg,
    /// Report this often (and once more at exit).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub interval: Duration,
    #[command(flatten)]
    pub cap: CapArg,
}

fn parse_state(s: &str) -> Result<TcpState, String> {
    TcpState::parse(s)
        .ok_or_else(|| format!("`{s}` is not a TCP state (CLOSE_WAIT, FIN_WAIT2, LAST_ACK, …)"))
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub metrics: MetricsArg,
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub output: FormatArg,
}

#[derive(Debug, Args)]
pub struct TimelineArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub output: FormatArg,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// As `watch`'s.
    #[command(flatten)]
    pub base: WatchArgs,
    /// Print (and reset) the histograms this often, as well as at exit.
    #[arg(long, value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Split the histograms by local port, remote port or owner process.
    #[arg(long, value_enum)]
    pub by: Option<By>,
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// The file to write.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

/// Options of the commands that read events, live or from a file.
#[derive(Debug, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub trace: TraceArgs,
    /// Replay a file written by `tcplens record` instead of tracing (no root needed).
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    #[command(flatten)]
    pub owner: PidArg,
    #[command(flatten)]
    pub cap: CapArg,
}

/// `--format`, of the commands that print.
#[derive(Debug, Args)]
pub struct FormatArg {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `-p PID`.
#[derive(Debug, Args)]
pub struct PidArg {
    /// Only sockets of this process: for `leaks`, the ones it holds a descriptor of;
    /// otherwise the ones it owns, learned from connect(), listen() and its close() or
    /// shutdown() (an accepted socket is its listener's owner's until its own process
    /// closes it).
    #[arg(short = 'p', long = "pid")]
    pub pid: Option<u32>,
}

/// `--max-sockets`.
#[derive(Debug, Args)]
pub struct CapArg {
    /// Most sockets tracked at once; past it the least recently active is evicted (and
    /// counted).
    #[arg(long, default_value_t = DEFAULT_MAX_SOCKETS, value_parser = parse_count)]
    pub max_sockets: usize,
}

/// Options of every command that traces the kernel.
#[derive(Debug, Args)]
#[allow(clippy::struct_excessive_bools, reason = "command-line switches")]
pub struct TraceArgs {
    /// Trace IPv4 sockets only.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Trace IPv6 sockets only.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Keep only these local ports (comma list, applied in the kernel).
    #[arg(short = 'L', long = "lport", value_delimiter = ',', value_parser = parse_port, value_name = "PORTS")]
    pub lport: Vec<u16>,
    /// Keep only these remote ports (comma list, applied in the kernel).
    #[arg(short = 'D', long = "rport", value_delimiter = ',', value_parser = parse_port, value_name = "PORTS")]
    pub rport: Vec<u16>,
    /// Stop by itself after this long (500ms, 30s, 5m) and print the final output.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Size of the kernel ring buffer: a power of two, at least 4K (8M, 16M, 1G…).
    #[arg(long, value_parser = parse_ring_size, default_value = "8M")]
    pub ring_size: u32,
    /// Keep only sockets of this network namespace: its inode number (as `readlink
    /// /proc/PID/ns/net` shows it), or a path to it (/run/netns/NAME, /proc/PID/ns/net).
    /// Applied in the kernel.
    #[arg(long, value_name = "INODE|PATH", value_parser = parse_netns)]
    pub netns: Option<u32>,
    /// Keep only sockets of this cgroup (v2) and the cgroups below it: a container's
    /// (/sys/fs/cgroup/system.slice/docker-ID.scope), a pod's, a service's. The path is
    /// absolute or relative to the cgroup2 mount. A socket's cgroup is its creator's (an
    /// accepted socket's, its listener's). Applied in the kernel.
    #[arg(long, value_name = "PATH", value_parser = CgroupFilter::resolve)]
    pub cgroup: Option<CgroupFilter>,
    /// Do not follow sockets into TIME_WAIT (skips the timer tracepoints, which fire for
    /// every kernel timer): the FIN_WAIT2/CLOSING -> CLOSE of the kernel is shown instead.
    #[arg(long)]
    pub no_timewait: bool,
    /// Do not follow request sockets (SYNs queued at listeners, on the same timer
    /// tracepoints): passive connections then start at SYN_RECV, with no SYN queue.
    #[arg(long)]
    pub no_requests: bool,
}

impl TraceArgs {
    pub fn filter(&self) -> KernelFilter {
        KernelFilter {
            family: match (self.ipv4, self.ipv6) {
                (true, _) => Some(Family::Ipv4),
                (_, true) => Some(Family::Ipv6),
                _ => None,
            },
            lports: self.lport.clone(),
            rports: self.rport.clone(),
            netns: self.netns,
            cgroup: self.cgroup.clone(),
        }
    }
}

/// A network namespace: its inode number, or a path to it (checked to be one).
fn parse_netns(s: &str) -> Result<u32, String> {
    use std::os::unix::fs::MetadataExt as _;
    // NS_GET_NSTYPE (linux/nsfs.h): what kind of namespace a file refers to.
    const NS_GET_NSTYPE: nix::libc::c_ulong = 0xb7 << 8 | 0x3;
    if let Ok(n) = s.trim().parse::<u32>() {
        return if n == 0 {
            Err("`0` is not a namespace inode".into())
        } else {
            Ok(n)
        };
    }
    let file = std::fs::File::open(s).map_err(|e| format!("`{s}`: {e}"))?;
    // SAFETY: an argument-less ioctl on an open file.
    let kind = unsafe { nix::libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), NS_GET_NSTYPE) };
    if kind != nix::libc::CLONE_NEWNET {
        return Err(format!("`{s}` is not a network namespace"));
    }
    let ino = file.metadata().map_err(|e| format!("`{s}`: {e}"))?.ino();
    u32::try_from(ino).map_err(|_| format!("`{s}`: inode {ino} is out of range"))
}

/// Most sockets `--max-sockets` may ask for (about 30 GB of tracked lives).
const MAX_SOCKETS: usize = 100_000_000;

fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a positive number")),
        Ok(n) if n > MAX_SOCKETS => Err(format!("`{s}`: at most {MAX_SOCKETS}")),
        Ok(n) => Ok(n),
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{s}` is not a port (1-65535)")),
        Ok(p) => Ok(p),
    }
}

/// The longest duration any option takes (a timer further out than that is a typo).
const MAX_DURATION: Duration = Duration::from_hours(366 * 24);

/// `500ms`, `30s`, `5m`, `1h30m`: humantime's syntax, more than zero, at most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration like 500ms, 30s or 5m ({e})"))?;
    if d.is_zero() {
        return Err("the duration must be more than zero".into());
    }
    if d > MAX_DURATION {
        return Err(format!("`{s}`: at most a year (366d)"));
    }
    Ok(d)
}

/// Bytes with an optional binary suffix: `4096`, `256K`, `8M`, `1G` (`KiB`/`MiB`/`GiB` too).
pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("`{s}`: unknown unit (use K, M or G)")),
    };
    let bytes = num
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_shl(shift).filter(|b| b >> shift == n))
        .ok_or_else(|| format!("`{s}` is not a size like 8M"))?;
    if !bytes.is_power_of_two() || !(4096..=1 << 30).contains(&bytes) {
        return Err(format!(
            "`{s}`: the ring size must be a power of two from 4K to 1G"
        ));
    }
    Ok(bytes as u32)
}

const _: () = assert!(
    DEFAULT_RING_SIZE == 8 << 20,
    "keep the --ring-size default in sync"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tcplens").chain(args.iter().copied()))
    }

    #[test]
    fn watch_options() {
        let cli = parse(&[
            "watch",
            "-4",
            "-L",
            "80,443",
            "-D",
            "5432",
            "--duration",
            "1500ms",
            "--format",
            "json",
        ])
        .unwrap();
        let Command::Watch(w) = cli.command else {
            panic!("not watch")
        };
        assert_eq!(w.output.format, Format::Json);
        let w = w.common;
        assert_eq!(w.trace.duration, Some(Duration::from_millis(1500)));
        assert_eq!(
            w.trace.filter(),
            KernelFilter {
                family: Some(Family::Ipv4),
                lports: vec![80, 443],
                rports: vec![5432],
                netns: None,
                cgroup: None,
            }
        );
        assert_eq!(w.trace.ring_size, 8 << 20);
    }

    #[test]
    fn shared_options_are_one_definition() {
        let shared = ["-p", "7", "--max-sockets", "5", "--format", "json"];
        for command in ["watch", "timeline", "stats", "leaks"] {
            let cli = parse(&[&[command][..], &shared].concat()).unwrap();
            let (output, owner, cap) = match &cli.command {
                Command::Watch(a) => (&a.output, &a.common.owner, &a.common.cap),
                Command::Timeline(a) => (&a.output, &a.common.owner, &a.common.cap),
                Command::Stats(a) => (&a.base.output, &a.base.common.owner, &a.base.common.cap),
                Command::Leaks(a) => (&a.output, &a.owner, &a.cap),
                _ => unreachable!(),
            };
            assert_eq!(output.format, Format::Json, "{command}");
            assert_eq!(owner.pid, Some(7), "{command}");
            assert_eq!(cap.max_sockets, 5, "{command}");
        }
        let Command::Serve(s) = parse(&["serve", "--max-sockets", "5"]).unwrap().command else {
            panic!("not serve")
        };
        assert_eq!(s.cap.max_sockets, 5);
        // record and serve take neither -p nor --format.
        for bad in [
            &["record", "-o", "x", "-p", "7"][..],
            &["serve", "--format", "json"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        for bad in [
            &["watch", "-L", "0"][..],
            &["watch", "-L", "70000"],
            &["watch", "-D", "http"],
            &["watch", "--duration", "soon"],
            &["watch", "--duration", "0s"],
            &["watch", "--ring-size", "3M"],
            &["watch", "--ring-size", "1K"],
            &["watch", "--ring-size", "8X"],
            &["watch", "-4", "-6"],
            &["watch", "--format", "xml"],
            &["frobnicate"],
            &["stats", "--interval", "0s"],
            &["stats", "--by", "color"],
            &["timeline", "--max-sockets", "0"],
            &["record"],
            &["leaks", "--state", "OPEN"],
            &["leaks", "--threshold", "x"],
            &["watch", "--netns", "0"],
            &["watch", "--duration", "99999999999y"],
            &["watch", "--duration", "367d"],
            &["stats", "--interval", "18446744073709551616ns"],
            &["stats", "--interval", "0.5ns"],
            &["timeline", "--max-sockets", "18446744073709551615"],
            &["leaks", "--threshold", "999999999d"],
            &["watch", "--netns", "/no/such/namespace"],
            &["watch", "--netns", "/proc/self/ns/mnt"],
            &["watch", "--netns", "/etc/hostname"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn namespaces_by_inode_or_path() {
        use std::os::unix::fs::MetadataExt as _;
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        assert_eq!(parse_netns("/proc/self/ns/net"), Ok(own));
        assert_eq!(parse_netns("4026531840"), Ok(4_026_531_840));
        let e = parse_netns("/proc/self/ns/mnt").unwrap_err();
        assert_eq!(e, "`/proc/self/ns/mnt` is not a network namespace");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert_eq!(parse_ring_size("256K"), Ok(256 << 10));
        assert_eq!(parse_ring_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_ring_size("1G"), Ok(1 << 30));
        assert!(parse_ring_size("2G").is_err());
        assert!(parse_ring_size("99999999999999999999K").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
    }
}
