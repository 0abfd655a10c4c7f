"""Pause and resume (issue 10) through a real gateway: REST, MCP and the Python client; what a pause frees and
keeps; idle sandboxes created with ``on_idle: "pause"``; the paused cap beside the live cap; and a paused
sandbox's files across a gateway killed with SIGKILL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelhub.client import Sandbox
from kernelhub.testing import Gateway
from tests.handlers.test_ops import wait_for
from tests.handlers.test_restart import mcp_call

GATEWAY_ARGS = ["--max-sandboxes", "2", "--Hub.max_paused_per_tenant=1", "--Hub.reap_interval=0.2"]


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    own = Gateway(extra_args=GATEWAY_ARGS)
    try:
        yield own
    finally:
        if own.proc.poll() is None:
            own.stop()


@pytest.fixture(autouse=True)
def no_sandboxes_left(gw: Gateway) -> Iterator[None]:
    yield
    for sb in gw.request("GET", "/v1/sandboxes")[1]["sandboxes"]:
        gw.request("DELETE", f"/v1/sandboxes/{sb['id']}")


def create(gw: Gateway, **fields: Any) -> dict[str, Any]:
    status, sb = gw.request("POST", "/v1/sandboxes", {"template": "python", **fields})
    assert status == 201, sb
    return sb


def cgroup_exists(sandbox_id: str) -> bool:
    return Path(f"/sys/fs/cgroup/kernelhub/{sandbox_id}").exists()


def test_pause_frees_the_processes_and_resume_keeps_the_files(gw: Gateway) -> None:
    sb = create(gw)
    sid = sb["id"]
    status, node = gw.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "jupyter", "language": "node"})
    assert status == 201, node
    assert gw.request("PUT", f"/v1/sandboxes/{sid}/files/notes/a.txt", raw=b"kept")[0] == 201
    assert gw.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "x = 1"})[0] == 200
    status, ex = gw.request("POST", f"/v1/sandboxes/{sid}/executions", {"code": "import time; time.sleep(600)"})
    assert status == 202
    wait_for(lambda: gw.request("GET", f"/v1/executions/{ex['id']}")[1]["status"] == "running", "it to run")

    status, paused = gw.request("POST", f"/v1/sandboxes/{sid}/pause")
    assert (status, paused["state"]) == (200, "paused"), paused
    assert "paused_at" in paused and paused["sessions"] == []
    assert not cgroup_exists(sid)  # its processes and their memory are gone
    status, cut = gw.request("GET", f"/v1/executions/{ex['id']}")
    assert (cut["status"], cut["reason"]) == ("killed", "paused"), cut
    status, refused = gw.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "1"})
    assert (status, refused["error"]) == (409, "sandbox_not_running"), refused
    assert gw.request("POST", f"/v1/sandboxes/{sid}/pause")[0] == 409
    # Another tenant can neither see nor resume it.
    assert gw.request("POST", f"/v1/sandboxes/{sid}/resume", token=gw.other_token)[0] == 404

    status, resumed = gw.request("POST", f"/v1/sandboxes/{sid}/resume")
    assert (status, resumed["state"]) == (200, "running"), resumed
    assert {s["id"] for s in resumed["sessions"]} == {sb["sessions"][0]["id"], node["id"]}
    assert "paused_at" not in resumed
    assert gw.request("GET", f"/v1/sandboxes/{sid}/files/notes/a.txt") == (200, b"kept")
    status, ex = gw.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "print('x' in dir())"})
    assert (status, ex["stdout"]) == (200, "False\n"), ex
    status, ex = gw.request("POST", f"/v1/sandboxes/{sid}/execute",
                            {"code": "console.log(require('fs').readFileSync('notes/a.txt', 'utf8'))",
                             "session_id": node["id"]})
    assert (status, ex["stdout"]) == (200, "kept\n"), ex
    assert gw.request("POST", f"/v1/sandboxes/{sid}/resume")[1]["error"] == "sandbox_not_paused"
    # Deleting a paused sandbox removes what it kept.
    assert gw.request("POST", f"/v1/sandboxes/{sid}/pause")[0] == 200
    assert (Path(gw.state_dir) / "sandboxes" / sid).exists()
    assert gw.request("DELETE", f"/v1/sandboxes/{sid}")[0] == 204
    assert not (Path(gw.state_dir) / "sandboxes" / sid).exists()


def test_mcp_and_client_pause_and_resume(gw: Gateway) -> None:
    sb = create(gw)
    out = mcp_call(gw, "sandbox_pause", {"sandbox_id": sb["id"]})
    assert out["state"] == "paused"
    out = mcp_call(gw, "sandbox_resume", {"sandbox_id": sb["id"]})
    assert out["state"] == "running"
    sandbox = Sandbox.connect(sb["id"], url=gw.url, token=gw.token)
    try:
        assert sandbox.pause()["state"] == "paused"
        assert sandbox.resume()["state"] == "running"
        assert sandbox.run_code("print(6 * 7)").stdout == "42\n"
    finally:
        sandbox.close()


def test_idle_sandboxes_pause_and_the_caps_hold(gw: Gateway) -> None:
    assert gw.request("POST", "/v1/sandboxes", {"on_idle": "hibernate"})[0] == 400
    idle = create(gw, on_idle="pause", limits={"idle_timeout_s": 1})
    assert idle["on_idle"] == "pause"
    wait_for(lambda: gw.request("GET", f"/v1/sandboxes/{idle['id']}")[1]["state"] == "paused",
               "the idle sandbox to pause")
    # Paused ones do not count toward the live cap (2): two more may run.
    first, second = create(gw), create(gw)
    status, refused = gw.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 429, refused
    # Resuming would make three live: refused, and it stays paused.
    assert gw.request("POST", f"/v1/sandboxes/{idle['id']}/resume")[0] == 429
    assert gw.request("GET", f"/v1/sandboxes/{idle['id']}")[1]["state"] == "paused"
    # The paused cap (1) is full: a second pause is refused and the sandbox keeps running.
    status, refused = gw.request("POST", f"/v1/sandboxes/{first['id']}/pause")
    assert (status, refused["error"]) == (429, "quota_exceeded"), refused
    assert gw.request("GET", f"/v1/sandboxes/{first['id']}")[1]["state"] == "running"
    assert gw.request("DELETE", f"/v1/sandboxes/{second['id']}")[0] == 204
    status, resumed = gw.request("POST", f"/v1/sandboxes/{idle['id']}/resume")
    assert (status, resumed["state"]) == (200, "running"), resumed


def test_a_paused_sandbox_survives_a_killed_gateway() -> None:
    gw = Gateway()
    try:
        sb = create(gw)
        assert gw.request("PUT", f"/v1/sandboxes/{sb['id']}/files/b.txt", raw=b"through the crash")[0] == 201
        assert gw.request("POST", f"/v1/sandboxes/{sb['id']}/pause")[0] == 200
        gw.crash()
        successor = Gateway(state_dir=gw.state_dir)
        try:
            status, info = successor.request("GET", f"/v1/sandboxes/{sb['id']}")
            assert (status, info["state"]) == (200, "paused"), info
            assert os.path.exists(Path(gw.state_dir) / "sandboxes" / sb["id"])
            status, resumed = successor.request("POST", f"/v1/sandboxes/{sb['id']}/resume")
            assert (status, resumed["state"]) == (200, "running"), resumed
            assert successor.request("GET", f"/v1/sandboxes/{sb['id']}/files/b.txt") == (200, b"through the crash")
        finally:
            successor.stop()
    finally:
        if gw.proc.poll() is None:
            gw.stop()


def stored_sandbox_ids(gw: Gateway) -> set[str]:
    """The sandbox ids the gateway's store holds (read-only, beside the running gateway)."""
    import sqlite3

    db = Path(gw.state_dir) / "kernelhub.db"
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {row[0] for row in conn.execute("SELECT id FROM sandboxes")}
    finally:
        conn.close()


