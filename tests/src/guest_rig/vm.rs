//! One boot of the test guest under trellis, and what came out of it.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{guest_kernel, run_bounded, trellis_bin, workspace_root, Finished, Tap};

/// Default bound on one VM run (the full device set takes ~3 s here);
/// `TRELLIS_RIG_TIMEOUT=<seconds>` overrides it for slower hosts.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on guest/make-disk.sh.
const MAKE_DISK_TIMEOUT: Duration = Duration::from_secs(60);
/// Disk size, as in the guest's README.
const DISK_MIB: u32 = 64;

/// Tap names must be unique across the tests of one process and across
/// concurrent test processes: pid plus a counter.
static TAP_SEQ: AtomicU32 = AtomicU32::new(0);

/// A trellis invocation for the test guest, built up option by option.
pub struct GuestRun {
    dir: PathBuf,
    cmdline: String,
    /// `Some(readonly)` when a disk is attached.
    disk: Option<bool>,
    rng: bool,
    console: bool,
    net: bool,
    /// More trellis options, appended as given.
    extra: Vec<String>,
    timeout: Duration,
}

impl GuestRun {
    /// A run whose files (disk image, console output) live in
    /// `<base>/guest-rig/<name>-<pid>`.
    pub fn new(base: &Path, name: &str) -> Self {
        GuestRun {
            dir: base
                .join("guest-rig")
                .join(format!("{name}-{}", std::process::id())),
            cmdline: String::new(),
            disk: None,
            rng: false,
            console: false,
            net: false,
            extra: Vec::new(),
            timeout: std::env::var("TRELLIS_RIG_TIMEOUT")
                .ok()
                .and_then(|s| s.parse().ok())
                .map_or(RUN_TIMEOUT, Duration::from_secs),
        }
    }

    /// The guest's command line (see guest/README.md).
    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.trim().to_string();
        self
    }

    /// A writable disk made by guest/make-disk.sh.
    pub fn disk(mut self) -> Self {
        self.disk = Some(false);
        self
    }

    /// The same disk, attached with `readonly=on`.
    pub fn readonly_disk(mut self) -> Self {
        self.disk = Some(true);
        self
    }

    pub fn rng(mut self) -> Self {
        self.rng = true;
        self
    }

    /// virtio-console into a file, read back into [`Outcome::console`].
    pub fn console(mut self) -> Self {
        self.console = true;
        self
    }

    /// virtio-net on a fresh tap, watched (see [`Tap`]).
    pub fn net(mut self) -> Self {
        self.net = true;
        self
    }

    /// Appends trellis options (e.g. a `--net` on a tap trellis creates).
    pub fn args(mut self, args: &[&str]) -> Self {
        self.extra.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Boots the guest and waits for trellis to end (or kills it at the
    /// time limit). Panics if the run cannot even be set up.
    pub fn run(self) -> Outcome {
        let kernel = guest_kernel().unwrap_or_else(|e| panic!("guest rig: {e}"));
        let trellis = trellis_bin().unwrap_or_else(|e| panic!("guest rig: {e}"));
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir)
            .unwrap_or_else(|e| panic!("guest rig: mkdir {}: {e}", self.dir.display()));

        let mut args: Vec<String> = vec![
            "--kernel".into(),
            kernel.display().to_string(),
            "--cmdline".into(),
            self.cmdline.clone(),
            "--memory".into(),
            "size=256M".into(),
            "--serial".into(),
            "tty".into(),
        ];
        let disk = self.dir.join("disk.img");
        if let Some(readonly) = self.disk {
            make_disk(&disk);
            let ro = if readonly { ",readonly=on" } else { "" };
            args.extend(["--disk".into(), format!("path={}{ro}", disk.display())]);
        }
        if self.rng {
            args.push("--rng".into());
        }
        let console = self.dir.join("console.out");
        if self.console {
            args.extend(["--console".into(), format!("file={}", console.display())]);
        }
        let tap = self.net.then(|| {
            let seq = TAP_SEQ.fetch_add(1, Ordering::Relaxed);
            // "trl2-" + at most 7 pid digits + "-" + counter: within 15 bytes.
            let name = format!("trl2-{}-{seq}", std::process::id() % 10_000_000);
            Tap::create(&name).unwrap_or_else(|e| panic!("guest rig: tap {name}: {e}"))
        });
        if let Some(tap) = &tap {
            args.extend(["--net".into(), format!("tap={}", tap.name())]);
        }
        args.extend(self.extra.iter().cloned());

        let mut cmd = Command::new(&trellis);
        cmd.args(&args);
        let finished = run_bounded(cmd, self.timeout)
            .unwrap_or_else(|e| panic!("guest rig: cannot run {}: {e}", trellis.display()));
        Outcome {
            command: std::iter::once(trellis.display().to_string())
                .chain(args.iter().map(|a| match a.contains(' ') {
                    true => format!("'{a}'"),
                    false => a.clone(),
                }))
                .collect::<Vec<_>>()
                .join(" "),
            serial: finished.stdout.replace('\r', ""),
            console: self
                .console
                .then(|| std::fs::read(&console).ok())
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).replace('\r', "")),
            disk: self.disk.map(|_| disk),
            frames: tap.as_ref().map(Tap::frames).unwrap_or_default(),
            finished,
            dir: self.dir,
        }
    }
}

