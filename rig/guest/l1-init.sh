#!/bin/sh
# /init of L1: the QEMU TCG guest (-cpu max: emulated SVM; intel-iommu) in
# which nested KVM works. It loads kvm/vfio/tun/virtio modules, finds the
# disks the host gave it, and then either
#   MODE=probe  only checks the sandbox (KVM, VFIO, extra devices), or
#   MODE=run    runs trellis to boot L2, plays L2's network peer, and prints
#               what L2 wrote to its virtio console. L2 reboots once
#               (guest/reboot.sh): trellis must rebuild the VM exactly once.
# Results are "CHECK l1.<name> ok|fail|skip <detail>" lines (lib.sh); L2's own
# CHECK lines pass through trellis' serial port to this console. The run ends
# with "RIG-L1-DONE ..." and a power-off.
#
# Settings come from /etc/rig/run.conf (written by the host per run):
#   MODE, PATTERN, L2_CMDLINE, L2_CPUS, TRELLIS_TIMEOUT, WATCHDOG, EXPECT_L1,
#   VFIO_BIND, TRELLIS_EXTRA_ARGS, L1_SYNC, VFIO (1: the VFIO checks: trellis
#   refuses unusable functions, and passes edu and vfioblk through to L2)
export PATH=/bin:/sbin
. /etc/rig/lib.sh
early_mounts
echo 1 >/proc/sys/kernel/printk
MODE=probe WATCHDOG=280 TRELLIS_TIMEOUT=120 EXPECT_L1= VFIO_BIND= TRELLIS_EXTRA_ARGS= L1_SYNC=0 VFIO=0
. /etc/rig/run.conf
start_watchdog "$WATCHDOG" L1
echo "RIG-L1-START mode=$MODE kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

# Everything up to the verdict runs in main(), in a subshell (run_main).
main() {
for g in virtio kvm vfio tun; do load_group l1 "$g"; done

# --- KVM -------------------------------------------------------------------
if WAIT_SECS=5 wait_for -c /dev/kvm; then
    check l1.kvm ok "/dev/kvm present; nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null) npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"
else
    check l1.kvm fail "no /dev/kvm ($(grep -o -m1 -w svm /proc/cpuinfo || echo 'no svm flag'))"
fi

# --- VFIO / IOMMU ------------------------------------------------------------
check_cmd l1.vfio "/dev/vfio/vfio present" wait_for -c /dev/vfio/vfio
ngroups=$(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)
[ "$ngroups" -gt 0 ] && check l1.iommu ok "$ngroups IOMMU groups" ||
    check l1.iommu fail "no IOMMU groups (intel_iommu=on missing or no -device intel-iommu?)"
check_cmd l1.tun "/dev/net/tun present" wait_for -c /dev/net/tun

# --- disks, identified by the 16-byte header the host wrote in sector 0 -----
RW= RO= VF=
for b in /sys/block/vd*; do
    [ -e "$b" ] || continue
    case $(dd if=/dev/${b##*/} bs=16 count=1 2>/dev/null | head -n1) in
    TRELLIS-RW-DISK) RW=${b##*/} ;;
    TRELLIS-RO-DISK) RO=${b##*/} ;;
    TRELLIS-VF-DISK) VF=${b##*/} ;;
    esac
done

# PCI functions by vendor:device, e.g. pci_find 0x1234 0x11e8 -> first BDF.
pci_find() {
    for d in /sys/bus/pci/devices/*; do
        [ "$(cat "$d/vendor")" = "$1" ] && [ "$(cat "$d/device")" = "$2" ] && { echo "${d##*/}"; return; }
    done
}

# Rebind a PCI function to vfio-pci; prints its /dev/vfio/<group>.
vfio_bind() {
    d=/sys/bus/pci/devices/$1
    [ -e "$d/driver" ] && echo "$1" >"$d/driver/unbind"
    echo vfio-pci >"$d/driver_override"
    echo "$1" >/sys/bus/pci/drivers/vfio-pci/bind || return 1
    g=$(basename "$(readlink "$d/iommu_group")")
    WAIT_SECS=5 wait_for -c "/dev/vfio/$g" && echo "/dev/vfio/$g"
}

# --- the extra devices the host asked for (run.sh --with-edu/--with-vfio-blk)
for x in $EXPECT_L1; do
    case $x in
    edu)
        EDU_BDF=$(pci_find 0x1234 0x11e8)
        [ -n "$EDU_BDF" ] && check l1.dev.edu ok "bdf=$EDU_BDF iommu_group=$(basename "$(readlink /sys/bus/pci/devices/$EDU_BDF/iommu_group)")" ||
            check l1.dev.edu fail "no 1234:11e8 function"
        ;;
    vfioblk)
        VFIOBLK_BDF=
        [ -n "$VF" ] && VFIOBLK_BDF=$(basename "$(readlink -f /sys/block/$VF/device/..)")
        [ -n "$VFIOBLK_BDF" ] && check l1.dev.vfioblk ok "bdf=$VFIOBLK_BDF disk=$VF" ||
            check l1.dev.vfioblk fail "no disk with the TRELLIS-VF-DISK header"
        ;;
    esac
