# L2's checks of the host functions trellis passed through with VFIO (from
# L1, where they are QEMU devices): a virtio-blk-pci backed by the host's
# vf.img, and QEMU's edu teaching device (docs/specs/edu.rst). Sourced by
# L2's /init when rig.vfio=1; needs check() and cmdline_arg from lib.sh and
# PATTERN from /init. POSIX sh as run by busybox ash.
#
#   rig.vfpattern=...   the line the host wrote into vf.img at 1 MiB
#   rig.vfsha=...       sha256 of the 1 MiB the host wrote at 4 MiB
#   rig.vf_sectors=N    vf.img's capacity

# Waits up to 5 s for the edu driver to have handled at least $1 interrupts.
edu_wait_irqs() {
    _k=0
    while [ "$(cat /sys/module/edu_trellis/parameters/irq_count)" -lt "$1" ] && [ $_k -lt 50 ]; do
        usleep 100000
        _k=$((_k + 1))
    done
}

vfio_blk_checks() {
    _vfpat=$(cmdline_arg rig.vfpattern)
    _vfsha=$(cmdline_arg rig.vfsha)
    _vfsec=$(cmdline_arg rig.vf_sectors)
    _vf=
    for _b in /sys/block/vd*; do
        [ -e "$_b" ] || continue
        _hdr=$(timeout 10 dd if=/dev/${_b##*/} bs=16 count=1 2>/dev/null | head -n1)
        [ "$_hdr" = TRELLIS-VF-DISK ] && _vf=${_b##*/}
    done
    if [ -z "$_vf" ]; then
        check l2.vfio.blk.found fail "no disk starts with TRELLIS-VF-DISK ($(ls /sys/block))"
        return
    fi
    _d=$(readlink -f /sys/block/$_vf/device/..)
    check l2.vfio.blk.found ok "dev=$_vf bdf=${_d##*/} id=$(cat $_d/vendor):$(cat $_d/device) driver=$(basename "$(readlink /sys/block/$_vf/device/driver)")"
    _sz=$(cat /sys/block/$_vf/size)
    [ "$_sz" = "$_vfsec" ] && check l2.vfio.blk.capacity ok "sectors=$_sz" ||
        check l2.vfio.blk.capacity fail "sectors=$_sz expected=$_vfsec"

    # What the host wrote, read with O_DIRECT: the device (QEMU, two levels
    # down) writes it into L2's memory through L1's IOMMU.
    _back=$(timeout 20 dd if=/dev/$_vf bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | head -n1)
    [ -n "$_vfpat" ] && [ "$_back" = "$_vfpat" ] &&
        check l2.vfio.blk.read ok "the host's pattern at byte 1048576: $_back" ||
        check l2.vfio.blk.read fail "read '$_back', the host wrote '$_vfpat'"
    _got=$(timeout 30 dd if=/dev/$_vf bs=64k skip=64 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ -n "$_vfsha" ] && [ "$_got" = "$_vfsha" ] &&
        check l2.vfio.blk.bulk ok "1 MiB at 4 MiB in 64 KiB O_DIRECT reads: sha256=$_got" ||
        check l2.vfio.blk.bulk fail "sha256=$_got, the host wrote $_vfsha"

    # Ours at 3 MiB, the device reading it from L2's memory; fsync, then
    # read back with O_DIRECT. The host checks vf.img afterwards.
    if printf '%s\n' "$PATTERN" | timeout 20 dd of=/dev/$_vf bs=512 seek=6144 conv=notrunc,fsync 2>/tmp/dd.err; then
        _back=$(timeout 20 dd if=/dev/$_vf bs=512 skip=6144 count=1 iflag=direct 2>/dev/null | head -n1)
        [ "$_back" = "$PATTERN" ] && check l2.vfio.blk.write ok "wrote+fsynced+read back at byte 3145728" ||
            check l2.vfio.blk.write fail "read back '$_back'"
    else
        check l2.vfio.blk.write fail "write failed: $(cat /tmp/dd.err)"
    fi
}

# le32 N: the 4 little-endian bytes of N, for writing configuration space.
le32() {
    printf "\\$(printf %o $(($1 & 255)))\\$(printf %o $(($1 >> 8 & 255)))"
    printf "\\$(printf %o $(($1 >> 16 & 255)))\\$(printf %o $(($1 >> 24 & 255)))"
}

# edu_move_bar0 DEV ADDR: what a kernel rebalancing BARs does: memory
# decoding off, BAR0 := ADDR, decoding back on (config writes through sysfs).
# (fullblock: le32's two printfs reach the pipe as two writes.)
edu_move_bar0() {
    _cmd=$(od -An -tu2 -j4 -N2 "$1/config" | tr -d ' ')
    le32 $((_cmd & ~2)) | dd of="$1/config" bs=2 seek=2 count=1 iflag=fullblock conv=notrunc 2>/dev/null
    le32 "$2" | dd of="$1/config" bs=4 seek=4 count=1 iflag=fullblock conv=notrunc 2>/dev/null
    le32 $((_cmd | 2)) | dd of="$1/config" bs=2 seek=2 count=1 iflag=fullblock conv=notrunc 2>/dev/null
}

vfio_edu_checks() {
    _d=
    for _x in /sys/bus/pci/devices/*; do
        [ "$(cat "$_x/vendor")" = 0x1234 ] && [ "$(cat "$_x/device")" = 0x11e8 ] && _d=$_x
    done
    if [ -z "$_d" ]; then
        check l2.vfio.edu.found fail "no 1234:11e8 function"
        return
    fi
    set -- $(sed -n 1p "$_d/resource")
    _bar=$(($1))
    _size=$(($2 - $1 + 1))
    # No driver enables the function; do what one would (memory decoding
    # on), so that the BAR is mapped into L2 and devmem reaches it.
    echo 1 >"$_d/enable"
    check l2.vfio.edu.found ok "bdf=${_d##*/} bar0=$(printf 0x%x $_bar) size=$(printf 0x%x $_size) pin=$(od -An -tu1 -j61 -N1 "$_d/config" | tr -d ' ')"

    _id=$(devmem $_bar 32)
    [ "$((_id))" = "$((0x010000ed))" ] &&
        check l2.vfio.edu.id ok "identification register = $_id" ||
        check l2.vfio.edu.id fail "identification register = '$_id', expected 0x010000ED"
    devmem $((_bar + 4)) 32 0x12345678
    _live=$(devmem $((_bar + 4)) 32)
    [ "$((_live))" = "$((0xedcba987))" ] &&
        check l2.vfio.edu.liveness ok "wrote 0x12345678, read back its inverse $_live" ||
        check l2.vfio.edu.liveness fail "wrote 0x12345678, read back '$_live'"
    devmem $((_bar + 8)) 32 10
    _k=0
    while [ $(($(devmem $((_bar + 0x20)) 32) & 1)) = 1 ] && [ $_k -lt 50 ]; do
        usleep 100000
        _k=$((_k + 1))
    done
    _f=$(devmem $((_bar + 8)) 32)
    [ "$((_f))" = 3628800 ] && check l2.vfio.edu.factorial ok "10! = $((_f))" ||
        check l2.vfio.edu.factorial fail "10! read as '$_f'"

    # Move BAR0 16 MiB up and back: trellis moves its memory slot along
    # (had it not, the access at the new address would be forwarded, which
    # L1 checks in trellis' vfio-stats), and nothing is left at the old one.
    _new=$((_bar + 0x1000000))
    edu_move_bar0 "$_d" $_new
    _id_new=$(devmem $_new 32)
    _id_old=$(devmem $_bar 32)
    edu_move_bar0 "$_d" $_bar
    _id_back=$(devmem $_bar 32)
    [ "$((_id_new))" = "$((0x010000ed))" ] && [ "$((_id_old))" = "$((0xffffffff))" ] &&
        [ "$((_id_back))" = "$((0x010000ed))" ] &&
        check l2.vfio.edu.bar-move ok "BAR0 moved to $(printf 0x%x $_new): ID there, $_id_old at the old address; moved back: $_id_back" ||
        check l2.vfio.edu.bar-move fail "at $(printf 0x%x $_new): '$_id_new', old address: '$_id_old', back: '$_id_back'"

    # Interrupts, counted by the rig's edu driver: INTx first, then MSI
    # (the second load switches VFIO from INTx to MSI under trellis).
    _ko=/lib/modules/edu_trellis.ko
    _p=/sys/module/edu_trellis/parameters
    if [ ! -f $_ko ]; then
        check l2.vfio.edu.intx fail "no $_ko in the initramfs"
        check l2.vfio.edu.msi fail "no $_ko in the initramfs"
        return
    fi
    if insmod $_ko use_msi=0 2>/tmp/insmod.err; then
        echo 0x5 >$_p/raise
        edu_wait_irqs 1
        _n=$(cat $_p/irq_count) _m=$(cat $_p/mode) _s=$(cat $_p/last_status)
        [ "$_m" = intx ] && [ "$_n" -ge 1 ] && [ "$_s" = 5 ] &&
            check l2.vfio.edu.intx ok "mode=$_m irq=$(cat $_d/irq) handled=$_n status=$_s" ||
            check l2.vfio.edu.intx fail "mode=$_m handled=$_n status=$_s after raising status 5"
        rmmod edu_trellis
    else
        check l2.vfio.edu.intx fail "insmod: $(cat /tmp/insmod.err)"
    fi
    if insmod $_ko use_msi=1 2>/tmp/insmod.err; then
        echo 0x7 >$_p/raise
        edu_wait_irqs 1
        _s1=$(cat $_p/last_status)
        # The device interrupts by itself when the factorial is done.
        echo 5 >$_p/factorial
        edu_wait_irqs 2
        _n=$(cat $_p/irq_count) _m=$(cat $_p/mode) _r=$(cat $_p/result)
        _v=$(ls "$_d/msi_irqs" 2>/dev/null | wc -l)
        [ "$_m" = msi ] && [ "$_v" -ge 1 ] && [ "$_n" = 2 ] && [ "$_s1" = 7 ] && [ "$_r" = 120 ] &&
            check l2.vfio.edu.msi ok "mode=$_m vectors=$_v handled=$_n: raised status 7, then 5! = $_r by interrupt" ||
            check l2.vfio.edu.msi fail "mode=$_m vectors=$_v handled=$_n first-status=$_s1 factorial=$_r"
        rmmod edu_trellis
    else
        check l2.vfio.edu.msi fail "insmod: $(cat /tmp/insmod.err)"
    fi
}
