#!/bin/sh
# /init of L2: the Linux guest that the VMM under test boots (or, in
# rig/selftest.sh, QEMU as a known-good reference). It loads the virtio
# drivers and checks, from the guest's side, every device the VMM gives it.
# Results are "CHECK l2.<name> ok|fail|skip <detail>" lines on the serial
# console (see lib.sh); the run ends with "RIG-L2-DONE ..." and a power-off.
#
# Parameters come from the kernel command line (set by the host script):
#   rig.pattern=TRELLIS-PATTERN-<hex>  written to the rw disk and to hvc0
#   rig.expect=net:1,blk:2,console:1,rng:1   virtio device inventory
#   rig.rw_sectors=N rig.ro_sectors=N  capacities the disks must report
#   rig.addr=169.254.100.2/16 rig.peer=169.254.100.1   link-local only
#   rig.pingin=3   echo requests the peer must send us (0: skip that check)
#   rig.cpus=N     vCPUs the VMM gives L2 (all must come online)
#   rig.vfio=1     also check the functions passed through with VFIO
#                  (vfio.sh: rig.vfpattern, rig.vfsha, rig.vf_sectors)
#   rig.reboot=1   after the checks, reboot once and re-check the devices
#                  in the second boot (reboot.sh); without it: a skip
#
# With rig.reboot=1 the first boot ends "RIG-L2-DONE ..." then
# "RIG-L2-REBOOTING", the second boot "RIG-L2-REBOOT-DONE ...".
export PATH=/bin:/sbin
. /etc/rig/lib.sh
early_mounts
# Kernel messages would split CHECK lines on the shared serial port; keep the
# console quiet and print the kernel log at the end when something failed.
echo 1 >/proc/sys/kernel/printk
start_watchdog "$(cmdline_arg rig.watchdog | grep . || echo 150)" L2
echo "RIG-L2-START kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

PATTERN=$(cmdline_arg rig.pattern)
REBOOT=$(cmdline_arg rig.reboot)

# The modules first: which boot this is is written on the rw disk. Their
# checks are printed once that is known, named l2.modules.* in the first
# boot and l2.reboot.modules.* in the second (the counts are kept here).
for g in virtio blk net console rng; do load_group l2 "$g"; done >/tmp/modules.checks
. /etc/rig/virtio-pci.sh
. /etc/rig/reboot.sh
BOOT=1 STATE= RW=
if [ "$REBOOT" = 1 ]; then
    RW=$(disk_with_header TRELLIS-RW-DISK)
    [ -n "$RW" ] && STATE=$(reboot_state_read "$RW")
    case $STATE in
    "RIG-REBOOT boot1-done $PATTERN "*) BOOT=2 ;;
    "RIG-REBOOT boot2-"*) BOOT=3 ;;
    esac
fi