done
[ -n "${EDU_BDF:-}" ] && EDU_SYSFS=/sys/bus/pci/devices/$EDU_BDF
[ -n "${VFIOBLK_BDF:-}" ] && VFIOBLK_SYSFS=/sys/bus/pci/devices/$VFIOBLK_BDF

# Bind requested devices to vfio-pci (probe mode: always try the edu device,
# proving passthrough is possible here).
[ "$MODE" = probe ] && [ -n "${EDU_BDF:-}" ] && VFIO_BIND="$VFIO_BIND edu"
for x in $VFIO_BIND; do
    case $x in edu) bdf=${EDU_BDF:-} ;; vfioblk) bdf=${VFIOBLK_BDF:-} ;; *) bdf= ;; esac
    if [ -z "$bdf" ]; then
        check l1.vfio.bind-$x fail "device not found"
    elif node=$(vfio_bind "$bdf" 2>/tmp/bind.err); then
        check l1.vfio.bind-$x ok "$bdf -> vfio-pci, $node"
    else
        check l1.vfio.bind-$x fail "$bdf: $(cat /tmp/bind.err)"
    fi
done

# vfio_refuses NAME PATH TEXT: trellis must refuse --device path=PATH at
# once, exit 1 and say TEXT in its one stderr line.
vfio_refuses() {
    timeout 30 /bin/trellis --kernel /l2/vmlinuz --serial off --device "path=$2" \
        </dev/null >/dev/null 2>/tmp/refuse.err
    _rc=$?
    if [ $_rc = 1 ] && [ "$(wc -l </tmp/refuse.err)" = 1 ] && grep -q "$3" /tmp/refuse.err; then
        check "$1" ok "rc=1: $(cat /tmp/refuse.err)"
    else
        check "$1" fail "rc=$_rc, expected 1 and '$3': $(head -c 300 /tmp/refuse.err | tr '\n' ' ')"
    fi
}

