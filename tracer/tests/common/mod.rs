//! Helpers of the real-kernel tests: a fresh network namespace per scenario, and an
//! in-process capture of the real eBPF program's events. These tests need root; they
//! fail (never skip) without it.
#![allow(dead_code)]

pub(crate) mod listen;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::libc;
use tracer::decode::decode;
use tracer::model::{KernelEvent, RequestEvent, TcpState, TimewaitEvent, Transition};
use tracer::source::kernel::{
    DEFAULT_RING_SIZE, DRAIN_INTERVAL, KernelFilter, KernelOptions, KernelSource,
};

/// The built binary, run as a user would.
pub(crate) const TCPLENS: &str = env!("CARGO_BIN_EXE_tcplens");

/// A running `tcplens`, attached (its "tracing" line was read from stderr). Its stdout
/// is read from the start on a thread of its own (a full pipe would stall tcplens), each
/// line kept with when it arrived.
pub(crate) struct Running {
    child: std::process::Child,
    err: std::io::BufReader<std::process::ChildStderr>,
    out: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// stderr lines before the "tracing" one.
    pub preamble: Vec<String>,
    waited: bool,
}

impl Drop for Running {
    /// A test that failed midway leaves no tracer behind.
    fn drop(&mut self) {
        if !self.waited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a `tcplens` run printed, and how it exited.
pub(crate) struct Finished {
    pub stdout: String,
    pub stderr: String,
    pub status: std::process::ExitStatus,
}

/// Starts tcplens and waits until its programs are attached.
pub(crate) fn start_tcplens(args: &[&str]) -> Running {
    let mut cmd = std::process::Command::new(TCPLENS);
    cmd.args(args);
    start_command(cmd)
}

/// As [`start_tcplens`], for a command that runs tcplens (e.g. under `setpriv`).
pub(crate) fn start_command(mut cmd: std::process::Command) -> Running {
    use std::io::BufRead as _;
    require_root();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning tcplens");
    let stdout = child.stdout.take().expect("stdout");
    let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let lines = out.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines
                .lock()
                .expect("stdout lines")
                .push((Instant::now(), line));
        }
    });
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut preamble = Vec::new();
    loop {
        let mut line = String::new();
        if err.read_line(&mut line).expect("reading stderr") == 0 {
            let _ = child.wait();
            panic!("tcplens ended before tracing: {preamble:?}");
        }
        if line.starts_with("tcplens: tracing") {
            break;
        }
        preamble.push(line.trim().to_string());
        // Only the metrics address may come first (`serve`, `--serve`).
        if !line.starts_with("tcplens: metrics on ") {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected line before tracing: {preamble:?}");
        }
    }
    Running {
        child,
        err,
        out,
        reader: Some(reader),
        preamble,
        waited: false,
    }
}

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address printed by `serve`/`--serve` ("tcplens: metrics on http://ADDR/metrics").
    pub(crate) fn metrics_addr(&self) -> std::net::SocketAddr {
        let line = self.preamble.first().expect("a metrics line");
        let addr = line
            .trim_start_matches("tcplens: metrics on http://")
            .trim_end_matches("/metrics");
        addr.parse().unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// The stdout lines so far, with when each arrived.
    pub(crate) fn lines_so_far(&self) -> Vec<(Instant, String)> {
        self.out.lock().expect("stdout lines").clone()
    }

    /// Waits until a stdout line satisfies `want` (or `timeout` passes): the line and when
    /// it arrived.
    pub(crate) fn wait_for_line(
        &self,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.lines_so_far().into_iter().find(|(_, l)| want(l)) {
                return Some(found);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks tcplens to stop (SIGTERM), as a service manager would.
    pub(crate) fn stop(self) -> Finished {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        self.wait()
    }

    /// Waits for tcplens to exit (by `--duration` or a signal).
    pub(crate) fn wait(mut self) -> Finished {
        use std::io::Read as _;
        self.waited = true;
        let mut stderr = String::new();
        self.err.read_to_string(&mut stderr).expect("stderr");
        let status = self.child.wait().expect("waiting for tcplens");
        if let Some(r) = self.reader.take() {
            r.join().expect("stdout reader");
        }
        let lines = std::mem::take(&mut *self.out.lock().expect("stdout lines"));
        let mut stdout = String::new();
        for (_, l) in lines {
            stdout.push_str(&l);
            stdout.push('\n');
        }
        Finished {
            stdout,
            stderr,
            status,
        }
    }
}

/// A named network namespace (`ip netns add`), at /run/netns/NAME, with loopback up; it is
/// deleted when dropped (unless [`NamedNetns::delete`] did it first).
pub(crate) struct NamedNetns {
    pub name: String,
    deleted: bool,
}

impl NamedNetns {
    pub(crate) fn new(name: &str) -> NamedNetns {
        require_root();
        // A leftover from an interrupted run.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        for args in [
            &["netns", "add", name][..],
            &["-n", name, "link", "set", "lo", "up"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("running ip (iproute2)");
            assert!(ok.success(), "ip {args:?}");
        }
        NamedNetns {
            name: name.to_string(),
            deleted: false,
        }
    }

    pub(crate) fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// The namespace's inode number.
    pub(crate) fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(self.path()).expect("namespace").ino()
    }

    /// Runs `f` on a new thread named [`THREAD_NAME`] inside the namespace.
    pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                let ns = std::fs::File::open(&path).expect("namespace file");
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                drop(ns); // before `f`, which may give the thread a table of its own
                f()
            })
            .expect("spawning the namespace thread")
            .join()
            .expect("namespace thread panicked")
    }

    /// A TcpExt counter of the namespace, as `nstat` reads it.
    pub(crate) fn nstat(&self, counter: &str) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "nstat", "-asz", counter])
            .output()
            .expect("running nstat (iproute2)");
        assert!(out.status.success(), "nstat: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut cols = l.split_whitespace();
                (cols.next()? == counter).then(|| cols.next()?.parse().ok())?
            })
            .unwrap_or_else(|| panic!("no {counter} in nstat's output: {out:?}"))
    }

    /// Deletes the namespace: its sockets go, its timewait sockets are killed.
    pub(crate) fn delete(&mut self) {
        if !self.deleted {
            self.deleted = true;
            let ok = std::process::Command::new("ip")
                .args(["netns", "del", &self.name])
                .status()
                .expect("running ip");
            assert!(ok.success(), "ip netns del {}", self.name);
        }
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if !self.deleted {
            self.deleted = true;
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

/// A client connected to 127.0.0.1:`port` from the fixed local port `local_port`
/// (SO_REUSEADDR, so the port can be bound again while a timewait socket holds it).
pub(crate) fn connect_from(local_port: u16, port: u16) -> TcpStream {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket,
        sockopt::ReuseAddr,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    setsockopt(&fd, ReuseAddr, &true).unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, local_port),
    )
    .unwrap();
    connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, port),
    )
    .expect("connect (reusing the port in TIME_WAIT)");
    TcpStream::from(fd)
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub(crate) fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http_request(addr, "GET", path);
    (status, body)
}