@pytest.mark.parametrize("change", ["resume", "pause"])
def test_a_delete_during_a_pause_or_a_resume_leaves_nothing_behind(gw: Gateway, change: str) -> None:
    """A delete that arrives while a resume starts kernels (or a pause stops them) waits for it, then deletes:
    the resume's late write must not bring the row back (the next gateway would restore a deleted sandbox), nor
    its sandbox run on, unlisted."""
    import threading

    sb = create(gw)
    if change == "resume":
        assert gw.request("POST", f"/v1/sandboxes/{sb['id']}/pause")[0] == 200
    answers: list[tuple[int, Any]] = []
    worker = threading.Thread(target=lambda: answers.append(gw.request("POST", f"/v1/sandboxes/{sb['id']}/{change}")))
    worker.start()
    during = "starting" if change == "resume" else "paused"
    wait_for(lambda: gw.request("GET", f"/v1/sandboxes/{sb['id']}")[1].get("state") == during, f"the {change}")
    assert gw.request("DELETE", f"/v1/sandboxes/{sb['id']}")[0] == 204
    worker.join()
    assert answers[0][0] == 200, answers
    assert gw.request("GET", f"/v1/sandboxes/{sb['id']}")[0] == 404
    wait_for(lambda: sb["id"] not in stored_sandbox_ids(gw), "the store to forget the sandbox")
    assert not (Path(gw.state_dir) / "sandboxes" / sb["id"]).exists()
    assert not cgroup_exists(sb["id"])


