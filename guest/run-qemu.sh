#!/usr/bin/env bash
# Builds the test guest, boots it under QEMU (KVM) with virtio-blk, -rng,
# -console and -net over virtio-pci (modern only, MSI-X), and checks the
# outcome from the host side: the exit code, the RESULT line, the console
# file, what the guest wrote to the disk and the frame it sent on the tap.
#
# Usage: guest/run-qemu.sh [--bench] [--no-net] [--tcg] [--timeout SECS]
#                          [--append "guest options"]
#   --bench      also run the benchmarks (mode=bench) and print BENCH lines
#   --no-net     no virtio-net (no tap needed; the net checks are skipped)
#   --tcg        use QEMU's emulator instead of KVM
#   --append     extra guest command line, e.g. "bars=reassign apic=xapic"
# Environment: WORKDIR (default guest/run), TAP (default tapguest0), QEMU.
# Exit status: 0 when every check passed, 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
workdir=${WORKDIR:-$here/run}
tap=${TAP:-tapguest0}
qemu=${QEMU:-qemu-system-x86_64}
bench=0 net=1 accel=kvm timeout_s=180 extra=""

while (($#)); do
    case $1 in
    --bench) bench=1 ;;
    --no-net) net=0 ;;
    --tcg) accel=tcg ;;
    --timeout) timeout_s=$2; shift ;;
    --append) extra=$2; shift ;;
    *) echo "run-qemu.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'run-qemu: %s\n' "$*"; }
failures=()
fail() { failures+=("$*"); say "FAIL: $*"; }

say "building the guest"
(cd "$here" && cargo build --release --quiet 2>&1 | grep -v -e "target feature .sse2." -e "^ *|" \
    -e "phased out" -e "issue #116344" -e "^ *= note" -e '^$' -e "generated 1 warning" || true)
kernel=$here/target/x86_64-unknown-linux-gnu/release/trellis-test-guest
[[ -f $kernel ]] || { say "no guest binary at $kernel"; exit 1; }

# SSE audit: KVM here cannot emulate SSE arithmetic. Our crates are built
# without SSE; only the precompiled core's number formatting and padding
# (which the guest avoids, see src/serial.rs) may contain it.
if command -v objdump >/dev/null; then
    sse=$(objdump -d --no-show-raw-insn -C "$kernel" | awk '
        /^[0-9a-f]+ <.*>:$/ { fn = $0; sub(/^[0-9a-f]+ /, "", fn) }
        /xmm/ && !/mov(ups|aps|upd|apd|dqu|dqa)/ { bad[fn] = 1 }
        END { for (f in bad) print f }' |
        grep -v -E 'core::fmt::Formatter>::pad|core::str::count|as core::fmt::(Display|Debug)>::fmt|DebugSet' || true)
    [[ -z $sse ]] || say "WARNING: SSE arithmetic in: $(echo "$sse" | tr '\n' ' ')"
fi

mkdir -p "$workdir"
disk=$workdir/disk.img
console=$workdir/console.out
serial=$workdir/serial.log
capture=$workdir/net-capture.txt
rm -f "$console" "$serial" "$capture"
"$here/make-disk.sh" "$disk" 64

expect=blk,rng,console
capture_pid=""
cleanup() {
    [[ -n $capture_pid ]] && kill "$capture_pid" 2>/dev/null || true
    if ((net)); then ip link del "$tap" 2>/dev/null || true; fi
}
trap cleanup EXIT

