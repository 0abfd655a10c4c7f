"""The command routes against a real gateway: background commands that outlive their connection and are
re-attached from another one, NDJSON streams, stdin, signals and kills by pid, the /stream websocket's command
messages, errors, tenants and the OpenAPI shapes."""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from kernelhub.testing import Gateway
from tests.handlers.conftest import NdjsonStream
from tests.handlers.test_rest import validate

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


@pytest.fixture(scope="module")
def sid(sandboxes: Any) -> str:
    return str(sandboxes("python")["id"])


def path(sid: str, *parts: object) -> str:
    return "/".join([f"/v1/sandboxes/{sid}/commands", *map(str, parts)])


def until(event_type: str, events: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    got = []
    for event in events:
        got.append(event)
        if event["type"] == event_type:
            return got
    raise AssertionError(f"no {event_type} event in {got}")


def wait_ended(gateway: Gateway, sid: str, pid: int, timeout: float = 60) -> dict[str, Any]:
    """The command once it ended: polled, since nothing else tells a third party."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, cmd = gateway.request("GET", path(sid, pid))
        assert status == 200, cmd
        if cmd["status"] == "exited":
            return dict(cmd)
        time.sleep(0.05)
    raise AssertionError(f"command {pid} still runs after {timeout} s")


def follow(gateway: Gateway, sid: str, pid: int, query: str = "follow=1") -> NdjsonStream:
    stream = NdjsonStream.__new__(NdjsonStream)
    stream.conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    stream.conn.request("GET", f"{path(sid, pid)}?{query}", headers={"Authorization": f"Bearer {gateway.token}"})
    stream.response = stream.conn.getresponse()
    assert stream.response.status == 200, stream.response.read()
    assert stream.response.getheader("Content-Type", "").startswith("application/x-ndjson")
    return stream


def test_background_command_outlives_its_connection_and_is_reattached(gateway: Gateway, sid: str,
                                                                      ndjson: Any) -> None:
    stream = ndjson("POST", path(sid), {"command": "echo first; read x; echo then $x; exit 4", "background": True,
                                        "stdin_open": True})
    assert stream.response.status == 200
    events = stream.events()
    start, out = until("stdout", events)
    assert start["type"] == "start" and start["command"]["background"] and start["command"]["status"] == "running"
    validate(start["command"], "Command")
    pid = start["pid"]
    assert out == {"type": "stdout", "pid": pid, "text": "first\n"}
    stream.close()  # the client goes away: a background command carries on

    status, listed = gateway.request("GET", path(sid))
    assert status == 200 and pid in [c["pid"] for c in listed["commands"] if c["status"] == "running"]
    again = follow(gateway, sid, pid)
    replay = again.events()
    assert [e["type"] for e in until("stdout", replay)] == ["start", "stdout"]  # since the start: "first"
    status, cmd = gateway.request("POST", path(sid, pid, "stdin"), {"data_base64": base64.b64encode(b"B\n").decode(),
                                                                   "eof": True})
    assert status == 200 and cmd["stdin_open"] is False
    rest = until("end", replay)
    assert [e.get("text") for e in rest if e["type"] == "stdout"] == ["then B\n"]
    assert rest[-1]["command"]["exit_code"] == 4 and rest[-1]["command"]["status"] == "exited"
    validate(rest[-1]["command"], "Command")
    again.close()
    # Live only: an ended command's follower gets its start and its end.
    live = follow(gateway, sid, pid, "follow=1&replay=0")
    assert [e["type"] for e in live.events()] == ["start", "end"]
    live.close()


def test_background_answers_at_once_and_its_routes(gateway: Gateway, sid: str) -> None:
    began = time.monotonic()
    status, cmd = gateway.request("POST", path(sid), {"command": "trap 'echo term; exit 9' TERM; echo up; "
                                                      "while :; do sleep 0.05; done", "background": True,
                                                      "timeout_s": 600, "tag": "loop"})
    assert status == 202 and time.monotonic() - began < 10, cmd
    validate(cmd, "Command")
    pid = cmd["pid"]
    assert cmd["tag"] == "loop" and cmd["timeout_s"] == 600 and cmd["status"] == "running"
    status, got = gateway.request("POST", path(sid, pid, "stdin"), {"data": "x"})
    assert status == 409 and got["error"] == "conflict", got  # its stdin was never open
    status, got = gateway.request("POST", path(sid, pid, "signal"), {"signal": "SIGWINCH"})
    assert status == 400 and "signal must be one of" in got["message"]
    stream = follow(gateway, sid, pid)
    until("stdout", stream.events())
    status, got = gateway.request("POST", path(sid, pid, "signal"), {"signal": "TERM"})
    assert status == 200 and got == {"pid": pid, "signalled": got["signalled"]} and got["signalled"] >= 1
    end = until("end", stream.events())[-1]
    assert end["command"]["exit_code"] == 9
    stream.close()

    status, cmd = gateway.request("POST", path(sid), {"command": "sleep 1000 & sleep 1001", "background": True})
    status, killed = gateway.request("DELETE", path(sid, cmd["pid"]))
    assert status == 200 and killed["reason"] == "killed" and killed["exit_code"] == 137
    status, got = gateway.request("DELETE", path(sid, cmd["pid"]))
    assert status == 409, got
    status, ps = gateway.request("POST", path(sid), {"command": "ps -eo args"})
    assert "sleep 100" not in ps["stdout"]


def test_foreground_streams_as_ndjson_and_dies_with_its_client(gateway: Gateway, sid: str, ndjson: Any) -> None:
    stream = ndjson("POST", path(sid), {"command": "echo out; echo err >&2; exit 2"})
    events = list(stream.events())
    assert [e["type"] for e in events] == ["start", "stdout", "stderr", "end"] or \
        [e["type"] for e in events] == ["start", "stderr", "stdout", "end"]
    assert events[-1]["command"]["exit_code"] == 2 and not events[-1]["command"]["background"]

    stream = ndjson("POST", path(sid), {"command": "echo started; exec sleep 1000"})
    start, _ = until("stdout", stream.events())
    stream.close()
    ended = wait_ended(gateway, sid, start["pid"])
    assert ended["reason"] == "cancelled" and ended["exit_code"] == 137

    # The JSON answer: its client going away kills it too.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    conn.request("POST", path(sid), json.dumps({"command": "echo $$ > /tmp/fg.pid; exec sleep 1000"}),
                 {"Authorization": f"Bearer {gateway.token}", "Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    pid = None
    while pid is None and time.monotonic() < deadline:
        status, listed = gateway.request("GET", path(sid))
        running = [c for c in listed["commands"] if c["status"] == "running" and "fg.pid" in (c["command"] or "")]
        pid = running[0]["pid"] if running else None
        time.sleep(0.02)
    assert pid is not None
    conn.close()
    assert wait_ended(gateway, sid, pid)["reason"] == "cancelled"


def test_command_routes_refuse_bad_input_and_other_tenants(gateway: Gateway, sid: str) -> None:
    for body, words in (({"command": "true", "background": "yes"}, "background must be"),
                        ({"command": "true", "stdin_open": True}, "apply to background"),
                        ({"command": "true", "bogus": 1}, "Unknown field"),
                        ({"command": ""}, "non-empty"),
                        ({"command": "true", "background": True, "timeout_s": -1}, "positive"),
                        ({"command": "echo \ud800"}, "surrogate"),
                        ({"command": "true", "background": True, "cwd": "/tmp/\udc80"}, "surrogate")):
        status, got = gateway.request("POST", path(sid), body)
        assert status == 400 and words in got["message"], (body, got)
    status, cmd = gateway.request("POST", path(sid), {"command": "exec sleep 1000", "background": True})
    pid = cmd["pid"]
    try:
        for method, route, body in (("GET", path(sid, pid), None), ("DELETE", path(sid, pid), None),
                                    ("POST", path(sid, pid, "stdin"), {"data": "x"}),
                                    ("POST", path(sid, pid, "signal"), {"signal": "KILL"}),
                                    ("GET", path(sid), None), ("POST", path(sid), {"command": "id"})):
            status, got = gateway.request(method, route, body, token=gateway.other_token)
            assert status == 404 and got["error"] == "not_found", (route, got)
        status, got = gateway.request("GET", path(sid, 999999))
        assert status == 404 and "No command with pid" in got["message"]
        status, got = gateway.request("POST", path(sid, pid, "stdin"), {"data": "x", "data_base64": "eA=="})
        assert status == 400
        status, got = gateway.request("POST", path(sid, pid, "stdin"), {"data_base64": "***"})
        assert status == 400 and "base64" in got["message"]
    finally:
        gateway.request("DELETE", path(sid, pid))


def recv(conn: ClientConnection) -> dict[str, Any]:
    message = json.loads(conn.recv(timeout=60))
    assert isinstance(message, dict)
    return message


def recv_until(conn: ClientConnection, kind: str, request_id: Any) -> list[dict[str, Any]]:
    got = []
    while True:
        message = recv(conn)
        if message.get("request_id") == request_id:
            got.append(message)
            if message["type"] in (kind, "rejected"):
                return got


def test_stream_websocket_command_messages(gateway: Gateway, sid: str) -> None:
    url = f"ws://127.0.0.1:{gateway.port}/v1/sandboxes/{sid}/stream"
    headers = {"Authorization": f"Bearer {gateway.token}"}
    with connect(url, additional_headers=headers, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "command", "command": "echo hi; read x; echo got $x", "background": True,
                            "stdin_open": True, "request_id": "a"}))
        start, out = recv_until(ws, "stdout", "a")
        pid = start["pid"]
        assert start["type"] == "start" and out["text"] == "hi\n" and out["pid"] == pid
        # A second socket re-attaches and gets the output since the start.
        with connect(url, additional_headers=headers, open_timeout=30) as other:
            other.send(json.dumps({"type": "command_attach", "pid": pid, "request_id": 7}))
            assert [m["type"] for m in recv_until(other, "stdout", 7)] == ["start", "stdout"]
            ws.send(json.dumps({"type": "command_stdin", "pid": pid, "data": "there\n", "eof": True}))
            rest = recv_until(other, "end", 7)
            assert rest[0]["text"] == "got there\n" and rest[-1]["command"]["exit_code"] == 0
        assert recv_until(ws, "end", "a")[-1]["type"] == "end"
        for message, words in (({"type": "command_signal", "pid": pid, "signal": "TERM"}, "already ended"),
                               ({"type": "command_attach", "pid": 999999}, "No command"),
                               ({"type": "command", "command": 3}, "command must be")):
            ws.send(json.dumps({**message, "request_id": "bad"}))
            rejected = recv(ws)
            assert rejected["type"] == "rejected" and words in rejected["message"], rejected
        # A foreground command started from a socket dies with it; a background one does not.
        ws.send(json.dumps({"type": "command", "command": "exec sleep 1000", "request_id": "fg"}))
        ws.send(json.dumps({"type": "command", "command": "exec sleep 1001", "background": True,
                            "request_id": "bg"}))
        foreground = recv_until(ws, "start", "fg")[-1]["pid"]
        background = recv_until(ws, "start", "bg")[-1]["pid"]
    assert wait_ended(gateway, sid, foreground)["reason"] == "cancelled"
    status, cmd = gateway.request("GET", path(sid, background))
    assert cmd["status"] == "running"
    gateway.request("DELETE", path(sid, background))
