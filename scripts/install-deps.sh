#!/usr/bin/env bash
# Installs what the tests need beyond the Rust toolchain, so that a fresh
# machine (and CI) needs nothing installed by hand. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "error: the nightly toolchain is required for cargo-fuzz (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
# QEMU (the nested sandbox's L1 emulator) and the Debian kernel, busybox
# and modules for the guests, cached outside the repository.
rig/fetch.sh >/dev/null
