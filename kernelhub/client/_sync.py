"""The synchronous client: :class:`Sandbox` over urllib (REST) and ``websockets.sync`` (streamed code)."""

from __future__ import annotations

import builtins
import json
import time
import urllib.error
import urllib.request
import uuid
from types import TracebackType
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as ws_connect

from . import _api
from .errors import (
    GatewayConnectionError,
    KernelHubError,
    NotFoundError,
    RequestTimeoutError,
    error_class,
    error_from_response,
)
from .models import CommandExitError, CommandResult, Execution, ExecutionStream, TerminalOutput


class ApiClient:
    """A thin synchronous caller of the REST API (API.md) for one gateway URL and API key.

    Answers parsed JSON (``None`` for 204) or bytes for raw calls; raises the typed errors of
    :mod:`kernelhub.client.errors`.
    """

    def __init__(self, url: str | None = None, token: str | None = None,
                 request_timeout: float | None = None) -> None:
        self.url = _api.resolve_url(url)
        self.token = _api.resolve_token(token)
        self.request_timeout = request_timeout or _api.DEFAULT_REQUEST_TIMEOUT

    def call(self, call: _api.Call) -> Any:
        request = urllib.request.Request(call.url(self.url), data=call.payload(), method=call.method,
                                         headers=call.headers(self.token))
        timeout = max(call.timeout or 0, self.request_timeout)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, body = response.status, response.read()
                ctype = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            with err:
                raise error_from_response(err.code, err.read()) from None
        except TimeoutError:
            raise RequestTimeoutError(f"No answer from {self.url} within {timeout:g} s.", status=0) from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):
                raise RequestTimeoutError(f"No answer from {self.url} within {timeout:g} s.", status=0) from None
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {reason}") from None
        if call.raw:
            return body
        if status == 204 or not body:
            return None
        if "json" not in ctype:
            raise KernelHubError(f"The gateway answered {ctype or 'no content type'} where JSON was expected.",
                                 status=status)
        return json.loads(body)

    def stream_execute(self, sandbox_id: str, message: dict[str, Any], stream: ExecutionStream,
                       timeout_s: float | None) -> Execution:
        """Run code over ``WS /v1/sandboxes/{id}/stream``, feeding every event to ``stream`` and calling its
        callbacks as they arrive; answers the ended execution."""
        request_id = uuid.uuid4().hex
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        deadline = time.monotonic() + _api.execution_timeout(timeout_s)
        try:
            with ws_connect(_api.ws_url(self.url, _api.stream_path(sandbox_id)), additional_headers=headers,
                            open_timeout=self.request_timeout, max_size=None, close_timeout=2) as ws:
                ws.send(json.dumps({**message, "type": "execute", "request_id": request_id}))
                while not stream.done:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimeoutError("The execution did not end in time; it may still be running.",
                                                  status=0)
                    try:
                        raw = ws.recv(timeout=remaining)
                    except TimeoutError:
                        continue
                    event = json.loads(raw)
                    if not isinstance(event, dict) or event.get("request_id") not in (None, request_id):
                        continue
                    _raise_request_error(event)
                    for callback, arg in stream.feed(event):
                        callback(arg)
        except KernelHubError:
            raise  # already typed (a rejected request, a timeout of our own): some derive from OSError
        except InvalidStatus as err:
            raise error_from_response(err.response.status_code, err.response.body or b"") from None
        except ConnectionClosed as err:
            if stream.done:
                return stream.execution
            raise GatewayConnectionError(f"The gateway closed the stream before the execution ended ({err}).")\
                from None
        except (InvalidHandshake, OSError) as err:
            if isinstance(err, TimeoutError):
                raise RequestTimeoutError(f"No answer from {self.url} in time.", status=0) from None
            raise GatewayConnectionError(f"Cannot reach the gateway at {self.url}: {err}") from None
        return stream.execution


