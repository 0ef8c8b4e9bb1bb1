//! The `trellis` command line: parses the options, sets up logging, builds
//! and runs the VM.
//!
//! Exit status: 0 when the guest powered off, 1 when the VM could not be
//! built or failed, 2 for a bad command line. Every failure is reported as
//! one line on stderr, `trellis: error: ...`, with the error's causes
//! joined by ": ".

use std::error::Error;
use std::process::ExitCode;

use vmm::config::{self, ConfigError, Invocation, VmConfig};

/// Exit status for a bad command line or configuration.
const EXIT_USAGE: u8 = 2;
/// Exit status for a VM that could not be built or failed while running.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("unknown panic");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("trellis: error: internal error: {what}{at}");
    }));

    let args: Vec<String> = match std::env::args_os()
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(args) => args,
        Err(bad) => {
            report(&ConfigError::Usage(format!(
                "argument {bad:?} is not valid UTF-8"
            )));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let config = match config::parse_args(&args) {
        Ok(Invocation::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Run(config)) => config,
        Err(e) => {
            report(&e);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(config.verbosity);
    if let Err(e) = config.check_files() {
        report(&e);
        return ExitCode::from(EXIT_USAGE);
    }
    match run(&config) {
        Ok(()) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(e.as_ref());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Logging goes to stderr; `RUST_LOG` overrides the `-v` levels.
fn init_logging(verbosity: u8) {
    let env = env_logger::Env::default().default_filter_or(config::log_filter(verbosity));
    env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .init();
}

/// Prints `e` and its causes on one line.
fn report(e: &dyn Error) {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their cause in their own message.
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    eprintln!("trellis: error: {}", line.replace('\n', " "));
}

/// Builds the VM described by `config` and runs it until the guest powers
/// off.
fn run(_config: &VmConfig) -> Result<(), Box<dyn Error>> {
    Err("booting is not available yet: the VM builder is not in this build".into())
}
