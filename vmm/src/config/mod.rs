//! The `trellis` command line and the VM configuration it describes.
//!
//! clap handles the argument grammar (`--disk X --disk Y`, `--help`); the
//! values of options are `key=value,...` lists in the style of
//! cloud-hypervisor, parsed here by pure functions so that
//! [`VmConfig::parse`] can be fuzzed. Every error is a [`ConfigError`]
//! whose message is one line naming the option at fault.
//!
//! Parsing checks syntax and ranges only; whether files exist is checked by
//! [`VmConfig::check_files`], and whether the host can run the VM when it
//! is built.

mod options;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{ArgAction, Parser};

use options::{check_id, check_ifname, parse_switch, OptionList};
pub use options::{parse_mac, parse_size, HostPciAddress};
pub use virtio_devices::net::MacAddr;

/// Smallest guest RAM accepted.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest RAM accepted (1 TiB): beyond that it is a typo.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Guest RAM when `--memory` is not given.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Most vCPUs accepted.
pub const MAX_VCPUS: u8 = 64;
/// Longest kernel command line: x86's COMMAND_LINE_SIZE minus the NUL.
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Entropy source of `--rng` without `src=`.
pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";
/// Where the host's PCI functions live; `--device path=` must be inside.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A configuration problem, in one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// clap rejected the command line (unknown option, missing `--kernel`...).
    #[error("{0}")]
    Usage(String),
    /// An option was given an empty value, or an empty item (`a=b,`).
    #[error("{option}: empty value or empty item")]
    Empty {
        /// The option, e.g. "--disk".
        option: &'static str,
    },
    /// An item without `=` that is not a known key.
    #[error("{option}: expected key=value, got '{item}'")]
    NotKeyValue {
        /// The option.
        option: &'static str,
        /// The item.
        item: String,
    },
    /// A key the option does not know.
    #[error("{option}: unknown key '{key}' (expected one of: {known})")]
    UnknownKey {
        /// The option.
        option: &'static str,
        /// The key.
        key: String,
        /// The keys the option knows, comma separated.
        known: String,
    },
    /// A key given twice in one option value.
    #[error("{option}: '{key}' given more than once")]
    DuplicateKey {
        /// The option.
        option: &'static str,
        /// The key.
        key: String,
    },
    /// A key without a value (`path` or `path=`).
    #[error("{option}: '{key}' needs a value ({key}=...)")]
    MissingValue {
        /// The option.
        option: &'static str,
        /// The key.
        key: String,
    },
    /// A required key is absent.
    #[error("{option}: missing '{key}=...'")]
    MissingKey {
        /// The option.
        option: &'static str,
        /// The key.
        key: &'static str,
    },
    /// A value that does not parse or is out of range.
    #[error("{option}: invalid {key}={value}: {reason}")]
    InvalidValue {
        /// The option.
        option: &'static str,
        /// The key (or the option's name for plain values).
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two options (or two devices) conflict.
    #[error("{0}")]
    Conflict(String),
    /// A file named on the command line cannot be used.
    #[error("{what} {path}: {reason}")]
    File {
        /// What the file is for ("kernel", "disk image"...).
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
}

/// Where an 8250 serial port or a virtio console sends its output (and,
/// for `Tty`, takes its input from).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// No device.
    Off,
    /// The terminal: stdout for output, stdin for input.
    Tty,
    /// Output appended to a file; no input.
    File(PathBuf),
}

/// A `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// Whether the guest may only read.
    pub readonly: bool,
    /// Whether the image is locked while the VM runs (shared when
    /// read-only, exclusive otherwise), so that no other VM writes it
    /// meanwhile; on unless `lock=off`.
    pub lock: bool,
    /// Device ID (also the virtio-blk serial); `diskN` unless given.
    pub id: String,
}

/// A `--net`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface; created if no interface has that name.
    pub tap: String,
    /// The guest's MAC address; a random locally administered one unless
    /// given.
    pub mac: Option<MacAddr>,
    /// Device ID; `netN` unless given.
    pub id: String,
}

/// A `--rng`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngConfig {
    /// The host entropy source.
    pub src: PathBuf,
}

/// A `--device` (VFIO passthrough).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioDeviceConfig {
    /// The sysfs path of the host function.
    pub path: PathBuf,
    /// Its address, taken from the path.
    pub address: HostPciAddress,
    /// Device ID; `vfioN` unless given.
    pub id: String,
}