/// A plain HTTP/1.0 request on loopback: (status, head, body).
pub(crate) fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> (u16, String, String) {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect(addr).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// tcplens's closing line says nothing was lost in the kernel (ring buffer drops and
/// recursion misses both 0) and no socket ended unseen.
pub(crate) fn assert_nothing_lost(stderr: &str) {
    let last = stderr
        .lines()
        .rfind(|l| l.contains(" events read ("))
        .unwrap_or_else(|| panic!("no summary line in {stderr}"));
    // "N events read (M timewait, R request), 0 lost", then what else it has to say after
    // a ';'.
    let counts = last.split(';').next().unwrap_or_default();
    assert!(counts.ends_with(" request), 0 lost"), "{stderr}");
}

/// stdout of a successful run that lost nothing.
pub(crate) fn succeeded(f: Finished) -> String {
    assert!(
        f.status.success(),
        "tcplens failed: {}: {}",
        f.status,
        f.stderr
    );
    assert_nothing_lost(&f.stderr);
    f.stdout
}

/// The states of a timeline JSON life, in order.
pub(crate) fn state_names(life: &serde_json::Value) -> Vec<&str> {
    life["states"]
        .as_array()
        .expect("states")
        .iter()
        .map(|s| s["state"].as_str().expect("state name"))
        .collect()
}

/// One JSON object per line.
pub(crate) fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The JSON lives (or events) with `port` at either end.
pub(crate) fn on_port(lives: Vec<serde_json::Value>, port: u16) -> Vec<serde_json::Value> {
    lives
        .into_iter()
        .filter(|l| l["sport"] == port || l["dport"] == port)
        .collect()
}

/// The duration (`ns`) of the one span of `state` in a timeline life.
pub(crate) fn state_ns(life: &serde_json::Value, state: &str) -> u64 {
    let spans: Vec<&serde_json::Value> = life["states"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == state)
        .collect();
    assert_eq!(spans.len(), 1, "one {state} in {life}");
    spans[0]["ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("{state} has no duration: {life}"))
}

/// Whether `got_ns` is within `tol` of `want`.
/// Whether the tests run under CPU emulation (QEMU TCG in `cargo xtask test-kernels`):
/// there the kernel's tick and the clocks drift apart by milliseconds.
pub(crate) fn emulated() -> bool {
    std::env::var_os("TCPLENS_TEST_EMULATED").is_some_and(|v| v == "1")
}

/// A timing tolerance: `base` on real hardware, three times it under emulation.
pub(crate) fn slack(base: Duration) -> Duration {
    if emulated() { base * 3 } else { base }
}

pub(crate) fn near(got_ns: u64, want: Duration, tol: Duration) -> bool {
    (i128::from(got_ns) - want.as_nanos() as i128).unsigned_abs() <= tol.as_nanos()
}

/// 127.0.0.1:`port` for raw socket calls in forked children.
fn loopback_v4(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    }
}

/// A simultaneous close on 127.0.0.1:`port`, made deterministic: the client's FIN is held
/// back behind data the server's full receive buffer cannot take (zero window), so it is
/// still unacknowledged in FIN_WAIT1 when the server's FIN arrives (FIN_WAIT1 -> CLOSING).
/// Returns the client's port, and the bytes sent and received, which must match (all data
/// arrives before the FIN). Both sockets are closed on return.
pub(crate) fn crossing_fins(port: u16) -> (u16, usize, usize) {
    use std::io::{ErrorKind, Read as _, Write as _};
    use std::net::Shutdown;
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    set_rcvbuf(&listener, 4096);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let client_port = client.local_addr().unwrap().port();
    let (mut server, _) = listener.accept().unwrap();
    client.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 65_536];
    let mut sent = 0usize;
    loop {
        match client.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    client.shutdown(Shutdown::Write).unwrap(); // FIN_WAIT1, FIN queued, not sent
    std::thread::sleep(Duration::from_millis(50));
    server.shutdown(Shutdown::Write).unwrap(); // server FIN reaches the client
    std::thread::sleep(Duration::from_millis(50));
    let mut received = 0usize;
    let mut buf = vec![0u8; 65536];
    loop {
        match server.read(&mut buf).unwrap() {
            0 => break,
            n => received += n,
        }
    }
    let mut rest = Vec::new();
    client.set_nonblocking(false).unwrap();
    client.read_to_end(&mut rest).unwrap();
    (client_port, sent, received)
}

/// Name given to scenario threads: the `comm` the kernel reports for them.
pub(crate) const THREAD_NAME: &str = "tcplens-test";

/// Gives the calling scenario thread a descriptor table of its own, for a scenario whose
/// test asserts which task closed a socket. Otherwise a process another test of the same
/// binary spawns meanwhile copies the shared table at fork and holds the scenario's sockets
/// until its exec: when the scenario closes one then, the last reference goes with the
/// child's exec, and the kernel closes the socket in the child (as `tmux` or `ip`, its pid).
/// The new table holds stdin, stdout and stderr only (`close_range` with
/// `CLOSE_RANGE_UNSHARE` does not copy the range it closes): a full copy would hold the other
/// tests' sockets open in turn. Call it first; sockets the scenario opens afterwards end
/// with its thread and cannot be handed back to the test.
pub(crate) fn private_fd_table() {
    // SAFETY: it closes nothing of the shared table, and nothing in this new thread owns a
    // descriptor yet.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_UNSHARE as i32) };
    assert_eq!(
        rc,
        0,
        "close_range(CLOSE_RANGE_UNSHARE): {}",
        std::io::Error::last_os_error()
    );
}

pub(crate) fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the real-kernel tests load eBPF programs and create network namespaces: run them as root (cargo xtask test)"
    );
}

