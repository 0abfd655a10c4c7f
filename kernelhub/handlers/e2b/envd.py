"""envd, port 49983 (E2B.md 5.2): ``/health``, ``/files``, and the ``filesystem.Filesystem`` and
``process.Process`` RPCs over Connect JSON.

Paths: E2B's home ``/home/user`` is the sandbox's workspace (it is bound there inside the sandbox, and is
``/workspace`` too). A relative path is relative to it; ``/home/user/…`` and ``/workspace/…`` name the same
file; anything else is outside what this API reads or writes and answers ``permission_denied`` (403). Every file
operation goes through the hub's file methods, so the workspace layer's refusal of ``..``, symlinks and
special files holds here as on ``/v1``.

Processes are kernelhub's commands (:mod:`kernelhub.services.commands`), addressed by their pid inside the
sandbox. ``Start`` streams the command's events; the command outlives the request (envd's semantics: a client
that goes away does not kill it), ``Connect-Timeout-Ms`` is its lifetime, and a keepalive event goes out every
``Keepalive-Ping-Interval`` seconds of quiet. ``Connect`` re-attaches to a running command from now on, as
envd does (the REST API's ``?follow=1`` also replays). An ended command is ``not_found`` here, as in envd. PTYs,
``Update``, ``StreamInput`` and the directory watchers are ``unimplemented``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import posixpath
import signal
import zlib
from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from tornado import web

from ...errors import Forbidden, InvalidRequest, KernelHubError, NotFound, PayloadTooLarge
from ...sandbox import bwrap
from ...sandbox.files import UploadWriter
from ...services.commands import Command
from ..base import MAX_JSON_BODY
from ..streaming import StreamingMixin, send_download
from .base import ENVD_PORT, RpcHandler, SandboxHandler, SandboxPort
from .connect import (
    STREAM_JSON,
    ConnectError,
    b64,
    check_codec,
    connect_error,
    end_stream,
    envelope,
    field,
    parse_envelope,
    parse_unary,
    timeout_ms,
    unb64,
)

HOME = bwrap.INNER_HOME
#: Directories an E2B path may name the workspace by.
ROOTS = (HOME, bwrap.INNER_WORKSPACE)
#: Seconds between keepalive events of a quiet process stream when the client names none (the SDK asks 50).
KEEPALIVE_DEFAULT_S = 50.0
#: Most bytes one gzip-compressed upload chunk may inflate to before it is written (bounds memory, not size).
INFLATE_STEP = 1024 * 1024


def workspace_path(path: object) -> str:
    """An E2B path as a path relative to the workspace; raises :class:`~kernelhub.errors.Forbidden` for one
    outside it and :class:`~kernelhub.errors.InvalidRequest` for one that is not a path."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidRequest("path must be a non-empty path string.")
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(HOME, path))
    for root in ROOTS:
        if full == root:
            return ""
        if full.startswith(root + "/"):
            return full[len(root) + 1:]
    raise Forbidden(f"{path[:200]!r} is outside the sandbox's home; this API reads and writes only {HOME} (which "
                    f"is {bwrap.INNER_WORKSPACE} too).")


def e2b_path(rel: str) -> str:
    return f"{HOME}/{rel}" if rel else HOME


def _user(handler: SandboxHandler) -> None:
    """E2B's ``user`` (``Authorization: Basic base64("<user>:")``): the sandbox has one user, ``user``."""
    header = handler.request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return
    try:
        user = base64.b64decode(value.strip()).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The Authorization header is not valid Basic credentials.") from None
    if user not in ("", bwrap.INNER_USER):
        raise Forbidden(f"The sandbox has one user, {bwrap.INNER_USER!r}; commands and files cannot run as "
                        f"{user[:64]!r}.")


# -- /health ------------------------------------------------------------------------------------------------

class HealthHandler(SandboxHandler):
    """``GET /health``: 204 while the sandbox runs (502 "was not found" otherwise, from :meth:`prepare`)."""

    traffic = True

    def get(self) -> None:
        self.hub.sandbox_tokens(self.tenant, self.sandbox_id)  # still running: raises otherwise
        self.set_status(204 if self.request.headers.get("E2b-Sandbox-Port") == str(ENVD_PORT) else 200)
        self.finish()


