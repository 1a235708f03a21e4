#!/usr/bin/env bash
# Install what den needs, build and install the `den` binary, then show the
# store at work: a 100 GiB volume with ext4 on it, a checkpoint, a fork and a
# restore, each timed. Leaves the data in $DEN_DATA_DIR (default /var/lib/den).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

log "installing dependencies"
bash scripts/install-deps.sh

log "building den (release)"
cargo build --release -p den
install -m 0755 "${CARGO_TARGET_DIR:-target}/release/den" /usr/local/bin/den
den --version

export DEN_DATA_DIR=${DEN_DATA_DIR:-/var/lib/den}
vol=demo-$(date +%s)
mnt=$(mktemp -d /tmp/den-demo.XXXXXX)
daemon_out=$(mktemp)

cleanup() {
    if [[ -n ${daemon:-} ]] && kill -0 "$daemon" 2>/dev/null; then
        kill -TERM "$daemon"
        wait "$daemon" || true
    fi
    rmdir "$mnt" 2>/dev/null || true
    rm -f "$daemon_out"
}
trap cleanup EXIT

log "creating a 100 GiB sparse volume '$vol' in $DEN_DATA_DIR"
den volume create "$vol"

log "mounting it with ext4 at $mnt"
den volume mount "$vol" "$mnt" --format >"$daemon_out" &
daemon=$!
for _ in $(seq 300); do
    grep -q '"ready":true' "$daemon_out" && break
    kill -0 "$daemon" || { echo "mount failed"; exit 1; }
    sleep 0.1
done
cat "$daemon_out"
df -h "$mnt"

log "writing a file, then checkpointing"
echo "hello from before the checkpoint" >"$mnt/hello.txt"
sync -f "$mnt"
den volume checkpoint "$vol" --comment "before the risky change"

log "the risky change"
echo "oops" >"$mnt/hello.txt"
cat "$mnt/hello.txt"

log "forking the checkpoint into '$vol-fork' (instant: metadata only)"
den volume fork "$vol@v1" "$vol-fork"

log "unmounting and restoring v1"
kill -TERM "$daemon"
wait "$daemon" || true
daemon=
den volume restore "$vol" v1
den volume mount "$vol" "$mnt" >"$daemon_out" &
daemon=$!
for _ in $(seq 300); do
    grep -q '"ready":true' "$daemon_out" && break
    kill -0 "$daemon" || { echo "mount failed"; exit 1; }
    sleep 0.1
done
echo "after restore: $(cat "$mnt/hello.txt")"

log "volumes and checkpoints"
den volume ls
den volume checkpoints "$vol"
den volume info "$vol"
log "done; try: den volume --help"
