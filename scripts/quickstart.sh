#!/usr/bin/env bash
# Install what den needs, build and install the `den` binary, start
# `den server` with embedded defaults (SQLite + local chunks under
# $DEN_DATA_DIR, default /var/lib/den), then show it working through the
# official Sprites Python SDK: create a sprite, run commands in it,
# checkpoint, break something, restore, fork. The server keeps running.
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
listen=${DEN_LISTEN:-127.0.0.1:8080}
url=http://$listen
log_file=/var/log/den.log
pid_file=/run/den.pid

if [[ -f $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    log "restarting the running den server (pid $(cat "$pid_file")) on the new binary"
    kill -TERM "$(cat "$pid_file")"
    while kill -0 "$(cat "$pid_file")" 2>/dev/null; do sleep 0.2; done
fi

log "starting den server on $url (data in $DEN_DATA_DIR, log in $log_file)"
echo "   the first start builds the Debian base image (about a minute)"
setsid nohup den server --data-dir "$DEN_DATA_DIR" --listen "$listen" >>"$log_file" 2>&1 </dev/null &
echo $! >"$pid_file"
for _ in $(seq 600); do
    curl -fsS "$url/v1/health" >/dev/null 2>&1 && break
    if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        echo "den server exited; the end of $log_file:" >&2
        tail -20 "$log_file" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fsS "$url/v1/health"
echo

log "using it from the official Python SDK (sprites-py), with only the base URL changed"
DEN_URL=$url DEN_TOKEN=$(cat "$DEN_DATA_DIR/admin-token") /opt/den-venv/bin/python - <<'PY'
import os, time
from sprites import SpritesClient

c = SpritesClient(token=os.environ["DEN_TOKEN"], base_url=os.environ["DEN_URL"])
name = f"demo-{int(time.time())}"

def timed(label, f):
    t0 = time.monotonic()
    out = f()
    print(f"   {label}: {(time.monotonic() - t0) * 1000:.0f} ms")
    return out

s = timed(f"create sprite {name}", lambda: c.create_sprite(name))
out = timed("first command (boots it)", lambda: s.command(
    "bash", "-c", "echo \"$(whoami) on $(. /etc/os-release; echo $PRETTY_NAME), home $HOME\"").output())
print("  ", out.decode().strip())
s.command("bash", "-c", "echo 'important work' > ~/notes.txt").run()
ck = timed("checkpoint", lambda: [m for m in s.create_checkpoint("before the risky change")][-1])
print("  ", ck.data)
s.command("bash", "-c", "rm ~/notes.txt && sudo rm -rf /usr/bin/python3*").run()
print("   broke it:", s.run("bash", "-c", "ls ~/notes.txt; python3 -V", capture_output=True).stderr.decode().strip().replace("\n", "; "))
cid = s.list_checkpoints()[0].id
timed(f"restore {cid}", lambda: list(s.restore_checkpoint(cid)))
print("   after restore:", s.command("bash", "-c", "cat ~/notes.txt; python3 -V").output().decode().strip().replace("\n", "; "))
print(f"   sprite URL: {c.get_sprite(name).url}")
PY

log "den is running"
cat <<EOF
   API:          $url   (token in $DEN_DATA_DIR/admin-token)
   log:          $log_file
   stop:         kill \$(cat $pid_file)    (sprites go cold; everything is kept)
   try:          curl -H "Authorization: Bearer \$(cat $DEN_DATA_DIR/admin-token)" $url/v1/sprites
EOF
