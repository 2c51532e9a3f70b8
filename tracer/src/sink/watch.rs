//! `tcplens watch`: one line per transition, as text columns (the tcpstates view) or JSON.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::IpAddr;

use serde::Serialize;

use super::{Format, JsonCgroup, Sink, View, cgroup_label, escaped};
use crate::clock::TimeFormatter;
use crate::model::{Transition, Via};
use crate::source::cgroup::{CgroupName, CgroupNames};
use crate::tracker::Observed;

/// Prints transitions to `out`. Lines are built in a reused buffer; flushing is the
/// caller's choice (per batch, or per line on a terminal).
pub struct WatchPrinter<W: Write> {
    out: W,
    format: Format,
    times: TimeFormatter,
    names: CgroupNames,
    line: String,
    scratch: String,
    /// The cgroup of the last line, named and labelled once: a host's sockets come from
    /// few cgroups, and a known cgroup's name does not change.
    cgroup: LastCgroup,
}

#[derive(Default)]
struct LastCgroup {
    id: u64,
    name: Option<CgroupName>,
    label: String,
    /// Named, or id 0 (none): an unknown id may be named by a later walk of the
    /// hierarchy, so it is looked up again.
    settled: bool,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    ts_ns: u64,
    sk: &'a str,
    #[serde(flatten)]
    id: super::JsonId,
    old: &'static str,
    new: &'static str,
    old_ns: Option<u64>,
    /// The task on the CPU; `null` for a transition no event showed (sock_diag did).
    pid: Option<u32>,
    comm: Option<&'a str>,
    /// The socket's owner: its listener's for an accepted socket, until its own process
    /// context shows one.
    owner_pid: Option<u32>,
    owner_comm: Option<&'a str>,
    #[serde(flatten)]
    cgroup: JsonCgroup<'a>,
    /// `tracepoint`, or `timewait` for a transition derived from a timewait socket.
    via: &'static str,
}

/// CPU-TASK is the task on the CPU when the kernel reported the transition (in softirq,
/// often another process); OWNER is the socket's process.
pub const TEXT_HEADER: &str = "TIME         CPU-TASK                OWNER                   LADDR:LPORT                RADDR:RPORT                OLD          -> NEW          MS        CGROUP";

impl<W: Write> WatchPrinter<W> {
    /// `names`: how cgroup ids are named (the host's cgroups live; none on replay).
    pub fn new(out: W, format: Format, times: TimeFormatter, names: CgroupNames) -> Self {
        WatchPrinter {
            out,
            format,
            times,
            names,
            line: String::with_capacity(256),
            scratch: String::with_capacity(64),
            cgroup: LastCgroup::default(),
        }
    }

    /// The column header (text format only).
    pub fn header(&mut self) -> io::Result<()> {
        if self.format == Format::Text {
            writeln!(self.out, "{TEXT_HEADER}")?;
        }
        Ok(())
    }

    pub fn transition(&mut self, t: &Transition, o: &Observed) -> io::Result<()> {
        match self.format {
            Format::Text => {
                self.line.clear();
                self.text(t, o);
                self.line.push('\n');
                self.out.write_all(self.line.as_bytes())
            }
            Format::Json => self.json(t, o),
        }
    }

    /// Names and labels cgroup `id` in [`WatchPrinter::cgroup`], unless it is there.
    fn name_cgroup(&mut self, id: u64) {
        let last = &mut self.cgroup;
        if last.settled && last.id == id {
            return;
        }
        last.name = self.names.get(id).cloned();
        last.label = cgroup_label(id, last.name.as_ref());
        last.id = id;
        last.settled = last.name.is_some() || id == 0;
    }

