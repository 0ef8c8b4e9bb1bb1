//! The `cli_args` target: `vmm::config::parse_args` on argument vectors
//! built from the option names and `key=value` grammar it knows, with
//! fuzzed values and raw text mixed in.
//!
//! Invariants: no panic; parsing is deterministic; every error's message
//! is one non-empty line without control characters; a configuration that parses is valid (sizes,
//! counts, names and ids in their documented ranges, unique ids, taps and
//! host functions, not two users of the terminal), and renders back into
//! a command line that parses to the same configuration.

use arbitrary::Arbitrary;
use vmm::config::{
    parse_args, Invocation, OutputMode, VmConfig, MAX_CMDLINE_LEN, MAX_MEMORY, MAX_VCPUS,
    MIN_MEMORY, SYSFS_PCI_DEVICES,
};

use crate::encode::{variant, Encode};

/// Arguments per input.
pub const MAX_ARGS: usize = 24;

/// An option name.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name {
    Kernel,
    Initramfs,
    Cmdline,
    Memory,
    Cpus,
    Disk,
    Net,
    Rng,
    Console,
    Serial,
    Device,
    /// `-v`.
    Verbose,
    /// `-vvv`.
    VeryVerbose,
    Help,
    Version,
    /// `--`.
    DoubleDash,
    /// An option clap does not know.
    Unknown,
}

const NAMES: [&str; 17] = [
    "--kernel",
    "--initramfs",
    "--cmdline",
    "--memory",
    "--cpus",
    "--disk",
    "--net",
    "--rng",
    "--console",
    "--serial",
    "--device",
    "-v",
    "-vvv",
    "--help",
    "--version",
    "--",
    "--bogus",
];

/// A key of a `key=value` item.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// One the parser knows for some option.
    Known(u8),
    /// Anything.
    Text(Vec<u8>),
}

const KEYS: [&str; 13] = [
    "path", "readonly", "id", "tap", "mac", "src", "file", "size", "boot", "off", "tty", "", "lock",
];

/// A value.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Val {
    /// A word the parser knows.
    Word(u8),
    /// A number with an optional size suffix.
    Size(u64, u8),
    /// A MAC address.
    Mac([u8; 6]),
    /// A host PCI function path.
    Pci(u16, u8, u8, u8),
    /// Anything.
    Text(Vec<u8>),
}

const WORDS: [&str; 16] = [
    "on",
    "off",
    "true",
    "false",
    "tty",
    "/k",
    "/tmp/disk.img",
    "/dev/urandom",
    "tap0",
    "disk0",
    "net0",
    ".",
    "..",
    "a:b",
    "é",
    "99999999999999999999999",
];
const SUFFIXES: [&str; 7] = ["", "K", "M", "G", "T", "k", "X"];

/// An item of a `key=value,...` list.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// `key=value`.
    Pair(Key, Val),
    /// `key` alone.
    Bare(Key),
}

/// One argument.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    /// An option name alone.
    Opt(Name),
    /// `--name=value`.
    OptEq(Name, Vec<Item>),
    /// A `key=value,...` list.
    List(Vec<Item>),
    /// A plain value.
    Val(Val),
    /// Raw text.
    Raw(Vec<u8>),
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn key(k: &Key) -> String {
    match k {
        Key::Known(i) => KEYS[usize::from(*i) % KEYS.len()].to_string(),
        Key::Text(b) => text(b),
    }
}

fn val(v: &Val) -> String {
    match v {
        Val::Word(i) => WORDS[usize::from(*i) % WORDS.len()].to_string(),
        Val::Size(n, s) => format!("{n}{}", SUFFIXES[usize::from(*s) % SUFFIXES.len()]),
        Val::Mac(b) => b
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        Val::Pci(seg, bus, dev, func) => {
            format!("{SYSFS_PCI_DEVICES}/{seg:04x}:{bus:02x}:{dev:02x}.{func:x}")
        }
        Val::Text(b) => text(b),
    }
}

