//! Rig 2: boots the freestanding test guest (`guest/`) under the real
//! `trellis` binary and checks what it reports on COM1 and the exit port,
//! plus what it left on the host (disk image, console file, tap frames).
//!
//! Where things come from:
//! - the guest: built once per test process with `cargo build --release
//!   --locked` in `guest/` (its own target dir, `guest/target`; cargo's lock
//!   there serialises test processes). `TRELLIS_GUEST=/path` uses a prebuilt
//!   kernel instead;
//! - trellis: `TRELLIS_BIN=/path`, else the `trellis` next to the test
//!   executable's `deps/` directory, i.e. `<target dir>/<profile>/trellis`,
//!   which `cargo build --workspace` (or `-p vmm`) with the same profile and
//!   target dir produces. Under `cargo test` the tests first run `cargo
//!   build -p vmm --bin trellis` for that target dir and profile (a no-op
//!   after `cargo build --workspace`) so they never test an old VMM; run
//!   directly, the test executable uses the binary as it is. A missing one
//!   fails with a message saying how to build it.

mod tap;
mod vm;

pub use tap::Tap;
pub use vm::{GuestRun, Outcome, TestLine};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound for building the guest, or trellis, from scratch on a slow,
/// busy host.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The guest kernel, built on first use. Errors are kept so every test of
/// the process reports the same build failure.
pub fn guest_kernel() -> Result<PathBuf, String> {
    static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    KERNEL.get_or_init(build_guest).clone()
}

fn build_guest() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TRELLIS_GUEST") {
        let path = PathBuf::from(path);
        return match path.is_file() {
            true => Ok(path),
            false => Err(format!("TRELLIS_GUEST={} is not a file", path.display())),
        };
    }
    let dir = workspace_root().join("guest");
    let target_dir = dir.join("target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked"])
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target_dir);
    // The outer `cargo test` may export settings meant for the workspace:
    // its target dir (whose lock it holds: a nested build there would
    // deadlock) and RUSTFLAGS, which would replace the guest's own flags
    // from guest/.cargo/config.toml (no SSE, static, no red zone).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
            || (key.starts_with("CARGO_TARGET_") && key != "CARGO_TARGET_DIR")
            || key == "RUSTFLAGS"
            || key == "CARGO_ENCODED_RUSTFLAGS"
        {
            cmd.env_remove(key.as_ref());
        }
    }
    let out = run_bounded(cmd, BUILD_TIMEOUT)
        .map_err(|e| format!("cannot run cargo to build the guest: {e}"))?;
    if !out.success() {
        return Err(format!(
            "building the guest in {} failed ({}):\n{}",
            dir.display(),
            out.describe_status(),
            out.stderr
        ));
    }
    let kernel = target_dir.join("x86_64-unknown-linux-gnu/release/trellis-test-guest");
    match kernel.is_file() {
        true => Ok(kernel),
        false => Err(format!(
            "the guest built, but {} does not exist",
            kernel.display()
        )),
    }
}

/// The trellis binary (see the module documentation).
pub fn trellis_bin() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(find_trellis).clone()
}

fn find_trellis() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TRELLIS_BIN") {
        let path = PathBuf::from(path);
        return match path.is_file() {
            true => Ok(path),
            false => Err(format!("TRELLIS_BIN={} is not a file", path.display())),
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // <target>/<profile>/deps/guest_rig-<hash> -> <target>/<profile>/trellis
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?;
    let bin = profile_dir.join("trellis");
    // Under `cargo test` (which sets CARGO and no longer holds the target
    // dir's lock while tests run) let cargo bring the binary up to date, so
    // edits since the last `cargo build` are tested; usually a no-op.
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_trellis(cargo.as_ref(), profile_dir)?;
    }
    match bin.is_file() {
        true => Ok(bin),
        false => Err(format!(
            "no trellis binary at {}: build it first with `cargo build -p vmm` (same \
             profile and target dir as the tests), or set TRELLIS_BIN",
            bin.display()
        )),
    }
}

/// `cargo build -p vmm --bin trellis` into the target dir and profile the
/// test executable itself was built for.
fn build_trellis(cargo: &Path, profile_dir: &Path) -> Result<(), String> {
    let (Some(target_dir), Some(profile)) = (
        profile_dir.parent(),
        profile_dir.file_name().and_then(|p| p.to_str()),
    ) else {
        return Err(format!(
            "cannot tell the profile of {}",
            profile_dir.display()
        ));
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "vmm", "--bin", "trellis", "--profile"])
        .arg(match profile {
            "debug" => "dev",
            other => other,
        })
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", target_dir);
    let out = run_bounded(cmd, BUILD_TIMEOUT)
        .map_err(|e| format!("cannot run cargo to build trellis: {e}"))?;
    match out.success() {
        true => Ok(()),
        false => Err(format!(
            "`cargo build -p vmm` into {} failed ({}):\n{}",
            target_dir.display(),
            out.describe_status(),
            out.stderr
        )),
    }
}

/// What a bounded subprocess did.
pub struct Finished {
    /// `None` when it was killed at the time limit.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exit status N", "killed by signal N" or "timed out".
    pub fn describe_status(&self) -> String {
        use std::os::unix::process::ExitStatusExt;
        match self.status {
            None => format!(
                "timed out after {:.1} s and killed",
                self.elapsed.as_secs_f64()
            ),
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                (None, None) => format!("{s}"),
            },
        }
    }
}

/// Runs `cmd` (stdin from /dev/null, output captured) and kills it if it
/// has not ended after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> std::io::Result<Finished> {
    use std::os::unix::process::CommandExt;
    let start = Instant::now();
    let mut child = cmd
        // Its own process group, so a timeout also ends its children (cargo's
        // rustc, a wrapper script's VMM), which would keep the pipes open.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Drained in threads so a chatty child cannot block on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_until(&mut child, start + limit)?;
    let elapsed = start.elapsed();
    Ok(Finished {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    })
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` until `deadline`, then kills it (`Ok(None)`).
fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let group = i32::try_from(child.id()).map_err(std::io::Error::other)?;
            // SAFETY: kill() takes no pointers; -group names the process
            // group this child leads (process_group(0) above) and nothing else.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}
