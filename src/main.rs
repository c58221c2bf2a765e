//! The `litework` binary: parse, set up logging, dispatch, map errors to
//! exit statuses (documented in `litework --help` and the README).

/// `eprintln!` that lets a closed standard error go (`litework run 2>&1 |
/// head`): the message is lost, but the exit status stays the command's
/// instead of a panic's.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use cli::{Cli, LogFormat};

/// Bad arguments or input, a refused database: nothing was changed.
const EXIT_INPUT: u8 = 2;
/// A failure while working (I/O, database).
const EXIT_FAILURE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(err) if is_broken_pipe(&err) => {
            // `litework export | head`: the reader has all it wants.
            ExitCode::SUCCESS
        }
        Err(err) => {
            note!("litework: {}", describe(&err));
            let input = err
                .chain()
                .find_map(|e| e.downcast_ref::<litework::Error>())
                .is_some_and(litework::Error::is_input);
            ExitCode::from(if input { EXIT_INPUT } else { EXIT_FAILURE })
        }
    }
}

/// The error and its causes, subject first, each cause once: library
/// errors already quote their source in their own message.
fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

fn init_logging(cli: &Cli) {
    // Under `litework run` the supervisor reports worker starts and stops;
    // its workers only add what went wrong.
    let supervised = matches!(&cli.command, cli::Command::Worker(w) if w.supervised);
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) if supervised => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,litework={level}")));
    // A log line that cannot be written is dropped: tracing's own report
    // of it would go to the same closed stderr, through a panicking
    // `eprintln!`.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}
