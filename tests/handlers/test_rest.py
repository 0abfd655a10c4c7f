"""The /v1 REST surface against a real gateway: every API.md tool through its route, every template, rich
results, errors, limits, sessions, logs, metrics, tenants, the per-tenant cap and the OpenAPI document."""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kernelhub.handlers import rest, streams
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

OPENAPI = json.loads((Path(rest.__file__).resolve().parent.parent / "openapi.json").read_text())
MiB = 1024 * 1024
#: A top-level await ipykernel does not stop on SIGINT (KERNELS.md). "napping" is printed by a callback while the
#: cell awaits (not flushed, so the print is long over when it arrives): once it is seen, a signal lands there.
NAP = ("import asyncio\nasyncio.get_running_loop().call_later(0.1, print, 'napping')\n"
       "await asyncio.sleep(60)")


def validate(instance: Any, schema_name: str) -> None:
    """Check an answer against the OpenAPI document's schema of that name."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": OPENAPI["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def cgroup_dirs(sandbox_id: str) -> list[str]:
    """The sandbox's cgroup directories, in any v1 hierarchy or in the v2 tree."""
    return glob.glob(f"/sys/fs/cgroup/*/kernelhub/{sandbox_id}") + glob.glob(f"/sys/fs/cgroup/kernelhub/{sandbox_id}")


def is_iso_z(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", value) is not None


@pytest.fixture(scope="module")
def node_sandbox(sandboxes: Any) -> dict[str, Any]:
    return sandboxes("node")


# -- sandboxes ------------------------------------------------------------------------------------------------

def test_sandbox_lifecycle_and_cleanup(gateway: Gateway, execute: Any) -> None:
    status, sb = gateway.request("POST", "/v1/sandboxes", {
        "template": "python", "limits": {"memory_mb": 256, "pids": 64}, "env": {"GREETING": "hello"},
        "metadata": {"owner": "test"},
    })
    assert status == 201, sb
    sid = sb["id"]
    try:
        validate(sb, "Sandbox")
        assert sb["state"] == "running" and sb["template"] == "python"
        assert sb["limits"]["memory_mb"] == 256 and sb["limits"]["pids"] == 64
        assert sb["limits"]["disk_mb"] == 1024  # untouched limits keep their defaults
        assert sb["metadata"] == {"owner": "test"}
        assert is_iso_z(sb["created_at"]) and is_iso_z(sb["expires_at"])
        [session] = sb["sessions"]
        assert session["type"] == "jupyter" and session["language"] == "python" and session["sandbox_id"] == sid

        status, listed = gateway.request("GET", "/v1/sandboxes")
        assert status == 200 and sid in [s["id"] for s in listed["sandboxes"]]
        status, info = gateway.request("GET", f"/v1/sandboxes/{sid}")
        assert status == 200 and info["id"] == sid and info["state"] == "running"
        assert execute(sid, "import os; print(os.environ['GREETING'])")["stdout"] == "hello\n"
        assert cgroup_dirs(sid), "a running sandbox has its cgroup"
    finally:
        status, body = gateway.request("DELETE", f"/v1/sandboxes/{sid}")
    assert status == 204 and body == b""
    for path in (f"/v1/sandboxes/{sid}", f"/v1/sandboxes/{sid}/metrics"):
        status, body = gateway.request("GET", path)
        assert status == 404 and body["error"] == "not_found", body
    status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "1"})
    assert status == 404
    status, body = gateway.request("DELETE", f"/v1/sandboxes/{sid}")
    assert status == 404
    status, listed = gateway.request("GET", "/v1/sandboxes")
    assert sid not in [s["id"] for s in listed["sandboxes"]]
    assert not os.path.exists(f"/sys/fs/cgroup/memory/kernelhub/{sid}")
    assert not cgroup_dirs(sid)
    with open("/proc/mounts") as f:
        assert sid not in f.read()
    assert not os.path.exists(os.path.join(gateway.state_dir, "sandboxes", sid))


@pytest.mark.parametrize("template, code", [
    ("python", "print(1)"),
    ("node", "console.log(1)"),
    ("bash", "echo 1"),
])
def test_every_template_first_kernel_answers(sandboxes: Any, node_sandbox: dict[str, Any],
                                             python_sandbox: dict[str, Any], execute: Any,
                                             template: str, code: str) -> None:
    sb = {"python": python_sandbox, "node": node_sandbox}.get(template) or sandboxes(template)
    assert sb["template"] == template
    assert sb["sessions"][0]["language"] == template
    ex = execute(sb["id"], code)
    assert ex["status"] == "ok", ex
    assert ex["stdout"] == "1\n"
    assert ex["session_id"] == sb["sessions"][0]["id"]


