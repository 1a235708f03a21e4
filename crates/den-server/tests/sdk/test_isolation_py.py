"""Cross-organisation isolation through the official Python SDK (sprites-py).

Run by the Rust test `sdk_isolation` (tests/api/sdk_isolation.rs), which
starts the server, makes organisations `orga` and `orgb`, gives `orgb` a
sprite `secret` (a file, a running service on its URL, a checkpoint) and
`other`, gives the default organisation a sprite `dflt`, gives `orga` its own
sprite `mine`, and checks afterwards that nothing of `orgb` or `den` changed.

Every refusal is compared with what a sprite that does not exist answers:
the same error, the same status, the same message but for the name.
"""

import os
import re

import httpx
import pytest
import websockets.sync.client as wsc
from sprites import SpritesClient
from sprites.exceptions import APIError, NotFoundError, SpriteError
from sprites.types import NetworkPolicy, PolicyRule, URLSettings
from websockets.exceptions import InvalidStatus

URL = os.environ["DEN_TEST_URL"]
TOKEN_A = os.environ["DEN_TOKEN_A"]
TOKEN_RESTRICTED = os.environ["DEN_TOKEN_RESTRICTED"]
TOKEN_VIEWER = os.environ["DEN_TOKEN_VIEWER"]
# name=url-label of each sprite outside org A's reach.
VICTIMS = dict(p.split("=") for p in os.environ["DEN_VICTIMS"].split(","))
MISSING = "nosuch"
PORT = URL.rsplit(":", 1)[1]


@pytest.fixture(scope="module")
def a():
    with SpritesClient(token=TOKEN_A, base_url=URL) as c:
        yield c


def status_of(e):
    code = getattr(e, "status_code", None)
    if code is not None:
        return code
    if isinstance(e, NotFoundError):
        return 404
    m = re.search(r"status[ =:]*(\d{3})", str(e))
    return int(m.group(1)) if m else None


def looks_not_found(e):
    if status_of(e) is not None:
        return status_of(e) == 404
    return "not found" in str(e).lower()


def fails_like_missing(op, victims=VICTIMS, missing=MISSING):
    """op(name) fails for each victim exactly as for a sprite that does not exist."""
    for victim in victims:
        got = {}
        for name in (victim, missing):
            try:
                r = op(name)
                if hasattr(r, "__next__"):
                    list(r)
            except Exception as e:  # noqa: BLE001 - any failure, compared below
                got[name] = e
            else:
                raise AssertionError(f"{op} on {name!r} succeeded")
        v, m = got[victim], got[missing]
        assert type(v) is type(m), f"{victim}: {v!r}; missing: {m!r}"
        assert str(v).replace(victim, "<NAME>") == str(m).replace(missing, "<NAME>"), f"{v!r} vs {m!r}"
        assert looks_not_found(v), f"{victim}: not a not-found: {v!r}"


def raw_like_missing(method, path, token=TOKEN_A, victims=VICTIMS, missing=MISSING, **kw):
    """`method path` (with {name}) answers 404 for each victim with the body a missing sprite gets."""
    for victim in victims:
        rv, rm = (
            httpx.request(
                method,
                f"{URL}{path.format(name=n)}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30,
                **kw,
            )
            for n in (victim, missing)
        )
        assert rv.status_code == 404, f"{method} {path} {victim}: {rv.status_code} {rv.text}"
        assert rm.status_code == 404, rm.text
        assert rv.json() == {"error": "not_found", "message": f"sprite not found: {victim}"}, rv.text
        assert rv.text.replace(victim, "<NAME>") == rm.text.replace(missing, "<NAME>")