/// Runs `f` on a new thread named [`THREAD_NAME`] inside a new network namespace whose
/// loopback is up. The namespace ends with the thread (and its sockets).
pub(crate) fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET)");
            set_link("lo", true);
            f()
        })
        .expect("spawning the scenario thread")
        .join()
        .expect("scenario thread panicked")
}

/// A listener on `host`:`port`, a client connected to it, and the accepted server side.
pub(crate) struct Pair {
    pub listener: TcpListener,
    pub client: TcpStream,
    pub server: TcpStream,
    /// The client's ephemeral local port.
    pub client_port: u16,
}

pub(crate) fn connect_pair(host: &str, port: u16) -> Pair {
    let listener = TcpListener::bind((host, port)).expect("bind");
    let client = TcpStream::connect((host, port)).expect("connect");
    let client_port = client.local_addr().expect("local address").port();
    let (server, _) = listener.accept().expect("accept");
    Pair {
        listener,
        client,
        server,
        client_port,
    }
}

/// Sets a network interface of the current thread's namespace up or down.
pub(crate) fn set_link(name: &str, up: bool) {
    // SAFETY: plain ioctls on a socket we own, with a zeroed, NUL-terminated ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        assert_eq!(
            libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr),
            0,
            "SIOCGIFFLAGS"
        );
        let flags = ifr.ifr_ifru.ifru_flags;
        let up_flag = libc::IFF_UP as libc::c_short;
        ifr.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0, "SIOCSIFFLAGS");
        libc::close(fd);
    }
}