def _raise_request_error(event: dict[str, Any]) -> None:
    """A ``rejected`` message is the gateway refusing the request itself (unknown session, bad timeout…),
    as opposed to an ``error`` event, which is the code raising."""
    if event.get("type") == "rejected":
        code = event.get("error") if isinstance(event.get("error"), str) else None
        cls = error_class(code, 0)
        raise cls(str(event.get("message") or "The gateway refused the execution."), error=code or cls.error,
                  status=cls.status, body=event)


class Files:
    """``sandbox.files``: the sandbox's ``/workspace``. Paths are relative to it."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def write(self, path: str, data: str | bytes) -> dict[str, Any]:
        """Create or replace a file (parents are made); answers ``{path, size}``."""
        payload = data.encode() if isinstance(data, str) else bytes(data)
        return self._sandbox._call(_api.write_file(self._sandbox.id, path, payload))  # type: ignore[no-any-return]

    def read(self, path: str, format: str = "text") -> Any:
        """A file's content: ``format="text"`` (UTF-8, the default) or ``"bytes"``."""
        if format not in ("text", "bytes"):
            raise ValueError('format must be "text" or "bytes"')
        data = self._sandbox._call(_api.read_file(self._sandbox.id, path))
        return data.decode() if format == "text" else data

    def list(self, path: str = "") -> list[dict[str, Any]]:
        """The entries of a directory: ``[{name, path, type, size, modified}]``."""
        return list(self._sandbox._call(_api.list_files(self._sandbox.id, path))["entries"])

    def remove(self, path: str) -> None:
        """Delete a file or directory (recursively)."""
        self._sandbox._call(_api.delete_file(self._sandbox.id, path))

    def exists(self, path: str) -> bool:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e["name"] == name for e in self.list(parent))
        except NotFoundError:
            return False


class Commands:
    """``sandbox.commands``: shell commands (bash) in the sandbox, in ``/workspace`` by default."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def run(self, cmd: str, *, cwd: str | None = None, env: dict[str, str] | None = None,
            timeout: float | None = None, stdin: str | None = None, check: bool = False) -> CommandResult:
        """Run ``cmd`` to its end; ``check=True`` raises :class:`CommandExitError` on a non-zero exit."""
        answer = self._sandbox._call(_api.run_command(self._sandbox.id, cmd, cwd=cwd, env=env, timeout_s=timeout,
                                                      stdin=stdin))
        result = CommandResult.from_dict(answer)
        if check and result.exit_code != 0:
            raise CommandExitError(result)
        return result


class Sessions:
    """``sandbox.sessions``: more kernels (any language) or terminals in the same sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def create(self, type: str = "jupyter", language: str | None = None) -> dict[str, Any]:
        """Start a session; answers ``{id, sandbox_id, type, language?, state}``."""
        return self._sandbox._call(_api.create_session(self._sandbox.id, type, language))  # type: ignore[no-any-return]

    def execute(self, session_id: str, input: str, *, timeout: float | None = None) -> Execution | TerminalOutput:
        """Code for a jupyter session (answers an :class:`Execution`) or keystrokes for a terminal
        (answers its :class:`TerminalOutput`)."""
        answer = self._sandbox._call(_api.session_execute(session_id, input, timeout))
        if "output" in answer and "status" not in answer:
            return TerminalOutput(output=answer["output"], raw=answer)
        return Execution.from_dict(answer)

    def close(self, session_id: str) -> None:
        self._sandbox._call(_api.close_session(session_id))


