"""Restart without loss (issue 10): a real gateway killed with SIGKILL (or stopped with SIGTERM) and a successor
started on the same state directory.

What a restart must keep: every running sandbox (same id, tenant, limits, metadata and session ids; its
``/workspace`` re-attached, not recreated; a fresh kernel of each session's language, said in ``sandbox_info``'s
``restored_at`` and in ``sandbox_logs``); the executions it cut (``killed``, reason ``gateway_restart``, readable
on REST and MCP); finished executions; and nothing else: a half-made sandbox and a half-sent upload leave no
trace, and a sandbox whose lifetime passed while the gateway was down is ``stopped`` with reason ``lifetime``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from kernelhub.testing import Gateway
from tests.handlers.test_ops import wait_for


def sandbox_dirs(gw: Gateway) -> set[str]:
    path = Path(gw.state_dir) / "sandboxes"
    return {p.name for p in path.iterdir()} if path.is_dir() else set()


def kernelhub_cgroups() -> set[str]:
    root = Path("/sys/fs/cgroup/kernelhub")
    return {p.name for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()


def mcp_call(gw: Gateway, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    status, body = gw.request("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                               "params": {"name": tool, "arguments": arguments}},
                              headers={"Accept": "application/json, text/event-stream"})
    assert status == 200, body
    if isinstance(body, bytes):  # an event stream: its last message is the answer
        body = [json.loads(line[5:]) for line in body.decode().splitlines() if line.startswith("data:")][-1]
    result = body["result"]
    assert not result.get("isError"), result
    return result["structuredContent"] if "structuredContent" in result else json.loads(result["content"][0]["text"])


def open_upload(gw: Gateway, sandbox_id: str, path: str, total: int, sent: bytes) -> socket.socket:
    """A PUT of ``total`` bytes to the file route of which only ``sent`` went: an upload in flight."""
    sock = socket.create_connection(("127.0.0.1", gw.port))
    head = (f"PUT /v1/sandboxes/{sandbox_id}/files/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {gw.token}\r\nContent-Length: {total}\r\n\r\n")
    sock.sendall(head.encode() + sent)
    return sock


def gateway_holds_an_unnamed_file(gw: Gateway) -> bool:
    """Whether the gateway process has an O_TMPFILE upload open (its /proc fd link reads ``/…/#ino (deleted)``)."""
    fds = Path(f"/proc/{gw.proc.pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if "/#" in target and target.endswith("(deleted)"):
            return True
    return False


@pytest.fixture
def first() -> Iterator[Gateway]:
    gw = Gateway()
    try:
        yield gw
    finally:
        if gw.proc.poll() is None:
            gw.stop()


def test_kill_mid_execution_and_mid_upload_restores_everything(first: Gateway) -> None:
    gw = first
    limits = {"memory_mb": 384, "idle_timeout_s": 600}
    status, sb = gw.request("POST", "/v1/sandboxes", {"template": "python", "limits": limits,
                                                      "metadata": {"owner": "restart-test", "n": [1, 2]}})
    assert status == 201, sb
    sid = sb["id"]
    # Sessions of every language, a file in the workspace, a finished execution and one in flight in each kernel.
    sessions = {"python": sb["sessions"][0]["id"]}
    for language in ("node", "typescript", "bash"):
        status, se = gw.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "jupyter", "language": language})
        assert status == 201, se
        sessions[language] = se["id"]
    status, terminal = gw.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "terminal"})
    assert status == 201, terminal
    status, _ = gw.request("PUT", f"/v1/sandboxes/{sid}/files/keep/data.txt", raw=b"kept across the restart")
    assert status == 201
    status, done = gw.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "x = 41\nprint(x + 1)"})
    assert status == 200 and done["stdout"] == "42\n", done
    sleepers = {"python": "import time\nprint('before', flush=True)\ntime.sleep(600)",
                "node": "console.log('before'); await new Promise(r => setTimeout(r, 600000));",
                "typescript": "console.log('before'); await new Promise(r => setTimeout(r, 600000));",
                "bash": "echo before; sleep 600"}
    running = {}
    for language, code in sleepers.items():
        if language == "python":
            continue  # sent over the /stream websocket below
        status, ex = gw.request("POST", f"/v1/sandboxes/{sid}/executions",
                                {"code": code, "session_id": sessions[language]})
        assert status == 202, ex
        running[language] = ex["id"]
    with connect(f"ws://127.0.0.1:{gw.port}/v1/sandboxes/{sid}/stream",
                 additional_headers={"Authorization": f"Bearer {gw.token}"}, open_timeout=30) as stream:
        stream.send(json.dumps({"type": "execute", "request_id": 1, "code": sleepers["python"],
                                "session_id": sessions["python"]}))
        accepted = json.loads(stream.recv(timeout=60))
        assert accepted["type"] == "accepted", accepted
        running["python"] = accepted["execution_id"]
        for language, ex_id in running.items():
            wait_for(lambda ex_id=ex_id: gw.request("GET", f"/v1/executions/{ex_id}")[1]["stdout"] == "before\n",
                     f"the {language} execution to print")
        upload = open_upload(gw, sid, "big.bin", 64 * 1024 * 1024, b"\1" * (1024 * 1024))
        wait_for(lambda: gateway_holds_an_unnamed_file(gw), "the upload to be written")
        before_dirs = sandbox_dirs(gw)
        gw.crash()
        upload.close()
    second = Gateway(state_dir=gw.state_dir)
    try:
        status, info = second.request("GET", f"/v1/sandboxes/{sid}")
        assert status == 200, info
        assert info["state"] == "running" and "restored_at" in info
        assert info["metadata"] == {"owner": "restart-test", "n": [1, 2]}
        assert info["limits"] == sb["limits"] and info["created_at"] == sb["created_at"]
        assert {s["language"]: s["id"] for s in info["sessions"] if s["type"] == "jupyter"} == sessions
        assert [s["id"] for s in info["sessions"] if s["type"] == "terminal"] == [terminal["id"]]
        # Another tenant still cannot see it.
        assert second.request("GET", f"/v1/sandboxes/{sid}", token=second.other_token)[0] == 404
        # The workspace came back as it was: the file is there, the cut upload left nothing under any name.
        assert second.request("GET", f"/v1/sandboxes/{sid}/files/keep/data.txt") == (200, b"kept across the restart")
        status, listing = second.request("GET", f"/v1/sandboxes/{sid}/files")
        assert status == 200
        assert sorted(e["name"] for e in listing["entries"]) == ["keep"], listing
        # The cut executions ended killed (gateway_restart) with what they printed; the finished one is intact.
        for language, ex_id in running.items():
            status, ex = second.request("GET", f"/v1/executions/{ex_id}")
            assert status == 200, ex
            assert (ex["status"], ex["reason"], ex["stdout"]) == ("killed", "gateway_restart", "before\n"), language
            assert ex["session_id"] == sessions[language]
        ex = mcp_call(second, "execution_status", {"execution_id": running["python"]})
        assert (ex["status"], ex["reason"]) == ("killed", "gateway_restart")
        status, ex = second.request("GET", f"/v1/executions/{done['id']}")
        assert (status, ex["status"], ex["stdout"]) == (200, "ok", "42\n")
        assert second.request("GET", f"/v1/executions/{done['id']}", token=second.other_token)[0] == 404
        # Fresh kernels: the old variable is gone, each language runs, and the log says why.
        status, ex = second.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "print('x' in dir())"})
        assert (status, ex["stdout"]) == (200, "False\n"), ex
        for language, code in (("node", "console.log(1 + 1)"), ("typescript", "const n: number = 2; console.log(n)"),
                               ("bash", "echo 2")):
            status, ex = second.request("POST", f"/v1/sandboxes/{sid}/execute",
                                        {"code": code, "session_id": sessions[language]})
            assert (status, ex["stdout"].strip()) == (200, "2"), (language, ex)
        # The terminal is a fresh shell on the same workspace, under the same id.
        status, out = second.request("POST", f"/v1/sessions/{terminal['id']}/execute",
                                     {"input": "cat keep/data.txt\n", "timeout_s": 5})
        assert status == 200 and "kept across the restart" in out["output"], out
        status, logs = second.request("GET", f"/v1/sandboxes/{sid}/logs")
        assert any("kernel memory was lost" in line for line in logs["lines"]), logs
        # The start-up clean-up kept what the record claims and removed what none does (the warm pool's).
        assert sid in sandbox_dirs(second)
        assert not (before_dirs - {sid}) & sandbox_dirs(second)
    finally:
        second.stop()