    fn text(&mut self, t: &Transition, o: &Observed) {
        self.name_cgroup(t.cgroup);
        let line = &mut self.line;
        self.times.time_of_day(t.ts_ns, line);
        // Columns are written piece by piece and padded with spaces after: no format
        // machinery per field (this runs for every transition).
        let mut int = itoa::Buffer::new();
        let task = t.task.is_known().then_some((t.task.pid, t.task.comm));
        let owner = o.owner.map(|o| (o.pid, o.comm));
        for who in [task, owner] {
            let start = line.len();
            line.push(' ');
            match who {
                Some((pid, comm)) => {
                    line.push_str(int.format(pid));
                    line.push('/');
                    line.push_str(&escaped(&comm.to_str_lossy()));
                }
                None => line.push('-'),
            }
            pad(line, start, 24);
        }
        for (ip, port) in [(t.id.saddr, t.id.sport), (t.id.daddr, t.id.dport)] {
            line.push(' ');
            let start = line.len();
            match ip {
                IpAddr::V4(v4) => {
                    for (i, octet) in v4.octets().into_iter().enumerate() {
                        if i > 0 {
                            line.push('.');
                        }
                        line.push_str(int.format(octet));
                    }
                }
                IpAddr::V6(v6) => {
                    let _ = write!(line, "[{v6}]");
                }
            }
            line.push(':');
            line.push_str(int.format(port));
            pad(line, start, 26);
        }
        for (i, state) in [t.old, t.new].into_iter().enumerate() {
            line.push_str(if i == 0 { " " } else { " -> " });
            let start = line.len();
            line.push_str(state.name());
            pad(line, start, 12);
        }
        line.push(' ');
        let start = line.len();
        match o.old_ns {
            // Milliseconds to the microsecond, rounded half up.
            Some(ns) => {
                let us = ns.saturating_add(500) / 1000;
                line.push_str(int.format(us / 1000));
                line.push('.');
                let frac = us % 1000;
                line.push_str(&"00"[..usize::from(frac < 100) + usize::from(frac < 10)]);
                line.push_str(int.format(frac));
            }
            None => line.push('-'),
        }
        pad(line, start, 9);
        line.push(' ');
        line.push_str(&self.cgroup.label);
        if t.via == Via::Timewait {
            line.push_str(" (timewait)");
        }
    }

