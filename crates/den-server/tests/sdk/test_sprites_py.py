"""The official Python SDK (sprites-py) against a real den server.

Run by the Rust test `sdk_python` (tests/api/sdk.rs), which starts the
server and sets DEN_TEST_URL and DEN_TEST_TOKEN. Phase "main" runs every
test; after the server restarted, phase "restart" checks persistence.
Only the base URL differs from using the hosted service.
"""

import concurrent.futures
import io
import json
import os
import time

import httpx
import pytest
from sprites import SpritesClient
from sprites.exceptions import ExitError, NotFoundError, SpriteError
from sprites.types import NetworkPolicy, PolicyRule, URLSettings

URL = os.environ["DEN_TEST_URL"]
TOKEN = os.environ["DEN_TEST_TOKEN"]
PHASE = os.environ.get("DEN_TEST_PHASE", "main")
main_only = pytest.mark.skipif(PHASE != "main", reason="runs in the main phase")
restart_only = pytest.mark.skipif(PHASE != "restart", reason="runs after the server restarted")


@pytest.fixture(scope="module")
def client():
    with SpritesClient(token=TOKEN, base_url=URL) as c:
        yield c


@pytest.fixture(scope="module")
def sprite(client):
    if PHASE == "main":
        return client.create_sprite("py-main")
    return client.get_sprite("py-main")


