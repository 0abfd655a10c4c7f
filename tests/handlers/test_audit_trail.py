"""The audit log through a real gateway (issue 10): every surface's actions recorded (REST, the /stream
websocket, the Jupyter API and its websocket, MCP), each tenant reading only its own entries at ``GET
/v1/audit``, paged; and ``kernelhub audit verify`` passing on the gateway's file and failing, naming the entry,
after one entry is edited, one deleted and two swapped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.session import Session
from websockets.sync.client import connect

from kernelhub.testing import Gateway, make_state_dir
from tests.handlers.test_restart import mcp_call


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    own = Gateway()
    try:
        yield own
    finally:
        if own.proc.poll() is None:
            own.stop()


def entries(gw: Gateway, token: str | None = "default", **query: Any) -> list[dict[str, Any]]:
    """Every entry the key's tenant may read, following the pages."""
    got: list[dict[str, Any]] = []
    cursor = None
    while True:
        args = "&".join(f"{k}={v}" for k, v in {**query, **({"cursor": cursor} if cursor else {})}.items())
        status, page = gw.request("GET", f"/v1/audit?{args}", token=token)
        assert status == 200, page
        got += page["entries"]
        cursor = page["next"]
        if cursor is None:
            return got


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def verify(state_dir: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernelhub.cli", "audit", "verify", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=60)


def mixed_actions(gw: Gateway) -> dict[str, Any]:
    """One action of each kind on each surface, as alice; answers what they made and ran."""
    made: dict[str, Any] = {"code": {}}
    status, sb = gw.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, sb
    made["sandbox"] = sid = sb["id"]
    made["code"]["rest"] = code = "print('rest')"
    assert gw.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": code})[0] == 200
    assert gw.request("PUT", f"/v1/sandboxes/{sid}/files/f.txt", raw=b"x")[0] == 201
    assert gw.request("GET", f"/v1/sandboxes/{sid}/missing")[0] == 404  # an error is an entry too
    made["code"]["stream"] = code = "print('stream')"
    with connect(f"ws://127.0.0.1:{gw.port}/v1/sandboxes/{sid}/stream",
                 additional_headers={"Authorization": f"Bearer {gw.token}"}, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "execute", "code": code, "request_id": 1}))
        while json.loads(ws.recv(timeout=60))["type"] != "end":
            pass
    made["code"]["mcp"] = code = "print('mcp')"
    out = mcp_call(gw, "code_execute", {"sandbox_id": sid, "code": code})
    assert out["stdout"] == "mcp\n", out
    status, kernel = gw.request("POST", "/api/kernels", {"name": "kernelhub-python"})
    assert status == 201, kernel
    made["kernel"] = kernel["id"]
    made["code"]["jupyter"] = code = "print('jupyter')"
    msg = Session().msg("execute_request", content={"code": code, "silent": False, "store_history": True,
                                                    "user_expressions": {}, "allow_stdin": False})
    with connect(f"ws://127.0.0.1:{gw.port}/api/kernels/{kernel['id']}/channels?session_id=s",
                 additional_headers={"Authorization": f"token {gw.token}"}, open_timeout=30) as ws:
        ws.send(json.dumps({**msg, "channel": "shell"}, default=str))
        while True:
            reply = json.loads(ws.recv(timeout=60))
            if reply.get("msg_type") == "execute_reply":
                break
    assert gw.request("DELETE", f"/api/kernels/{kernel['id']}")[0] == 204
    assert gw.request("DELETE", f"/v1/sandboxes/{sid}")[0] == 204
    # bob acts too, on his own sandbox list
    assert gw.request("GET", "/v1/sandboxes", token=gw.other_token)[0] == 200
    return made