# -- /files -------------------------------------------------------------------------------------------------

@web.stream_request_body
class FilesHandler(SandboxHandler, StreamingMixin):
    """``GET /files?path=`` (the file's bytes) and ``POST /files[?path=]``: multipart ``file`` parts (each
    written to ``path``, else to its filename) or a raw body (``path`` required; ``Content-Encoding: gzip``
    inflated), streamed to disk part by part; answers ``[{"name", "type": "file", "path"}]``."""

    _error: KernelHubError | None = None
    _parser: MultipartParser | None = None
    _raw: UploadWriter | None = None
    _inflate: Any = None

    def body_limit(self) -> int | None:
        # Each file is held to max_file_mb as it is written; the body itself streams to disk.
        return None

    async def prepare(self) -> None:  # type: ignore[override]
        self._ops: list[tuple[str, Any]] = []
        self._written: list[dict[str, str]] = []
        self._writer: UploadWriter | None = None
        await super().prepare()
        _user(self)
        if self.request.method != "POST":
            return
        ctype, params = parse_options_header(self.request.headers.get("Content-Type", ""))
        try:
            if ctype == b"multipart/form-data":
                boundary = params.get(b"boundary")
                if not boundary:
                    raise InvalidRequest("A multipart upload needs its boundary.")
                self._parser = self._multipart(boundary)
            else:
                rel = workspace_path(self.get_query_argument("path", ""))
                encoding = self.request.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("identity", "gzip"):
                    raise InvalidRequest(f"Content-Encoding {encoding[:32]!r} is not supported; send gzip or none.")
                if encoding == "gzip":
                    self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._raw = self.hub.open_upload(self.tenant, self.sandbox_id, rel)
                self._written.append({"name": posixpath.basename(rel), "type": "file", "path": e2b_path(rel)})
        except KernelHubError as exc:
            self._error = exc  # answered once the body is read: closing on an unread body can lose the answer

    def _multipart(self, boundary: bytes) -> MultipartParser:
        headers: dict[bytes, bytes] = {}
        current = [b"", b""]

        def on_header_field(data: bytes, start: int, end: int) -> None:
            current[0] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            current[1] += data[start:end]

        def on_header_end() -> None:
            headers[current[0].strip().lower()] = current[1].strip()
            current[0] = current[1] = b""

        def on_headers_finished() -> None:
            _, options = parse_options_header(headers.get(b"content-disposition", b""))
            headers.clear()
            name = options.get(b"name", b"").decode(errors="replace")
            filename = options.get(b"filename", b"").decode(errors="replace").replace("%22", '"')
            self._ops.append(("begin", (name, filename)))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            self._ops.append(("data", data[start:end]))

        def on_part_end() -> None:
            self._ops.append(("end", None))

        return MultipartParser(boundary, {
            "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
        })

    async def data_received(self, chunk: bytes) -> None:  # type: ignore[override]
        if self._error is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            if self._raw is not None:
                await self._write_raw(chunk)
                return
            if self._parser is None:
                return
            self._parser.write(chunk)
            ops, self._ops = self._ops, []
            for op, value in ops:
                if op == "begin":
                    name, filename = value
                    target = self.get_query_argument("path", "") or filename
                    rel = workspace_path(target)
                    if self._writer is not None:
                        self._writer.abort()
                    self._writer = self.hub.open_upload(self.tenant, self.sandbox_id, rel)
                    self._written.append({"name": posixpath.basename(rel), "type": "file", "path": e2b_path(rel)})
                elif op == "data" and self._writer is not None:
                    await loop.run_in_executor(None, self._writer.write, value)
                elif op == "end" and self._writer is not None:
                    writer, self._writer = self._writer, None
                    await loop.run_in_executor(None, writer.finish)
        except KernelHubError as exc:
            self._error = exc
            self._abort()
        except Exception as exc:  # a malformed multipart body
            self._error = InvalidRequest(f"The multipart body could not be read: {exc}.")
            self._abort()

    async def _write_raw(self, chunk: bytes) -> None:
        assert self._raw is not None
        loop = asyncio.get_running_loop()
        if self._inflate is None:
            await loop.run_in_executor(None, self._raw.write, chunk)
            return
        data = chunk
        while data:
            try:
                out = self._inflate.decompress(data, INFLATE_STEP)
            except zlib.error as exc:
                raise InvalidRequest(f"The gzip body is not valid: {exc}.") from None
            data = self._inflate.unconsumed_tail
            if out:
                await loop.run_in_executor(None, self._raw.write, out)

    def _abort(self) -> None:
        for writer in (self._writer, self._raw):
            if writer is not None:
                writer.abort()
        self._writer = self._raw = None

    def on_connection_close(self) -> None:
        self._abort()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._abort()
        super().on_finish()

    async def post(self) -> None:
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        if self._raw is not None:
            writer, self._raw = self._raw, None
            await loop.run_in_executor(None, writer.finish)
        elif self._writer is not None:
            raise InvalidRequest("The multipart body ended inside a part.")
        if not self._written:
            raise InvalidRequest("The upload holds no file.")
        self.send_json(self._written)

    async def get(self) -> None:
        rel = workspace_path(self.get_query_argument("path", ""))
        async with self.hub.open_download(self.tenant, self.sandbox_id, rel) as download:
            await send_download(self, download)


