#!/usr/bin/env python3
"""Builds the rig's initramfs images (gzip'd cpio "newc"), python3 stdlib only.

  build-initramfs.py l2 --busybox B --modules DIR --out l2.cpio.gz [--edu-module KO]
  build-initramfs.py l1 --busybox B --modules DIR --out l1.cpio.gz \
      --vmlinuz V --l2-initramfs l2.cpio.gz --conf run.conf [--trellis PATH]

The archive is written directly (no cpio(1), no root-owned staging tree), so
device nodes such as /dev/console can be included without privileges and the
output is byte-for-byte reproducible (all mtimes 0).

Modules: the requested module names are resolved through the kernel's
modules.dep (which lists the full transitive dependencies of each module);
the /init scripts insmod them group by group in the order written to
/etc/rig/modules.<group>.
"""
import argparse
import gzip
import io
import os
import stat
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "guest")

# Module groups, loaded in this order by the /init scripts. A trailing "?"
# marks a module that may be missing (merged into another one, or built in,
# in some kernel versions) without that being an error.
VIRTIO_CORE = ["virtio_ring", "virtio", "virtio_pci_legacy_dev?",
               "virtio_pci_modern_dev?", "virtio_pci"]
L2_GROUPS = [
    ("virtio", VIRTIO_CORE),
    ("blk", ["virtio_blk"]),
    ("net", ["failover", "net_failover", "virtio_net"]),
    ("console", ["virtio_console"]),
    ("rng", ["rng_core?", "virtio_rng"]),
]
L1_GROUPS = [
    # L1's own disks (the images the host test passes as QEMU virtio disks).
    ("virtio", VIRTIO_CORE + ["virtio_blk"]),
    ("kvm", ["irqbypass", "kvm", "kvm_amd"]),
    ("vfio", ["vfio", "vfio_iommu_type1", "vfio_virqfd?", "vfio_pci_core", "vfio_pci"]),
    ("tun", ["tun"]),
]


def norm(name):
    """Module names treat '-' and '_' as the same character."""
    return name.replace("-", "_")


class Cpio:
    """Minimal writer for the cpio "newc" format the kernel unpacks."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.paths = set()

    def _entry(self, path, mode, data=b"", rdev=(0, 0)):
        path = path.lstrip("/")
        name = path.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        self.buf.write(name)
        self.buf.write(b"\0" * (-(110 + len(name)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def _parents(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, path):
        path = path.strip("/")
        if path in self.paths:
            return
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, path, data, mode=0o644):
        path = path.strip("/")
        if path in self.paths:
            raise SystemExit(f"duplicate initramfs path {path}")
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path, target):
        path = path.strip("/")
        if path in self.paths:
            return
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path, major, minor, mode=0o600):
        path = path.strip("/")
        self._parents(path)
        self.paths.add(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        raw = self.buf.getvalue()
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as gz:
            gz.write(raw)
        return out.getvalue()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def base_tree(cpio, busybox):
    """busybox with a symlink per applet, the console node, /init's helpers."""
    for d in ("bin", "sbin", "etc/rig", "proc", "sys", "dev", "tmp", "run",
              "lib/modules"):
        cpio.dir(d)
    # Without /dev/console in the archive the kernel starts /init with no
    # stdin/stdout (devtmpfs is mounted by /init itself, later).
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", read(busybox), 0o755)
    applets = subprocess.run([busybox, "--list-full"], check=True,
                             capture_output=True, text=True).stdout.split()
    for a in applets:
        if a in ("bin/busybox", "linuxrc"):
            continue
        cpio.symlink(a, "/bin/busybox")
    cpio.file("etc/rig/lib.sh", read(os.path.join(GUEST, "lib.sh")))


class Modules:
    def __init__(self, moddir):
        self.moddir = moddir
        self.deps = {}   # name -> (relative path, [dependency names])
        with open(os.path.join(moddir, "modules.dep")) as f:
            for line in f:
                path, _, rest = line.partition(":")
                path = path.strip()
                if not path:
                    continue
                self.deps[self.name(path)] = (path, [self.name(p) for p in rest.split()])
        self.builtin = set()
        bpath = os.path.join(moddir, "modules.builtin")
        if os.path.exists(bpath):
            with open(bpath) as f:
                self.builtin = {self.name(l.strip()) for l in f if l.strip()}

    @staticmethod
    def name(path):
        base = os.path.basename(path)
        for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(ext):
                base = base[: -len(ext)]
        return norm(base)

    def resolve(self, wanted):
        """Requested modules plus their dependencies, dependencies first.

        modules.dep lists the transitive closure for every module, and a
        dependency's closure is a strict subset of its user's closure, so
        sorting by closure size is a valid load order."""
        out = {}
        for w in wanted:
            optional = w.endswith("?")
            n = norm(w.rstrip("?"))
            if n in self.deps:
                out[n] = None
                for d in self.deps[n][1]:
                    out[d] = None
            elif n in self.builtin:
                continue
            elif not optional:
                raise SystemExit(f"module {n} is neither in modules.dep nor built in")
        return sorted(out, key=lambda n: (len(self.deps[n][1]), n))

    def data(self, n):
        path = self.deps[n][0]
        if not path.endswith(".ko"):
            # Compressed modules would need a decompressing insmod; this
            # kernel ships plain .ko files, so keep the builder simple.
            raise SystemExit(f"{path}: compressed modules are not supported")
        return read(os.path.join(self.moddir, path))


