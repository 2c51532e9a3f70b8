//! `cargo xtask test-kernels`: the real-kernel scenario tests on the kernels users run.
//!
//! For each Debian kernel package below: download it (apt, cached), unpack it, build an
//! initramfs holding busybox, the tools the tests call (ip, ss, nstat, setpriv), tcplens
//! and the scenario test binaries (at the paths they were built with, with the shared
//! libraries they load) and the kernel's sock_diag modules, boot it in QEMU (KVM when this
//! machine can run a stock kernel with it, TCG otherwise), run every test binary there and
//! read the results back from a second serial port.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// The kernels: Debian 12's stock 6.1 and its backported 6.12.
pub(crate) const KERNELS: [(&str, &str); 2] = [
    ("6.1", "linux-image-6.1.0-56-amd64"),
    ("6.12", "linux-image-6.12.117+deb12-amd64"),
];

/// The scenario suites (tracer/tests/*.rs) that run in the VMs.
pub(crate) const SUITES: [&str; 8] = [
    "kernel",
    "timeline",
    "timewait",
    "leaks",
    "identity",
    "listen",
    "listen_scenarios",
    "containers",
];

/// Host programs the tests call.
const TOOLS: [&str; 4] = [
    "/usr/sbin/ip",
    "/usr/bin/ss",
    "/usr/bin/nstat",
    "/usr/bin/setpriv",
];

/// A kernel's run of every suite may take this long (TCG: about 3.5 minutes).
const RUN_LIMIT: Duration = Duration::from_mins(20);

/// Which tests run in the VM, and how often.
pub(crate) struct Selection {
    /// libtest's name filter (a substring of the test names), or every test.
    pub filter: Option<String>,
    /// Every selected suite runs this many times (to chase a flaky test).
    pub repeat: u32,
}

/// A word the VM's shell takes literally.
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What one kernel's run gave.
pub(crate) struct Outcome {
    pub label: String,
    pub release: String,
    pub passed: usize,
    pub failed: Vec<String>,
    /// The failed tests' output (see [`failures`]).
    pub failures: String,
    pub took: Duration,
    pub log: PathBuf,
}

/// The test binaries, built (release, as `cargo xtask test` builds them).
pub(crate) fn build_suites() -> Result<Vec<PathBuf>> {
    let mut args = vec![
        "test",
        "--release",
        "-p",
        "tracer",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ];
    for s in SUITES {
        args.extend(["--test", s]);
    }
    let out = Command::new(env!("CARGO"))
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["kind"][0] == "test"
            && let Some(exe) = v["executable"].as_str()
        {
            bins.push(PathBuf::from(exe));
        }
    }
    if bins.len() != SUITES.len() {
        bail!(
            "expected {} test binaries, cargo built {}",
            SUITES.len(),
            bins.len()
        );
    }
    Ok(bins)
}

/// The kernel package unpacked under `cache`: (vmlinuz, modules dir, release).
fn unpack(cache: &Path, package: &str) -> Result<(PathBuf, PathBuf, String)> {
    let dir = cache.join(package);
    let root = dir.join("root");
    if !root.join("boot").exists() {
        fs::create_dir_all(&dir)?;
        let debs = || -> Result<Vec<PathBuf>> {
            Ok(fs::read_dir(&dir)?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "deb"))
                .collect())
        };
        if debs()?.is_empty() {
            crate::sh(
                Command::new("apt-get")
                    .args(["download", package])
                    .current_dir(&dir),
            )
            .with_context(|| format!("downloading {package} (apt-get download)"))?;
        }
        let deb = debs()?.pop().context("the downloaded package")?;
        let tmp = dir.join("root.tmp");
        let _ = fs::remove_dir_all(&tmp);
        crate::sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        fs::rename(&tmp, &root)?;
    }
    let vmlinuz = fs::read_dir(root.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the package")?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("vmlinuz name")?
        .to_string();
    let modules = root.join("lib/modules").join(&release);
    Ok((vmlinuz, modules, release))
}