fn list(items: &[Item]) -> String {
    items
        .iter()
        .map(|i| match i {
            Item::Pair(k, v) => format!("{}={}", key(k), val(v)),
            Item::Bare(k) => key(k),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The command line `args` describe, program name first.
pub fn command_line(args: &[Arg]) -> Vec<String> {
    let mut out = vec!["trellis".to_string()];
    for a in args.iter().take(MAX_ARGS) {
        out.push(match a {
            Arg::Opt(n) => NAMES[*n as usize].to_string(),
            Arg::OptEq(n, items) => format!("{}={}", NAMES[*n as usize], list(items)),
            Arg::List(items) => list(items),
            Arg::Val(v) => val(v),
            Arg::Raw(b) => text(b),
        });
    }
    out
}

/// Runs one input.
pub fn run(args: &[Arg]) {
    run_line(&command_line(args));
}

/// Checks `line` (program name first).
pub fn run_line(line: &[String]) {
    let first = parse_args(line);
    let second = parse_args(line);
    assert_eq!(first, second, "{line:?}: two parses differ");
    match first {
        Err(e) => {
            // One line, and nothing that could rewrite the terminal.
            let msg = e.to_string();
            assert!(
                !msg.is_empty() && !msg.chars().any(char::is_control),
                "{line:?}: error message is not one plain line: {msg:?}"
            );
        }
        Ok(Invocation::Print(text)) => assert!(!text.is_empty(), "{line:?}: empty help"),
        Ok(Invocation::Run(config)) => {
            check_config(&config, line);
            let again = render(&config);
            match parse_args(&again) {
                Ok(Invocation::Run(c)) => assert_eq!(
                    c, config,
                    "{line:?}: rendered as {again:?}, which parses differently"
                ),
                other => panic!("{line:?}: rendered as {again:?}, which gives {other:?}"),
            }
        }
    }
}

fn valid_id(id: &str) -> bool {
    (1..=20).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

fn check_config(c: &VmConfig, line: &[String]) {
    let bad = |what: &str| -> ! { panic!("{line:?}: accepted, but {what}: {c:#?}") };
    if c.kernel.as_os_str().is_empty() {
        bad("no kernel");
    }
    if c.initramfs
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        bad("empty initramfs path");
    }
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&c.memory_size) || !c.memory_size.is_multiple_of(4096) {
        bad("memory size out of range");
    }
    if !(1..=MAX_VCPUS).contains(&c.vcpus) {
        bad("vCPU count out of range");
    }
    if c.cmdline.len() > MAX_CMDLINE_LEN || c.cmdline.contains('\0') {
        bad("bad kernel command line");
    }
    let mut ids = std::collections::BTreeSet::new();
    for d in &c.disks {
        if d.path.as_os_str().is_empty() || !valid_id(&d.id) || !ids.insert(d.id.clone()) {
            bad("bad disk");
        }
    }
    let mut taps = std::collections::BTreeSet::new();
    for n in &c.nets {
        let mac_ok = n
            .mac
            .is_none_or(|m| m.bytes()[0] & 1 == 0 && m.bytes() != [0; 6]);
        if !valid_ifname(&n.tap) || !mac_ok || !valid_id(&n.id) || !ids.insert(n.id.clone()) {
            bad("bad net");
        }
        if !taps.insert(n.tap.clone()) {
            bad("a tap used twice");
        }
    }
    let mut functions = std::collections::BTreeSet::new();
    for v in &c.vfio_devices {
        let path = v.path.to_string_lossy();
        let named = path
            .strip_prefix(SYSFS_PCI_DEVICES)
            .and_then(|p| p.strip_prefix('/'))
            .is_some_and(|p| p.trim_end_matches('/') == v.address.to_string());
        if !named || !valid_id(&v.id) || !ids.insert(v.id.clone()) {
            bad("bad VFIO device");
        }
        if !functions.insert(v.address) {
            bad("a host function passed through twice");
        }
    }
    if c.rng.as_ref().is_some_and(|r| r.src.as_os_str().is_empty()) {
        bad("empty entropy source");
    }
    for mode in [&c.console, &c.serial] {
        if matches!(mode, OutputMode::File(p) if p.as_os_str().is_empty()) {
            bad("empty output file");
        }
    }
    if c.console == OutputMode::Tty && c.serial == OutputMode::Tty {
        bad("console and serial both on the terminal");
    }
}

fn output(mode: &OutputMode) -> String {
    match mode {
        OutputMode::Off => "off".into(),
        OutputMode::Tty => "tty".into(),
        OutputMode::File(p) => format!("file={}", p.display()),
    }
}

/// A command line for `c`, every option spelled out.
pub fn render(c: &VmConfig) -> Vec<String> {
    let mut a = vec![
        "trellis".to_string(),
        format!("--kernel={}", c.kernel.display()),
        format!("--cmdline={}", c.cmdline),
        format!("--memory=size={}", c.memory_size),
        format!("--cpus=boot={}", c.vcpus),
        format!("--console={}", output(&c.console)),
        format!("--serial={}", output(&c.serial)),
    ];
    if let Some(p) = &c.initramfs {
        a.push(format!("--initramfs={}", p.display()));
    }
    for d in &c.disks {
        let ro = if d.readonly { "on" } else { "off" };
        let lock = if d.lock { "on" } else { "off" };
        a.push(format!(
            "--disk=path={},readonly={ro},lock={lock},id={}",
            d.path.display(),
            d.id
        ));
    }
    for n in &c.nets {
        let mac = n.mac.map(|m| format!(",mac={m}")).unwrap_or_default();
        a.push(format!("--net=tap={}{mac},id={}", n.tap, n.id));
    }
    if let Some(r) = &c.rng {
        a.push(format!("--rng=src={}", r.src.display()));
    }
    for v in &c.vfio_devices {
        a.push(format!("--device=path={},id={}", v.path.display(), v.id));
    }
    a.extend((0..c.verbosity).map(|_| "-v".to_string()));
    a
}

impl Encode for Name {
    fn encode(&self, out: &mut Vec<u8>) {
        variant(out, *self as u32, NAMES.len() as u32);
    }
}

impl Encode for Key {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Key::Known(i) => {
                variant(out, 0, 2);
                i.encode(out);
            }
            Key::Text(b) => {
                variant(out, 1, 2);
                b.encode(out);
            }
        }
    }
}