/// Writes a sysctl of the current thread's network namespace, e.g.
/// `sysctl("net/ipv4/tcp_fin_timeout", "2")`.
pub(crate) fn sysctl(key: &str, value: &str) {
    std::fs::write(format!("/proc/sys/{key}"), value)
        .unwrap_or_else(|e| panic!("sysctl {key}: {e}"));
}

pub(crate) fn gettid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

pub(crate) fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

pub(crate) fn set_rcvbuf(l: &TcpListener, bytes: i32) {
    // SAFETY: setsockopt on an open socket with a correctly sized value.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

fn push_event(
    events: &mut Vec<Transition>,
    timewait: &mut Vec<TimewaitEvent>,
    requests: &mut Vec<RequestEvent>,
    b: &[u8],
) {
    match decode(b).expect("kernel event decodes") {
        KernelEvent::Transition(t) => events.push(t),
        KernelEvent::Timewait(tw) => timewait.push(tw),
        KernelEvent::Request(r) => requests.push(r),
    }
}

/// The real eBPF program, loaded and attached in this process, and what it reported.
pub(crate) struct Capture {
    rt: tokio::runtime::Runtime,
    source: Option<KernelSource>,
    pub events: Vec<Transition>,
    /// Timewait timer events, in arrival order.
    pub timewait: Vec<TimewaitEvent>,
    /// Request timer events, in arrival order.
    pub requests: Vec<RequestEvent>,
}

impl Capture {
    pub(crate) fn start(filter: KernelFilter) -> Capture {
        require_root();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let source = rt
            .block_on(async {
                KernelSource::open(&KernelOptions {
                    filter,
                    ring_size: DEFAULT_RING_SIZE,
                    timewait: true,
                    requests: true,
                })
            })
            .expect("loading and attaching the eBPF program");
        assert!(
            source.timewait && source.requests,
            "TIME_WAIT and request tracking must be available on the test machine"
        );
        Capture {
            rt,
            source: Some(source),
            events: Vec::new(),
            timewait: Vec::new(),
            requests: Vec::new(),
        }
    }

    pub(crate) fn everything() -> Capture {
        Capture::start(KernelFilter::default())
    }

    /// Reads events until `done` holds for what was read, or `timeout` passes. Like the
    /// tracer itself, it drains on wakeups and on a short timer (the kernel batches
    /// wakeups).
    pub(crate) fn wait_for(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Transition]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        let Capture {
            rt,
            source,
            events,
            timewait,
            requests,
        } = self;
        let source = source.as_mut().expect("capture running");
        loop {
            source
                .events
                .drain_now(|b| push_event(events, timewait, requests, b));
            let left = deadline.saturating_duration_since(Instant::now());
            if done(events) || left.is_zero() {
                break;
            }
            rt.block_on(async {
                let read = source
                    .events
                    .next_batch(|b| push_event(events, timewait, requests, b));
                let _ = tokio::time::timeout(left.min(DRAIN_INTERVAL), read).await;
            });
        }
    }

    /// Events of sockets on `port` (local or remote).
    pub(crate) fn on_port(&self, port: u16) -> Vec<Transition> {
        self.events
            .iter()
            .filter(|t| t.id.sport == port || t.id.dport == port)
            .copied()
            .collect()
    }

    /// Waits until the sockets on `port` have done `n` transitions in all, then returns
    /// their lives (see [`lives`]).
    pub(crate) fn lives_on_port(&mut self, port: u16, n: usize) -> Vec<Vec<Transition>> {
        self.wait_for(Duration::from_secs(5), |evs| {
            evs.iter()
                .filter(|t| t.id.sport == port || t.id.dport == port)
                .count()
                >= n
        });
        // Give stragglers a moment: an exact assertion must see extra events too.
        self.wait_for(Duration::from_millis(100), |_| false);
        lives(&self.on_port(port))
    }

    /// Events the kernel lost (ring buffer full, recursion misses).
    pub(crate) fn lost(&self) -> u64 {
        use tracer::source::kernel::LossSource as _;
        self.source
            .as_ref()
            .map_or(0, |s| s.lost.lost().expect("loss counters").total())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // Detach inside the runtime that registered the fds.
        let source = self.source.take();
        self.rt.block_on(async move { drop(source) });
    }
}

