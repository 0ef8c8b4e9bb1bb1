#!/usr/bin/env bash
# Runs every check a change must pass: formatting, lints, unit and
# integration tests (including Rig 2: the in-repo test guest on this host's
# /dev/kvm), Rig 1 (real Linux guests under trellis in the nested sandbox)
# and a short run of each fuzz target. Installs what it needs first.
#
# Usage: scripts/test-all.sh     (FUZZ_SECONDS=N: fuzz longer per target)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "installing what the tests need"
scripts/install-deps.sh

step "formatting"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
(cd fuzz && cargo +nightly fmt -- --check)

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
(cd guest && cargo clippy --release --locked -- -D warnings)
(cd fuzz && cargo +nightly clippy --all-targets --locked -- -D warnings)

step "build (the integration tests run the trellis binary and the test guest)"
cargo build --workspace --locked
(cd guest && cargo build --release --locked)

step "unit and integration tests"
cargo test --workspace --locked

step "Rig 1: Linux guests in the nested sandbox (virtio and VFIO passthrough)"
cargo build --release --locked -p vmm
rig/run.sh --trellis target/release/trellis --vfio

step "fuzz harness unit tests (seed replays and bug reproducers)"
(cd fuzz && cargo +nightly test --locked)

step "fuzz targets"
scripts/fuzz.sh --smoke
