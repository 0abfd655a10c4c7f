"""The request shapes of kernelhub.models: one parse per request, shared by REST, the /stream websocket and MCP;
each refusal an InvalidRequest whose sentence names the field. The surfaces' own tests (tests/handlers,
tests/mcp) drive the same functions through a real gateway."""

from __future__ import annotations

from typing import Any

import pytest

from kernelhub import models
from kernelhub.errors import InvalidRequest
from kernelhub.models import CommandRun, CommandStdin, Execute, FileWrite, SandboxCreate, SessionCreate, SessionInput


def test_requests_parse_into_their_dataclass() -> None:
    assert models.parse_sandbox_create({}) == SandboxCreate()
    assert models.parse_sandbox_create({"template": "node", "limits": {"cpu": 1}, "env": {"A": "1"},
                                        "metadata": {}, "network": "none"}) == \
        SandboxCreate("node", {"cpu": 1}, {"A": "1"}, {}, "none")
    assert models.parse_execute({"code": "1", "timeout_s": 2, "language": None}) == Execute("1", timeout_s=2)
    assert models.parse_session_create({}) == SessionCreate("jupyter")
    assert models.parse_session_input({"input": "ls\n", "timeout_s": 0.5}) == SessionInput("ls\n", 0.5)
    assert models.parse_command_run({"command": "true", "background": True, "stdin_open": True, "tag": "t"}) == \
        CommandRun("true", stdin_open=True, tag="t", background=True)
    assert models.parse_command_stdin({"data_base64": "eA==", "eof": True}) == CommandStdin(b"x", True)
    assert models.parse_command_stdin({"data": "y"}) == CommandStdin("y", False)
    assert models.parse_signal({"signal": "SIGINT"}) == "SIGINT"
    assert models.parse_file_write({"path": "a", "content": "é"}, max_bytes=10) == FileWrite("a", "é".encode())
    assert models.parse_file_write({"path": "a", "content_base64": "AAE="}, max_bytes=10) == FileWrite("a", b"\0\1")


@pytest.mark.parametrize(("parse", "body", "words"), [
    (models.parse_sandbox_create, {"limit": {}}, "Unknown field 'limit'; this route accepts template, limits"),
    (models.parse_sandbox_create, {"limits": []}, "limits must be a JSON object of limits."),
    (models.parse_execute, {}, "The field 'code' is required."),
    (models.parse_execute, {"code": 1}, "code must be a string of code."),
    (models.parse_execute, {"code": "1", "timeout_s": True}, "timeout_s must be a number of seconds."),
    (models.parse_execute, {"code": "1", "env": "A=1"}, "env must be a JSON object of strings."),
    (models.parse_session_create, {"type": 3}, 'type must be "jupyter" or "terminal".'),
    (models.parse_session_input, {"timeout_s": 1}, "The field 'input' is required."),
    (models.parse_command_run, {"command": "true", "background": "yes"}, "background must be true or false."),
    (models.parse_command_run, {"command": "true", "bogus": 1}, "Unknown field 'bogus'"),
    (models.parse_command_stdin, {"data": "x", "data_base64": "eA=="}, "Give data or data_base64, not both."),
    (models.parse_command_stdin, {"data_base64": "***"}, "data_base64 is not valid base64."),
    (models.parse_signal, {}, "The field 'signal' is required."),
])
def test_bad_requests_are_refused_with_a_sentence(parse: Any, body: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        parse(body)
    assert words in raised.value.message and raised.value.message.endswith(".")
    assert raised.value.status == 400 and raised.value.error == "invalid_request"


def test_a_surface_names_its_own_fields_and_who_accepts_them() -> None:
    # The websocket's execute message carries type and request_id; its refusal says "execute accepts".
    assert models.parse_execute({"type": "execute", "code": "1", "request_id": 3}, extra=("type", "request_id"),
                         who="execute") == Execute("1")
    with pytest.raises(InvalidRequest, match=r"Unknown field 'cod'; execute accepts code, .*, request_id\."):
        models.parse_execute({"type": "execute", "cod": "1"}, extra=("type", "request_id"), who="execute")


def test_background_only_fields_are_refused_for_a_foreground_command() -> None:
    assert models.parse_command_run({"command": "true", "stdin": "x"}).run_args() == {
        "command": "true", "cwd": None, "env": None, "timeout_s": None, "stdin": "x"}
    with pytest.raises(InvalidRequest, match="apply to background"):
        models.parse_command_run({"command": "true", "tag": "t"}).run_args()


@pytest.mark.parametrize("body", [{"path": "a"}, {"path": "a", "content": "x", "content_base64": "eA=="}])
def test_a_file_write_needs_exactly_one_content(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest, match=r"Give exactly one of content \(text\) or content_base64"):
        models.parse_file_write(body, max_bytes=10)


def test_a_file_write_is_bounded() -> None:
    with pytest.raises(InvalidRequest, match="at most 3 bytes"):
        models.parse_file_write({"path": "a", "content_base64": "AAAAAA=="}, max_bytes=3)
