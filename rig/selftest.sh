#!/usr/bin/env bash
# Validates the rig itself, without trellis:
#
#  0. test-guest-pci.py: the capability-chain check against synthetic
#     configuration spaces (well-formed and broken), no VM.
#  1. L2 direct: boots the L2 kernel + initramfs under QEMU TCG on the host,
#     with QEMU's own virtio-pci devices (modern only: disable-legacy=on) as a
#     known-good reference: two virtio-blk, virtio-net, virtio-rng and a
#     virtio-serial console port (hvc0). The host plays L2's network peer from
#     a private network namespace (QEMU's tap never touches the host's own
#     network). All l2.* checks and the host-side image checks must pass.
#     L2 reboots once (guest/reboot.sh): QEMU runs with -no-reboot, so L2's
#     reset ends it, and this script starts it again on the same images,
#     as trellis rebuilds its VM (which also makes QEMU create its tap
#     again, as trellis does); the second boot's l2.reboot.* checks must
#     pass too. A third start never happens.
#  2. L1 probe: boots L1 as run.sh would, with the edu device and a second
#     virtio-blk-pci, and checks the sandbox: modules load, /dev/kvm (nested
#     SVM), /dev/vfio/vfio, IOMMU groups, /dev/net/tun, the edu device can be
#     bound to vfio-pci.
#
# Usage: rig/selftest.sh [--l2-only | --l1-only] [--keep] [--live]
set -euo pipefail
source "$(dirname "$0")/common.sh"

DO_L2=1 DO_L1=1 LIVE=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --l2-only) DO_L1=0 ;;
    --l1-only) DO_L2=0 ;;
    --keep) KEEP=1 ;;
    --live) LIVE=1 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) rig_die "unknown argument $1" ;;
    esac
    shift
done

status=0
# The capability-chain parser against synthetic config spaces: fast, no VM.
python3 "$RIG/test-guest-pci.py" | tail -n 1
python3 "$RIG/test-guest-pci.py" >/dev/null || status=1

rig_setup --vfio-disk

if [[ $DO_L2 == 1 ]]; then
    # busybox's ip and ping for the peer script (the host may have no ping).
    mkdir -p "$WORK/bb"
    for a in ip ping sleep cut grep; do ln -sf "$RIG_BUSYBOX" "$WORK/bb/$a"; done

    export WORK RIG RIG_VMLINUZ
    export L2_CMDLINE
    L2_CMDLINE=$(l2_cmdline 3)
    rig_log "L2 direct under QEMU TCG (timeout 300 s) ..."
    t=$(now)
    : >"$WORK/l2-direct.log"
    tailpid=
    if [[ $LIVE == 1 ]]; then
        tail -F "$WORK/l2-direct.log" 2>/dev/null &
        tailpid=$!
    fi
    # Inside a new network namespace: QEMU creates tap rigtap0 there, and the
    # peer script addresses it (169.254.100.1/16) once it appears, and again
    # when the second QEMU creates it anew. Both QEMU runs share 300 s; the
    # console file is appended to, as trellis does across a reboot.
    unshare --net -- bash -c '
        set -u
        ip link set lo up
        PATH=$WORK/bb:$PATH sh "$RIG/guest/peer.sh" host rigtap0 169.254.100.1/16 \
            169.254.100.2 240 1 >"$WORK/peer.log" 2>&1 &
        peer=$!
        rc=0
        for run in 1 2; do
            [ $run = 1 ] || grep -q RIG-L2-REBOOTING "$WORK/l2-direct.log" || break
            left=$((300 - SECONDS))
            [ $left -gt 0 ] || break
            [ $run = 1 ] || echo "rig: L2 reset QEMU (-no-reboot): starting it again on the same images" >>"$WORK/l2-direct.log"
            timeout --kill-after=10 $left qemu-system-x86_64 \
                -accel tcg -M q35 -cpu max -m 512 -smp 1 \
                -nographic -no-reboot -monitor none -serial stdio -nic none \
                -kernel "$RIG_VMLINUZ" -initrd "$WORK/l2.cpio.gz" -append "$L2_CMDLINE" \
                -drive if=none,id=rw,file="$WORK/disk.img",format=raw \
                -device virtio-blk-pci,drive=rw,disable-legacy=on \
                -drive if=none,id=ro,file="$WORK/ro.img",format=raw,readonly=on \
                -device virtio-blk-pci,drive=ro,disable-legacy=on \
                -netdev tap,id=n0,ifname=rigtap0,script=no,downscript=no \
                -device virtio-net-pci,netdev=n0,disable-legacy=on,romfile= \
                -object rng-random,id=rng0,filename=/dev/urandom \
                -device virtio-rng-pci,rng=rng0,disable-legacy=on \
                -chardev file,id=con0,path="$WORK/console.out",append=on \
                -device virtio-serial-pci,disable-legacy=on \
                -device virtconsole,chardev=con0 \
                </dev/null >>"$WORK/l2-direct.log" 2>&1 || rc=$?
            [ $rc = 124 ] && echo "rig: QEMU killed: 300 s used up" >>"$WORK/l2-direct.log"
        done
        kill $peer 2>/dev/null
        wait $peer 2>/dev/null
        exit 0
    '
    l2_time=$(elapsed "$t")
    [[ -n $tailpid ]] && { sleep 0.5; kill "$tailpid" 2>/dev/null || true; }
    cat "$WORK/peer.log" >>"$WORK/l2-direct.log"
    if [[ $LIVE == 1 ]]; then
        cat "$WORK/peer.log"
    else
        echo "===== L2 direct: serial log ($WORK/l2-direct.log) ====="
        cat "$WORK/l2-direct.log"
    fi
    echo "===== L2 direct: verdict (boot to power-off: $l2_time s) ====="
    python3 "$RIG/host.py" verify --mode l2-direct --dir "$WORK" --log "$WORK/l2-direct.log" \
        --console-file "$WORK/console.out" || status=1
