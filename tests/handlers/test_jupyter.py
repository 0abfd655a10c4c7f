"""The Jupyter API (``kernelhub/handlers/jupyter/``) against a real gateway with real kernels in sandboxes:
every route's shape (Jupyter Server's), tenants kept apart, and the websocket in both framings, checked with
Jupyter Server's own (de)serializers so that the bytes are what Jupyter clients expect.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin, Subprotocol

from kernelhub.handlers import jupyter as jupyter_handlers
from kernelhub.testing import Gateway

pytestmark = [
    pytest.mark.root,
    pytest.mark.bwrap,
    pytest.mark.cgroups,
    # jupyter_server (a test dependency, imported only for its reference serializers) may warn on import.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_server.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_events.*"),
]

V1 = "v1.kernel.websocket.jupyter.org"
ISO_MICRO_Z = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$"


def reference_serializers() -> Any:
    from jupyter_server.services.kernels.connection import base

    return base


# -- helpers -------------------------------------------------------------------------------------------------


def start_kernel(gw: Gateway, name: str = "kernelhub-python", token: str | None = "default") -> dict[str, Any]:
    status, model = gw.request("POST", "/api/kernels", {"name": name}, token=token)
    assert status == 201, model
    return model


def ws_url(gw: Gateway, kernel_id: str, session_id: str | None = None) -> str:
    return (gw.url.replace("http://", "ws://", 1) + f"/api/kernels/{kernel_id}/channels"
            + f"?session_id={session_id or uuid.uuid4().hex}")


def ws_connect(gw: Gateway, kernel_id: str, *, token: str | None = None, v1: bool = False,
               session_id: str | None = None) -> ClientConnection:
    headers = {"Authorization": f"token {token or gw.token}"}
    return connect(ws_url(gw, kernel_id, session_id), additional_headers=headers, open_timeout=30,
                   subprotocols=[Subprotocol(V1)] if v1 else None, max_size=2**26)


def new_msg(msg_type: str, content: dict[str, Any], session: Session | None = None) -> dict[str, Any]:
    """A message as a frontend builds it: it does not know the kernel's key, so it signs nothing."""
    return (session or Session()).msg(msg_type, content=content)


def execute_request(code: str, **extra: Any) -> dict[str, Any]:
    return new_msg("execute_request", {"code": code, "silent": False, "store_history": True,
                                       "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
                                       **extra})


def send_legacy(ws: ClientConnection, msg: dict[str, Any], channel: str = "shell") -> None:
    ws.send(json.dumps({**msg, "channel": channel}, default=json_default))


def send_v1(ws: ClientConnection, msg: dict[str, Any], channel: str = "shell") -> None:
    parts = [json.dumps(msg[k], default=json_default).encode()
             for k in ("header", "parent_header", "metadata", "content")]
    ws.send(reference_serializers().serialize_msg_to_ws_v1(parts, channel))


