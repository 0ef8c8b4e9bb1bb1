#!/usr/bin/env bash
# Rig 1: boots a real Linux guest (L2) with trellis inside a nested sandbox.
#
# The host's /dev/kvm cannot run stock Linux (see shared/notes/test-rig.md),
# so QEMU TCG on the host runs L1 (-cpu max: emulated SVM, intel-iommu), L1
# loads kvm-amd, and trellis runs *inside L1* to boot L2. L2's /init checks
# every virtio device from the guest's side; L1 plays L2's network peer and
# prints L2's virtio-console file; the host then reads the disk images back.
#
# Usage: rig/run.sh --trellis PATH [options]
#        rig/run.sh --probe [options]          (L1 sandbox checks only)
#
#   --trellis PATH        the trellis binary (with the libraries ldd lists)
#   --probe               no trellis: check KVM/VFIO/devices in L1 only
#   --keep                keep the work directory (images, logs, initramfs)
#   --live                stream L1's serial console while it runs
#   --timeout SECS        bound for the whole L1 run (default 300)
#   --trellis-timeout S   bound for trellis inside L1 (default 120)
#   --with-edu            give L1 QEMU's edu device (for VFIO tests)
#   --with-vfio-blk       give L1 a second virtio-blk-pci (vf.img, header
#                         TRELLIS-VF-DISK) to pass through
#   --vfio-bind DEV       bind DEV (edu|vfioblk) to vfio-pci in L1 before
#                         trellis starts; L1 sets EDU_SYSFS / VFIOBLK_SYSFS
#   --trellis-arg ARG     append one word ARG to trellis' command line;
#                         expanded by L1's shell, so it may use ${EDU_SYSFS}:
#                         --trellis-arg --device --trellis-arg 'path=${EDU_SYSFS}'
#   --qemu-arg ARG        append ARG to L1's QEMU command line (repeatable)
#   --vfio                the VFIO passthrough checks on top of the virtio
#                         ones, in the same run: implies --with-edu
#                         --with-vfio-blk and binding both, passes them to
#                         trellis (--device ...,id=edu / id=vfblk), builds
#                         the rig's edu driver for L2 (edu-module.sh), and
#                         checks in L1 that trellis refuses a function bound
#                         to another driver and a path with no function
#   --l2-cpus N           vCPUs trellis gives L2 (default 1; L1 has 2). With
#                         2, L2 also checks SMP bring-up and MSI-X affinity
#                         (l2.smp, l2.net.irq-affinity), but nested SMP on
#                         TCG is flaky here (2 of 13 runs: an L1 reset, an
#                         L2 triple fault), so CI keeps one
#   --l1-sync             sync in L1 before power-off (by default L1 does not,
#                         so L2's writes only reach the image if trellis
#                         forwarded L2's flush)
#
# Exit status: 0 only if every CHECK line is ok, none is missing and the
# host-side checks (pattern and data in disk.img, ro.img untouched, console
# text) pass. The whole serial log is printed, then the verdict.
set -euo pipefail
source "$(dirname "$0")/common.sh"

TRELLIS= PROBE=0 LIVE=0 TIMEOUT=300 TTIMEOUT=120 L1SYNC=0 VFIO=0 L2_CPUS=1
EXTRA_DEVS=() VFIO_BIND=() TARGS=() QARGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --trellis) TRELLIS=$2; shift ;;
    --probe) PROBE=1 ;;
    --keep) KEEP=1 ;;
    --live) LIVE=1 ;;
    --timeout) TIMEOUT=$2; shift ;;
    --trellis-timeout) TTIMEOUT=$2; shift ;;
    --with-edu) EXTRA_DEVS+=(edu) ;;
    --with-vfio-blk) EXTRA_DEVS+=(vfioblk) ;;
    --vfio-bind) VFIO_BIND+=("$2"); shift ;;
    --trellis-arg) TARGS+=("$2"); shift ;;
    --qemu-arg) QARGS+=("$2"); shift ;;
    --l1-sync) L1SYNC=1 ;;
    --l2-cpus) L2_CPUS=$2; shift ;;
    --vfio) VFIO=1 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) rig_die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
if [[ $PROBE == 0 ]]; then
    [[ -n $TRELLIS ]] || rig_die "--trellis PATH is required (or --probe)"
    [[ $L2_CPUS =~ ^[1-9][0-9]?$ ]] || rig_die "--l2-cpus wants a number of vCPUs, got '$L2_CPUS'"
    [[ -x $TRELLIS ]] || rig_die "$TRELLIS is not an executable file"
    TRELLIS=$(realpath "$TRELLIS")