fn make_disk(path: &Path) {
    let mut cmd = Command::new(workspace_root().join("guest/make-disk.sh"));
    cmd.arg(path).arg(DISK_MIB.to_string());
    let out = run_bounded(cmd, MAKE_DISK_TIMEOUT)
        .unwrap_or_else(|e| panic!("guest rig: cannot run make-disk.sh: {e}"));
    assert!(
        out.success(),
        "guest rig: make-disk.sh {} failed ({}): {}",
        path.display(),
        out.describe_status(),
        out.stderr
    );
}

/// One `TEST <name> ok|FAIL <detail>` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestLine {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What one run produced. The work directory is removed on drop unless the
/// thread is panicking (a failed assertion), so a failure leaves the disk
/// image and console file for a look.
pub struct Outcome {
    pub command: String,
    pub finished: Finished,
    /// COM1 (trellis' stdout), without the guest's carriage returns.
    pub serial: String,
    /// The virtio-console file, if a console was attached and it exists.
    pub console: Option<String>,
    pub disk: Option<PathBuf>,
    /// Frames seen on the tap, if net was attached.
    pub frames: Vec<Vec<u8>>,
    pub dir: PathBuf,
}

impl Outcome {
    /// Fails the test with `what` followed by everything needed to debug
    /// it: the command, how trellis ended, the serial log and its stderr.
    #[track_caller]
    pub fn fail(&self, what: impl Display) -> ! {
        panic!(
            "{what}\n--- command: {}\n--- trellis: {}\n--- serial log:\n{}\n--- trellis stderr:\n{}\n--- files kept in {}",
            self.command,
            self.finished.describe_status(),
            self.serial.trim_end(),
            self.finished.stderr.trim_end(),
            self.dir.display()
        )
    }

    /// `fail(what)` unless `cond`.
    #[track_caller]
    pub fn check(&self, cond: bool, what: impl Display) {
        if !cond {
            self.fail(what);
        }
    }

    /// trellis' exit code; `None` if it was killed (time limit or signal).
    pub fn exit_code(&self) -> Option<i32> {
        self.finished.status.and_then(|s| s.code())
    }

    /// Serial lines starting with `prefix`.
    pub fn lines<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.serial.lines().filter(move |l| l.starts_with(prefix))
    }

    /// The serial log from the guest's last boot on: all of it, unless the
    /// guest reset and trellis rebooted it (`mode=reboot`).
    pub fn last_boot(&self) -> &str {
        let start = self.serial.rfind("TRELLIS-GUEST boot\n").unwrap_or(0);
        &self.serial[start..]
    }

    /// Every `TEST` line of the last boot, in order (the `RESULT` line
    /// counts those).
    pub fn tests(&self) -> Vec<TestLine> {
        self.last_boot()
            .lines()
            .filter(|l| l.starts_with("TEST "))
            .map(|l| {
                let mut parts = l.splitn(4, ' ').skip(1);
                let name = parts.next().unwrap_or_default().to_string();
                let ok = parts.next() == Some("ok");
                let detail = parts.next().unwrap_or_default().to_string();
                TestLine { name, ok, detail }
            })
            .collect()
    }

    /// The `TEST` line for check `name`, failing the test if it is missing.
    #[track_caller]
    pub fn test(&self, name: &str) -> TestLine {
        self.tests()
            .into_iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| self.fail(format!("no TEST {name} line")))
    }

    /// `(pass, fail)` from the last `RESULT pass=N fail=M` line.
    pub fn result(&self) -> Option<(u32, u32)> {
        let line = self.lines("RESULT ").last()?;
        let field = |key: &str| {
            line.split(' ')
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        Some((field("pass=")?, field("fail=")?))
    }

    /// The guest passed: trellis exited 0 without an error of its own, the
    /// RESULT line counts every TEST line as passed, none failed, and each
    /// of `expected` is there and ok.
    #[track_caller]
    pub fn assert_passed(&self, expected: &[&str]) {
        self.check(
            self.exit_code() == Some(0),
            "trellis did not exit with status 0 (the guest's pass verdict)",
        );
        self.check(
            !self.finished.stderr.contains("trellis: error"),
            "trellis reported an error",
        );
        let tests = self.tests();
        let failed: Vec<&str> = tests
            .iter()
            .filter(|t| !t.ok)
            .map(|t| t.name.as_str())
            .collect();
        self.check(failed.is_empty(), format!("failed checks: {failed:?}"));
        match self.result() {
            Some((pass, 0)) if pass > 0 && pass as usize == tests.len() => {}
            other => self.fail(format!(
                "RESULT line {other:?} does not match {} passed TEST lines",
                tests.len()
            )),
        }
        for name in expected {
            self.check(self.test(name).ok, format!("TEST {name} did not pass"));
        }
    }

    /// The guest reported failure through the exit port: status 1, no
    /// trellis error (which would also be 1), and `RESULT pass=0 fail=1`.
    #[track_caller]
    pub fn assert_guest_failed(&self) {
        self.check(
            self.exit_code() == Some(1),
            "trellis did not exit with status 1 (the guest's fail verdict)",
        );
        self.check(
            !self.finished.stderr.contains("trellis: error"),
            "status 1 came from a trellis error, not from the guest",
        );
        self.check(
            self.result() == Some((0, 1)),
            "expected RESULT pass=0 fail=1",
        );
    }

    /// `len` bytes of the disk image from byte `offset`.
    #[track_caller]
    pub fn read_disk(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self
            .disk
            .as_ref()
            .unwrap_or_else(|| self.fail("no disk attached"));
        let mut buf = vec![0u8; len];
        std::fs::File::open(path)
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(&mut buf)
            })
            .unwrap_or_else(|e| self.fail(format!("reading {}: {e}", path.display())));
        buf
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
