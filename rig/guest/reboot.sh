# L2's reboot: the first boot runs every check, leaves its state on the rw
# disk and resets the machine through Linux's own path (`reboot -f`: with no
# reboot= on the command line, x86 Linux writes the FADT's reset register
# first, then pulses the keyboard controller's reset line). The VMM boots
# L2 again on the same disks: trellis by rebuilding the whole VM, selftest.sh
# by starting QEMU again (it runs with -no-reboot). The second boot finds
# the state and re-checks, quickly, that the devices came back.
#
# Sourced by L2's /init; needs check() and cmdline_arg from lib.sh, the
# virtio modules loaded, PATTERN set, and type_name from virtio-pci.sh.
# POSIX sh as run by busybox ash.
#
# The state is one line in sector 16384 (byte 8 MiB) of the rw disk, an area
# nothing else uses (host.py REBOOT_OFFSET):
#
#   RIG-REBOOT <state> <pattern> mac=<L2's MAC> bulk=<sha256 at 2 MiB>
#
#   (none)          this is the first boot
#   boot1-done      written by the first boot just before `reboot -f`
#   boot2-started   written by the second boot as soon as it has read the above
#   boot2-done      written by the second boot before it powers off (host.py
#                   checks it in the image)
#
# A boot that finds boot2-* is a third one, which must never happen: it fails
# loudly and powers off. (A lost state line cannot be told from a first boot;
# L1 ends trellis when a third boot starts, see l1-init.sh.)

REBOOT_SECTOR=16384

# disk_with_header TEXT: the vdX whose sector 0 starts with TEXT.
disk_with_header() {
    for _b in /sys/block/vd*; do
        [ -e "$_b" ] || continue
        [ "$(timeout 10 dd if=/dev/${_b##*/} bs=16 count=1 2>/dev/null | head -n1)" = "$1" ] &&
            { echo "${_b##*/}"; return; }
    done
}

# reboot_state_read DEV: the state line (O_DIRECT: the device answers).
reboot_state_read() {
    timeout 20 dd if=/dev/$1 bs=512 skip=$REBOOT_SECTOR count=1 iflag=direct 2>/dev/null |
        tr -d '\000' | head -n1
}

# reboot_state_write DEV LINE: write, fsync, read back; fails unless the
# device returns LINE.
reboot_state_write() {
    printf '%s\n' "$2" | timeout 20 dd of=/dev/$1 bs=512 seek=$REBOOT_SECTOR conv=notrunc,fsync 2>/tmp/dd.err &&
        [ "$(reboot_state_read "$1")" = "$2" ]
}

# net_iface: the interface virtio_net drives.
net_iface() {
    for _i in /sys/class/net/*; do
        case $(basename "$(readlink "$_i/device/driver")" 2>/dev/null) in
        virtio_net) echo "${_i##*/}"; return ;;
        esac
    done
}

# state_field LINE KEY: the value of KEY=value in a state line.
state_field() {
    for _kv in $1; do
        case $_kv in "$2="*) echo "${_kv#*=}"; return ;; esac
    done
}

# First boot, after its checks: leave the state for the second one.
# Succeeds only if the line is on the disk.
reboot_leave_state() {
    _rw=$(disk_with_header TRELLIS-RW-DISK)
    if [ -z "$_rw" ]; then
        check l2.reboot.marker fail "no TRELLIS-RW-DISK disk to keep the state in: not rebooting"
        return 1
    fi
    _if=$(net_iface)
    _line="RIG-REBOOT boot1-done $PATTERN mac=$(cat /sys/class/net/$_if/address 2>/dev/null) bulk=$(cat /tmp/rig.bulk.sha 2>/dev/null)"
    if reboot_state_write "$_rw" "$_line"; then
        check l2.reboot.marker ok "state for the second boot at byte $((REBOOT_SECTOR * 512)) of $_rw: $_line"
    else
        check l2.reboot.marker fail "could not write the state to $_rw: $(cat /tmp/dd.err): not rebooting"
        return 1
    fi
}

