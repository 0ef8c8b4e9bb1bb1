#!/usr/bin/env python3
"""Host side of the rig: creates the disk images before a run and judges the
run afterwards (python3 stdlib only).

  host.py mkimages DIR [--vfio-disk]
      DIR/disk.img  64 MiB, read-write; sector 0 starts "TRELLIS-RW-DISK\\n";
                    L2 writes its pattern at 1 MiB, 4 MiB of data at 2 MiB
                    and its reboot state line at 8 MiB
      DIR/ro.img     8 MiB, read-only;  sector 0 starts "TRELLIS-RO-DISK\\n"
      DIR/vf.img    16 MiB (--vfio-disk), for the VFIO virtio-blk of L1;
                    sector 0 starts "TRELLIS-VF-DISK\\n", a pattern line at
                    1 MiB, 1 MiB of random data at 4 MiB
      DIR/images.env  PATTERN=..., RW_SECTORS=..., RO_SECTORS=... (bash),
                    and VF_PATTERN, VF_BULK_SHA, VF_SECTORS with --vfio-disk
      DIR/ro.sha256   to prove afterwards that nothing wrote the ro image

  host.py verify --mode l2-direct|probe|run --dir DIR --log LOG
                 [--console-file F] [--expect-l1 "edu vfioblk"] [--vfio]
      Parses "CHECK <name> <ok|fail|skip> <detail>" lines from the serial
      log, demands the checks the mode must produce (--vfio: also the VFIO
      passthrough checks of L1 and L2), reads the images back, prints
      "CHECK host.* ..." lines and a verdict; exit 0 only on PASS.
"""
import argparse
import hashlib
import os
import re
import secrets
import sys

MiB = 1 << 20
RW_SIZE, RO_SIZE, VF_SIZE = 64 * MiB, 8 * MiB, 16 * MiB
PATTERN_OFFSET = 1 * MiB          # where L2 writes the pattern (sector 2048)
BULK_OFFSET, BULK_LEN = 2 * MiB, 4 * MiB
# L2's reboot state (guest/reboot.sh): one line at 8 MiB (sector 16384),
# after everything else L2 writes; the second boot leaves "boot2-done".
REBOOT_OFFSET = 8 * MiB
# vf.img: the host's pattern line at 1 MiB and random data at 4 MiB, which
# L2 reads; L2 writes the run's pattern at 3 MiB (sector 6144).
VF_PATTERN_OFFSET, VF_WRITE_OFFSET = 1 * MiB, 3 * MiB
VF_BULK_OFFSET, VF_BULK_LEN = 4 * MiB, 1 * MiB

CHECK_RE = re.compile(r"CHECK (\S+) (ok|fail|skip)(?: (.*))?$")