if [ "$MODE" = run ]; then
    [ -n "$RW" ] && check l1.disk.rw ok "/dev/$RW" || check l1.disk.rw fail "no TRELLIS-RW-DISK disk"
    [ -n "$RO" ] && check l1.disk.ro ok "/dev/$RO" || check l1.disk.ro fail "no TRELLIS-RO-DISK disk"

    if [ "$VFIO" = 1 ]; then
        # The failure paths: a function a host driver holds (our own rw
        # disk, bound to virtio-pci), and a path with no function behind it.
        RW_BDF=$(basename "$(readlink -f /sys/block/$RW/device/..)")
        vfio_refuses l1.vfio.refuse-unbound "/sys/bus/pci/devices/$RW_BDF" \
            "is bound to virtio-pci, not to vfio-pci"
        vfio_refuses l1.vfio.refuse-missing /sys/bus/pci/devices/0000:7f:1f.7 \
            "no such PCI function"
    fi

    mkdir -p /l2
    : >/l2/console.out
    # The peer waits for trellis' tap, addresses it and pings L2; when L2
    # reboots, trellis deletes the tap and creates it again, and the peer
    # addresses the new one (L2 pings it from its second boot). Its output
    # goes to a file: L2's CHECK lines share this console while trellis runs.
    sh /etc/rig/peer.sh l1 trellis0 169.254.100.1/16 169.254.100.2 "$TRELLIS_TIMEOUT" 1 >/tmp/peer.log 2>&1 &
    peer=$!

    # L2 reboots once. Should it reboot again (say its state on the disk
    # was lost, so every boot thinks it is the first), end trellis soon
    # after the third boot starts instead of at TRELLIS_TIMEOUT; the grace
    # lets a third L2 say itself that it is one too many (l2.reboot.loop).
    : >/tmp/trellis.err
    rm -f /tmp/trellis.pid /tmp/trellis.loop
    (
        k=0
        while sleep 1; do
            grep -q 'rebuilding it for boot [3-9]' /tmp/trellis.err || continue
            k=$((k + 1))
            [ $k -ge 20 ] || continue
            echo killed >/tmp/trellis.loop
            kill -KILL "$(cat /tmp/trellis.pid)"
            break
        done
    ) &
    loopwatch=$!

    # L1's /dev/vdX are passed straight through, so L2's flushed writes reach
    # the host's image files. TRELLIS_EXTRA_ARGS is expanded here, after the
    # VFIO binding above, so it may use ${EDU_SYSFS} or ${VFIOBLK_SYSFS}.
    # RUST_LOG: trellis' default filter (config::log_filter(0)) plus the
    # lines saying which device the guest reset the VM through; not with a
    # -v from --trellis-arg, which RUST_LOG would override (and -v shows
    # those lines anyway).
    # The sh -c wrapper records trellis' pid for the watcher above (busybox
    # timeout execs the command in its own process).
    eval "set -- $TRELLIS_EXTRA_ARGS"
    verbose=0
    for a; do case $a in -v | -vv | -vvv) verbose=1 ;; esac; done
    [ $verbose = 1 ] ||
        export RUST_LOG=warn,trellis=info,vfio_ioctls=error,devices::acpi_pm=info,devices::i8042=info
    echo "RIG-L1 starting trellis (timeout ${TRELLIS_TIMEOUT}s) at uptime=$(cut -d' ' -f1 /proc/uptime)"
    t0=$(cut -d' ' -f1 /proc/uptime)
    sh -c 'echo $$ >/tmp/trellis.pid; exec "$@"' trellis \
    timeout -s KILL "$TRELLIS_TIMEOUT" /bin/trellis \
        --kernel /l2/vmlinuz \
        --initramfs /l2/initramfs.cpio.gz \
        --cmdline "$L2_CMDLINE" \
        --memory size=512M \
        --cpus "boot=${L2_CPUS:-1}" \
        --disk path=/dev/$RW \
        --disk path=/dev/$RO,readonly=on \
        --net tap=trellis0 \
        --rng src=/dev/urandom \
        --console file=/l2/console.out \
        --serial tty \
        "$@" 2>>/tmp/trellis.err
    rc=$?
    kill $loopwatch 2>/dev/null
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo
    echo "RIG-L1 trellis exited rc=$rc after $(awk "BEGIN { print $t1 - $t0 }") s"

    # Give the peer a moment to finish its last ping, then stop it.
    k=0
    while kill -0 $peer 2>/dev/null && [ $k -lt 50 ]; do usleep 100000; k=$((k + 1)); done
    kill $peer 2>/dev/null
    cat /tmp/peer.log
    grep -q '^CHECK l1.net.tap' /tmp/peer.log ||
        check l1.net.tap fail "tap trellis0 did not appear while trellis ran"
    grep -q '^CHECK l1.net.ping-l2' /tmp/peer.log ||
        check l1.net.ping-l2 fail "trellis exited before L2 answered a ping"
    grep -q '^CHECK l1.net.tap-again' /tmp/peer.log ||
        check l1.net.tap-again fail "trellis exited before it created tap trellis0 again"
    FAIL=$((FAIL + $(grep -c '^CHECK [^ ]* fail' /tmp/peer.log)))
    PASS=$((PASS + $(grep -c '^CHECK [^ ]* ok' /tmp/peer.log)))

    case $rc in
    0) check l1.trellis.exit ok "rc=0" ;;
    137) [ -e /tmp/trellis.loop ] &&
        check l1.trellis.exit fail "killed: L2 was booted a third time (20 s ago)" ||
        check l1.trellis.exit fail "killed after ${TRELLIS_TIMEOUT}s timeout" ;;
    *) check l1.trellis.exit fail "rc=$rc" ;;
    esac
    sed 's/^/TRELLIS-STDERR /' /tmp/trellis.err

    # The reboot: trellis rebuilt the VM once, and L2's Linux reset it with
    # its default method here, the BIOS restart: a jump to the reset vector,
    # whose stub pulses the i8042 reset line.
    nreb=$(grep -c 'rebuilding it for boot' /tmp/trellis.err)
    resets=$(grep -o -e 'acpi: guest requested reset' -e 'i8042: guest requested CPU reset' /tmp/trellis.err |
        cut -d: -f1 | tr '\n' ' ')
    if [ "$nreb" = 1 ] && grep -q 'rebuilding it for boot 2$' /tmp/trellis.err; then
        check l1.trellis.reboot ok "one rebuild: $(grep -o 'the guest reset .*' /tmp/trellis.err)"
    else
        check l1.trellis.reboot fail "$nreb rebuild lines, expected one for boot 2: $(grep -o 'rebuilding it for boot [0-9]*' /tmp/trellis.err | tr '\n' ' ')"
    fi
    case $resets in
    i8042*) check l1.trellis.reset-path ok "reset requests, in order: $resets (Linux's BIOS restart hit the reset-vector stub)" ;;
    *) check l1.trellis.reset-path fail "reset requests, in order: '$resets' (expected the i8042, through the reset-vector stub)" ;;
    esac

    if [ "$VFIO" = 1 ]; then
        # trellis reports, per passed-through function, how many guest BAR
        # accesses it had to forward through VFIO: with the BARs mmapped
        # into L2 that is none (MSI-X table and PBA accesses are emulated).
        # One line per boot (trellis logs it when it tears the device down).
        for id in edu vfblk; do
            grep -o "vfio-stats id=$id .*" /tmp/trellis.err >/tmp/stats
            bad=0
            while read -r line; do
                fwd=$(echo "$line" | sed -n 's/.* forwarded=\([0-9]*\).*/\1/p')
                dm=$(echo "$line" | sed -n 's/.* direct_mapped=\(0x[0-9a-f]*\).*/\1/p')
                [ "$fwd" = 0 ] && [ "$((${dm:-0}))" -gt 0 ] || bad=1
            done </tmp/stats
            lines="$(wc -l </tmp/stats) boot(s): $(tr '\n' ';' </tmp/stats)"
            if [ -s /tmp/stats ] && [ $bad = 0 ]; then
                check l1.vfio.direct-$id ok "$lines"
            elif [ -s /tmp/stats ]; then
                check l1.vfio.direct-$id fail "$lines"
            else
                check l1.vfio.direct-$id fail "no vfio-stats line for $id in trellis' stderr"
            fi
        done
    fi

    echo "RIG-L1-CONSOLE-BEGIN"
    cat /l2/console.out
    echo
    echo "RIG-L1-CONSOLE-END"
    # hvc0 is a tty: its output discipline turns "\n" into "\r\n".
    tr -d '\r' </l2/console.out | grep -qxF "RIG-HVC0 $PATTERN" &&
        check l1.console-file ok "L2's hvc0 line reached /l2/console.out" ||
        check l1.console-file fail "'RIG-HVC0 <pattern>' not in /l2/console.out ($(wc -c </l2/console.out) bytes)"
    # The second boot's line, after the first's: trellis kept the file
    # across the reboot and went on writing after what it had.
    n1=$(tr -d '\r' </l2/console.out | grep -nxF "RIG-HVC0 $PATTERN" | head -n1 | cut -d: -f1)
    n2=$(tr -d '\r' </l2/console.out | grep -nxF "RIG-HVC0-BOOT2 $PATTERN" | head -n1 | cut -d: -f1)
    [ -n "$n1" ] && [ -n "$n2" ] && [ "$n1" -lt "$n2" ] &&
        check l1.reboot.console-file ok "the second boot's hvc0 line follows the first's (lines $n1, $n2)" ||
        check l1.reboot.console-file fail "'RIG-HVC0-BOOT2 <pattern>' at line '${n2}', the first boot's at line '${n1}' of /l2/console.out"
fi

}
run_main l1

[ $FAIL -gt 0 ] && dmesg | tail -n 60 | sed 's/^/L1-DMESG /'
echo "RIG-L1-DONE pass=$PASS fail=$FAIL uptime=$(cut -d' ' -f1 /proc/uptime)"
# No sync by default: L2's writes must already be on the disk because trellis
# forwarded L2's FLUSH; a sync here would hide a VMM that never flushes.
if [ "$L1_SYNC" = 1 ]; then poweroff -f; else poweroff -f -n; fi