# Second boot: compact versions of the first boot's checks, named l2.reboot.*.
# $STATE is the first boot's state line, $RW the rw disk.
reboot_checks() {
    EXPECT=$(cmdline_arg rig.expect)
    PEER=$(cmdline_arg rig.peer)
    ADDR=$(cmdline_arg rig.addr)
    : "${ADDR:=169.254.100.2/16}" "${PEER:=169.254.100.1}"

    # Every virtio function: modern, bound to virtio-pci, its virtio device
    # driven, MSI-X vectors allocated (the capability chain is not walked
    # again: that is slow and the first boot did it).
    _inv=
    for _d in /sys/bus/pci/devices/*; do
        [ "$(cat "$_d/vendor")" = 0x1af4 ] || continue
        _dev=$(cat "$_d/device")
        _t=$(type_name $((_dev - 0x1040)))
        eval "_idx=\${R_$_t:-0}; R_$_t=\$((_idx + 1))"
        _inv="$_inv $_t"
        _drv=$(basename "$(readlink "$_d/driver")" 2>/dev/null)
        _vdev=$(ls -d "$_d"/virtio* 2>/dev/null | head -n1)
        _vdrv=$(basename "$(readlink "$_vdev/driver")" 2>/dev/null)
        _nirq=$(ls "$_d/msi_irqs" 2>/dev/null | wc -l)
        _msg="bdf=${_d##*/} device=$_dev driver=$_drv ${_vdev##*/}=$_vdrv msix-vectors=$_nirq"
        if [ $((_dev)) -ge $((0x1040)) ] && [ $((_dev)) -le $((0x107f)) ] &&
            { [ "$_drv" = virtio-pci ] || [ "$_drv" = virtio_pci ]; } &&
            [ -n "$_vdrv" ] && [ "$_nirq" -gt 0 ]; then
            check l2.reboot.virtio.$_t$_idx ok "$_msg"
        else
            check l2.reboot.virtio.$_t$_idx fail "$_msg"
        fi
    done
    _bad=
    for _kv in $(echo "$EXPECT" | tr ',' ' '); do
        _got=$(for _x in $_inv; do echo "$_x"; done | grep -c "^${_kv%%:*}\$")
        [ "$_got" = "${_kv#*:}" ] || _bad="$_bad ${_kv%%:*}:want=${_kv#*:},got=$_got"
    done
    [ -n "$EXPECT" ] && [ -z "$_bad" ] && check l2.reboot.virtio.inventory ok "$EXPECT" ||
        check l2.reboot.virtio.inventory fail "mismatch:$_bad (found:$_inv)"

    # The rw disk: what the first boot wrote is still there (O_DIRECT).
    _back=$(timeout 20 dd if=/dev/$RW bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -n1)
    _want=$(state_field "$STATE" bulk)
    _got=$(timeout 60 dd if=/dev/$RW bs=1M skip=2 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$_back" = "$PATTERN" ] && [ -n "$_want" ] && [ "$_got" = "$_want" ] &&
        check l2.reboot.blk.rw ok "dev=$RW: the first boot's pattern at 1 MiB and its 4 MiB at 2 MiB (sha256=$_got)" ||
        check l2.reboot.blk.rw fail "dev=$RW: read '$_back' at 1 MiB; 4 MiB at 2 MiB sha256=$_got, the first boot wrote '$_want'"

    _ro=$(disk_with_header TRELLIS-RO-DISK)
    [ -n "$_ro" ] && [ "$(cat /sys/block/$_ro/ro)" = 1 ] &&
        check l2.reboot.blk.ro ok "dev=$_ro ro=1" ||
        check l2.reboot.blk.ro fail "dev='$_ro' ro=$(cat /sys/block/$_ro/ro 2>/dev/null)"

    _cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
    _rnd=$(timeout 10 dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -v -tx1 | tr -d ' \n')
    case $_cur:${#_rnd}:$_rnd in
    *virtio*:64:*[1-9a-f]*) check l2.reboot.rng ok "rng_current=$_cur 32 bytes: $_rnd" ;;
    *) check l2.reboot.rng fail "rng_current='$_cur' read '$_rnd'" ;;
    esac

    if WAIT_SECS=5 wait_for -c /dev/hvc0 && timeout 10 sh -c "echo 'RIG-HVC0-BOOT2 $PATTERN' >/dev/hvc0"; then
        check l2.reboot.console ok "wrote 'RIG-HVC0-BOOT2 <pattern>' to /dev/hvc0"
    else
        check l2.reboot.console fail "no /dev/hvc0 or the write failed"
    fi

    if [ "$(cmdline_arg rig.vfio)" = 1 ]; then
        reboot_vfio_checks
    fi

    # The network: same MAC as in the first boot, and the peer answers (it
    # addressed the VMM's new tap: l1.net.tap-again / host.net.tap-again).
    _if=$(net_iface)
    _mac1=$(state_field "$STATE" mac)
    if [ -n "$_if" ]; then
        _mac=$(cat /sys/class/net/$_if/address)
        ip link set lo up
        ip addr add "$ADDR" dev "$_if"
        ip link set "$_if" up
        _k=0
        until ping -c 1 -W 1 "$PEER" >/dev/null 2>&1 || [ $_k -ge 30 ]; do _k=$((_k + 1)); done
        if [ $_k -lt 30 ] && [ "$_mac" = "$_mac1" ]; then
            check l2.reboot.net ok "iface=$_if mac=$_mac (unchanged); $PEER answered after $_k retries"
        else
            check l2.reboot.net fail "iface=$_if mac=$_mac (first boot: $_mac1); ping $PEER: $([ $_k -lt 30 ] && echo answered || echo 'no reply in 30 tries')"
        fi
    else
        check l2.reboot.net fail "no interface driven by virtio_net ($(ls /sys/class/net))"
    fi
}