def wait_for(what, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@main_only
def test_create_get_list_delete(client):
    s = client.create_sprite("py-crud", labels=["sdk"])
    assert s.name == "py-crud"
    got = client.get_sprite("py-crud")
    assert got.name == "py-crud"
    names = [x.name for x in client.list_all_sprites(prefix="py-")]
    assert "py-crud" in names
    client.delete_sprite("py-crud")
    with pytest.raises((NotFoundError, SpriteError)):
        client.get_sprite("py-crud")


@main_only
def test_run_streams_exit_codes_env_cwd(sprite):
    r = sprite.run("sh", "-c", "echo out; echo err >&2; exit 3", capture_output=True)
    assert r.returncode == 3
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert sprite.command("pwd").output() == b"/home/sprite\n"
    assert sprite.command("pwd", cwd="/tmp").output() == b"/tmp\n"
    env = sprite.command("sh", "-c", "echo $FOO", env={"FOO": "bar"}).output()
    assert env == b"bar\n"
    with pytest.raises(ExitError) as e:
        sprite.command("sh", "-c", "exit 7").run()
    assert e.value.exit_code() == 7


@main_only
def test_stdin(sprite):
    data = os.urandom(256 * 1024)
    out = sprite.command("sha256sum", stdin=io.BytesIO(data)).output()
    import hashlib

    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


@main_only
def test_tty_size(sprite):
    r = sprite.run("stty", "size", tty=True, tty_rows=33, tty_cols=101, capture_output=True)
    assert r.returncode == 0
    assert b"33 101" in r.stdout


@main_only
def test_fifty_fast_commands_lose_nothing(sprite):
    for i in range(50):
        assert sprite.command("echo", f"n{i}").output() == f"n{i}\n".encode()


@main_only
def test_ten_concurrent_commands(client):
    s = client.sprite("py-main")

    def one(i):
        return s.command("sh", "-c", f"sleep 0.2; echo c{i}").output()

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        outs = list(pool.map(one, range(10)))
    assert outs == [f"c{i}\n".encode() for i in range(10)]


@main_only
def test_filesystem_round_trip(sprite):
    fs = sprite.filesystem("/home/sprite")
    blob = os.urandom(1 << 20)
    (fs / "dir/sub/blob.bin").parent.mkdir(parents=True, exist_ok=True)
    (fs / "dir/sub/blob.bin").write_bytes(blob)
    assert (fs / "dir/sub/blob.bin").read_bytes() == blob
    (fs / "dir/note.txt").write_text("hello")
    assert sorted(p.name for p in (fs / "dir").iterdir()) == ["note.txt", "sub"]
    assert (fs / "dir/note.txt").stat().size == 5
    (fs / "dir/note.txt").rename(fs / "dir/renamed.txt")
    assert not (fs / "dir/note.txt").exists()
    assert (fs / "dir/renamed.txt").read_text() == "hello"
    (fs / "dir").rmtree()
    assert not (fs / "dir").exists()


@main_only
def test_checkpoint_restore_rewinds(client, sprite):
    sprite.command("sh", "-c", "echo before > /home/sprite/state").run()
    msgs = list(sprite.create_checkpoint("sdk"))
    done = [m for m in msgs if m.type == "complete"]
    assert done, msgs
    cps = sprite.list_checkpoints()
    assert cps and cps[0].comment == "sdk"
    ck = cps[0].id
    sprite.command("sh", "-c", "echo after > /home/sprite/state").run()
    list(sprite.restore_checkpoint(ck))
    assert sprite.command("cat", "/home/sprite/state").output() == b"before\n"


@main_only
def test_fork_den_extension(client, sprite):
    sprite.command("sh", "-c", "echo parent > /home/sprite/forked").run()
    r = httpx.post(
        f"{URL}/v1/sprites/py-main/fork",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"name": "py-fork"},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    child = client.sprite("py-fork")
    assert child.command("cat", "/home/sprite/forked").output() == b"parent\n"
    child.command("sh", "-c", "echo child > /home/sprite/forked").run()
    assert sprite.command("cat", "/home/sprite/forked").output() == b"parent\n"


def url_get(name, token=None):
    port = URL.rsplit(":", 1)[1]
    headers = {"Host": f"{name}.localhost:{port}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(f"http://127.0.0.1:{port}/", headers=headers, timeout=30)


@main_only
def test_service_serves_the_url_and_auth_modes(client):
    s = client.create_sprite("py-web")
    s.command("sh", "-c", "mkdir -p /home/sprite/www && echo served-by-den > /home/sprite/www/index.html").run()
    events = list(
        s.create_service(
            "web", "busybox", ["httpd", "-f", "-p", "8080", "-h", "/home/sprite/www"], http_port=8080, duration=1.0
        )
    )
    assert any(e.type == "started" for e in events), events
    wait_for("service running", lambda: s.get_service("web").state.status == "running")
    r = wait_for("URL answers", lambda: (lambda r: r if r.status_code == 200 else None)(url_get("py-web", TOKEN)))
    assert b"served-by-den" in r.content
    # auth "sprite" (default): no token, no page.
    r = url_get("py-web")
    assert r.status_code == 401
    assert r.json() == {"error": "unauthorized"}
    s.update_url_settings(URLSettings(auth="public"))
    r = url_get("py-web")
    assert r.status_code == 200 and b"served-by-den" in r.content


@main_only
def test_network_policy(sprite):
    pol = sprite.get_network_policy()
    assert pol.rules == []
    sprite.update_network_policy(
        NetworkPolicy(rules=[PolicyRule(domain="example.com", action="allow"), PolicyRule(domain="*", action="deny")])
    )
    got = sprite.get_network_policy()
    assert [r.domain for r in got.rules] == ["example.com", "*"]
    r = httpx.post(
        f"{URL}/v1/sprites/py-main/policy/network",
        headers={"Authorization": f"Bearer {TOKEN}"},
        content=b'{"rules":[{"domain":"x.com","action":"perhaps"}]}',
    )
    assert r.status_code == 400 and r.text == "invalid policy config"
    sprite.update_network_policy(NetworkPolicy(rules=[]))


@main_only
def test_sessions_list_and_attach_replay(sprite):
    r = httpx.get(f"{URL}/v1/sprites/py-main/exec", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    before = {s["id"] for s in r.json()["sessions"]}
    # A TTY session keeps running after its client goes away. The SDK's
    # synchronous run() blocks until exit, so start it with a raw WebSocket.
    import websockets.sync.client as wsc

    ws = wsc.connect(
        f"{URL.replace('http', 'ws', 1)}/v1/sprites/py-main/exec?cmd=sh&cmd=-c&cmd=echo+replay-me%3B+sleep+30&tty=true",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
    )
    info = json.loads(ws.recv(timeout=30))
    assert info["type"] == "session_info" and isinstance(info["session_id"], str)
    wait_for("output", lambda: b"replay-me" in ws.recv(timeout=30))
    ws.close()
    sessions = wait_for("session listed", lambda: [s for s in sprite.list_sessions() if str(s.id) == info["session_id"]])
    assert sessions
    att = wsc.connect(
        f"{URL.replace('http', 'ws', 1)}/v1/sprites/py-main/exec/{info['session_id']}",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
    )
    first = json.loads(att.recv(timeout=30))
    assert first["type"] == "session_info" and first["session_id"] == info["session_id"]
    wait_for("replay", lambda: b"replay-me" in att.recv(timeout=30))
    att.close()
    assert info["session_id"] not in before


def test_bad_token_is_401():
    from sprites.exceptions import AuthenticationError

    with SpritesClient(token="den_not_a_token", base_url=URL) as bad:
        with pytest.raises(AuthenticationError):
            bad.list_sprites()
    r = httpx.get(f"{URL}/v1/sprites", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


@main_only
def test_prepare_restart(sprite):
    sprite.command("sh", "-c", "echo durable > /home/sprite/persist").run()


@restart_only
def test_everything_survives_restart(client):
    s = client.get_sprite("py-main")
    assert s.command("cat", "/home/sprite/persist").output() == b"durable\n"
    assert [c.comment for c in s.list_checkpoints()][:1] == ["sdk"]
    web = client.get_sprite("py-web")
    assert web.get_service("web").http_port == 8080
    r = wait_for("URL after restart", lambda: (lambda r: r if r.status_code == 200 else None)(url_get("py-web")))
    assert b"served-by-den" in r.content
