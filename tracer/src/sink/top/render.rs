//! `top`'s screen: a pure function of what a refresh computed and the keys' state, drawn
//! into a ratatui frame (a terminal, or a test buffer).

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize as _};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row as TableRow, Sparkline, Table, TableState};

use std::net::{IpAddr, SocketAddr};

use super::model::{DECADES, Detail, Refresh, Row, SHOWN, ViewKind};
use super::ui::{COLUMNS, Column, Ui};
use crate::model::TcpState;
use crate::sink::escaped;

/// What one frame shows.
pub struct Screen<'a> {
    /// `live`, or the replay's file and pace.
    pub mode: &'a str,
    pub refresh: &'a Refresh,
    pub ui: &'a Ui,
    /// The selected row's detail, when a row is selected.
    pub detail: Option<&'a Detail>,
}

/// The order columns give way in when the terminal is narrow: the sorted one is always
/// shown, then these first.
const PRIORITY: [Column; 16] = [
    Column::Id,
    Column::Name,
    Column::Total,
    Column::State(TcpState::CloseWait),
    Column::State(TcpState::Established),
    Column::State(TcpState::TimeWait),
    Column::OldestCloseWait,
    Column::Connects,
    Column::Accepts,
    Column::State(TcpState::Listen),
    Column::State(TcpState::SynSent),
    Column::State(TcpState::SynRecv),
    Column::State(TcpState::FinWait1),
    Column::State(TcpState::FinWait2),
    Column::State(TcpState::LastAck),
    Column::State(TcpState::Closing),
];

const NAME_WIDTH: u16 = 16;

fn width(c: Column, view: ViewKind) -> u16 {
    match c {
        Column::Id | Column::OldestCloseWait => 10,
        Column::Name => NAME_WIDTH,
        c => (c.title(view).len() as u16 + 1).max(7),
    }
}

/// TIME_WAIT and CLOSE_WAIT stand out: they are what users come for.
fn state_style(s: TcpState) -> Style {
    match s {
        TcpState::TimeWait => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        TcpState::CloseWait => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        _ => Style::new(),
    }
}

pub fn draw(f: &mut Frame<'_>, s: &Screen<'_>) {
    // The panes below the table give it room on short terminals.
    let bottom_height = (f.area().height.saturating_sub(8) / 2).clamp(5, 10);
    let [title, header, table, bottom, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(6),
        Constraint::Min(4),
        Constraint::Length(bottom_height),
        Constraint::Length(1),
    ])
    .areas(f.area());
    draw_title(f, title, s);
    draw_header(f, header, s.refresh);
    let visible = s.ui.visible(&s.refresh.rows);
    let selected = s.ui.selected_index(&visible);
    draw_table(f, table, s.ui, &visible, selected);
    let [detail, leaks] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(bottom);
    let name = selected.map(|i| visible[i]);
    draw_detail(f, detail, name, s.detail, s.ui.view);
    draw_leaks(f, leaks, s.refresh, s.ui.replay);
    draw_footer(f, footer, s.ui);
}

fn draw_title(f: &mut Frame<'_>, area: Rect, s: &Screen<'_>) {
    let r = s.refresh;
    let lost = if r.lost > 0 {
        Span::styled(
            format!("{} lost", r.lost),
            Style::new().fg(Color::Red).bold(),
        )
    } else {
        Span::raw("0 lost")
    };
    let line = Line::from(vec![
        Span::styled(" tcplens top ", Style::new().reversed().bold()),
        Span::raw(format!(
            " {} | {} | {:.0} transitions/s | {:.0} new connections/s | ",
            s.mode, r.clock, r.transitions_per_s, r.new_per_s
        )),
        lost,
        Span::raw(format!(" | by {}", s.ui.view.name())),
    ]);
    f.render_widget(Paragraph::new(line), area);
}

