"""The one error family: every code has one class, the REST mapper, MCP and the client read the same registry,
and the client's names are the server's classes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import kernelhub
import kernelhub.app  # noqa: F401  (every module a gateway loads, so that answerable() sees each class it declares)
from kernelhub import client, errors
from kernelhub.client.errors import error_from_response
from kernelhub.mcp.tools import error_output

PACKAGE = Path(kernelhub.__file__).parent


def answerable() -> list[type[errors.KernelHubError]]:
    """Every class an answer of the gateway may name: the base and its subclasses with a status."""
    seen: list[type[errors.KernelHubError]] = [errors.KernelHubError]
    for cls in seen:
        seen.extend(c for c in cls.__subclasses__() if c not in seen)
    return [c for c in seen if c.status]


def test_every_class_is_the_class_of_its_code() -> None:
    classes = answerable()
    codes = [c.error for c in classes]
    assert len(codes) == len(set(codes)), "two classes share a code"
    for cls in classes:
        assert errors.error_class(cls.error, 0) is cls
        assert errors.error_class(cls.error, 599) is cls  # the code wins over the status
        made = errors.error_for(cls.error, "a sentence.", cls.status)
        assert type(made) is cls and (made.status, made.error, made.message) == (cls.status, cls.error, "a sentence.")
    # The codes that had none before this registry.
    for code, status, base in (("pids", 429, errors.QuotaExceeded), ("capacity", 503, errors.SandboxError),
                               ("workspace_unavailable", 503, errors.SandboxError),
                               ("execution_ended", 409, errors.Conflict), ("host_disk_full", 507, errors.SandboxError),
                               ("no_input_requested", 409, errors.Conflict),
                               ("sandbox_not_running", 409, errors.Conflict)):
        cls = errors.error_class(code)
        assert cls.status == status and issubclass(cls, base) and cls is not base
    assert issubclass(errors.PidsExhausted, errors.SandboxError)  # sandbox-layer code catching SandboxError sees it
    assert issubclass(errors.SandboxNotRunning, errors.SandboxError)


def test_a_code_is_declared_once() -> None:
    with pytest.raises(TypeError, match="not_found"):
        type("Twin", (errors.KernelHubError,), {"status": 404, "error": "not_found"})


def test_unknown_codes_and_bare_statuses() -> None:
    newer = errors.error_for("sandbox_paused", "Paused.", 409)
    assert type(newer) is errors.Conflict and newer.error == "sandbox_paused" and newer.status == 409
    assert type(errors.error_for(None, "x", 404)) is errors.NotFound
    teapot = errors.error_for(None, "x", 418)
    assert type(teapot) is errors.InvalidRequest and teapot.error == "i_m_a_teapot" and teapot.status == 418
    bad_gateway = errors.error_for(None, "x", 502)
    assert type(bad_gateway) is errors.KernelHubError and bad_gateway.error == "bad_gateway"
    # Without a status (a websocket's rejected event), the class's own.
    assert errors.error_for("payload_too_large", "x").status == 413
    assert [errors.error_code(s) for s in (400, 405, 411, 415, 500, 503, 504)] == [
        "invalid_request", "method_not_allowed", "length_required", "unsupported_media_type", "internal_error",
        "unavailable", "gateway_timeout"]


def test_no_answer_is_never_made_from_an_answer() -> None:
    for cls in (errors.GatewayConnectionError, errors.ResponseTimeoutError):
        assert cls.status == 0 and cls not in answerable()
        assert errors.error_class(cls.error, 0) is not cls
    forged = error_from_response(400, b'{"error": "connection_error", "message": "m"}')
    assert not isinstance(forged, errors.GatewayConnectionError) and type(forged) is errors.InvalidRequest
    timeout = errors.ResponseTimeoutError("No answer.")
    assert isinstance(timeout, errors.Timeout) and isinstance(timeout, TimeoutError)
    assert isinstance(errors.GatewayConnectionError("x"), ConnectionError)


def test_client_names_are_the_servers_classes() -> None:
    pairs = {
        client.KernelHubError: errors.KernelHubError, client.InvalidRequestError: errors.InvalidRequest,
        client.UnauthorizedError: errors.Unauthorized, client.ForbiddenError: errors.Forbidden,
        client.NotFoundError: errors.NotFound, client.ConflictError: errors.Conflict,
        client.PayloadTooLargeError: errors.PayloadTooLarge, client.QuotaExceededError: errors.QuotaExceeded,
        client.DiskQuotaExceededError: errors.DiskQuotaExceeded, client.RequestTimeoutError: errors.Timeout,
        client.SandboxError: errors.SandboxError, client.GatewayConnectionError: errors.GatewayConnectionError,
        client.ResponseTimeoutError: errors.ResponseTimeoutError,
    }
    for name, cls in pairs.items():
        assert name is cls
    assert issubclass(client.DiskQuotaExceededError, client.QuotaExceededError)


def test_error_from_response() -> None:
    answer = error_from_response(404, b'{"error": "not_found", "message": "No sandbox sbx."}')
    assert type(answer) is errors.NotFound and answer.message == "No sandbox sbx." and answer.status == 404
    assert answer.body == {"error": "not_found", "message": "No sandbox sbx."}
    page = error_from_response(502, b"<html>Bad Gateway</html>")
    assert page.status == 502 and page.error == "bad_gateway" and page.message == "<html>Bad Gateway</html>"
    assert error_from_response(503, b"").message == "The gateway answered HTTP 503."
    assert type(error_from_response(413, "not json")) is errors.PayloadTooLarge


def test_mcp_tool_errors_are_the_rest_body() -> None:
    out = error_output(errors.ExecutionEnded("Execution ex1 already ended (ok)."))
    assert out.is_error and out.structured == {"error": "execution_ended",
                                               "message": "Execution ex1 already ended (ok)."}


def test_every_code_is_documented_in_openapi() -> None:
    spec = json.loads((PACKAGE / "openapi.json").read_text())
    described = spec["components"]["schemas"]["Error"]["properties"]["error"]["description"]
    for cls in answerable():
        assert re.search(rf"\b{cls.error}\b", described), cls.error


def test_codes_are_raised_as_their_classes() -> None:
    """A surface or layer that answers a code raises its class, never a base class with ``error="..."``: a
    client then gets the same class the server raised. (The CLI's start-up errors in app.py are never answers.)"""
    pattern = re.compile(r"""\berror=["'](\w+)["']""")
    for layer in ("handlers", "services", "sandbox", "mcp"):
        for path in (PACKAGE / layer).rglob("*.py"):
            found = pattern.findall(path.read_text())
            assert not found, f"{path.relative_to(PACKAGE)} names codes {found}"