# Everything up to the verdict runs in main(), in a subshell (run_main).
main() {
EXPECT=$(cmdline_arg rig.expect)
RW_SECTORS=$(cmdline_arg rig.rw_sectors)
RO_SECTORS=$(cmdline_arg rig.ro_sectors)
ADDR=$(cmdline_arg rig.addr)
PEER=$(cmdline_arg rig.peer)
PINGIN=$(cmdline_arg rig.pingin)
: "${ADDR:=169.254.100.2/16}" "${PEER:=169.254.100.1}" "${PINGIN:=3}"

# ---------------------------------------------------------------------------
# PCI: every virtio function, its driver, MSI-X and its capability chain.
# ---------------------------------------------------------------------------
INVENTORY=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0x1af4 ] || continue
    bdf=${d##*/}
    dev=$(cat "$d/device")
    if [ $((dev)) -ge $((0x1040)) ] && [ $((dev)) -le $((0x107f)) ]; then
        vtype=$((dev - 0x1040))
    else
        # Transitional (0x1000..0x103f): the virtio type is the subsystem id.
        vtype=$(($(cat "$d/subsystem_device")))
    fi
    tname=$(type_name $vtype)
    # Index per type (blk0, blk1, ...) in bus order: stable names for the host.
    eval "idx=\${N_$tname:-0}; N_$tname=\$((idx + 1))"
    n=l2.virtio.$tname$idx
    INVENTORY="$INVENTORY $tname"

    if [ $((dev)) -ge $((0x1040)) ] && [ $((dev)) -le $((0x107f)) ]; then
        check $n.id ok "bdf=$bdf vendor=0x1af4 device=$dev (non-transitional) revision=$(cat "$d/revision")"
    else
        check $n.id fail "bdf=$bdf device=$dev: expected 0x1040..0x107f (modern virtio-pci)"
    fi

    drv=$(basename "$(readlink "$d/driver")" 2>/dev/null)
    case $drv in
    virtio-pci | virtio_pci) check $n.driver ok "bdf=$bdf driver=$drv" ;;
    *) check $n.driver fail "bdf=$bdf driver='$drv', expected virtio-pci" ;;
    esac

    # The virtio bus device below the PCI function, and its type driver.
    vdev=$(ls -d "$d"/virtio* 2>/dev/null | head -n1)
    if [ -n "$vdev" ]; then
        vid=$(($(cat "$vdev/device")))
        vdrv=$(basename "$(readlink "$vdev/driver")" 2>/dev/null)
        if [ "$vid" = "$vtype" ] && [ -n "$vdrv" ]; then
            check $n.virtio-driver ok "bdf=$bdf ${vdev##*/} type=$vid driver=$vdrv features=$(cat "$vdev/features" 2>/dev/null)"
        else
            check $n.virtio-driver fail "bdf=$bdf ${vdev##*/} type=$vid (pci says $vtype) driver='$vdrv'"
        fi
    else
        check $n.virtio-driver fail "bdf=$bdf: no virtio device under the PCI function (probe failed?)"
    fi

    nirq=$(ls "$d/msi_irqs" 2>/dev/null | wc -l)
    if [ "$nirq" -gt 0 ]; then
        check $n.msix ok "bdf=$bdf vectors=$nirq irqs=$(ls "$d/msi_irqs" | tr '\n' ',')"
    else
        check $n.msix fail "bdf=$bdf: no MSI/MSI-X vectors allocated (legacy INTx fallback?)"
    fi

    check_caps "$d" $n.caps $vtype
done