class Sandbox:
    """A kernelhub sandbox, in the manner of E2B's ``Sandbox``.

    ``with Sandbox.create() as sandbox:`` makes one and kills it on exit. The gateway is ``url`` (else
    ``KERNELHUB_URL``, else ``http://127.0.0.1:8888``) and the API key ``token`` (else ``KERNELHUB_TOKEN``).
    """

    def __init__(self, info: dict[str, Any], api: ApiClient) -> None:
        self._info = info
        self._api = api
        self.files = Files(self)
        self.commands = Commands(self)
        self.sessions = Sessions(self)

    # -- making and finding ---------------------------------------------------------------------------

    @classmethod
    def create(cls, template: str = "python", *, limits: dict[str, Any] | None = None,
               env: dict[str, str] | None = None, metadata: dict[str, Any] | None = None,
               network: str | None = None, timeout: float | None = None, url: str | None = None,
               token: str | None = None, request_timeout: float | None = None) -> Sandbox:
        """Start a sandbox. ``timeout`` is how long it may live, in seconds (``limits.max_lifetime_s``, as
        E2B's ``timeout``); ``request_timeout`` bounds each HTTP request."""
        api = ApiClient(url, token, request_timeout)
        if timeout is not None:
            limits = {**(limits or {}), "max_lifetime_s": timeout}
        return cls(api.call(_api.create_sandbox(template, limits, env, metadata, network)), api)

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, token: str | None = None,
                request_timeout: float | None = None) -> Sandbox:
        """Attach to an existing sandbox of this key (raises :class:`NotFoundError` if there is none)."""
        api = ApiClient(url, token, request_timeout)
        return cls(api.call(_api.get_sandbox(sandbox_id)), api)

    @classmethod
    def list(cls, *, url: str | None = None, token: str | None = None) -> list[dict[str, Any]]:
        """Every sandbox of this key, as the gateway describes them."""
        return list(ApiClient(url, token).call(_api.list_sandboxes())["sandboxes"])

    # -- what it is -----------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return str(self._info["id"])

    sandbox_id = id

    @property
    def template(self) -> str:
        return str(self._info.get("template", ""))

    def info(self) -> dict[str, Any]:
        """The sandbox as the gateway sees it now: ``{id, template, state, limits, sessions, …}``."""
        self._info = self._call(_api.get_sandbox(self.id))
        return dict(self._info)

    def is_running(self) -> bool:
        try:
            return self.info().get("state") == "running"
        except NotFoundError:
            return False

    def metrics(self) -> dict[str, Any]:
        """CPU, memory, pids and disk usage against the sandbox's limits."""
        return self._call(_api.sandbox_metrics(self.id))  # type: ignore[no-any-return]

    def logs(self, lines: int = 100) -> builtins.list[str]:
        """The last ``lines`` lines of the sandbox's log (kernel stderr, launcher messages)."""
        return builtins.list(self._call(_api.sandbox_logs(self.id, lines))["lines"])

    # -- running code ---------------------------------------------------------------------------------

    def run_code(self, code: str, language: str | None = None, *, session_id: str | None = None,
                 on_stdout: Any = None, on_stderr: Any = None, on_result: Any = None, on_error: Any = None,
                 timeout: float | None = None, env: dict[str, str] | None = None) -> Execution:
        """Run code in the sandbox's kernel, streaming over the websocket: ``on_stdout``/``on_stderr`` get
        text chunks in order, ``on_result`` each :class:`Result`, ``on_error`` the :class:`ExecutionError`.
        Answers the ended :class:`Execution`; a timeout shows as ``status == "timeout"``, not an exception."""
        message: dict[str, Any] = {"code": code}
        for key, value in (("language", language), ("session_id", session_id), ("timeout_s", timeout),
                           ("env", env)):
            if value is not None:
                message[key] = value
        stream = ExecutionStream(on_stdout=on_stdout, on_stderr=on_stderr, on_result=on_result,
                                 on_error=on_error)
        return self._api.stream_execute(self.id, message, stream, timeout)

    def get_execution(self, execution_id: str) -> Execution:
        """An execution by id, ended or not (``execution_status``)."""
        return Execution.from_dict(self._call(_api.get_execution(execution_id)))

    # -- ending ---------------------------------------------------------------------------------------

    def kill(self) -> None:
        """Stop the sandbox and free everything it held. Killing one already gone is not an error."""
        try:
            self._call(_api.delete_sandbox(self.id))
        except NotFoundError:
            pass

    def close(self) -> None:
        """Nothing to release for the sync client; present for symmetry with :class:`AsyncSandbox`."""

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} template={self.template!r} url={self._api.url!r}>"

    def _call(self, call: _api.Call) -> Any:
        return self._api.call(call)