/// Sockets per state now, each with its history as a sparkline: two columns of five.
fn draw_header(f: &mut Frame<'_>, area: Rect, r: &Refresh) {
    let block = Block::new()
        .title(" sockets per state now, and over the last minutes ")
        .title_style(Style::new().dim());
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(inner);
    for (i, state) in SHOWN.into_iter().enumerate() {
        let column = if i < 5 { left } else { right };
        let y = column.y + (i % 5) as u16;
        if y >= column.bottom() {
            continue;
        }
        let line = Rect::new(column.x, y, column.width, 1);
        let [label, spark] =
            Layout::horizontal([Constraint::Length(21), Constraint::Fill(1)]).areas(line);
        let count = r.states_now[state as usize];
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(format!(" {:<12}", state.name()), state_style(state)),
                Span::styled(format!("{count:>7} "), state_style(state)),
            ])),
            label,
        );
        let points = usize::from(spark.width.saturating_sub(1));
        let data: Vec<u64> = r
            .history
            .iter()
            .skip(r.history.len().saturating_sub(points))
            .map(|c| c[state as usize])
            .collect();
        let colour = match state {
            TcpState::TimeWait => Color::Yellow,
            TcpState::CloseWait => Color::Red,
            _ => Color::Cyan,
        };
        // A flat history still draws: the bars are scaled to at least 1.
        let max = data.iter().copied().max().unwrap_or(0).max(1);
        f.render_widget(
            Sparkline::default()
                .data(&data)
                .max(max)
                .style(Style::new().fg(colour)),
            spark,
        );
    }
}

/// The columns that fit in `room`, in table order: the sorted one and then [`PRIORITY`].
fn fitting(ui: &Ui, room: u16) -> Vec<Column> {
    let mut chosen: Vec<Column> = Vec::new();
    let mut used = 0;
    let sorted = ui.sort_column();
    for c in std::iter::once(sorted).chain(PRIORITY) {
        if chosen.contains(&c) {
            continue;
        }
        let w = width(c, ui.view) + 1;
        if used + w > room && !chosen.is_empty() {
            continue;
        }
        used += w;
        chosen.push(c);
    }
    COLUMNS.into_iter().filter(|c| chosen.contains(c)).collect()
}

fn cell(c: Column, r: &Row) -> Cell<'static> {
    let number = |n: u64, state: Option<TcpState>| {
        let style = match state {
            Some(s) if n > 0 => state_style(s),
            _ if n == 0 => Style::new().dim(),
            _ => Style::new(),
        };
        Cell::from(Line::from(n.to_string()).right_aligned()).style(style)
    };
    let rate = |v: f64| {
        let text = if v == 0.0 {
            "0".to_string()
        } else if v < 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.0}")
        };
        Cell::from(Line::from(text).right_aligned())
    };
    match c {
        Column::Id => Cell::from(r.id.clone()),
        Column::Name => Cell::from(escaped(&r.name).into_owned()),
        Column::Total => number(r.total, None),
        Column::State(s) => number(r.states[s as usize], Some(s)),
        Column::Connects => rate(r.connects),
        Column::Accepts => rate(r.accepts),
        Column::OldestCloseWait => match r.oldest_close_wait {
            Some((age, at_least)) => Cell::from(
                Line::from(format!(
                    "{}{}",
                    if at_least { ">" } else { "" },
                    short_age(age)
                ))
                .right_aligned(),
            )
            .style(state_style(TcpState::CloseWait)),
            None => Cell::from(Line::from("-").right_aligned()).style(Style::new().dim()),
        },
    }
}

/// A duration in 3 significant digits, at most 7 characters: `850ns`, `1.00ms`, `48.2ms`,
/// `401ms`, `2.50s`; a minute on as [`short_age`].
pub fn short_ns(ns: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1, "ns"),
        (1_000, "us"),
        (1_000_000, "ms"),
        (1_000_000_000, "s"),
    ];
    if ns >= 60_000_000_000 {
        return short_age(ns);
    }
    let (scale, unit) = UNITS
        .iter()
        .rev()
        .find(|(scale, _)| ns >= *scale)
        .copied()
        .unwrap_or(UNITS[0]);
    let v = ns as f64 / scale as f64;
    match v {
        _ if scale == 1 => format!("{ns}{unit}"),
        v if v < 10.0 => format!("{v:.2}{unit}"),
        v if v < 100.0 => format!("{v:.1}{unit}"),
        v => format!("{v:.0}{unit}"),
    }
}

