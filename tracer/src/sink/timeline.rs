//! `timeline`: one record per socket when its life ends (or at exit, still open).

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::SocketAddr;

use serde::Serialize;

use super::{Format, JsonCgroup, JsonFacts, Sink, View, cgroup_label, human_ns};
use crate::clock::TimeFormatter;
use crate::source::cgroup::CgroupNames;
use crate::tracker::SocketLife;

pub struct TimelineSink<W: Write> {
    out: W,
    format: Format,
    times: TimeFormatter,
    names: CgroupNames,
    line: String,
    pub printed: u64,
}

#[derive(Serialize)]
struct JsonState {
    state: &'static str,
    time: Option<String>,
    ns: Option<u64>,
}

#[derive(Serialize)]
struct JsonLife<'a> {
    sk: String,
    #[serde(flatten)]
    id: super::JsonId,
    owner_pid: Option<u32>,
    owner_comm: Option<std::borrow::Cow<'a, str>>,
    #[serde(flatten)]
    cgroup: JsonCgroup<'a>,
    role: &'static str,
    first_seen_mid_life: bool,
    existed_at_start: bool,
    states: Vec<JsonState>,
    end: &'static str,
    lifetime_ns: Option<u64>,
    /// The connection's counters at its last transition (see `model::ConnFacts`).
    #[serde(flatten)]
    facts: JsonFacts,
}

impl<W: Write> TimelineSink<W> {
    /// `names`: how cgroup ids are named (the host's cgroups live; none on replay).
    pub fn new(out: W, format: Format, times: TimeFormatter, names: CgroupNames) -> Self {
        TimelineSink {
            out,
            format,
            times,
            names,
            line: String::with_capacity(512),
            printed: 0,
        }
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    fn json(&mut self, life: &SocketLife) -> io::Result<()> {
        let states = life
            .spans
            .iter()
            .map(|s| JsonState {
                state: s.state.name(),
                time: s.entered_ns.map(|ns| {
                    let mut t = String::with_capacity(32);
                    self.times.rfc3339(ns, &mut t);
                    t
                }),
                ns: s.ns,
            })
            .collect();
        let rec = JsonLife {
            sk: format!("0x{:016x}", life.sk),
            id: (&life.id).into(),
            owner_pid: life.owner.map(|o| o.pid),
            owner_comm: life.owner.as_ref().map(|o| o.comm.to_str_lossy()),
            cgroup: JsonCgroup::new(life.cgroup, self.names.get(life.cgroup)),
            role: life.role.name(),
            first_seen_mid_life: life.first_seen_mid_life,
            existed_at_start: life.existed_at_start,
            states,
            end: life.end.name(),
            lifetime_ns: life.lifetime_ns,
            facts: life.facts.into(),
        };
        serde_json::to_writer(&mut self.out, &rec).map_err(io::Error::other)?;
        self.out.write_all(b"\n")
    }

    /// `22:10:02.123 127.0.0.1:59682 > 127.0.0.1:7794 netns 4026531840 active python3[13212] cgroup /user.slice closed, lifetime 1.110ms`
    /// `    SYN_SENT 90ns > ESTABLISHED 1.000us > … > CLOSE`
    /// `    acked 100002 B, received 5001 B, rtt 39.0us (min 22.0us), 0 retransmitted`
    fn text(&mut self, life: &SocketLife) -> io::Result<()> {
        let line = &mut self.line;
        line.clear();
        let start = life.spans.iter().find_map(|s| s.entered_ns);
        match start {
            Some(ns) => self.times.time_of_day(ns, line),
            None => line.push_str("?           "),
        }
        let _ = write!(
            line,
            " {} > {}",
            SocketAddr::new(life.id.saddr, life.id.sport),
            SocketAddr::new(life.id.daddr, life.id.dport),
        );
        if life.id.netns != 0 {
            let _ = write!(line, " netns {}", life.id.netns);
        }
        let _ = write!(line, " {}", life.role.name());
        match &life.owner {
            Some(o) => {
                let _ = write!(line, " {}[{}]", o.comm, o.pid);
            }
            None => line.push_str(" owner?"),
        }
        if life.cgroup != 0 {
            let label = cgroup_label(life.cgroup, self.names.get(life.cgroup));
            let _ = write!(line, " cgroup {label}");
        }
        if life.existed_at_start {
            line.push_str(" (existed at start)");
        }
        let _ = write!(line, " {}", life.end.name());
        match life.lifetime_ns {
            Some(ns) => {
                let _ = write!(line, ", lifetime {}", human_ns(ns));
            }
            None => line.push_str(", lifetime ?"),
        }
        line.push_str("\n   ");
        for (i, s) in life.spans.iter().enumerate() {
            if i > 0 {
                line.push_str(" >");
            }
            let _ = write!(line, " {}", s.state);
            let last = i + 1 == life.spans.len();
            match s.ns {
                Some(ns) => {
                    let _ = write!(line, " {}", human_ns(ns));
                }
                None if !last => line.push_str(" ?"),
                None => {}
            }
        }
        if let Some(f) = life.facts {
            let _ = write!(
                line,
                "\n    acked {} B, received {} B, rtt {}",
                f.bytes_acked,
                f.bytes_received,
                human_ns(u64::from(f.srtt_us) * 1_000)
            );
            if let Some(min) = f.min_rtt_us {
                let _ = write!(line, " (min {})", human_ns(u64::from(min) * 1_000));
            }
            let _ = write!(line, ", {} retransmitted", f.retrans);
        }
        line.push('\n');
        self.out.write_all(line.as_bytes())
    }
}

impl<W: Write> Sink for TimelineSink<W> {
    fn life_ended(&mut self, life: &SocketLife) -> io::Result<()> {
        self.printed += 1;
        match self.format {
            Format::Json => self.json(life),
            Format::Text => self.text(life),
        }
    }

