#!/usr/bin/env bash
# Creates the test guest's disk image (raw) following the convention in
# README.md: sector 0 starts with "TRELLIS-DISK" (rest zero), sectors 1..7
# are filled with their own sector number, everything else is zero.
# Usage: guest/make-disk.sh PATH [SIZE_MIB]   (default 64 MiB, minimum 2)
set -euo pipefail

path=${1:?usage: make-disk.sh PATH [SIZE_MIB]}
size_mib=${2:-64}
if ((size_mib < 2)); then
    echo "make-disk.sh: the benchmark region needs at least 2 MiB" >&2
    exit 2
fi

rm -f "$path"
truncate -s "${size_mib}M" "$path"
printf 'TRELLIS-DISK' | dd of="$path" conv=notrunc status=none
for s in 1 2 3 4 5 6 7; do
    head -c 512 /dev/zero | tr '\0' "\\$(printf '%03o' "$s")" |
        dd of="$path" bs=512 seek="$s" conv=notrunc status=none
done
