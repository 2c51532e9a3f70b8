//! `top`'s interaction: the view, sort, filter and selection the keys change. Pure: a key
//! in, a state out (tested without a terminal).

use std::cell::Cell;
use std::cmp::Ordering;

use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::model::{GroupKey, Row, SHOWN, ViewKind};
use crate::model::TcpState;

/// A column of the table: what it shows and sorts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Column {
    Id,
    Name,
    Total,
    State(TcpState),
    Connects,
    Accepts,
    OldestCloseWait,
}

/// The table's columns, left to right.
pub const COLUMNS: [Column; 16] = [
    Column::Id,
    Column::Name,
    Column::Total,
    Column::State(SHOWN[0]),
    Column::State(SHOWN[1]),
    Column::State(SHOWN[2]),
    Column::State(SHOWN[3]),
    Column::State(SHOWN[4]),
    Column::State(SHOWN[5]),
    Column::State(SHOWN[6]),
    Column::State(SHOWN[7]),
    Column::State(SHOWN[8]),
    Column::State(SHOWN[9]),
    Column::Connects,
    Column::Accepts,
    Column::OldestCloseWait,
];

impl Column {
    /// Its heading (state names shortened as `ss` and netstat users know them).
    pub fn title(self, view: ViewKind) -> &'static str {
        match self {
            Column::Id => match view {
                ViewKind::Processes => "PID",
                ViewKind::Containers => "CGROUP-ID",
                ViewKind::Listeners => "NETNS",
            },
            Column::Name => match view {
                ViewKind::Processes => "COMMAND",
                ViewKind::Containers => "CONTAINER/CGROUP",
                ViewKind::Listeners => "PORT",
            },
            Column::Total => "TOTAL",
            Column::State(s) => match s {
                TcpState::Listen => "LISTEN",
                TcpState::SynSent => "SYN-S",
                TcpState::SynRecv => "SYN-R",
                TcpState::Established => "ESTAB",
                TcpState::FinWait1 => "FIN-W1",
                TcpState::FinWait2 => "FIN-W2",
                TcpState::TimeWait => "TIME-W",
                TcpState::CloseWait => "CLOSE-W",
                TcpState::LastAck => "LAST-A",
                TcpState::Closing => "CLOSING",
                TcpState::Close => "CLOSE",
                TcpState::NewSynRecv => "NEW-SYN-R",
            },
            Column::Connects => "CONN/s",
            Column::Accepts => "ACC/s",
            Column::OldestCloseWait => "CW-OLDEST",
        }
    }

    fn compare(self, a: &Row, b: &Row) -> Ordering {
        match self {
            Column::Id => a.key.cmp(&b.key),
            Column::Name => a.name.cmp(&b.name),
            Column::Total => a.total.cmp(&b.total),
            Column::State(s) => a.states[s as usize].cmp(&b.states[s as usize]),
            Column::Connects => a.connects.total_cmp(&b.connects),
            Column::Accepts => a.accepts.total_cmp(&b.accepts),
            Column::OldestCloseWait => {
                let age = |r: &Row| r.oldest_close_wait.map(|(age, _)| age);
                age(a).cmp(&age(b))
            }
        }
    }

    /// Text columns sort A to Z first; counts, largest first.
    fn descending_first(self) -> bool {
        !matches!(self, Column::Id | Column::Name)
    }
}

/// What the loops read of the keys: stop, and on a replay, whether to go on.
#[derive(Debug, Default)]
pub struct Control {
    /// `q` or Ctrl-C.
    pub quit: Cell<bool>,
    /// A replay stepping (`--step`, or paused with space): intervals the user asked for.
    pub stepping: Cell<bool>,
    pub steps: Cell<u32>,
    /// A replay read its whole file.
    pub ended: Cell<bool>,
}

/// The screen's interactive state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ui {
    pub view: ViewKind,
    /// Index into [`COLUMNS`].
    pub sort: usize,
    pub descending: bool,
    pub filter: String,
    /// Typing goes to the filter.
    pub editing: bool,
    /// The selected row, followed across refreshes and re-sorts.
    pub selected: Option<GroupKey>,
    /// The state whose time distribution the detail pane draws (`None`: the row's most
    /// frequent).
    pub focus: Option<TcpState>,
    /// A replay (the step keys apply).
    pub replay: bool,
}

