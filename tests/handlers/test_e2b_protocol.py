"""The /e2b surface at the wire, where the SDKs never go: malformed Connect envelopes and codecs, bad and
missing tokens, another tenant's sandbox, routes kernelhub does not serve, hostile paths, E2B's error shapes
and the Should-Retry header. Every answer is a clean 4xx/5xx in E2B's shape, never a traceback."""

from __future__ import annotations

import base64
import datetime
import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kernelhub.handlers.e2b.base import ENVD_PORT, INTERPRETER_PORT
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


def control(gateway: Gateway, method: str, path: str, body: Any = None, *, key: str | None = "alice",
            headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    key = gateway.token if key == "alice" else key
    all_headers = {**({"X-API-Key": key} if key else {}), **(headers or {})}
    return _send(gateway, method, "/e2b" + path, body, all_headers)


def _send(gateway: Gateway, method: str, path: str, body: Any, headers: dict[str, str],
          raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(gateway.url + path, data=data, method=method, headers=headers)
    if body is not None and "Content-Type" not in headers:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, payload, answer_headers = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as err:
        status, payload, answer_headers = err.code, err.read(), dict(err.headers)
    parsed: Any = payload
    if answer_headers.get("Content-Type", "").startswith("application/json") and payload:
        parsed = json.loads(payload)
    return status, parsed, answer_headers


@pytest.fixture(scope="module")
def sandbox(gateway: Gateway) -> Iterator[dict[str, Any]]:
    status, created, _ = control(gateway, "POST", "/v2/sandboxes", {"templateID": "code-interpreter-v1",
                                                                   "timeout": 120, "envVars": {"A": "1"}})
    assert status == 201, created
    yield created
    control(gateway, "DELETE", f"/sandboxes/{created['sandboxID']}")


def envd(gateway: Gateway, sandbox: dict[str, Any], method: str, path: str, *, body: Any = None,
         raw: bytes | None = None, token: str | None = "own", port: int = ENVD_PORT,
         headers: dict[str, str] | None = None, sandbox_id: str | None = None) -> tuple[int, Any, dict[str, str]]:
    all_headers = {"E2b-Sandbox-Id": sandbox_id or sandbox["sandboxID"], "E2b-Sandbox-Port": str(port),
                   **(headers or {})}
    if token == "own":
        token = sandbox["envdAccessToken"]
    if token:
        all_headers["X-Access-Token"] = token
    return _send(gateway, method, "/e2b" + path, body, all_headers, raw)


def envelope(message: Any, flags: int = 0) -> bytes:
    payload = json.dumps(message).encode() if not isinstance(message, bytes) else message
    return struct.pack(">BI", flags, len(payload)) + payload


def stream_messages(payload: bytes) -> list[tuple[int, Any]]:
    out = []
    while payload:
        flags, length = struct.unpack(">BI", payload[:5])
        out.append((flags, json.loads(payload[5:5 + length])))
        payload = payload[5 + length:]
    return out


def test_create_answers_e2b_shapes(sandbox: dict[str, Any]) -> None:
    assert sandbox["templateID"] == "python" and sandbox["clientID"] and sandbox["envdVersion"] == "0.5.7"
    assert len(sandbox["envdAccessToken"]) >= 32 and sandbox["trafficAccessToken"] != sandbox["envdAccessToken"]


def test_control_plane_errors(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    status, body, headers = control(gateway, "GET", "/v2/sandboxes", key=None)
    assert status == 401 and body["code"] == 401 and body["message"]
    status, body, _ = control(gateway, "GET", "/v2/sandboxes", key="e2b_0123456789abcdef")
    assert status == 401 and body["code"] == 401
    for path, payload, words in (("/v2/sandboxes", {"templateID": "nope"}, "Unknown template"),
                                 ("/v2/sandboxes", {"autoPause": True}, "pausing"),
                                 ("/v2/sandboxes", {"volumeMounts": [{"name": "v"}]}, "volumes"),
                                 ("/v2/sandboxes", {"timeout": -5}, "timeout"),
                                 ("/v2/sandboxes", {"envVars": {"LD_PRELOAD": "x"}}, "LD_PRELOAD"),
                                 ("/v2/sandboxes", {"network": {"allowOut": ["*"]}}, "network.allow[0] is not a"),
                                 (f"/sandboxes/{sandbox['sandboxID']}/timeout", {"timeout": 10 ** 9}, "at most")):
        status, body, _ = control(gateway, "POST", path, payload)
        assert status == 400 and body["code"] == 400 and words in body["message"], (payload, body)
    # A timeout no sandbox may live is refused before one is taken: the answer names no sandbox the caller
    # never got, and none was created (and deleted) for it.
    def created() -> list[bytes]:
        status, text = gateway.request("GET", "/metrics")
        assert status == 200, text
        return [line for line in text.splitlines() if line.startswith(b"kernelhub_sandboxes_created_total")]

    before = created()
    for timeout in (1e300, 10 ** 7):
        status, body, _ = control(gateway, "POST", "/v2/sandboxes", {"timeout": timeout})
        assert status == 400 and "timeout may be at most" in body["message"] and "sb" not in body["message"], body
    assert created() == before
    # Longer than the default lifetime (a day) and within the gateway's maximum (a week): the sandbox is made to
    # live that long, not made, found too short-lived and deleted (which named its id in the error).
    for timeout in (86400, 86400 + 1, 3 * 86400, 7 * 86400):
        asked = time.time()
        status, body, _ = control(gateway, "POST", "/v2/sandboxes", {"timeout": timeout})
        assert status == 201, (timeout, body)
        try:
            status, info, _ = control(gateway, "GET", f"/sandboxes/{body['sandboxID']}")
            assert status == 200, info
            end = datetime.datetime.fromisoformat(info["endAt"].replace("Z", "+00:00")).timestamp()
            assert asked + timeout - 120 < end <= time.time() + timeout + 1, (timeout, info)
        finally:
            control(gateway, "DELETE", f"/sandboxes/{body['sandboxID']}")
    status, body, _ = _send(gateway, "POST", "/e2b/v2/sandboxes", None,
                            {"X-API-Key": gateway.token, "Content-Type": "application/json"}, b"{not json")
    assert status == 400 and body["code"] == 400
    for method, path in (("POST", f"/sandboxes/{sandbox['sandboxID']}/pause"), ("GET", "/templates"),
                         ("POST", f"/sandboxes/{sandbox['sandboxID']}/snapshots"), ("GET", "/volumes")):
        status, body, _ = control(gateway, method, path, {} if method == "POST" else None)
        assert status == 501 and body["code"] == 501 and "not supported" in body["message"], (path, body)
    status, body, _ = control(gateway, "GET", "/templates", key=None)
    assert status == 401  # strangers learn nothing, not even what is unsupported
    status, body, _ = control(gateway, "GET", "/sandboxes/sbnope")
    assert status == 404 and body["code"] == 404
    status, body, _ = control(gateway, "GET", "/v2/sandboxes?limit=0")
    assert status == 400
    status, body, _ = control(gateway, "GET", "/v2/sandboxes?nextToken=***")
    assert status == 400 and "nextToken" in body["message"]


def test_another_tenant_gets_not_found_everywhere(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    sid, bob = sandbox["sandboxID"], gateway.other_token
    for method, path, payload in (("GET", f"/sandboxes/{sid}", None), ("DELETE", f"/sandboxes/{sid}", None),
                                  ("POST", f"/v2/sandboxes/{sid}/connect", {}),
                                  ("POST", f"/sandboxes/{sid}/connect", {"timeout": 10}),
                                  ("POST", f"/sandboxes/{sid}/timeout", {"timeout": 10}),
                                  ("GET", f"/sandboxes/{sid}/metrics", None)):
        status, body, _ = control(gateway, method, path, payload, key=bob)
        assert status == 404 and body["code"] == 404, (path, body)
    status, listed, _ = control(gateway, "GET", "/v2/sandboxes", key=bob)
    assert status == 200 and sid not in [s["sandboxID"] for s in listed]
    status, listed, _ = control(gateway, "GET", "/sandboxes", key=bob)  # the older SDKs' list
    assert status == 200 and sid not in [s["sandboxID"] for s in listed]
    # Bob's own sandbox token does not open Alice's sandbox, and Alice's is still there.
    status, his, _ = control(gateway, "POST", "/sandboxes", {"templateID": "base"}, key=bob)
    assert status == 201, his
    try:
        status, body, _ = envd(gateway, sandbox, "GET", "/files?path=x", token=his["envdAccessToken"])
        assert status == 502 and "was not found" in body["message"]
        status, _, _ = envd(gateway, his, "GET", "/health")
        assert status == 204
    finally:
        control(gateway, "DELETE", f"/sandboxes/{his['sandboxID']}", key=bob)
    assert envd(gateway, sandbox, "GET", "/health")[0] == 204


def test_tokens(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    status, body, _ = envd(gateway, sandbox, "GET", "/files?path=x", token=None)
    assert status == 401 and body["code"] == 401
    for token in ("wrong", sandbox["trafficAccessToken"], sandbox["envdAccessToken"] + "x"):
        status, body, headers = envd(gateway, sandbox, "GET", "/files?path=x", token=token)
        assert status == 502 and "was not found" in body["message"], token
        assert headers.get("Should-Retry") == "false"
    status, body, _ = envd(gateway, sandbox, "GET", "/health", sandbox_id="sbunknown")
    assert status == 502 and "was not found" in body["message"]
    # The code interpreter takes the traffic token (or the envd one); not a wrong one.
    traffic = {"E2B-Traffic-Access-Token": sandbox["trafficAccessToken"]}
    status, contexts, _ = envd(gateway, sandbox, "GET", "/contexts", token=None, port=INTERPRETER_PORT,
                               headers=traffic)
    assert status == 200 and [c["language"] for c in contexts] == ["python"]
    status, body, _ = envd(gateway, sandbox, "GET", "/contexts", token=None, port=INTERPRETER_PORT,
                           headers={"E2B-Traffic-Access-Token": "wrong"})
    assert status == 502
    status, body, _ = envd(gateway, sandbox, "GET", "/contexts", token=None, port=INTERPRETER_PORT)
    assert status == 401


def test_malformed_connect_requests(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    def rpc(method: str, raw: bytes, content_type: str) -> tuple[int, Any, dict[str, str]]:
        return envd(gateway, sandbox, "POST", f"/{method}", raw=raw, headers={"Content-Type": content_type})

    stream = "application/connect+json"
    start = {"process": {"cmd": "/bin/echo", "args": ["hi"]}}
    for raw, code in ((b"", "invalid_argument"), (b"\x00\x00\x00", "invalid_argument"),
                      (envelope(start)[:-2], "invalid_argument"), (envelope(start) + b"x", "invalid_argument"),
                      (envelope(start, flags=1), "unimplemented"), (envelope(b"{nope"), "invalid_argument"),
                      (envelope([1, 2]), "invalid_argument"), (envelope(start) + envelope(start), "invalid_argument"),
                      (envelope({"process": "x"}), "invalid_argument"),
                      (envelope({"process": {"cmd": "/bin/echo"}, "pty": {"size": {"rows": 1}}}), "unimplemented")):
        status, body, headers = rpc("process.Process/Start", raw, stream)
        assert status == 200 and headers["Content-Type"].startswith(stream), body
        [(flags, end)] = stream_messages(body)
        assert flags == 2 and end["error"]["code"] == code, (raw, end)
    status, body, _ = rpc("process.Process/Start", envelope(start), "application/proto")
    assert status == 415 and body["code"] == "unimplemented"
    status, body, _ = rpc("filesystem.Filesystem/Stat", b"{nope", "application/json")
    assert status == 400 and body["code"] == "invalid_argument"
    status, body, _ = rpc("filesystem.Filesystem/Stat", b'{"path": "\\ud800"}', "application/json")
    assert status == 400 and body["code"] == "invalid_argument" and "UTF-8" in body["message"]
    status, body, _ = rpc("process.Process/Start", envelope({"process": {"cmd": "/bin/true", "envs": {"A": "\ud800"}}}),
                          stream)
    assert stream_messages(body)[-1][1]["error"]["code"] == "invalid_argument"
    status, body, _ = rpc("filesystem.Filesystem/Stat", b'{"path": 5}', "application/json")
    assert status == 400 and body["code"] == "invalid_argument"
    status, body, _ = rpc("filesystem.Filesystem/Stat", b"\x08\x01", "application/proto")
    assert status == 415 and body["code"] == "unimplemented"
    for method in ("filesystem.Filesystem/WatchDir", "process.Process/Update", "filesystem.Filesystem/Nope",
                   "nosuch.Service/Call"):
        status, body, _ = rpc(method, b"{}", "application/json")
        assert status == 501 and body["code"] == "unimplemented", (method, body)
    status, body, _ = envd(gateway, sandbox, "POST", "/process.Process/Start", raw=envelope(start),
                           headers={"Content-Type": stream, "Connect-Timeout-Ms": "soon"})
    assert stream_messages(body)[-1][1]["error"]["code"] == "invalid_argument"
    # A well-formed one works, with the events in order and the end-stream envelope last.
    status, body, _ = envd(gateway, sandbox, "POST", "/process.Process/Start", raw=envelope(start),
                           headers={"Content-Type": stream, "Connect-Timeout-Ms": "10000"})
    messages = stream_messages(body)
    assert "start" in messages[0][1]["event"] and messages[-1] == (2, {})
    data = [base64.b64decode(m["event"]["data"]["stdout"]) for _, m in messages if "data" in m.get("event", {})]
    assert b"".join(data) == b"hi\n" and messages[-2][1]["event"]["end"]["exitCode"] == 0


def test_paths_stay_in_the_home(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    for path in ("/etc/passwd", "/tmp/x", "/home/user/../../etc/shadow", "/home/userx/a", "/workspace/../etc/x",
                 "//home/user/a"):
        status, body, _ = envd(gateway, sandbox, "GET", "/files?" + urllib.parse.urlencode({"path": path}))
        assert status == 403 and body["code"] == 403, (path, body)
        status, body, _ = envd(gateway, sandbox, "POST", "/filesystem.Filesystem/Stat", body={"path": path})
        assert status == 403 and body["code"] == "permission_denied", (path, body)
    status, body, _ = envd(gateway, sandbox, "POST", "/filesystem.Filesystem/Remove", body={"path": "/home/user"})
    assert status == 403
    # An E2B_SANDBOX_URL ending in "/" makes the SDK send "/e2b//<route>": still the route (E2B.md P7).
    status, body, _ = envd(gateway, sandbox, "POST", "//filesystem.Filesystem/Stat", body={"path": "."})
    assert status == 200 and body["entry"]["path"] == "/home/user" and body["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    # A symlink the sandbox plants is never followed by the file API.
    run = envelope({"process": {"cmd": "/bin/ln", "args": ["-s", "/etc", "/home/user/etc"]}})
    envd(gateway, sandbox, "POST", "/process.Process/Start", raw=run,
         headers={"Content-Type": "application/connect+json"})
    status, body, _ = envd(gateway, sandbox, "GET", "/files?path=etc/passwd")
    assert status == 400 and "symbolic link" in body["message"]
    status, body, _ = envd(gateway, sandbox, "POST", "/filesystem.Filesystem/Stat", body={"path": "etc"})
    assert status == 200 and body["entry"]["type"] == "FILE_TYPE_SYMLINK" and body["entry"]["symlinkTarget"] == "/etc"
    for user, allowed in (("user", True), ("root", False)):
        basic = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        status, body, _ = envd(gateway, sandbox, "GET", "/files?path=etc", headers={"Authorization": basic})
        assert (status != 403) == allowed, (user, body)


def test_uploads_are_bounded_and_cleaned_up(gateway: Gateway) -> None:
    status, small, _ = control(gateway, "POST", "/v2/sandboxes", {"templateID": "base"})
    assert status == 201
    try:
        sid = small["sandboxID"]
        boundary = "kh-boundary"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"/home/user/up.txt\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\nuploaded\r\n--{boundary}--\r\n").encode()
        status, body, _ = envd(gateway, small, "POST", "/files", raw=part,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 200 and body == [{"name": "up.txt", "type": "file", "path": "/home/user/up.txt"}]
        status, body, _ = envd(gateway, small, "POST", "/files", raw=part.replace(b"up.txt", b"cut.txt")[:-10],
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 400 and body["code"] == 400
        status, body, _ = envd(gateway, small, "POST", "/files?path=z.gz", raw=b"not gzip at all",
                               headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})
        assert status == 400 and "gzip" in body["message"]
        status, body, _ = envd(gateway, small, "POST", "/files", raw=b"raw without a path",
                               headers={"Content-Type": "application/octet-stream"})
        assert status == 400
        status, listing, _ = _send(gateway, "GET", f"/v1/sandboxes/{sid}/files?list=1", None,
                                   {"Authorization": f"Bearer {gateway.token}"})
        assert [e["name"] for e in listing["entries"]] == ["up.txt"]  # nothing partial was left behind
    finally:
        control(gateway, "DELETE", f"/sandboxes/{small['sandboxID']}")