def test_typescript_in_a_node_sandbox(node_sandbox: dict[str, Any], execute: Any) -> None:
    ex = execute(node_sandbox["id"], "const n: number = 41;\nconsole.log(n + 1);", language="typescript")
    assert ex["status"] == "ok", ex
    assert ex["stdout"] == "42\n"


def test_templates_extension(gateway: Gateway) -> None:
    status, body = gateway.request("GET", "/v1/templates")
    assert status == 200
    names = {t["name"]: t for t in body["templates"]}
    assert {"python", "node", "bash"} <= set(names)
    assert names["node"]["language"] == "node"
    for template in body["templates"]:
        validate(template, "Template")


# -- executions -----------------------------------------------------------------------------------------------

def test_rich_main_result(python_sandbox: dict[str, Any], execute: Any) -> None:
    ex = execute(python_sandbox["id"], "1+1")
    validate(ex, "Execution")
    assert ex["status"] == "ok" and ex["error"] is None and ex["truncated"] is False
    assert ex["results"] == [{"is_main_result": True, "data": {"text/plain": "2"}}]
    assert isinstance(ex["execution_count"], int)
    assert is_iso_z(ex["started_at"]) and is_iso_z(ex["finished_at"])
    assert isinstance(ex["duration_ms"], int) and ex["duration_ms"] >= 0


