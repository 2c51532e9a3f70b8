//! The listen path's kernel counters (the `TcpExt` line of `/proc/net/netstat`, what
//! `nstat` shows as `TcpExt…`), per network namespace.
//!
//! `/proc/net` is the namespace of the thread group's leader; `/proc/thread-self/net` is
//! the calling thread's, so it follows the `setns` of [`sockdiag::for_each_netns`]. The
//! procfs crate (0.18) parses `/proc/net/snmp` and `snmp6` but not `netstat`: the
//! header/values line pairs are parsed here.

use std::collections::HashSet;
use std::io;

use thiserror::Error;

use super::sockdiag::{self, DiagError};

/// The calling thread's namespace's counters.
const NETSTAT: &str = "/proc/thread-self/net/netstat";

#[derive(Debug, Error)]
pub enum NetstatError {
    // The cause is in the message, not chained (see `SourceError`).
    #[error("reading {NETSTAT}: {0}")]
    Read(io::Error),
    #[error("{NETSTAT}: {0}")]
    Format(String),
    #[error("{NETSTAT} has no counter TcpExt {0} (a kernel older than tcplens supports?)")]
    Missing(&'static str),
}

/// One namespace's listen-path counters (since the namespace was made; they only grow,
/// wrapping at the kernel's `unsigned long`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetnsCounters {
    /// The namespace's inode number.
    pub netns: u32,
    /// `TcpExtListenOverflows`: a SYN or a handshake's last ACK met a full accept queue.
    pub listen_overflows: u64,
    /// `TcpExtListenDrops`: every `tcp_listendrop()` (the overflows, and requests or
    /// children that could not be made).
    pub listen_drops: u64,
    /// `TcpExtSyncookiesSent`: SYN-ACKs sent with a cookie instead of a request socket.
    pub syncookies_sent: u64,
    /// `TcpExtTCPSynRetrans`: SYN and SYN-ACK retransmissions.
    pub syn_retrans: u64,
    /// `TcpExtTCPReqQFullDrop`: SYNs dropped for a full SYN queue (syncookies off).
    pub req_q_full_drop: u64,
    /// `TcpExtTCPReqQFullDoCookies`: SYNs answered with a cookie for a full SYN queue.
    pub req_q_full_do_cookies: u64,
}

impl NetnsCounters {
    /// The counts since `then` (all of them when `None`, or when the namespace was made
    /// again under the same inode and its counters started over).
    #[must_use]
    pub fn since(&self, then: Option<&NetnsCounters>) -> NetnsCounters {
        let d = |f: fn(&NetnsCounters) -> u64| {
            let before = then.map_or(0, f);
            f(self).checked_sub(before).unwrap_or(f(self))
        };
        NetnsCounters {
            netns: self.netns,
            listen_overflows: d(|c| c.listen_overflows),
            listen_drops: d(|c| c.listen_drops),
            syncookies_sent: d(|c| c.syncookies_sent),
            syn_retrans: d(|c| c.syn_retrans),
            req_q_full_drop: d(|c| c.req_q_full_drop),
            req_q_full_do_cookies: d(|c| c.req_q_full_do_cookies),
        }
    }

    /// All counts zero.
    pub fn is_zero(&self) -> bool {
        *self
            == NetnsCounters {
                netns: self.netns,
                ..NetnsCounters::default()
            }
    }

    /// The counters in `text` (the contents of a `netstat` file) of namespace `netns`.
    pub fn parse(netns: u32, text: &str) -> Result<NetnsCounters, NetstatError> {
        let tcp_ext = section(text, "TcpExt")?;
        let get = |name: &'static str| {
            tcp_ext
                .iter()
                .find_map(|&(n, v)| (n == name).then_some(v))
                .ok_or(NetstatError::Missing(name))
        };
        Ok(NetnsCounters {
            netns,
            listen_overflows: get("ListenOverflows")?,
            listen_drops: get("ListenDrops")?,
            syncookies_sent: get("SyncookiesSent")?,
            syn_retrans: get("TCPSynRetrans")?,
            req_q_full_drop: get("TCPReqQFullDrop")?,
            req_q_full_do_cookies: get("TCPReqQFullDoCookies")?,
        })
    }

    /// The calling thread's namespace's counters (its inode `netns`).
    pub fn here(netns: u32) -> Result<NetnsCounters, NetstatError> {
        let text = std::fs::read_to_string(NETSTAT).map_err(NetstatError::Read)?;
        NetnsCounters::parse(netns, &text)
    }
}

