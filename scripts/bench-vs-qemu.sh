#!/usr/bin/env bash
# Runs the test guest's benchmarks (guest/README.md, "Benchmarks") under
# trellis and under QEMU with the same devices (virtio-blk on the same raw
# image, modern-only virtio-pci with MSI-X, and virtio-rng), interleaving the
# rounds so host load hits both alike, and prints the medians side by side.
#
# Usage: scripts/bench-vs-qemu.sh [--rounds N] [--ops N] [--ms N] [--timeout SECS] [--all]
#   --rounds N    runs per VMM (default 3)
#   --ops N       guest bench_ops (requests per benchmark, default: the guest's 20000)
#   --ms N        guest bench_ms (time cap per benchmark, default: the guest's 2000)
#   --timeout S   bound on one VM run (default 300)
#   --all         every BENCH metric, not only iops, ns and the loop figure
# Environment: TRELLIS (binary; default: built here, release), QEMU
#   (default qemu-system-x86_64, installed with apt-get if missing), WORKDIR
#   (logs and disk image; default a fresh directory under /tmp, kept).
# Exit status: 0 when every run passed its checks, 1 otherwise.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
rounds=3 timeout_s=300 all=0 extra=""
while (($#)); do
    case $1 in
    --rounds) rounds=$2; shift ;;
    --ops) extra+=" bench_ops=$2"; shift ;;
    --ms) extra+=" bench_ms=$2"; shift ;;
    --timeout) timeout_s=$2; shift ;;
    --all) all=1 ;;
    *) echo "bench-vs-qemu.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

say() { printf 'bench: %s\n' "$*" >&2; }

say "building the guest"
# The guest's one expected warning (sse2 and the float ABI, see its README)
# is noise here.
(cd "$root/guest" && cargo build --release --locked --quiet 2>&1 |
    grep -v -e "target feature .sse2." -e "^ *|" -e "phased out" -e "issue #116344" \
        -e "^ *= note" -e '^$' -e "generated 1 warning" >&2 || true)
kernel=$root/guest/target/x86_64-unknown-linux-gnu/release/trellis-test-guest
[[ -f $kernel ]] || { say "no guest binary at $kernel"; exit 1; }

if [[ -n ${TRELLIS:-} ]]; then
    trellis=$TRELLIS
else
    say "building trellis (release)"
    (cd "$root" && cargo build -p vmm --bin trellis --release --locked --quiet)
    target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    trellis=$target_dir/release/trellis
fi
[[ -x $trellis ]] || { say "no trellis binary at $trellis"; exit 1; }

qemu=${QEMU:-qemu-system-x86_64}
if ! command -v "$qemu" >/dev/null; then
    say "installing qemu-system-x86"
    apt-get install -y qemu-system-x86 >&2
fi

workdir=${WORKDIR:-$(mktemp -d /tmp/bench-vs-qemu.XXXXXX)}
mkdir -p "$workdir"
disk=$workdir/disk.img
"$root/guest/make-disk.sh" "$disk" 64
append="mode=bench expect=blk,rng$extra"

# One run: the VM's serial log goes to $workdir/<vmm>-<round>.log, its
# BENCH lines ("name value unit") are appended to $workdir/<vmm>.bench.
run_trellis() {
    timeout "$timeout_s" "$trellis" --kernel "$kernel" --cmdline "$append" \
        --memory size=256M --disk path="$disk" --rng --serial tty </dev/null
}
# As guest/run-qemu.sh: -pni because this host's KVM lacks SSE3, +invtsc so
# the guest gets the TSC frequency from CPUID; the guest's devices only.
run_qemu() {
    timeout "$timeout_s" "$qemu" -accel kvm -cpu qemu64,-pni,+invtsc -M q35 -m 256 -smp 1 \
        -nographic -vga none -nic none -no-reboot \
        -kernel "$kernel" -append "$append" \
        -device isa-debug-exit,iobase=0xf4,iosize=4 \
        -device virtio-blk-pci,drive=d0,disable-legacy=on,serial=TRELLIS-BLK \
        -drive id=d0,file="$disk",format=raw,if=none \
        -device virtio-rng-pci,disable-legacy=on </dev/null
}

failed=0
declare -A passed=([trellis]=0 [qemu]=0)
one_run() {
    local vmm=$1 round=$2 pass_status log status
    log=$workdir/$vmm-$round.log
    # The guest writes 0 for pass: trellis exits 0, QEMU (0 << 1) | 1.
    [[ $vmm == trellis ]] && pass_status=0 || pass_status=1
    say "round $round: $vmm"
    set +e
    "run_$vmm" 2>&1 | tr -d '\r' >"$log"
    status=${PIPESTATUS[0]}
    set -e
    if [[ $status != "$pass_status" ]] || ! grep -q '^RESULT pass=[0-9]* fail=0' "$log"; then
        say "round $round: $vmm FAILED (exit status $status, $(grep '^RESULT' "$log" || echo 'no RESULT line')); log: $log"
        failed=1
        return
    fi
    awk '$1 == "BENCH" { print $2, $3, $4 }' "$log" >>"$workdir/$vmm.bench"
    passed[$vmm]=$((passed[$vmm] + 1))
}

rm -f "$workdir"/*.bench
for ((r = 1; r <= rounds; r++)); do
    # Alternate who goes first so a load trend does not favour one VMM.
    if ((r % 2)); then
        one_run trellis "$r"; one_run qemu "$r"
    else
        one_run qemu "$r"; one_run trellis "$r"
    fi
done
[[ -s $workdir/trellis.bench && -s $workdir/qemu.bench ]] || {
    say "no benchmark results from one of the VMMs; logs in $workdir"
    exit 1
}

# Medians per metric, then the table. Ratio = trellis / QEMU; for iops higher
# is better, for ns and cycles lower is better.
awk -v all="$all" '
    function median(list,   n, v, i, j, t) {
        n = split(list, v, " ")
        for (i = 2; i <= n; i++)
            for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
    }
    {
        vmm = FILENAME ~ /trellis\.bench$/ ? "t" : "q"
        if (!($1 in unit)) { order[++count] = $1; unit[$1] = $3 }
        vals[vmm, $1] = vals[vmm, $1] " " $2
    }
    END {
        printf "%-28s %14s %14s %10s  %s\n", "metric", "trellis", "QEMU", "ratio", "better"
        for (i = 1; i <= count; i++) {
            m = order[i]; u = unit[m]
            if (!all && u != "iops" && u != "ns" && u != "cycles/iter") continue
            if (!((("t", m) in vals) && (("q", m) in vals))) continue
            t = median(vals["t", m]); q = median(vals["q", m])
            better = u == "iops" ? "higher" : (u == "ops" ? "-" : "lower")
            ratio = q > 0 ? sprintf("%.2f", t / q) : "-"
            printf "%-28s %14.0f %14.0f %10s  %s (%s)\n", m, t, q, ratio, better, u
        }
    }' "$workdir/trellis.bench" "$workdir/qemu.bench"
printf '\nmedians of %d trellis and %d QEMU runs (of %d each); ratio = trellis / QEMU\n' \
    "${passed[trellis]}" "${passed[qemu]}" "$rounds"
say "logs in $workdir"
exit "$failed"
