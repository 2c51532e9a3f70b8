//! `cargo xtask …`: the project's own set-up and checks, so that a fresh machine needs
//! nothing by hand.
//!
//! - `cargo xtask run -- <tcplens args>`: prerequisites, release build, run tcplens.
//! - `cargo xtask test`: prerequisites, fmt and clippy (userspace and eBPF), every test.
//! - `cargo xtask test-kernels`: the real-kernel scenario tests on Debian's 6.1 and 6.12
//!   kernels, each booted in QEMU (see `vm.rs`).
//! - `cargo xtask prereqs`: only the prerequisites.
//!
//! Prerequisites (see shared/notes/toolchain.md): the nightly toolchain with rust-src
//! (build-std for the BPF target), Debian's llvm-22-dev, and bpf-linker 0.13.0 built
//! against it. Each is checked first and installed only when missing.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod bench;
mod churn;
mod vm;

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";

#[derive(Parser)]
#[command(name = "xtask", about = "tcplens set-up, build, run and test")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing to build the eBPF program.
    Prereqs,
    /// Build tcplens (release).
    Build,
    /// Build and run tcplens with the given arguments: `cargo xtask run -- watch`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks (root): criterion benchmarks of the pipeline, then tcplens side by side
    /// with libbpf-tools tcpstates under loopback churn, then scale runs.
    Bench {
        /// Seconds of churn per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Rounds over all modes (medians are reported); 0 skips the side-by-side runs.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Connecting threads (and as many accepting ones).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Skip the criterion benchmarks.
        #[arg(long)]
        no_criterion: bool,
        /// Skip the scale runs (10 M transitions, 100 k live sockets).
        #[arg(long)]
        no_scale: bool,
        /// Another tcplens binary (e.g. built from an earlier commit) to run every tcplens
        /// mode with too, in the same rounds: before and after side by side.
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
    },
    /// Loopback connection churn in a network namespace of its own (root): connections/s.
    Churn {
        /// How long to churn.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Connecting threads (and as many accepting ones).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// Holds N loopback connections open until stdin closes (used by `bench`).
    #[command(hide = true)]
    Hold { connections: usize },
    /// The real-kernel scenario tests on Debian's 6.1 and 6.12 kernels, in QEMU.
    TestKernels {
        /// Only these kernels (labels: 6.1, 6.12).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Only the tests whose names contain this.
        #[arg(long)]
        filter: Option<String>,
        /// Run the selected tests this many times in each VM (to chase a flaky test).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
    },
    /// Every check and test: fmt, clippy (userspace and eBPF), unit and real-kernel tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root).context("entering the workspace")?;
    match cli.cmd {
        Cmd::Prereqs => prereqs(),
        Cmd::Build => {
            prereqs()?;
            cargo(&["build", "--release", "--bin", "tcplens"])
        }
        Cmd::Run { args } => {
            prereqs()?;
            cargo(&["build", "--release", "--bin", "tcplens"])?;
            let status = Command::new(root.join("target/release/tcplens"))
                .args(&args)
                .status()
                .context("running tcplens")?;
            if !status.success() {
                bail!("tcplens exited with {status}");
            }
            Ok(())
        }
        Cmd::Test { args } => test(&args),
        Cmd::TestKernels {
            only,
            filter,
            repeat,
        } => test_kernels(&root, &only, &vm::Selection { filter, repeat }),
        Cmd::Churn {
            seconds,
            threads,
            port,
        } => {
            let r = churn::run(Duration::from_secs(seconds), threads, port)?;
            println!(
                "churn: {} connections in {:.2}s = {:.0} connections/s ({:.0} transitions/s)",
                r.connections,
                r.elapsed.as_secs_f64(),
                r.per_second(),
                r.per_second() * churn::TRANSITIONS_PER_CONNECTION as f64
            );
            Ok(())
        }
        Cmd::Hold { connections } => bench::hold(connections),
        Cmd::Bench {
            seconds,
            rounds,
            threads,
            no_criterion,
            no_scale,
            baseline,
        } => {
            prereqs()?;
            if !no_criterion {
                step("criterion benchmarks of the userspace pipeline");
                cargo(&["bench", "-p", "tracer", "--bench", "pipeline"])?;
            }
            if !nix_is_root() {
                bail!(
                    "the system benchmarks load eBPF programs and create network namespaces: run as root"
                );
            }
            cargo(&["build", "--release", "--bin", "tcplens"])?;
            apt_tools(&[("tcpstates", "libbpf-tools"), ("bpftool", "bpftool")])?;
            let out_dir = root.join("target/bench");
            std::fs::create_dir_all(&out_dir)?;
            let opts = bench::Opts {
                seconds,
                rounds,
                threads,
                out_dir: out_dir.clone(),
                baseline,
            };
            let tcplens = root.join("target/release/tcplens");
            let stats_key = "/proc/sys/kernel/bpf_stats_enabled";
            let old = std::fs::read_to_string(stats_key).unwrap_or_else(|_| "0".into());
            std::fs::write(stats_key, "1").context("enabling kernel.bpf_stats_enabled")?;
            let result = (|| -> Result<String> {
                let mut report = String::new();
                if rounds > 0 {
                    step("side by side under churn");
                    report = bench::side_by_side(&tcplens, &opts)?;
                }
                step("start-up (a connection every millisecond from launch)");
                report.push_str("\nStart-up, medians of 5 launches (a client connects every 1 ms from launch): first connection seen / \"tracing\" printed\n\n");
                for (label, bin) in std::iter::once(("tcplens", &tcplens))
                    .chain(opts.baseline.iter().map(|b| ("baseline", b)))
                {
                    let (first, ready) = bench::startup(bin, 5)?;
                    report.push_str(&format!(
                        "- {label}: {:.0} ms / {:.0} ms\n",
                        first.as_secs_f64() * 1e3,
                        ready.as_secs_f64() * 1e3
                    ));
                }
                if !no_scale {
                    step("scale: 10 M transitions");
                    report.push('\n');
                    report.push_str(&bench::scale_events(&tcplens, &opts, 10_000_000)?);
                    step("scale: 100 k live sockets");
                    report.push('\n');
                    report.push_str(&bench::scale_sockets(&tcplens, &opts, 50_000)?);
                    let bins: Vec<(&str, &std::path::Path)> =
                        std::iter::once(("tcplens", tcplens.as_path()))
                            .chain(opts.baseline.iter().map(|b| ("baseline", b.as_path())))
                            .collect();
                    step("stats --by lport: memory at the group cap");
                    report.push('\n');
                    report.push_str(&bench::by_groups(&bins, &opts)?);
                    step("replay with a report per event");
                    report.push('\n');
                    report.push_str(&bench::replay_tiny_interval(&bins, &opts)?);
                }
                Ok(report)
            })();
            std::fs::write(stats_key, old.trim()).ok();
            let report = result?;
            std::fs::write(out_dir.join("results.md"), &report)?;
            println!("{report}");
            step(&format!(
                "written to {}",
                out_dir.join("results.md").display()
            ));
            Ok(())
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn step(what: &str) {
    eprintln!("xtask: {what}");
}

pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(args: &[&str]) -> Result<()> {
    sh(Command::new(env!("CARGO")).args(args))
}

fn cargo_home_bin() -> PathBuf {
    dir_from_env("CARGO_HOME", ".cargo", "/root/.cargo").join("bin")
}

/// The directory `var` names, else `under_home` in $HOME, else `fallback`.
pub(crate) fn dir_from_env(var: &str, under_home: &str, fallback: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(under_home)))
        .unwrap_or_else(|| PathBuf::from(fallback))
}

fn prereqs() -> Result<()> {
    let started = Instant::now();
    // The nightly toolchain builds the BPF target with -Z build-std=core.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF program")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly toolchain");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let nightly = output(Command::new("rustc").args(["+nightly", "-vV"])).unwrap_or_default();
    let llvm = nightly
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if !llvm.starts_with(&format!("{LLVM_MAJOR}.")) {
        bail!(
            "the nightly toolchain uses LLVM {llvm}; bpf-linker {BPF_LINKER_VERSION} here is built against LLVM {LLVM_MAJOR}"
        );
    }

    let llvm_prefix = PathBuf::from(format!("/usr/lib/llvm-{LLVM_MAJOR}"));
    if !llvm_prefix.join("bin/llvm-config").exists() {
        step(&format!("installing llvm-{LLVM_MAJOR}-dev (apt)"));
        sh(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-qq", &format!("llvm-{LLVM_MAJOR}-dev")])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    let linker = cargo_home_bin().join("bpf-linker");
    let have = output(Command::new(&linker).arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR}"
        ));
        sh(Command::new(env!("CARGO"))
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", &llvm_prefix))?;
    }
    // aya-build finds bpf-linker on PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let bin = cargo_home_bin();
    if !std::env::split_paths(&path).any(|p| p == bin) {
        let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
            .context("building PATH")?;
        // SAFETY: single-threaded at this point; children inherit the new PATH.
        unsafe { std::env::set_var("PATH", joined) };
    }
    step(&format!(
        "prerequisites present ({:.1}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    prereqs()?;
    let started = Instant::now();
    step("cargo fmt --check");
    cargo(&["fmt", "--all", "--", "--check"])?;
    step("clippy (userspace)");
    cargo(&[
        "clippy",
        "--release",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("clippy (eBPF, nightly, bpfel-unknown-none)");
    sh(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--package",
            "tracer-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--target-dir",
            "target/ebpf-clippy",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER"))?;
    if !nix_is_root() {
        bail!(
            "the real-kernel tests load eBPF programs and create network namespaces: run `cargo xtask test` as root"
        );
    }
    // The metrics end-to-end test scrapes tcplens with a real Prometheus server; top's
    // runs it in a real terminal, tmux's.
    apt_tools(&[("prometheus", "prometheus"), ("tmux", "tmux")])?;
    step("cargo test (unit and real-kernel tests)");
    let mut args = vec![
        "test",
        "--release",
        "--no-fail-fast",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--lib",
        "--bins",
        "--tests",
    ];
    args.extend(extra.iter().map(String::as_str));
    let (passed, failed, ok) = cargo_test(&args)?;
    step(&format!(
        "checks and tests took {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    // One closing line over every test binary.
    println!("tests: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// The scenario suites on each kernel of [`vm::KERNELS`], one VM per kernel.
fn test_kernels(root: &Path, only: &[String], run: &vm::Selection) -> Result<()> {
    prereqs()?;
    if !nix_is_root() {
        bail!("the VM tests unpack kernels and load eBPF programs inside them: run as root");
    }
    apt_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
    ])?;
    let started = Instant::now();
    cargo(&["build", "--release", "--bin", "tcplens"])?;
    let suites = vm::build_suites()?;
    let tcplens = root.join("target/release/tcplens");
    let out_dir = root.join("target/kernels");
    let mut lines = Vec::new();
    let mut all_ok = true;
    for (label, package) in vm::KERNELS {
        if !only.is_empty() && !only.iter().any(|o| o == label) {
            continue;
        }
        step(&format!("Linux {label} ({package}) in QEMU"));
        let o = vm::run_kernel(label, package, root, &tcplens, &suites, run, &out_dir)?;
        let line = format!(
            "kernel {} ({}): {} passed, {} failed in {:.0}s",
            o.label,
            o.release,
            o.passed,
            o.failed.len(),
            o.took.as_secs_f64()
        );
        vm::say(&line);
        for f in &o.failed {
            vm::say(&format!("  failed: {f}"));
        }
        if !o.failed.is_empty() || o.passed == 0 {
            all_ok = false;
            if !o.failures.is_empty() {
                vm::say(o.failures.trim_end());
            }
            vm::say(&format!("  log: {}", o.log.display()));
        }
        lines.push(line);
    }
    step(&format!(
        "kernel tests took {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    for l in &lines {
        println!("{l}");
    }
    if lines.is_empty() {
        bail!("no kernel matched --only");
    }
    if !all_ok {
        bail!("kernel tests failed");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and sums the `test result:` lines.
fn cargo_test(args: &[&str]) -> Result<(u64, u64, bool)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(env!("CARGO"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((passed, failed, status.success()))
}

/// In `ok. 8 passed; 0 failed; …`, the number before `word`.
fn count_before(s: &str, word: &str) -> u64 {
    s.find(word)
        .and_then(|end| s[..end].rsplit([' ', '.']).next()?.parse().ok())
        .unwrap_or(0)
}

/// Installs the Debian packages of any missing command: `(command, package)`.
fn apt_tools(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| {
            output(Command::new("sh").args(["-c", &format!("command -v {cmd}")])).is_none()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {} (apt)", missing.join(", ")));
    sh(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}
