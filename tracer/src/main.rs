//! `tcplens`: the binary edge. Parses the command line, runs the command, and turns every
//! error into one line on stderr and exit code 1.

use std::process::ExitCode;

use clap::Parser as _;
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
            // One line: clap's first line, without the usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("tcplens: {first} (see --help)");
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
            eprintln!("tcplens: starting the runtime: {e}");
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
            eprintln!("tcplens: {e:#}");
            ExitCode::from(1)
        }
    }
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
