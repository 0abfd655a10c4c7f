"""The kernel channel is untrusted input (SECURITY.md pitfall 12; issue 9 item 2), attacked through a real gateway.

The attacker is the code in the sandbox: it holds its kernel's HMAC key and writes on the kernel's own iopub
socket (:data:`PRELUDE`), so it can send any message, correctly signed or not, with buffers that point at
``mmap``\\ ed memory it never touched. Each attack runs through the gateway's surfaces (REST, NDJSON, the /stream
websocket, the Jupyter API's websocket in both framings, the E2B interpreter, MCP) and the test asserts the safe
outcome: the gateway's memory stays within a few hundred MiB (its peak RSS, read from /proc), the execution ends
with a clear reason, the kernel is restarted (or interrupted and kept) with the reason in ``sandbox_logs``, the
answer is held to ``output_mb``, and the gateway log gets a line a minute, not a traceback a message.

A gateway of its own for the module, so that its log and its memory are this module's alone.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import connect

from kernelhub.handlers.e2b.base import INTERPRETER_PORT
from kernelhub.testing import FORGE_PRELUDE, Gateway

pytestmark = [
    pytest.mark.root,
    pytest.mark.bwrap,
    pytest.mark.cgroups,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_server.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_events.*"),
]

MiB = 1024 * 1024
#: How much the gateway's peak RSS may grow over a whole attack ("a few hundred MiB" at most).
RSS_ALLOWANCE = 300 * MiB

#: Defines ``_forge(...)`` in a python kernel: see :data:`kernelhub.testing.FORGE_PRELUDE`.
PRELUDE = FORGE_PRELUDE
#: One message with a 1 GiB buffer nobody touched (free for the sandbox, 2 GiB of gateway RSS before).
HUGE_FRAME = PRELUDE + "_forge('display_data', {'data': {}, 'metadata': {}}, " \
                       "buffers=[memoryview(_mmap.mmap(-1, 1 << 30))])\nprint('sent')"
#: One message of 200 frames that all point at the same untouched 8 MiB (1.6 GB in all): under ZMQ_MAXMSGSIZE
#: each, and allocated whole by libzmq before anyone reads it.
MANY_FRAMES = PRELUDE + "_m = memoryview(_mmap.mmap(-1, 8 << 20))\n" \
                        "_forge('display_data', {'data': {}, 'metadata': {}}, buffers=[_m] * 200)\nprint('sent')"
#: Messages just under the gateway's bound on one message (16 MiB and an envelope), without end, ignoring
#: interrupts.
NEAR_MAX_FLOOD = PRELUDE + """
_m = memoryview(_mmap.mmap(-1, 16 << 20))
for _i in range(1000):
    try:
        _forge('display_data', {'data': {}, 'metadata': {}}, buffers=[_m])
    except KeyboardInterrupt:
        pass
"""


def peak_rss(gw: Gateway) -> int:
    with open(f"/proc/{gw.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def baseline(gw: Gateway) -> int:
    """The gateway's peak RSS with a sandbox running, before any attack."""
    status, sandbox = gw.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, sandbox
    gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")
    return peak_rss(gw)


@pytest.fixture
def sandbox(gw: Gateway) -> Iterator[dict[str, Any]]:
    status, body = gw.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, body
    yield body
    gw.request("DELETE", f"/v1/sandboxes/{body['id']}")


def execute(gw: Gateway, sandbox_id: str, code: str, **fields: Any) -> dict[str, Any]:
    status, ex = gw.request("POST", f"/v1/sandboxes/{sandbox_id}/execute", {"code": code, **fields}, timeout=180)
    assert status == 200, ex
    return ex


def logs(gw: Gateway, sandbox_id: str) -> str:
    status, body = gw.request("GET", f"/v1/sandboxes/{sandbox_id}/logs?lines=200")
    assert status == 200, body
    return "\n".join(body["lines"])


def assert_restarted_for(gw: Gateway, sandbox_id: str, what: str) -> None:
    """The sandbox's log says the kernel sent ``what`` and is restarted for it (said before the answer)."""
    text = logs(gw, sandbox_id)
    assert re.search(rf"kernel: the kernel sent {what}.*; restarting it", text), text[-3000:]


def assert_still_works(gw: Gateway, sandbox_id: str) -> None:
    ex = execute(gw, sandbox_id, "print(6 * 7)")
    assert (ex["status"], ex["stdout"]) == ("ok", "42\n"), ex