def test_kill_mid_create_and_lifetime_passed_while_down(first: Gateway) -> None:
    gw = first
    status, short = gw.request("POST", "/v1/sandboxes", {"template": "bash", "limits": {"max_lifetime_s": 5}})
    assert status == 201, short
    status, kept = gw.request("POST", "/v1/sandboxes", {"template": "bash"})
    assert status == 201, kept
    status, kernel = gw.request("POST", "/api/kernels", {"name": "kernelhub-bash"})
    assert status == 201, kernel
    status, listing = gw.request("GET", "/v1/sandboxes")
    made_by_jupyter = {s["id"] for s in listing["sandboxes"]} - {short["id"], kept["id"]}
    known = sandbox_dirs(gw)
    # A create in flight: killed once its sandbox directory exists, before it answers.
    creator = subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-X", "POST", "-H", f"Authorization: Bearer {gw.token}",
         "-H", "Content-Type: application/json", "-d", '{"template": "node"}', f"{gw.url}/v1/sandboxes"])
    try:
        half = wait_for(lambda: sandbox_dirs(gw) - known, "the create to make its sandbox directory")
        gw.crash()
    finally:
        creator.wait()
    expires = time.time()
    wait_for(lambda: time.time() > expires + 5, "the short sandbox's lifetime to pass", timeout=10)
    second = Gateway(state_dir=gw.state_dir)
    try:
        status, info = second.request("GET", f"/v1/sandboxes/{short['id']}")
        assert (status, info["state"], info.get("reason")) == (200, "stopped", "lifetime"), info
        status, info = second.request("GET", f"/v1/sandboxes/{kept['id']}")
        assert (status, info["state"]) == (200, "running"), info
        status, listing = second.request("GET", "/v1/sandboxes")
        assert {s["id"] for s in listing["sandboxes"]} == {short["id"], kept["id"], *made_by_jupyter}, listing
        # A Jupyter API kernel comes back under the id its clients know, a fresh process.
        status, model = second.request("GET", f"/api/kernels/{kernel['id']}")
        assert (status, model["id"]) == (200, kernel["id"]), model
        assert second.request("POST", f"/api/kernels/{kernel['id']}/interrupt")[0] == 204
        # Only what a record claims is left on disk and in the cgroup tree: the half-made sandbox is gone.
        assert kept["id"] in sandbox_dirs(second) and short["id"] not in sandbox_dirs(second)
        assert not (half & (sandbox_dirs(second) | kernelhub_cgroups()))
        status, made = second.request("POST", "/v1/sandboxes", {"template": "node"})
        assert status == 201, made
    finally:
        second.stop()