fi

if [[ $DO_L1 == 1 ]]; then
    cat >"$WORK/run.conf" <<EOF
MODE=probe
EXPECT_L1="edu vfioblk"
WATCHDOG=200
EOF
    t=$(now)
    python3 "$RIG/build-initramfs.py" l1 --busybox "$RIG_BUSYBOX" --modules "$RIG_MODULES" \
        --vmlinuz "$RIG_VMLINUZ" --l2-initramfs "$WORK/l2.cpio.gz" --conf "$WORK/run.conf" \
        --out "$WORK/l1.cpio.gz"
    rig_log "L1 initramfs built in $(elapsed "$t") s"
    rig_log "L1 probe under QEMU TCG (timeout 300 s) ..."
    t=$(now)
    # shellcheck disable=SC2046
    : >"$WORK/l1-probe.log"
    tailpid=
    if [[ $LIVE == 1 ]]; then
        tail -F "$WORK/l1-probe.log" 2>/dev/null &
        tailpid=$!
    fi
    rig_boot_l1 300 "$WORK/l1-probe.log" "$WORK/l1.cpio.gz" \
        -drive file="$WORK/disk.img",if=virtio,format=raw \
        $(extra_device_args edu vfioblk) || true
    l1_time=$(elapsed "$t")
    if [[ -n $tailpid ]]; then
        sleep 0.5
        kill "$tailpid" 2>/dev/null || true
    else
        echo "===== L1 probe: serial log ($WORK/l1-probe.log) ====="
        cat "$WORK/l1-probe.log"
    fi
    echo "===== L1 probe: verdict (boot to power-off: $l1_time s) ====="
    python3 "$RIG/host.py" verify --mode probe --dir "$WORK" --log "$WORK/l1-probe.log" \
        --expect-l1 "edu vfioblk" || status=1
fi

[[ $DO_L2 == 1 ]] && echo "selftest: L2 direct (QEMU TCG, boot to power-off): $l2_time s"
[[ $DO_L1 == 1 ]] && echo "selftest: L1 probe (QEMU TCG, boot to power-off): $l1_time s"
echo "selftest: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
exit $status