/// Splits events into socket lives: grouped by `struct sock` address in order of first
/// appearance, a transition to CLOSE ending a life (the address may be reused after).
pub(crate) fn lives(events: &[Transition]) -> Vec<Vec<Transition>> {
    let mut out: Vec<Vec<Transition>> = Vec::new();
    let mut open = std::collections::HashMap::<u64, usize>::new();
    for t in events {
        let idx = *open.entry(t.sk).or_insert_with(|| {
            out.push(Vec::new());
            out.len() - 1
        });
        out[idx].push(*t);
        if t.new == TcpState::Close {
            open.remove(&t.sk);
        }
    }
    out
}

pub(crate) fn states(life: &[Transition]) -> Vec<(TcpState, TcpState)> {
    life.iter().map(|t| (t.old, t.new)).collect()
}

/// The life whose first transition is `first`.
pub(crate) fn life_starting(
    lives: &[Vec<Transition>],
    first: (TcpState, TcpState),
) -> Vec<Transition> {
    let found: Vec<_> = lives
        .iter()
        .filter(|l| l.first().map(|t| (t.old, t.new)) == Some(first))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one life starting {first:?}, got {lives:#?}"
    );
    found[0].clone()
}

/// In a forked child: closes every fd but `keep` (async-signal-safe), so the child holds
/// neither the test harness's output pipes nor other children's control pipes.
fn close_all_but(keep: &[i32]) {
    for fd in 0..4096 {
        if !keep.contains(&fd) {
            // SAFETY: close(2) on any number is harmless (EBADF when not open).
            unsafe { libc::close(fd) };
        }
    }
}

/// A server in a child process of its own (named `comm`, at most 15 bytes) that listens on
/// 127.0.0.1:`port`, accepts one connection, waits for the peer's FIN, holds the socket in
/// CLOSE_WAIT for `hold`, then closes it. Must be called in the namespace thread.
///
/// The child uses raw syscalls only (it is forked from a multi-threaded process).
pub(crate) struct ForkedServer {
    pub pid: u32,
    pipe: std::fs::File,
}