/// Everything a VM is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initial ramdisk.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// Number of vCPUs at boot.
    pub vcpus: u8,
    /// virtio-blk devices.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices.
    pub nets: Vec<NetConfig>,
    /// The virtio-rng device.
    pub rng: Option<RngConfig>,
    /// The virtio-console device.
    pub console: OutputMode,
    /// The 8250 serial port (COM1).
    pub serial: OutputMode,
    /// Host PCI functions to pass through.
    pub vfio_devices: Vec<VfioDeviceConfig>,
    /// How many `-v` were given.
    pub verbosity: u8,
}

/// The command line grammar (clap). Option values are kept as strings and
/// parsed by [`VmConfig::from_cli`].
#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: a KVM virtual machine monitor for virtio over PCI",
    after_help = "Paths inside key=value lists cannot contain commas."
)]
pub struct Cli {
    /// Kernel image to boot (ELF vmlinux with a PVH note, or bzImage).
    #[arg(long, value_name = "PATH")]
    pub kernel: String,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<String>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1" with the serial port on].
    #[arg(long, value_name = "CMDLINE")]
    pub cmdline: Option<String>,
    /// Guest RAM, with a K, M, G or T suffix [default: size=512M].
    #[arg(long, value_name = "size=SIZE")]
    pub memory: Option<String>,
    /// Number of vCPUs, 1 to 64 [default: boot=1].
    #[arg(long, value_name = "boot=N")]
    pub cpus: Option<String>,
    /// A virtio-blk disk (repeatable). The image is locked while the VM runs: shared if readonly=on, else exclusive; lock=off skips that.
    #[arg(long, value_name = "path=IMG[,readonly=on|off][,lock=on|off][,id=ID]", action = ArgAction::Append)]
    pub disk: Vec<String>,
    /// A virtio-net NIC on a host tap interface, created if missing (repeatable).
    #[arg(long, value_name = "tap=NAME[,mac=MAC][,id=ID]", action = ArgAction::Append)]
    pub net: Vec<String>,
    /// A virtio-rng device [default source: /dev/urandom].
    #[arg(long, value_name = "src=PATH", num_args = 0..=1, default_missing_value = "")]
    pub rng: Option<String>,
    /// The virtio console [default: off].
    #[arg(long, value_name = "off|tty|file=PATH")]
    pub console: Option<String>,
    /// The 8250 serial port on COM1 [default: tty].
    #[arg(long, value_name = "off|tty|file=PATH")]
    pub serial: Option<String>,
    /// Host PCI function to pass through with VFIO (repeatable).
    #[arg(long, value_name = "path=/sys/bus/pci/devices/DDDD:BB:DD.F[,id=ID]", action = ArgAction::Append)]
    pub device: Vec<String>,
    /// More logging: -v info, -vv debug, -vvv trace.
    #[arg(short, long, action = ArgAction::Count)]
    pub verbose: u8,
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run a VM.
    Run(Box<VmConfig>),
    /// Print this text (help or version) to stdout and exit successfully.
    Print(String),
}

/// Parses a whole command line, `args[0]` being the program name.
///
/// Arguments with control characters (line breaks, escapes) are refused up
/// front: every error quotes the user's input, and must stay one line that
/// cannot rewrite the terminal.
pub fn parse_args(args: &[String]) -> Result<Invocation, ConfigError> {
    if let Some((n, arg)) = args
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, a)| a.chars().any(char::is_control))
    {
        return Err(ConfigError::Usage(format!(
            "argument {n} ('{}') contains a control character",
            arg.escape_debug()
        )));
    }
    match Cli::try_parse_from(args) {
        Ok(cli) => Ok(Invocation::Run(Box::new(VmConfig::from_cli(&cli)?))),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            Ok(Invocation::Print(e.to_string()))
        }
        Err(e) => Err(ConfigError::Usage(first_line_of_clap_error(&e.to_string()))),
    }
}

/// clap's message is "error: <what>\n  <detail lines>\n\n<tip>\n\nUsage: ...";
/// keep the first paragraph, on one line.
fn first_line_of_clap_error(text: &str) -> String {
    let paragraph: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = paragraph.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// The `log` filter for a verbosity level: warnings from everything and
/// info from the binary (which includes the PCI topology) by default.
/// vfio-ioctls warns about interrupt kinds a device lacks (error and
/// request interrupts); by default only its errors show.
pub fn log_filter(verbosity: u8) -> &'static str {
    match verbosity {
        0 => "warn,trellis=info,vfio_ioctls=error",
        1 => "info",
        2 => "debug",
        _ => "trace",
    }
}

