# Shared helpers for the rig's /init scripts (L1 and L2). POSIX sh as run by
# busybox ash; sourced, not executed. Installed as /etc/rig/lib.sh.
#
# Every result is one line on the console that the host parses:
#
#     CHECK <name> <ok|fail|skip> [detail ...]
#
# <name> has no spaces and starts with the scope ("l1." or "l2."). A run ends
# with "RIG-<SCOPE>-DONE pass=N fail=M" so the host can tell a finished run
# from one that died half way.

PASS=0
FAIL=0

check() {
    _name=$1 _res=$2
    shift 2
    # One printf per line: a single write(2) keeps the line whole even when
    # other output shares the console.
    printf 'CHECK %s %s %s\n' "$_name" "$_res" "$*"
    case $_res in
    ok) PASS=$((PASS + 1)) ;;
    fail) FAIL=$((FAIL + 1)) ;;
    esac
}

# check_cmd NAME DETAIL CMD...: ok when CMD succeeds.
check_cmd() {
    _n=$1 _d=$2
    shift 2
    if "$@"; then check "$_n" ok "$_d"; else check "$_n" fail "$_d (failed: $*)"; fi
}

# Value of key=value on the kernel command line (empty when absent).
cmdline_arg() {
    for _kv in $(cat /proc/cmdline); do
        case $_kv in "$1="*) echo "${_kv#*=}"; return 0 ;; esac
    done
    return 0
}

# wait_for TEST-ARGS... : poll `test` up to $WAIT_SECS (default 10) seconds,
# e.g. `wait_for -e /dev/kvm`. Drivers bind and nodes appear asynchronously.
wait_for() {
    _i=0
    while [ $_i -lt $((${WAIT_SECS:-10} * 10)) ]; do
        test "$@" && return 0
        usleep 100000
        _i=$((_i + 1))
    done
    test "$@"
}

# load_group SCOPE GROUP: insmod the modules listed (already in dependency
# order, by the initramfs builder) in /etc/rig/modules.GROUP. Modules that an
# earlier group loaded are skipped.
load_group() {
    _bad=
    _n=0
    for _m in $(cat "/etc/rig/modules.$2"); do
        _mod=$(echo "${_m%.ko}" | tr - _)
        [ -d "/sys/module/$_mod" ] && continue
        if insmod "/lib/modules/$_m" 2>>/tmp/insmod.err; then
            _n=$((_n + 1))
        else
            _bad="$_bad $_mod"
        fi
    done
    if [ -z "$_bad" ]; then
        check "$1.modules.$2" ok "loaded=$_n ($(tr '\n' ' ' <"/etc/rig/modules.$2"))"
    else
        check "$1.modules.$2" fail "insmod failed:$_bad: $(tail -n 3 /tmp/insmod.err | tr '\n' ' ')"
    fi
}

# Start a watchdog so a stuck step still ends the run with a message instead
# of leaving the host to kill the emulator without an explanation.
start_watchdog() {
    (
        sleep "$1"
        echo "RIG-$2-WATCHDOG fired after $1 s; powering off"
        poweroff -f
    ) &
}

# Common early setup of an initramfs /init.
early_mounts() {
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
    mkdir -p /tmp /run
    mount -t tmpfs tmpfs /tmp
}

# run_main SCOPE [FUNC]: run the caller's main() (or FUNC) in a subshell, so
# that a shell error in a check (bad arithmetic on a value a broken device
# reported, say) ends only the checks, not /init: the run still reports and
# powers off.
run_main() {
    rm -f /tmp/rig.counts
    (
        ${2:-main}
        echo "$PASS $FAIL" >/tmp/rig.counts
    )
    _rc=$?
    if [ -s /tmp/rig.counts ]; then
        read PASS FAIL </tmp/rig.counts
    else
        check "$1.script" fail "the check script aborted (status $_rc); later checks did not run"
    fi
}