impl ForkedServer {
    pub(crate) fn start(port: u16, comm: &'static std::ffi::CStr, hold: Duration) -> ForkedServer {
        Self::start_in(port, comm, hold, None)
    }

    /// As [`ForkedServer::start`], the child first moving itself into the cgroup whose
    /// `cgroup.procs` is open (for writing) at `cgroup_procs`.
    pub(crate) fn start_in(
        port: u16,
        comm: &'static std::ffi::CStr,
        hold: Duration,
        cgroup_procs: Option<i32>,
    ) -> ForkedServer {
        use std::os::fd::FromRawFd;
        let mut fds = [0i32; 2];
        // SAFETY: pipe(2) into a 2-element array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let addr = loopback_v4(port);
        let hold_ts = libc::timespec {
            tv_sec: hold.as_secs() as libc::time_t,
            tv_nsec: hold.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the child only makes async-signal-safe syscalls, then _exit()s.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => unsafe {
                let w = fds[1];
                let cg = cgroup_procs.unwrap_or(-1);
                close_all_but(&[w, cg]);
                if cg >= 0 && libc::write(cg, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(3);
                }
                libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
                let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let one: libc::c_int = 1;
                libc::setsockopt(
                    l,
                    libc::SOL_SOCKET,
                    libc::SO_REUSEADDR,
                    (&raw const one).cast(),
                    4,
                );
                let sa = (&raw const addr).cast::<libc::sockaddr>();
                if libc::bind(l, sa, std::mem::size_of::<libc::sockaddr_in>() as u32) != 0
                    || libc::listen(l, 8) != 0
                {
                    libc::_exit(2);
                }
                libc::write(w, b"r".as_ptr().cast(), 1); // ready
                let c = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
                let mut buf = [0u8; 64];
                while libc::read(c, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
                // EOF: the peer's FIN arrived, the socket is in CLOSE_WAIT.
                let mut t0: libc::timespec = std::mem::zeroed();
                let mut t1: libc::timespec = std::mem::zeroed();
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t0);
                libc::nanosleep(&raw const hold_ts, std::ptr::null_mut());
                libc::close(c);
                libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t1);
                let held = ((t1.tv_sec - t0.tv_sec) as i64 * 1_000_000_000
                    + (t1.tv_nsec - t0.tv_nsec) as i64) as u64;
                libc::write(w, held.to_ne_bytes().as_ptr().cast(), 8);
                libc::close(l);
                libc::_exit(0);
            },
            pid => {
                // SAFETY: closing our copy of the write end; the read end becomes a File.
                unsafe { libc::close(fds[1]) };
                let mut pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
                let mut ready = [0u8; 1];
                std::io::Read::read_exact(&mut pipe, &mut ready).expect("server ready");
                ForkedServer {
                    pid: pid as u32,
                    pipe,
                }
            }
        }
    }

    /// Waits for the child; returns how long it measured the socket held in CLOSE_WAIT
    /// (from the EOF it read to its close), by its own clock.
    pub(crate) fn finish(mut self) -> Duration {
        let mut held = [0u8; 8];
        std::io::Read::read_exact(&mut self.pipe, &mut held).expect("server report");
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.pid as i32, &raw mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "server status {status}"
        );
        Duration::from_nanos(u64::from_ne_bytes(held))
    }
}

