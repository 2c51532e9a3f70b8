//! A loopback connection-churn generator: threads doing connect/accept/close as fast as
//! the kernel allows, in a network namespace of its own, for a bounded time.
//!
//! Each connection is 10 transitions: the server closes first (so the client's ephemeral
//! port is free at once and TIME_WAIT sits on the server side), the client then closes.
//!   client: CLOSE>SYN_SENT>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE
//!   server: LISTEN>SYN_RECV>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Transitions one churn connection makes.
pub(crate) const TRANSITIONS_PER_CONNECTION: u64 = 10;

#[derive(Clone, Copy, Debug)]
pub(crate) struct ChurnResult {
    pub connections: u64,
    pub elapsed: Duration,
}

impl ChurnResult {
    pub(crate) fn per_second(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }
}

/// Moves the calling thread into a new network namespace with loopback up. Threads it
/// spawns afterwards are in it too.
pub(crate) fn enter_new_netns() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) (needs root)")?;
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running `ip link set lo up` (iproute2)")?;
    if !status.success() {
        bail!("`ip link set lo up` failed");
    }
    // Room for many short-lived client ports, and TIME_WAIT recycling on the server side.
    for (key, value) in [
        ("net/ipv4/ip_local_port_range", "1024 65535"),
        ("net/ipv4/tcp_tw_reuse", "1"),
    ] {
        std::fs::write(format!("/proc/sys/{key}"), value)
            .with_context(|| format!("sysctl {key}"))?;
    }
    Ok(())
}

/// Runs the churn for `duration` with `clients` connecting threads (and as many
/// accepting ones) against 127.0.0.1:`port`, in a new network namespace entered by a
/// thread of its own.
pub(crate) fn run(duration: Duration, clients: usize, port: u16) -> Result<ChurnResult> {
    std::thread::Builder::new()
        .name("churn".into())
        .spawn(move || -> Result<ChurnResult> {
            enter_new_netns()?;
            churn_here(duration, clients, port)
        })
        .context("spawning the churn thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))?
}

fn churn_here(duration: Duration, clients: usize, port: u16) -> Result<ChurnResult> {
    let listener =
        Arc::new(TcpListener::bind(("127.0.0.1", port)).context("binding the churn listener")?);
    // Two flags: clients stop first; acceptors only once every client is done, so a client
    // whose connection is still in the accept queue is always served.
    let stop_clients = Arc::new(AtomicBool::new(false));
    let stop_servers = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut servers = Vec::new();
    for _ in 0..clients {
        let (listener, stop) = (listener.clone(), stop_servers.clone());
        servers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((conn, _)) = listener.accept() {
                    drop(conn); // the server closes first
                }
            }
        }));
    }
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (stop, done) = (stop_clients.clone(), done.clone());
        workers.push(std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = c.read(&mut buf); // EOF: the server closed
                    drop(c);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    std::thread::sleep(duration);
    stop_clients.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let elapsed = started.elapsed();
    // Every client is done; wake the acceptors so they see their flag.
    stop_servers.store(true, Ordering::Relaxed);
    for _ in 0..servers.len() {
        let _ = TcpStream::connect(("127.0.0.1", port));
    }
    for s in servers {
        let _ = s.join();
    }
    Ok(ChurnResult {
        connections: done.load(Ordering::Relaxed),
        elapsed,
    })
}
