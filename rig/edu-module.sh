#!/usr/bin/env bash
# Builds the rig's edu driver (rig/guest/edu/edu_trellis.c) for the rig's
# kernel, for the VFIO checks in L2. The kernel headers come from Debian
# packages of exactly the kernel's version (linux-headers-<abi>-cloud-amd64,
# its -common package and linux-kbuild), downloaded and extracted into the
# cache like fetch.sh does; the host's gcc-12 is the compiler Debian built
# the kernel with. Nothing lands in the repository: the module is cached as
#   $CACHE/edu/<sha256 of sources + kernel version>/edu_trellis.ko
# and its path is printed on stdout. Idempotent; run fetch.sh first.
#
# Usage: rig/edu-module.sh
set -euo pipefail

RIG=$(cd "$(dirname "$0")" && pwd)
CACHE=${TRELLIS_RIG_CACHE:-/var/cache/trellis-rig}
die() { echo "edu-module: error: $*" >&2; exit 1; }
log() { echo "edu-module: $*" >&2; }

[[ -f $CACHE/env && -f $CACHE/stamp ]] || die "no rig cache in $CACHE: run rig/fetch.sh first"
# shellcheck disable=SC1091
source "$CACHE/env"
KVER=$RIG_KVER
# The Debian version of the kernel package (e.g. 6.1.192-2), from fetch's stamp.
KPKG_VER=$(head -n1 "$CACHE/stamp" | sed -n 's/.*kernel-version=\([^ ]*\).*/\1/p')
[[ -n $KPKG_VER ]] || die "cannot read the kernel package version from $CACHE/stamp"

SRC=$RIG/guest/edu
key=$( (cat "$SRC/edu_trellis.c" "$SRC/Kbuild"; echo "$KVER $KPKG_VER") | sha256sum | cut -c1-16)
OUT=$CACHE/edu/$key/edu_trellis.ko
if [[ -f $OUT ]]; then
    echo "$OUT"
    exit 0
fi

if ! command -v make >/dev/null || ! command -v gcc-12 >/dev/null; then
    [[ $(id -u) == 0 ]] || die "gcc-12 and make are needed (the compiler of Debian 12's kernel)"
    log "installing gcc-12 and make"
    DEBIAN_FRONTEND=noninteractive timeout 600 \
        apt-get install -y -q --no-install-recommends gcc-12 make libc6-dev >&2
fi

HDIR=$CACHE/headers/$KVER
HEADERS=$HDIR/usr/src/linux-headers-$KVER
if [[ ! -f $HDIR/.complete ]]; then
    [[ $(id -u) == 0 ]] || die "must run as root (apt-get download)"
    log "fetching the headers of $KVER ($KPKG_VER)"
    # The flavour package depends on the common headers and on kbuild (the
    # host tools: fixdep, modpost); all three must be the kernel's version.
    deps=$(apt-cache depends "linux-headers-$KVER" 2>/dev/null |
        awk '/Depends: linux-(headers|kbuild)-/ {print $2}')
    [[ -n $deps ]] || die "cannot resolve the dependencies of linux-headers-$KVER"
    pkgs=("linux-headers-$KVER=$KPKG_VER")
    for d in $deps; do pkgs+=("$d=$KPKG_VER"); done
    rm -rf "$HDIR.tmp" "$HDIR.debs"
    mkdir -p "$HDIR.tmp" "$HDIR.debs"
    (cd "$HDIR.debs" && timeout 600 apt-get download -q "${pkgs[@]}" >&2)
    for deb in "$HDIR.debs"/*.deb; do dpkg-deb -x "$deb" "$HDIR.tmp"; done
    rm -rf "$HDIR.debs"
    # The flavour's Makefile includes the common one by absolute path; point
    # it into the tree's final place (the scripts/tools links are relative).
    mk=$HDIR.tmp/usr/src/linux-headers-$KVER/Makefile
    [[ -f $mk ]] || die "no Makefile in the headers package"
    sed -i "s|include /usr/src/|include $HDIR/usr/src/|" "$mk"
    rm -rf "$HDIR"
    mv "$HDIR.tmp" "$HDIR"
    touch "$HDIR/.complete"
fi

BUILD=$(mktemp -d /tmp/edu-module.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
cp "$SRC/edu_trellis.c" "$SRC/Kbuild" "$BUILD/"
log "building edu_trellis.ko for $KVER"
if ! make -s -C "$HEADERS" M="$BUILD" modules >"$BUILD/make.log" 2>&1; then
    cat "$BUILD/make.log" >&2
    die "the module did not build"
fi
# Warnings are errors here: the source is ours.
if grep -q 'warning:' "$BUILD/make.log"; then
    cat "$BUILD/make.log" >&2
    die "the module built with warnings"
fi
mkdir -p "$(dirname "$OUT")"
cp "$BUILD/edu_trellis.ko" "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "$OUT"
