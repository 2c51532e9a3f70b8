//! End to end with a real Prometheus server: `tcplens serve` scraped every second, sockets
//! held in known states for known times, the values read back through Prometheus's
//! query API.
// Prometheus returns the very values tcplens exported (counts, and seconds that are sums
// of exact nanosecond figures): comparing floats exactly is the point.
#![allow(clippy::float_cmp)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server on loopback, stopped on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: SocketAddr, port: u16) -> Prometheus {
        assert!(
            std::path::Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} missing: `cargo xtask test` installs Debian's prometheus package"
        );
        let dir = std::env::temp_dir().join(format!("tcplens-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tcplens\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200) {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// The single value of an instant query (NaN when there is none).
    fn query(&self, promql: &str) -> f64 {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        );
        assert_eq!(status, 200, "{promql}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let result = &v["data"]["result"];
        assert!(
            result.as_array().is_some_and(|r| r.len() <= 1),
            "{promql}: {body}"
        );
        result[0]["value"][1]
            .as_str()
            .map_or(f64::NAN, |s| s.parse().unwrap())
    }

    /// Waits until `promql` has a value satisfying `ok`.
    fn wait_for(&self, promql: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.query(promql);
            if ok(v) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_close_wait_durations_and_live_sockets() {
    const CW: [u16; 2] = [21401, 21402];
    const EST: u16 = 21403;
    let tcplens = start_tcplens(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "-L",
        "21401,21402,21403",
        "--duration",
        "60s",
    ]);
    let prom = Prometheus::start(tcplens.metrics_addr(), 19091);
    prom.wait_for("up{job=\"tcplens\"}", |v| v == 1.0);

    // Two servers hold a socket in CLOSE_WAIT for 1.5 s each; a third holds 3 connections
    // open (ESTABLISHED on its side: -L keeps only the server side).
    let (held, _clients, _server) = in_netns(|| {
        let a = ForkedServer::start(CW[0], c"prom-cw-a", Duration::from_millis(1500));
        let b = ForkedServer::start(CW[1], c"prom-cw-b", Duration::from_millis(1500));
        drop(TcpStream::connect(("127.0.0.1", CW[0])).unwrap());
        drop(TcpStream::connect(("127.0.0.1", CW[1])).unwrap());
        let mut est = LeakyServer::start(EST, c"prom-est", 3);
        let clients: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(("127.0.0.1", EST)).unwrap())
            .collect();
        est.accepted(3);
        (vec![a.finish(), b.finish()], clients, est)
    });
    assert!(
        held.iter()
            .all(|d| d.abs_diff(Duration::from_millis(1500)) < Duration::from_millis(20)),
        "{held:?}"
    );

    let cw = "tcplens_state_duration_seconds_bucket{state=\"CLOSE_WAIT\"}";
    let count = prom.wait_for(
        "tcplens_state_duration_seconds_count{state=\"CLOSE_WAIT\"}",
        |v| v == 2.0,
    );
    assert_eq!(count, 2.0);
    let sum = prom.query("tcplens_state_duration_seconds_sum{state=\"CLOSE_WAIT\"}");
    assert!(
        (sum - 3.0).abs() < 0.04,
        "sum of two 1.5 s CLOSE_WAITs: {sum}"
    );
    // Both lie in the (0.65536, 2.62144] bucket (buckets: 10 us x 4^n): Prometheus's
    // linear interpolation puts the median half way through it.
    let p50 = prom.query(&format!("histogram_quantile(0.5, sum by (le) ({cw}))"));
    assert!(
        (p50 - (0.65536 + (2.62144 - 0.65536) / 2.0)).abs() < 1e-9,
        "p50 {p50}"
    );
    let est = prom.wait_for("tcplens_sockets{state=\"ESTABLISHED\"}", |v| v == 3.0);
    assert_eq!(est, 3.0, "three held connections, server side");
    let transitions =
        prom.query("sum(tcplens_transitions_total{old=\"CLOSE_WAIT\",new=\"LAST_ACK\"})");
    assert_eq!(transitions, 2.0);
    assert_eq!(prom.query("sum(tcplens_events_lost_total)"), 0.0);
    // The two CLOSE_WAIT connections ended (outside containers: `none`), the three held
    // ones are live.
    let ended = prom.wait_for(
        "sum(tcplens_container_connections_total{container=\"none\"})",
        |v| v == 2.0,
    );
    assert_eq!(ended, 2.0);
    let live =
        prom.query("sum(tcplens_container_sockets{container=\"none\",state=\"ESTABLISHED\"})");
    assert_eq!(live, 3.0);
    assert_eq!(prom.query("sum(tcplens_connection_rtt_seconds_count)"), 2.0);
    dashboard_queries_are_valid(&prom);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcplens.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let f = tcplens.wait();
    assert!(f.status.success(), "{}", f.stderr);
}

/// Every query of the shipped Grafana dashboard is valid PromQL that Prometheus answers
/// (that each metric it names is one tcplens exports is a unit test of the metrics: a
/// family with no series, CLOSE_WAIT holders when there are none, is not in a scrape).
fn dashboard_queries_are_valid(prom: &Prometheus) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/tcplens-dashboard.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let (status, body) =
                http_get(prom.addr, &format!("/api/v1/query?query={}", encode(expr)));
            assert_eq!(status, 200, "{expr}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["status"], "success", "{expr}: {body}");
            checked += 1;
        }
    }
    assert!(checked >= 14, "{checked} queries");
}