/// A newc cpio archive, written entry by entry.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<PathBuf>,
}

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let name = name.trim_start_matches('/');
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Every parent directory of `path`, once.
    fn parents(&mut self, path: &Path) {
        let mut todo = Vec::new();
        let mut p = path.parent();
        while let Some(d) = p {
            if d.as_os_str().is_empty() || d == Path::new("/") || self.dirs.contains(d) {
                break;
            }
            todo.push(d.to_path_buf());
            p = d.parent();
        }
        for d in todo.into_iter().rev() {
            self.entry(&d.to_string_lossy(), 0o040_755, &[]);
            self.dirs.insert(d);
        }
    }

    fn dir(&mut self, path: &str) {
        let p = PathBuf::from(path);
        self.parents(&p.join("x"));
    }

    fn file(&mut self, path: &Path, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(&path.to_string_lossy(), 0o100_000 | mode, data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(Path::new(path));
        self.entry(path, 0o120_777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// The shared libraries `bin` loads (ldd), the dynamic loader included.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// `bin` without its debug information (smaller to pack and to load).
fn stripped(bin: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let out = scratch.join("stripped");
    crate::sh(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(bin)
            .arg(&out),
    )?;
    Ok(fs::read(&out)?)
}

const INIT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
# iproute2 and util-linux before busybox's applets of the same names.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# 1 under TCG: the tests widen their timing tolerances (tick and clocks drift apart).
export TCPLENS_TEST_EMULATED=@EMULATED@
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Fresh tmpfs for /tmp and /run, unless the binaries were packed there (a workspace
# under /tmp): the initramfs itself is writable.
for d in /tmp /run; do [ -z "$(ls -A $d)" ] && mount -t tmpfs tmpfs $d; done
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mkdir -p /run/netns /var/run
for m in /modules/*.ko; do [ -e "$m" ] && insmod "$m" 2>/dev/null; done
ip link set lo up
out=/dev/ttyS1
echo "KERNEL $(uname -r)" > $out
cd /tmp
i=0
while [ $i -lt @REPEAT@ ]; do
  i=$((i + 1))
  for t in /suites/*; do
    name=$(basename "$t")
    echo "SUITE $name" > $out
    "$(cat "$t")" --test-threads 1 @FILTER@ > $out 2>&1
    echo "SUITE-END $name rc=$?" > $out
  done
done
echo "ALL-DONE" > $out
sync
poweroff -f
"#;

/// Files of the workspace the tests read (identity.rs checks the shipped deployment).
const WORKSPACE_FILES: [&str; 2] = [
    "deploy/systemd/tcplens.service",
    "deploy/kubernetes/daemonset.yaml",
];

/// The initramfs for one kernel.
fn initramfs(
    root: &Path,
    modules: &Path,
    tcplens: &Path,
    suites: &[PathBuf],
    run: &Selection,
    scratch: &Path,
) -> Result<Vec<u8>> {
    let mut c = Cpio::new();
    for d in [
        "/proc", "/sys", "/dev", "/tmp", "/run", "/etc", "/root", "/bin",
    ] {
        c.dir(d);
    }
    let emulated = if kvm_usable() { "0" } else { "1" };
    c.file(
        Path::new("/init"),
        0o755,
        INIT.replace("@EMULATED@", emulated)
            .replace("@REPEAT@", &run.repeat.to_string())
            .replace(
                "@FILTER@",
                &run.filter.as_deref().map(shell_word).unwrap_or_default(),
            )
            .as_bytes(),
    );
    c.file(Path::new("/bin/busybox"), 0o755, &fs::read("/bin/busybox")?);
    c.file(
        Path::new("/etc/passwd"),
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    );
    c.file(
        Path::new("/etc/group"),
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n",
    );
    let mut libs = BTreeSet::new();
    let mut binaries: Vec<PathBuf> = TOOLS.iter().map(PathBuf::from).collect();
    binaries.push(tcplens.to_path_buf());
    binaries.extend(suites.iter().cloned());
    for bin in &binaries {
        libs.extend(libraries(bin)?);
        let data = if TOOLS.iter().any(|t| Path::new(t) == bin) {
            fs::read(bin)?
        } else {
            stripped(bin, scratch)?
        };
        c.file(bin, 0o755, &data);
    }
    for lib in libs {
        // Through symlinks: the file itself, under the name the loader asks for.
        c.file(&lib, 0o755, &fs::read(&lib)?);
    }
    for (i, s) in suites.iter().enumerate() {
        let name = s
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('-').next())
            .unwrap_or("suite");
        c.file(
            Path::new(&format!("/suites/{i}-{name}")),
            0o644,
            s.to_string_lossy().as_bytes(),
        );
    }
    // sock_diag for TCP (modules on Debian's 6.1, built in elsewhere), and veth (the listen
    // tests' peer that never answers). Numbered so that the shell's glob loads inet_diag
    // first.
    let wanted = [
        ("kernel/net/ipv4", "inet_diag"),
        ("kernel/net/ipv4", "tcp_diag"),
        ("kernel/drivers/net", "veth"),
    ];
    for (n, (at, m)) in wanted.into_iter().enumerate() {
        let dir = modules.join(at);
        for ext in ["ko", "ko.xz"] {
            let p = dir.join(format!("{m}.{ext}"));
            if !p.exists() {
                continue;
            }
            let data = if ext == "ko.xz" {
                let out = Command::new("xz").arg("-dc").arg(&p).output()?;
                if !out.status.success() {
                    bail!("unpacking {}", p.display());
                }
                out.stdout
            } else {
                fs::read(&p)?
            };
            c.file(Path::new(&format!("/modules/{n}-{m}.ko")), 0o644, &data);
        }
    }
    // At their paths on this machine: the tests name them from CARGO_MANIFEST_DIR/.. .
    c.dir(&root.join("tracer").to_string_lossy());
    for f in WORKSPACE_FILES {
        let p = root.join(f);
        c.file(&p, 0o644, &fs::read(&p)?);
    }
    c.symlink("/bin/sh", "busybox");
    Ok(c.finish())
}

/// Whether QEMU can use KVM here for a stock kernel: /dev/kvm and hardware virtualization
/// the guest can see (nested paravirtual KVM without vmx/svm cannot run one).
fn kvm_usable() -> bool {
    Path::new("/dev/kvm").exists()
        && fs::read_to_string("/proc/cpuinfo")
            .is_ok_and(|c| c.contains(" vmx") || c.contains(" svm"))
}

/// Boots one kernel and runs the suites in it.
pub(crate) fn run_kernel(
    label: &str,
    package: &str,
    root: &Path,
    tcplens: &Path,
    suites: &[PathBuf],
    run: &Selection,
    out_dir: &Path,
) -> Result<Outcome> {
    let (vmlinuz, modules, release) = unpack(&cache_dir(), package)?;
    let work = out_dir.join(label);
    fs::create_dir_all(&work)?;
    let initrd = work.join("initramfs.cpio");
    fs::write(
        &initrd,
        initramfs(root, &modules, tcplens, suites, run, &work)?,
    )?;
    let console = work.join("console.log");
    let results = work.join("results.log");
    let _ = fs::remove_file(&results);
    let mut qemu = Command::new("qemu-system-x86_64");
    if kvm_usable() {
        qemu.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        // One host thread for both vCPUs: with a thread each (MTTCG), a vCPU may run
        // code another just patched (tracepoints switched on and off as tcplens attaches
        // and detaches) from its stale translation, and 6.12 oopses on a stray int3.
        qemu.args(["-accel", "tcg,thread=single", "-cpu", "max"]);
    }
    qemu.args(["-m", "2G", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .args(["-monitor", "none", "-display", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if started.elapsed() > RUN_LIMIT * run.repeat {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = started.elapsed();
    let text = fs::read_to_string(&results).unwrap_or_default();
    let (passed, mut failed) = tally(&text);
    if !text.contains("ALL-DONE") {
        failed.push(match status {
            None => format!("(the run did not end within {:?})", RUN_LIMIT * run.repeat),
            Some(_) => "(the VM stopped before the suites ended: see the console log)".into(),
        });
    }
    Ok(Outcome {
        label: label.to_string(),
        release,
        passed,
        failures: failures(&text),
        failed,
        took,
        log: results,
    })
}

/// What libtest printed for the failed tests (their `---- name stdout ----` sections),
/// each cut to its last lines: enough to tell why in a CI log.
pub(crate) fn failures(text: &str) -> String {
    const LINES: usize = 40;
    let mut out = String::new();
    let mut section: Vec<&str> = Vec::new();
    let flush = |section: &mut Vec<&str>, out: &mut String| {
        if let Some((head, body)) = section.split_first() {
            out.push_str(head);
            out.push('\n');
            if body.len() > LINES {
                out.push_str(&format!("  [{} lines cut]\n", body.len() - LINES));
            }
            for l in &body[body.len().saturating_sub(LINES)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        section.clear();
    };
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("---- ") && line.ends_with(" ----") {
            flush(&mut section, &mut out);
            inside = true;
            section.push(line);
        } else if inside && (line == "failures:" || line.starts_with("SUITE")) {
            flush(&mut section, &mut out);
            inside = false;
        } else if inside {
            section.push(line);
        }
    }
    flush(&mut section, &mut out);
    out
}

/// Passed tests, and the names of the failed ones, from libtest's output.
pub(crate) fn tally(text: &str) -> (usize, Vec<String>) {
    let mut passed = 0;
    let mut failed = Vec::new();
    let mut suite = String::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(s) = line.strip_prefix("SUITE ") {
            suite = s.to_string();
        } else if let Some(rest) = line.strip_prefix("test ") {
            if rest.ends_with(" ... ok") {
                passed += 1;
            } else if let Some(name) = rest.strip_suffix(" ... FAILED") {
                failed.push(format!("{suite}: {name}"));
            }
        } else if let Some(rest) = line.strip_prefix("SUITE-END ")
            && !rest.ends_with("rc=0")
            && !failed.iter().any(|f| f.starts_with(&format!("{suite}:")))
        {
            failed.push(format!("{suite}: exited with {rest}"));
        }
    }
    (passed, failed)
}

/// The cache of downloaded kernels: outside the clone, so that a fresh clone reuses it.
fn cache_dir() -> PathBuf {
    crate::dir_from_env("XDG_CACHE_HOME", ".cache", "/var/cache").join("tcplens/kernels")
}

/// Writes a line to stdout at once.
pub(crate) fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_tallied_per_suite() {
        let log = "KERNEL 6.1.0-56-amd64\nSUITE 0-kernel\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\nSUITE-END 0-kernel rc=101\nSUITE 1-leaks\ntest c ... ok\nSUITE-END 1-leaks rc=0\nSUITE 2-timewait\nSUITE-END 2-timewait rc=139\nALL-DONE\n";
        let (passed, failed) = tally(log);
        assert_eq!(passed, 2);
        assert_eq!(
            failed,
            ["0-kernel: b", "2-timewait: exited with 2-timewait rc=139"]
        );
    }

    #[test]
    fn failed_tests_output_is_kept_with_its_tail() {
        let mut log = String::from("test a ... FAILED\n\nfailures:\n\n---- a stdout ----\n");
        for i in 0..50 {
            log.push_str(&format!("line {i}\n"));
        }
        log.push_str(
            "---- b stdout ----\npanicked at b\n\nfailures:\n    a\n    b\nSUITE-END x rc=101\n",
        );
        let f = failures(&log);
        assert!(
            f.starts_with("---- a stdout ----\n  [10 lines cut]\nline 10\n"),
            "{f}"
        );
        assert!(
            f.ends_with("line 49\n---- b stdout ----\npanicked at b\n\n"),
            "{f}"
        );
    }
}