# Second boot, rig.vfio=1: both passed-through functions work again, i.e.
# trellis closed their VFIO groups and re-opened them for the new VM.
reboot_vfio_checks() {
    _vf=$(disk_with_header TRELLIS-VF-DISK)
    _vfpat=$(cmdline_arg rig.vfpattern)
    if [ -n "$_vf" ]; then
        _a=$(timeout 20 dd if=/dev/$_vf bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -n1)
        _b=$(timeout 20 dd if=/dev/$_vf bs=512 skip=6144 count=1 iflag=direct 2>/dev/null | head -n1)
        [ "$_a" = "$_vfpat" ] && [ "$_b" = "$PATTERN" ] &&
            check l2.reboot.vfio.blk ok "dev=$_vf: the host's pattern at 1 MiB, the first boot's at 3 MiB" ||
            check l2.reboot.vfio.blk fail "dev=$_vf: read '$_a' at 1 MiB (host wrote '$_vfpat'), '$_b' at 3 MiB"
    else
        check l2.reboot.vfio.blk fail "no disk starts with TRELLIS-VF-DISK ($(ls /sys/block))"
    fi

    _d=
    for _x in /sys/bus/pci/devices/*; do
        [ "$(cat "$_x/vendor")" = 0x1234 ] && [ "$(cat "$_x/device")" = 0x11e8 ] && _d=$_x
    done
    if [ -z "$_d" ]; then
        check l2.reboot.vfio.edu fail "no 1234:11e8 function"
        check l2.reboot.vfio.edu-msi fail "no 1234:11e8 function"
        return
    fi
    set -- $(sed -n 1p "$_d/resource")
    _bar=$(($1))
    echo 1 >"$_d/enable"
    _id=$(devmem $_bar 32)
    devmem $((_bar + 4)) 32 0x12345678
    _live=$(devmem $((_bar + 4)) 32)
    [ "$((_id))" = "$((0x010000ed))" ] && [ "$((_live))" = "$((0xedcba987))" ] &&
        check l2.reboot.vfio.edu ok "bdf=${_d##*/} bar0=$(printf 0x%x $_bar): identification $_id, liveness $_live" ||
        check l2.reboot.vfio.edu fail "bdf=${_d##*/} bar0=$(printf 0x%x $_bar): identification '$_id' (want 0x010000ED), liveness '$_live' (want 0xEDCBA987)"

    # An interrupt through the new VM's MSI route and VFIO's new eventfd.
    _p=/sys/module/edu_trellis/parameters
    if insmod /lib/modules/edu_trellis.ko use_msi=1 2>/tmp/insmod.err; then
        echo 0x7 >$_p/raise
        edu_wait_irqs 1
        _n=$(cat $_p/irq_count) _m=$(cat $_p/mode) _s=$(cat $_p/last_status)
        [ "$_m" = msi ] && [ "$_n" -ge 1 ] && [ "$_s" = 7 ] &&
            check l2.reboot.vfio.edu-msi ok "mode=$_m handled=$_n status=$_s" ||
            check l2.reboot.vfio.edu-msi fail "mode=$_m handled=$_n status=$_s after raising status 7"
        rmmod edu_trellis
    else
        check l2.reboot.vfio.edu-msi fail "insmod: $(cat /tmp/insmod.err)"
    fi
}