def make_image(path, size, header):
    with open(path, "wb") as f:
        f.write(header.ljust(16, b"\n")[:16])
        # Something recognisable but non-zero after the header, so reads of
        # more than the header return real data too.
        f.write(b"".join(b"trellis-rig %08x\n" % i for i in range(4096 // 21)))
        f.truncate(size)


def sha256_file(path, offset=0, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(MiB if left is None else min(MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def mkimages(a):
    os.makedirs(a.dir, exist_ok=True)
    make_image(os.path.join(a.dir, "disk.img"), RW_SIZE, b"TRELLIS-RW-DISK\n")
    make_image(os.path.join(a.dir, "ro.img"), RO_SIZE, b"TRELLIS-RO-DISK\n")
    vf = ""
    if a.vfio_disk:
        path = os.path.join(a.dir, "vf.img")
        make_image(path, VF_SIZE, b"TRELLIS-VF-DISK\n")
        vf_pattern = "TRELLIS-VF-PATTERN-" + secrets.token_hex(8)
        bulk = secrets.token_bytes(VF_BULK_LEN)
        with open(path, "r+b") as f:
            f.seek(VF_PATTERN_OFFSET)
            f.write((vf_pattern + "\n").encode())
            f.seek(VF_BULK_OFFSET)
            f.write(bulk)
        vf = (f"VF_PATTERN={vf_pattern}\nVF_BULK_SHA={hashlib.sha256(bulk).hexdigest()}\n"
              f"VF_SECTORS={VF_SIZE // 512}\n")
    pattern = "TRELLIS-PATTERN-" + secrets.token_hex(8)
    with open(os.path.join(a.dir, "ro.sha256"), "w") as f:
        f.write(sha256_file(os.path.join(a.dir, "ro.img")) + "\n")
    with open(os.path.join(a.dir, "images.env"), "w") as f:
        f.write(f"PATTERN={pattern}\nRW_SECTORS={RW_SIZE // 512}\nRO_SECTORS={RO_SIZE // 512}\n")
        f.write(vf)


# Checks each mode must produce; a missing one fails the run just like a
# failed one (a guest that dies half way prints nothing more).
L2_REQUIRED = (
    [f"l2.modules.{g}" for g in ("virtio", "blk", "net", "console", "rng")]
    + ["l2.virtio.inventory"]
    + [f"l2.virtio.{d}.{c}" for d in ("blk0", "blk1", "net0", "console0", "rng0")
       for c in ("id", "driver", "virtio-driver", "msix", "caps")]
    + ["l2.rng.current", "l2.rng.read", "l2.console.hvc0"]
    + [f"l2.blk.rw.{c}" for c in ("found", "capacity", "writable", "pattern", "bulk")]
    + [f"l2.blk.ro.{c}" for c in ("found", "capacity", "flag", "refuses-write", "intact")]
    + [f"l2.net.{c}" for c in ("iface", "link", "ping-out", "ping-in", "irq-affinity")]
    + ["l2.smp"]
)
# L2 then reboots once (guest/reboot.sh): the first boot, after the checks
# above, leaves its state on the rw disk and runs `reboot -f`; the VMM (trellis
# rebuilding the VM, or selftest.sh starting QEMU again) boots L2 again on the
# same disks, and the second boot re-checks the devices under l2.reboot.*.
L2_REBOOT_REQUIRED = (
    ["l2.reboot.marker", "l2.reboot.boot"]
    + [f"l2.reboot.modules.{g}" for g in ("virtio", "blk", "net", "console", "rng")]
    + [f"l2.reboot.virtio.{d}" for d in ("blk0", "blk1", "net0", "console0", "rng0")]
    + ["l2.reboot.virtio.inventory", "l2.reboot.blk.rw", "l2.reboot.blk.ro", "l2.reboot.rng",
       "l2.reboot.console", "l2.reboot.net", "l2.reboot.done",
       "host.disk.reboot", "host.reboot.console"]
)
L1_REQUIRED = ([f"l1.modules.{g}" for g in ("virtio", "kvm", "vfio", "tun")]
               + ["l1.kvm", "l1.vfio", "l1.iommu", "l1.tun"])
L1_RUN_REQUIRED = ["l1.disk.rw", "l1.disk.ro", "l1.net.tap", "l1.net.ping-l2",
                   "l1.trellis.exit", "l1.console-file",
                   # the reboot: one rebuild, through the FADT's reset register;
                   # the tap trellis made again; hvc0's second-boot line
                   "l1.trellis.reboot", "l1.trellis.reset-path", "l1.net.tap-again",
                   "l1.reboot.console-file"]
# --vfio: edu and a virtio-blk passed through from L1 (the disk is blk2 in
# L2's bus order, after trellis' own two), and the refusals in L1.
VFIO_REQUIRED = (
    [f"l2.virtio.blk2.{c}" for c in ("id", "driver", "virtio-driver", "msix", "caps")]
    + [f"l2.vfio.blk.{c}" for c in ("found", "capacity", "read", "bulk", "write")]
    + [f"l2.vfio.edu.{c}" for c in ("found", "id", "liveness", "factorial", "bar-move",
                                     "intx", "msi")]
    + ["l1.vfio.bind-edu", "l1.vfio.bind-vfioblk", "l1.vfio.refuse-unbound",
       "l1.vfio.refuse-missing", "l1.vfio.direct-edu", "l1.vfio.direct-vfblk",
       "host.vfdisk.write"]
    # the second boot: both functions bound and working again after trellis
    # closed and re-opened their VFIO groups
    + ["l2.reboot.virtio.blk2", "l2.reboot.vfio.blk", "l2.reboot.vfio.edu",
       "l2.reboot.vfio.edu-msi"]
)


def verify(a):
    with open(a.log, "rb") as f:
        lines = [l.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                 for l in f]
    checks = []
    for line in lines:
        m = CHECK_RE.search(line)
        if m:
            checks.append((m.group(1), m.group(2), m.group(3) or ""))
    host = []

    def hcheck(name, ok, detail):
        host.append((name, "ok" if ok else "fail", detail))

    required = []
    markers = []
    if a.mode in ("l2-direct", "run"):
        required += L2_REQUIRED + L2_REBOOT_REQUIRED
        markers += ["RIG-L2-DONE", "RIG-L2-REBOOT-DONE"]
    if a.mode == "l2-direct":
        required += ["host.net.tap", "host.net.ping-l2", "host.net.tap-again"]
    if a.mode in ("probe", "run"):
        required += L1_REQUIRED
        markers.append("RIG-L1-DONE")
        for x in a.expect_l1.split():
            required.append(f"l1.dev.{x}")
        if a.mode == "probe" and "edu" in a.expect_l1.split():
            required.append("l1.vfio.bind-edu")
    if a.mode == "run":
        required += L1_RUN_REQUIRED
        if a.vfio:
            required += VFIO_REQUIRED

    for m in markers:
        hcheck(f"host.marker.{m}", any(m in l for l in lines),
               "present" if any(m in l for l in lines) else "missing: the guest did not finish")
    for w in [l for l in lines if "WATCHDOG fired" in l]:
        hcheck("host.watchdog", False, w.strip())

    if a.mode in ("l2-direct", "run"):
        env = dict(l.strip().split("=", 1) for l in open(os.path.join(a.dir, "images.env")))
        pattern = env["PATTERN"]
        disk = os.path.join(a.dir, "disk.img")
        with open(disk, "rb") as f:
            f.seek(PATTERN_OFFSET)
            got = f.read(len(pattern) + 1)
        hcheck("host.disk.pattern", got == (pattern + "\n").encode(),
               f"disk.img@{PATTERN_OFFSET}: {got!r}")
        bulk = [d for n, r, d in checks if n == "l2.blk.rw.bulk" and r == "ok"]
        m = re.search(r"sha256=([0-9a-f]{64})", bulk[0]) if bulk else None
        if m:
            got = sha256_file(disk, BULK_OFFSET, BULK_LEN)
            hcheck("host.disk.bulk", got == m.group(1),
                   f"disk.img[{BULK_OFFSET}:+{BULK_LEN}] sha256={got} (L2 wrote {m.group(1)})")
        else:
            hcheck("host.disk.bulk", False, "no successful l2.blk.rw.bulk to compare with")
        want = open(os.path.join(a.dir, "ro.sha256")).read().strip()
        got = sha256_file(os.path.join(a.dir, "ro.img"))
        hcheck("host.disk.ro-unchanged", got == want, f"sha256={got}")
        # The second boot's last write: the state line saying it finished,
        # written and flushed through the rebuilt VM's disk.
        with open(disk, "rb") as f:
            f.seek(REBOOT_OFFSET)
            got = f.read(512).split(b"\n")[0]
        want = f"RIG-REBOOT boot2-done {pattern} ".encode()
        hcheck("host.disk.reboot", got.startswith(want),
               f"disk.img@{REBOOT_OFFSET}: {got[:120]!r}")

        hvc = f"RIG-HVC0 {pattern}"
        if a.mode == "l2-direct":
            text = open(a.console_file, errors="replace").read() if a.console_file and \
                os.path.exists(a.console_file) else ""
            where = a.console_file
        else:
            # What L1 printed of trellis' console file, between its markers.
            text, inside = [], False
            for l in lines:
                if "RIG-L1-CONSOLE-END" in l:
                    inside = False
                if inside:
                    text.append(l)
                if "RIG-L1-CONSOLE-BEGIN" in l:
                    inside = True
            text = "\n".join(text)
            where = "L1's copy of the console file"
        if a.mode == "run" and a.vfio:
            # L2's write through the passed-through disk reached vf.img: the
            # device read it from L2's memory through L1's IOMMU.
            with open(os.path.join(a.dir, "vf.img"), "rb") as f:
                f.seek(VF_WRITE_OFFSET)
                got = f.read(len(pattern) + 1)
            hcheck("host.vfdisk.write", got == (pattern + "\n").encode(),
                   f"vf.img@{VF_WRITE_OFFSET}: {got!r}")

        text = text.replace("\r", "").splitlines()
        hcheck("host.console", hvc in text,
               f"'RIG-HVC0 <pattern>' {'found' if hvc in text else 'missing'} in {where}")
        # The second boot's line comes after the first's: the console output
        # went on across the reboot instead of starting afresh.
        hvc2 = f"RIG-HVC0-BOOT2 {pattern}"
        first = text.index(hvc) if hvc in text else None
        second = text.index(hvc2) if hvc2 in text else None
        hcheck("host.reboot.console", first is not None and second is not None and first < second,
               f"'RIG-HVC0-BOOT2 <pattern>' {'missing' if second is None else 'at line %d' % second}"
               f" (first boot's line: {'missing' if first is None else 'at line %d' % first})"
               f" in {where}")

    for c in host:
        print("CHECK %s %s %s" % c)
    allc = checks + host
    names = {n for n, _, _ in allc}
    missing = [r for r in required if r not in names]
    failed = [n for n, r, _ in allc if r == "fail"]
    skipped = [n for n, r, _ in allc if r == "skip"]
    ok = sum(1 for _, r, _ in allc if r == "ok")
    print(f"RIG SUMMARY mode={a.mode} ok={ok} fail={len(failed)} skip={len(skipped)} "
          f"missing={len(missing)}")
    for n in failed:
        print(f"RIG FAILED {n}")
    for n in missing:
        print(f"RIG MISSING {n}")
    for n in skipped:
        print(f"RIG SKIPPED {n}")
    verdict = not failed and not missing
    print("RIG RESULT: " + ("PASS" if verdict else "FAIL"))
    return 0 if verdict else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mkimages")
    m.add_argument("dir")
    m.add_argument("--vfio-disk", action="store_true")
    v = sub.add_parser("verify")
    v.add_argument("--mode", required=True, choices=["l2-direct", "probe", "run"])
    v.add_argument("--dir", required=True)
    v.add_argument("--log", required=True)
    v.add_argument("--console-file")
    v.add_argument("--expect-l1", default="")
    v.add_argument("--vfio", action="store_true")
    a = ap.parse_args()
    if a.cmd == "mkimages":
        mkimages(a)
        return 0
    return verify(a)


if __name__ == "__main__":
    sys.exit(main())
