"""Fuzzing the websockets with malformed frames (issue 7, item 8): each answers in its own protocol's way and
the gateway keeps serving.

- ``/v1/sandboxes/{id}/stream``: every frame it cannot act on (not JSON, not an object, binary, nested too
  deep, wrong types in any field...) is answered ``{"type": "rejected", request_id, error, message}`` and the
  same connection still runs code;
- ``/v1/sessions/{id}/terminal``: a frame that is not a terminado message closes the socket with 4400 and a
  sentence; terminado messages with values it cannot use are ignored, and the terminal carries on;
- ``/api/kernels/{id}/channels``: a frame that is not a Jupyter message in the connection's framing closes it
  with 1007 and a reason (both framings; made-up counts and offsets in binary frames included), a message for a
  channel a client may not write is dropped, and the kernel answers the next connection.

Frames over a socket's size limit close it with 1009. Hypothesis draws frames (derandomized, bounded); the
gateway's log must show no traceback.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from kernelhub.handlers.base import MAX_JSON_BODY

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

SETTINGS = settings(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.generate, Phase.shrink])

#: Frames no websocket here can act on.
MALFORMED_TEXT = ["", " ", "not json", "null", "[]", "{}", "[1, 2]", '"execute"', "[" * 100_000, '{"a":' * 3000,
                  '{"a":' * 70 + "1" + "}" * 70, '{"type": NaN}', '{"type": "execute", "code": 1e999}',
                  '{"type": "execute", "code": "1", "timeout_s": ' + "9" * 5000 + "}", '{"type": "\\ud800"}',
                  '{"type": "execute"} trailing', "\x00\x01", "\u2028"]
MALFORMED_BINARY = [b"", b"\x00", b"{}", b'{"type": "execute", "code": "1"}', b"\xff" * 64, bytes(range(256))]
WRONG = [None, True, -1, 0, 2**62, 1.5, "", "x" * 5000, "\x00", [], [1], {}, {"a": {"b": {}}}, {"A": 1},
         {"BAD NAME": "x"}, "senope", "exnope"]


def ws_url(fuzz: Any, path: str) -> str:
    return fuzz.gw.url.replace("http://", "ws://", 1) + path


def open_ws(fuzz: Any, path: str, **kwargs: Any) -> ClientConnection:
    return connect(ws_url(fuzz, path), additional_headers={"Authorization": f"Bearer {fuzz.token}"},
                   open_timeout=30, max_size=2**27, **kwargs)


def closed_with(conn: ClientConnection, timeout: float = 30) -> tuple[int, str]:
    """Read until the server closes; its close code and reason."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            conn.recv(timeout=max(0.1, deadline - time.monotonic()))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code, closed.rcvd.reason
    except TimeoutError:
        raise AssertionError("the socket was not closed") from None


def refuses_oversized(conn: ClientConnection, frame: str | bytes) -> None:
    """Send a frame over the socket's limit: the gateway closes the socket (1009 "message too big"; tornado then
    drops the connection, so the close frame itself may be lost to the reset of the unread rest)."""
    try:
        conn.send(frame)
        conn.recv(timeout=30)
    except ConnectionClosed as closed:
        assert closed.rcvd is None or closed.rcvd.code == 1009, closed
    except TimeoutError:
        raise AssertionError("an oversized frame was taken") from None
    else:
        raise AssertionError("an oversized frame was answered")