def test_a_resumed_sandbox_keeps_its_network(gw: Gateway) -> None:
    """The proxy of the processes a pause stops goes with them, so the resumed sandbox gets its own forwarder."""
    sb = create(gw, network={"allow": ["example.invalid"]})
    code = ("import os, socket\nsocket.create_connection(('127.0.0.1', 3128), timeout=5).close()\n"
            "print(os.environ.get('HTTP_PROXY'))")
    for round in range(3):
        if round:
            assert gw.request("POST", f"/v1/sandboxes/{sb['id']}/pause")[0] == 200
            status, resumed = gw.request("POST", f"/v1/sandboxes/{sb['id']}/resume")
            assert (status, resumed["network"]) == (200, {"allow": ["example.invalid"], "deny": []}), resumed
        status, ex = gw.request("POST", f"/v1/sandboxes/{sb['id']}/execute", {"code": code})
        assert (status, ex["status"], ex["stdout"]) == (200, "ok", "http://127.0.0.1:3128\n"), (round, ex)


def test_sigterm_during_a_resume_keeps_the_workspace() -> None:
    """The shutdown waits for a resume in progress and keeps its sandbox for the next gateway: cut half-way, the
    sandbox it was starting was stopped for good with the workspace it had re-attached (files lost, and the
    sandbox ``restore_failed`` at every later start)."""
    import socket

    gw = Gateway(extra_args=["--pool-size", "0"])
    try:
        sb = create(gw, template="bash")
        assert gw.request("PUT", f"/v1/sandboxes/{sb['id']}/files/f.txt", raw=b"precious")[0] == 201
        assert gw.request("POST", f"/v1/sandboxes/{sb['id']}/pause")[0] == 200
        with socket.create_connection(("127.0.0.1", gw.port)) as resume:
            resume.sendall(f"POST /v1/sandboxes/{sb['id']}/resume HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
                           f"Bearer {gw.token}\r\nContent-Length: 0\r\n\r\n".encode())
            wait_for(lambda: gw.request("GET", f"/v1/sandboxes/{sb['id']}")[1]["state"] == "starting", "the resume")
            gw.stop(keep_state=True)
        successor = Gateway(state_dir=gw.state_dir)
        try:
            status, info = successor.request("GET", f"/v1/sandboxes/{sb['id']}")
            assert (status, info["state"]) == (200, "running"), info
            assert successor.request("GET", f"/v1/sandboxes/{sb['id']}/files/f.txt") == (200, b"precious")
        finally:
            successor.stop()
    finally:
        if gw.proc.poll() is None:
            gw.stop()