def test_matplotlib_png_result(python_sandbox: dict[str, Any], execute: Any) -> None:
    ex = execute(python_sandbox["id"], "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert ex["status"] == "ok", ex
    images = [r for r in ex["results"] if "image/png" in r["data"]]
    assert len(images) == 1
    assert images[0]["is_main_result"] is False
    assert base64.b64decode(images[0]["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_error_execution(python_sandbox: dict[str, Any], execute: Any) -> None:
    ex = execute(python_sandbox["id"], "print('before')\n1/0")
    validate(ex, "Execution")
    assert ex["status"] == "error"
    assert ex["stdout"] == "before\n"
    assert ex["error"]["name"] == "ZeroDivisionError"
    assert "division by zero" in ex["error"]["value"]
    assert ex["error"]["traceback"] and all(isinstance(t, str) for t in ex["error"]["traceback"])


def test_timeout_interrupts_and_the_kernel_keeps_its_state(python_sandbox: dict[str, Any], execute: Any) -> None:
    sid = python_sandbox["id"]
    execute(sid, "kept = 41")
    started = time.monotonic()
    ex = execute(sid, "while True: pass", timeout_s=2)
    assert ex["status"] == "timeout" and ex["reason"] == "timeout", ex
    assert time.monotonic() - started < 10
    after = execute(sid, "print(kept + 1)")
    assert after["status"] == "ok" and after["stdout"] == "42\n"


def test_input_without_a_frontend_is_a_clear_error(python_sandbox: dict[str, Any], execute: Any) -> None:
    ex = execute(python_sandbox["id"], "input('name? ')")
    assert ex["status"] == "error"
    assert ex["error"]["name"] == "StdinNotImplementedError"


def test_env_holds_for_one_execution(python_sandbox: dict[str, Any], execute: Any) -> None:
    sid = python_sandbox["id"]
    ex = execute(sid, "import os; print(os.environ.get('ONLY_NOW'))", env={"ONLY_NOW": "yes"})
    assert ex["stdout"] == "yes\n"
    assert execute(sid, "import os; print(os.environ.get('ONLY_NOW'))")["stdout"] == "None\n"


def test_output_cap_stops_the_execution(sandboxes: Any, execute: Any) -> None:
    sb = sandboxes("python", limits={"output_mb": 1})
    ex = execute(sb["id"], "print('x' * 100_000)\nprint('after')")
    assert ex["status"] == "ok" and ex["truncated"] is False  # under the cap
    started = time.monotonic()
    ex = execute(sb["id"], "for i in range(10**8): print(i)", timeout_s=300)
    assert time.monotonic() - started < 60  # stopped at the cap, not at its timeout
    validate(ex, "Execution")
    assert (ex["status"], ex["reason"], ex["truncated"]) == ("error", "output_truncated", True)
    assert ex["error"]["name"] == "OutputLimitExceeded"
    assert MiB // 2 < len(ex["stdout"].encode()) <= MiB
    # Interrupted, not restarted: the loop's variable is still there, and the next executions run.
    assert int(execute(sb["id"], "print(i)")["stdout"]) > 0


def test_async_execution_read_back_by_id(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    sid = python_sandbox["id"]
    status, accepted = gateway.request("POST", f"/v1/sandboxes/{sid}/executions",
                                       {"code": "import time\ntime.sleep(1)\nprint('done')"})
    assert status == 202, accepted
    validate(accepted, "ExecutionAccepted")
    assert set(accepted) == {"id", "status"} and accepted["status"] in ("queued", "running")
    status, ex = gateway.request("GET", f"/v1/executions/{accepted['id']}")
    assert status == 200 and ex["status"] in ("queued", "running") and ex["finished_at"] is None
    deadline = time.monotonic() + 30
    while ex["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
        status, ex = gateway.request("GET", f"/v1/executions/{accepted['id']}")
    validate(ex, "Execution")
    assert ex["status"] == "ok" and ex["stdout"] == "done\n" and ex["sandbox_id"] == sid
    status, body = gateway.request("GET", "/v1/executions/exdoesnotexist")
    assert status == 404 and body["error"] == "not_found"


def test_interrupt_extension(gateway: Gateway, python_sandbox: dict[str, Any], execute: Any) -> None:
    sid = python_sandbox["id"]
    status, accepted = gateway.request("POST", f"/v1/sandboxes/{sid}/executions",
                                       {"code": "import time\nprint('looping', flush=True)\n"
                                                "for _ in range(600): time.sleep(0.1)"})
    assert status == 202
    deadline = time.monotonic() + 30
    ex = accepted
    # Once the cell has printed, SIGINT lands in its loop. Sent at "running", it could land in ipykernel's own
    # code, whose error may be another than KeyboardInterrupt (test_streams.py::test_ws_interrupt says more).
    while "looping" not in (ex.get("stdout") or "") and time.monotonic() < deadline:
        time.sleep(0.05)
        ex = gateway.request("GET", f"/v1/executions/{accepted['id']}")[1]
    status, ex = gateway.request("POST", f"/v1/executions/{accepted['id']}/interrupt")
    assert status == 200
    while ex["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        ex = gateway.request("GET", f"/v1/executions/{accepted['id']}")[1]
    assert ex["status"] == "error" and ex["reason"] == "interrupted"
    assert ex["error"]["name"] == "KeyboardInterrupt"
    assert execute(sid, "print('next')")["stdout"] == "next\n"


def wait_for_status(gateway: Gateway, execution_id: str, statuses: tuple[str, ...],
                    timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, ex = gateway.request("GET", f"/v1/executions/{execution_id}")
        assert status == 200, ex
        if ex["status"] in statuses:
            return ex
        assert time.monotonic() < deadline, f"execution {execution_id} is still {ex['status']}"
        time.sleep(0.05)


def test_an_ignored_interrupt_escalates_to_a_restart(gateway: Gateway, sandboxes: Any, execute: Any) -> None:
    sid = sandboxes("python")["id"]
    execute(sid, "state = 1")
    status, accepted = gateway.request("POST", f"/v1/sandboxes/{sid}/executions",
                                       {"code": NAP})
    assert status == 202
    deadline = time.monotonic() + 30
    while gateway.request("GET", f"/v1/executions/{accepted['id']}")[1]["stdout"] != "napping\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    status, ex = gateway.request("POST", f"/v1/executions/{accepted['id']}/interrupt")
    assert status == 200
    ex = wait_for_status(gateway, accepted["id"], ("ok", "error", "timeout", "killed"))
    assert time.monotonic() - started < 30  # the await alone would take 60 s
    validate(ex, "Execution")
    assert (ex["status"], ex["reason"]) == ("killed", "interrupted")
    assert ex["error"]["name"] == "KernelRestarted" and "lost" in ex["error"]["value"]
    assert execute(sid, "print('state' in globals())")["stdout"] == "False\n"


def test_a_js_cell_right_after_an_error_runs(node_sandbox: dict[str, Any], execute: Any) -> None:
    """The issue's example: one request, then at once the next (tslab's abort window)."""
    sid = node_sandbox["id"]
    for failing in ("throw new Error('x')", "null.boom"):
        ex = execute(sid, failing)
        assert ex["status"] == "error" and ex["error"]["name"] and ex["error"]["value"]
        ex = execute(sid, "console.log(1)")
        assert (ex["status"], ex["stdout"], ex["error"]) == ("ok", "1\n", None)
        assert isinstance(ex["execution_count"], int)
    ex = execute(sid, "throw new Error('x')")
    assert (ex["error"]["name"], ex["error"]["value"]) == ("Error", "x")
    assert any("Error: x" in line for line in ex["error"]["traceback"])


def test_display_ids_and_updates(python_sandbox: dict[str, Any], execute: Any) -> None:
    ex = execute(python_sandbox["id"], "h = display('before', display_id=True)\nh.update('after')")
    validate(ex, "Execution")
    [result] = ex["results"]
    assert result["data"]["text/plain"] == "'after'" and result["display_id"]


# -- commands -------------------------------------------------------------------------------------------------

def test_command_exit_code_and_separate_streams(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    status, result = gateway.request("POST", f"/v1/sandboxes/{python_sandbox['id']}/commands",
                                     {"command": "echo out; echo err >&2; exit 3"})
    assert status == 200
    validate(result, "CommandResult")
    assert result["exit_code"] == 3 and result["stdout"] == "out\n" and result["stderr"] == "err\n"
    assert "reason" not in result and result["duration_ms"] >= 0


def test_command_stdin_env_and_cwd(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    path = f"/v1/sandboxes/{python_sandbox['id']}/commands"
    status, result = gateway.request("POST", path, {"command": "tr a-z A-Z", "stdin": "shout\n"})
    assert status == 200 and result["stdout"] == "SHOUT\n" and result["exit_code"] == 0
    status, result = gateway.request("POST", path, {"command": 'echo "$WHO"', "env": {"WHO": "me"}})
    assert result["stdout"] == "me\n"
    status, result = gateway.request("POST", path, {"command": "pwd"})
    assert result["stdout"] == "/workspace\n"
    gateway.request("POST", path, {"command": "mkdir -p sub/dir"})
    status, result = gateway.request("POST", path, {"command": "pwd", "cwd": "sub/dir"})
    assert result["stdout"] == "/workspace/sub/dir\n"
    status, result = gateway.request("POST", path, {"command": "pwd", "cwd": "/tmp"})
    assert result["stdout"] == "/tmp\n"


def test_command_timeout_has_a_reason(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    started = time.monotonic()
    status, result = gateway.request("POST", f"/v1/sandboxes/{python_sandbox['id']}/commands",
                                     {"command": "echo started; sleep 30", "timeout_s": 1})
    assert status == 200
    assert result["reason"] == "timeout" and result["exit_code"] != 0
    assert result["stdout"] == "started\n"
    assert time.monotonic() - started < 10


# -- sessions -------------------------------------------------------------------------------------------------

def test_sessions_share_the_workspace(gateway: Gateway, python_sandbox: dict[str, Any], execute: Any) -> None:
    sid = python_sandbox["id"]
    status, py2 = gateway.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "jupyter", "language": "python"})
    assert status == 201, py2
    validate(py2, "Session")
    status, sh = gateway.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "jupyter", "language": "bash"})
    assert status == 201, sh
    assert py2["sandbox_id"] == sid and sh["language"] == "bash" and sh["state"] == "running"
    try:
        status, info = gateway.request("GET", f"/v1/sandboxes/{sid}")
        assert {py2["id"], sh["id"]} <= {s["id"] for s in info["sessions"]}
        status, got = gateway.request("GET", f"/v1/sessions/{py2['id']}")
        assert status == 200 and got["id"] == py2["id"]

        # A second python kernel is a separate process: its own variables...
        execute(sid, "only_in_first = 1")
        status, ex = gateway.request("POST", f"/v1/sessions/{py2['id']}/execute",
                                     {"input": "print('only_in_first' in globals())\n"
                                               "open('/workspace/shared.txt', 'w').write('from python')"})
        assert status == 200 and ex["status"] == "ok" and ex["stdout"] == "False\n"
        assert ex["session_id"] == py2["id"]
        # ...but the same /workspace as every other session of the sandbox.
        status, ex = gateway.request("POST", f"/v1/sessions/{sh['id']}/execute",
                                     {"input": "cat /workspace/shared.txt; echo; echo bash > /workspace/back.txt"})
        assert status == 200 and ex["status"] == "ok", ex
        assert ex["stdout"].strip() == "from python"
        ex = execute(sid, "print(open('/workspace/back.txt').read().strip())", session_id=py2["id"])
        assert ex["stdout"] == "bash\n" and ex["session_id"] == py2["id"]
        # language= picks the sandbox's session of that language.
        ex = execute(sid, "echo $((6 * 7))", language="bash")
        assert ex["stdout"] == "42\n" and ex["session_id"] == sh["id"]
    finally:
        for session in (py2, sh):
            status, body = gateway.request("DELETE", f"/v1/sessions/{session['id']}")
            assert status == 204
    status, body = gateway.request("POST", f"/v1/sessions/{sh['id']}/execute", {"input": "echo 1"})
    assert status == 404 and body["error"] == "not_found"
    status, body = gateway.request("DELETE", f"/v1/sessions/{sh['id']}")
    assert status == 404


def test_terminal_session_through_rest(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    sid = python_sandbox["id"]
    status, term = gateway.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "terminal"})
    assert status == 201, term
    validate(term, "Session")
    assert term["type"] == "terminal" and term["sandbox_id"] == sid
    try:
        status, out = gateway.request("POST", f"/v1/sessions/{term['id']}/execute",
                                      {"input": "echo hi-$((1 + 2)); pwd\n", "timeout_s": 2})
        assert status == 200 and set(out) == {"output"}, out
        assert "hi-3" in out["output"] and "/workspace" in out["output"]
    finally:
        assert gateway.request("DELETE", f"/v1/sessions/{term['id']}")[0] == 204
    status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "terminal", "language": "bash"})
    assert status == 400 and body["error"] == "invalid_request"


# -- logs and metrics -----------------------------------------------------------------------------------------

def test_logs_have_lifecycle_lines(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    sid = python_sandbox["id"]
    status, body = gateway.request("GET", f"/v1/sandboxes/{sid}/logs?lines=2000")
    assert status == 200
    validate(body, "Logs")
    text = "\n".join(body["lines"])
    assert f"sandbox {sid} running" in text
    assert re.search(r"kernel \S+ \(python\) started", text)
    status, body = gateway.request("GET", f"/v1/sandboxes/{sid}/logs?lines=1")
    assert status == 200 and len(body["lines"]) == 1


def test_metrics_have_every_field(gateway: Gateway, python_sandbox: dict[str, Any], execute: Any) -> None:
    sid = python_sandbox["id"]
    execute(sid, "x = sum(range(2_000_000))")
    status, m = gateway.request("GET", f"/v1/sandboxes/{sid}/metrics")
    assert status == 200
    validate(m, "Metrics")
    assert set(m) == {"cpu_seconds", "cpu_percent", "memory_bytes", "memory_peak_bytes", "memory_limit_bytes",
                      "pids", "pids_limit", "disk_bytes", "disk_limit_bytes", "oom_kills", "net_rx_bytes",
                      "net_tx_bytes"}
    assert m["net_rx_bytes"] == m["net_tx_bytes"] == 0  # no network policy, no proxy
    limits = python_sandbox["limits"]
    assert m["cpu_seconds"] > 0 and m["cpu_percent"] >= 0
    assert 0 < m["memory_bytes"] <= m["memory_limit_bytes"] == limits["memory_mb"] * MiB
    assert m["memory_peak_bytes"] >= m["memory_bytes"]
    assert 1 <= m["pids"] <= m["pids_limit"] == limits["pids"]
    assert 0 <= m["disk_bytes"] < m["disk_limit_bytes"] == limits["disk_mb"] * MiB
    assert m["oom_kills"] == 0


# -- tenants --------------------------------------------------------------------------------------------------

def test_tenants_cannot_see_each_other(gateway: Gateway, python_sandbox: dict[str, Any]) -> None:
    sid = python_sandbox["id"]
    session_id = python_sandbox["sessions"][0]["id"]
    status, accepted = gateway.request("POST", f"/v1/sandboxes/{sid}/executions", {"code": "1"})
    assert status == 202
    bob = gateway.other_token
    status, body = gateway.request("GET", "/v1/sandboxes", token=bob)
    assert status == 200 and body == {"sandboxes": []}
    attempts: list[tuple[str, str, Any]] = [
        ("GET", f"/v1/sandboxes/{sid}", None),
        ("DELETE", f"/v1/sandboxes/{sid}", None),
        ("POST", f"/v1/sandboxes/{sid}/execute", {"code": "1"}),
        ("POST", f"/v1/sandboxes/{sid}/executions", {"code": "1"}),
        ("GET", f"/v1/executions/{accepted['id']}", None),
        ("POST", f"/v1/executions/{accepted['id']}/interrupt", None),
        ("POST", f"/v1/sandboxes/{sid}/commands", {"command": "id"}),
        ("PUT", f"/v1/sandboxes/{sid}/files/bob.txt", b"bob"),
        ("GET", f"/v1/sandboxes/{sid}/files/x.txt", None),
        ("GET", f"/v1/sandboxes/{sid}/files?list=1", None),
        ("GET", f"/v1/sandboxes/{sid}/files/?list=1", None),
        ("DELETE", f"/v1/sandboxes/{sid}/files/x.txt", None),
        ("POST", f"/v1/sandboxes/{sid}/sessions", {"type": "jupyter"}),
        ("GET", f"/v1/sessions/{session_id}", None),
        ("POST", f"/v1/sessions/{session_id}/execute", {"input": "1"}),
        ("DELETE", f"/v1/sessions/{session_id}", None),
        ("GET", f"/v1/sandboxes/{sid}/logs?lines=5", None),
        ("GET", f"/v1/sandboxes/{sid}/metrics", None),
    ]
    for method, path, body in attempts:
        if isinstance(body, bytes):
            status, answer = gateway.request(method, path, raw=body, token=bob)
        else:
            status, answer = gateway.request(method, path, body, token=bob)
        assert status == 404, (method, path, status, answer)
        assert answer["error"] == "not_found"
    # Nothing of bob's attempts reached alice's sandbox.
    status, info = gateway.request("GET", f"/v1/sandboxes/{sid}")
    assert status == 200 and info["state"] == "running"
    assert session_id in [s["id"] for s in info["sessions"]]
    status, listing = gateway.request("GET", f"/v1/sandboxes/{sid}/files?list=1")
    assert "bob.txt" not in [e["name"] for e in listing["entries"]]


def test_per_tenant_cap_answers_429() -> None:
    gw = Gateway(extra_args=["--max-sandboxes", "1"])
    try:
        status, first = gw.request("POST", "/v1/sandboxes", {"template": "python"})
        assert status == 201
        status, body = gw.request("POST", "/v1/sandboxes", {"template": "python"})
        assert status == 429 and body["error"] == "quota_exceeded" and body["message"]
        # The cap is per tenant: bob still may.
        status, bobs = gw.request("POST", "/v1/sandboxes", {"template": "python"}, token=gw.other_token)
        assert status == 201
        for sandbox, token in ((first, gw.token), (bobs, gw.other_token)):
            assert gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}", token=token)[0] == 204
        status, again = gw.request("POST", "/v1/sandboxes", {"template": "python"})
        assert status == 201
        assert gw.request("DELETE", f"/v1/sandboxes/{again['id']}")[0] == 204
    finally:
        gw.stop()


# -- the OpenAPI document -------------------------------------------------------------------------------------

def _openapi_path(pattern: str) -> str:
    return re.sub(r"\(\[\^/\]\+\)|\(\.\*\)", "{}", pattern).replace("\\.", ".")


def test_openapi_describes_every_route(gateway: Gateway) -> None:
    status, doc = gateway.request("GET", "/v1/openapi.json", token=None)
    assert status == 200 and doc == OPENAPI
    assert doc["openapi"].startswith("3.1")
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer" and schemes["token_query"]["in"] == "query"
    described = {re.sub(r"\{[^}]+\}", "{}", path): ops for path, ops in doc["paths"].items()}
    for module in (rest, streams):
        for spec in module.default_handlers:
            pattern, handler = spec[0], spec[1]
            path = _openapi_path(pattern)
            assert path in described, f"{pattern} is missing from openapi.json"
            # Methods defined by kernelhub's handlers, inherited ones included (the websocket's GET is the base's).
            methods = {m for base in handler.__mro__ if base.__module__.startswith("kernelhub.handlers")
                       for m in ("get", "post", "put", "delete") if m in vars(base)}
            assert methods, pattern
            for method in methods:
                assert method in described[path], f"{method.upper()} {pattern} is not described"
    for name in ("Sandbox", "Session", "Execution", "Metrics", "Error", "Limits"):
        assert name in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["operationId"] and op["responses"], (path, method)
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):
        target: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        assert isinstance(target, dict), ref
