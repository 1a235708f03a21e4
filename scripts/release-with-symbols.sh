#!/usr/bin/env bash
# A release `den` without symbols, plus its symbols (and line tables) in a
# separate file for perf, gdb and reading crash addresses (issue 15).
#
# Builds with the `profiling` profile (release code, symbols, line tables),
# then splits: `den.debug` keeps the debug sections and symbols, `den` gets
# everything stripped and a .gnu_debuglink naming den.debug (with its CRC),
# which perf and gdb follow when den.debug sits next to den or under
# /usr/lib/debug. Output: target/dist/den and target/dist/den.debug.
#
# Usage: scripts/release-with-symbols.sh [extra cargo args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target_dir=${CARGO_TARGET_DIR:-target}
out="$target_dir/dist"

cargo build --profile profiling -p den "$@"
mkdir -p "$out"
cp "$target_dir/profiling/den" "$out/den.full"
objcopy --only-keep-debug "$out/den.full" "$out/den.debug"
# --add-gnu-debuglink records the name only, so it must run next to den.debug.
(cd "$out" && objcopy --strip-all --add-gnu-debuglink=den.debug den.full den)
rm "$out/den.full"
ls -l "$out/den" "$out/den.debug"