    fn json(&mut self, t: &Transition, o: &Observed) -> io::Result<()> {
        self.name_cgroup(t.cgroup);
        self.scratch.clear();
        self.times.rfc3339(t.ts_ns, &mut self.scratch);
        let time_end = self.scratch.len();
        let _ = write!(self.scratch, "0x{:016x}", t.sk);
        let (time, sk) = self.scratch.split_at(time_end);
        let comm = t.task.comm.to_str_lossy();
        let owner_comm = o.owner.as_ref().map(|o| o.comm.to_str_lossy());
        let rec = JsonLine {
            time,
            ts_ns: t.ts_ns,
            sk,
            id: (&t.id).into(),
            old: t.old.name(),
            new: t.new.name(),
            old_ns: o.old_ns,
            pid: t.task.is_known().then_some(t.task.pid),
            comm: t.task.is_known().then_some(&*comm),
            owner_pid: o.owner.map(|o| o.pid),
            owner_comm: owner_comm.as_deref(),
            cgroup: JsonCgroup::new(t.cgroup, self.cgroup.name.as_ref()),
            via: t.via.name(),
        };
        // Straight into the output buffer: no intermediate line to re-validate.
        serde_json::to_writer(&mut self.out, &rec).map_err(io::Error::other)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Pads what was written to `line` since `start` with spaces to `width` characters.
fn pad(line: &mut String, start: usize, width: usize) {
    const SPACES: &str = "                                ";
    let written = &line[start..];
    let chars = if written.is_ascii() {
        written.len()
    } else {
        written.chars().count()
    };
    let missing = width.saturating_sub(chars);
    for _ in 0..missing / SPACES.len() {
        line.push_str(SPACES);
    }
    line.push_str(&SPACES[..missing % SPACES.len()]);
}

/// `watch`: every transition, flushed per batch (per line on a terminal).
pub struct WatchSink<W: Write> {
    pub printer: WatchPrinter<W>,
    pub line_flush: bool,
}

impl<W: Write> Sink for WatchSink<W> {
    fn started(&mut self, _start_ns: Option<u64>) -> io::Result<()> {
        self.printer.header()?;
        self.printer.flush()
    }

    fn transition(&mut self, t: &Transition, o: &Observed) -> io::Result<()> {
        self.printer.transition(t, o)?;
        if self.line_flush {
            self.printer.flush()?;
        }
        Ok(())
    }

    fn batch_done(&mut self, _: &View<'_>) -> io::Result<()> {
        self.printer.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::WallClock;
    use crate::model::{Comm, Family, SocketId, Task, TcpState};
    use crate::tracker::Owner;
    use jiff::tz::TimeZone;
    use std::net::IpAddr;

    fn printer(format: Format) -> WatchPrinter<Vec<u8>> {
        // Monotonic 431.492173553 s is 2026-11-21T22:10:02.123456789Z.
        let clock = WallClock {
            boot_offset_ns: 1_795_299_002_123_456_789 - 431_492_173_553,
        };
        let names = CgroupNames::known([(
            7001,
            "/system.slice/docker-2a55517bd2c9f85d2e1911cb4cd0840a4aa299513af411fb437c0661dd88d11b.scope",
        )]);
        WatchPrinter::new(
            Vec::new(),
            format,
            TimeFormatter::new(clock, TimeZone::UTC),
            names,
        )
    }

    fn sample(family: Family) -> Transition {
        let (s, d): (IpAddr, IpAddr) = match family {
            Family::Ipv4 => ("127.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()),
            Family::Ipv6 => ("::1".parse().unwrap(), "2001:db8::2".parse().unwrap()),
        };
        Transition {
            ts_ns: 431_492_173_553,
            sk: 0xffff_8881_02cf_b780,
            id: SocketId {
                cookie: 4242,
                netns: 4_026_531_840,
                family,
                saddr: s,
                sport: 59682,
                daddr: d,
                dport: 7794,
            },
            old: TcpState::SynSent,
            new: TcpState::Established,
            task: Task {
                pid: 13212,
                tid: 13213,
                comm: Comm::from_name("python3"),
            },
            via: Via::Tracepoint,
            cpu: Some(0),
            jiffies: 0,
            cgroup: 7001,
            facts: None,
        }
    }

    fn owned(old_ns: Option<u64>) -> Observed {
        Observed {
            old_ns,
            owner: Some(Owner {
                pid: 13212,
                comm: Comm::from_name("python3"),
            }),
            sport: 59682,
            dport: 7794,
            hidden: false,
            role: crate::tracker::Role::Active,
            syn_ns: None,
        }
    }

    fn output(p: WatchPrinter<Vec<u8>>) -> String {
        String::from_utf8(p.into_inner()).expect("utf-8")
    }

    #[test]
    fn json_line_is_the_design_contract() {
        let mut p = printer(Format::Json);
        p.header().unwrap();
        p.transition(&sample(Family::Ipv4), &owned(Some(90_000)))
            .unwrap();
        assert_eq!(
            output(p),
            concat!(
                r#"{"time":"2026-11-21T22:10:02.123456789Z","ts_ns":431492173553,"sk":"0xffff888102cfb780","#,
                r#""cookie":4242,"netns":4026531840,"#,
                r#""family":"ipv4","saddr":"127.0.0.1","sport":59682,"daddr":"127.0.0.1","dport":7794,"#,
                r#""old":"SYN_SENT","new":"ESTABLISHED","old_ns":90000,"#,
                r#""pid":13212,"comm":"python3","owner_pid":13212,"owner_comm":"python3","#,
                r#""cgroup_id":7001,"#,
                r#""cgroup":"/system.slice/docker-2a55517bd2c9f85d2e1911cb4cd0840a4aa299513af411fb437c0661dd88d11b.scope","#,
                r#""container":"2a55517bd2c9f85d2e1911cb4cd0840a4aa299513af411fb437c0661dd88d11b","#,
                r#""runtime":"docker","pod_uid":null,"via":"tracepoint"}"#,
                "\n"
            )
        );
    }

    #[test]
    fn json_unknowns_are_null() {
        let mut p = printer(Format::Json);
        let o = Observed {
            old_ns: None,
            owner: None,
            sport: 59682,
            dport: 7794,
            hidden: false,
            role: crate::tracker::Role::Active,
            syn_ns: None,
        };
        p.transition(&sample(Family::Ipv6), &o).unwrap();
        let v: serde_json::Value = serde_json::from_str(output(p).trim()).unwrap();
        assert_eq!(v["family"], "ipv6");
        assert_eq!(v["saddr"], "::1");
        assert_eq!(v["daddr"], "2001:db8::2");
        assert!(v["old_ns"].is_null());
        assert!(v["owner_pid"].is_null());
        assert!(v["owner_comm"].is_null());
        // A cgroup tcplens cannot name (removed, or a recording's): the id alone.
        let mut t = sample(Family::Ipv4);
        t.cgroup = 99;
        let mut p = printer(Format::Json);
        p.transition(&t, &o).unwrap();
        let v: serde_json::Value = serde_json::from_str(output(p).trim()).unwrap();
        assert_eq!(v["cgroup_id"], 99);
        assert!(v["cgroup"].is_null() && v["container"].is_null() && v["pod_uid"].is_null());
        let mut p = printer(Format::Text);
        p.transition(&t, &o).unwrap();
        assert!(output(p).trim_end().ends_with(" cgroup:99"));
    }

    #[test]
    fn a_transition_no_event_showed_has_no_task() {
        let mut t = sample(Family::Ipv4);
        t.task = Task {
            pid: 0,
            tid: 0,
            comm: Comm::EMPTY,
        };
        let mut p = printer(Format::Json);
        p.transition(&t, &owned(None)).unwrap();
        let v: serde_json::Value = serde_json::from_str(output(p).trim()).unwrap();
        assert!(v["pid"].is_null() && v["comm"].is_null(), "{v}");
        assert_eq!(v["owner_pid"], 13212, "the owner is still known");
        let mut p = printer(Format::Text);
        p.transition(&t, &owned(None)).unwrap();
        assert!(
            output(p).starts_with(
                "22:10:02.123 -                       13212/python3           127.0.0.1"
            )
        );
    }

    #[test]
    fn text_columns() {
        let mut p = printer(Format::Text);
        p.header().unwrap();
        p.transition(&sample(Family::Ipv4), &owned(Some(90_000)))
            .unwrap();
        p.transition(&sample(Family::Ipv6), &owned(None)).unwrap();
        let out = output(p);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], TEXT_HEADER);
        assert_eq!(
            lines[1],
            "22:10:02.123 13212/python3           13212/python3           127.0.0.1:59682            127.0.0.1:7794             SYN_SENT     -> ESTABLISHED  0.090     docker:2a55517bd2c9"
        );
        assert_eq!(
            lines[2],
            "22:10:02.123 13212/python3           13212/python3           [::1]:59682                [2001:db8::2]:7794         SYN_SENT     -> ESTABLISHED  -         docker:2a55517bd2c9"
        );
        // The header's columns line up with the data.
        assert_eq!(lines[0].find("LADDR"), lines[1].find("127.0.0.1:59682"));
        assert_eq!(lines[0].find("OLD"), lines[1].find("SYN_SENT"));
        assert_eq!(lines[0].find("MS"), lines[1].find("0.090"));
        assert_eq!(lines[0].find("CPU-TASK"), lines[1].find("13212/python3"));
        assert_eq!(lines[0].find("OWNER"), lines[1].rfind("13212/python3"));
        assert_eq!(lines[0].find("CGROUP"), lines[1].find("docker:"));
    }
}
