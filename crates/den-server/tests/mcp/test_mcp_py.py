"""den's /mcp endpoint driven by the official MCP Python SDK (`mcp` on PyPI)
as a real Streamable HTTP client, the way an agent uses it.

Run by the Rust test `mcp_python_sdk` (tests/api/mcp.rs) with DEN_TEST_URL
and DEN_TEST_TOKEN set to a fresh den server and its admin token.
"""

import json
import os
import time

import anyio
import httpx2
import pytest
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

URL = os.environ["DEN_TEST_URL"].rstrip("/") + "/mcp"
TOKEN = os.environ["DEN_TEST_TOKEN"]
TOOLS = {
    "list_sprites", "create_sprite", "delete_sprite", "exec", "fs_read", "fs_write", "fs_list",
    "checkpoint_create", "checkpoint_list", "checkpoint_restore", "fork_sprite", "service_create",
    "service_logs", "get_url",
}


def client(mode, token=TOKEN):
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx2.Timeout(30, read=120),
    )
    return http, Client(streamable_http_client(URL, http_client=http), mode=mode, read_timeout_seconds=120)


def run(mode, body):
    async def main():
        http, c = client(mode)
        async with http, c:
            await body(c, http)

    anyio.run(main)


async def call(c, tool, **args):
    """A tool's answer as JSON; fails on a tool error."""
    r = await c.call_tool(tool, args)
    text = r.content[0].text
    assert not r.is_error, f"{tool}({args}): {text}"
    return json.loads(text)


async def call_error(c, tool, **args):
    """A tool's error message; fails unless the tool reported an error."""
    r = await c.call_tool(tool, args)
    assert r.is_error, f"{tool}({args}) should have failed: {r.content}"
    return r.content[0].text


async def check_tools(c):
    tools = (await c.list_tools()).tools
    assert {t.name for t in tools} == TOOLS
    for t in tools:
        assert t.description and len(t.description) > 40, t.name
        schema = t.input_schema
        if not isinstance(schema, dict):
            schema = schema.model_dump(by_alias=True, exclude_none=True)
        assert schema["type"] == "object", t.name
        props = schema.get("properties", {})
        for req in schema.get("required", []):
            assert req in props, f"{t.name}: required {req} is not a property"
        for name, prop in props.items():
            assert prop.get("description"), f"{t.name}.{name} has no description"


async def median_ms(f, n=20):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await f()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[n // 2]


def test_latest_revision_full_flow():
    async def body(c, http):
        # The newest revision the SDK speaks, negotiated by its own probe.
        assert c.protocol_version == "2026-07-28"
        await check_tools(c)

        made = await call(c, "create_sprite", name="mcp-py")
        assert made["name"] == "mcp-py"
        listed = await call(c, "list_sprites", prefix="mcp-")
        assert "mcp-py" in [s["name"] for s in listed["sprites"]]

        hi = await call(c, "exec", sprite="mcp-py", command="echo hi")
        assert hi == {
            "exit_code": 0, "stdout": "hi\n", "stderr": "", "timed_out": False,
            "stdout_truncated": False, "stderr_truncated": False,
        }
        failed = await call(c, "exec", sprite="mcp-py", argv=["sh", "-c", "echo oops >&2; exit 3"])
        assert (failed["exit_code"], failed["stderr"], failed["timed_out"]) == (3, "oops\n", False)
        piped = await call(c, "exec", sprite="mcp-py", argv=["cat"], stdin="from stdin")
        assert piped["stdout"] == "from stdin"
        # What MCP adds to a command's round trip, against the REST route.
        api = os.environ["DEN_TEST_URL"].rstrip("/")
        mcp_ms = await median_ms(lambda: call(c, "exec", sprite="mcp-py", argv=["true"]))
        rest_ms = await median_ms(lambda: http.post(f"{api}/v1/sprites/mcp-py/exec", params={"cmd": "true"}))
        print(f"\nexec of `true`, median of 20: MCP tool {mcp_ms:.1f} ms, REST POST /exec {rest_ms:.1f} ms")
        t0 = time.monotonic()
        slow = await call(c, "exec", sprite="mcp-py", command="sleep 30", timeout_seconds=1)
        assert slow["timed_out"] is True, slow
        assert time.monotonic() - t0 < 20
        # `env` adds to the usual environment (HOME, PATH stay), in `cwd`.
        env = await call(c, "exec", sprite="mcp-py", command='echo "$GREETING $HOME"; pwd',
                         env={"GREETING": "hello"}, cwd="/tmp")
        assert env["stdout"] == "hello /home/sprite\n/tmp\n", env

        await call(c, "fs_write", sprite="mcp-py", path="notes/a.txt", content="the good version\n")
        read = await call(c, "fs_read", sprite="mcp-py", path="notes/a.txt")
        assert (read["content"], read["encoding"], read["truncated"]) == ("the good version\n", "text", False)
        entries = await call(c, "fs_list", sprite="mcp-py", path="notes")
        assert "a.txt" in json.dumps(entries)

        ck = (await call(c, "checkpoint_create", sprite="mcp-py", comment="before breaking"))["id"]
        assert ck.startswith("v")
        await call(c, "fs_write", sprite="mcp-py", path="notes/a.txt", content="broken")
        assert (await call(c, "fs_read", sprite="mcp-py", path="notes/a.txt"))["content"] == "broken"
        await call(c, "checkpoint_restore", sprite="mcp-py", checkpoint=ck)
        back = await call(c, "fs_read", sprite="mcp-py", path="notes/a.txt")
        assert back["content"] == "the good version\n"
        cks = await call(c, "checkpoint_list", sprite="mcp-py")
        assert ck in [k["id"] for k in cks["checkpoints"]]

        await call(c, "service_create", sprite="mcp-py", name="ticker", cmd="sh",
                   args=["-c", "echo service-up; sleep 1000"])
        deadline = time.monotonic() + 30
        while "service-up" not in (await call(c, "service_logs", sprite="mcp-py", name="ticker"))["logs"]:
            assert time.monotonic() < deadline, "the service's output never reached its logs"
            await anyio.sleep(0.2)

        url = await call(c, "get_url", sprite="mcp-py", auth="public")
        assert url["url"].startswith("http") and url["auth"] == "public"

        forked = await call(c, "fork_sprite", sprite="mcp-py", name="mcp-py-fork", checkpoint=ck)
        assert forked["name"] == "mcp-py-fork"

        # The API's refusals come back as tool errors with its message.
        missing = await call_error(c, "exec", sprite="nosuch", command="true")
        assert missing == "sprite not found: nosuch"
        assert "command" in await call_error(c, "exec", sprite="mcp-py")
        with pytest.raises(MCPError):
            await c.call_tool("no_such_tool", {})

        for name in ["mcp-py-fork", "mcp-py"]:
            await call(c, "delete_sprite", sprite=name)
        left = await call(c, "list_sprites", prefix="mcp-")
        assert left["sprites"] == []

    run("auto", body)


def test_handshake_revision_with_a_session():
    async def body(c, http):
        # An older client: the initialize handshake and Mcp-Session-Id.
        assert c.protocol_version == "2025-11-25"
        await check_tools(c)
        await call(c, "create_sprite", name="mcp-legacy")
        hi = await call(c, "exec", sprite="mcp-legacy", argv=["echo", "legacy", "hi"])
        assert hi["stdout"] == "legacy hi\n"
        await call(c, "delete_sprite", sprite="mcp-legacy")

    run("legacy", body)