def url_get(label, token):
    return httpx.get(
        f"http://127.0.0.1:{PORT}/",
        headers={"Host": f"{label}.localhost:{PORT}", "Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_own_sprite_works(a):
    # The control: org A's token does work, on org A's sprite.
    assert a.sprite("mine").command("echo", "mine").output() == b"mine\n"
    assert a.get_sprite("mine").name == "mine"


def test_list_shows_only_own_org(a):
    assert [s.name for s in a.list_all_sprites()] == ["mine"]
    for victim in VICTIMS:
        assert a.list_all_sprites(prefix=victim[:3]) == []
    page = a.list_sprites()
    assert [s.name for s in page.sprites] == ["mine"]


def test_get(a):
    fails_like_missing(a.get_sprite)
    with pytest.raises(NotFoundError):
        a.get_sprite(next(iter(VICTIMS)))


def test_exec(a):
    fails_like_missing(lambda n: a.sprite(n).command("cat", "/home/sprite/note.txt").output())
    fails_like_missing(lambda n: a.sprite(n).run("sh", "-c", "rm -f /home/sprite/note.txt", capture_output=True))
    fails_like_missing(lambda n: a.sprite(n).list_sessions())
    raw_like_missing("POST", "/v1/sprites/{name}/exec?cmd=cat&cmd=/home/sprite/note.txt")
    raw_like_missing("GET", "/v1/sprites/{name}/exec")


def test_fs(a):
    def fs(n):
        return a.sprite(n).filesystem("/home/sprite")

    fails_like_missing(lambda n: (fs(n) / "note.txt").read_bytes())
    fails_like_missing(lambda n: (fs(n) / "note.txt").write_bytes(b"pwned"))
    fails_like_missing(lambda n: list((fs(n) / ".").iterdir()))
    fails_like_missing(lambda n: (fs(n) / "note.txt").unlink())
    raw_like_missing("GET", "/v1/sprites/{name}/fs/read?path=/home/sprite/note.txt")
    raw_like_missing("PUT", "/v1/sprites/{name}/fs/write?path=/home/sprite/note.txt", content=b"pwned")
    raw_like_missing("GET", "/v1/sprites/{name}/fs/list?path=/home/sprite")


def ws_refusal(path, token):
    with pytest.raises(InvalidStatus) as e:
        wsc.connect(
            f"{URL.replace('http', 'ws', 1)}{path}",
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=30,
        )
    r = e.value.response
    return r.status_code, r.body.decode()


def test_proxy_and_exec_websockets():
    # This SDK has no port forwarding of its own: the proxy WebSocket as
    # every SDK opens it.
    for path in ("/v1/sprites/{name}/proxy", "/v1/sprites/{name}/exec?cmd=id", "/v1/sprites/{name}/control"):
        for victim in VICTIMS:
            sv, bv = ws_refusal(path.format(name=victim), TOKEN_A)
            sm, bm = ws_refusal(path.format(name=MISSING), TOKEN_A)
            assert sv == 404, (path, victim, sv, bv)
            assert (sv, bv.replace(victim, "<NAME>")) == (sm, bm.replace(MISSING, "<NAME>"))


def test_services(a):
    fails_like_missing(lambda n: a.sprite(n).list_services())
    fails_like_missing(lambda n: a.sprite(n).get_service("web"))
    fails_like_missing(lambda n: a.sprite(n).delete_service("web"))
    fails_like_missing(lambda n: a.sprite(n).stop_service("web"))
    fails_like_missing(lambda n: a.sprite(n).create_service("evil", "sh", ["-c", "rm -rf /home/sprite"]))
    raw_like_missing("GET", "/v1/sprites/{name}/services/web/logs")


def test_checkpoints(a):
    fails_like_missing(lambda n: a.sprite(n).list_checkpoints())
    fails_like_missing(lambda n: a.sprite(n).get_checkpoint("v1"))
    fails_like_missing(lambda n: a.sprite(n).create_checkpoint("evil"))
    fails_like_missing(lambda n: a.sprite(n).restore_checkpoint("v1"))
    raw_like_missing("POST", "/v1/sprites/{name}/checkpoints/v1/restore")


def test_settings_policy_delete(a):
    fails_like_missing(lambda n: a.sprite(n).update_url_settings(URLSettings(auth="public")))
    fails_like_missing(lambda n: a.sprite(n).get_network_policy())
    fails_like_missing(
        lambda n: a.sprite(n).update_network_policy(NetworkPolicy(rules=[PolicyRule(domain="*", action="deny")]))
    )
    fails_like_missing(a.delete_sprite)
    raw_like_missing("POST", "/v1/sprites/{name}/fork", json={"name": "stolen"})


def test_url_with_org_a_token():
    for victim, label in VICTIMS.items():
        rv = url_get(label, TOKEN_A)
        rm = url_get(label.replace(victim, MISSING, 1), TOKEN_A)
        assert rv.status_code == 404, (label, rv.status_code, rv.text)
        assert rv.text.replace(victim, "<NAME>") == rm.text.replace(MISSING, "<NAME>")


def test_org_header_gains_nothing():
    r = httpx.get(f"{URL}/v1/sprites/secret", headers={"Authorization": f"Bearer {TOKEN_A}", "den-org": "orgb"})
    assert r.status_code == 404, r.text
    r2 = httpx.get(f"{URL}/v1/sprites/secret", headers={"Authorization": f"Bearer {TOKEN_A}", "den-org": "nosuchorg"})
    assert (r2.status_code, r2.json()["error"]) == (404, r.json()["error"])


def test_restricted_token_sees_only_its_sprite():
    with SpritesClient(token=TOKEN_RESTRICTED, base_url=URL) as r:
        assert [s.name for s in r.list_all_sprites()] == ["secret"]
        assert r.get_sprite("secret").name == "secret"
        assert r.sprite("secret").command("cat", "/home/sprite/note.txt").output() == b"after\n"
        fails_like_missing(r.get_sprite, victims=["other"])
        fails_like_missing(lambda n: r.sprite(n).command("id").output(), victims=["other"])
        fails_like_missing(lambda n: r.sprite(n).list_checkpoints(), victims=["other"])
        with pytest.raises(SpriteError) as e:
            r.create_sprite("newone")
        assert status_of(e.value) == 403, e.value


def test_viewer_reads_but_cannot_exec():
    with SpritesClient(token=TOKEN_VIEWER, base_url=URL) as v:
        assert sorted(s.name for s in v.list_all_sprites()) == ["other", "secret"]
        assert v.get_sprite("secret").name == "secret"
        assert [c.id for c in v.sprite("secret").list_checkpoints()][:1] == ["v1"]
        with pytest.raises(APIError) as e:
            v.sprite("secret").command("cat", "/home/sprite/note.txt").output()
        assert status_of(e.value) == 403, e.value
        with pytest.raises(Exception) as e:
            (v.sprite("secret").filesystem("/home/sprite") / "note.txt").write_bytes(b"pwned")
        r = httpx.put(
            f"{URL}/v1/sprites/secret/fs/write?path=/home/sprite/note.txt",
            headers={"Authorization": f"Bearer {TOKEN_VIEWER}"},
            content=b"pwned",
        )
        assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
        status, _ = ws_refusal("/v1/sprites/secret/proxy", TOKEN_VIEWER)
        assert status == 403
