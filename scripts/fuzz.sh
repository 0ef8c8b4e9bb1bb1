#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/.
#
# Usage: scripts/fuzz.sh [--smoke] [TARGET...]
#   TARGET       targets to run (default: every target `cargo fuzz list` shows)
#   --smoke      replay each target's seeds, then fuzz briefly from a fixed
#                libFuzzer seed (FUZZ_SEED, default 1), so that CI explores
#                the same inputs on every run: for CI
#   FUZZ_SECONDS seconds of fuzzing per target (default: 30 with --smoke,
#                600 without)
#
# Each target fuzzes with fuzz/corpus/TARGET as its working corpus (kept
# between runs, not committed) plus the committed seeds in fuzz/seeds/TARGET.
# Crash inputs land in fuzz/artifacts/TARGET; the script fails if any target
# crashes. Needs the nightly toolchain (installed with rustup).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-0}"
}

smoke=0
targets=()
for arg in "$@"; do
    case "$arg" in
        --smoke) smoke=1 ;;
        -h | --help) usage 0 ;;
        -*) echo "unknown option: $arg" >&2; usage 2 >&2 ;;
        *) targets+=("$arg") ;;
    esac
done
seed_args=()
if [[ $smoke -eq 1 ]]; then
    seconds=${FUZZ_SECONDS:-30}
    seed=${FUZZ_SEED:-1}
    if ! [[ $seed =~ ^[0-9]+$ ]] || [[ $seed -eq 0 ]]; then
        echo "FUZZ_SEED must be a positive number, got '$seed'" >&2
        exit 2
    fi
    seed_args=(-seed="$seed")
else
    seconds=${FUZZ_SECONDS:-600}
fi
if ! [[ $seconds =~ ^[0-9]+$ ]] || [[ $seconds -eq 0 ]]; then
    echo "FUZZ_SECONDS must be a positive number of seconds, got '$seconds'" >&2
    exit 2
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "the nightly toolchain is missing: rustup toolchain install nightly" >&2
    exit 1
fi

if [[ ${#targets[@]} -eq 0 ]]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
if [[ ${#targets[@]} -eq 0 ]]; then
    echo "no fuzz targets found" >&2
    exit 1
fi

summary=()
failed=0
for target in "${targets[@]}"; do
    corpus=fuzz/corpus/$target
    seeds=fuzz/seeds/$target
    artifacts=fuzz/artifacts/$target
    mkdir -p "$corpus" "$artifacts"
    log=$artifacts/last-run.log
    dirs=("$corpus")
    [[ -d $seeds ]] && dirs+=("$seeds")

    # Build first so that a compile error is not mistaken for a crash.
    echo "==> $target: building"
    cargo +nightly fuzz build "$target"

    if [[ $smoke -eq 1 && -d $seeds ]]; then
        echo "==> $target: replaying $seeds"
        if ! cargo +nightly fuzz run "$target" "$seeds" -- -runs=0; then
            summary+=("$target: FAILED replaying the seeds")
            failed=1
            continue
        fi
    fi

    echo "==> $target: fuzzing for ${seconds}s (log: $log)"
    start=$(date +%s)
    status=0
    # The working corpus comes first: libFuzzer adds new inputs to it, never
    # to the seeds.
    cargo +nightly fuzz run "$target" "${dirs[@]}" -- \
        -max_total_time="$seconds" "${seed_args[@]}" -print_final_stats=1 2>&1 |
        tee "$log" || status=$?
    elapsed=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    if [[ $status -eq 0 ]]; then
        summary+=("$target: ok, ${execs:-?} executions in ${elapsed}s")
    else
        summary+=("$target: FAILED (exit $status) after ${execs:-?} executions in ${elapsed}s; see $artifacts")
        failed=1
    fi
done

echo
echo "==> summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
