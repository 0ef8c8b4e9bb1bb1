# Virtio-over-PCI checks of one PCI function, from the guest's side, in
# POSIX sh with od (busybox has no lspci -vv). Sourced by L2's /init and by
# rig/test-guest-pci.py, which feeds it synthetic configuration spaces.
# Needs check() from lib.sh.

type_name() {
    case $1 in
    1) echo net ;; 2) echo blk ;; 3) echo console ;; 4) echo rng ;; *) echo "type$1" ;;
    esac
}

# Configuration space bytes into C0..C255 (decimal), read through sysfs.
load_config() {
    _i=0
    for _v in $(od -An -v -tu1 -N256 "$1/config"); do
        eval "C$_i=$_v"
        _i=$((_i + 1))
    done
    CFG_LEN=$_i
}
rd8() { eval "$1=\$((C$(($2))))"; }
rd16() { eval "$1=\$((C$(($2)) | C$(($2 + 1)) << 8))"; }
rd32() { eval "$1=\$((C$(($2)) | C$(($2 + 1)) << 8 | C$(($2 + 2)) << 16 | C$(($2 + 3)) << 24))"; }

# BAR_SIZE of BAR $2 of device dir $1, from sysfs "resource" (start end flags
# per line; an unimplemented BAR reads as zeros).
bar_size() {
    set -- $(sed -n "$(($2 + 1))p" "$1/resource")
    if [ "$(($1))" -eq 0 ] && [ "$(($2))" -eq 0 ]; then BAR_SIZE=0; else BAR_SIZE=$(($2 - $1 + 1)); fi
}

# Walk the capability list of device dir $1 (virtio type $3) and report it as
# check $2. Well-formed: status bit 4 set, pointers dword aligned in 0x40..0xfc,
# no loops; virtio vendor caps (0x09) of cfg_type 1..5 with sane lengths and
# regions inside implemented BARs; MSI-X (0x11) with table and PBA inside BARs
# and enabled by the driver.
check_caps() {
    _dev=$1 _name=$2 _vtype=$3
    load_config "$_dev"
    if [ "$CFG_LEN" -lt 256 ]; then
        check "$_name" fail "config space read returned $CFG_LEN bytes"
        return
    fi
    rd16 _status 6
    if [ $((_status & 0x10)) -eq 0 ]; then
        check "$_name" fail "status=$_status: capability list bit clear"
        return
    fi
    rd8 _p 0x34
    _bad= _sum= _seen= _msix=0 _visited=
    while [ "$_p" -ne 0 ]; do
        case " $_visited " in
        *" $_p "*) _bad="$_bad loop-back-to:$_p"; break ;;
        esac
        _visited="$_visited $_p"
        if [ "$_p" -lt 64 ] || [ "$_p" -gt 252 ] || [ $((_p & 3)) -ne 0 ]; then
            _bad="$_bad bad-pointer:$_p"
            break
        fi
        rd8 _id $_p
        rd8 _next $((_p + 1))
        case $_id in
        9)
            rd8 _clen $((_p + 2))
            rd8 _ct $((_p + 3))
            rd8 _bar $((_p + 4))
            rd32 _off $((_p + 8))
            rd32 _len $((_p + 12))
            _sum="$_sum vcap$_ct@$_p:bar$_bar+$_off/$_len"
            _seen="$_seen $_ct"
            [ "$_clen" -ge 16 ] || _bad="$_bad vcap$_ct-cap_len=$_clen"
            case $_ct in
            1 | 2 | 3 | 4)
                if [ "$_bar" -gt 5 ]; then
                    _bad="$_bad vcap$_ct-bar=$_bar"
                else
                    bar_size "$_dev" "$_bar"
                    [ $((_off + _len)) -le $BAR_SIZE ] ||
                        _bad="$_bad vcap$_ct-outside-bar$_bar(size=$BAR_SIZE)"
                fi
                ;;
            esac
            case $_ct in
            1) [ "$_len" -ge 56 ] || _bad="$_bad common-cfg-len=$_len" ;;
            2)
                # notify cap carries notify_off_multiplier after the header
                [ "$_clen" -ge 20 ] || _bad="$_bad notify-cap_len=$_clen"
                rd32 _mult $((_p + 16))
                _sum="$_sum(mult=$_mult)"
                ;;
            3) [ "$_len" -ge 1 ] || _bad="$_bad isr-len=$_len" ;;
            5) [ "$_clen" -ge 20 ] || _bad="$_bad pci-cfg-cap_len=$_clen" ;;
            esac
            ;;
        17)
            rd16 _ctrl $((_p + 2))
            rd32 _tab $((_p + 4))
            rd32 _pba $((_p + 8))
            _tsize=$(((_ctrl & 0x7ff) + 1))
            _msix=1
            _sum="$_sum msix@$_p:size=$_tsize,enable=$(((_ctrl >> 15) & 1))"
            [ $(((_ctrl >> 15) & 1)) -eq 1 ] || _bad="$_bad msix-not-enabled"
            bar_size "$_dev" $((_tab & 7))
            [ $(((_tab & ~7) + _tsize * 16)) -le $BAR_SIZE ] || _bad="$_bad msix-table-outside-bar"
            bar_size "$_dev" $((_pba & 7))
            [ $(((_pba & ~7) + (_tsize + 63) / 64 * 8)) -le $BAR_SIZE ] || _bad="$_bad msix-pba-outside-bar"
            ;;
        *) _sum="$_sum cap$_id@$_p" ;;
        esac
        _p=$_next
    done
    for _t in 1 2 3 4 5; do
        case " $_seen " in
        *" $_t "*) ;;
        *)
            # The device-specific config structure is only mandatory for
            # device types that have one; entropy (rng) has none.
            if [ $_t = 4 ] && [ "$_vtype" = 4 ]; then
                _sum="$_sum (no device-cfg: allowed for rng)"
            else
                _bad="$_bad missing-vcap$_t"
            fi
            ;;
        esac
    done
    [ $_msix = 1 ] || _bad="$_bad missing-msix"
    if [ -z "$_bad" ]; then
        check "$_name" ok "$_sum"
    else
        check "$_name" fail "problems:$_bad; chain:$_sum"
    fi
}
