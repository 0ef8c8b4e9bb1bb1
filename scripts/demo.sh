#!/usr/bin/env bash
# The main job: builds trellis and boots a real Linux guest with a virtio
# disk (plus a read-only one), virtio-net, virtio-rng and virtio-console,
# then shows what the guest saw.
#
# On these machines the host's /dev/kvm cannot boot stock Linux, so the boot
# happens inside the nested sandbox of rig/ (QEMU TCG with nested KVM; see
# rig/README.md): trellis runs in L1 and boots L2, whose /init inspects every
# device from the guest's side. Ingredients come from Debian's packages and
# are cached outside the repository.
#
# Usage: scripts/demo.sh [rig/run.sh options, e.g. --live]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p vmm
log=$(mktemp -t trellis-demo.XXXXXX)
trap 'rm -f "$log"' EXIT
status=0
rig/run.sh --trellis target/release/trellis "$@" >"$log" 2>&1 || status=$?

echo "== trellis in L1: the PCI topology it built =="
grep -o 'trellis::topology\] .*' "$log" | sed 's/^trellis::topology\] /  /' || true
echo
echo "== what the Linux guest (L2) saw =="
grep -E '^CHECK l2\.' "$log" | sed 's/^CHECK l2\./  /' || true
echo
echo "== what L1 and the host saw afterwards =="
grep -E '^CHECK (l1|host)\.' "$log" | sed 's/^CHECK /  /' || true
echo
grep -E '^RIG (SUMMARY|RESULT|FAILED|MISSING)' "$log" || true
if [[ $status != 0 ]]; then
    echo "demo failed (rig exit status $status); the whole log follows" >&2
    cat "$log" >&2
fi
exit "$status"
