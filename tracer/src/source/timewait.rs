//! TIME_WAIT on the source side. A closing socket lives on as a timewait socket whose timer
//! the `timer:*` programs follow (`tracer-ebpf/src/timer.rs`, which also follow request
//! sockets: `request.rs`); this module finds their layouts in the kernel's BTF, loads and
//! attaches them, and answers the host's flip checks
//! (which timewait sockets turned from FIN_WAIT2 to TIME_WAIT with no timer event). The
//! tracker joins the events to the socket's life (`tracker/timewait.rs`).

use std::collections::{HashMap, HashSet};

use aya::programs::ProgramFd;
use aya::{Btf, Ebpf};
use tracer_common::{RequestLayout, SockLayout, TimewaitLayout, tracepoint};

use super::btf::{self, KernelBtf, LayoutError};
use super::kernel::{SourceError, Tracepoint, attach as attach_one, load};
use super::sockdiag::{self, Diag, DiagError, DiagSocket};
use crate::clock::monotonic_now_ns;
use crate::model::TcpState;
use crate::tracker::{FlipCandidate, TIMEWAIT_LEN_S};

/// The timewait programs and the `timer:*` tracepoints they attach to.
const TIMEWAIT_PROGRAMS: [Tracepoint; 3] = [
    Tracepoint {
        index: tracepoint::TIMER_START,
        name: "timer_start",
        primary: "tw_timer_start",
        nested: "tw_timer_start_nested",
    },
    Tracepoint {
        index: tracepoint::TIMER_CANCEL,
        name: "timer_cancel",
        primary: "tw_timer_cancel",
        nested: "tw_timer_cancel_nested",
    },
    Tracepoint {
        index: tracepoint::TIMER_EXPIRE,
        name: "timer_expire_entry",
        primary: "tw_timer_expire_entry",
        nested: "tw_timer_expire_entry_nested",
    },
];

/// The timer handlers whose timers the programs follow: timewait sockets', requests'.
const HANDLERS: [&str; 2] = ["tw_timer_handler", "reqsk_timer_handler"];

/// The addresses of [`HANDLERS`] in /proc/kallsyms. The kernel writes that file slowly
/// (tens of ms): start-up reads it on a thread of its own while it reads the BTF.
pub(super) fn handler_addresses() -> Result<Vec<Option<u64>>, LayoutError> {
    std::fs::File::open(btf::KALLSYMS)
        .map(|f| btf::symbol_addresses(std::io::BufReader::with_capacity(1 << 16, f), &HANDLERS))
        .map_err(|e| LayoutError(format!("{}: {e}", btf::KALLSYMS)))
}

/// What the timer programs follow on this kernel: timewait sockets (`timewait`) and
/// request sockets (`requests`, see `request.rs`), each as wanted and as the kernel shows
/// them (what it does not is said once), with their layouts from the BTF and the handlers'
/// addresses (`found`, from [`handler_addresses`]). `None`: neither, and the timer
/// programs stay unattached.
pub(super) fn layouts(
    kernel_btf: &KernelBtf,
    sock: &SockLayout,
    found: &Result<Vec<Option<u64>>, LayoutError>,
    timewait: bool,
    requests: bool,
) -> Option<(TimewaitLayout, RequestLayout)> {
    let handler = |i: usize| match found {
        Ok(addrs) => addrs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| btf::missing_symbol(HANDLERS[i])),
        Err(e) => Err(e.clone()),
    };
    let tw = handler(0).and_then(|h| layout_from(kernel_btf, h));
    let mut tw_layout = match tw {
        Ok(layout) => layout,
        Err(why) => {
            log::warn!("TIME_WAIT and request tracking unavailable ({why}); running without them");
            return None;
        }
    };
    let request = if requests {
        match handler(1).and_then(|h| super::request::layout_from(kernel_btf, h, sock)) {
            Ok(layout) => layout,
            Err(why) => {
                log::warn!("request (SYN queue) tracking unavailable ({why}); running without it");
                RequestLayout::EMPTY
            }
        }
    } else {
        RequestLayout::EMPTY
    };
    if !timewait {
        // The timer's offsets stay: the request path reads them.
        tw_layout.handler = 0;
    }
    (tw_layout.handler != 0 || request.handler != 0).then_some((tw_layout, request))
}

/// The timewait programs' layout, with `tw_timer_handler`'s address.
pub(super) fn layout_from(btf: &KernelBtf, handler: u64) -> Result<TimewaitLayout, LayoutError> {
    let tw = "inet_timewait_sock";
    let tw_substate = btf.offset(tw, &["tw_substate"], 1..=1)?;
    let tw_sport = btf.offset(tw, &["tw_sport"], 2..=2)?;
    Ok(TimewaitLayout {
        handler,
        timer_function: btf.offset("timer_list", &["function"], 8..=8)?,
        timer_expires: btf.offset("timer_list", &["expires"], 8..=8)?,
        tw_timer: btf.offset(tw, &["tw_timer"], 40..=64)?,
        tw_substate,
        sock: btf.sock_layout(
            tw,
            "__tw_common",
            (tw, &["tw_sport"]),
            &[(tw_substate, 1), (tw_sport, 2)],
        )?,
    })
}

