//! `cargo xtask bench`: the userspace pipeline's criterion benchmarks, then tcplens side by
//! side with libbpf-tools `tcpstates` under the loopback churn, alternating modes round by
//! round, medians reported; then scale runs (10 M transitions, 100 k live sockets).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::churn::{self, TRANSITIONS_PER_CONNECTION};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    ChurnAlone,
    /// The floor: programs that return at once on tcplens's tracepoints.
    Floor,
    /// The kernel programs and the ring, read and written out unprocessed.
    Record,
    Tcpstates,
    WatchText,
    WatchJson,
    Stats,
    Timeline,
    WatchNoTimewait,
}

impl Mode {
    pub(crate) const ALL: [Mode; 9] = [
        Mode::ChurnAlone,
        Mode::Floor,
        Mode::Record,
        Mode::Tcpstates,
        Mode::WatchText,
        Mode::WatchJson,
        Mode::Stats,
        Mode::Timeline,
        Mode::WatchNoTimewait,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::ChurnAlone => "(a) churn alone",
            Mode::Floor => "(h) floor: the tracepoints, programs that return at once",
            Mode::Record => "(i) tcplens record -o /dev/null: programs and ring only",
            Mode::Tcpstates => "(b) tcpstates > file",
            Mode::WatchText => "(c) tcplens watch > file",
            Mode::WatchJson => "(d) tcplens watch --format json > file",
            Mode::Stats => "(e) tcplens stats",
            Mode::Timeline => "(f) tcplens timeline > file",
            Mode::WatchNoTimewait => "(g) tcplens watch --no-timewait > file",
        }
    }

    /// A mode of tcplens itself (an earlier tcplens runs it too, with `--baseline`).
    fn runs_tcplens(self) -> bool {
        !matches!(self, Mode::ChurnAlone | Mode::Floor | Mode::Tcpstates)
    }

    fn command(self, tcplens: &Path) -> Option<Command> {
        let mut cmd = match self {
            Mode::ChurnAlone => return None,
            Mode::Tcpstates => return Some(Command::new("tcpstates")),
            _ => Command::new(tcplens),
        };
        cmd.args(match self {
            Mode::Floor => &["floor"][..],
            Mode::Record => &["record", "-o", "/dev/null"],
            Mode::WatchText => &["watch"],
            Mode::WatchJson => &["watch", "--format", "json"],
            Mode::Stats => &["stats"],
            Mode::Timeline => &["timeline"],
            Mode::WatchNoTimewait => &["watch", "--no-timewait"],
            Mode::ChurnAlone | Mode::Tcpstates => &[],
        });
        Some(cmd)
    }
}

/// What one BPF program cost over a run.
#[derive(Clone, Debug)]
pub(crate) struct ProgramCost {
    pub name: String,
    pub runs_per_connection: f64,
    pub ns_per_run: f64,
}

/// One run of one mode.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub conn_per_s: f64,
    pub transitions_expected: u64,
    pub seen: u64,
    pub seen_per_s: f64,
    pub lost: u64,
    pub user_ns_per_event: f64,
    pub kernel_ns_per_event: f64,
    /// Runs per second of the timewait programs (every kernel timer start, cancel and
    /// expiry on the host) and their cost per run.
    pub timer_runs_per_s: f64,
    pub timer_ns_per_run: f64,
    pub peak_rss_kib: u64,
    /// Each of the tracer's programs, by name.
    pub programs: Vec<ProgramCost>,
}

pub(crate) struct Opts {
    pub seconds: u64,
    pub rounds: usize,
    pub threads: usize,
    pub out_dir: PathBuf,
    /// An earlier tcplens whose modes run too, labelled "baseline".
    pub baseline: Option<PathBuf>,
}

/// The tracer under test, running.
struct Tracer {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    progs: Vec<u32>,
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in ns.
fn cpu_ns(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / clk_tck() * 1e9)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("{key} in /proc/{pid}/status"))
}