def test_sigterm_keeps_sandboxes_unless_ephemeral(first: Gateway) -> None:
    gw = first
    status, sb = gw.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, sb
    assert gw.request("PUT", f"/v1/sandboxes/{sb['id']}/files/a.txt", raw=b"a")[0] == 201
    status, ex = gw.request("POST", f"/v1/sandboxes/{sb['id']}/executions", {"code": "import time; time.sleep(600)"})
    assert status == 202
    # A create in flight when SIGTERM comes fails, and leaves no record for the next gateway to list.
    known = sandbox_dirs(gw)
    creator = subprocess.Popen(
        ["curl", "-s", "-o", "/dev/null", "-X", "POST", "-H", f"Authorization: Bearer {gw.token}",
         "-H", "Content-Type: application/json", "-d", '{"template": "node"}', f"{gw.url}/v1/sandboxes"])
    try:
        wait_for(lambda: sandbox_dirs(gw) - known, "the create to make its sandbox directory")
        gw.stop(keep_state=True)
    finally:
        creator.wait()
    second = Gateway(state_dir=gw.state_dir, extra_args=["--ephemeral"])
    try:
        status, info = second.request("GET", f"/v1/sandboxes/{sb['id']}")
        assert (status, info["state"]) == (200, "running"), info
        assert [s["id"] for s in second.request("GET", "/v1/sandboxes")[1]["sandboxes"]] == [sb["id"]]
        assert second.request("GET", f"/v1/sandboxes/{sb['id']}/files/a.txt") == (200, b"a")
        status, cut = second.request("GET", f"/v1/executions/{ex['id']}")
        assert (cut["status"], cut["reason"]) == ("killed", "gateway_restart"), cut
    finally:
        second.stop(keep_state=True)
    third = Gateway(state_dir=gw.state_dir)
    try:
        assert third.request("GET", f"/v1/sandboxes/{sb['id']}")[0] == 404
        assert sb["id"] not in sandbox_dirs(third)
    finally:
        third.stop()