def test_every_surface_is_recorded_for_its_tenant_only(gw: Gateway) -> None:
    started = time.time()
    made = mixed_actions(gw)
    sid = made["sandbox"]
    # Each entry is queued when its action ends, so a read queued after them sees them all.
    everything = entries(gw)
    mine = [e for e in everything if e.get("sandbox_id") == sid or e.get("ids", {}).get("kernel_id") == made["kernel"]]
    actions = [e["action"] for e in mine]
    for action in ("POST /v1/sandboxes/{sandbox_id}/execute", "PUT /v1/sandboxes/{sandbox_id}/files/{path}",
                   "GET /v1/sandboxes/{sandbox_id}/stream", "WS /v1/sandboxes/{sandbox_id}/stream execute",
                   "code_execute", "WS /api/kernels/{kernel_id}/channels execute_request",
                   "DELETE /api/kernels/{kernel_id}", "DELETE /v1/sandboxes/{sandbox_id}"):
        assert action in actions, (action, actions)
    create = next(e for e in everything if e["action"] == "POST /v1/sandboxes" and e["ids"].get("created") == sid)
    assert create["status"] == 201 and create["tenant"] != "bob"
    # Code is kept as its digest and size, never as itself; the key as a fingerprint, never as itself.
    by_code = {e.get("code_sha256"): e for e in everything if "code_sha256" in e}
    for surface, code in made["code"].items():
        entry = by_code.get(sha(code))
        assert entry is not None, surface
        assert entry["code_bytes"] == len(code.encode()) and "code" not in entry
    assert all(e["key_id"].startswith("k_") for e in everything)
    assert gw.token not in json.dumps(everything)
    assert len({e["key_id"] for e in everything}) == 1
    missing = next(e for e in everything if e["action"] == f"GET /v1/sandboxes/{sid}/missing")  # no such route
    assert (missing["status"], missing["error"]) == (404, "not_found")
    assert next(e for e in mine if e["action"] == "GET /v1/sandboxes/{sandbox_id}/stream")["status"] == 101
    # Tenants read only their own entries; since= and the pages cut the same list.
    theirs = entries(gw, token=gw.other_token)
    assert theirs and all(e["tenant"] == "bob" for e in theirs)
    assert not {e["seq"] for e in theirs} & {e["seq"] for e in everything}
    assert {e["tenant"] for e in everything} == {create["tenant"]}
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
    paged = entries(gw, since=since, limit=2)
    expected = [e["seq"] for e in everything if e["time"] >= since]
    # Reading is an action too: the pages also hold the reads made since.
    assert [e["seq"] for e in paged][:len(expected)] == expected
    assert {e["action"] for e in paged[len(expected):]} == {"GET /v1/audit"}
    assert gw.request("GET", "/v1/audit?limit=0")[0] == 400
    assert gw.request("GET", "/v1/audit?since=yesterday")[0] == 400


def test_verify_passes_and_names_an_edited_deleted_or_swapped_entry(gw: Gateway) -> None:
    mixed_actions(gw)
    result = verify(gw.state_dir)  # read-only, while the gateway writes
    assert result.returncode == 0, result.stdout + result.stderr
    assert "intact" in result.stdout
    gw.stop(keep_state=True)
    try:
        seq = 3
        tamperings = {
            "edited": [f"UPDATE audit SET status = 200, error = NULL, action = 'GET /v1/templates' WHERE seq = {seq}"],
            "deleted": [f"DELETE FROM audit WHERE seq = {seq}"],
            "swapped": [f"UPDATE audit SET seq = -1 WHERE seq = {seq}", f"UPDATE audit SET seq = {seq} WHERE seq = "
                        f"{seq + 1}", f"UPDATE audit SET seq = {seq + 1} WHERE seq = -1"],
        }
        for kind, statements in tamperings.items():
            copy = Path(make_state_dir())
            try:
                shutil.copy(Path(gw.state_dir) / "kernelhub.db", copy / "kernelhub.db")
                conn = sqlite3.connect(copy / "kernelhub.db")
                with conn:
                    for statement in statements:
                        conn.execute(statement)
                conn.close()
                result = verify(copy)
                assert result.returncode == 1, (kind, result.stdout, result.stderr)
                assert "is broken at entry" in result.stdout and f"entry {seq}" in result.stdout, (kind, result.stdout)
            finally:
                shutil.rmtree(copy, ignore_errors=True)
        assert verify(gw.state_dir).returncode == 0
    finally:
        shutil.rmtree(gw.state_dir, ignore_errors=True)