# Inventory: compare per-type counts with rig.expect (e.g. net:1,blk:2,...).
inv_bad=
inv_got=
for kv in $(echo "$EXPECT" | tr ',' ' '); do
    t=${kv%%:*} want=${kv#*:}
    got=$(for x in $INVENTORY; do echo "$x"; done | grep -c "^$t\$")
    inv_got="$inv_got $t=$got"
    [ "$got" = "$want" ] || inv_bad="$inv_bad $t:want=$want,got=$got"
done
if [ -z "$EXPECT" ]; then
    check l2.virtio.inventory fail "no rig.expect on the command line; found:$INVENTORY"
elif [ -z "$inv_bad" ]; then
    check l2.virtio.inventory ok "$inv_got"
else
    check l2.virtio.inventory fail "mismatch:$inv_bad (found:$INVENTORY)"
fi

# ---------------------------------------------------------------------------
# SMP: every vCPU came online (the MADT lists them, KVM starts them).
# ---------------------------------------------------------------------------
CPUS=$(cmdline_arg rig.cpus)
: "${CPUS:=1}"
online=$(grep -c '^processor' /proc/cpuinfo)
[ "$online" = "$CPUS" ] && check l2.smp ok "$online CPUs online ($(cat /sys/devices/system/cpu/online))" ||
    check l2.smp fail "$online CPUs online ($(cat /sys/devices/system/cpu/online)), expected $CPUS"

# ---------------------------------------------------------------------------
# Entropy: virtio-rng is the current hw_random source and yields bytes.
# ---------------------------------------------------------------------------
cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
case $cur in
*virtio*) check l2.rng.current ok "rng_current=$cur available=$(cat /sys/class/misc/hw_random/rng_available)" ;;
*) check l2.rng.current fail "rng_current='$cur'" ;;
esac
rnd=$(timeout 10 dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -v -tx1 | tr -d ' \n')
case $rnd in
"") check l2.rng.read fail "no bytes from /dev/hwrng within 10 s" ;;
*[1-9a-f]*) [ ${#rnd} -eq 64 ] && check l2.rng.read ok "32 bytes: $rnd" ||
    check l2.rng.read fail "short read: $rnd" ;;
*) check l2.rng.read fail "all zero: $rnd" ;;
esac

# ---------------------------------------------------------------------------
# Console: a line on hvc0 must reach the host-side file (checked in L1/host).
# ---------------------------------------------------------------------------
if WAIT_SECS=5 wait_for -c /dev/hvc0; then
    if timeout 10 sh -c "echo 'RIG-HVC0 $PATTERN' >/dev/hvc0"; then
        check l2.console.hvc0 ok "wrote 'RIG-HVC0 <pattern>' to /dev/hvc0"
    else
        check l2.console.hvc0 fail "write to /dev/hvc0 failed or blocked"
    fi
else
    check l2.console.hvc0 fail "no /dev/hvc0"
fi

# ---------------------------------------------------------------------------
# Block: find the disks by the header the host wrote into sector 0.
# ---------------------------------------------------------------------------
RW= RO=
for b in /sys/block/vd*; do
    [ -e "$b" ] || continue
    hdr=$(timeout 10 dd if=/dev/${b##*/} bs=16 count=1 2>/dev/null | head -n1)
    case $hdr in
    TRELLIS-RW-DISK) RW=${b##*/} ;;
    TRELLIS-RO-DISK) RO=${b##*/} ;;
    esac
done

if [ -n "$RW" ]; then
    check l2.blk.rw.found ok "dev=$RW"
    sz=$(cat /sys/block/$RW/size)
    [ "$sz" = "$RW_SECTORS" ] && check l2.blk.rw.capacity ok "sectors=$sz" ||
        check l2.blk.rw.capacity fail "sectors=$sz expected=$RW_SECTORS"
    [ "$(cat /sys/block/$RW/ro)" = 0 ] && check l2.blk.rw.writable ok "ro=0" ||
        check l2.blk.rw.writable fail "ro=$(cat /sys/block/$RW/ro)"

    # The pattern goes to sector 2048 (1 MiB) through the page cache, then
    # fsync: that must produce a FLUSH that makes it reach the image file.
    # Read back with O_DIRECT so the device, not the cache, answers.
    if printf '%s\n' "$PATTERN" | timeout 20 dd of=/dev/$RW bs=512 seek=2048 conv=notrunc,fsync 2>/tmp/dd.err; then
        sync
        back=$(timeout 20 dd if=/dev/$RW bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -n1)
        [ "$back" = "$PATTERN" ] && check l2.blk.rw.pattern ok "wrote+fsynced+read back at byte 1048576" ||
            check l2.blk.rw.pattern fail "read back '$back'"
    else
        check l2.blk.rw.pattern fail "write failed: $(cat /tmp/dd.err)"
    fi

    # Bulk: 4 MiB of random data at 2 MiB with O_DIRECT in 1 MiB requests
    # (multi-segment descriptor chains), read back the same way; the host
    # compares the sha256 printed here with the image file.
    timeout 30 dd if=/dev/urandom of=/tmp/bulk bs=1M count=4 iflag=fullblock 2>/dev/null
    want=$(sha256sum /tmp/bulk | cut -d' ' -f1)
    if timeout 60 dd if=/tmp/bulk of=/dev/$RW bs=1M seek=2 oflag=direct conv=notrunc,fsync 2>/tmp/dd.err; then
        got=$(timeout 60 dd if=/dev/$RW bs=1M skip=2 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        if [ "$got" = "$want" ]; then
            check l2.blk.rw.bulk ok "offset=2097152 len=4194304 sha256=$want"
            echo "$want" >/tmp/rig.bulk.sha  # the second boot reads it again
        else
            check l2.blk.rw.bulk fail "read back sha256=$got wrote=$want"
        fi
    else
        check l2.blk.rw.bulk fail "write failed: $(cat /tmp/dd.err)"
    fi
    rm -f /tmp/bulk
else
    check l2.blk.rw.found fail "no disk starts with TRELLIS-RW-DISK ($(ls /sys/block))"
fi

if [ -n "$RO" ]; then
    check l2.blk.ro.found ok "dev=$RO"
    sz=$(cat /sys/block/$RO/size)
    [ "$sz" = "$RO_SECTORS" ] && check l2.blk.ro.capacity ok "sectors=$sz" ||
        check l2.blk.ro.capacity fail "sectors=$sz expected=$RO_SECTORS"
    [ "$(cat /sys/block/$RO/ro)" = 1 ] && check l2.blk.ro.flag ok "/sys/block/$RO/ro=1" ||
        check l2.blk.ro.flag fail "/sys/block/$RO/ro=$(cat /sys/block/$RO/ro) (VIRTIO_BLK_F_RO not offered?)"
    if timeout 20 dd if=/dev/zero of=/dev/$RO bs=512 count=1 conv=notrunc,fsync 2>/tmp/dd.err; then
        check l2.blk.ro.refuses-write fail "dd to /dev/$RO succeeded"
    else
        check l2.blk.ro.refuses-write ok "dd failed as it should: $(grep -m1 . /tmp/dd.err)"
    fi
    hdr=$(timeout 10 dd if=/dev/$RO bs=16 count=1 iflag=direct 2>/dev/null | head -n1)
    [ "$hdr" = TRELLIS-RO-DISK ] && check l2.blk.ro.intact ok "header still there" ||
        check l2.blk.ro.intact fail "header now '$hdr'"
else
    check l2.blk.ro.found fail "no disk starts with TRELLIS-RO-DISK ($(ls /sys/block))"
fi

# ---------------------------------------------------------------------------
# VFIO: the passed-through virtio-blk and edu (rig.vfio=1 only).
# ---------------------------------------------------------------------------
if [ "$(cmdline_arg rig.vfio)" = 1 ]; then
    . /etc/rig/vfio.sh
    vfio_blk_checks
    vfio_edu_checks
fi

# ---------------------------------------------------------------------------
# Network: link-local address, ping the peer, and be pinged by it.
# ---------------------------------------------------------------------------
in_echos() {
    awk '/^Icmp:/ { if (!c) { for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i } else { print $c; exit } }' /proc/net/snmp
}
IF=
for i in /sys/class/net/*; do
    case $(basename "$(readlink "$i/device/driver")" 2>/dev/null) in
    virtio_net) IF=${i##*/}; break ;;
    esac
done
if [ -n "$IF" ]; then
    check l2.net.iface ok "iface=$IF mac=$(cat /sys/class/net/$IF/address)"
    ip link set lo up
    ip addr add "$ADDR" dev "$IF"
    ip link set "$IF" up
    k=0
    while [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" != 1 ] && [ $k -lt 50 ]; do
        usleep 100000
        k=$((k + 1))
    done
    [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" = 1 ] && check l2.net.link ok "carrier=1 after $((k * 100)) ms" ||
        check l2.net.link fail "carrier=$(cat /sys/class/net/$IF/carrier 2>/dev/null)"

    # The peer configures its end only once it sees us (it polls), so retry
    # for a while before the measured ping.
    k=0
    until ping -c 1 -W 1 "$PEER" >/dev/null 2>&1 || [ $k -ge 45 ]; do k=$((k + 1)); done

    # Steer the receive queue's MSI-X vector to the last CPU: Linux rewrites
    # the vector's message (destination APIC ID), so the replies to the
    # measured ping must arrive there through the updated KVM route.
    RXIRQ= LASTCPU=$((CPUS - 1))
    vname=$(basename "$(readlink /sys/class/net/$IF/device)")
    [ -n "$vname" ] && RXIRQ=$(awk -v n="$vname-input.0" '$NF == n { sub(":", "", $1); print $1; exit }' /proc/interrupts)
    rx_count() { awk -v i="$RXIRQ:" -v c=$((LASTCPU + 2)) '$1 == i { print $c; exit }' /proc/interrupts; }
    if [ "$CPUS" -lt 2 ]; then
        check l2.net.irq-affinity skip "one CPU"
    elif [ -z "$RXIRQ" ]; then
        check l2.net.irq-affinity fail "no $vname-input.0 line in /proc/interrupts"
    elif ! echo "$LASTCPU" >/proc/irq/$RXIRQ/smp_affinity_list 2>/tmp/aff.err; then
        check l2.net.irq-affinity fail "cannot steer IRQ $RXIRQ to CPU $LASTCPU: $(cat /tmp/aff.err)"
    else
        RX_BEFORE=$(rx_count)
    fi

    out=$(ping -c 3 -W 2 "$PEER" 2>&1 | grep 'packets transmitted')
    case $out in
    *" 3 packets received"*) check l2.net.ping-out ok "$PEER: $out (after $k retries)" ;;
    *) check l2.net.ping-out fail "$PEER: ${out:-no reply} (after $k retries)" ;;
    esac
    if [ -n "${RX_BEFORE:-}" ]; then
        rx_after=$(rx_count)
        if [ "$((rx_after - RX_BEFORE))" -ge 3 ]; then
            check l2.net.irq-affinity ok "IRQ $RXIRQ ($vname-input.0) on CPU $LASTCPU: $RX_BEFORE -> $rx_after interrupts"
        else
            check l2.net.irq-affinity fail "IRQ $RXIRQ on CPU $LASTCPU: $RX_BEFORE -> $rx_after interrupts over 3 replies ($(grep "^ *$RXIRQ:" /proc/interrupts))"
        fi
    fi

    if [ "$PINGIN" -gt 0 ]; then
        # Wait until the peer's echo requests have arrived and stopped coming.
        k=0 last=-1
        while [ $k -lt 60 ]; do
            e=$(in_echos)
            [ "$e" -ge "$PINGIN" ] && [ "$e" = "$last" ] && break
            last=$e
            sleep 1
            k=$((k + 1))
        done
        [ "$(in_echos)" -ge "$PINGIN" ] && check l2.net.ping-in ok "received $(in_echos) echo requests from the peer" ||
            check l2.net.ping-in fail "received $(in_echos) echo requests, expected >= $PINGIN"
    else
        check l2.net.ping-in skip "rig.pingin=0"
    fi
else
    check l2.net.iface fail "no interface driven by virtio_net ($(ls /sys/class/net))"
fi

}

# The second boot (reboot.sh): mark it started, so that a later boot knows
# it is one too many, then the compact checks.
reboot_main() {
    check l2.reboot.boot ok "second boot: the first left '$STATE' on $RW"
    reboot_state_write "$RW" "RIG-REBOOT boot2-started $PATTERN" ||
        check l2.reboot.started fail "could not write boot2-started to $RW: $(cat /tmp/dd.err)"
    [ "$(cmdline_arg rig.vfio)" = 1 ] && . /etc/rig/vfio.sh
    reboot_checks
    if reboot_state_write "$RW" "RIG-REBOOT boot2-done $PATTERN "; then
        check l2.reboot.done ok "wrote boot2-done to $RW"
    else
        check l2.reboot.done fail "could not write boot2-done to $RW: $(cat /tmp/dd.err)"
    fi
}

case $BOOT in
1)
    cat /tmp/modules.checks
    run_main l2
    next=poweroff
    if [ "$REBOOT" != 1 ]; then
        check l2.reboot skip "no rig.reboot=1 on the command line"
    elif reboot_leave_state; then
        next=reboot
    fi
    [ $FAIL -gt 0 ] && dmesg | tail -n 60 | sed 's/^/L2-DMESG /'
    echo "RIG-L2-DONE pass=$PASS fail=$FAIL uptime=$(cut -d' ' -f1 /proc/uptime)"
    if [ $next = reboot ]; then
        echo "RIG-L2-REBOOTING with reboot -f"
        reboot -f
        sleep 10
        echo "RIG-L2-REBOOT-FAILED: reboot -f returned and the VM still runs after 10 s"
    fi
    ;;
2)
    sed 's/^CHECK l2\.modules\./CHECK l2.reboot.modules./' /tmp/modules.checks
    run_main l2.reboot reboot_main
    [ $FAIL -gt 0 ] && dmesg | tail -n 60 | sed 's/^/L2-DMESG /'
    echo "RIG-L2-REBOOT-DONE pass=$PASS fail=$FAIL uptime=$(cut -d' ' -f1 /proc/uptime)"
    ;;
*)
    check l2.reboot.loop fail "a third boot: the rw disk ($RW) says '$STATE'" \
        "(boot2-started: the second boot reset before it finished; boot2-done: its power-off reset instead)"
    echo "RIG-L2-REBOOT-LOOP: powering off"
    ;;
esac
sync
# Power off; if the VMM has no ACPI power-off the call returns, init exits,
# the kernel panics and panic=-1 resets the machine: QEMU (-no-reboot) ends;
# trellis reboots L2, which then finds a state that says it is one boot too
# many (l2.reboot.loop), and L1 ends trellis (l1.trellis.reboot).
poweroff -f
sleep 5
reboot -f