def test_a_damaged_sandbox_row_costs_neither_the_start_nor_its_files(first: Gateway) -> None:
    """One sandbox's record damaged on disk (a limit this kernelhub does not know, a field that is not JSON):
    the successor starts, restores the others, and leaves the damaged one's row and workspace as they were."""
    import sqlite3

    gw = first
    made = []
    for _ in range(3):
        status, sb = gw.request("POST", "/v1/sandboxes", {"template": "bash"})
        assert status == 201, sb
        assert gw.request("PUT", f"/v1/sandboxes/{sb['id']}/files/a.txt", raw=sb["id"].encode())[0] == 201
        made.append(sb["id"])
    gw.crash()
    conn = sqlite3.connect(Path(gw.state_dir) / "kernelhub.db")
    conn.execute("UPDATE sandboxes SET limits = '{\"from_the_future\": 1}' WHERE id = ?", (made[0],))
    conn.execute("UPDATE sandboxes SET metadata = '{not json' WHERE id = ?", (made[1],))
    conn.commit()
    conn.close()
    second = Gateway(state_dir=gw.state_dir)
    try:
        for damaged in made[:2]:
            assert second.request("GET", f"/v1/sandboxes/{damaged}")[0] == 404
            assert damaged in sandbox_dirs(second)
            assert f"sandbox {damaged}: its stored record cannot be read" in second.log()
        status, info = second.request("GET", f"/v1/sandboxes/{made[2]}")
        assert (status, info["state"]) == (200, "running"), info
        assert second.request("GET", f"/v1/sandboxes/{made[2]}/files/a.txt") == (200, made[2].encode())
    finally:
        second.stop(keep_state=True)
    conn = sqlite3.connect(Path(gw.state_dir) / "kernelhub.db")
    assert {r[0] for r in conn.execute("SELECT id FROM sandboxes")} >= set(made[:2])
    conn.close()
    with open("/proc/self/mountinfo") as f:
        if not any(line.split()[4].startswith(gw.state_dir + "/") for line in f):
            shutil.rmtree(gw.state_dir, ignore_errors=True)


def test_a_sandbox_whose_restore_failed_is_tried_again_with_its_files(first: Gateway) -> None:
    """A restore that fails (here the agent cannot start; in life a full disk, no free uid or loop device) leaves
    the sandbox ``failed`` (``restore_failed``) with its workspace: the next start tries again rather than reaping
    the workspace as unclaimed."""
    gw = first
    status, sb = gw.request("POST", "/v1/sandboxes", {"template": "bash"})
    assert status == 201, sb
    assert gw.request("PUT", f"/v1/sandboxes/{sb['id']}/files/a.txt", raw=b"still here")[0] == 201
    gw.crash()
    broken = Gateway(state_dir=gw.state_dir, extra_args=["--SandboxFactory.agent_python=/nonexistent/python3"])
    try:
        status, info = broken.request("GET", f"/v1/sandboxes/{sb['id']}")
        assert (status, info["state"], info.get("reason")) == (200, "failed", "restore_failed"), info.get("reason")
    finally:
        broken.stop(keep_state=True)
    assert sb["id"] in sandbox_dirs(broken)
    second = Gateway(state_dir=gw.state_dir)
    try:
        status, info = second.request("GET", f"/v1/sandboxes/{sb['id']}")
        assert (status, info["state"]) == (200, "running"), info
        assert second.request("GET", f"/v1/sandboxes/{sb['id']}/files/a.txt") == (200, b"still here")
    finally:
        second.stop(keep_state=True)
    # Failed again, then deleted: what it kept goes with it at once, not at the next start.
    broken = Gateway(state_dir=gw.state_dir, extra_args=["--SandboxFactory.agent_python=/nonexistent/python3"])
    try:
        assert broken.request("GET", f"/v1/sandboxes/{sb['id']}")[1]["reason"] == "restore_failed"
        assert broken.request("DELETE", f"/v1/sandboxes/{sb['id']}")[0] == 204
        assert sb["id"] not in sandbox_dirs(broken)
    finally:
        broken.stop()
