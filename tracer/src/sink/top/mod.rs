//! `top`: a live terminal dashboard of the host's TCP sockets, refreshed in place.
//!
//! - [`model`]: what the screen shows, a pure function of the tracker and the transitions
//!   between refreshes;
//! - [`ui`]: the keys' state (view, sort, filter, selection), pure;
//! - [`render`]: the screen drawn from both (into a terminal, or a test buffer);
//! - this module: the sink that feeds the model and draws, and the terminal it draws on.

pub mod model;
pub mod render;
pub mod ui;

#[cfg(test)]
mod tests;

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};

use ratatui::Terminal;
use ratatui::backend::Backend;
use ratatui::crossterm::event::Event;

use self::model::{Detail, TopModel};
use self::render::Screen;
use self::ui::{Control, Effect, Ui};
use super::{HolderWant, Sink, View};
use crate::clock::TimeFormatter;
use crate::model::{TcpState, Transition};
use crate::tracker::{Observed, Tracker};

/// What the loops share with the screen: its keys wake them, and it may ask them to stop
/// (or, on a replay, to pause and step).
#[derive(Clone)]
pub struct Link {
    pub wake: Arc<tokio::sync::Notify>,
    pub control: Rc<Control>,
}

/// The `top` sink: the model fed by the pipeline, drawn on `terminal` at every refresh
/// and after every key.
pub struct TopSink<B: Backend> {
    pub model: TopModel,
    pub ui: Ui,
    terminal: Terminal<B>,
    keys: Option<Receiver<Event>>,
    pub control: Rc<Control>,
    times: TimeFormatter,
    /// `live`, or what the replay is doing.
    pub mode: String,
    detail: Option<Detail>,
}

impl<B: Backend> TopSink<B> {
    pub fn new(
        model: TopModel,
        terminal: Terminal<B>,
        keys: Option<Receiver<Event>>,
        times: TimeFormatter,
    ) -> Self {
        TopSink {
            model,
            ui: Ui::default(),
            terminal,
            keys,
            control: Rc::new(Control::default()),
            times,
            mode: "live".into(),
            detail: None,
        }
    }

    pub fn terminal(&self) -> &Terminal<B> {
        &self.terminal
    }

    /// A refresh at `now_ns` (the interval's, or a replay's step), then a frame.
    pub fn refresh(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        let mut clock = String::new();
        self.times.time_of_day(now_ns, &mut clock);
        clock.truncate(clock.len().saturating_sub(4)); // whole seconds
        self.model.refresh(
            now_ns,
            clock,
            self.ui.view,
            v.tracker,
            v.totals.lost.total(),
            v.holders,
        );
        self.draw()
    }

    /// Applies the keys typed since the last call; returns whether any changed the screen.
    pub fn keys(&mut self, tracker: &Tracker) -> bool {
        let Some(rx) = self.keys.take() else {
            return false;
        };
        let mut changed = false;
        loop {
            let ev = match rx.try_recv() {
                Ok(ev) => ev,
                Err(TryRecvError::Empty) => break,
                // The terminal is gone (its reader stopped): nothing more to show.
                Err(TryRecvError::Disconnected) => {
                    self.control.quit.set(true);
                    break;
                }
            };
            changed |= self.key(&ev, tracker);
        }
        self.keys = Some(rx);
        changed
    }

    /// One key: returns whether it changed the screen.
    pub fn key(&mut self, ev: &Event, tracker: &Tracker) -> bool {
        match self.ui.apply(ev, &self.model.refresh.rows, &self.control) {
            Effect::None => false,
            Effect::Redraw => true,
            Effect::Regroup => {
                let now = self.model.refresh.now_ns;
                self.model.rows(now, self.ui.view, tracker);
                true
            }
            Effect::Quit => {
                self.control.quit.set(true);
                false
            }
        }
    }

    /// Draws the screen as it stands.
    pub fn draw(&mut self) -> io::Result<()> {
        let visible = self.ui.visible(&self.model.refresh.rows);
        let selected = self.ui.selected_index(&visible).map(|i| visible[i].key);
        self.detail = selected.map(|key| self.model.detail(self.ui.view, key, self.ui.focus));
        let c = &self.control;
        let pace = match (self.ui.replay, c.ended.get(), c.stepping.get()) {
            (false, ..) => "",
            (true, true, _) => ": end of recording",
            (true, false, true) => ": paused",
            (true, false, false) => ": at recorded speed",
        };
        let mode = format!("{}{pace}", self.mode);
        let screen = Screen {
            mode: &mode,
            refresh: &self.model.refresh,
            ui: &self.ui,
            detail: self.detail.as_ref(),
        };
        self.terminal
            .draw(|f| render::draw(f, &screen))
            .map(|_| ())
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl<B: Backend> Sink for TopSink<B> {
    fn holder_want(&self) -> HolderWant {
        HolderWant::AtIntervals(TcpState::CloseWait)
    }

    fn started(&mut self, start_ns: Option<u64>) -> io::Result<()> {
        self.model.started(start_ns);
        self.draw()
    }

    fn transition(&mut self, t: &Transition, o: &Observed) -> io::Result<()> {
        self.model.transition(t, o);
        Ok(())
    }

    fn batch_done(&mut self, v: &View<'_>) -> io::Result<()> {
        if self.keys(v.tracker) && !self.control.quit.get() {
            self.draw()?;
        }
        Ok(())
    }

    fn interval(&mut self, now_ns: u64, v: &View<'_>) -> io::Result<()> {
        self.refresh(now_ns, v)
    }
}

/// The terminal `top` draws on: raw mode and the alternate screen from [`Screen::enter`]
/// until dropped (also on errors; a panic hook restores it on a panic), with the keys read
/// on a thread of their own.
pub mod term {
    use std::io::{self, IsTerminal as _};
    use std::sync::Arc;
    use std::sync::mpsc::Receiver;

    use ratatui::DefaultTerminal;
    use ratatui::crossterm::event::{self, Event};

    /// Restores the terminal when dropped.
    pub struct Guard {
        _private: (),
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = ratatui::try_restore();
            let _ = ratatui::crossterm::execute!(io::stdout(), ratatui::crossterm::cursor::Show);
        }
    }

    /// Whether `top` can draw here: stdout must be a terminal.
    pub fn check() -> io::Result<()> {
        if io::stdout().is_terminal() {
            Ok(())
        } else {
            Err(io::Error::other(
                "top draws on a terminal and stdout is not one (watch, stats and leaks print lines)",
            ))
        }
    }

    /// Enters raw mode and the alternate screen, and starts reading keys (each wakes
    /// `wake`).
    pub fn enter(
        wake: Arc<tokio::sync::Notify>,
    ) -> io::Result<(DefaultTerminal, Guard, Receiver<Event>)> {
        let terminal = ratatui::try_init()?;
        let guard = Guard { _private: () };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tcplens-keys".into())
            .spawn(move || {
                while let Ok(ev) = event::read() {
                    if tx.send(ev).is_err() {
                        break;
                    }
                    wake.notify_one();
                }
                // The reader failed (no terminal left): waking with the sender gone
                // tells the screen to stop.
                drop(tx);
                wake.notify_one();
            })?;
        Ok((terminal, guard, rx))
    }
}
