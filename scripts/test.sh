#!/usr/bin/env bash
# The whole test suite. Needs root (FUSE, loop devices, mounts); installs the
# tools first (scripts/install-deps.sh, a no-op taking about a second once
# everything is there). Tests start their own PostgreSQL, S3 and servers.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh must run as root (FUSE, loop devices, mounts)" >&2
    exit 1
fi
bash scripts/install-deps.sh
export PATH="/usr/local/bin:/opt/den-venv/bin:$PATH"
export RUST_BACKTRACE=1
cargo test --workspace --all-targets "$@"