def recv_legacy(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    if isinstance(data, bytes):
        msg: dict[str, Any] = reference_serializers().deserialize_binary_message(data)
        return msg
    msg = json.loads(data)
    assert "buffers" not in msg or msg["buffers"] == []
    return msg


def recv_v1(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    data = ws.recv(timeout=timeout)
    assert isinstance(data, bytes), "v1 messages are binary"
    channel, parts = reference_serializers().deserialize_msg_from_ws_v1(data)
    header, parent, metadata, content = (json.loads(p) for p in parts[:4])
    return {"channel": channel, "header": header, "parent_header": parent, "metadata": metadata,
            "content": content, "msg_type": header["msg_type"], "buffers": parts[4:]}


def run(ws: ClientConnection, msg: dict[str, Any], *, v1: bool = False, channel: str = "shell",
        send: bool = True, timeout: float = 60) -> list[dict[str, Any]]:
    """Send ``msg`` (unless already sent) and collect every message answering it until both its reply and
    its ``idle`` arrived."""
    if send:
        (send_v1 if v1 else send_legacy)(ws, msg, channel)
    recv = recv_v1 if v1 else recv_legacy
    msg_id = msg["header"]["msg_id"]
    got: list[dict[str, Any]] = []
    replied = idle = False
    deadline = time.monotonic() + timeout
    while not (replied and idle):
        left = deadline - time.monotonic()
        assert left > 0, f"no reply to {msg['msg_type']} in {timeout}s; got {[m['msg_type'] for m in got]}"
        m = recv(ws, left)
        if m["parent_header"].get("msg_id") != msg_id:
            continue
        got.append(m)
        if m["channel"] == channel and m["msg_type"].endswith("_reply"):
            replied = True
        if m["channel"] == "iopub" and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    return got


def run_all(ws: ClientConnection, msgs: list[dict[str, Any]], *, v1: bool = False,
            timeout: float = 30) -> dict[str, list[dict[str, Any]]]:
    """Send every message at once (shell), then collect what answers each, until each has its reply and idle;
    keyed by msg_id."""
    for msg in msgs:
        (send_v1 if v1 else send_legacy)(ws, msg)
    recv = recv_v1 if v1 else recv_legacy
    got: dict[str, list[dict[str, Any]]] = {m["header"]["msg_id"]: [] for m in msgs}
    pending = {msg_id: {"reply", "idle"} for msg_id in got}
    deadline = time.monotonic() + timeout
    while any(pending.values()):
        left = deadline - time.monotonic()
        assert left > 0, f"unanswered after {timeout}s: {pending}"
        m = recv(ws, left)
        msg_id = m["parent_header"].get("msg_id")
        if msg_id not in got:
            continue
        got[msg_id].append(m)
        if m["channel"] == "shell" and m["msg_type"].endswith("_reply"):
            pending[msg_id].discard("reply")
        if m["channel"] == "iopub" and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            pending[msg_id].discard("idle")
    return got


def stdout(msgs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in msgs
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def reply(msgs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(m for m in msgs if m["channel"] == "shell")


def wait_for(check: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def kernel(gateway: Gateway) -> Iterator[dict[str, Any]]:
    model = start_kernel(gateway)
    yield model
    gateway.request("DELETE", f"/api/kernels/{model['id']}")


# -- REST --------------------------------------------------------------------------------------------------


def test_api_version_needs_no_token(gateway: Gateway) -> None:
    status, body = gateway.request("GET", "/api", token=None)
    assert status == 200
    assert set(body) == {"version"} and body["version"].count(".") == 2


def test_every_other_route_needs_a_token(gateway: Gateway, kernel: dict[str, Any]) -> None:
    for method, path in [("GET", "/api/kernelspecs"), ("GET", "/api/kernelspecs/kernelhub-python"),
                         ("GET", "/kernelspecs/kernelhub-python/logo-64x64.png"), ("GET", "/api/kernels"),
                         ("POST", "/api/kernels"), ("GET", f"/api/kernels/{kernel['id']}"),
                         ("DELETE", f"/api/kernels/{kernel['id']}"),
                         ("POST", f"/api/kernels/{kernel['id']}/interrupt"),
                         ("POST", f"/api/kernels/{kernel['id']}/restart")]:
        status, body = gateway.request(method, path, token=None, raw=b"" if method == "POST" else None)
        assert status == 401, (method, path, status)
        assert body["error"] == "unauthorized"
    # An empty "token " header is a missing token.
    status, _ = gateway.request("GET", "/api/kernels", token=None, headers={"Authorization": "token "})
    assert status == 401
    status, _ = gateway.request("GET", "/api/kernels", token="wrong-token")
    assert status == 401


def test_kernelspecs(gateway: Gateway) -> None:
    status, body = gateway.request("GET", "/api/kernelspecs")
    assert status == 200
    assert body["default"] == "kernelhub-python"
    specs = body["kernelspecs"]
    assert {"kernelhub-python", "kernelhub-javascript", "kernelhub-typescript", "kernelhub-bash"} <= set(specs)
    python = specs["kernelhub-python"]
    assert python["name"] == "kernelhub-python"
    assert python["spec"]["language"] == "python"
    assert python["spec"]["display_name"]
    assert isinstance(python["spec"]["argv"], list)
    assert python["resources"] == {"logo-32x32": "/kernelspecs/kernelhub-python/logo-32x32.png",
                                   "logo-64x64": "/kernelspecs/kernelhub-python/logo-64x64.png"}
    status, one = gateway.request("GET", "/api/kernelspecs/kernelhub-python")
    assert status == 200 and one == python
    status, err = gateway.request("GET", "/api/kernelspecs/no-such-kernel")
    assert status == 404 and err["error"] == "not_found"


def test_kernelspec_logo(gateway: Gateway) -> None:
    status, png = gateway.request("GET", "/kernelspecs/kernelhub-python/logo-64x64.png")
    assert status == 200
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    status, head = gateway.request("HEAD", "/kernelspecs/kernelhub-bash/logo-32x32.png")
    assert status == 200 and head == b""
    # ?token= works as well: an <img> cannot send headers.
    status, _ = gateway.request("GET", f"/kernelspecs/kernelhub-python/logo-32x32.png?token={gateway.token}",
                                token=None)
    assert status == 200


@pytest.mark.parametrize("path", [
    "/kernelspecs/kernelhub-python/..%2Fkernelhub-bash%2Fkernel.json",
    "/kernelspecs/kernelhub-python/%2E%2E%2F%2E%2E%2F__init__.py",
    "/kernelspecs/kernelhub-python/..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/kernelspecs/kernelhub-python/%2Fetc%2Fpasswd",
    "/kernelspecs/kernelhub-python/.",
    "/kernelspecs/kernelhub-python/",
    "/kernelspecs/kernelhub-python/no-such-logo.png",
    "/kernelspecs/no-such-kernel/logo-64x64.png",
])
def test_kernelspec_files_refuse_traversal(gateway: Gateway, path: str) -> None:
    status, body = gateway.request("GET", path)
    assert status == 404, (path, status, body)
    assert b"root:" not in json.dumps(body).encode()


def test_kernel_lifecycle(gateway: Gateway) -> None:
    status, model = gateway.request("POST", "/api/kernels", {"name": "kernelhub-python", "path": "nb/x.ipynb",
                                                             "env": {"KERNEL_USERNAME": "alice"}})
    assert status == 201, model
    assert set(model) == {"id", "name", "last_activity", "execution_state", "connections"}
    kernel_id = model["id"]
    assert uuid.UUID(kernel_id)  # Jupyter Server's routes only match UUIDs
    assert model["name"] == "kernelhub-python"
    assert model["execution_state"] in ("idle", "starting", "busy")
    assert model["connections"] == 0
    assert re.match(ISO_MICRO_Z, model["last_activity"])
    try:
        status, listed = gateway.request("GET", "/api/kernels")
        assert status == 200 and isinstance(listed, list)
        assert kernel_id in [k["id"] for k in listed]
        status, one = gateway.request("GET", f"/api/kernels/{kernel_id}")
        assert status == 200 and one["id"] == kernel_id and one["name"] == "kernelhub-python"
        status, body = gateway.request("POST", f"/api/kernels/{kernel_id}/interrupt", raw=b"")
        assert (status, body) == (204, b"")
        status, restarted = gateway.request("POST", f"/api/kernels/{kernel_id}/restart", raw=b"{}",
                                            headers={"Content-Type": "application/json"})
        assert status == 200 and restarted["id"] == kernel_id
        assert set(restarted) == set(model)
        # The restarted kernel answers, and got the KERNEL_* variable (and nothing else) from the request.
        with ws_connect(gateway, kernel_id) as ws:
            msgs = run(ws, execute_request("import os; print(os.environ.get('KERNEL_USERNAME'))"))
        assert stdout(msgs) == "alice\n"
    finally:
        status, body = gateway.request("DELETE", f"/api/kernels/{kernel_id}")
    assert (status, body) == (204, b"")
    status, err = gateway.request("GET", f"/api/kernels/{kernel_id}")
    assert status == 404 and err["error"] == "not_found"
    assert kernel_id not in [k["id"] for k in gateway.request("GET", "/api/kernels")[1]]
    status, _ = gateway.request("DELETE", f"/api/kernels/{kernel_id}")
    assert status == 404


def test_post_kernel_defaults_and_errors(gateway: Gateway) -> None:
    # No body: the default kernelspec. The answer says where the kernel lives, as Jupyter Server's does.
    req = urllib.request.Request(gateway.url + "/api/kernels", data=b"", method="POST",
                                 headers={"Authorization": f"Bearer {gateway.token}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        status, location, model = resp.status, resp.headers["Location"], json.loads(resp.read())
    assert status == 201 and model["name"] == "kernelhub-python"
    assert location == f"/api/kernels/{model['id']}"
    assert gateway.request("DELETE", location)[0] == 204
    status, err = gateway.request("POST", "/api/kernels", {"name": "no-such-kernel"})
    assert status == 404 and err["error"] == "not_found"
    status, err = gateway.request("POST", "/api/kernels", {"name": 7})
    assert status == 400 and err["error"] == "invalid_request"
    status, err = gateway.request("POST", "/api/kernels", raw=b"{not json",
                                  headers={"Content-Type": "application/json"})
    assert status == 400
    status, err = gateway.request("POST", "/api/kernels", {"env": ["KERNEL_X"]})
    assert status == 400


def test_tenants_do_not_see_each_others_kernels(gateway: Gateway, kernel: dict[str, Any]) -> None:
    kid = kernel["id"]
    bob = gateway.other_token
    status, listed = gateway.request("GET", "/api/kernels", token=bob)
    assert status == 200 and kid not in [k["id"] for k in listed]
    for method, path in [("GET", f"/api/kernels/{kid}"), ("DELETE", f"/api/kernels/{kid}"),
                         ("POST", f"/api/kernels/{kid}/interrupt"), ("POST", f"/api/kernels/{kid}/restart")]:
        status, body = gateway.request(method, path, token=bob, raw=b"" if method == "POST" else None)
        assert status == 404, (method, path)
        assert body["error"] == "not_found"
    with pytest.raises(InvalidStatus) as info:
        ws_connect(gateway, kid, token=bob)
    assert info.value.response.status_code == 404
    # Alice's kernel is untouched.
    status, model = gateway.request("GET", f"/api/kernels/{kid}")
    assert status == 200 and model["execution_state"] != "dead"


def test_websocket_needs_a_token(gateway: Gateway, kernel: dict[str, Any]) -> None:
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(gateway, kernel["id"]), open_timeout=30)
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        ws_connect(gateway, "0000-no-such-kernel")
    assert info.value.response.status_code == 404
    # A browser from another origin may not open it.
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(gateway, kernel["id"]), open_timeout=30, origin=Origin("http://evil.example"),
                additional_headers={"Authorization": f"token {gateway.token}"})
    assert info.value.response.status_code == 403
    # ?token= works for websockets (browsers cannot set headers on them).
    with connect(ws_url(gateway, kernel["id"]) + f"&token={gateway.token}", open_timeout=30) as ws:
        assert run(ws, new_msg("kernel_info_request", {}))


# -- websocket ---------------------------------------------------------------------------------------------


def test_legacy_framing_execute(gateway: Gateway, kernel: dict[str, Any]) -> None:
    with ws_connect(gateway, kernel["id"]) as ws:
        assert ws.subprotocol is None
        wait_for(lambda: gateway.request("GET", f"/api/kernels/{kernel['id']}")[1]["connections"] == 1,
                 what="connections == 1")
        msgs = run(ws, execute_request("print(6*7)\n6*7"))
        assert stdout(msgs) == "42\n"
        assert reply(msgs)["msg_type"] == "execute_reply"
        assert reply(msgs)["content"]["status"] == "ok"
        result = next(m for m in msgs if m["msg_type"] == "execute_result")
        assert result["channel"] == "iopub" and result["content"]["data"]["text/plain"] == "42"
        # Jupyter Server's shape: the message plus its channel.
        assert {"header", "parent_header", "metadata", "content", "channel", "msg_id", "msg_type"} <= set(result)
        # An error comes back as such, with its traceback (a drop-in hides nothing the kernel says).
        msgs = run(ws, execute_request("1/0"))
        assert reply(msgs)["content"]["status"] == "error"
        err = next(m for m in msgs if m["msg_type"] == "error")
        assert err["content"]["ename"] == "ZeroDivisionError" and err["content"]["traceback"]
    wait_for(lambda: gateway.request("GET", f"/api/kernels/{kernel['id']}")[1]["connections"] == 0,
             what="connections == 0")


def test_legacy_binary_buffers_both_ways(gateway: Gateway, kernel: dict[str, Any]) -> None:
    code = ("from comm import create_comm\n"
            "c = create_comm(target_name='kh-test', data={'x': 1}, buffers=[b'abc', b'\\x00\\xff'])\n")
    with ws_connect(gateway, kernel["id"]) as ws:
        msgs = run(ws, execute_request(code))
        assert reply(msgs)["content"]["status"] == "ok", reply(msgs)
        opened = next(m for m in msgs if m["msg_type"] == "comm_open")
        assert [bytes(b) for b in opened["buffers"]] == [b"abc", b"\x00\xff"]
        assert opened["content"]["data"] == {"x": 1}
        # A client message with buffers, in the legacy binary framing, reaches the kernel with them.
        comm_id = opened["content"]["comm_id"]
        setup = execute_request(
            "got = []\nc.on_msg(lambda m: got.append([bytes(b) for b in m['buffers']]))")
        run(ws, setup)
        comm_msg = new_msg("comm_msg", {"comm_id": comm_id, "data": {}})
        comm_msg["channel"] = "shell"
        comm_msg["buffers"] = [b"xyz"]
        ws.send(reference_serializers().serialize_binary_message(comm_msg))
        deadline = time.monotonic() + 30
        while True:
            msgs = run(ws, execute_request("print(got)"))
            if stdout(msgs) != "[]\n" or time.monotonic() > deadline:
                break
        assert stdout(msgs) == "[[b'xyz']]\n"


def test_v1_protocol_execute(gateway: Gateway, kernel: dict[str, Any]) -> None:
    with ws_connect(gateway, kernel["id"], v1=True) as ws:
        assert ws.subprotocol == V1
        msg = execute_request("import sys; print(6*7); print('oops', file=sys.stderr)")
        msgs = run(ws, msg, v1=True)
        assert stdout(msgs) == "42\n"
        assert any(m["msg_type"] == "stream" and m["content"]["name"] == "stderr" for m in msgs)
        assert reply(msgs)["msg_type"] == "execute_reply" and reply(msgs)["content"]["status"] == "ok"
        # control channel too
        msg = new_msg("kernel_info_request", {})
        info = run(ws, msg, v1=True, channel="control")
        assert any(m["channel"] == "control" and m["msg_type"] == "kernel_info_reply" for m in info)


def test_stdin_round_trip(gateway: Gateway, kernel: dict[str, Any]) -> None:
    with ws_connect(gateway, kernel["id"]) as ws:
        msg = execute_request("name = input('who? ')\nprint('hello', name)", allow_stdin=True)

        send_legacy(ws, msg)
        # The input_request's parent is the execute_request; answer it on stdin.
        deadline = time.monotonic() + 30
        while True:
            m = recv_legacy(ws, deadline - time.monotonic())
            if m["channel"] == "stdin" and m["msg_type"] == "input_request":
                assert m["content"]["prompt"] == "who? "
                break
        send_legacy(ws, new_msg("input_reply", {"value": "kernelhub"}), channel="stdin")
        msgs = run(ws, msg, send=False)
        assert stdout(msgs) == "hello kernelhub\n"


def test_two_connections_each_get_their_replies(gateway: Gateway, kernel: dict[str, Any]) -> None:
    with ws_connect(gateway, kernel["id"]) as a, ws_connect(gateway, kernel["id"], v1=True) as b:
        wait_for(lambda: gateway.request("GET", f"/api/kernels/{kernel['id']}")[1]["connections"] == 2,
                 what="connections == 2")
        msg = execute_request("print('from a')")
        assert stdout(run(a, msg)) == "from a\n"
        # b sees a's output on iopub (broadcast) but never a's shell reply.
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                m = recv_v1(b, 0.5)
            except TimeoutError:
                break
            seen.append(m)
        assert all(m["channel"] == "iopub" for m in seen if m["parent_header"].get("msg_id") == msg["msg_id"])


def test_same_session_id_replaces_the_stale_connection(gateway: Gateway, kernel: dict[str, Any]) -> None:
    sid = uuid.uuid4().hex
    with ws_connect(gateway, kernel["id"], session_id=sid) as old:
        with ws_connect(gateway, kernel["id"], session_id=sid) as new:
            with pytest.raises(ConnectionClosed):
                for _ in range(1000):
                    old.recv(timeout=10)
            msg = execute_request("print('still here')")
            assert stdout(run(new, msg)) == "still here\n"


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_requests_sent_the_instant_the_socket_opens_are_answered(gateway: Gateway, v1: bool) -> None:
    """What JupyterLab does on opening a notebook (and "Run All"): kernel_info_request and an execute_request
    the moment the socket is open, on a kernel that has just started, then again right after a restart. A
    reply that came in while the next request went out used to be lost for good on that connection (the cell
    stayed ``[ ]``): eight connections in a row, each with a fresh shell socket."""
    kid = start_kernel(gateway)["id"]
    try:
        for i in range(8):
            with ws_connect(gateway, kid, v1=v1) as ws:
                info, ex = new_msg("kernel_info_request", {}), execute_request(f"print({i})")
                got = run_all(ws, [info, ex], v1=v1)
                assert reply(got[info["header"]["msg_id"]])["msg_type"] == "kernel_info_reply"
                assert stdout(got[ex["header"]["msg_id"]]) == f"{i}\n"
                assert reply(got[ex["header"]["msg_id"]])["content"]["status"] == "ok"
        with ws_connect(gateway, kid, v1=v1) as ws:
            for i in range(3):
                status, _ = gateway.request("POST", f"/api/kernels/{kid}/restart", raw=b"")
                assert status == 200
                info, ex = new_msg("kernel_info_request", {}), execute_request(f"print('after {i}')")
                got = run_all(ws, [info, ex], v1=v1)
                assert stdout(got[ex["header"]["msg_id"]]) == f"after {i}\n"
            # And a connection opened right after a restart.
            status, _ = gateway.request("POST", f"/api/kernels/{kid}/restart", raw=b"")
            assert status == 200
            with ws_connect(gateway, kid, v1=v1) as fresh:
                ex = execute_request("print('fresh')")
                assert stdout(run_all(fresh, [ex], v1=v1)[ex["header"]["msg_id"]]) == "fresh\n"
    finally:
        gateway.request("DELETE", f"/api/kernels/{kid}")


def test_restart_and_interrupt_while_connected(gateway: Gateway) -> None:
    model = start_kernel(gateway)
    kid = model["id"]
    try:
        with ws_connect(gateway, kid) as ws:
            msg = execute_request("x = 1\nimport time\nprint('sleeping', flush=True)\ntime.sleep(60)")
            send_legacy(ws, msg)
            deadline = time.monotonic() + 30
            while True:
                m = recv_legacy(ws, deadline - time.monotonic())
                if m["msg_type"] == "stream":
                    break
            wait_for(lambda: gateway.request("GET", f"/api/kernels/{kid}")[1]["execution_state"] == "busy",
                     what="busy")
            status, _ = gateway.request("POST", f"/api/kernels/{kid}/interrupt", raw=b"")
            assert status == 204
            msgs = run(ws, msg, send=False, timeout=30)
            assert reply(msgs)["content"]["status"] == "error"
            assert reply(msgs)["content"]["ename"] == "KeyboardInterrupt"
            wait_for(lambda: gateway.request("GET", f"/api/kernels/{kid}")[1]["execution_state"] == "idle",
                     what="idle")

            status, _ = gateway.request("POST", f"/api/kernels/{kid}/restart", raw=b"")
            assert status == 200
            states = []
            deadline = time.monotonic() + 10
            while "restarting" not in states and time.monotonic() < deadline:
                m = recv_legacy(ws, deadline - time.monotonic())
                if m["msg_type"] == "status":
                    states.append(m["content"]["execution_state"])
            assert "restarting" in states
            # Same websocket, fresh kernel: x is gone.
            msgs = run(ws, execute_request("print('x' in globals())"), timeout=30)
            assert stdout(msgs) == "False\n"
    finally:
        gateway.request("DELETE", f"/api/kernels/{kid}")


def test_a_dead_kernel_is_restarted(gateway: Gateway) -> None:
    model = start_kernel(gateway)
    kid = model["id"]
    try:
        with ws_connect(gateway, kid) as ws:
            send_legacy(ws, execute_request("import os; os._exit(1)"))
            states = []
            deadline = time.monotonic() + 20
            while "restarting" not in states:
                m = recv_legacy(ws, deadline - time.monotonic())
                if m["msg_type"] == "status":
                    states.append(m["content"]["execution_state"])
            msgs = run(ws, execute_request("print('back')"), timeout=30)
            assert stdout(msgs) == "back\n"
    finally:
        gateway.request("DELETE", f"/api/kernels/{kid}")


def test_deleting_the_kernel_closes_its_websockets(gateway: Gateway) -> None:
    model = start_kernel(gateway)
    with ws_connect(gateway, model["id"]) as ws:
        status, _ = gateway.request("DELETE", f"/api/kernels/{model['id']}")
        assert status == 204
        with pytest.raises(ConnectionClosed):
            for _ in range(1000):
                ws.recv(timeout=10)


def test_framings_match_jupyter_server() -> None:
    """The copied helpers stay byte-for-byte Jupyter Server's."""
    ref = reference_serializers()
    parts = [b'{"msg_type": "x"}', b"{}", b"{}", b'{"a": 1}', b"\x00buf"]
    assert jupyter_handlers.serialize_msg_to_ws_v1(parts, "iopub") == ref.serialize_msg_to_ws_v1(parts, "iopub")
    assert jupyter_handlers.deserialize_msg_from_ws_v1(ref.serialize_msg_to_ws_v1(parts, "shell")) == \
        ("shell", parts)
    msg = {"header": {"msg_id": "1"}, "parent_header": {}, "metadata": {}, "content": {}, "buffers": [b"ab"]}
    assert jupyter_handlers.serialize_binary_message(msg) == ref.serialize_binary_message(msg)
    back = jupyter_handlers.deserialize_binary_message(ref.serialize_binary_message(msg))
    assert back["buffers"] == [b"ab"] and back["header"] == {"msg_id": "1"}


@pytest.mark.parametrize("name", ["kernelhub-python", "kernelhub-javascript", "kernelhub-typescript",
                                  "kernelhub-bash"])
def test_a_reconnect_with_the_same_session_id_is_answered(gateway: Gateway, name: str) -> None:
    """What JupyterLab does after a failed first handshake: a second websocket with the same session id while
    the first is still open (60 ms later), then kernel_info_request on the new one. Each connection's sockets
    used the session id as their ZeroMQ identity, and the new ones connected before the stale ones closed:
    ipykernel hands the identity over (ZMQ_ROUTER_HANDOVER), tslab never answered the new connection."""
    kid = start_kernel(gateway, name)["id"]
    try:
        sid = uuid.uuid4().hex
        with ws_connect(gateway, kid, session_id=sid) as old:
            time.sleep(0.06)
            with ws_connect(gateway, kid, session_id=sid) as new:
                info = run(new, new_msg("kernel_info_request", {}), timeout=30)
                assert reply(info)["msg_type"] == "kernel_info_reply"
                with pytest.raises(ConnectionClosed):
                    for _ in range(1000):
                        old.recv(timeout=10)
    finally:
        gateway.request("DELETE", f"/api/kernels/{kid}")
