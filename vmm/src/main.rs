//! The `trellis` command line: parses the options, sets up logging, builds
//! and runs the VM, and builds it again whenever the guest resets it (see
//! `vmm::machine`).
//!
//! Exit status: 0 when the guest powered off, 1 when the VM could not be
//! built or failed (a triple fault included), 2 for a bad command line; a
//! guest that ends the VM through the debug exit port (0xf4) chooses the
//! status itself. Every failure is reported as one line on stderr,
//! `trellis: error: ...`, with the error's causes joined by ": ".

use std::error::Error;
use std::process::ExitCode;

use vmm::config::{self, ConfigError, Invocation};
use vmm::device_manager::Outputs;
use vmm::logger::{Limits, MonotonicClock, RateLimitedLogger};
use vmm::machine;

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
    let logger = init_logging(config.verbosity);
    if let Err(e) = config.check_files() {
        report(&e);
        return ExitCode::from(EXIT_USAGE);
    }
    let _stdin = StdinFlags::save();
    let outputs = Outputs::new(&config.serial, &config.console);
    // From the first boot on the guest runs and decides what devices log.
    let result = machine::run_until_end(&config, &outputs, &|| logger.start_limiting());
    // Every thread that logs has ended: say what the rate limit dropped
    // since each call site's last line.
    log::logger().flush();
    match result {
        Ok(None) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Ok(Some(status)) => {
            log::info!("guest ended the VM with status {status} through the debug exit port");
            ExitCode::from(status)
        }
        Err(e) => {
            report(&e);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The file status flags of stdin, put back on drop: the virtio console
/// makes stdin non-blocking, which would otherwise outlive us in the
/// shell that shares the terminal.
struct StdinFlags(Option<libc::c_int>);

impl StdinFlags {
    fn save() -> Self {
        // SAFETY: F_GETFL on fd 0 takes no pointer; a closed fd gives -1.
        let flags = unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_GETFL) };
        StdinFlags((flags >= 0).then_some(flags))
    }
}

impl Drop for StdinFlags {
    fn drop(&mut self) {
        if let Some(flags) = self.0 {
            // SAFETY: F_SETFL on fd 0 with an integer argument, the flags
            // read at start.
            unsafe { libc::fcntl(libc::STDIN_FILENO, libc::F_SETFL, flags) };
        }
    }
}

/// The logger: env_logger behind the per-call-site rate limit.
type Logger = RateLimitedLogger<env_logger::Logger, MonotonicClock>;

/// Logging goes to stderr; `RUST_LOG` overrides the `-v` levels. Records
/// are rate limited per call site once the guest runs (see vmm::logger).
fn init_logging(verbosity: u8) -> &'static Logger {
    let env = env_logger::Env::default().default_filter_or(config::log_filter(verbosity));
    let inner = env_logger::Builder::from_env(env)
        .format_timestamp_millis()
        .build();
    let max_level = inner.filter();
    // Leaked: the global logger lives as long as the process.
    let logger: &'static Logger = Box::leak(Box::new(RateLimitedLogger::new(
        inner,
        MonotonicClock::new(),
        Limits::default(),
    )));
    // Fails only if a logger is already set, and nothing else sets one.
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max_level);
    }
    logger
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
