#!/usr/bin/env bash
# Obtains the ingredients of the nested-sandbox rig from Debian packages:
#   - qemu-system-x86 is *installed* (it runs on the host as L1's emulator);
#   - busybox-static and the cloud kernel (linux-image-cloud-amd64 and the
#     versioned linux-image-6.1.0-NN-cloud-amd64 it depends on) are only
#     downloaded and extracted into a cache outside the repository: they end up
#     inside initramfs images, never on the host and never in git.
#
# Idempotent: a stamp file records the package versions that were extracted;
# when the stamp matches what apt would fetch now and the files it names still
# exist, nothing is downloaded again.
#
# Output (stdout, also written to $CACHE/env for `source`):
#   RIG_VMLINUZ=...  RIG_MODULES=...  RIG_KVER=...  RIG_BUSYBOX=...
#
# Usage: rig/fetch.sh [--quiet] [--refresh]
#   cache: ${TRELLIS_RIG_CACHE:-/var/cache/trellis-rig}
#   --refresh: ask apt which versions are current (after `apt-get update`, a
#              newer kernel ABI) instead of trusting a valid stamp.
set -euo pipefail

CACHE=${TRELLIS_RIG_CACHE:-/var/cache/trellis-rig}
QUIET=0 REFRESH=0
for arg in "$@"; do
    case $arg in
    --quiet) QUIET=1 ;;
    --refresh) REFRESH=1 ;;
    *) echo "usage: $0 [--quiet] [--refresh]" >&2; exit 2 ;;
    esac
done

log() { [[ $QUIET == 1 ]] || echo "fetch: $*" >&2; }
die() { echo "fetch: error: $*" >&2; exit 1; }

emit() {
    {
        echo "RIG_VMLINUZ=$VMLINUZ"
        echo "RIG_MODULES=$MODULES"
        echo "RIG_KVER=$KVER"
        echo "RIG_BUSYBOX=$BUSYBOX"
    } | tee "$CACHE/env.tmp"
    mv "$CACHE/env.tmp" "$CACHE/env"
}

# Fast path: a complete earlier fetch (stamp + the files it produced) and QEMU
# installed: no apt queries at all.
if [[ $REFRESH == 0 && -f $CACHE/stamp && -f $CACHE/env ]] && command -v qemu-system-x86_64 >/dev/null; then
    # shellcheck disable=SC1091
    source "$CACHE/env"
    VMLINUZ=$RIG_VMLINUZ MODULES=$RIG_MODULES KVER=$RIG_KVER BUSYBOX=$RIG_BUSYBOX
    if [[ -f $VMLINUZ && -f $MODULES/modules.dep && -x $BUSYBOX ]] &&
        (cd "$CACHE/debs" && tail -n +2 "$CACHE/stamp" | sha256sum --quiet -c -) >/dev/null 2>&1; then
        log "cache valid ($(head -n1 "$CACHE/stamp")); --refresh to re-resolve versions"
        emit
        exit 0
    fi
fi

[[ $(id -u) == 0 ]] || die "must run as root (apt-get install/download)"
mkdir -p "$CACHE/debs"

# apt-cache only knows candidates once the package lists exist; run
# `apt-get update` once when they are missing rather than on every call.
candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
if [[ -z $(candidate busybox-static) || $(candidate busybox-static) == "(none)" ]]; then
    log "package lists missing; running apt-get update"
    timeout 300 apt-get update -q >&2
fi

# --- QEMU on the host -------------------------------------------------------
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    log "installing qemu-system-x86"
    # No recommends: we need the emulator only, not the GUI or firmware extras.
    DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -q --no-install-recommends qemu-system-x86 >&2
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after install"

# --- which versions would we fetch now? --------------------------------------
# The metapackage only depends on the versioned image package; its name
# (linux-image-6.1.0-NN-cloud-amd64) is what carries vmlinuz and the modules.
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $KPKG ]] || die "cannot find the versioned dependency of linux-image-cloud-amd64"
KVER_PKG=$(candidate "$KPKG")
BB_VER=$(candidate busybox-static)
[[ -n $KVER_PKG && $KVER_PKG != "(none)" ]] || die "no candidate for $KPKG"
[[ -n $BB_VER && $BB_VER != "(none)" ]] || die "no candidate for busybox-static"
KVER=${KPKG#linux-image-}      # e.g. 6.1.0-56-cloud-amd64 (the `uname -r` of the kernel)

STAMP="$CACHE/stamp"
WANT="kernel-pkg=$KPKG kernel-version=$KVER_PKG busybox-version=$BB_VER"

KDIR="$CACHE/kernel"
BBDIR="$CACHE/busybox"
VMLINUZ="$KDIR/boot/vmlinuz-$KVER"
MODULES="$KDIR/lib/modules/$KVER"
BUSYBOX="$BBDIR/bin/busybox"

up_to_date() {
    [[ -f $STAMP ]] && [[ $(head -n1 "$STAMP") == "$WANT" ]] || return 1
    [[ -f $VMLINUZ && -f $MODULES/modules.dep && -x $BUSYBOX ]] || return 1
    # The stamp also lists the sha256 of the .debs we extracted; the extracted
    # trees were produced from exactly those files.
    (cd "$CACHE/debs" && tail -n +2 "$STAMP" | sha256sum --quiet -c -) >/dev/null 2>&1
}

if up_to_date; then
    log "cache up to date ($WANT)"
else
    log "fetching $WANT into $CACHE"
    rm -f "$STAMP"
    # apt-get download writes into the current directory; drop older versions
    # first so the cache does not grow with every kernel ABI bump.
    (
        cd "$CACHE/debs"
        rm -f ./*.deb
        timeout 600 apt-get download -q "linux-image-cloud-amd64" "$KPKG" busybox-static >&2
    )
    kdeb=$(ls "$CACHE/debs/${KPKG}_"*.deb)
    bbdeb=$(ls "$CACHE/debs/busybox-static_"*.deb)

    rm -rf "$KDIR.tmp" "$BBDIR.tmp"
    dpkg-deb -x "$kdeb" "$KDIR.tmp"
    dpkg-deb -x "$bbdeb" "$BBDIR.tmp"
    rm -rf "$KDIR" "$BBDIR"
    mv "$KDIR.tmp" "$KDIR"
    mv "$BBDIR.tmp" "$BBDIR"

    [[ -f $VMLINUZ ]] || die "no $VMLINUZ in $kdeb"
    [[ -x $BUSYBOX ]] || die "no busybox in $bbdeb"
    # The package does not ship modules.dep (dpkg's postinst runs depmod on
    # install, which we skip). The host may have no kmod; busybox's depmod
    # (static, runs on the host) writes a modules.dep in the usual format.
    "$BUSYBOX" depmod -b "$KDIR" "$KVER"
    [[ -f $MODULES/modules.dep ]] || die "depmod wrote no $MODULES/modules.dep"

    # Written last: a half-finished fetch leaves no stamp and is redone.
    {
        echo "$WANT"
        (cd "$CACHE/debs" && sha256sum ./*.deb)
    } >"$STAMP.tmp"
    mv "$STAMP.tmp" "$STAMP"
fi

emit