# -- RPCs ---------------------------------------------------------------------------------------------------

def _entry_info(entry: dict[str, Any]) -> dict[str, Any]:
    """A workspace entry (:meth:`~kernelhub.sandbox.files.WorkspaceFiles.describe`) as envd's ``EntryInfo``."""
    kind = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}.get(
        entry["type"], "FILE_TYPE_UNSPECIFIED")
    owner = {0: "root"}.get(entry.get("uid", -1), bwrap.INNER_USER)
    info: dict[str, Any] = {
        "name": entry["name"] or posixpath.basename(HOME),
        "type": kind,
        "path": e2b_path(entry["path"]),
        "size": str(entry.get("size", 0)),
        "mode": entry.get("mode", 0),
        "permissions": entry.get("permissions", ""),
        "owner": owner,
        "group": owner,
        "modifiedTime": entry.get("modified"),
    }
    if "symlink_target" in entry:
        info["symlinkTarget"] = entry["symlink_target"]
        info["isSymlink"] = True
    return info


class _Rpc(RpcHandler, StreamingMixin):
    """One service's RPCs: ``POST /<service>/<Method>``, unary unless the method is in ``STREAMS``."""

    STREAMS: tuple[str, ...] = ()
    UNIMPLEMENTED: tuple[str, ...] = ()

    async def post(self, method: str) -> None:
        _user(self)
        ctype = self.request.headers.get("Content-Type", "")
        body = bytes(self.json_bytes())
        if method in self.UNIMPLEMENTED:
            raise ConnectError("unimplemented", f"{method} is not supported by kernelhub.")
        if method in self.STREAMS:
            await self._serve_stream(method, ctype, body)
            return
        call = getattr(self, f"rpc_{method}", None)
        if call is None:
            raise ConnectError("unimplemented", f"No method {method[:64]!r} here.")
        answer = await call(parse_unary(ctype, body))
        self.set_header("Content-Type", "application/json")
        self.send_json(answer)

    def json_bytes(self) -> bytearray:
        """The request body as read (capped as kernelhub's JSON bodies are)."""
        try:
            return bytearray(self.body())
        except PayloadTooLarge:
            raise ConnectError("resource_exhausted", f"A request may be at most {MAX_JSON_BODY} bytes.") from None

    async def _serve_stream(self, method: str, content_type: str, body: bytes) -> None:
        """A server stream: the answers of ``stream_<method>`` as envelopes, then the end. A codec other than
        Connect's streaming JSON is a plain 415; any other error ends the stream with it (HTTP 200, as Connect
        streams carry errors)."""
        check_codec(content_type, STREAM_JSON)  # a plain 415; the rest ends the stream
        try:
            items, keepalive, interval = await getattr(self, f"stream_{method}")(parse_envelope(content_type, body))
        except (KernelHubError, ConnectError) as exc:
            self.begin_stream(STREAM_JSON)
            self.finish(end_stream(connect_error(exc) if isinstance(exc, KernelHubError) else exc))
            return
        self.begin_stream(STREAM_JSON)
        if await self.pump(items, keepalive=keepalive, interval=interval):
            self.finish()