/// An age in at most 7 characters: `850ms`, `12.3s`, `4m05s`, `2h03m`, `3d04h`.
pub fn short_age(ns: u64) -> String {
    let ms = ns / 1_000_000;
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn draw_table(f: &mut Frame<'_>, area: Rect, ui: &Ui, visible: &[&Row], selected: Option<usize>) {
    let title = format!(
        " {} ({}) ",
        ui.view.name(),
        match visible.len() {
            1 => "1 row".to_string(),
            n => format!("{n} rows"),
        }
    );
    let block = Block::bordered().title(title);
    let columns = fitting(ui, block.inner(area).width);
    let sorted = ui.sort_column();
    let header = TableRow::new(columns.iter().map(|&c| {
        let mut t = c.title(ui.view).to_string();
        if c == sorted {
            t.push(if ui.descending { '▼' } else { '▲' });
        }
        let line = match c {
            Column::Id | Column::Name => Line::from(t),
            _ => Line::from(t).right_aligned(),
        };
        let style = if c == sorted {
            Style::new().bold().underlined()
        } else {
            Style::new().bold()
        };
        Cell::from(line).style(style)
    }));
    let widths: Vec<Constraint> = columns
        .iter()
        .map(|&c| match c {
            Column::Name => Constraint::Min(width(c, ui.view)),
            c => Constraint::Length(width(c, ui.view)),
        })
        .collect();
    let rows = visible
        .iter()
        .map(|r| TableRow::new(columns.iter().map(|&c| cell(c, r))));
    let table = Table::new(rows, widths)
        .header(header)
        .block(block)
        .row_highlight_style(Style::new().reversed());
    let mut state = TableState::default().with_selected(selected);
    f.render_stateful_widget(table, area, &mut state);
}

fn draw_detail(
    f: &mut Frame<'_>,
    area: Rect,
    row: Option<&Row>,
    detail: Option<&Detail>,
    view: ViewKind,
) {
    let title = match row {
        Some(r) => format!(" time in state: {} {} ", r.id, escaped(&r.name)),
        None => " time in state ".to_string(),
    };
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(d) = detail.filter(|d| !d.states.is_empty()) else {
        let why = match (row, view) {
            (None, _) => "no row selected",
            _ => "no state left by its sockets yet",
        };
        f.render_widget(Paragraph::new(Line::from(why).dim()), inner);
        return;
    };
    let [percentiles, histogram] =
        Layout::horizontal([Constraint::Length(36), Constraint::Fill(1)]).areas(inner);
    let mut lines = vec![
        Line::from(format!(
            "{:<11}{:>6} {:>8} {:>8}",
            "STATE", "N", "P50", "P99"
        ))
        .bold(),
    ];
    for &(state, n, p50, p99) in &d.states {
        lines.push(Line::from(vec![
            Span::styled(format!("{:<11}", state.name()), state_style(state)),
            Span::raw(format!("{n:>6} {:>8} {:>8}", short_ns(p50), short_ns(p99))),
        ]));
    }
    f.render_widget(Paragraph::new(lines), percentiles);
    if let Some((state, buckets)) = d.histogram
        && histogram.width >= 16
    {
        draw_histogram(f, histogram, state, &buckets);
    }
}

/// One state's time distribution as horizontal bars, a line per decade from the first
/// bucket with a count to the last.
fn draw_histogram(f: &mut Frame<'_>, area: Rect, state: TcpState, buckets: &[u64]) {
    let first = buckets.iter().position(|&n| n > 0).unwrap_or(0);
    let last = buckets.iter().rposition(|&n| n > 0).unwrap_or(0);
    let max = buckets.iter().copied().max().unwrap_or(0).max(1);
    let mut lines = vec![Line::from(vec![
        Span::styled(state.name(), state_style(state).bold()),
        Span::raw(" (h: next)").dim(),
    ])];
    let count_width = max.to_string().len();
    let bar_room = usize::from(area.width).saturating_sub(7 + 1 + count_width + 1);
    for i in first..=last {
        let n = buckets[i];
        let bar = (n as usize * bar_room).div_ceil(max as usize);
        lines.push(Line::from(vec![
            Span::raw(format!("{:<7}", DECADES[i].0)),
            Span::styled("█".repeat(bar), Style::new().fg(Color::Cyan)),
            Span::raw(format!(" {n}")),
        ]));
    }
    f.render_widget(Paragraph::new(lines), area);
}

fn draw_leaks(f: &mut Frame<'_>, area: Rect, r: &Refresh, replay: bool) {
    let block = Block::bordered().title(format!(" CLOSE_WAIT, oldest first ({}) ", r.leaks.len()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    if !r.leaks_listed {
        let why = if replay {
            "a recording has no holders (live only)"
        } else {
            "listing the holders…"
        };
        f.render_widget(Paragraph::new(Line::from(why).dim()), inner);
        return;
    }
    let mut lines = vec![
        Line::from(format!(
            "{:>7} {:<12} {:>4} {:>7} {}",
            "PID", "COMMAND", "FD", "AGE", "LOCAL -> REMOTE"
        ))
        .bold(),
    ];
    for l in &r.leaks {
        let pid = l.pid.map_or("-".to_string(), |p| p.to_string());
        let fd = l.fd.map_or("-".to_string(), |p| p.to_string());
        let age = format!(
            "{}{}",
            if l.age_at_least { ">" } else { "" },
            short_age(l.age_ns)
        );
        let comm: String = escaped(&l.comm).chars().take(12).collect();
        lines.push(Line::from(vec![
            Span::raw(format!("{pid:>7} {comm:<12} {fd:>4} ")),
            Span::styled(format!("{age:>7}"), state_style(TcpState::CloseWait)),
            Span::raw(format!(
                " {} -> {}",
                short_addr(l.local),
                short_addr(l.remote)
            )),
        ]));
    }
    if r.leaks.is_empty() {
        lines.push(Line::from("none").dim());
    }
    f.render_widget(Paragraph::new(lines), inner);
}

fn draw_footer(f: &mut Frame<'_>, area: Rect, ui: &Ui) {
    let line = if ui.editing {
        Line::from(vec![
            Span::styled(" filter: ", Style::new().bold()),
            Span::raw(escaped(&ui.filter).into_owned()),
            Span::raw("▏"),
            Span::raw("  Enter keep  Esc clear").dim(),
        ])
    } else {
        let mut spans = vec![Span::raw(
            " q quit  Tab view  ←/→ sort  r reverse  ↑/↓ select  / filter  h histogram",
        )];
        if ui.replay {
            spans.push(Span::raw("  space pause  n step"));
        }
        if !ui.filter.is_empty() {
            spans.push(Span::styled(
                format!("  filter: {}", escaped(&ui.filter)),
                Style::new().bold(),
            ));
        }
        Line::from(spans)
    };
    f.render_widget(Paragraph::new(line).dim(), area);
}

/// An address for the leaks pane: IPv4-mapped IPv6 as IPv4.
pub fn short_addr(a: SocketAddr) -> String {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()).to_string(),
            None => a.to_string(),
        },
        IpAddr::V4(_) => a.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{short_age, short_ns};

    #[test]
    fn short_durations_keep_three_digits() {
        assert_eq!(short_ns(850), "850ns");
        assert_eq!(short_ns(1_004_000), "1.00ms");
        assert_eq!(short_ns(48_234_000), "48.2ms");
        assert_eq!(short_ns(400_556_000), "401ms");
        assert_eq!(short_ns(2_500_000_000), "2.50s");
        assert_eq!(short_ns(61_000_000_000), "1m01s");
        assert_eq!(short_age(850_000_000), "850ms");
        assert_eq!(short_age(1_500_000_000), "1.5s");
        assert_eq!(short_age(7_500_000_000_000), "2h05m");
        assert_eq!(short_age(90_000_000_000_000), "1d01h");
    }
}