# -- huge frames -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("attack", "what"), [
    (HUGE_FRAME, "a message of at least 1073742"),
    (MANY_FRAMES, "a message of at least"),
], ids=["one-1GiB-frame", "200-frames-of-8MiB"])
def test_a_huge_message_restarts_the_kernel_and_costs_the_gateway_nothing(
        gw: Gateway, baseline: int, sandbox: dict[str, Any], attack: str, what: str) -> None:
    ex = execute(gw, sandbox["id"], "kept = 1\n" + attack)
    assert (ex["status"], ex["reason"], ex["truncated"]) == ("killed", "output_truncated", True), ex
    assert ex["error"]["name"] == "OutputLimitExceeded" and "restarted" in ex["error"]["value"], ex["error"]
    assert ex["stdout"] == ""
    assert_restarted_for(gw, sandbox["id"], what)
    assert peak_rss(gw) - baseline < RSS_ALLOWANCE
    # A fresh kernel (the attacker's state is gone), which works.
    assert execute(gw, sandbox["id"], "print('kept' in globals())")["stdout"] == "False\n"


def test_a_flood_of_near_max_messages_is_stopped_at_the_cap_then_the_kernel_restarted(
        gw: Gateway, baseline: int, sandbox: dict[str, Any]) -> None:
    started = time.monotonic()
    ex = execute(gw, sandbox["id"], NEAR_MAX_FLOOD, timeout_s=120)
    # Stopped at the output cap (the first message alone is over 10 MiB); the kernel ignored the interrupt and
    # sent on, past twice the cap: restarted at once, not at the end of the interrupt's grace.
    assert (ex["status"], ex["reason"], ex["truncated"]) == ("error", "output_truncated", True), ex
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 30
    while "kernel restarted (the kernel sent more than" not in logs(gw, sandbox["id"]):
        assert time.monotonic() < deadline, logs(gw, sandbox["id"])[-3000:]
        time.sleep(0.1)
    assert peak_rss(gw) - baseline < RSS_ALLOWANCE
    assert_still_works(gw, sandbox["id"])


