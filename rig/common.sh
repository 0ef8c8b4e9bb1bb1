# Shared by rig/run.sh and rig/selftest.sh (sourced, bash).
#
# After rig_setup: RIG (this directory), WORK (a fresh temp dir), the RIG_*
# paths from fetch.sh, PATTERN/RW_SECTORS/RO_SECTORS from the disk images.

RIG=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
RIG_CACHE=${TRELLIS_RIG_CACHE:-/var/cache/trellis-rig}
KEEP=0

rig_log() { echo "rig: $*" >&2; }
rig_die() { echo "rig: error: $*" >&2; exit 2; }

# Seconds since the epoch with milliseconds, for the timings we print.
now() { date +%s.%N | cut -c1-14; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

rig_cleanup() {
    if [[ $KEEP == 1 ]]; then
        rig_log "kept work directory $WORK"
    else
        rm -rf "$WORK"
    fi
}

# rig_setup [--vfio-disk]: fetch (cached), work dir, disk images, L2 initramfs
# (with the edu driver when EDU_KO names it).
rig_setup() {
    [[ $(id -u) == 0 ]] || rig_die "run as root (apt, QEMU's tap, network namespaces)"
    local t
    t=$(now)
    "$RIG/fetch.sh" --quiet >/dev/null
    # shellcheck disable=SC1091
    source "$RIG_CACHE/env"
    rig_log "fetch (cached) took $(elapsed "$t") s; kernel $RIG_KVER"

    WORK=$(mktemp -d /tmp/trellis-rig.XXXXXX)
    trap rig_cleanup EXIT
    python3 "$RIG/host.py" mkimages "$WORK" "$@"
    # shellcheck disable=SC1091
    source "$WORK/images.env"

    t=$(now)
    python3 "$RIG/build-initramfs.py" l2 --busybox "$RIG_BUSYBOX" --modules "$RIG_MODULES" \
        --out "$WORK/l2.cpio.gz" ${EDU_KO:+--edu-module "$EDU_KO"}
    rig_log "L2 initramfs built in $(elapsed "$t") s"
}

# The L2 kernel command line; rig.* parameters are read by guest/l2-init.sh.
# quiet + loglevel keep kernel messages from splitting the CHECK lines.
# rig.reboot=1: L2 reboots once with `reboot -f` and checks its devices again
# (guest/reboot.sh). No reboot=: Linux's default is what users get. On a
# hardware-reduced ACPI platform (trellis' FADT) reboot_init() picks EFI
# (efi_reboot_required()); with no EFI that falls through to the BIOS
# restart (machine_real_restart(): a jump to F000:FFF0 in real mode), where
# trellis' reset stub pulses the i8042 reset line.
# panic=-1: if power-off fails, init's exit resets the machine, which ends
# QEMU (-no-reboot); trellis reboots L2 instead, which finds it is one boot
# too many (l2.reboot.loop), and L1 ends trellis (l1.trellis.reboot).
# With VFIO=1 the passed-through virtio-blk is a third disk, and L2 checks
# it and the edu device (guest/vfio.sh).
l2_cmdline() {
    local blk=2 vfio=
    if [[ ${VFIO:-0} == 1 ]]; then
        blk=3
        vfio=" rig.vfio=1 rig.vfpattern=$VF_PATTERN rig.vfsha=$VF_BULK_SHA rig.vf_sectors=$VF_SECTORS"
    fi
    echo "console=ttyS0 quiet loglevel=1 panic=-1 rig.reboot=1 rig.pattern=$PATTERN rig.cpus=${L2_CPUS:-1}" \
        "rig.expect=net:1,blk:$blk,console:1,rng:1 rig.rw_sectors=$RW_SECTORS" \
        "rig.ro_sectors=$RO_SECTORS rig.addr=169.254.100.2/16 rig.peer=169.254.100.1" \
        "rig.pingin=${1:-3}$vfio"
}

# rig_boot_l1 TIMEOUT LOG INITRD [extra QEMU args...]
# L1 as in shared/notes/test-rig.md: TCG, -cpu max (emulated SVM), an
# emulated IOMMU (intel-iommu is created first, before the PCI devices it
# translates for), no network (-nic none). Serial console -> LOG.
rig_boot_l1() {
    local timeout=$1 log=$2 initrd=$3
    shift 3
    local rc=0
    timeout --kill-after=10 "$timeout" qemu-system-x86_64 \
        -accel tcg -M q35,kernel-irqchip=split -cpu max -m 2048 -smp 2 \
        -nographic -no-reboot -monitor none -serial stdio \
        -device intel-iommu,intremap=on,caching-mode=on \
        -nic none \
        -kernel "$RIG_VMLINUZ" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet loglevel=1 intel_iommu=on iommu=pt" \
        "$@" </dev/null >"$log" 2>&1 || rc=$?
    [[ $rc == 124 || $rc == 137 ]] && echo "rig: QEMU (L1) killed after ${timeout}s" >>"$log"
    return $rc
}

# QEMU arguments for the extra devices that later VFIO tests pass through:
# QEMU's edu teaching device and a second virtio-blk-pci (vf.img).
extra_device_args() {
    local x
    for x in "$@"; do
        case $x in
        edu) echo "-device edu" ;;
        vfioblk) echo "-drive if=none,id=vfblk,file=$WORK/vf.img,format=raw" \
            "-device virtio-blk-pci,drive=vfblk,disable-legacy=on,iommu_platform=on" ;;
        esac
    done
}
