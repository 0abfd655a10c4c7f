"""No credential reaches the gateway's log (kernelhub.redaction): keys sent as ``?token=``, in ``Authorization``
headers, right or wrong, on every surface, at the most talkative log level."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from kernelhub.redaction import REDACTED, redact
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root]

WRONG = "wrong-key-" + "q" * 20


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    gateway = Gateway(extra_args=["--log-level=DEBUG"])
    yield gateway
    gateway.stop()


def test_redact_hides_keys_and_header_values() -> None:
    assert redact("GET /v1/sandboxes?token=abc&x=1") == f"GET /v1/sandboxes?token={REDACTED}&x=1"
    assert redact("/api?a=1&TOKEN%3Dabc") == f"/api?a=1&TOKEN%3D{REDACTED}"
    assert redact("{'Authorization': 'Bearer abc', 'Host': 'h'}") == \
        f"{{'Authorization': 'Bearer {REDACTED}', 'Host': 'h'}}"
    assert redact("authorization: token abc") == f"authorization: token {REDACTED}"
    assert redact("monkey=1 tokens ok") == "monkey=1 tokens ok"


def test_no_key_is_logged_on_any_surface(gw: Gateway) -> None:
    for token in (gw.token, WRONG):
        q = urllib.parse.quote(token)
        for path in (f"/v1/sandboxes?token={q}", f"/v1/sandboxes/sbnope?token={q}", f"/api/kernels?token={q}",
                     f"/api/kernels/nope?x=1&token={q}", f"/metrics?token={q}", f"/nowhere?token={q}"):
            gw.request("GET", path, token=None)
        gw.request("GET", "/v1/sandboxes", token=token)
        gw.request("GET", "/api/kernels", headers={"Authorization": f"token {token}"}, token=None)
        gw.request("POST", "/v1/sandboxes", raw=b"{not json", token=token)
        gw.request("POST", "/mcp", raw=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode(),
                   headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
                   token=token)
        url = gw.url.replace("http", "ws") + f"/api/kernels/nope/channels?token={q}"
        with pytest.raises(InvalidStatus):
            connect(url, open_timeout=10).close()
    with open(gw.log_path, errors="replace") as f:
        log = f.read()
    assert "token=" + REDACTED in log  # the access log did see those requests
    assert gw.token not in log and WRONG not in log, log
