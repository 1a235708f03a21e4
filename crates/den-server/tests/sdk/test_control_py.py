"""The official Python SDK (sprites-py) with control_mode=True against a real
den server: its commands run over the multiplexed control channel.

Run by the Rust test `control_python_sdk` (tests/api/control.rs), which
sets DEN_TEST_URL and DEN_TEST_TOKEN and afterwards checks in the audit log
that no command fell back to the direct exec WebSocket (the SDK does so
when the channel is refused).
"""

import concurrent.futures
import hashlib
import io
import os

import pytest
from sprites import SpritesClient
from sprites.exceptions import ExitError

URL = os.environ["DEN_TEST_URL"]
TOKEN = os.environ["DEN_TEST_TOKEN"]
NAME = "py-ctl"


@pytest.fixture(scope="module")
def client():
    with SpritesClient(token=TOKEN, base_url=URL, control_mode=True) as c:
        c.create_sprite(NAME)
        yield c
        c.delete_sprite(NAME)


@pytest.fixture(scope="module")
def sprite(client):
    return client.sprite(NAME)


def test_streams_exit_codes_env_cwd(sprite):
    r = sprite.run("sh", "-c", "echo out; echo err >&2; exit 3", capture_output=True)
    assert r.returncode == 3
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert sprite.command("pwd").output() == b"/home/sprite\n"
    assert sprite.command("pwd", cwd="/tmp").output() == b"/tmp\n"
    assert sprite.command("sh", "-c", "echo $FOO", env={"FOO": "bar"}).output() == b"bar\n"
    with pytest.raises(ExitError) as e:
        sprite.command("sh", "-c", "exit 7").run()
    assert e.value.exit_code() == 7


def test_stdin(sprite):
    data = os.urandom(256 * 1024)
    out = sprite.command("sha256sum", stdin=io.BytesIO(data)).output()
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_tty_size(sprite):
    r = sprite.run("stty", "size", tty=True, tty_rows=33, tty_cols=101, capture_output=True)
    assert r.returncode == 0
    assert b"33 101" in r.stdout


def test_fast_commands_lose_nothing(sprite):
    for i in range(30):
        assert sprite.command("echo", f"n{i}").output() == f"n{i}\n".encode()


def test_concurrent_commands(client):
    s = client.sprite(NAME)

    def one(i):
        return s.command("sh", "-c", f"sleep 0.2; echo c{i}").output()

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        outs = list(pool.map(one, range(8)))
    assert outs == [f"c{i}\n".encode() for i in range(8)]