/// Loads the timer programs, then attaches them: a verifier refusal leaves none attached.
/// (Should an attach fail after another succeeded, `timewait` is off and the reader ignores
/// the timewait events.)
pub(super) fn attach(ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<(u32, ProgramFd)>, SourceError> {
    let fds = TIMEWAIT_PROGRAMS
        .into_iter()
        .map(|tp| Ok((tp.index, load(ebpf, btf, tp)?)))
        .collect::<Result<Vec<_>, SourceError>>()?;
    for tp in TIMEWAIT_PROGRAMS {
        attach_one(ebpf, tp, "attaching to a timer tracepoint")?;
    }
    Ok(fds)
}

/// Past this many turned sockets in one namespace, one TIME_WAIT dump replaces the
/// lookups.
const LOOKUPS_MAX: usize = 2_000;

/// Timewait sockets (cookies) that turned TIME_WAIT, with when (`None`: not known).
pub type Turned = Vec<(u64, Option<u64>)>;

/// When a timewait socket sock_diag shows in TIME_WAIT at `seen_ns` entered it: its timer
/// was set to `TCP_TIMEWAIT_LEN` then (within a jiffy).
pub fn turned_at(s: &DiagSocket, seen_ns: u64) -> Option<u64> {
    if s.state != TcpState::TimeWait {
        return None;
    }
    let left_ns = u64::from(s.tw_expires_ms?) * 1_000_000;
    (seen_ns + left_ns).checked_sub(TIMEWAIT_LEN_S * 1_000_000_000)
}

/// Which candidates turned TIME_WAIT, and when; with the time the check began.
pub(super) fn flips(candidates: &[FlipCandidate]) -> Result<(u64, Turned), DiagError> {
    let from_ns = monotonic_now_ns();
    let mut by_ns: HashMap<u32, Vec<&FlipCandidate>> = HashMap::new();
    for c in candidates {
        by_ns.entry(c.netns).or_default().push(c);
    }
    let only: HashSet<u32> = by_ns.keys().copied().collect();
    let mut turned = Vec::new();
    sockdiag::for_each_netns(Some(&only), |netns| {
        let mut diag = Diag::here(netns)?;
        let still: HashSet<u64> = diag
            .dump(&[TcpState::FinWait2])?
            .iter()
            .map(|s| s.id.cookie)
            .collect();
        let gone_from_fin_wait2: Vec<&&FlipCandidate> = by_ns[&netns]
            .iter()
            .filter(|c| !still.contains(&c.cookie))
            .collect();
        if gone_from_fin_wait2.len() > LOOKUPS_MAX {
            let t0 = monotonic_now_ns();
            let tw: HashMap<u64, DiagSocket> = diag
                .dump(&[TcpState::TimeWait])?
                .into_iter()
                .map(|s| (s.id.cookie, s))
                .collect();
            let seen = t0 / 2 + monotonic_now_ns() / 2;
            for c in gone_from_fin_wait2 {
                if let Some(s) = tw.get(&c.cookie) {
                    turned.push((c.cookie, turned_at(s, seen)));
                }
            }
            return Ok(());
        }
        for c in gone_from_fin_wait2 {
            let seen = monotonic_now_ns();
            let tuple = (c.saddr, c.sport, c.daddr, c.dport);
            if let Some(s) = diag.lookup(c.family, tuple, c.cookie)?
                && s.state == TcpState::TimeWait
            {
                turned.push((c.cookie, turned_at(&s, seen)));
            }
        }
        Ok(())
    })?;
    Ok((from_ns, turned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, SocketId};

    fn tw(state: TcpState, left_ms: Option<u32>) -> DiagSocket {
        let here = "127.0.0.1".parse().unwrap();
        DiagSocket {
            id: SocketId {
                family: Family::Ipv4,
                saddr: here,
                sport: 1,
                daddr: here,
                dport: 2,
                netns: 1,
                cookie: 9,
            },
            state,
            inode: 0,
            uid: 0,
            cgroup: 0,
            tw_expires_ms: left_ms,
        }
    }

    #[test]
    fn the_turn_is_placed_from_the_timer() {
        // Seen at 100 s with 59.5 s left of its 60: it turned at 99.5 s.
        let s = 1_000_000_000;
        assert_eq!(
            turned_at(&tw(TcpState::TimeWait, Some(59_500)), 100 * s),
            Some(99 * s + s / 2)
        );
        assert_eq!(
            turned_at(&tw(TcpState::FinWait2, Some(59_500)), 100 * s),
            None
        );
        assert_eq!(turned_at(&tw(TcpState::TimeWait, None), 100 * s), None);
    }
}