HANDSHAKE = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Version", b"13"),
             (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==")]


def test_handshakes_refused_before_the_upgrade_answer_json(fuzz: Any, assert_error_body: Any) -> None:
    """A whole handshake to an id of the wrong shape, or with a query that is not UTF-8, is an HTTP error
    with a sentence, never an opened-then-dropped socket or a traceback after the upgrade."""
    since = len(fuzz.log())
    auth = [(b"Authorization", f"Bearer {fuzz.token}".encode())]
    cases = [(b"/v1/sandboxes/%FF/stream", 400), (b"/v1/sandboxes/sbnope/stream", 404),
             (b"/v1/sessions/%FF/terminal", 400), (b"/api/kernels/%s/channels?session_id=%%FF" % fuzz.kernel.encode(),
                                                   400),
             (b"/api/kernels/nope/channels", 404), (b"/v1/sandboxes/%s/stream?x=%%FF" % fuzz.sandbox.encode(), 101)]
    for target, status in cases:
        answer = fuzz.raw(b"GET", target, auth + HANDSHAKE)
        assert answer.status == status, (target, answer.status, answer.body)
        if status != 101:
            assert_error_body(answer.json(), repr(target))
    fuzz.assert_log_clean(since)


# -- /v1/sandboxes/{id}/stream ---------------------------------------------------------------------------------


@pytest.fixture
def stream(fuzz: Any) -> Iterator[ClientConnection]:
    with open_ws(fuzz, f"/v1/sandboxes/{fuzz.sandbox}/stream") as conn:
        yield conn


class StreamChecker:
    """Sends a frame then a sentinel, and reads the events up to the sentinel's rejection: every rejection is
    of the protocol's shape, and a frame that is not a JSON object got one before the sentinel's."""

    def __init__(self, conn: ClientConnection, assert_error_body: Any) -> None:
        self.conn = conn
        self.check_error = assert_error_body
        self.sent = 0

    def send(self, frame: str | bytes, *, malformed: bool) -> None:
        self.sent += 1
        sentinel = f"sentinel-{self.sent}"
        self.conn.send(frame)
        self.conn.send(json.dumps({"type": "nothing", "request_id": sentinel}))
        rejected_before = 0
        while True:
            event = json.loads(self.conn.recv(timeout=60))
            assert isinstance(event, dict) and "type" in event, event
            if event["type"] != "rejected":
                continue  # an execution a valid frame started: its events are not checked here
            assert set(event) == {"type", "request_id", "error", "message"}, event
            self.check_error({"error": event["error"], "message": event["message"]}, repr(frame)[:200])
            if event["request_id"] == sentinel:
                break
            rejected_before += 1
        if malformed:
            assert rejected_before >= 1, f"no rejection for {frame[:200]!r}"


@st.composite
def stream_messages(draw: st.DrawFn, fuzz_ids: dict[str, str]) -> dict[str, Any]:
    kind = draw(st.sampled_from(["execute", "execute", "interrupt", "input", "bogus", 5, None, ["execute"]]))
    msg: dict[str, Any] = {"type": kind}
    plausible = {"code": "1", "session_id": fuzz_ids["session"], "language": "python", "timeout_s": 5,
                 "env": {"A": "b"}, "request_id": "r", "execution_id": fuzz_ids["execution"], "value": "v"}
    for field in draw(st.lists(st.sampled_from([*plausible, "surprise"]), max_size=5, unique=True)):
        if field in plausible and draw(st.booleans()):
            msg[field] = plausible[field]
        else:
            msg[field] = draw(st.sampled_from(WRONG))
    return msg


def test_stream_rejects_every_malformed_frame(fuzz: Any, stream: ClientConnection, assert_error_body: Any) -> None:
    since = len(fuzz.log())
    checker = StreamChecker(stream, assert_error_body)
    for frame in MALFORMED_TEXT:
        checker.send(frame, malformed=True)
    for data in MALFORMED_BINARY:
        checker.send(data, malformed=True)

    @settings(SETTINGS, max_examples=80)
    @given(msg=stream_messages({"session": fuzz.jupyter_session, "execution": fuzz.execution}),
           ascii_only=st.booleans())
    def run(msg: dict[str, Any], ascii_only: bool) -> None:
        checker.send(json.dumps(msg, ensure_ascii=ascii_only), malformed=False)

    run()
    # The same connection still runs code.
    stream.send(json.dumps({"type": "execute", "code": "print('still here')", "request_id": "after"}))
    while True:
        event = json.loads(stream.recv(timeout=60))
        if event.get("request_id") == "after" and event["type"] == "end":
            assert event["execution"]["stdout"] == "still here\n"
            break
    fuzz.assert_log_clean(since)


def test_stream_closes_on_an_oversized_frame(fuzz: Any, stream: ClientConnection) -> None:
    refuses_oversized(stream, json.dumps({"type": "execute", "code": "x" * (MAX_JSON_BODY + 1)}))
    with open_ws(fuzz, f"/v1/sandboxes/{fuzz.sandbox}/stream") as again:
        again.send("not json")
        assert json.loads(again.recv(timeout=30))["type"] == "rejected"


# -- /v1/sessions/{id}/terminal --------------------------------------------------------------------------------


def _attached(conn: ClientConnection) -> None:
    assert json.loads(conn.recv(timeout=30)) == ["setup", {}]


def _until_output(conn: ClientConnection, marker: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    while marker not in seen:
        message = json.loads(conn.recv(timeout=max(0.1, deadline - time.monotonic())))
        if message[0] == "stdout":
            seen += message[1]


TERMINAL_MALFORMED = [*MALFORMED_TEXT, '{"stdin": "x"}', "[5, 1]", "[null]", '[["stdin"], "x"]', "5"]
TERMINAL_ODD = ['["set_size", "a", 3]', '["set_size", 0, 5]', '["set_size", 99999, 99999]', '["stdin", 5]',
                '["stdin"]', '["resize", 1]', '["set_size", 1.5, 2]', '["set_size", 24, 80, 480, 640]', '[""]']


def test_terminal_closes_on_malformed_frames(fuzz: Any, assert_error_body: Any) -> None:
    since = len(fuzz.log())
    path = f"/v1/sessions/{fuzz.terminal}/terminal"
    frames: list[str | bytes] = [*TERMINAL_MALFORMED, *MALFORMED_BINARY[:3]]
    for frame in frames:
        with open_ws(fuzz, path) as conn:
            _attached(conn)
            conn.send(frame)
            code, reason = closed_with(conn)
            assert code == 4400, (frame[:100], code, reason)
            assert_error_body({"error": "invalid_request", "message": reason}, repr(frame)[:100])
    # Messages of terminado's shape with odd values are ignored; the terminal carries on.
    with open_ws(fuzz, path) as conn:
        _attached(conn)
        for odd in TERMINAL_ODD:
            conn.send(odd)

        @settings(SETTINGS, max_examples=30)
        @given(rest=st.lists(st.sampled_from(WRONG), max_size=3))
        def run(rest: list[Any]) -> None:
            conn.send(json.dumps(["set_size", *rest]))

        run()
        conn.send(json.dumps(["stdin", "echo terminal-still-here\r"]))
        _until_output(conn, "terminal-still-here")
        refuses_oversized(conn, "x" * (MAX_JSON_BODY + 1))
    fuzz.assert_log_clean(since)


# -- /api/kernels/{id}/channels --------------------------------------------------------------------------------


def _kernel_info(conn: ClientConnection, *, v1: bool = False) -> None:
    """Ask for kernel_info on shell and wait for its reply (the connection and the kernel both work)."""
    msg = Session().msg("kernel_info_request")
    if v1:
        parts = [json.dumps(msg[k], default=json_default).encode()
                 for k in ("header", "parent_header", "metadata", "content")]
        conn.send(_v1_frame("shell", parts))
    else:
        conn.send(json.dumps({**msg, "channel": "shell"}, default=json_default))
    deadline = time.monotonic() + 60
    while True:
        data = conn.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(data, bytes):
            if v1:
                count = int.from_bytes(data[:8], "little")
                offsets = [int.from_bytes(data[8 * (i + 1): 8 * (i + 2)], "little") for i in range(count)]
                header = json.loads(data[offsets[1]: offsets[2]])
                parent = json.loads(data[offsets[2]: offsets[3]])
                if header["msg_type"] == "kernel_info_reply" and parent.get("msg_id") == msg["header"]["msg_id"]:
                    return
            continue
        reply = json.loads(data)
        if reply["msg_type"] == "kernel_info_reply" and reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]:
            return


def _v1_frame(channel: str, parts: list[bytes], *, count: int | None = None) -> bytes:
    channel_b = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1), 8 * (1 + 1 + len(parts) + 1) + len(channel_b)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = (len(offsets) if count is None else count).to_bytes(8, "little")
    return head + b"".join(o.to_bytes(8, "little") for o in offsets) + channel_b + b"".join(parts)