impl Encode for Val {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::Word(i) => {
                variant(out, 0, 5);
                i.encode(out);
            }
            Val::Size(n, s) => {
                variant(out, 1, 5);
                n.encode(out);
                s.encode(out);
            }
            Val::Mac(b) => {
                variant(out, 2, 5);
                out.extend_from_slice(b);
            }
            Val::Pci(seg, bus, dev, func) => {
                variant(out, 3, 5);
                seg.encode(out);
                bus.encode(out);
                dev.encode(out);
                func.encode(out);
            }
            Val::Text(b) => {
                variant(out, 4, 5);
                b.encode(out);
            }
        }
    }
}

impl Encode for Item {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Item::Pair(k, v) => {
                variant(out, 0, 2);
                k.encode(out);
                v.encode(out);
            }
            Item::Bare(k) => {
                variant(out, 1, 2);
                k.encode(out);
            }
        }
    }
}

impl Encode for Arg {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Arg::Opt(n) => {
                variant(out, 0, 5);
                n.encode(out);
            }
            Arg::OptEq(n, items) => {
                variant(out, 1, 5);
                n.encode(out);
                items.encode(out);
            }
            Arg::List(items) => {
                variant(out, 2, 5);
                items.encode(out);
            }
            Arg::Val(v) => {
                variant(out, 3, 5);
                v.encode(out);
            }
            Arg::Raw(b) => {
                variant(out, 4, 5);
                b.encode(out);
            }
        }
    }
}
