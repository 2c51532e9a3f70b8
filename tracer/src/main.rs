//! `tcplens`: the binary edge. Parses the command line, runs the command, and turns every
//! error into one line on stderr and exit code 1.

use std::process::ExitCode;

use clap::Parser as _;
use tracer::app::say;
use tracer::cli::{Cli, Command};

/// Exit code of `leaks --fail-on-leak` when a leak was reported (1 is for errors).
const LEAKS_FOUND: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                };
            }
            say(format_args!(
                "{} (see --help)",
                one_line(&e.render().to_string())
            ));
            return ExitCode::from(1);
        }
    };
    init_logging();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("starting the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        let done = |r: anyhow::Result<()>| r.map(|()| 0);
        match &cli.command {
            Command::Watch(args) => done(tracer::app::watch(args).await),
            Command::Timeline(args) => done(tracer::app::timeline(args).await),
            Command::Stats(args) => done(tracer::app::stats(args).await),
            Command::Record(args) => done(tracer::app::record(args).await),
            Command::Serve(args) => done(tracer::app::serve(args).await),
            Command::Listen(args) => done(tracer::app::listen(args).await),
            Command::Top(args) => done(tracer::app::top(args).await),
            Command::Floor(args) => done(tracer::app::floor(args).await),
            Command::Leaks(args) => tracer::app::leaks(args).await.map(|found| {
                if found && args.fail_on_leak {
                    LEAKS_FOUND
                } else {
                    0
                }
            }),
        }
    });
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            say(format_args!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

/// clap's error as one line: its message and the lines that complete it (the missing
/// argument, the possible values), without the usage block.
fn one_line(text: &str) -> String {
    let mut parts = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        parts.push(line.strip_prefix("error: ").unwrap_or(line));
    }
    if parts.is_empty() {
        return "invalid arguments".into();
    }
    parts.join(" ")
}

/// Warnings (and kernel-side aya-log records) as `tcplens: warning: …` lines on stderr;
/// `RUST_LOG` overrides the level.
fn init_logging() {
    use std::io::Write as _;
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Warn)
        .parse_env("RUST_LOG")
        .format(|buf, rec| {
            writeln!(
                buf,
                "tcplens: {}: {}",
                match rec.level() {
                    log::Level::Error => "error",
                    log::Level::Warn => "warning",
                    log::Level::Info => "info",
                    log::Level::Debug => "debug",
                    log::Level::Trace => "trace",
                },
                rec.args()
            )
        })
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(args: &[&str]) -> String {
        let e = Cli::try_parse_from(std::iter::once("tcplens").chain(args.iter().copied()))
            .expect_err("invalid");
        one_line(&e.render().to_string())
    }

    #[test]
    fn clap_errors_are_one_line_and_say_what_is_wrong() {
        assert_eq!(
            error_of(&["record"]),
            "the following required arguments were not provided: --output <FILE>"
        );
        assert_eq!(
            error_of(&["watch", "--format", "xml"]),
            "invalid value 'xml' for '--format <FORMAT>' [possible values: text, json]"
        );
        assert_eq!(
            error_of(&["stats", "--by", "colour"]),
            "invalid value 'colour' for '--by <BY>' [possible values: lport, rport, process, cgroup, container]"
        );
    }
}