LEGACY_MALFORMED: list[str | bytes] = [
    *MALFORMED_TEXT[2:12], '{"header": 5}', '{"header": {}, "channel": 5}', '{"header": "x", "channel": "shell"}',
    b"", b"\x00\x00\x00", struct.pack("!I", 2**31) + b"\x00" * 8, struct.pack("!II", 1, 8) + b"not json",
    struct.pack("!III", 2, 12, 4) + b"{}", struct.pack("!II", 1, 999) + b"{}", struct.pack("!II", 1, 8) + b"[1]",
]
V1_MALFORMED: list[bytes] = [
    b"", b"\x00" * 7, (2**63).to_bytes(8, "little") + b"\x00" * 64, (3).to_bytes(8, "little") + b"\xff" * 24,
    _v1_frame("shell", [b"{}", b"{}", b"{}"]), _v1_frame("shell", [b"{}"] * 4, count=2**40),
    _v1_frame("\xff", [b"{}"] * 4).replace(b"\xc3\xbf", b"\xff\xfe"),
]


@pytest.mark.parametrize("v1", [False, True], ids=["legacy", "v1"])
def test_kernel_channels_close_on_malformed_frames(fuzz: Any, v1: bool) -> None:
    since = len(fuzz.log())
    path = f"/api/kernels/{fuzz.kernel}/channels?session_id={uuid.uuid4().hex}"
    kwargs: dict[str, Any] = {"subprotocols": [Subprotocol("v1.kernel.websocket.jupyter.org")]} if v1 else {}
    frames: list[str | bytes] = list(V1_MALFORMED) if v1 else list(LEGACY_MALFORMED)

    for frame in frames:
        with open_ws(fuzz, path, **kwargs) as conn:
            conn.send(frame)
            code, reason = closed_with(conn)
            assert code == 1007 and reason.startswith("Not a Jupyter message"), (frame[:80], code, reason)

    @settings(SETTINGS, max_examples=15)
    @given(frame=st.binary(max_size=40) | st.text(max_size=40))
    def generated(frame: str | bytes) -> None:
        with open_ws(fuzz, path, **kwargs) as conn:
            conn.send(frame)
            code, reason = closed_with(conn)
            assert code == 1007 and reason.startswith("Not a Jupyter message"), (frame[:80], code, reason)

    generated()
    with open_ws(fuzz, path, **kwargs) as conn:
        # A channel a client may not write is dropped, as Jupyter Server drops it; the connection carries on.
        msg = Session().msg("kernel_info_request")
        if v1:
            parts = [json.dumps(msg[k], default=json_default).encode()
                     for k in ("header", "parent_header", "metadata", "content")]
            conn.send(_v1_frame("iopub", parts))
            conn.send(_v1_frame("nope", parts))
        else:
            for channel in ("iopub", "nope", "hb"):
                conn.send(json.dumps({**msg, "channel": channel}, default=json_default))
        _kernel_info(conn, v1=v1)
    fuzz.assert_log_clean(since)


def test_kernel_channels_oversized_frame(fuzz: Any) -> None:
    path = f"/api/kernels/{fuzz.kernel}/channels"
    with open_ws(fuzz, path) as conn:
        refuses_oversized(conn, b"\x00" * (64 * 1024 * 1024 + 1))
    with open_ws(fuzz, path) as conn:
        _kernel_info(conn)