    fn batch_done(&mut self, _: &View<'_>) -> io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self, _: u64, _: &View<'_>) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::WallClock;
    use crate::model::{Comm, TcpState};
    use crate::tracker::Tracker;
    use crate::tracker::tests::tr;
    use jiff::tz::TimeZone;

    fn life() -> SocketLife {
        use TcpState::*;
        let mut t = Tracker::default();
        let mut ended = Vec::new();
        for (i, e) in [
            tr(
                0xffff_8881_02cf_b780,
                431_492_173_553,
                Close,
                SynSent,
                13212,
            ),
            tr(
                0xffff_8881_02cf_b780,
                431_492_263_553,
                SynSent,
                Established,
                1,
            ),
            tr(
                0xffff_8881_02cf_b780,
                431_792_263_553,
                Established,
                FinWait1,
                13212,
            ),
            tr(
                0xffff_8881_02cf_b780,
                431_792_285_553,
                FinWait1,
                FinWait2,
                1,
            ),
            tr(0xffff_8881_02cf_b780, 431_792_291_553, FinWait2, Close, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let mut e = e;
            e.cgroup = 7001;
            if i == 4 {
                // The client of the README: 100000 bytes out (+ SYN + FIN), 5000 back
                // (+ the peer's FIN).
                e.facts = Some(crate::model::ConnFacts {
                    bytes_acked: 100_002,
                    bytes_received: 5_001,
                    srtt_us: 39,
                    min_rtt_us: Some(22),
                    retrans: 0,
                });
            }
            t.observe(&e, &mut ended);
        }
        let mut life = ended.remove(0);
        life.id.cookie = 4242;
        if let Some(o) = life.owner.as_mut() {
            o.comm = Comm::from_name("python3");
        }
        life
    }

    fn sink(format: Format) -> TimelineSink<Vec<u8>> {
        let clock = WallClock {
            boot_offset_ns: 1_795_299_002_123_456_789 - 431_492_173_553,
        };
        TimelineSink::new(
            Vec::new(),
            format,
            TimeFormatter::new(clock, TimeZone::UTC),
            CgroupNames::known([(7001, "/user.slice/user-1000.slice/session-4.scope")]),
        )
    }

    #[test]
    fn json_is_the_design_contract() {
        let mut s = sink(Format::Json);
        s.life_ended(&life()).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(
            out,
            concat!(
                r#"{"sk":"0xffff888102cfb780","cookie":4242,"netns":4026531840,"#,
                r#""family":"ipv4","saddr":"127.0.0.1","sport":40000,"#,
                r#""daddr":"127.0.0.1","dport":8080,"owner_pid":13212,"owner_comm":"python3","#,
                r#""cgroup_id":7001,"cgroup":"/user.slice/user-1000.slice/session-4.scope","#,
                r#""container":null,"runtime":null,"pod_uid":null,"#,
                r#""role":"active","first_seen_mid_life":false,"existed_at_start":false,"states":["#,
                r#"{"state":"SYN_SENT","time":"2026-11-21T22:10:02.123456789Z","ns":90000},"#,
                r#"{"state":"ESTABLISHED","time":"2026-11-21T22:10:02.123546789Z","ns":300000000},"#,
                r#"{"state":"FIN_WAIT1","time":"2026-11-21T22:10:02.423546789Z","ns":22000},"#,
                r#"{"state":"FIN_WAIT2","time":"2026-11-21T22:10:02.423568789Z","ns":6000},"#,
                r#"{"state":"CLOSE","time":"2026-11-21T22:10:02.423574789Z","ns":null}],"#,
                r#""end":"closed","lifetime_ns":300118000,"#,
                r#""bytes_acked":100002,"bytes_received":5001,"srtt_us":39,"min_rtt_us":22,"retrans":0}"#,
                "\n"
            )
        );
    }

    #[test]
    fn text_block() {
        let mut s = sink(Format::Text);
        s.life_ended(&life()).unwrap();
        let out = String::from_utf8(s.into_inner()).unwrap();
        assert_eq!(
            out,
            "22:10:02.123 127.0.0.1:40000 > 127.0.0.1:8080 netns 4026531840 active python3[13212] \
             cgroup /user.slice/user-1000.slice/session-4.scope closed, lifetime 300.118ms\n    \
             SYN_SENT 90.0us > ESTABLISHED 300.000ms > FIN_WAIT1 22.0us > FIN_WAIT2 6.0us > CLOSE\n    \
             acked 100002 B, received 5001 B, rtt 39.0us (min 22.0us), 0 retransmitted\n"
        );
    }
}
