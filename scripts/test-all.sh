#!/usr/bin/env bash
# Runs every check a change must pass: formatting, lints, unit and
# integration tests, and a short replay/run of each fuzz target.
# Usage: scripts/test-all.sh            (FUZZ_SECONDS=N to fuzz longer per target)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

scripts/install-deps.sh

step "formatting"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "unit and integration tests"
cargo test --workspace --locked

step "fuzz targets"
scripts/fuzz.sh --smoke