def add_modules(cpio, mods, groups):
    done = set()
    summary = []
    for group, wanted in groups:
        order = [n for n in mods.resolve(wanted) if n not in done]
        for n in order:
            cpio.file(f"lib/modules/{n}.ko", mods.data(n))
            done.add(n)
        cpio.file(f"etc/rig/modules.{group}", "".join(f"{n}.ko\n" for n in order).encode())
        summary.append(f"{group}: {' '.join(order)}")
    return summary


def shared_libs(binary):
    """The files the dynamic loader needs for `binary`, as `ldd` lists them
    (absolute paths as the binary refers to them, loader included)."""
    res = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if res.returncode != 0 or "not a dynamic executable" in res.stdout + res.stderr:
        return []  # statically linked
    libs = []
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target == "not found":
                raise SystemExit(f"ldd {binary}: {line}")
            if target:
                libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split("(")[0].strip())   # the dynamic loader
    return libs


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["l1", "l2"])
    ap.add_argument("--busybox", required=True)
    ap.add_argument("--modules", required=True, help="lib/modules/<kver> directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vmlinuz", help="L2 kernel (l1 only)")
    ap.add_argument("--l2-initramfs", help="(l1 only)")
    ap.add_argument("--conf", help="run.conf for L1's /init (l1 only)")
    ap.add_argument("--trellis", help="the VMM binary (l1 only; omit for probe mode)")
    ap.add_argument("--edu-module", help="edu_trellis.ko for the VFIO checks (l2 only)")
    a = ap.parse_args()

    cpio = Cpio()
    base_tree(cpio, a.busybox)
    mods = Modules(a.modules)
    notes = []
    if a.which == "l2":
        cpio.file("init", read(os.path.join(GUEST, "l2-init.sh")), 0o755)
        cpio.file("etc/rig/virtio-pci.sh", read(os.path.join(GUEST, "virtio-pci.sh")))
        cpio.file("etc/rig/vfio.sh", read(os.path.join(GUEST, "vfio.sh")))
        cpio.file("etc/rig/reboot.sh", read(os.path.join(GUEST, "reboot.sh")))
        notes += add_modules(cpio, mods, L2_GROUPS)
        if a.edu_module:
            # Outside the module groups: vfio.sh loads it itself, twice.
            cpio.file("lib/modules/edu_trellis.ko", read(a.edu_module))
            notes.append(f"edu: {a.edu_module}")
    else:
        if not (a.vmlinuz and a.l2_initramfs and a.conf):
            ap.error("l1 needs --vmlinuz, --l2-initramfs and --conf")
        cpio.file("init", read(os.path.join(GUEST, "l1-init.sh")), 0o755)
        cpio.file("etc/rig/peer.sh", read(os.path.join(GUEST, "peer.sh")), 0o755)
        cpio.file("etc/rig/run.conf", read(a.conf))
        notes += add_modules(cpio, mods, L1_GROUPS)
        cpio.file("l2/vmlinuz", read(a.vmlinuz))
        cpio.file("l2/initramfs.cpio.gz", read(a.l2_initramfs))
        if a.trellis:
            cpio.file("bin/trellis", read(a.trellis), 0o755)
            libs = shared_libs(a.trellis)
            for lib in libs:
                # Content of the resolved file at the path the binary names
                # (e.g. /lib64/ld-linux-x86-64.so.2 is a symlink on the host).
                cpio.file(lib, read(os.path.realpath(lib)), 0o755)
            notes.append(f"trellis: {a.trellis} libs: {' '.join(libs) or '(static)'}")
    data = cpio.finish()
    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, a.out)
    print(f"build-initramfs: {a.which} -> {a.out} ({len(data) // 1024} KiB)", file=sys.stderr)
    for n in notes:
        print(f"build-initramfs:   {n}", file=sys.stderr)


if __name__ == "__main__":
    main()