net_args=()
if ((net)); then
    ip link del "$tap" 2>/dev/null || true
    if ip tuntap add dev "$tap" mode tap 2>/dev/null && ip link set "$tap" up; then
        expect+=,net
        net_args=(-netdev "tap,id=n0,ifname=$tap,script=no,downscript=no"
            -device virtio-net-pci,netdev=n0,disable-legacy=on)
        if command -v python3 >/dev/null; then
            # Watch the tap for the guest's frame (EtherType 0x88b5).
            python3 - "$tap" "$timeout_s" >"$capture" 2>&1 <<'EOF' &
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
s.bind((sys.argv[1], 0))
s.settimeout(0.5)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        f = s.recv(2048)
    except socket.timeout:
        continue
    if len(f) >= 28 and f[12:14] == b"\x88\xb5":
        print("captured src=%s payload=%s" % (f[6:12].hex(":"), f[14:28].decode("ascii", "replace")), flush=True)
        sys.exit(0)
print("nothing captured", flush=True)
EOF
            capture_pid=$!
            sleep 0.5
        else
            say "python3 missing: the frame is not captured on the host side"
        fi
    else
        say "could not create tap $tap (needs root and /dev/net/tun): running without net"
        net=0
    fi
fi

append="expect=$expect $extra"
((bench)) && append="mode=bench $append"
if [[ $accel == kvm ]]; then
    cpu=(-accel kvm -cpu qemu64,-pni,+invtsc)
else
    cpu=(-accel tcg -cpu max)
fi

say "booting: $append"
set +e
timeout "$timeout_s" "$qemu" "${cpu[@]}" -M q35 -m 256 -smp 1 \
    -nographic -vga none -nic none -no-reboot \
    -kernel "$kernel" -append "$append" \
    -device isa-debug-exit,iobase=0xf4,iosize=4 \
    -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=TRELLIS-BLK \
    -drive id=d0,file="$disk",format=raw,if=none \
    -device virtio-rng-pci,disable-legacy=on \
    -device virtio-serial-pci,disable-legacy=on \
    -device virtconsole,chardev=c0 -chardev file,id=c0,path="$console" \
    "${net_args[@]}" </dev/null 2>&1 | tr -d '\r' | tee "$serial" |
    grep -E --line-buffered '^(TRELLIS-GUEST|INFO|TEST|SKIP|BENCH|RESULT|PANIC|EXCEPTION|LOG)|qemu'
status=${PIPESTATUS[0]}
set -e

# isa-debug-exit: QEMU exits with (value << 1) | 1; the guest writes 0 for
# pass, 1 for fail.
case $status in
1) ;;
3) fail "guest reported failure (exit port value 1)" ;;
124) fail "timed out after ${timeout_s}s" ;;
*) fail "qemu exit status $status (expected 1)" ;;
esac

result=$(grep -E '^RESULT ' "$serial" | tail -1 || true)
if [[ $result =~ ^RESULT\ pass=([0-9]+)\ fail=0 ]] && ((BASH_REMATCH[1] > 0)); then
    :
else
    fail "RESULT line: '${result:-missing}'"
fi
if grep -q -E '^TEST [^ ]+ FAIL' "$serial"; then
    fail "failed checks: $(grep -E '^TEST [^ ]+ FAIL' "$serial" | cut -d' ' -f2 | tr '\n' ' ')"
fi
grep -q '^TRELLIS-CONSOLE-OK$' "$console" 2>/dev/null || fail "console file lacks TRELLIS-CONSOLE-OK"
wrote=$(dd if="$disk" bs=512 skip=64 count=1 status=none | head -c 24)
[[ $wrote == TRELLIS-GUEST-WROTE-THIS ]] || fail "sector 64 of the disk lacks the guest's write"
if ((net)) && [[ -n $capture_pid ]]; then
    # The frame went out long before QEMU exited: give the watcher 2 s.
    for _ in $(seq 20); do kill -0 "$capture_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$capture_pid" 2>/dev/null || true
    wait "$capture_pid" 2>/dev/null || true
    capture_pid=""
    grep -q 'payload=TRELLIS-NET-TX' "$capture" || fail "no frame from the guest on $tap ($(cat "$capture"))"
    say "tap: $(cat "$capture")"
fi

if ((${#failures[@]})); then
    say "FAILED (${#failures[@]} problems); logs in $workdir"
    exit 1
fi
say "PASS ($result)"
