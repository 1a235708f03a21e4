"""The official Python SDK (sprites-py) against den over HTTPS.

Run by the Rust test `tls_sdks_over_https` (tests/api/tls.rs), which starts
den with a certificate from a test CA and sets DEN_TEST_URL (https://…),
DEN_TEST_TOKEN and SSL_CERT_FILE (that CA, the usual way to trust a private
CA; both httpx and the WebSocket client honour it). Nothing else differs from
using the hosted service.
"""

import io
import os

import pytest
from sprites import SpritesClient
from sprites.exceptions import NotFoundError, SpriteError

URL = os.environ["DEN_TEST_URL"]
TOKEN = os.environ["DEN_TEST_TOKEN"]


def test_create_exec_delete_over_https():
    assert URL.startswith("https://")
    with SpritesClient(token=TOKEN, base_url=URL) as client:
        s = client.create_sprite("py-tls")
        assert s.name == "py-tls"
        got = client.get_sprite("py-tls")
        assert got.url.startswith("https://py-tls."), got.url
        # Exec runs over a wss:// WebSocket.
        r = s.run("sh", "-c", "echo out; echo err >&2; exit 3", capture_output=True)
        assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        data = os.urandom(64 * 1024)
        out = s.command("wc", "-c", stdin=io.BytesIO(data)).output()
        assert out.split()[0] == str(len(data)).encode()
        client.delete_sprite("py-tls")
        with pytest.raises((NotFoundError, SpriteError)):
            client.get_sprite("py-tls")