/// What a key did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing visible changed.
    None,
    /// Redraw from the rows as they are.
    Redraw,
    /// The view changed: its rows must be recomputed from the tracker.
    Regroup,
    Quit,
}

impl Default for Ui {
    fn default() -> Self {
        Ui {
            view: ViewKind::Processes,
            sort: 2, // TOTAL
            descending: true,
            filter: String::new(),
            editing: false,
            selected: None,
            focus: None,
            replay: false,
        }
    }
}

impl Ui {
    pub fn sort_column(&self) -> Column {
        COLUMNS[self.sort]
    }

    /// The rows to show: those the filter matches (case-insensitive, in the id or the
    /// name), sorted by the sort column (ties by key, so the order is stable).
    pub fn visible<'a>(&self, rows: &'a [Row]) -> Vec<&'a Row> {
        let needle = self.filter.to_lowercase();
        let mut out: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                needle.is_empty()
                    || r.name.to_lowercase().contains(&needle)
                    || r.id.to_lowercase().contains(&needle)
            })
            .collect();
        let column = self.sort_column();
        out.sort_by(|a, b| {
            let o = column.compare(a, b);
            let o = if self.descending { o.reverse() } else { o };
            o.then(a.key.cmp(&b.key))
        });
        out
    }

    /// The selected row's index among `visible` (the first when none or gone).
    pub fn selected_index(&self, visible: &[&Row]) -> Option<usize> {
        if visible.is_empty() {
            return None;
        }
        Some(
            self.selected
                .and_then(|k| visible.iter().position(|r| r.key == k))
                .unwrap_or(0),
        )
    }

    /// Applies one terminal event; `rows` are the current view's.
    pub fn apply(&mut self, ev: &Event, rows: &[Row], control: &Control) -> Effect {
        match ev {
            Event::Key(k) if k.kind != KeyEventKind::Release => self.key(*k, rows, control),
            Event::Resize(..) => Effect::Redraw,
            _ => Effect::None,
        }
    }

    fn key(&mut self, k: KeyEvent, rows: &[Row], control: &Control) -> Effect {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return Effect::Quit;
        }
        if self.editing {
            match k.code {
                KeyCode::Enter => self.editing = false,
                KeyCode::Esc => {
                    self.editing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) if !c.is_control() => self.filter.push(c),
                _ => return Effect::None,
            }
            return Effect::Redraw;
        }
        match k.code {
            KeyCode::Char('q') => return Effect::Quit,
            KeyCode::Esc if !self.filter.is_empty() => self.filter.clear(),
            KeyCode::Char('/') => self.editing = true,
            KeyCode::Tab | KeyCode::Char('v') => {
                self.view = self.view.next();
                self.selected = None;
                return Effect::Regroup;
            }
            KeyCode::Left | KeyCode::Char('<') => {
                self.sort_by((self.sort + COLUMNS.len() - 1) % COLUMNS.len());
            }
            KeyCode::Right | KeyCode::Char('>') => self.sort_by((self.sort + 1) % COLUMNS.len()),
            KeyCode::Char('r') => self.descending = !self.descending,
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(rows, -1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(rows, 1),
            KeyCode::PageUp => self.move_selection(rows, -10),
            KeyCode::PageDown => self.move_selection(rows, 10),
            KeyCode::Home => self.move_selection(rows, isize::MIN / 2),
            KeyCode::End => self.move_selection(rows, isize::MAX / 2),
            KeyCode::Char('h') => {
                let i = self
                    .focus
                    .and_then(|f| SHOWN.iter().position(|s| *s == f))
                    .map_or(0, |i| (i + 1) % SHOWN.len());
                self.focus = Some(SHOWN[i]);
            }
            KeyCode::Char(' ') if self.replay => {
                control.stepping.set(!control.stepping.get());
                control.steps.set(0);
            }
            KeyCode::Char('n') if self.replay => {
                control.stepping.set(true);
                control.steps.set(control.steps.get() + 1);
            }
            _ => return Effect::None,
        }
        Effect::Redraw
    }

    fn sort_by(&mut self, column: usize) {
        self.sort = column;
        self.descending = COLUMNS[column].descending_first();
    }

    fn move_selection(&mut self, rows: &[Row], by: isize) {
        let visible = self.visible(rows);
        let Some(at) = self.selected_index(&visible) else {
            return;
        };
        let to = at.saturating_add_signed(by).min(visible.len() - 1);
        self.selected = Some(visible[to].key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pid: u32, name: &str, total: u64, close_wait: u64) -> Row {
        let mut states = [0; 13];
        states[TcpState::Established as usize] = total - close_wait;
        states[TcpState::CloseWait as usize] = close_wait;
        Row {
            key: GroupKey::Process(pid),
            id: pid.to_string(),
            name: name.into(),
            states,
            total,
            connects: 0.0,
            accepts: 0.0,
            oldest_close_wait: None,
        }
    }

    fn press(ui: &mut Ui, rows: &[Row], code: KeyCode) -> Effect {
        let ev = Event::Key(KeyEvent::new(code, KeyModifiers::NONE));
        ui.apply(&ev, rows, &Control::default())
    }

    fn names(ui: &Ui, rows: &[Row]) -> Vec<String> {
        ui.visible(rows).iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn keys_sort_filter_select_and_quit() {
        let rows = vec![
            row(10, "nginx", 5, 0),
            row(20, "leaky", 2, 2),
            row(30, "redis", 3, 1),
        ];
        let mut ui = Ui::default();
        assert_eq!(names(&ui, &rows), ["nginx", "redis", "leaky"], "by total");
        // Right arrow from TOTAL walks the state columns to CLOSE-W.
        let close_wait = COLUMNS
            .iter()
            .position(|c| *c == Column::State(TcpState::CloseWait))
            .unwrap();
        for _ in ui.sort..close_wait {
            assert_eq!(press(&mut ui, &rows, KeyCode::Right), Effect::Redraw);
        }
        assert_eq!(ui.sort_column().title(ui.view), "CLOSE-W");
        assert_eq!(names(&ui, &rows), ["leaky", "redis", "nginx"]);
        press(&mut ui, &rows, KeyCode::Char('r'));
        assert_eq!(names(&ui, &rows), ["nginx", "redis", "leaky"]);
        // The name column sorts A to Z first.
        for _ in 0..close_wait - 1 {
            press(&mut ui, &rows, KeyCode::Left);
        }
        assert_eq!(ui.sort_column(), Column::Name);
        assert_eq!(names(&ui, &rows), ["leaky", "nginx", "redis"]);
        // Selection follows the row, clamped at the ends.
        press(&mut ui, &rows, KeyCode::Down);
        press(&mut ui, &rows, KeyCode::Down);
        press(&mut ui, &rows, KeyCode::Down);
        assert_eq!(ui.selected, Some(GroupKey::Process(30)));
        // Typing after `/` filters; Esc clears it.
        press(&mut ui, &rows, KeyCode::Char('/'));
        for c in "NG".chars() {
            press(&mut ui, &rows, KeyCode::Char(c));
        }
        assert_eq!(ui.filter, "NG");
        assert_eq!(names(&ui, &rows), ["nginx"]);
        assert_eq!(
            press(&mut ui, &rows, KeyCode::Char('q')),
            Effect::Redraw,
            "q is text while editing"
        );
        press(&mut ui, &rows, KeyCode::Backspace);
        press(&mut ui, &rows, KeyCode::Enter);
        assert_eq!(ui.filter, "NG");
        press(&mut ui, &rows, KeyCode::Esc);
        assert_eq!(ui.filter, "");
        assert_eq!(press(&mut ui, &rows, KeyCode::Tab), Effect::Regroup);
        assert_eq!(ui.view, ViewKind::Containers);
        assert_eq!(press(&mut ui, &rows, KeyCode::Char('q')), Effect::Quit);
        let ctrl_c = Event::Key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert_eq!(ui.apply(&ctrl_c, &rows, &Control::default()), Effect::Quit);
    }

    #[test]
    fn replay_keys_step_and_pause() {
        let control = Control::default();
        let mut ui = Ui {
            replay: true,
            ..Ui::default()
        };
        let key = |c| Event::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE));
        ui.apply(&key('n'), &[], &control);
        ui.apply(&key('n'), &[], &control);
        assert!(control.stepping.get());
        assert_eq!(control.steps.get(), 2);
        ui.apply(&key(' '), &[], &control);
        assert!(!control.stepping.get(), "space resumes the recorded speed");
        let mut live = Ui::default();
        assert_eq!(live.apply(&key('n'), &[], &control), Effect::None);
    }
}