class FilesystemRpc(_Rpc):
    """``filesystem.Filesystem``: Stat, ListDir, MakeDir, Remove, Move."""

    UNIMPLEMENTED = ("WatchDir", "CreateWatcher", "GetWatcherEvents", "RemoveWatcher")

    async def rpc_Stat(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802 - the RPC's name
        rel = workspace_path(field(msg, "path"))
        return {"entry": _entry_info(self.hub.describe_file(self.tenant, self.sandbox_id, rel))}

    async def rpc_ListDir(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        rel = workspace_path(field(msg, "path"))
        depth = field(msg, "depth", 1) or 1
        if isinstance(depth, str) and depth.isdigit():
            depth = int(depth)
        entries = await self.hub.describe_dir(self.tenant, self.sandbox_id, rel, depth)
        return {"entries": [_entry_info(e) for e in entries]}

    async def rpc_MakeDir(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        rel = workspace_path(field(msg, "path"))
        if not self.hub.make_dir(self.tenant, self.sandbox_id, rel):
            raise ConnectError("already_exists", f"{e2b_path(rel)} already exists.")
        return {"entry": _entry_info(self.hub.describe_file(self.tenant, self.sandbox_id, rel))}

    async def rpc_Remove(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        rel = workspace_path(field(msg, "path"))
        if not rel:
            raise Forbidden(f"{HOME} itself cannot be removed.")
        await self.hub.delete_file(self.tenant, self.sandbox_id, rel)
        return {}

    async def rpc_Move(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        source = workspace_path(field(msg, "source"))
        destination = workspace_path(field(msg, "destination"))
        self.hub.move_file(self.tenant, self.sandbox_id, source, destination)
        return {"entry": _entry_info(self.hub.describe_file(self.tenant, self.sandbox_id, destination))}


def _end_event(cmd: Command) -> dict[str, Any]:
    status = cmd.exit_status if cmd.exit_status is not None else -1
    if status >= 0:
        end: dict[str, Any] = {"exitCode": status, "exited": True, "status": f"exit status {status}"}
    else:
        name = ""
        with contextlib.suppress(ValueError):
            name = (signal.strsignal(-status) or "").lower()
        end = {"exitCode": -1, "exited": False, "status": f"signal: {name or -status}"}
    if cmd.reason:
        end["error"] = {"timeout": "the command ran past its timeout", "killed": "the command was killed",
                        "oom": "the command ran out of memory"}.get(cmd.reason, cmd.reason)
    return {"event": {"end": end}}


async def _process_events(cmd: Command, *, replay: bool) -> AsyncIterator[bytes]:
    yield envelope({"event": {"start": {"pid": cmd.pid}}})
    async for kind, data in cmd.follow(replay=replay):
        if kind in ("stdout", "stderr"):
            yield envelope({"event": {"data": {kind: b64(data)}}})
        elif kind == "end":
            yield envelope(_end_event(cmd))
    yield end_stream()


class ProcessRpc(_Rpc):
    """``process.Process``: Start and Connect (streams), List, SendSignal, SendInput, CloseStdin."""

    STREAMS = ("Start", "Connect")
    UNIMPLEMENTED = ("Update", "StreamInput")

    def _keepalive(self) -> tuple[bytes, float]:
        value = self.request.headers.get("Keepalive-Ping-Interval", "")
        interval = float(value) if value.strip().isdigit() else KEEPALIVE_DEFAULT_S
        return envelope({"event": {"keepalive": {}}}), min(max(interval, 1.0), 3600.0)

    def _select(self, msg: dict[str, Any]) -> Command:
        selector = field(msg, "process")
        if not isinstance(selector, dict):
            raise InvalidRequest("process must select a pid or a tag.")
        if field(selector, "tag") is not None:
            return self.hub.find_command_tag(self.tenant, self.sandbox_id, field(selector, "tag"))
        pid = field(selector, "pid")
        cmd = self.hub.get_command(self.tenant, self.sandbox_id, pid)
        if not cmd.running:
            raise NotFound(f"Process {cmd.pid} is not running.")
        return cmd

    async def stream_Start(self, msg: dict[str, Any]) -> tuple[AsyncIterator[bytes], bytes, float]:  # noqa: N802
        config = field(msg, "process")
        if not isinstance(config, dict):
            raise InvalidRequest("process must describe the command to start.")
        if field(msg, "pty") is not None:
            raise ConnectError("unimplemented", "PTYs are not supported by kernelhub; use commands without a PTY.")
        program, args = field(config, "cmd"), field(config, "args") or []
        if not isinstance(program, str) or not isinstance(args, list):
            raise InvalidRequest("process.cmd must be a string and process.args a list of strings.")
        cwd = field(config, "cwd") or HOME
        timeout = timeout_ms(self.request.headers.get("Connect-Timeout-Ms"))
        cmd = await self.hub.start_command(self.tenant, self.sandbox_id, argv=[program, *args], cwd=cwd,
                                           env=field(config, "envs") or None, timeout_s=timeout,
                                           stdin_open=bool(field(msg, "stdin", False)), background=True,
                                           tag=field(msg, "tag"))
        keepalive, interval = self._keepalive()
        return _process_events(cmd, replay=True), keepalive, interval

    async def stream_Connect(self, msg: dict[str, Any]) -> tuple[AsyncIterator[bytes], bytes, float]:  # noqa: N802
        cmd = self._select(msg)
        keepalive, interval = self._keepalive()
        return _process_events(cmd, replay=False), keepalive, interval

    async def rpc_List(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        processes = []
        for cmd in self.hub.list_commands(self.tenant, self.sandbox_id, ended=False):
            info: dict[str, Any] = {"config": {"cmd": cmd.argv[0], "args": cmd.argv[1:], "envs": cmd.env,
                                               "cwd": cmd.cwd}, "pid": cmd.pid}
            if cmd.tag is not None:
                info["tag"] = cmd.tag
            processes.append(info)
        return {"processes": processes}

    async def rpc_SendSignal(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        cmd = self._select(msg)
        name = field(msg, "signal")
        signum = {"SIGNAL_SIGKILL": "SIGKILL", "SIGNAL_SIGTERM": "SIGTERM", 9: "SIGKILL", 15: "SIGTERM"}.get(name)
        if signum is None:
            raise InvalidRequest("signal must be SIGNAL_SIGKILL or SIGNAL_SIGTERM.")
        await self.hub.signal_command(self.tenant, self.sandbox_id, cmd.pid, signum)
        return {}

    async def rpc_SendInput(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        cmd = self._select(msg)
        data = field(msg, "input")
        if not isinstance(data, dict):
            raise InvalidRequest("input must hold stdin.")
        if field(data, "pty") is not None:
            raise ConnectError("unimplemented", "PTYs are not supported by kernelhub.")
        await self.hub.command_stdin(self.tenant, self.sandbox_id, cmd.pid, unb64(field(data, "stdin", ""),
                                                                                     "input.stdin"))
        return {}

    async def rpc_CloseStdin(self, msg: dict[str, Any]) -> dict[str, Any]:  # noqa: N802
        cmd = self._select(msg)
        await self.hub.command_stdin(self.tenant, self.sandbox_id, cmd.pid, None, eof=True)
        return {}


def _rpc_route(service: str) -> str:
    return service.replace(".", r"\.") + r"/(\w+)"


default_handlers: list[tuple[SandboxPort, type, dict[str, Any]]] = [
    (SandboxPort(ENVD_PORT, "/health"), HealthHandler, {}),
    (SandboxPort(ENVD_PORT, "/files"), FilesHandler, {}),
    (SandboxPort(ENVD_PORT, _rpc_route("filesystem.Filesystem")), FilesystemRpc, {}),
    (SandboxPort(ENVD_PORT, _rpc_route("process.Process")), ProcessRpc, {}),
]