/// A client in a child process of its own (named `comm`), in the cgroup whose
/// `cgroup.procs` is open at `cgroup_procs`: it connects to 127.0.0.1:`port`, sends one
/// byte, closes first (its socket goes on to FIN_WAIT2, then TIME_WAIT once the server
/// closes) and exits. Returns its pid once it exited. Must be called in the namespace
/// thread.
pub(crate) fn forked_client(port: u16, comm: &'static std::ffi::CStr, cgroup_procs: i32) -> u32 {
    let addr = loopback_v4(port);
    // SAFETY: the child only makes async-signal-safe syscalls, then _exit()s.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => unsafe {
            close_all_but(&[cgroup_procs]);
            if libc::write(cgroup_procs, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(3);
            }
            libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
            let c = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let sa = (&raw const addr).cast::<libc::sockaddr>();
            if libc::connect(c, sa, std::mem::size_of::<libc::sockaddr_in>() as u32) != 0 {
                libc::_exit(2);
            }
            libc::write(c, b"x".as_ptr().cast(), 1);
            libc::close(c);
            libc::_exit(0);
        },
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &raw mut status, 0) };
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "client status {status}"
            );
            pid as u32
        }
    }
}

/// A server in a child process of its own (named `comm`) that accepts `count` connections
/// on 127.0.0.1:`port` and never closes them: when the clients close, each sits in
/// CLOSE_WAIT. It closes them and exits when told ([`LeakyServer::stop`]).
pub(crate) struct LeakyServer {
    pub pid: u32,
    /// The fd of each accepted socket in the child, in accept order.
    pub fds: Vec<u32>,
    report: std::fs::File,
    stop: Option<std::fs::File>,
}

impl LeakyServer {
    /// Must be called in the namespace thread; connect `count` clients afterwards.
    pub(crate) fn start(port: u16, comm: &'static std::ffi::CStr, count: usize) -> LeakyServer {
        use std::os::fd::FromRawFd;
        let (mut up, mut down) = ([0i32; 2], [0i32; 2]);
        // SAFETY: pipe2(2) into 2-element arrays.
        unsafe {
            assert_eq!(libc::pipe2(up.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(down.as_mut_ptr(), libc::O_CLOEXEC), 0);
        }
        let addr = loopback_v4(port);
        let mut fds = vec![0u32; count];
        // SAFETY: the child only makes async-signal-safe syscalls, then _exit()s; `fds`
        // was allocated before the fork.
        match unsafe { libc::fork() } {
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            0 => unsafe {
                close_all_but(&[up[1], down[0]]);
                libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
                let l = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let sa = (&raw const addr).cast::<libc::sockaddr>();
                if libc::bind(l, sa, std::mem::size_of::<libc::sockaddr_in>() as u32) != 0
                    || libc::listen(l, 4096) != 0
                {
                    libc::_exit(2);
                }
                libc::write(up[1], b"r".as_ptr().cast(), 1);
                for slot in &mut fds {
                    let c = libc::accept(l, std::ptr::null_mut(), std::ptr::null_mut());
                    if c < 0 {
                        libc::_exit(3);
                    }
                    *slot = c as u32;
                }
                libc::write(up[1], fds.as_ptr().cast(), fds.len() * 4);
                let mut b = [0u8; 1];
                while libc::read(down[0], b.as_mut_ptr().cast(), 1) > 0 {}
                libc::_exit(0); // exit closes every socket
            },
            pid => unsafe {
                libc::close(up[1]);
                libc::close(down[0]);
                let mut report = std::fs::File::from_raw_fd(up[0]);
                let stop = std::fs::File::from_raw_fd(down[1]);
                let mut ready = [0u8; 1];
                std::io::Read::read_exact(&mut report, &mut ready).expect("leaky server ready");
                LeakyServer {
                    pid: pid as u32,
                    fds: Vec::new(),
                    report,
                    stop: Some(stop),
                }
            },
        }
    }

    /// Waits until the child accepted every connection and reads back its fds.
    pub(crate) fn accepted(&mut self, count: usize) {
        let mut raw = vec![0u8; count * 4];
        std::io::Read::read_exact(&mut self.report, &mut raw).expect("leaky server fds");
        self.fds = raw
            .chunks(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
    }

    /// Tells the child to exit (closing its sockets) and waits for it.
    pub(crate) fn stop(self) {
        drop(self);
    }
}

impl Drop for LeakyServer {
    fn drop(&mut self) {
        if self.stop.take().is_some() {
            let mut status = 0;
            // SAFETY: waiting for our own child, told to exit by closing its pipe.
            unsafe { libc::waitpid(self.pid as i32, &raw mut status, 0) };
        }
    }
}
