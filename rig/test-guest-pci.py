#!/usr/bin/env python3
"""Host-only test of guest/virtio-pci.sh's capability-chain check: runs it with
busybox sh (the same shell as in L2) against synthetic configuration spaces,
well-formed and broken ones, in a fake sysfs device directory. Seconds, no VM.

  rig/test-guest-pci.py [--busybox PATH]   (default: from the fetch cache)
"""
import argparse
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("TRELLIS_RIG_CACHE", "/var/cache/trellis-rig")

BAR4 = 0x4000   # 16 KiB 64-bit memory BAR 4 (+5), like QEMU's virtio-pci layout
BAR1 = 0x1000   # 4 KiB BAR 1 for the MSI-X table and PBA


def vcap(ct, bar, off, length, extra=b""):
    # cap_vndr, cap_next (patched later), cap_len, cfg_type, bar, id, pad, offset, length
    body = struct.pack("<BBBBBBHII", 0x09, 0, 16 + len(extra), ct, bar, 0, 0, off, length)
    return body + extra


def msix(size, enabled=True, table=(1, 0), pba=(1, 0x800)):
    ctrl = (size - 1) | (0x8000 if enabled else 0)
    return struct.pack("<BBHII", 0x11, 0, ctrl, table[1] | table[0], pba[1] | pba[0])


def good_caps():
    return [
        vcap(1, 4, 0x0000, 0x1000),
        vcap(3, 4, 0x1000, 0x1000),
        vcap(4, 4, 0x2000, 0x1000),
        vcap(2, 4, 0x3000, 0x1000, struct.pack("<I", 4)),
        vcap(5, 0, 0, 0, struct.pack("<I", 0)),
        msix(3),
    ]


def config(caps, start=0x40, status=0x10, align=4, link=None):
    """Lay the capabilities out from `start`, chained in order."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, 0x1af4, 0x1042)
    struct.pack_into("<H", cfg, 6, status)
    ptrs, p = [], start
    for c in caps:
        ptrs.append(p)
        cfg[p:p + len(c)] = c
        p += (len(c) + align - 1) // align * align
    for i, ptr in enumerate(ptrs):
        cfg[ptr + 1] = ptrs[i + 1] if i + 1 < len(ptrs) else 0
    if link:
        link(cfg, ptrs)
    cfg[0x34] = ptrs[0] if ptrs else 0
    return bytes(cfg)


def resource(bars):
    lines = []
    for i in range(6):
        size = bars.get(i, 0)
        base = 0xfe000000 + i * 0x100000
        lines.append("0x%016x 0x%016x 0x%016x" % ((base, base + size - 1, 0x140204) if size else (0, 0, 0)))
    return "\n".join(lines) + "\n"


def run(busybox, cfg, bars, vtype=2):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config"), "wb") as f:
            f.write(cfg)
        with open(os.path.join(d, "resource"), "w") as f:
            f.write(resource(bars))
        script = (f". {HERE}/guest/lib.sh; . {HERE}/guest/virtio-pci.sh; "
                  f"check_caps {d} t.caps {vtype}")
        out = subprocess.run([busybox, "sh", "-c", script], capture_output=True,
                             text=True, timeout=30)
        return (out.stdout + out.stderr).strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--busybox", default=os.path.join(CACHE, "busybox/bin/busybox"))
    a = ap.parse_args()
    if not os.access(a.busybox, os.X_OK):
        sys.exit(f"no busybox at {a.busybox}: run rig/fetch.sh first")
    bars = {1: BAR1, 4: BAR4}

    def loop(cfg, ptrs):
        cfg[ptrs[-1] + 1] = ptrs[0]

    def misalign(cfg, ptrs):
        cfg[ptrs[1] + 1] = ptrs[2] + 1

    caps = good_caps()
    cases = [
        # (name, config, bars, virtio type, expected result, expected text)
        ("well-formed", config(caps), bars, 2, "ok", "vcap1@64"),
        ("rng without device cfg", config([c for c in caps if c[3:4] != b"\x04"]), bars, 4, "ok",
         "allowed for rng"),
        ("blk without device cfg", config([c for c in caps if c[3:4] != b"\x04"]), bars, 2, "fail",
         "missing-vcap4"),
        ("no capability list bit", config(caps, status=0), bars, 2, "fail", "capability list bit"),
        ("loop", config(caps, link=loop), bars, 2, "fail", "loop-back-to:64"),
        ("misaligned pointer", config(caps, link=misalign), bars, 2, "fail", "bad-pointer"),
        ("pointer into the header", config(caps, start=0x20), bars, 2, "fail", "bad-pointer:32"),
        ("no msix", config(caps[:-1]), bars, 2, "fail", "missing-msix"),
        ("msix disabled", config(caps[:-1] + [msix(3, enabled=False)]), bars, 2, "fail",
         "msix-not-enabled"),
        ("msix table outside bar", config(caps[:-1] + [msix(300)]), bars, 2, "fail",
         "msix-table-outside-bar"),
        ("region outside bar", config(caps), {1: BAR1, 4: 0x2000}, 2, "fail", "vcap4-outside-bar4"),
        ("unimplemented bar", config(caps), {1: BAR1}, 2, "fail", "outside-bar4(size=0)"),
        ("short common cfg", config([vcap(1, 4, 0, 32)] + caps[1:]), bars, 2, "fail",
         "common-cfg-len=32"),
        ("short notify cap", config(caps[:3] + [vcap(2, 4, 0x3000, 0x1000)] + caps[4:]), bars, 2,
         "fail", "notify-cap_len=16"),
        ("bar index 6", config([vcap(1, 6, 0, 0x1000)] + caps[1:]), bars, 2, "fail", "vcap1-bar=6"),
    ]
    bad = 0
    for name, cfg, b, vtype, want, text in cases:
        out = run(a.busybox, cfg, b, vtype)
        good = out.startswith(f"CHECK t.caps {want} ") and text in out
        bad += not good
        print(f"{'PASS' if good else 'FAIL'} {name}: {out}")
    print(f"test-guest-pci: {len(cases) - bad}/{len(cases)} passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
