"""The per-tenant sandbox cap and the per-sandbox session cap through the gateway, under concurrent clients
(issue 7, item 9: with the default cap of 20, 20 creates from 6 client threads gave 17 sandboxes and 3 429s).

Creates come in waves from many threads: exactly the cap succeed and every other one is a 429 with a
sentence; after deleting some, exactly that many more succeed. At the cap the Jupyter API and MCP are refused
too (one cap, whatever the surface), and another tenant is not. A gateway of its own, with the default cap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

#: Hub.max_sandboxes_per_tenant's default and the sessions a sandbox may hold (hub.MAX_SESSIONS).
CAP = 20
SESSIONS = 16


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    gateway = Gateway()
    try:
        yield gateway
    finally:
        gateway.stop()


def in_threads(call: Callable[[], tuple[int, Any]], count: int, threads: int, room: int) -> list[Any]:
    """``count`` calls from ``threads`` client threads at once, sent while ``room`` places were free: exactly
    ``min(count, room)`` are admitted and every other one is a 429 with a sentence. Answers the 201 bodies (an
    admitted create whose kernel did not start on a loaded machine, a 5xx ``sandbox_error``, is not the cap's
    doing and counts as admitted)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        answers = list(pool.map(lambda _: call(), range(count)))
    refused = [body for status, body in answers if status == 429]
    made = [body for status, body in answers if status == 201]
    failed = [body for status, body in answers if status >= 500 and body.get("error") == "sandbox_error"]
    expected = min(count, room)
    assert (len(made) + len(failed), len(refused)) == (expected, count - expected), answers
    for body in refused:
        assert body["error"] == "quota_exceeded" and body["message"].endswith("."), body
    return made


def live(gw: Gateway) -> list[Any]:
    return [s for s in gw.request("GET", "/v1/sandboxes")[1]["sandboxes"] if s["state"] in ("starting", "running")]


def test_sandbox_cap_in_waves(gw: Gateway, assert_error_body: Any) -> None:
    def create() -> tuple[int, Any]:
        return gw.request("POST", "/v1/sandboxes", {"template": "python"}, timeout=300)

    made = in_threads(create, CAP + 6, threads=6, room=CAP)
    try:
        assert sorted(s["id"] for s in live(gw)) == sorted(s["id"] for s in made)
        while len(live(gw)) < CAP:  # only if a kernel did not start above: fill the places it left
            status, body = create()
            made += [body] if status == 201 else []
        status, body = create()
        assert status == 429 and f"{CAP} live or starting sandboxes" in body["message"], body

        # At the cap, every surface that makes a sandbox is refused the same way...
        status, body = gw.request("POST", "/api/kernels", {"name": "kernelhub-python"})
        assert status == 429, body
        assert_error_body(body)
        status, answer = gw.request("POST", "/mcp", {
            "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "sandbox_create", "arguments": {}}},
            headers={"Accept": "application/json, text/event-stream"})
        assert status == 200
        result = [json.loads(line[5:]) for line in answer.decode().splitlines() if line.startswith("data:")][0]
        assert result["result"]["isError"] and result["result"]["structuredContent"]["error"] == "quota_exceeded"
        # ...and another tenant has a cap of its own.
        status, other = gw.request("POST", "/v1/sandboxes", {"template": "python"}, token=gw.other_token)
        assert status == 201, other
        assert gw.request("DELETE", f"/v1/sandboxes/{other['id']}", token=gw.other_token)[0] == 204

        # Deleting five makes room for exactly five, however many ask at once.
        for sandbox in made[:5]:
            assert gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")[0] == 204
        made = made[5:]
        made += in_threads(create, 8, threads=8, room=CAP - len(live(gw)))
        assert len(live(gw)) <= CAP
    finally:
        for sandbox in made:
            gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")


def test_session_cap_in_waves(gw: Gateway) -> None:
    status, sandbox = gw.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, sandbox
    try:
        def create() -> tuple[int, Any]:
            return gw.request("POST", f"/v1/sandboxes/{sandbox['id']}/sessions", {"type": "terminal"}, timeout=300)

        def sessions() -> int:
            return len(gw.request("GET", f"/v1/sandboxes/{sandbox['id']}")[1]["sessions"])

        made = in_threads(create, SESSIONS + 4, threads=6, room=SESSIONS - 1)  # the first kernel holds one
        assert len(made) == SESSIONS - 1 and sessions() == SESSIONS
        for session in made[:3]:
            assert gw.request("DELETE", f"/v1/sessions/{session['id']}")[0] == 204
        more = in_threads(create, 6, threads=6, room=3)
        assert len(more) == 3 and sessions() == SESSIONS
    finally:
        gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")