fi
if [[ $VFIO == 1 ]]; then
    [[ $PROBE == 0 ]] || rig_die "--vfio needs trellis (not --probe)"
    for d in edu vfioblk; do
        [[ " ${EXTRA_DEVS[*]} " == *" $d "* ]] || EXTRA_DEVS+=("$d")
        [[ " ${VFIO_BIND[*]} " == *" $d "* ]] || VFIO_BIND+=("$d")
    done
    # shellcheck disable=SC2016 # expanded by L1's shell, after binding
    TARGS+=(--device 'path=${EDU_SYSFS},id=edu' --device 'path=${VFIOBLK_SYSFS},id=vfblk')
fi
for d in "${VFIO_BIND[@]}"; do
    [[ " ${EXTRA_DEVS[*]} " == *" $d "* ]] || rig_die "--vfio-bind $d needs --with-${d/vfioblk/vfio-blk}"
done
[[ $TTIMEOUT -lt $((TIMEOUT - 60)) ]] || rig_die "--trellis-timeout must leave L1 60 s of --timeout"

t_all=$(now)
if [[ $VFIO == 1 ]]; then
    t=$(now)
    "$RIG/fetch.sh" --quiet >/dev/null
    EDU_KO=$("$RIG/edu-module.sh") || rig_die "cannot build the edu driver for L2 (rig/edu-module.sh)"
    rig_log "edu driver ready in $(elapsed "$t") s: $EDU_KO"
fi
rig_setup $([[ " ${EXTRA_DEVS[*]} " == *" vfioblk "* ]] && echo --vfio-disk)

# Single quotes for values L1 must take literally; double quotes (keeping $)
# for trellis arguments, which L1 expands after binding VFIO devices.
squote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
dquote() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\`/\\\`}; printf '"%s"' "$s"; }
targs=
for a in "${TARGS[@]}"; do targs+="$(dquote "$a") "; done
{
    echo "MODE=$([[ $PROBE == 1 ]] && echo probe || echo run)"
    echo "PATTERN=$(squote "$PATTERN")"
    echo "L2_CMDLINE=$(squote "$(l2_cmdline 3)")"
    echo "L2_CPUS=$L2_CPUS"
    echo "TRELLIS_TIMEOUT=$TTIMEOUT"
    # L1's own watchdog fires before the host's timeout, with a message.
    echo "WATCHDOG=$((TIMEOUT - 30))"
    echo "EXPECT_L1=$(squote "${EXTRA_DEVS[*]}")"
    echo "VFIO_BIND=$(squote "${VFIO_BIND[*]}")"
    echo "TRELLIS_EXTRA_ARGS=$(squote "$targs")"
    echo "L1_SYNC=$L1SYNC"
    echo "VFIO=$VFIO"
} >"$WORK/run.conf"

t=$(now)
python3 "$RIG/build-initramfs.py" l1 --busybox "$RIG_BUSYBOX" --modules "$RIG_MODULES" \
    --vmlinuz "$RIG_VMLINUZ" --l2-initramfs "$WORK/l2.cpio.gz" --conf "$WORK/run.conf" \
    --out "$WORK/l1.cpio.gz" ${TRELLIS:+--trellis "$TRELLIS"}
rig_log "L1 initramfs built in $(elapsed "$t") s"

# L1's disks: the images themselves, so what L2 writes through trellis (which
# is given L1's /dev/vdX) ends up in the host's files. ro.img is read-only
# all the way down: trellis must open it read-only too.
# shellcheck disable=SC2207
qemu_extra=(
    -drive "file=$WORK/disk.img,if=virtio,format=raw"
    -drive "file=$WORK/ro.img,if=virtio,format=raw,readonly=on"
    $(extra_device_args "${EXTRA_DEVS[@]}")
    "${QARGS[@]}"
)

rig_log "booting L1 under QEMU TCG (timeout $TIMEOUT s; trellis $TTIMEOUT s) ..."
: >"$WORK/l1.log"
if [[ $LIVE == 1 ]]; then
    tail -F "$WORK/l1.log" 2>/dev/null &
    tailpid=$!
fi
t=$(now)
qrc=0
rig_boot_l1 "$TIMEOUT" "$WORK/l1.log" "$WORK/l1.cpio.gz" "${qemu_extra[@]}" || qrc=$?
l1_time=$(elapsed "$t")
if [[ $LIVE == 1 ]]; then sleep 0.5; kill "$tailpid" 2>/dev/null || true; fi

if [[ $LIVE == 0 ]]; then
    echo "===== L1 serial log ($WORK/l1.log) ====="
    cat "$WORK/l1.log"
fi
echo "===== verdict (L1 boot to power-off: $l1_time s, QEMU rc=$qrc, total $(elapsed "$t_all") s) ====="
vrc=0
python3 "$RIG/host.py" verify --mode "$([[ $PROBE == 1 ]] && echo probe || echo run)" \
    --dir "$WORK" --log "$WORK/l1.log" --expect-l1 "${EXTRA_DEVS[*]}" \
    $([[ $VFIO == 1 ]] && echo --vfio) || vrc=$?
[[ $qrc == 0 ]] || echo "rig: QEMU (L1) exited with status $qrc"
exit $((vrc != 0 || qrc != 0))