impl VmConfig {
    /// Parses a command line into a configuration; `--help` and
    /// `--version` are reported as [`ConfigError::Usage`] here (use
    /// [`parse_args`] to handle them).
    pub fn parse(args: &[String]) -> Result<VmConfig, ConfigError> {
        match parse_args(args)? {
            Invocation::Run(config) => Ok(*config),
            Invocation::Print(_) => Err(ConfigError::Usage(
                "--help and --version do not describe a VM".to_string(),
            )),
        }
    }

    /// Checks and converts clap's raw option values.
    pub fn from_cli(cli: &Cli) -> Result<VmConfig, ConfigError> {
        let serial = match &cli.serial {
            Some(s) => parse_output("--serial", s)?,
            None => OutputMode::Tty,
        };
        let console = match &cli.console {
            Some(s) => parse_output("--console", s)?,
            None => OutputMode::Off,
        };
        if serial == OutputMode::Tty && console == OutputMode::Tty {
            return Err(ConfigError::Conflict(
                "--serial and --console cannot both use the terminal; \
                 set one of them to off or file=PATH (the serial port is tty by default)"
                    .to_string(),
            ));
        }
        let cmdline = match &cli.cmdline {
            Some(c) => check_cmdline(c)?,
            None if serial == OutputMode::Off => "reboot=k panic=1".to_string(),
            None => "console=ttyS0 reboot=k panic=1".to_string(),
        };
        let config = VmConfig {
            kernel: non_empty_path("--kernel", &cli.kernel)?,
            initramfs: cli
                .initramfs
                .as_deref()
                .map(|p| non_empty_path("--initramfs", p))
                .transpose()?,
            cmdline,
            memory_size: cli
                .memory
                .as_deref()
                .map_or(Ok(DEFAULT_MEMORY), parse_memory)?,
            vcpus: cli.cpus.as_deref().map_or(Ok(1), parse_cpus)?,
            disks: numbered(&cli.disk, parse_disk)?,
            nets: numbered(&cli.net, parse_net)?,
            rng: cli.rng.as_deref().map(parse_rng).transpose()?,
            console,
            serial,
            vfio_devices: numbered(&cli.device, parse_vfio)?,
            verbosity: cli.verbose,
        };
        config.check_ids()?;
        Ok(config)
    }

    fn check_ids(&self) -> Result<(), ConfigError> {
        let ids = self
            .disks
            .iter()
            .map(|d| &d.id)
            .chain(self.nets.iter().map(|n| &n.id))
            .chain(self.vfio_devices.iter().map(|v| &v.id));
        let mut seen = BTreeSet::new();
        for id in ids {
            if !seen.insert(id) {
                return Err(ConfigError::Conflict(format!(
                    "device id '{id}' is used twice"
                )));
            }
        }
        let mut taps = BTreeSet::new();
        for net in &self.nets {
            if !taps.insert(&net.tap) {
                return Err(ConfigError::Conflict(format!(
                    "--net: tap '{}' is used twice",
                    net.tap
                )));
            }
        }
        let mut functions = BTreeSet::new();
        for dev in &self.vfio_devices {
            if !functions.insert(dev.address) {
                return Err(ConfigError::Conflict(format!(
                    "--device: {} is passed through twice",
                    dev.address
                )));
            }
        }
        Ok(())
    }