def ndjson_events(gw: Gateway, sandbox_id: str, code: str) -> list[dict[str, Any]]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=180)
    try:
        conn.request("POST", f"/v1/sandboxes/{sandbox_id}/execute", json.dumps({"code": code}),
                     {"Authorization": f"Bearer {gw.token}", "Accept": "application/x-ndjson",
                      "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        return [json.loads(line) for line in response.read().splitlines()]
    finally:
        conn.close()


def stream_events(gw: Gateway, sandbox_id: str, code: str) -> list[dict[str, Any]]:
    url = gw.url.replace("http", "ws") + f"/v1/sandboxes/{sandbox_id}/stream"
    events = []
    with connect(url, additional_headers={"Authorization": f"Bearer {gw.token}"}, open_timeout=30,
                 max_size=2**26) as ws:
        ws.send(json.dumps({"type": "execute", "code": code, "request_id": "r"}))
        while True:
            event = json.loads(ws.recv(timeout=180))
            events.append(event)
            if event["type"] == "end":
                return events


def mcp_execute(gw: Gateway, sandbox_id: str, code: str) -> dict[str, Any]:
    status, answer = gw.request("POST", "/mcp", {
        "jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "code_execute", "arguments": {"sandbox_id": sandbox_id, "code": code}}},
        headers={"Accept": "application/json, text/event-stream"}, timeout=180)
    assert status == 200, answer
    lines = [json.loads(line[5:]) for line in answer.decode().splitlines() if line.startswith("data:")]
    result: dict[str, Any] = lines[-1]["result"]["structuredContent"]
    return result


@pytest.mark.parametrize("surface", ["ndjson", "stream", "mcp"])
def test_a_huge_frame_through_every_execution_surface(gw: Gateway, baseline: int, sandbox: dict[str, Any],
                                                      surface: str) -> None:
    if surface == "ndjson":
        events = ndjson_events(gw, sandbox["id"], HUGE_FRAME)
        end = events[-1]["execution"]
        assert [e["type"] for e in events] == ["start", "error", "end"], events
    elif surface == "stream":
        events = stream_events(gw, sandbox["id"], HUGE_FRAME)
        end = events[-1]["execution"]
    else:
        end = mcp_execute(gw, sandbox["id"], HUGE_FRAME)
    assert (end["status"], end["reason"]) == ("killed", "output_truncated"), end
    assert_restarted_for(gw, sandbox["id"], "a message of at least")
    assert peak_rss(gw) - baseline < RSS_ALLOWANCE
    assert_still_works(gw, sandbox["id"])


def test_a_huge_frame_through_the_e2b_interpreter(gw: Gateway, baseline: int) -> None:
    import urllib.request

    status, created = gw.request("POST", "/e2b/v2/sandboxes", {"templateID": "code-interpreter-v1"},
                                 token=None, headers={"X-API-Key": gw.token})
    assert status == 201, created
    try:
        request = urllib.request.Request(
            gw.url + "/e2b/execute", data=json.dumps({"code": HUGE_FRAME}).encode(), method="POST",
            headers={"E2b-Sandbox-Id": created["sandboxID"], "E2b-Sandbox-Port": str(INTERPRETER_PORT),
                     "X-Access-Token": created["envdAccessToken"], "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=180) as answer:
            lines = [json.loads(line) for line in answer.read().splitlines()]
        assert [line["type"] for line in lines] == ["error", "number_of_executions", "end_of_execution"], lines
        assert lines[0]["name"] == "OutputLimitExceeded"
        assert_restarted_for(gw, created["sandboxID"], "a message of at least")
        assert peak_rss(gw) - baseline < RSS_ALLOWANCE
    finally:
        gw.request("DELETE", f"/e2b/sandboxes/{created['sandboxID']}", token=None, headers={"X-API-Key": gw.token})


# -- the Jupyter API's websocket relay ---------------------------------------------------------------------------


def jupyter_execute(code: str, session: Any) -> dict[str, Any]:
    msg: dict[str, Any] = session.msg("execute_request", {
        "code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
        "stop_on_error": True})
    return msg


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
@pytest.mark.parametrize("attack", [HUGE_FRAME, MANY_FRAMES, NEAR_MAX_FLOOD], ids=["huge", "frames", "flood"])
def test_the_jupyter_relay_never_passes_on_or_holds_a_huge_message(gw: Gateway, baseline: int, v1: bool,
                                                                   attack: str) -> None:
    from jupyter_client.jsonutil import json_default
    from jupyter_client.session import Session
    from jupyter_server.services.kernels.connection.base import (
        deserialize_binary_message,
        deserialize_msg_from_ws_v1,
        serialize_msg_to_ws_v1,
    )
    from websockets.typing import Subprotocol

    status, kernel = gw.request("POST", "/api/kernels", {"name": "kernelhub-python"})
    assert status == 201, kernel
    url = gw.url.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels?session_id={uuid.uuid4().hex}"
    session = Session()

    def send(ws: Any, msg: dict[str, Any]) -> None:
        if v1:
            parts = [json.dumps(msg[k], default=json_default).encode()
                     for k in ("header", "parent_header", "metadata", "content")]
            ws.send(serialize_msg_to_ws_v1(parts, "shell"))
        else:
            ws.send(json.dumps({**msg, "channel": "shell"}, default=json_default))

    def recv(ws: Any, timeout: float) -> tuple[dict[str, Any], int]:
        data = ws.recv(timeout=timeout)
        if v1:
            channel, parts = deserialize_msg_from_ws_v1(data)
            return {"channel": channel, "header": json.loads(parts[0]), "parent_header": json.loads(parts[1]),
                    "content": json.loads(parts[3])}, len(data)
        if isinstance(data, bytes):
            return deserialize_binary_message(data), len(data)
        return json.loads(data), len(data)

    try:
        with connect(url, additional_headers={"Authorization": f"token {gw.token}"}, open_timeout=30,
                     subprotocols=[Subprotocol("v1.kernel.websocket.jupyter.org")] if v1 else None,
                     max_size=2**27) as ws:
            msg = jupyter_execute(attack, session)
            send(ws, msg)
            largest = 0
            # The kernel is restarted under the client: the relay's sockets reconnect to the new one.
            kernel_id = kernel["id"]
            status, record = gw.request("GET", "/v1/sandboxes")
            sandbox_id = next(s["id"] for s in record["sandboxes"]
                              if any(se.get("kernel_id") == kernel_id for se in s["sessions"]))
            deadline = time.monotonic() + 90
            while "kernel restarted (the kernel sent" not in logs(gw, sandbox_id):  # restarted, not just said
                assert time.monotonic() < deadline, logs(gw, sandbox_id)[-3000:]
                try:
                    _, size = recv(ws, 0.5)  # and look at the log again
                    largest = max(largest, size)
                except TimeoutError:
                    pass
            # Nothing near the attack's size reached the client (a near-max message may, once: it is within
            # bounds), and the gateway held none of it.
            assert largest <= 17 * MiB
            assert peak_rss(gw) - baseline < RSS_ALLOWANCE
            check = jupyter_execute("print('back')", session)
            send(ws, check)
            deadline = time.monotonic() + 60
            out = ""
            while out != "back\n":
                assert time.monotonic() < deadline, out
                got, _ = recv(ws, 60)
                if got["parent_header"].get("msg_id") == check["header"]["msg_id"] and \
                        got["header"]["msg_type"] == "stream":
                    out += got["content"]["text"]
    finally:
        gw.request("DELETE", f"/api/kernels/{kernel['id']}")


# -- everything stored counts ------------------------------------------------------------------------------------


STORED_ATTACKS = {
    # 150 displays with 1 MiB of metadata each: 150 MB kept before.
    "metadata": "import IPython.display as d\n"
                "for i in range(150): d.publish_display_data({'text/plain': 'x'}, metadata={'m': 'y' * (1 << 20)})",
    # 150 displays whose MIME type is 1 MiB long.
    "mime_key": "import IPython.display as d\nfor i in range(150): d.publish_display_data({'k' * (1 << 20): 'x'})",
    # An exception whose message is 30 MB (and its traceback as much again): kept whole before.
    "exception": "raise ValueError('z' * 30_000_000)",
    # Display updates of 1 MiB each, replacing one result.
    "updates": "import IPython.display as d\nh = d.display('start', display_id=True)\n"
               "for i in range(150): h.update({'text/plain': 'u' * (1 << 20)}, raw=True)",
    # A kernel message type the gateway does not keep, 1 MiB each (received, parsed and dropped).
    "unkept": PRELUDE + "for i in range(150): _forge('clear_output', {'wait': False, 'junk': 'j' * (1 << 20)})",
}


@pytest.mark.parametrize("attack", sorted(STORED_ATTACKS))
def test_everything_kept_or_received_counts_against_output_mb(gw: Gateway, attack: str) -> None:
    status, sandbox = gw.request("POST", "/v1/sandboxes", {"template": "python", "limits": {"output_mb": 1}})
    assert status == 201, sandbox
    try:
        status, raw = gw.request("POST", f"/v1/sandboxes/{sandbox['id']}/execute",
                                 raw=json.dumps({"code": STORED_ATTACKS[attack], "timeout_s": 120}).encode(),
                                 headers={"Content-Type": "application/json", "Accept": "application/json"},
                                 timeout=180)
        assert status == 200
        ex = raw if isinstance(raw, dict) else json.loads(raw)
        size = len(json.dumps(ex))
        assert size < 2 * MiB, (attack, size)
        assert ex["truncated"] is True and ex["reason"] == "output_truncated", {k: ex[k] for k in ("status", "reason")}
        status, again = gw.request("GET", f"/v1/executions/{ex['id']}")
        assert status == 200 and len(json.dumps(again)) < 2 * MiB
        assert_still_works(gw, sandbox["id"])
    finally:
        gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")


def test_stored_output_is_capped_on_the_streams_too(gw: Gateway) -> None:
    status, sandbox = gw.request("POST", "/v1/sandboxes", {"template": "python", "limits": {"output_mb": 1}})
    assert status == 201, sandbox
    try:
        for events in (ndjson_events(gw, sandbox["id"], STORED_ATTACKS["metadata"]),
                       stream_events(gw, sandbox["id"], STORED_ATTACKS["mime_key"])):
            assert len(json.dumps(events)) < 3 * MiB
            assert events[-1]["execution"]["reason"] == "output_truncated"
        assert mcp_execute(gw, sandbox["id"], STORED_ATTACKS["exception"])["reason"] == "output_truncated"
    finally:
        gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")


# -- malformed messages ------------------------------------------------------------------------------------------


MALFORMED = PRELUDE + """
import json as _json
for _i in range(4000):
    _kind = _i % 4
    if _kind == 0:    # a wrong signature
        _forge('stream', {'name': 'stdout', 'text': 'forged\\n'}, signature=b'0' * 64)
    elif _kind == 1:  # not JSON
        _forge('stream', {}, parts=[b'{not json', b'{}', b'{}', b'{}'])
    elif _kind == 2:  # a type no kernel sends
        _forge('no_such_type', {'a': 1})
    else:             # content that is not an object
        _forge('stream', {}, parts=[_s.pack(_s.msg_header('stream')), _s.pack(_k.get_parent()['header']),
                                    b'{}', b'[1, 2, 3]'])
print('done')
"""


def test_malformed_messages_are_dropped_with_a_log_line_a_minute(gw: Gateway, sandbox: dict[str, Any]) -> None:
    with open(gw.log_path, errors="replace") as f:
        before = len(f.read())
    ex = execute(gw, sandbox["id"], MALFORMED, timeout_s=120)
    # (Its own "done" may be lost: the kernel's iopub socket drops what a subscriber has not read in time.)
    assert ex["status"] == "ok", ex
    with open(gw.log_path, errors="replace") as f:
        added = f.read()[before:]
    assert "Traceback" not in added, added[:3000]
    dropped = [line for line in added.splitlines() if "dropped" in line and sandbox["id"] in line]
    assert 1 <= len(dropped) <= 2, added[:3000]
    assert len(added) < 20_000, len(added)
    assert_still_works(gw, sandbox["id"])


# -- the other way: a kernel that stops reading --------------------------------------------------------------------


def test_a_kernel_that_stops_reading_holds_back_its_client_not_the_gateway(gw: Gateway, baseline: int) -> None:
    """The kernel is stopped (SIGSTOP, from a command in its sandbox) and its client sends 8 MiB messages without
    end: the gateway queues a few for the kernel and then stops reading the client, whose sends wait in its own
    buffers."""
    import threading

    from jupyter_client.session import Session
    from jupyter_server.services.kernels.connection.base import serialize_binary_message

    status, kernel = gw.request("POST", "/api/kernels", {"name": "kernelhub-python"})
    assert status == 201, kernel
    url = gw.url.replace("http", "ws") + f"/api/kernels/{kernel['id']}/channels?session_id={uuid.uuid4().hex}"
    session = Session()
    try:
        with connect(url, additional_headers={"Authorization": f"token {gw.token}"}, open_timeout=30,
                     max_size=2**27) as ws:
            ask = jupyter_execute("import os\nprint(os.getpid())", session)
            ws.send(json.dumps({**ask, "channel": "shell"}, default=str))
            deadline = time.monotonic() + 30
            while True:
                got = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if got["msg_type"] == "stream" and got["parent_header"].get("msg_id") == ask["header"]["msg_id"]:
                    pid = int(got["content"]["text"])
                    break
            # The kernel's own sandbox stops it (SIGSTOP: alive, reading nothing).
            sandbox_id = next(s["id"] for s in gw.request("GET", "/v1/sandboxes")[1]["sandboxes"]
                              if any(se.get("kernel_id") == kernel["id"] for se in s["sessions"]))
            status, result = gw.request("POST", f"/v1/sandboxes/{sandbox_id}/commands",
                                        {"command": f"kill -STOP {pid}"})
            assert status == 200 and result["exit_code"] == 0, result
            payload = b"\0" * (8 * MiB)
            sent = 0
            done = threading.Event()

            def flood() -> None:
                nonlocal sent
                try:
                    while sent < 200 and not done.is_set():
                        msg = session.msg("comm_msg", {"comm_id": "x", "data": {}})
                        ws.send(serialize_binary_message({**msg, "channel": "shell", "buffers": [payload]}))
                        sent += 1
                except Exception:  # noqa: BLE001 - the socket closed under the sender at the end
                    pass

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            sender.join(10)
            done.set()
            # The sender is stuck well before 200 messages (1.6 GB): the gateway holds a few of them at most.
            assert sent < 50, sent
            assert peak_rss(gw) - baseline < RSS_ALLOWANCE
            # Deleting the kernel frees the gateway's side at once (and the blocked sender with it).
            assert gw.request("DELETE", f"/api/kernels/{kernel['id']}")[0] == 204
    finally:
        gw.request("DELETE", f"/api/kernels/{kernel['id']}")


# -- many small messages -----------------------------------------------------------------------------------------

#: issue 9's flood of small messages (each under the envelope that output caps do not count): status messages for
#: requests nobody made, as fast as ipykernel's own session sends them, for 10 s.
SMALL_FLOOD = """
import time as _time
_k = get_ipython().kernel
_n = 0
_end = _time.monotonic() + 10
while _time.monotonic() < _end:
    _k.session.send(_k.iopub_socket, 'status', {'execution_state': 'busy'}, parent={'msg_id': 'zz%d' % _n})
    _n += 1
"""
#: The same from a thread, between cells: it starts once the test has put the file ``go`` in the workspace, after
#: the cell that started it has ended (no cell runs then, whatever the machine's load).
SMALL_FLOOD_THREAD = (
    "import threading as _threading, os as _os, time as _clock\ndef _flood():\n"
    "    while not _os.path.exists('/workspace/go'):\n        _clock.sleep(0.01)\n"
    + "".join(f"    {line}\n" for line in SMALL_FLOOD.strip().splitlines())
    + "_threading.Thread(target=_flood).start()\n")
#: A gateway whose kernels may send 1,000 messages a second in bursts of 5,000 (the defaults are 10,000 and
#: 100,000, just above what honest kernels send: see kernelhub.sandbox.channel_guard.MESSAGES_PER_S), so that the
#: flood is past it whatever the load of the machine running the test.
RATE_ARGS = ["--SandboxFactory.kernel_messages_per_s=1000", "--SandboxFactory.kernel_message_burst=5000"]


@pytest.fixture(scope="module")
def rated() -> Iterator[Gateway]:
    own = Gateway(extra_args=RATE_ARGS)
    try:
        yield own
    finally:
        own.stop()


def wait_for_log(gw: Gateway, sandbox_id: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in logs(gw, sandbox_id):
        assert time.monotonic() < deadline, logs(gw, sandbox_id)[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("when", ["in-a-cell", "between-cells"])
def test_a_flood_of_small_messages_restarts_the_kernel(rated: Gateway, when: str) -> None:
    status, sandbox = rated.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, sandbox
    try:
        started = time.monotonic()
        if when == "in-a-cell":
            ex = execute(rated, sandbox["id"], "kept = 1\n" + SMALL_FLOOD, timeout_s=120)
            # Ended as a byte flood ends: the kernel is restarted, the execution killed for its output.
            assert (ex["status"], ex["reason"], ex["truncated"]) == ("killed", "output_truncated", True), ex
            assert ex["error"]["name"] == "OutputLimitExceeded" and "restarted" in ex["error"]["value"], ex
            assert time.monotonic() - started < 10  # stopped, not run on to the flood's own end
        else:
            ex = execute(rated, sandbox["id"], "kept = 1\n" + SMALL_FLOOD_THREAD)
            assert ex["status"] == "ok", ex
            started = time.monotonic()
            assert rated.request("PUT", f"/v1/sandboxes/{sandbox['id']}/files/go", raw=b"")[0] == 201
            wait_for_log(rated, sandbox["id"], "kernel restarted (the kernel sent more than 5000 messages")
            assert time.monotonic() - started < 10
        assert_restarted_for(rated, sandbox["id"], "more than 5000 messages at more than 1000 a second")
        assert execute(rated, sandbox["id"], "print('kept' in globals())")["stdout"] == "False\n"
    finally:
        rated.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")


#: The busiest honest kernels measured (kernelhub.sandbox.channel_guard.MESSAGES_PER_S): a message a line, for a
#: few seconds each, at the default bound.
HONEST = {
    "python": "import sys\nfor i in range(30000):\n    print(i, flush=True)\n"
              "    sys.stderr.write('e\\n'); sys.stderr.flush()",
    "node": "for (let i = 0; i < 20000; i++) { console.log(i); "
            "if (i % 100 == 0) await new Promise(r => setTimeout(r)) }",
    "bash": "seq 1 300000",
}


@pytest.mark.parametrize("language", sorted(HONEST))
def test_honest_kernels_printing_a_line_a_message_stay_within_the_rate(gw: Gateway, language: str) -> None:
    status, sandbox = gw.request("POST", "/v1/sandboxes", {"template": "node" if language == "node" else language,
                                                           "limits": {"output_mb": 100}})
    assert status == 201, sandbox
    try:
        ex = execute(gw, sandbox["id"], HONEST[language], timeout_s=170)
        assert (ex["status"], ex["truncated"]) == ("ok", False), {k: ex[k] for k in ("status", "reason", "error")}
        assert "messages at more than" not in logs(gw, sandbox["id"])
    finally:
        gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")
