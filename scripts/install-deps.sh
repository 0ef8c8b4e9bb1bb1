#!/usr/bin/env bash
# Installs what the test command needs beyond the Rust toolchain, so that a
# fresh machine (and CI) needs nothing installed by hand.
set -euo pipefail

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "error: the nightly toolchain is required for cargo-fuzz (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
