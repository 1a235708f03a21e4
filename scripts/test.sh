#!/usr/bin/env bash
# The whole test suite. Needs root (FUSE, loop devices, mounts) and the tools
# from scripts/install-deps.sh; tests start their own S3 server on 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh must run as root (FUSE, loop devices, mounts)" >&2
    exit 1
fi
export PATH="/usr/local/bin:/opt/den-venv/bin:$PATH"
export RUST_BACKTRACE=1
cargo test --workspace --all-targets "$@"
