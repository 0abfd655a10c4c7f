"""Malformed and unauthenticated requests: every answer is a 4xx with ``{"error", "message"}`` (never a
traceback), and nothing is created by a request that was refused."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from kernelhub.handlers.base import MAX_JSON_BODY
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

SID = "{sid}"  # replaced by the module's sandbox id


@pytest.fixture(scope="module")
def sid(sandboxes: Any) -> str:
    return str(sandboxes("python")["id"])


def assert_error(status: int, body: Any, expected_status: int, expected_error: str | None = None) -> None:
    assert status == expected_status, (status, body)
    assert isinstance(body, dict) and set(body) == {"error", "message"}, body
    assert body["error"] and body["message"] and "Traceback" not in body["message"]
    if expected_error:
        assert body["error"] == expected_error, body


@pytest.mark.parametrize("method, path, raw, status, error", [
    # Bodies that are not a JSON object.
    ("POST", "/v1/sandboxes", b"{not json", 400, "invalid_request"),
    ("POST", "/v1/sandboxes", b"[1, 2, 3]", 400, "invalid_request"),
    ("POST", "/v1/sandboxes", b'"python"', 400, "invalid_request"),
    ("POST", "/v1/sandboxes", b"\xff\xfe", 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/execute", b"", 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/execute", b"null", 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/commands", b"{]", 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/execute", b'{"code": "1", "timeout_s": NaN}', 400, "invalid_request"),
    ("POST", "/v1/sandboxes", b'{"limits": {"cpu": Infinity}}', 400, "invalid_request"),
    ("POST", "/v1/sandboxes", b'{"template": "python"} trailing', 400, "invalid_request"),
])
def test_bodies_that_are_not_json_objects(gateway: Gateway, sid: str, method: str, path: str, raw: bytes,
                                          status: int, error: str) -> None:
    answer = gateway.request(method, path.replace(SID, sid), raw=raw, headers={"Content-Type": "application/json"})
    assert_error(*answer, status, error)


@pytest.mark.parametrize("body", [
    {"template": "cobol"},
    {"template": 5},
    {"template": "python", "limits": {"gpus": 1}},
    {"template": "python", "limits": {"memory_mb": -1}},
    {"template": "python", "limits": {"memory_mb": 0}},
    {"template": "python", "limits": {"memory_mb": 10**9}},
    {"template": "python", "limits": {"cpu": 1000}},
    {"template": "python", "limits": {"execution_timeout_s": 3601}},
    {"template": "python", "limits": {"memory_mb": "lots"}},
    {"template": "python", "limits": {"pids": 1.5}},
    {"template": "python", "limits": {"memory_mb": True}},
    {"template": "python", "limits": "small"},
    {"template": "python", "limits": [1]},
    {"template": "python", "env": {"A": 1}},
    {"template": "python", "env": ["A=1"]},
    {"template": "python", "env": {"BAD NAME": "x"}},
    {"template": "python", "metadata": [1]},
    {"template": "python", "metadata": {"big": "x" * 20000}},
    {"template": "python", "network": "host"},
    {"template": "python", "network": 1},
    {"template": "python", "limit": {"memory_mb": 64}},
])
def test_sandbox_create_refuses_bad_fields(gateway: Gateway, body: dict[str, Any]) -> None:
    before = gateway.request("GET", "/v1/sandboxes")[1]["sandboxes"]
    assert_error(*gateway.request("POST", "/v1/sandboxes", body), 400, "invalid_request")
    assert gateway.request("GET", "/v1/sandboxes")[1]["sandboxes"] == before


@pytest.mark.parametrize("route", ["execute", "executions"])
@pytest.mark.parametrize("body, status, error", [
    ({}, 400, "invalid_request"),
    ({"code": None}, 400, "invalid_request"),
    ({"code": 5}, 400, "invalid_request"),
    ({"code": ["print(1)"]}, 400, "invalid_request"),
    ({"code": "1", "timeout_s": 3601}, 400, "invalid_request"),
    ({"code": "1", "timeout_s": 301}, 400, "invalid_request"),  # over this sandbox's execution_timeout_s
    ({"code": "1", "timeout_s": 0}, 400, "invalid_request"),
    ({"code": "1", "timeout_s": -5}, 400, "invalid_request"),
    ({"code": "1", "timeout_s": "10"}, 400, "invalid_request"),
    ({"code": "1", "timeout_s": True}, 400, "invalid_request"),
    ({"code": "1", "language": "cobol"}, 400, "invalid_request"),
    ({"code": "1", "language": ["python"]}, 400, "invalid_request"),
    ({"code": "1", "session_id": 5}, 400, "invalid_request"),
    ({"code": "1", "session_id": "senothere"}, 404, "not_found"),
    ({"code": "1", "env": "A=1"}, 400, "invalid_request"),
    ({"code": "1", "env": {"A": None}}, 400, "invalid_request"),
    ({"code": "1", "cwd": "/tmp"}, 400, "invalid_request"),
    ({"code": "x" * (2 * 1024 * 1024 + 1)}, 400, "invalid_request"),
])
def test_execute_refuses_bad_fields(gateway: Gateway, sid: str, route: str, body: dict[str, Any], status: int,
                                    error: str) -> None:
    assert_error(*gateway.request("POST", f"/v1/sandboxes/{sid}/{route}", body), status, error)


@pytest.mark.parametrize("body", [
    {},
    {"command": ""},
    {"command": 5},
    {"command": "true", "cwd": 5},
    {"command": "true", "stdin": 5},
    {"command": "true", "timeout_s": 100000},
    {"command": "true", "env": {"X": 5}},
    {"command": "true", "shell": "zsh"},
])
def test_command_refuses_bad_fields(gateway: Gateway, sid: str, body: dict[str, Any]) -> None:
    assert_error(*gateway.request("POST", f"/v1/sandboxes/{sid}/commands", body), 400, "invalid_request")


@pytest.mark.parametrize("method, path, body, status, error", [
    ("POST", f"/v1/sandboxes/{SID}/sessions", {"type": "vm"}, 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/sessions", {"type": 1}, 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/sessions", {"type": "jupyter", "language": "cobol"}, 400, "invalid_request"),
    ("POST", f"/v1/sandboxes/{SID}/sessions", {"type": "jupyter", "language": {}}, 400, "invalid_request"),
    ("POST", "/v1/sessions/senothere/execute", {"input": "1"}, 404, "not_found"),
    ("POST", "/v1/sessions/senothere/execute", {"code": "1"}, 400, "invalid_request"),
    ("DELETE", "/v1/sessions/senothere", None, 404, "not_found"),
    ("GET", f"/v1/sandboxes/{SID}/logs?lines=abc", None, 400, "invalid_request"),
    ("GET", f"/v1/sandboxes/{SID}/logs?lines=-1", None, 400, "invalid_request"),
    ("GET", f"/v1/sandboxes/{SID}/logs?lines=1000000", None, 400, "invalid_request"),
    ("GET", "/v1/sandboxes/sbnothere", None, 404, "not_found"),
    ("GET", "/v1/sandboxes/sbnothere/metrics", None, 404, "not_found"),
    ("DELETE", "/v1/sandboxes/sbnothere", None, 404, "not_found"),
    ("GET", "/v1/executions/exnothere", None, 404, "not_found"),
    ("GET", "/v1/nothing", None, 404, "not_found"),
    ("GET", "/v1/sandboxes/a/b/c/d", None, 404, "not_found"),
    ("GET", "/nothing/at/all", None, 404, "not_found"),
    ("PATCH", "/v1/sandboxes", {}, 405, "method_not_allowed"),
    ("PUT", f"/v1/sandboxes/{SID}", {}, 405, "method_not_allowed"),
    ("DELETE", f"/v1/sandboxes/{SID}/files", None, 405, "method_not_allowed"),
])
def test_other_routes_refuse(gateway: Gateway, sid: str, method: str, path: str, body: Any, status: int,
                             error: str) -> None:
    assert_error(*gateway.request(method, path.replace(SID, sid), body), status, error)


@pytest.mark.parametrize("path", ["/v1/sandboxes", f"/v1/sandboxes/{SID}", f"/v1/sandboxes/{SID}/metrics",
                                  "/v1/templates", "/v1/nothing"])
def test_auth(gateway: Gateway, sid: str, path: str) -> None:
    path = path.replace(SID, sid)
    for headers in ({}, {"Authorization": "token "}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"},
                    {"Authorization": "Bearer not-a-key"}, {"Authorization": f"Basic {gateway.token}"},
                    {"Authorization": f"token {gateway.token}x"}):
        status, body = gateway.request("GET", path, token=None, headers=headers)
        assert_error(status, body, 401, "unauthorized")
    status, body = gateway.request("GET", path + "?token=wrong", token=None)
    assert_error(status, body, 401, "unauthorized")
    expected = 404 if path.endswith("nothing") else 200
    assert gateway.request("GET", path, token=None, headers={"Authorization": f"token {gateway.token}"})[0] == expected
    assert gateway.request("GET", path, token=None, headers={"Authorization": f"Bearer {gateway.token}"})[0] == expected
    assert gateway.request("GET", f"{path}?token={gateway.token}", token=None)[0] == expected


def test_401_names_the_scheme(gateway: Gateway) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.request("GET", "/v1/sandboxes")
        resp = conn.getresponse()
        assert resp.status == 401 and "Bearer" in resp.getheader("WWW-Authenticate", "")
        assert json.loads(resp.read())["error"] == "unauthorized"
    finally:
        conn.close()


def test_writes_need_auth_before_anything(gateway: Gateway, sid: str) -> None:
    for method, path in (("POST", "/v1/sandboxes"), ("POST", f"/v1/sandboxes/{sid}/execute"),
                         ("DELETE", f"/v1/sandboxes/{sid}"), ("PUT", f"/v1/sandboxes/{sid}/files/x.txt")):
        status, body = gateway.request(method, path, raw=b'{"code": "1"}', token=None)
        assert_error(status, body, 401, "unauthorized")
    assert gateway.request("GET", f"/v1/sandboxes/{sid}")[1]["state"] == "running"


def test_oversize_json_body(gateway: Gateway, sid: str) -> None:
    code = "x" * (MAX_JSON_BODY + 10)
    status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": code})
    assert_error(status, body, 413, "payload_too_large")
    # A Content-Length far over the limit is refused before the body is read.
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/sandboxes")
        conn.putheader("Authorization", f"Bearer {gateway.token}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(10 * 1024**3))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"] == "payload_too_large"
    finally:
        conn.close()
    # The gateway is fine afterwards.
    assert gateway.request("GET", f"/v1/sandboxes/{sid}")[0] == 200


def test_openapi_needs_no_token(gateway: Gateway) -> None:
    status, doc = gateway.request("GET", "/v1/openapi.json", token=None)
    assert status == 200 and doc["openapi"].startswith("3.1")
