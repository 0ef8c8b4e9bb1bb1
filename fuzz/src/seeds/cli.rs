//! Seeds of `cli_args`.

use crate::cli_args::Key;
use crate::cli_args::{run, run_line, Arg, Item, Name, Val};

/// Index of `key` in the parser's dictionary (`cli_args::KEYS`).
fn k(key: &str) -> Key {
    let keys = [
        "path", "readonly", "id", "tap", "mac", "src", "file", "size", "boot", "off", "tty", "",
        "lock",
    ];
    Key::Known(keys.iter().position(|x| *x == key).expect("known key") as u8)
}

fn text(s: &str) -> Val {
    Val::Text(s.as_bytes().to_vec())
}

fn pair(key: &str, v: Val) -> Item {
    Item::Pair(k(key), v)
}

fn opt(name: Name, items: Vec<Item>) -> Arg {
    Arg::OptEq(name, items)
}

/// Every option, valid.
fn full() -> Vec<Arg> {
    vec![
        Arg::Opt(Name::Kernel),
        Arg::Raw(b"/boot/vmlinux".to_vec()),
        opt(Name::Memory, vec![pair("size", Val::Size(2, 2))]),
        opt(Name::Cpus, vec![pair("boot", Val::Size(4, 0))]),
        opt(
            Name::Disk,
            vec![
                pair("path", text("/img/root.raw")),
                pair("readonly", Val::Word(0)),
                pair("id", text("root")),
            ],
        ),
        opt(Name::Disk, vec![pair("path", text("/img/b=c"))]),
        opt(
            Name::Net,
            vec![
                pair("tap", text("tap0")),
                pair("mac", Val::Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])),
            ],
        ),
        Arg::Opt(Name::Rng),
        opt(Name::Console, vec![pair("file", text("/tmp/console.log"))]),
        opt(Name::Serial, vec![Item::Bare(k("off"))]),
        opt(
            Name::Device,
            vec![pair("path", Val::Pci(0, 1, 0, 0)), pair("id", text("gpu"))],
        ),
        Arg::Opt(Name::Cmdline),
        Arg::Raw(b"console=hvc0 root=/dev/vda rw".to_vec()),
        Arg::Opt(Name::VeryVerbose),
    ]
}

/// Values the parser must refuse, one line each.
fn errors() -> Vec<Arg> {
    vec![
        Arg::Opt(Name::Kernel),
        Arg::Val(Val::Word(5)),
        opt(Name::Memory, vec![pair("size", Val::Size(63, 2))]),
        opt(
            Name::Disk,
            vec![pair("path", text("/a")), Item::Bare(k("id"))],
        ),
        opt(
            Name::Net,
            vec![pair("tap", text("a:b")), pair("tap", text("x"))],
        ),
        opt(Name::Cpus, vec![pair("boot", Val::Size(65, 0))]),
        Arg::List(vec![pair("size", Val::Size(u64::MAX, 4))]),
        opt(Name::Unknown, vec![]),
    ]
}

/// Duplicates and conflicts, help.
fn conflicts() -> Vec<Arg> {
    vec![
        Arg::Opt(Name::Kernel),
        Arg::Val(Val::Word(5)),
        opt(
            Name::Disk,
            vec![pair("path", text("/a")), pair("id", text("x"))],
        ),
        opt(
            Name::Net,
            vec![pair("tap", text("t")), pair("id", text("x"))],
        ),
        opt(Name::Console, vec![Item::Bare(k("tty"))]),
        opt(Name::Device, vec![pair("path", Val::Pci(0, 1, 0x20, 9))]),
        Arg::Opt(Name::Help),
        Arg::Opt(Name::DoubleDash),
        Arg::Opt(Name::Version),
    ]
}

#[test]
fn seeds() {
    let seeds = [
        ("full", full()),
        ("errors", errors()),
        ("conflicts", conflicts()),
    ];
    super::check_seeds("cli_args", &seeds, |args: &Vec<Arg>| run(args));
}

fn line(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Regression, as found by the fuzzer and minimized: errors quoted the key
/// or value at fault as given, so a line break in it made the message two
/// lines ("--disk: unknown key 'x\ny' (expected ...)"); the same for every
/// "invalid KEY=VALUE" error. Fixed in vmm (arguments with control
/// characters are refused, escaped).
#[test]
fn errors_quote_line_breaks() {
    for arg in [
        "--disk=path=/a,x\ny=1",
        "--memory=size=1\n",
        "--net=tap=a\nb",
        "--console=a\rb",
        "a\u{1b}[2J",
    ] {
        run_line(&line(&["trellis", "--kernel=/k", arg]));
    }
}
