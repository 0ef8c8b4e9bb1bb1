use std::path::PathBuf;

use super::*;

fn args(extra: &[&str]) -> Vec<String> {
    ["trellis", "--kernel", "/k"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

fn parse(extra: &[&str]) -> Result<VmConfig, ConfigError> {
    VmConfig::parse(&args(extra))
}

fn err(extra: &[&str]) -> String {
    let e = parse(extra).expect_err("should be rejected");
    let text = e.to_string();
    assert!(!text.contains('\n'), "one line: {text:?}");
    text
}

#[test]
fn defaults() {
    let c = parse(&[]).unwrap();
    assert_eq!(c.kernel, PathBuf::from("/k"));
    assert_eq!(c.initramfs, None);
    assert_eq!(c.memory_size, 512 << 20);
    assert_eq!(c.vcpus, 1);
    assert_eq!(c.serial, OutputMode::Tty);
    assert_eq!(c.console, OutputMode::Off);
    assert_eq!(c.cmdline, "console=ttyS0 reboot=k panic=1");
    assert!(c.disks.is_empty() && c.nets.is_empty() && c.vfio_devices.is_empty());
    assert_eq!(c.rng, None);
    assert_eq!(c.verbosity, 0);
}

#[test]
fn a_full_command_line() {
    let c = parse(&[
        "--initramfs",
        "/i",
        "--cmdline",
        "console=hvc0 quiet",
        "--memory",
        "size=2G",
        "--cpus",
        "boot=4",
        "--disk",
        "path=/a.img",
        "--disk",
        "path=/b.img,readonly=on,id=data",
        "--disk",
        "path=/c.img,lock=off",
        "--net",
        "tap=tap0,mac=52:54:00:12:34:56",
        "--net",
        "tap=tap1",
        "--rng",
        "--console",
        "tty",
        "--serial",
        "file=/tmp/serial.log",
        "--device",
        "path=/sys/bus/pci/devices/0000:01:00.0/",
        "-vv",
    ])
    .unwrap();
    assert_eq!(c.initramfs, Some(PathBuf::from("/i")));
    assert_eq!(c.cmdline, "console=hvc0 quiet");
    assert_eq!(c.memory_size, 2 << 30);
    assert_eq!(c.vcpus, 4);
    assert_eq!(
        c.disks,
        vec![
            DiskConfig {
                path: "/a.img".into(),
                readonly: false,
                lock: true,
                id: "disk0".into()
            },
            DiskConfig {
                path: "/b.img".into(),
                readonly: true,
                lock: true,
                id: "data".into()
            },
            DiskConfig {
                path: "/c.img".into(),
                readonly: false,
                lock: false,
                id: "disk2".into()
            },
        ]
    );
    assert_eq!(c.nets[0].mac.unwrap().to_string(), "52:54:00:12:34:56");
    assert_eq!(
        (c.nets[1].tap.as_str(), c.nets[1].id.as_str()),
        ("tap1", "net1")
    );
    assert_eq!(c.nets[1].mac, None, "the device picks one");
    assert_eq!(c.rng.unwrap().src, PathBuf::from("/dev/urandom"));
    assert_eq!(c.console, OutputMode::Tty);
    assert_eq!(c.serial, OutputMode::File("/tmp/serial.log".into()));
    let dev = &c.vfio_devices[0];
    assert_eq!(dev.address.to_string(), "0000:01:00.0");
    assert_eq!(dev.id, "vfio0");
    assert_eq!(c.verbosity, 2);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("0"), Ok(0));
    assert_eq!(parse_size("4096"), Ok(4096));
    assert_eq!(parse_size("64K"), Ok(64 << 10));
    assert_eq!(parse_size("64k"), Ok(64 << 10));
    assert_eq!(parse_size("3M"), Ok(3 << 20));
    assert_eq!(parse_size("1G"), Ok(1 << 30));
    assert_eq!(parse_size("1T"), Ok(1 << 40));
    for bad in [
        "",
        "M",
        "1.5G",
        "-1G",
        "1GB",
        "1Q",
        "G1",
        " 1G",
        "99999999999999999999",
    ] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
    assert!(parse_size("17179869184G").is_err(), "overflow");
    assert_eq!(
        parse(&["--memory", "size=64M"]).unwrap().memory_size,
        64 << 20
    );
    assert_eq!(
        parse(&["--memory", "size=1T"]).unwrap().memory_size,
        1 << 40
    );
    assert_eq!(
        err(&["--memory", "size=63M"]),
        "--memory: invalid size=63M: the minimum is 64M"
    );
    assert_eq!(
        err(&["--memory", "size=2T"]),
        "--memory: invalid size=2T: the maximum is 1024G"
    );
    assert_eq!(
        err(&["--memory", "size=12Q"]),
        "--memory: invalid size=12Q: unknown suffix 'Q' (use K, M, G or T)"
    );
    assert!(err(&["--memory", "size=65537K"]).contains("multiple of 4K"));
    assert_eq!(
        err(&["--memory", "512M"]),
        "--memory: expected key=value, got '512M'"
    );
}

#[test]
fn key_value_errors() {
    assert_eq!(
        err(&["--disk", "path=/a,foo=1"]),
        "--disk: unknown key 'foo' (expected one of: path, readonly, lock, id)"
    );
    assert_eq!(
        err(&["--disk", "path=/a,path=/b"]),
        "--disk: 'path' given more than once"
    );
    assert_eq!(
        err(&["--disk", "path="]),
        "--disk: 'path' needs a value (path=...)"
    );
    assert_eq!(
        err(&["--disk", "path"]),
        "--disk: 'path' needs a value (path=...)"
    );
    assert_eq!(
        err(&["--disk", "readonly=on"]),
        "--disk: missing 'path=...'"
    );
    assert_eq!(
        err(&["--disk", "path=/a,"]),
        "--disk: empty value or empty item"
    );
    assert_eq!(err(&["--disk", ""]), "--disk: empty value or empty item");
    assert_eq!(
        err(&["--disk", "path=/a,readonly=yes"]),
        "--disk: invalid readonly=yes: expected on or off"
    );
    assert_eq!(
        err(&["--disk", "path=/a,lock=maybe"]),
        "--disk: invalid lock=maybe: expected on or off"
    );
    assert_eq!(
        err(&["--disk", "path=/a,lock=off,lock=on"]),
        "--disk: 'lock' given more than once"
    );
    assert_eq!(
        err(&["--disk", "path=/a,lock"]),
        "--disk: 'lock' needs a value (lock=...)"
    );
    assert!(err(&["--disk", "path=/a,id=has space"]).starts_with("--disk: invalid id="));
    assert!(err(&["--disk", "path=/a,id=abcdefghijklmnopqrstu"]).contains("at most 20"));
    assert_eq!(
        err(&["--cpus", "boot=0"]),
        "--cpus: invalid boot=0: expected a number from 1 to 64"
    );
    assert!(err(&["--cpus", "boot=65"]).contains("1 to 64"));
    assert!(err(&["--cpus", "boot=x"]).contains("1 to 64"));
    assert_eq!(
        err(&["--cpus", "max=2"]),
        "--cpus: unknown key 'max' (expected one of: boot)"
    );
}

#[test]
fn nets_and_macs() {
    for bad in [
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52-54-00-12-34-56",
        "152:54:00:12:34:56",
        "zz:54:00:12:34:56",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "00:00:00:00:00:00",
    ] {
        let text = err(&["--net", &format!("tap=t0,mac={bad}")]);
        assert!(text.starts_with("--net: invalid mac="), "{bad}: {text}");
    }
    assert_eq!(
        err(&["--net", "mac=52:54:00:12:34:56"]),
        "--net: missing 'tap=...'"
    );
    assert!(err(&["--net", "tap=a/b"]).contains("cannot contain"));
    assert!(err(&["--net", "tap=..",]).contains("not a valid"));
    assert!(err(&["--net", "tap=abcdefghijklmnop"]).contains("at most 15"));
    assert_eq!(
        err(&["--net", "tap=t0", "--net", "tap=t0"]),
        "--net: tap 't0' is used twice"
    );
    let mac = parse_mac("52:54:00:AB:cd:EF").unwrap();
    assert_eq!(mac.to_string(), "52:54:00:ab:cd:ef");
}

#[test]
fn ids_must_be_unique_across_devices() {
    assert_eq!(
        err(&["--disk", "path=/a,id=x", "--net", "tap=t,id=x"]),
        "device id 'x' is used twice"
    );
    // A chosen id can collide with a default one.
    assert!(err(&["--disk", "path=/a", "--disk", "path=/b,id=disk0"]).contains("'disk0'"));
}

#[test]
fn rng_console_serial() {
    assert_eq!(
        parse(&["--rng", "src=/dev/random"])
            .unwrap()
            .rng
            .unwrap()
            .src,
        PathBuf::from("/dev/random")
    );
    assert_eq!(
        parse(&["--rng=src=/dev/hwrng"]).unwrap().rng.unwrap().src,
        PathBuf::from("/dev/hwrng")
    );
    // `--rng` without a value does not swallow the next option.
    let c = parse(&["--rng", "--cpus", "boot=2"]).unwrap();
    assert_eq!((c.rng.is_some(), c.vcpus), (true, 2));
    assert!(err(&["--rng", "/dev/random"]).contains("expected key=value"));
    assert!(err(&["--rng", "source=/x"]).contains("unknown key 'source'"));

    let c = parse(&["--serial", "off"]).unwrap();
    assert_eq!(c.serial, OutputMode::Off);
    assert_eq!(c.cmdline, "reboot=k panic=1");
    assert_eq!(
        err(&["--serial", "pty"]),
        "--serial: invalid mode=pty: expected off, tty or file=PATH"
    );
    assert_eq!(
        err(&["--console", "file="]),
        "--console: 'file' needs a value (file=...)"
    );
    assert!(err(&["--console", "tty"]).contains("cannot both use the terminal"));
    let c = parse(&["--console", "tty", "--serial", "off"]).unwrap();
    assert_eq!((c.console, c.serial), (OutputMode::Tty, OutputMode::Off));
    assert!(err(&["--serial", "off,tty"]).contains("--serial"));
}

#[test]
fn vfio_paths() {
    let ok =
        |p: &str| parse(&["--device", &format!("path={p}")]).map(|c| c.vfio_devices[0].address);
    assert_eq!(
        ok("/sys/bus/pci/devices/0001:3a:1f.7").unwrap(),
        HostPciAddress {
            segment: 1,
            bus: 0x3a,
            device: 0x1f,
            function: 7
        }
    );
    for bad in [
        "/sys/bus/pci/devices/0000:01:20.0",
        "/sys/bus/pci/devices/0000:01:00.8",
        "/sys/bus/pci/devices/01:00.0",
        "/sys/bus/pci/devices/0000:1:00.0",
        "/sys/bus/pci/devices/0000:01:00",
        "/sys/bus/pci/devices/",
        "/sys/bus/pci/devicesX/0000:01:00.0",
        "/dev/vfio/12",
        "0000:01:00.0",
    ] {
        assert!(ok(bad).is_err(), "{bad}");
    }
    assert_eq!(
        err(&[
            "--device",
            "path=/sys/bus/pci/devices/0000:01:00.0",
            "--device",
            "path=/sys/bus/pci/devices/0000:01:00.0/,id=b"
        ]),
        "--device: 0000:01:00.0 is passed through twice"
    );
}

#[test]
fn cmdline_limits() {
    let long = "x".repeat(MAX_CMDLINE_LEN + 1);
    let text = err(&["--cmdline", &long]);
    assert!(text.ends_with("2048 bytes, the limit is 2047"), "{text}");
    assert!(text.len() < 120, "the value is abbreviated: {text}");
    assert!(parse(&["--cmdline", &long[1..]]).is_ok());
    assert!(err(&["--cmdline", "a\0b"]).contains("control character"));
    assert_eq!(parse(&["--cmdline", ""]).unwrap().cmdline, "");
}

#[test]
fn usage_errors_are_one_line() {
    let usage = |a: &[&str]| {
        let args: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        match parse_args(&args) {
            Err(ConfigError::Usage(text)) => text,
            other => panic!("{a:?}: {other:?}"),
        }
    };
    let text = usage(&["trellis"]);
    assert!(text.contains("--kernel"), "{text}");
    assert!(!text.contains('\n'));
    assert!(usage(&["trellis", "--kernel", "/k", "--bogus"]).contains("'--bogus'"));
    assert!(
        usage(&["trellis", "--kernel", "/k", "--memory", "size=1G", "--memory", "size=2G"])
            .contains("--memory")
    );
    assert!(usage(&["trellis", "--kernel"]).contains("--kernel"));
}

#[test]
fn help_and_version() {
    let run = |a: &str| parse_args(&["trellis".to_string(), a.to_string()]);
    let Ok(Invocation::Print(help)) = run("--help") else {
        panic!("help")
    };
    for option in [
        "--kernel",
        "--disk",
        "--net",
        "--rng",
        "--device",
        "--serial",
        "--verbose",
    ] {
        assert!(help.contains(option), "{option}");
    }
    let Ok(Invocation::Print(version)) = run("--version") else {
        panic!("version")
    };
    assert!(version.starts_with("trellis "), "{version}");
    assert!(VmConfig::parse(&["trellis".to_string(), "--help".to_string()]).is_err());
}

#[test]
fn log_filters() {
    assert_eq!(log_filter(0), "warn,trellis=info,vfio_ioctls=error");
    assert_eq!(log_filter(1), "info");
    assert_eq!(log_filter(9), "trace");
}

#[test]
fn file_checks() {
    let dir = std::env::temp_dir().join(format!("trellis-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"x").unwrap();
    let mut c = parse(&[]).unwrap();
    c.kernel = kernel.clone();
    c.check_files().unwrap();
    c.initramfs = Some(dir.join("missing.cpio"));
    let e = c.check_files().unwrap_err().to_string();
    assert!(
        e.starts_with("initramfs ") && e.contains("No such file"),
        "{e}"
    );
    c.initramfs = None;
    c.disks = parse(&[
        "--disk",
        dir.to_str()
            .map(|d| format!("path={d}"))
            .as_deref()
            .unwrap(),
    ])
    .unwrap()
    .disks;
    assert!(c
        .check_files()
        .unwrap_err()
        .to_string()
        .ends_with("not a regular file"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cheap in-tree fuzz run: random option values must give a config or a
/// one-line error, never a panic.
#[test]
fn random_option_values_never_panic() {
    const PIECES: &[&str] = &[
        "path",
        "=",
        ",",
        "id",
        "readonly",
        "lock",
        "on",
        "size",
        "1",
        "G",
        "K",
        "boot",
        "tap",
        "mac",
        "52:54:00:00:00:01",
        ":",
        "file",
        "tty",
        "off",
        "src",
        "/",
        "0000:00:01.0",
        "\u{e9}",
        "99999999999999999999",
        "/sys/bus/pci/devices/",
        "",
        ".",
    ];
    const OPTIONS: &[&str] = &[
        "--memory",
        "--cpus",
        "--disk",
        "--net",
        "--rng",
        "--console",
        "--serial",
        "--device",
        "--cmdline",
        "--initramfs",
    ];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    for _ in 0..5_000 {
        let mut extra = Vec::new();
        for _ in 0..next(3) + 1 {
            extra.push(OPTIONS[next(OPTIONS.len())].to_string());
            let value: String = (0..next(8)).map(|_| PIECES[next(PIECES.len())]).collect();
            extra.push(value);
        }
        let refs: Vec<&str> = extra.iter().map(String::as_str).collect();
        if let Err(e) = parse(&refs) {
            assert!(!e.to_string().contains('\n'), "{refs:?}: {e}");
        }
    }
}

#[test]
fn arguments_with_control_characters_are_refused_on_one_line() {
    // Found by the cli_args fuzzer: errors quoted keys and values with
    // their line breaks.
    for bad in [
        "--disk=path=/a,x\ny=1",
        "--memory=size=1\n",
        "--net=tap=a\u{1b}[2J",
    ] {
        let args: Vec<String> = ["trellis", "--kernel=/k", bad]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let err = parse_args(&args).unwrap_err().to_string();
        assert!(!err.contains('\n') && !err.contains('\u{1b}'), "{err:?}");
        assert!(err.contains("argument 2"), "{err}");
        assert!(err.contains("control character"), "{err}");
    }
}