    /// Checks that the files the VM needs exist and have the right kind:
    /// the kernel, initramfs and disk images must be readable regular
    /// files (disks may also be block devices), the rng source must exist.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        check_file("kernel", &self.kernel, false)?;
        if let Some(initramfs) = &self.initramfs {
            check_file("initramfs", initramfs, false)?;
        }
        for disk in &self.disks {
            check_file("disk image", &disk.path, true)?;
        }
        if let Some(rng) = &self.rng {
            std::fs::metadata(&rng.src).map_err(|e| ConfigError::File {
                what: "entropy source",
                path: rng.src.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

fn check_file(what: &'static str, path: &Path, block_ok: bool) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    let fail = |reason: String| ConfigError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let kind = meta.file_type();
    if !(kind.is_file() || block_ok && kind.is_block_device()) {
        return Err(fail("not a regular file".to_string()));
    }
    std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    Ok(())
}

fn non_empty_path(option: &'static str, p: &str) -> Result<PathBuf, ConfigError> {
    if p.is_empty() {
        return Err(ConfigError::Empty { option });
    }
    Ok(PathBuf::from(p))
}

/// Parses each value with its index (for default IDs).
fn numbered<T>(
    values: &[String],
    parse: impl Fn(usize, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| parse(i, v))
        .collect()
}

fn check_cmdline(c: &str) -> Result<String, ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidValue {
        option: "--cmdline",
        key: "cmdline",
        value: format!(
            "{}...",
            c.chars().take(40).collect::<String>().escape_debug()
        ),
        reason: reason.to_string(),
    };
    if c.len() > MAX_CMDLINE_LEN {
        return Err(invalid(&format!(
            "{} bytes, the limit is {MAX_CMDLINE_LEN}",
            c.len()
        )));
    }
    if c.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    Ok(c.to_string())
}

fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let opts = OptionList::parse("--memory", s, &["size"])?;
    opts.required_with("size", |v| {
        let size = parse_size(v)?;
        if size < MIN_MEMORY {
            return Err(format!("the minimum is {}M", MIN_MEMORY >> 20));
        }
        if size > MAX_MEMORY {
            return Err(format!("the maximum is {}G", MAX_MEMORY >> 30));
        }
        if size % 4096 != 0 {
            return Err("must be a multiple of 4K".to_string());
        }
        Ok(size)
    })
}

fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    let opts = OptionList::parse("--cpus", s, &["boot"])?;
    opts.required_with("boot", |v| match v.parse::<u8>() {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(format!("expected a number from 1 to {MAX_VCPUS}")),
    })
}

fn parse_id(opts: &OptionList<'_>, prefix: &str, index: usize) -> Result<String, ConfigError> {
    Ok(opts
        .get_with("id", check_id)?
        .unwrap_or_else(|| format!("{prefix}{index}")))
}

fn parse_disk(index: usize, s: &str) -> Result<DiskConfig, ConfigError> {
    let opts = OptionList::parse("--disk", s, &["path", "readonly", "lock", "id"])?;
    Ok(DiskConfig {
        path: PathBuf::from(opts.required("path")?),
        readonly: opts.get_with("readonly", parse_switch)?.unwrap_or(false),
        lock: opts.get_with("lock", parse_switch)?.unwrap_or(true),
        id: parse_id(&opts, "disk", index)?,
    })
}

fn parse_net(index: usize, s: &str) -> Result<NetConfig, ConfigError> {
    let opts = OptionList::parse("--net", s, &["tap", "mac", "id"])?;
    let tap = opts.required("tap")?;
    let tap = check_ifname(tap).map_err(|reason| ConfigError::InvalidValue {
        option: "--net",
        key: "tap",
        value: tap.to_string(),
        reason,
    })?;
    Ok(NetConfig {
        tap,
        mac: opts.get_with("mac", parse_mac)?,
        id: parse_id(&opts, "net", index)?,
    })
}

fn parse_rng(s: &str) -> Result<RngConfig, ConfigError> {
    if s.is_empty() {
        return Ok(RngConfig {
            src: PathBuf::from(DEFAULT_RNG_SOURCE),
        });
    }
    let opts = OptionList::parse("--rng", s, &["src"])?;
    Ok(RngConfig {
        src: PathBuf::from(opts.get("src").unwrap_or(DEFAULT_RNG_SOURCE)),
    })
}

fn parse_output(option: &'static str, s: &str) -> Result<OutputMode, ConfigError> {
    match s {
        "off" => Ok(OutputMode::Off),
        "tty" => Ok(OutputMode::Tty),
        "" => Err(ConfigError::Empty { option }),
        _ if !s.contains('=') && !s.contains(',') => Err(ConfigError::InvalidValue {
            option,
            key: "mode",
            value: s.to_string(),
            reason: "expected off, tty or file=PATH".to_string(),
        }),
        _ => {
            let opts = OptionList::parse(option, s, &["file"])?;
            Ok(OutputMode::File(PathBuf::from(opts.required("file")?)))
        }
    }
}

fn parse_vfio(index: usize, s: &str) -> Result<VfioDeviceConfig, ConfigError> {
    let opts = OptionList::parse("--device", s, &["path", "id"])?;
    let path = opts.required("path")?;
    let address = opts.required_with("path", |p| {
        let name = p
            .strip_prefix(SYSFS_PCI_DEVICES)
            .and_then(|rest| rest.strip_prefix('/'))
            .map(|rest| rest.trim_end_matches('/'))
            .ok_or_else(|| format!("expected {SYSFS_PCI_DEVICES}/DDDD:BB:DD.F"))?;
        name.parse::<HostPciAddress>()
    })?;
    Ok(VfioDeviceConfig {
        path: PathBuf::from(path),
        address,
        id: parse_id(&opts, "vfio", index)?,
    })
}