/// The counters of section `prefix`: a line `prefix: Name1 Name2 …` followed by the line
/// `prefix: value1 value2 …`. The file's sections are such line pairs.
fn section<'a>(text: &'a str, prefix: &str) -> Result<Vec<(&'a str, u64)>, NetstatError> {
    let mut lines = text.lines();
    while let Some(header) = lines.next() {
        let Some((p, names)) = header.split_once(':') else {
            continue;
        };
        if p != prefix {
            continue;
        }
        let values = lines
            .next()
            .and_then(|l| l.split_once(':'))
            .filter(|(p2, _)| *p2 == prefix)
            .map(|(_, v)| v)
            .ok_or_else(|| NetstatError::Format(format!("no values after the {prefix} names")))?;
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if names.len() != values.len() {
            return Err(NetstatError::Format(format!(
                "{} {prefix} names but {} values",
                names.len(),
                values.len()
            )));
        }
        return names
            .into_iter()
            .zip(values)
            .map(|(n, v)| {
                v.parse::<u64>()
                    .map(|v| (n, v))
                    .map_err(|e| NetstatError::Format(format!("{prefix} {n} = {v:?}: {e}")))
            })
            .collect();
    }
    Err(NetstatError::Format(format!("no {prefix} lines")))
}

/// The counters of every network namespace (or only those in `only`), each read inside
/// it. tcplens's own namespace must answer; another that cannot be entered or read (it
/// went away, or no permission) is left out.
pub fn netns_counters(only: Option<&HashSet<u32>>) -> Result<Vec<NetnsCounters>, DiagError> {
    let mut out = Vec::new();
    sockdiag::for_each_netns(only, |ino| -> Result<(), DiagError> {
        out.push(NetnsCounters::here(ino).map_err(DiagError::Netstat)?);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real file's shape (6.18, shortened): the sections are line pairs; TcpExt is not
    /// the only one; the counters are picked by name, not position.
    const SAMPLE: &str = "\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPSynRetrans TCPReqQFullDoCookies TCPReqQFullDrop TCPTimeouts
TcpExt: 11 2 3 4 5 6 7 8
IpExt: InNoRoutes InTruncatedPkts InOctets
IpExt: 0 0 768170153
MPTcpExt: MPCapableSYNRX
MPTcpExt: 0
";

    #[test]
    fn counters_are_read_by_name() {
        let c = NetnsCounters::parse(42, SAMPLE).unwrap();
        assert_eq!(
            c,
            NetnsCounters {
                netns: 42,
                listen_overflows: 3,
                listen_drops: 4,
                syncookies_sent: 11,
                syn_retrans: 5,
                req_q_full_drop: 7,
                req_q_full_do_cookies: 6,
            }
        );
    }

    #[test]
    fn other_sections_are_read_too() {
        let ip = section(SAMPLE, "IpExt").unwrap();
        assert_eq!(
            ip,
            [
                ("InNoRoutes", 0),
                ("InTruncatedPkts", 0),
                ("InOctets", 768_170_153)
            ]
        );
        assert!(matches!(
            section(SAMPLE, "UdpExt"),
            Err(NetstatError::Format(m)) if m == "no UdpExt lines"
        ));
    }

    #[test]
    fn large_counters_fit() {
        let text = "TcpExt: ListenDrops\nTcpExt: 18446744073709551615\n";
        assert_eq!(
            section(text, "TcpExt").unwrap(),
            [("ListenDrops", u64::MAX)]
        );
    }

    #[test]
    fn malformed_files_are_errors() {
        let missing = "TcpExt: ListenOverflows ListenDrops\nTcpExt: 1 2\n";
        assert!(matches!(
            NetnsCounters::parse(1, missing),
            Err(NetstatError::Missing("SyncookiesSent"))
        ));
        for (text, why) in [
            ("TcpExt: A B\nTcpExt: 1\n", "2 TcpExt names but 1 values"),
            ("TcpExt: A B\n", "no values after the TcpExt names"),
            (
                "TcpExt: A B\nIpExt: 1 2\n",
                "no values after the TcpExt names",
            ),
            (
                "TcpExt: A\nTcpExt: -1\n",
                "TcpExt A = \"-1\": invalid digit found in string",
            ),
            ("", "no TcpExt lines"),
        ] {
            match section(text, "TcpExt") {
                Err(NetstatError::Format(m)) => assert_eq!(m, why, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    /// The real kernel: `/proc/thread-self/net` follows the thread's `setns`: a new
    /// namespace's counters are all 0. (That they are exactly the entered namespace's is
    /// checked against `nstat` in tests/listen_scenarios.rs.)
    #[test]
    fn thread_self_follows_the_threads_namespace() {
        use std::os::unix::fs::MetadataExt as _;
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare (root)");
            let netns = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino() as u32;
            let fresh = NetnsCounters::here(netns).unwrap();
            assert_eq!(
                fresh,
                NetnsCounters {
                    netns,
                    ..NetnsCounters::default()
                }
            );
        })
        .join()
        .expect("namespace thread");
    }
}