/// Names of tcplens's timewait programs and the floor's on the same tracepoints (as
/// bpftool shows them, from their BTF).
fn is_timer_prog(name: &str) -> bool {
    name.starts_with("tw_timer") || name.starts_with("floor_timer")
}

/// tcplens's nested programs run on every event, like their primary, but handle only the
/// events the primary was skipped for: their time counts, their runs do not.
fn is_nested_prog(name: &str) -> bool {
    name.ends_with("_nested")
}

/// Tracepoint programs (classic, and BTF `tracing` ones) loaded now:
/// (id, run_time_ns, run_cnt, name).
fn tracepoint_progs() -> Result<Vec<(u32, u64, u64, String)>> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok(v.as_array()
        .map(|progs| {
            progs
                .iter()
                .filter(|p| p["type"] == "tracepoint" || p["type"] == "tracing")
                .map(|p| {
                    (
                        p["id"].as_u64().unwrap_or(0) as u32,
                        p["run_time_ns"].as_u64().unwrap_or(0),
                        p["run_cnt"].as_u64().unwrap_or(0),
                        p["name"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

fn start(mode: Mode, tcplens: &Path, dir: &Path, tag: &str) -> Result<Option<Tracer>> {
    let Some(cmd) = mode.command(tcplens) else {
        return Ok(None);
    };
    let slug = format!("{mode:?}{tag}").to_lowercase();
    start_command(cmd, dir, &slug, mode.name()).map(Some)
}

/// Starts a tracer command, its output in `dir/slug.{out,err}`; returns once its programs
/// are attached.
fn start_command(mut cmd: Command, dir: &Path, slug: &str, name: &str) -> Result<Tracer> {
    let before: BTreeSet<u32> = tracepoint_progs()?.into_iter().map(|p| p.0).collect();
    let stdout = dir.join(format!("{slug}.out"));
    let stderr = dir.join(format!("{slug}.err"));
    let child = cmd
        .stdout(File::create(&stdout)?)
        .stderr(File::create(&stderr)?)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    // Ready when its program is attached: a new tracepoint program shows up and stays.
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_progs = || -> Result<Vec<u32>> {
        Ok(tracepoint_progs()?
            .into_iter()
            .map(|p| p.0)
            .filter(|id| !before.contains(id))
            .collect())
    };
    while new_progs()?.is_empty() {
        if Instant::now() > deadline {
            bail!("{name} did not attach within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // All of its programs attached, output set up.
    std::thread::sleep(Duration::from_millis(500));
    let progs = new_progs()?;
    Ok(Tracer {
        child,
        stdout,
        stderr,
        progs,
    })
}

/// `stats --by lport` under churn: every client's ephemeral port is a group, so the
/// groups reach the cap (256 and `other`). Peak RSS, groups reported, events lost.
pub(crate) fn by_groups(bins: &[(&str, &Path)], opts: &Opts) -> Result<String> {
    let mut out = String::from(
        "`tcplens stats --by lport` under 3 s of churn (every ephemeral port a group, up to the cap):\n\n| binary | groups | peak RSS MiB | lost |\n|---|---:|---:|---:|\n",
    );
    for (label, bin) in bins {
        let mut cmd = Command::new(bin);
        cmd.args(["stats", "--by", "lport", "--format", "json"]);
        let slug = format!("by-lport-{label}");
        let tracer = start_command(cmd, &opts.out_dir, &slug, "stats --by lport")?;
        let pid = tracer.child.id();
        churn::run(Duration::from_secs(3), opts.threads, 9000)?;
        let peak = status_kib(pid, "VmHWM:")?;
        let stdout = tracer.stdout.clone();
        let (_, stderr) = finish_tracer(tracer)?;
        let (_, lost) = tcplens_counts(&stderr)?;
        let groups = std::fs::read_to_string(&stdout)?.lines().count();
        out.push_str(&format!(
            "| {label} | {groups} | {:.0} | {lost} |\n",
            peak as f64 / 1024.0
        ));
    }
    Ok(out)
}

/// A replay that reports after every event (`--interval 1us`) of a recording of 1 s of
/// churn (its server sockets: tens of thousands in TIME_WAIT at the end): the cost of a
/// report must not grow with the sockets tracked.
pub(crate) fn replay_tiny_interval(bins: &[(&str, &Path)], opts: &Opts) -> Result<String> {
    let (_, tcplens) = bins.first().context("a binary")?;
    let file = opts.out_dir.join("churn.rec");
    let mut cmd = Command::new(tcplens);
    cmd.args(["record", "-L", "9000", "-o"]).arg(&file);
    let tracer = start_command(cmd, &opts.out_dir, "record", "record")?;
    let r = churn::run(Duration::from_secs(1), opts.threads, 9000)?;
    finish_tracer(tracer)?;
    let mut out = format!(
        "Replay of {} connections' server sockets with `stats --interval 1us` (a report per event):\n\n| binary | seconds | reports |\n|---|---:|---:|\n",
        r.connections
    );
    for (label, bin) in bins {
        let started = Instant::now();
        let run = Command::new(bin)
            .args(["stats", "--interval", "1us", "--format", "json", "--from"])
            .arg(&file)
            .stderr(std::process::Stdio::null())
            .output()
            .with_context(|| format!("replaying with {label}"))?;
        let reports = run.stdout.split(|&b| b == b'\n').count() - 1;
        out.push_str(&format!(
            "| {label} | {:.1} | {reports} |\n",
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(out)
}

/// Totals of one reading: (run time of all, runs of the transition program, run time of
/// the timer programs, runs of the timer programs), runs counted on the primaries.
fn run_stats(counters: &BTreeMap<String, (u64, u64)>) -> (u64, u64, u64, u64) {
    counters
        .iter()
        .fold((0, 0, 0, 0), |(t, c, tt, tc), (name, &(time, runs))| {
            let runs = if is_nested_prog(name) { 0 } else { runs };
            if is_timer_prog(name) {
                (t + time, c, tt + time, tc + runs)
            } else {
                (t + time, c + runs, tt, tc)
            }
        })
}

/// Run time (ns) and runs of each of `progs`, by name (summed, should two share one).
fn program_counters(progs: &[u32]) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (_, time, runs, name) in tracepoint_progs()?
        .into_iter()
        .filter(|p| progs.contains(&p.0))
    {
        let c = by_name.entry(name).or_default();
        *c = (c.0 + time, c.1 + runs);
    }
    Ok(by_name)
}

/// Each program's runs per connection and time per run between two readings.
fn program_costs(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
    connections: u64,
) -> Vec<ProgramCost> {
    after
        .iter()
        .filter_map(|(name, &(time, runs))| {
            let &(time0, runs0) = before.get(name)?;
            let runs = runs.checked_sub(runs0).filter(|&r| r > 0)?;
            Some(ProgramCost {
                name: name.clone(),
                runs_per_connection: runs as f64 / connections.max(1) as f64,
                ns_per_run: time.saturating_sub(time0) as f64 / runs as f64,
            })
        })
        .collect()
}

/// Runs one mode once (`tag` names the binary in file names: "" or "-baseline").
pub(crate) fn sample(mode: Mode, tcplens: &Path, opts: &Opts, tag: &str) -> Result<Sample> {
    let tracer = start(mode, tcplens, &opts.out_dir, tag)?;
    let (p0, pid, cpu0) = match &tracer {
        Some(t) => (
            program_counters(&t.progs)?,
            Some(t.child.id()),
            cpu_ns(t.child.id())?,
        ),
        None => (BTreeMap::new(), None, 0.0),
    };
    let r = churn::run(Duration::from_secs(opts.seconds), opts.threads, 9000)?;
    std::thread::sleep(Duration::from_millis(500)); // let the reader drain
    let mut s = Sample {
        conn_per_s: r.per_second(),
        transitions_expected: r.connections * TRANSITIONS_PER_CONNECTION,
        ..Sample::default()
    };
    let Some(mut t) = tracer else {
        return Ok(s);
    };
    let pid = pid.unwrap_or(0);
    let p1 = program_counters(&t.progs)?;
    let (k0, k1) = (run_stats(&p0), run_stats(&p1));
    s.programs = program_costs(&p0, &p1, r.connections);
    let cpu1 = cpu_ns(pid)?;
    s.peak_rss_kib = status_kib(pid, "VmHWM:")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    t.child.wait()?;
    let (seen, lost) = match mode {
        Mode::Tcpstates => tcpstates_counts(&t.stdout, &t.stderr)?,
        // It reports nothing: it does nothing.
        Mode::Floor => (0, 0),
        _ => tcplens_counts(&t.stderr)?,
    };
    s.seen = seen;
    s.lost = lost;
    s.seen_per_s = seen as f64 / r.elapsed.as_secs_f64();
    if seen > 0 {
        s.user_ns_per_event = (cpu1 - cpu0) / seen as f64;
    }
    // Per transition: the timer programs' cost is part of what each transition costs.
    if k1.1 > k0.1 {
        s.kernel_ns_per_event = (k1.0 - k0.0) as f64 / (k1.1 - k0.1) as f64;
    }
    if k1.3 > k0.3 {
        s.timer_ns_per_run = (k1.2 - k0.2) as f64 / (k1.3 - k0.3) as f64;
        s.timer_runs_per_s = (k1.3 - k0.3) as f64 / r.elapsed.as_secs_f64();
    }
    Ok(s)
}

/// `tcplens: N events read (W timewait, R request), M lost …` on stderr (an earlier
/// tcplens has no `, R request`): transitions (N - W - R) and lost (ring buffer drops and
/// recursion misses).
fn tcplens_counts(stderr: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(stderr)?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("tcplens: ")
            && let Some((read, rest)) = rest.split_once(" events read (")
            && let Some((timers, rest)) = rest.split_once("), ")
            && let Some((lost, _)) = rest.split_once(" lost")
        {
            let read: u64 = read.parse()?;
            // "56 timewait" or "56 timewait, 7 request": timer events, not transitions.
            let mut timer_events = 0u64;
            for part in timers.split(", ") {
                let n = part.split_whitespace().next().unwrap_or_default();
                timer_events += n.parse::<u64>()?;
            }
            return Ok((read - timer_events.min(read), lost.parse()?));
        }
    }
    bail!("no totals in {}: {text}", stderr.display())
}

/// tcpstates: one line per transition on stdout (after the header), and
/// `lost N events on CPU #C` lines for what its perf buffer dropped.
fn tcpstates_counts(stdout: &Path, stderr: &Path) -> Result<(u64, u64)> {
    let (mut seen, mut lost) = (0u64, 0u64);
    for path in [stdout, stderr] {
        for line in BufReader::new(File::open(path)?).lines() {
            let line = line?;
            if let Some(rest) = line.strip_prefix("lost ") {
                lost += rest
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            } else if line.contains(" -> ") && !line.starts_with("SKADDR") {
                seen += 1;
            }
        }
    }
    Ok((seen, lost))
}

/// A figure, or a dash where there is none (no timer programs in that mode).
fn dash_or(v: f64, decimals: usize) -> String {
    if v > 0.0 {
        format!("{v:.decimals$}")
    } else {
        "–".into()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Runs every mode `rounds` times, alternating (with the baseline binary's tcplens modes
/// after this one's, when there is one), and returns the table (markdown).
pub(crate) fn side_by_side(tcplens: &Path, opts: &Opts) -> Result<String> {
    // (mode, binary, label suffix, samples)
    let mut all: Vec<(Mode, PathBuf, &str, Vec<Sample>)> = Mode::ALL
        .iter()
        .map(|&m| (m, tcplens.to_path_buf(), "", Vec::new()))
        .collect();
    if let Some(base) = &opts.baseline {
        all.extend(
            Mode::ALL
                .iter()
                .filter(|m| m.runs_tcplens())
                .map(|&m| (m, base.clone(), " [baseline]", Vec::new())),
        );
    }
    for round in 1..=opts.rounds {
        for (mode, bin, label, samples) in &mut all {
            let tag = if label.is_empty() { "" } else { "-baseline" };
            let s = sample(*mode, bin, opts, tag)?;
            eprintln!(
                "bench: round {round} {}{label}: {:.0} conn/s, {} seen, {} lost",
                mode.name(),
                s.conn_per_s,
                s.seen,
                s.lost
            );
            samples.push(s);
        }
    }
    let rate_of = |mode: Mode| {
        all.iter()
            .find(|(m, ..)| *m == mode)
            .map(|(.., samples)| median(samples.iter().map(|s| s.conn_per_s).collect()))
    };
    let base = rate_of(Mode::ChurnAlone).unwrap_or(0.0);
    let floor = rate_of(Mode::Floor).unwrap_or(0.0);
    let mut t = String::new();
    t.push_str(&format!(
        "{} rounds of {} s each, {} connecting + {} accepting threads; medians (lost: median / max).\n\n",
        opts.rounds, opts.seconds, opts.threads, opts.threads
    ));
    t.push_str("| mode | connections/s | vs (a) | vs (h) | transitions/s seen | seen / expected | lost (median / max) | user ns/event | kernel ns/transition | timer runs/s | timer ns/run | peak RSS MiB |\n");
    t.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (mode, _, label, samples) in &all {
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        let conn = m(|s| s.conn_per_s);
        let max_lost = samples.iter().map(|s| s.lost).max().unwrap_or(0);
        if *mode == Mode::ChurnAlone {
            t.push_str(&format!(
                "| {} | {conn:.0} | 1.00 | {:.2} | – | – | – | – | – | – | – | – |\n",
                mode.name(),
                conn / floor
            ));
            continue;
        }
        if *mode == Mode::Floor {
            t.push_str(&format!(
                "| {} | {conn:.0} | {:.2} | 1.00 | – | – | – | – | {:.0} | {} | {} | {:.1} |\n",
                mode.name(),
                conn / base,
                m(|s| s.kernel_ns_per_event),
                dash_or(m(|s| s.timer_runs_per_s), 0),
                dash_or(m(|s| s.timer_ns_per_run), 0),
                m(|s| s.peak_rss_kib as f64) / 1024.0,
            ));
            continue;
        }
        t.push_str(&format!(
            "| {}{label} | {conn:.0} | {:.2} | {:.2} | {:.0} | {:.3} | {:.0} / {max_lost} | {:.0} | {:.0} | {} | {} | {:.1} |\n",
            mode.name(),
            conn / base,
            conn / floor,
            m(|s| s.seen_per_s),
            m(|s| if s.transitions_expected > 0 { s.seen as f64 / s.transitions_expected as f64 } else { 0.0 }),
            m(|s| s.lost as f64),
            m(|s| s.user_ns_per_event),
            m(|s| s.kernel_ns_per_event),
            dash_or(m(|s| s.timer_runs_per_s), 0),
            dash_or(m(|s| s.timer_ns_per_run), 0),
            m(|s| s.peak_rss_kib as f64) / 1024.0,
        ));
    }
    let shown = [Mode::Floor, Mode::Record, Mode::Stats];
    let columns: Vec<&Vec<Sample>> = shown
        .iter()
        .filter_map(|&mode| all.iter().find(|(m, ..)| *m == mode).map(|(.., s)| s))
        .collect();
    t.push_str(&programs_table(&shown, &columns));
    Ok(t)
}

/// BPF time per connection by program, for the modes `shown` (this binary's samples of
/// each): medians over the rounds.
fn programs_table(shown: &[Mode], columns: &[&Vec<Sample>]) -> String {
    let names: BTreeSet<&str> = columns
        .iter()
        .flat_map(|samples| samples.iter())
        .flat_map(|s| s.programs.iter().map(|p| p.name.as_str()))
        .collect();
    let mut t = String::from(
        "\nBPF programs per connection (runs per connection × ns per run; `_nested`: the \
         program that takes over events the kernel skipped its primary for), medians:\n\n| program |",
    );
    for mode in shown {
        t.push_str(&format!(" {} |", mode.name()));
    }
    t.push_str("\n|---|");
    t.push_str(&"---:|".repeat(shown.len()));
    t.push('\n');
    for name in names {
        t.push_str(&format!("| `{name}` |"));
        for samples in columns {
            let of = |f: fn(&ProgramCost) -> f64| {
                let v: Vec<f64> = samples
                    .iter()
                    .filter_map(|s| s.programs.iter().find(|p| p.name == name).map(f))
                    .collect();
                (!v.is_empty()).then(|| median(v))
            };
            match (of(|p| p.runs_per_connection), of(|p| p.ns_per_run)) {
                (Some(runs), Some(ns)) => t.push_str(&format!(" {runs:.1} × {ns:.0} |")),
                _ => t.push_str(" – |"),
            }
        }
        t.push('\n');
    }
    t.push_str("| all, µs per connection |");
    for samples in columns {
        let per_conn = samples
            .iter()
            .map(|s| {
                s.programs
                    .iter()
                    .map(|p| p.runs_per_connection * p.ns_per_run)
                    .sum::<f64>()
                    / 1000.0
            })
            .collect();
        t.push_str(&format!(" {:.1} |", median(per_conn)));
    }
    t.push('\n');
    t
}

/// Memory and per-event CPU of `tcplens stats` as events accumulate: sampled once past
/// 1 M transitions and again past `total`.
pub(crate) fn scale_events(tcplens: &Path, opts: &Opts, total: u64) -> Result<String> {
    let tracer =
        start(Mode::Stats, tcplens, &opts.out_dir, "")?.context("stats mode runs tcplens")?;
    let pid = tracer.child.id();
    let (mut expected, mut marks) = (0u64, Vec::new());
    let cpu0 = cpu_ns(pid)?;
    let started = Instant::now();
    while expected < total {
        let r = churn::run(Duration::from_secs(2), opts.threads, 9000)?;
        expected += r.connections * TRANSITIONS_PER_CONNECTION;
        if marks.is_empty() && expected >= 1_000_000 || expected >= total {
            std::thread::sleep(Duration::from_millis(300));
            marks.push((expected, cpu_ns(pid)? - cpu0, status_kib(pid, "VmRSS:")?));
        }
        if started.elapsed() > Duration::from_mins(10) {
            bail!("10 M transitions took over 10 minutes");
        }
    }
    let mut t = finish_tracer(tracer)?;
    let (seen, lost) = tcplens_counts(&t.1)?;
    t.0 = format!(
        "`tcplens stats` over {seen} transitions ({lost} lost):\n\n| after | RSS MiB | user ns/event so far |\n|---:|---:|---:|\n"
    );
    for (n, cpu, rss) in marks {
        t.0.push_str(&format!(
            "| {:.1} M transitions | {:.1} | {:.0} |\n",
            n as f64 / 1e6,
            rss as f64 / 1024.0,
            cpu / n as f64
        ));
    }
    Ok(t.0)
}

fn finish_tracer(mut t: Tracer) -> Result<(String, PathBuf)> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(t.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    t.child.wait()?;
    Ok((String::new(), t.stderr))
}

/// Memory of `tcplens timeline` with `connections` connections (twice as many sockets)
/// held open at once. The fd limit here is 20 000 per process (no CAP_SYS_RESOURCE), so
/// the sockets are held by several `xtask hold` processes, each in a namespace of its own.
pub(crate) fn scale_sockets(tcplens: &Path, opts: &Opts, connections: usize) -> Result<String> {
    use std::io::Read as _;
    const PER_HOLDER: usize = 9_000;
    let tracer =
        start(Mode::Timeline, tcplens, &opts.out_dir, "")?.context("timeline mode runs tcplens")?;
    let pid = tracer.child.id();
    let rss_before = status_kib(pid, "VmRSS:")?;
    let mut holders = Vec::new();
    let mut left = connections;
    while left > 0 {
        let n = left.min(PER_HOLDER);
        left -= n;
        let child = Command::new(std::env::current_exe()?)
            .args(["hold", &n.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a socket holder")?;
        holders.push(child);
    }
    let mut held = 0usize;
    for h in &mut holders {
        let mut line = String::new();
        h.stdout
            .as_mut()
            .context("holder stdout")?
            .read_to_string(&mut line)?;
        held += line
            .trim()
            .strip_prefix("held ")
            .and_then(|n| n.parse::<usize>().ok())
            .context("holder report")?;
    }
    std::thread::sleep(Duration::from_secs(1)); // the tracer catches up
    let rss_held = status_kib(pid, "VmRSS:")?;
    for mut h in holders {
        drop(h.stdin.take()); // EOF: the holder closes its sockets and exits
        h.wait()?;
    }
    let peak = status_kib(pid, "VmHWM:")?;
    let (_, stderr) = finish_tracer(tracer)?;
    let (seen, lost) = tcplens_counts(&stderr)?;
    Ok(format!(
        "`tcplens timeline` while {held} sockets were open at once ({seen} transitions, {lost} lost): \
         RSS {:.1} MiB before, {:.1} MiB with them all tracked, peak {:.1} MiB.\n",
        rss_before as f64 / 1024.0,
        rss_held as f64 / 1024.0,
        peak as f64 / 1024.0
    ))
}

/// `xtask hold N`: in a new network namespace, opens N loopback connections (2N sockets),
/// prints `held 2N`, closes stdout, and keeps them until stdin reaches EOF.
pub(crate) fn hold(connections: usize) -> Result<()> {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    churn::enter_new_netns()?;
    let listener = TcpListener::bind(("127.0.0.1", 9001))?;
    let acceptor = std::thread::spawn(move || {
        let mut accepted = Vec::with_capacity(connections);
        while accepted.len() < connections {
            match listener.accept() {
                Ok((s, _)) => accepted.push(s),
                Err(_) => break,
            }
        }
        accepted
    });
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(TcpStream::connect(("127.0.0.1", 9001)).context("connecting")?);
    }
    let accepted = acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("acceptor panicked"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "held {}", clients.len() + accepted.len())?;
        out.flush()?;
    }
    // SAFETY: closing our stdout so the parent's read_to_string returns.
    unsafe { nix::libc::close(1) };
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    Ok(())
}

/// Start-up: launched while a client connects every millisecond, how long until tcplens
/// reports a connection's handshake (SYN_SENT -> ESTABLISHED), and until it prints that
/// it is tracing. Medians over `runs`.
pub(crate) fn startup(tcplens: &Path, runs: usize) -> Result<(Duration, Duration)> {
    use std::io::BufRead as _;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    const PORT: u16 = 9002;
    let (mut first_seen, mut ready) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let stop = Arc::new(AtomicBool::new(false));
        // (when connect() began, the client's port)
        let made: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
        let (stop2, made2) = (stop.clone(), made.clone());
        let client = std::thread::spawn(move || -> Result<()> {
            churn::enter_new_netns()?;
            let listener = TcpListener::bind(("127.0.0.1", PORT))?;
            std::thread::spawn(move || {
                let mut held = Vec::new();
                while let Ok((s, _)) = listener.accept() {
                    held.push(s);
                }
            });
            while !stop2.load(Ordering::Relaxed) {
                let t = Instant::now();
                let c = TcpStream::connect(("127.0.0.1", PORT))?;
                made2
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push((t, c.local_addr()?.port()));
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        while made.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.len() < 50 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let launched = Instant::now();
        let mut child = Command::new(tcplens)
            .args([
                "watch",
                "--format",
                "json",
                "-D",
                &PORT.to_string(),
                "--duration",
                "10s",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting tcplens")?;
        let err = BufReader::new(child.stderr.take().context("stderr")?);
        let ready_at = std::thread::spawn(move || {
            err.lines()
                .map_while(Result::ok)
                .find(|l| l.starts_with("tcplens: tracing"))
                .map(|_| Instant::now())
        });
        let out = BufReader::new(child.stdout.take().context("stdout")?);
        let mut seen_port = None;
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            if v["old"] == "SYN_SENT" && v["new"] == "ESTABLISHED" {
                seen_port = v["sport"].as_u64().and_then(|p| u16::try_from(p).ok());
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        stop.store(true, Ordering::Relaxed);
        client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))??;
        let port = seen_port.context("tcplens saw no connection")?;
        let made = made.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let (began, _) = made
            .iter()
            .find(|(_, p)| *p == port)
            .context("the first connection seen is not one of the client's")?;
        first_seen.push(began.saturating_duration_since(launched).as_secs_f64());
        if let Ok(Some(at)) = ready_at.join() {
            ready.push(at.saturating_duration_since(launched).as_secs_f64());
        }
    }
    Ok((
        Duration::from_secs_f64(median(first_seen)),
        Duration::from_secs_f64(median(ready)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_of_this_and_earlier_tcplens() {
        let dir = std::env::temp_dir().join(format!("tcplens-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (line, want) in [
            (
                "tcplens: 1367 events read (195 timewait, 196 request), 0 lost",
                (976, 0),
            ),
            (
                "tcplens: 37 events read (5 timewait), 2 lost (ring buffer full 2, recursion 0)",
                (32, 2),
            ),
        ] {
            let f = dir.join("err");
            std::fs::write(
                &f,
                format!("tcplens: tracing TCP state transitions\n{line}\n"),
            )
            .unwrap();
            assert_eq!(tcplens_counts(&f).unwrap(), want, "{line}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn program_costs_are_per_connection_and_per_run_between_two_readings() {
        let before: BTreeMap<String, (u64, u64)> = [
            ("inet_sock_set_state".to_string(), (1_000, 10)),
            ("tw_timer_start".to_string(), (500, 5)),
            ("tw_timer_expire_entry".to_string(), (70, 1)),
        ]
        .into();
        let after: BTreeMap<String, (u64, u64)> = [
            // 1 000 runs in 400 000 ns over 100 connections.
            ("inet_sock_set_state".to_string(), (401_000, 1_010)),
            ("tw_timer_start".to_string(), (150_500, 755)),
            // Did not run: left out, not 0/0.
            ("tw_timer_expire_entry".to_string(), (70, 1)),
            // Attached after the first reading: left out.
            ("floor_set_state".to_string(), (9_000, 100)),
        ]
        .into();
        // Totals: every program's time; runs of the transition programs, of the timer ones.
        assert_eq!(
            run_stats(&after),
            (
                401_000 + 150_500 + 70 + 9_000,
                1_010 + 100,
                150_500 + 70,
                755 + 1
            )
        );
        let costs = program_costs(&before, &after, 100);
        let got: Vec<(&str, f64, f64)> = costs
            .iter()
            .map(|p| (p.name.as_str(), p.runs_per_connection, p.ns_per_run))
            .collect();
        assert_eq!(
            got,
            [
                ("inet_sock_set_state", 10.0, 400.0),
                ("tw_timer_start", 7.5, 200.0)
            ]
        );
        let table = programs_table(
            &[Mode::Stats],
            &[&vec![Sample {
                programs: costs,
                ..Sample::default()
            }]],
        );
        assert!(
            table.contains("| `inet_sock_set_state` | 10.0 × 400 |"),
            "{table}"
        );
        assert!(
            table.contains("| `tw_timer_start` | 7.5 × 200 |"),
            "{table}"
        );
        // 10 × 400 + 7.5 × 200 ns = 5.5 µs.
        assert!(
            table.contains("| all, µs per connection | 5.5 |"),
            "{table}"
        );
    }
}
