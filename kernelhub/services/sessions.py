"""Jupyter sessions: a kernel inside a sandbox, and the one-at-a-time execution loop around it.

A :class:`JupyterSession` owns a jupyter_client ``AsyncKernelManager`` whose provisioner starts the kernel in
the sandbox (``start_kernel(sandbox=...)``), a client on the kernel's ipc sockets, and readers that route
iopub/shell/stdin messages to the running :class:`~kernelhub.services.executions.Execution`. Executions are
queued one at a time per kernel (tslab loses replies when requests are pipelined, KERNELS.md).

Created, started and closed by :class:`~kernelhub.services.sandboxes.Sandboxes` (``sandbox_create``,
``session_create``, ``session_close``, sandbox stop); executions are run and interrupted by
:class:`~kernelhub.services.executor.Executor`, kernels interrupted and restarted by
:class:`~kernelhub.services.kernels.Kernels`; the Jupyter API's websocket talks to the kernel's sockets itself.

How an execution ends (:meth:`JupyterSession._run`):

- *Done* is the kernel's own pair of markers: ``execute_reply`` on shell and ``status: idle`` on iopub, which
  the kernel publishes after every output of the request. The two sockets are not ordered with each other, so
  when one marker is in and the other is not, a ``kernel_info_request`` goes out as a barrier: the kernel
  answers it after the missing reply (shell is ordered) and publishes its status after the missing idle (iopub
  is ordered). Either marker or its barrier completes that half; only when both were lost (tslab now and then
  drops messages, KERNELS.md) does a grace of iopub silence end the wait.
- A request the kernel refused without running it (``"abort"``: tslab's window of about 200 ms after an error;
  ``"aborted"``: ipykernel after another client's error) is sent again after a wait, a bounded number of times.
- An interrupt (:meth:`JupyterSession.interrupt`) sends SIGINT; a kernel that has not stopped within
  :data:`INTERRUPT_GRACE_S` (ipykernel ignores SIGINT during a top-level ``await``, KERNELS.md) is restarted, and
  the execution ends ``killed``/``interrupted`` with the kernel's state lost. The same escalation ends a
  timeout and output past the cap (``error``/``output_truncated`` at once, the kernel kept when it stops).
- An ``input_request`` (stdin) is passed on only after a ``kernel_info_request`` on control has had its status
  published on iopub, so that what the cell printed before asking reaches the listeners first.

What the kernel sends is untrusted (SECURITY.md pitfall 12). Every socket to it reads through the kernel's channel
guard (:mod:`kernelhub.sandbox.channel_guard`, bounds from :func:`channel_bounds`): a message past the bound is
cut before the gateway allocates it, and so is a socket past its messages a second (small messages cost the
gateway's loop as much as large ones, and the envelope of each is not counted below), and the kernel is restarted
with the reason in ``sandbox_logs``
(:meth:`JupyterSession._violated`). Every message this session reads counts, beyond its envelope, against the
running execution's output cap (:meth:`JupyterSession._count`), or else against :attr:`JupyterSession.flood`;
malformed ones are dropped into the sandbox's :class:`~kernelhub.sandbox.channel_guard.DropLog`.

What one kernel costs the gateway (measured here): no thread (all kernels share one ZeroMQ context, whose two
threads the gateway has once); 26 descriptors (five sockets: this session's four and jupyter_client's own
control socket, each a ZeroMQ socket of two descriptors and a guard link of three, and the kernel's log pipe);
each Jupyter API websocket adds 21 (four sockets and its own); and at most the guard's window
(:func:`channel_bounds`, 16 MiB by default) of the kernel's messages per socket, held only while the gateway is
not reading them. The sandbox around it adds one thread (asyncio's child watcher waits on its launcher).

Messages go out through the asyncio socket's own ``send_multipart`` (:func:`send_message`), never through
jupyter_client's ``Session.send``: that one writes on a synchronous shadow of an asyncio socket, which takes the
socket's edge-triggered wake-up without telling pyzmq's event loop, and a reply that came in at that moment is
never read (the socket stays deaf until something else wakes it). The Jupyter API's websocket relay sends the
same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import shlex
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import zmq
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.session import DELIM, Session

from ..errors import InvalidRequest, SandboxError
from ..models import new_id
from ..sandbox.channel_guard import MESSAGE_BURST, MESSAGES_PER_S, ChannelBounds, TokenBucket
from ..sandbox.kernel_manager import GuardedKernelManager
from ..sandbox.limits import Limits
from .executions import Displays, Execution

if TYPE_CHECKING:
    from ..sandbox.sandbox import Sandbox

log = logging.getLogger("kernelhub.sessions")

#: Session languages (API.md) and the kernelspec each starts.
KERNELSPECS = {
    "python": "kernelhub-python",
    "node": "kernelhub-javascript",
    "javascript": "kernelhub-javascript",
    "typescript": "kernelhub-typescript",
    "bash": "kernelhub-bash",
}
LANGUAGES = ("python", "node", "typescript", "bash")

#: Seconds of iopub silence after which a request whose other "done" marker and barrier were both lost ends.
DONE_GRACE_S = 1.0
#: How long one "done" marker waits for the other before a barrier request goes out (see the module docstring).
BARRIER_AFTER_S = 0.05
#: After an interrupt, how long the kernel has to stop before it is restarted. Measured here under load: a
#: KeyboardInterrupt takes ipykernel up to about a second to format and publish.
INTERRUPT_GRACE_S = 5.0
#: How long an interrupt waits for the kernel to show it runs the current execution (see :meth:`interrupt`).
INTERRUPT_WAIT_S = 2.0
#: Waits before sending again a request the kernel refused unrun ("abort"/"aborted"); tslab refuses for about
#: 200 ms after an error (KERNELS.md). One more attempt than there are waits.
ABORT_RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)
#: Reply statuses that mean "not run".
REFUSED = ("abort", "aborted")
#: The error name each language reports when its kernel gives none (bash_kernel's exit status).
DEFAULT_ERROR_NAMES = {"bash": "BashError"}
_JS_ERROR_LINE = re.compile(r"^(?:Uncaught )?((?:[A-Za-z_$][\w$.]*)?(?:Error|Exception))(?:: ?(.*))?$")
_TS_DIAGNOSTIC = re.compile(r"^(?:\S+ )?\d+:\d+ - (.*)$")

#: The smallest bound on one message from a kernel (bytes, all its frames): a sandbox's output cap, when that is
#: larger, plus room for the message's envelope. Anything larger restarts the kernel (see :func:`channel_bounds`).
MIN_MESSAGE_BYTES = 16 * 1024 * 1024
#: Bytes of each message from a kernel that are not counted against an execution's output cap: the envelope
#: (identities, signature, header, parent header, metadata) of an ordinary message is about 700 bytes. What a
#: message holds beyond this counts, whatever its type, so that junk the gateway only parses and drops is bounded
#: like output it keeps.
ENVELOPE_BYTES = 2048
#: Channels the gateway reads from a kernel, in the order they are opened.
CHANNELS = ("iopub", "shell", "stdin", "control")
#: Messages a Jupyter kernel may send (Jupyter's messaging spec, 5.4); any other type is dropped and counted.
KNOWN_TYPES = frozenset({
    "execute_reply", "inspect_reply", "complete_reply", "history_reply", "is_complete_reply", "comm_info_reply",
    "kernel_info_reply", "shutdown_reply", "interrupt_reply", "debug_reply", "connect_reply", "object_info_reply",
    "stream", "display_data", "update_display_data", "execute_input", "execute_result", "error", "status",
    "clear_output", "debug_event", "comm_open", "comm_msg", "comm_close", "input_request", "pyout", "pyerr",
    "pyin", "data_pub", "usage_reply",
    # ipykernel 7's iopub socket greets each new subscriber (an XPUB welcome message).
    "iopub_welcome",
})

_DISK_ERRORS = re.compile(
    r"\[Errno (27|28|122)\]|No space left on device|Disk quota exceeded|File too large|ENOSPC|EDQUOT|EFBIG"
)
_PIDS_ERRORS = re.compile(r"\[Errno 11\]|Resource temporarily unavailable|EAGAIN|fork: retry")


#: Run silently in every python kernel once it answers (start and restart). IPython 9 keeps each write to
#: stdout/stderr of every cell in ``history_manager.outputs`` for the kernel's lifetime (``InteractiveShell._tee``,
#: for ``%notebook``): a cell printing 3 million lines filled a 256 MB sandbox and the next cell died of oom.
#: Measured: 60,000 ``print(i)`` retained 60,001 strings (3.2 MB) there. Outputs still reach the client.
PYTHON_SETUP = """\
def _kh_setup():
    import contextlib
    shell = get_ipython()
    if shell is not None and hasattr(shell, "_tee"):
        shell._tee = lambda channel: contextlib.nullcontext()
_kh_setup()
del _kh_setup
"""


def env_snippet(language: str, values: Mapping[str, str | None]) -> str:
    """Code that sets (or, for None, removes) environment variables in a running kernel's process."""
    if language == "python":
        return (f"import os as _kh_os\nfor _kh_k, _kh_v in {dict(values)!r}.items():\n"
                "    _kh_os.environ.pop(_kh_k, None) if _kh_v is None else "
                "_kh_os.environ.__setitem__(_kh_k, _kh_v)\ndel _kh_os, _kh_k, _kh_v")
    if language in ("node", "typescript"):
        return "\n".join(
            f"delete process.env[{json.dumps(k)}];" if v is None else f"process.env[{json.dumps(k)}] = {json.dumps(v)};"
            for k, v in values.items()
        )
    if language == "bash":
        return "\n".join(f"unset {k}" if v is None else f"export {k}={shlex.quote(v)}" for k, v in values.items())
    raise InvalidRequest(f"env is not supported for {language} sessions.")


def send_message(session: Session, socket: zmq.asyncio.Socket, msg: dict[str, Any],
                 buffers: list[Any] | None = None) -> asyncio.Future[Any]:
    """Sign ``msg`` (a jupyter_client message dict) with ``session``'s key and send it on an asyncio socket
    through the socket's own ``send_multipart`` (see the module docstring for why not ``Session.send``).
    Answers the send's future: done at once unless the kernel's queue is full (a caller that must not pile up
    messages for a kernel that does not read awaits it)."""
    return _send_parts(socket, [*session.serialize(msg), *(buffers or [])])


def send_raw_message(session: Session, socket: zmq.asyncio.Socket, msg_list: list[bytes]) -> asyncio.Future[Any]:
    """Like :func:`send_message` for a message already packed as ``[header, parent, metadata, content,
    *buffers]`` (the websocket's v1 framing), as ``Session.send_raw`` would sign it."""
    return _send_parts(socket, [DELIM, session.sign(msg_list[:4]), *msg_list])


def _send_parts(socket: zmq.asyncio.Socket, parts: list[Any]) -> asyncio.Future[Any]:
    sent: asyncio.Future[Any] = socket.send_multipart(parts)  # type: ignore[assignment]
    # A send that fails later (the socket closed) is logged.
    sent.add_done_callback(_log_send_failure)
    return sent


def _log_send_failure(sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.debug("a kernel message was not sent: %s", sent.exception())


def error_object(language: str, content: Mapping[str, Any], stderr: str = "", last_stderr: str = "") -> dict[str, Any]:
    """``{name, value, traceback}`` for an execution that ended in error, never with an empty name or value.

    ``content`` is an ``error`` message's or an ``execute_reply``'s content (``ename``, ``evalue``,
    ``traceback``). bash_kernel sends ``ename: ""`` and the exit status as ``evalue``. tslab (node, typescript)
    sends no error at all: it prints the JavaScript error on stderr with one ``console.error(e)`` (``last_stderr``,
    the last stderr text of the execution), and a program that does not compile as one line per TypeScript
    diagnostic (``stderr``, all of it); see :func:`_js_error`."""
    name = str(content.get("ename") or "")
    value = str(content.get("evalue") or "")
    traceback = [str(t) for t in content.get("traceback") or []][:200]
    if not name and language in ("node", "typescript"):
        name, value, traceback = _js_error(stderr, last_stderr) or ("", value, traceback)
    if not name:
        name = DEFAULT_ERROR_NAMES.get(language, "Error")
    if language == "bash" and value.isdigit():
        value = f"The last command exited with status {value}."
    if not value:
        value = "The execution was interrupted." if name == "KeyboardInterrupt" else f"{name} (no message)."
    return {"name": name, "value": value, "traceback": traceback}


def _js_error(stderr: str, last_stderr: str) -> tuple[str, str, list[str]] | None:
    """Name, message and lines of the error tslab printed. Node prints an uncaught ``Error`` as the source line
    it came from, then ``Name: message`` (a message may span lines), then ``    at ...`` frames; a thrown value
    that is not an Error as itself; tslab prints each TypeScript diagnostic as ``line:col - message``."""
    chunk = last_stderr.strip("\n").splitlines()
    if not chunk:
        return None
    if _TS_DIAGNOSTIC.match(chunk[0]):
        lines = [line for line in stderr.splitlines() if _TS_DIAGNOSTIC.match(line)][:200]
        return "CompileError", "\n".join(m.group(1) for m in map(_TS_DIAGNOSTIC.match, lines) if m), lines
    for i, line in enumerate(chunk):
        found = _JS_ERROR_LINE.match(line)
        if found:
            more = itertools.takewhile(lambda rest: not rest.lstrip().startswith("at "), chunk[i + 1:])
            value = "\n".join([found.group(2) or "", *more]).strip()
            return found.group(1), value, chunk[:200]
    return "Error", "\n".join(chunk).strip()[:2000], chunk[:200]


def channel_bounds(limits: Limits, messages_per_s: float = MESSAGES_PER_S,
                   message_burst: int = MESSAGE_BURST) -> ChannelBounds:
    """What a kernel of a sandbox with ``limits`` may send the gateway: one message (all its frames) of at most
    its output cap or :data:`MIN_MESSAGE_BYTES`, whichever is larger, plus an envelope's room; as much again
    passed on to one gateway socket and not yet read; and ``messages_per_s`` messages a second on each socket, in
    bursts of ``message_burst`` (:class:`~kernelhub.sandbox.channel_guard.ChannelBounds`; the sandbox factory's
    ``kernel_messages_per_s`` and ``kernel_message_burst``)."""
    largest = max(limits.output_bytes, MIN_MESSAGE_BYTES) + 64 * 1024
    return ChannelBounds(max_message=largest, window=largest, messages_per_s=messages_per_s,
                         message_burst=message_burst)


def parse_message(session: Session, parts: list[bytes]) -> dict[str, Any]:
    """A message read from a kernel's socket, signature checked and every field of the shape the gateway relies
    on (header, parent_header, metadata and content objects, a string msg_type); raises :class:`ValueError` with
    the reason otherwise (jupyter_client's own errors are turned into one)."""
    try:
        _, msg_list = session.feed_identities(parts)
        msg: dict[str, Any] = session.deserialize(msg_list)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any field of the kernel's message may fail to parse
        raise ValueError(f"{type(exc).__name__}: {str(exc)[:120]}") from None
    for key in ("header", "parent_header", "metadata", "content"):
        if not isinstance(msg.get(key), dict):
            raise ValueError(f"its {key} is not a JSON object")
    if not isinstance(msg.get("msg_type"), str) or msg["msg_type"] not in KNOWN_TYPES:
        raise ValueError(f"an unknown message type {str(msg.get('msg_type'))[:40]!r}")
    return msg


def kernelspec_for(language: str) -> str:
    try:
        return KERNELSPECS[language]
    except KeyError:
        raise InvalidRequest(
            f"Unknown language {language!r}; use one of {', '.join(LANGUAGES)}."
        ) from None


class _Request:
    """One ``execute_request`` in flight, the execution its outputs go to (None for bookkeeping code), and the
    markers of its end (see the module docstring)."""

    def __init__(self, msg_id: str, ex: Execution | None) -> None:
        loop = asyncio.get_running_loop()
        self.msg_id = msg_id
        self.ex = ex
        self.reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.idle = asyncio.Event()
        #: The kernel runs it: execute_input or an output came (an "abort" after this is not a refusal).
        self.begun = asyncio.Event()
        self.barrier_id: str | None = None
        self.barrier_reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.barrier_seen = asyncio.Event()


class JupyterSession:
    """A kernel in a sandbox. Created and started by the hub; closed by the hub or with its sandbox."""

    type: Literal["jupyter"] = "jupyter"

    def __init__(self, sandbox: Sandbox, language: str, kernel_spec_manager: KernelSpecManager) -> None:
        self.id = new_id("se")
        self.sandbox = sandbox
        self.sandbox_id = sandbox.id
        self.language = "node" if language == "javascript" else language
        self.kernel_name = kernelspec_for(language)
        self.state = "starting"
        self.bounds = channel_bounds(sandbox.limits, sandbox.factory.kernel_messages_per_s,
                                     sandbox.factory.kernel_message_burst)
        output = sandbox.limits.output_bytes
        self.flood = TokenBucket(2 * output + self.bounds.max_message, output)
        self.km = GuardedKernelManager(kernel_name=self.kernel_name, kernel_spec_manager=kernel_spec_manager,
                                       bounds=self.bounds, on_violation=self._violated)
        #: This session's own sockets to the kernel, by channel (while connected).
        self.sockets: dict[str, Any] = {}
        #: Set when the kernel sent something past its bounds; the reason says what (see :meth:`_violated`).
        self._violation = asyncio.Event()
        self._violation_reason = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_activity = time.time()
        self.execution_state = "starting"
        self.displays = Displays()
        self._lock = asyncio.Lock()
        self._request: _Request | None = None
        self._interrupted = False
        self._escalate = asyncio.Event()
        self._shell_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: Barrier requests whose iopub status is awaited (see :meth:`_iopub_barrier`), by msg_id.
        self._iopub_markers: dict[str, asyncio.Event] = {}
        self._readers: list[asyncio.Task[None]] = []
        self.restarts = 0
        #: Called with ``"restarting"`` and then ``"restarted"`` around every restart of the kernel, whatever
        #: asked for it (the Jupyter API's kernels service holds its websockets' messages meanwhile).
        self.restart_listeners: list[Callable[[str], Awaitable[None]]] = []
        self._iopub_seen = asyncio.Event()
        #: iopub messages handled so far, and whether one is being handled now (its listeners may be slow).
        self._iopub_handled = 0
        self._iopub_handling = False

    @property
    def kernel_id(self) -> str | None:
        return self.km.kernel_id

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sandbox_id": self.sandbox_id, "type": "jupyter", "language": self.language,
                "state": self.state, "kernel_id": self.kernel_id}

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the kernel in the sandbox and wait for its first ``kernel_info_reply`` (KERNELS.md: the
        earliest moment it is usable)."""
        try:
            await self.km.start_kernel(sandbox=self.sandbox)
            await self._connect()
        except BaseException:
            self.state = "failed"
            with contextlib.suppress(Exception):
                await self._shutdown_kernel()
            raise
        self.state = "running"
        self.execution_state = "idle"

    async def hand_over(self, env: Mapping[str, str]) -> None:
        """Called by the pool when it hands this started kernel (the first session of a pre-started sandbox)
        to its owner, before any of the owner's code runs: ``env`` is set in the kernel's own environment by
        a silent request (no execution count, no history, no output), and the hand-out counts as the
        session's first activity. Raises what a silent request raises (SandboxError, TimeoutError)."""
        if env:
            await self._run_silent(env_snippet(self.language, env))
        self.last_activity = time.time()

    async def set_env(self, env: Mapping[str, str]) -> None:
        """Set ``env`` in the running kernel's own environment for good, in turn with executions: after the
        one running, before those that come later (call it in a task of its own: it waits for that turn). A
        silent request (no execution count, no history, no output). Called when a sandbox first gets egress
        (the proxy variables). Raises what a silent request raises (SandboxError, TimeoutError)."""
        async with self._lock:
            await self._run_silent(env_snippet(self.language, env))

    async def _connect(self, timeout: float = 60.0) -> None:
        km, identity = self.km, self.km.session.bsession
        # shell, stdin and control share the session's identity, as jupyter_client's clients do: the kernel sends
        # an input_request to the stdin socket of the identity that sent the execute_request.
        self.sockets = {"iopub": km.connect_iopub(), "shell": km.connect_shell(identity=identity),
                        "stdin": km.connect_stdin(identity=identity), "control": km.connect_control(identity=identity)}
        handlers = {"iopub": self._on_iopub, "shell": self._on_shell, "stdin": self._on_stdin,
                    # Control replies (to the barriers) are read and dropped like unawaited shell replies.
                    "control": self._on_shell}
        self._readers = [asyncio.ensure_future(self._read(channel, handlers[channel])) for channel in CHANNELS]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._iopub_seen = asyncio.Event()
        while True:
            _, fut = self._send_shell("kernel_info_request", {})
            try:
                await asyncio.wait_for(fut, 0.5)
                # The reply came on shell; iopub is a separate subscription that may join later (ZeroMQ's slow
                # joiner), and output published before it joins is lost. The kernel publishes a status for
                # every request, so once one has arrived, iopub is live.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._iopub_seen.wait(), 0.2)
                if self._iopub_seen.is_set():
                    if self.language == "python":
                        try:
                            await self._run_silent(PYTHON_SETUP)
                        except Exception as exc:  # the kernel works without it, only keeps more memory
                            log.warning("setting up the python kernel of %s failed: %r", self.sandbox_id, exc)
                    return
            except TimeoutError:
                pass
            if not await self.km.is_alive():
                raise SandboxError(
                    "The kernel exited while starting: " + " | ".join(self.sandbox.logs(6))
                )
            if loop.time() > deadline:
                raise SandboxError("The kernel did not answer kernel_info in time.")

    async def _disconnect(self) -> None:
        for task in self._readers:
            task.cancel()
        for task in self._readers:
            with contextlib.suppress(BaseException):
                await task
        self._readers = []
        for fut in self._shell_waiters.values():
            fut.cancel()
        self._shell_waiters.clear()
        sockets, self.sockets = self.sockets, {}
        for sock in sockets.values():
            sock.close(linger=0)

    def _send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        """Send a request on this session's ``shell``, ``stdin`` or ``control`` socket; answers its msg_id."""
        msg = self.km.session.msg(msg_type, content)
        send_message(self.km.session, self.sockets[channel], msg)
        return str(msg["header"]["msg_id"])

    def _send_shell(self, msg_type: str, content: dict[str, Any]) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        """Send a shell request; answers its msg_id and a future of its reply (cancelled if the kernel
        restarts first)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        msg_id = self._send("shell", msg_type, content)
        self._shell_waiters[msg_id] = fut
        fut.add_done_callback(lambda _: self._shell_waiters.pop(msg_id, None))
        return msg_id, fut

    async def _read(self, channel: str, handler: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Read one of this session's sockets until cancelled. Every message counts against the running
        execution's output cap before it is parsed (:meth:`_count`); one that does not parse, is badly signed or
        of no known type is dropped and counted in the sandbox's :class:`~kernelhub.sandbox.channel_guard.DropLog`
        (one log line a minute, not one a message)."""
        sock = self.sockets[channel]
        iopub = channel == "iopub"
        drops = self.sandbox.kernel_drops
        while True:
            try:
                parts = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:  # the socket was closed under the reader
                log.debug("reading the %s socket of %s: %s", channel, self.sandbox_id, exc)
                return
            self._count(sum(len(p) for p in parts))
            try:
                msg = parse_message(self.km.session, parts)
            except ValueError as exc:
                drops.note(f"{channel}: {exc}")
                continue
            # The size of its content: what a result or an error made of it keeps at most.
            msg["content_bytes"] = len(parts[-1 - len(msg.get("buffers") or [])]) if parts else 0
            self._iopub_handling = iopub
            try:
                await handler(msg)
            except Exception as exc:  # noqa: BLE001 - a message of a shape no handler expected: drop it
                drops.note(f"{channel} {msg.get('msg_type')}: {type(exc).__name__}: {str(exc)[:120]}")
            finally:
                if iopub:
                    self._iopub_handling = False
                    self._iopub_handled += 1

    def _count(self, nbytes: int) -> None:
        """Count a message of ``nbytes`` (all its frames), beyond its :data:`ENVELOPE_BYTES`, before it is
        parsed. While one of this session's executions runs, against that execution's output cap (past it the
        execution is stopped, see :meth:`Execution.received <kernelhub.services.executions.Execution.received>`),
        and a kernel that goes on sending past twice the cap and one largest message is restarted
        (:meth:`_violated`). Otherwise (code a Jupyter client sent over the websocket, a thread between cells)
        against :attr:`flood`: the sandbox's ``output_mb`` a second, in bursts of twice that and one largest
        message; a kernel that sends faster for longer is restarted."""
        billable = max(0, nbytes - ENVELOPE_BYTES)
        if not billable or self._violation.is_set():
            return
        req = self._request
        ex = req.ex if req is not None else None
        if ex is not None and not (ex.ended and not ex.truncated):
            ex.received(billable)
            if ex.received_bytes > self.flood.capacity:
                self._violated("iopub", f"more than {self.flood.capacity} bytes of messages for one execution "
                               "(twice its output cap and one largest message)")
        elif not self.flood.take(billable):
            self._violated("iopub", f"more than {self.flood.capacity} bytes of messages at more than "
                           f"{self.flood.rate:g} bytes a second (its output cap a second) outside the API's "
                           "executions")

    async def _on_iopub(self, msg: dict[str, Any]) -> None:
        self._iopub_seen.set()
        parent = msg.get("parent_header", {}).get("msg_id")
        kind = msg.get("msg_type")
        content = msg.get("content", {})
        if kind == "status" and content.get("execution_state") in ("busy", "idle", "starting"):
            self.execution_state = content["execution_state"]
        marker = self._iopub_markers.get(parent)
        if marker is not None:
            marker.set()
            return
        req = self._request
        if req is None:
            return
        if parent == req.barrier_id:
            req.barrier_seen.set()  # every iopub message of the request came before this one
            return
        if parent != req.msg_id:
            return
        if kind == "status":
            if content.get("execution_state") == "idle":
                req.idle.set()
            return
        req.begun.set()  # execute_input or output: the kernel is inside the execute handler
        if req.ex is None:
            return
        if kind == "error":
            msg = {**msg, "content": {**content, **_error_content(error_object(self.language, content))}}
        await req.ex.on_iopub(msg)

    async def _on_shell(self, msg: dict[str, Any]) -> None:
        parent = msg.get("parent_header", {}).get("msg_id")
        fut = self._shell_waiters.pop(parent, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    async def _on_stdin(self, msg: dict[str, Any]) -> None:
        if msg.get("msg_type") != "input_request":
            return
        req = self._request
        ex = req.ex if req is not None else None
        content = msg.get("content", {})
        value = ""
        if ex is not None and ex.input_handler is not None:
            # The kernel flushed its output before asking (ipykernel does), but on iopub, which is read apart
            # from stdin: let that output reach the listeners first.
            await self._iopub_barrier()
            await ex.emit({"type": "input_request", "prompt": str(content.get("prompt", "")),
                           "password": bool(content.get("password"))})
            try:
                value = await ex.input_handler(str(content.get("prompt", "")), bool(content.get("password")))
            except Exception:
                value = ""
        if self.sockets:
            self._send("stdin", "input_reply", {"value": value})

    async def _iopub_barrier(self) -> None:
        """Wait (at most :data:`DONE_GRACE_S`) until every iopub message the kernel published so far has been
        handled: a kernel_info_request on control, which ipykernel answers in its control thread even while the
        shell waits (for input), publishes its status after them."""
        msg = self.km.session.msg("kernel_info_request", {})
        msg_id = str(msg["header"]["msg_id"])
        seen = self._iopub_markers[msg_id] = asyncio.Event()
        try:
            send_message(self.km.session, self.sockets["control"], msg)
            await asyncio.wait_for(seen.wait(), DONE_GRACE_S)
        except TimeoutError:
            log.debug("the kernel published no status for the control barrier %s", msg_id)
        finally:
            self._iopub_markers.pop(msg_id, None)

    # -- execution ------------------------------------------------------------------------------------

    def _send_execute(self, code: str, ex: Execution | None) -> _Request:
        silent = ex is None
        content = {"code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
                   "allow_stdin": ex is not None and ex.input_handler is not None, "stop_on_error": False}
        msg = self.km.session.msg("execute_request", content)
        req = _Request(str(msg["header"]["msg_id"]), ex)
        self._shell_waiters[req.msg_id] = req.reply
        self._request = req
        send_message(self.km.session, self.sockets["shell"], msg)
        return req

    def _end_request(self) -> None:
        req, self._request = self._request, None
        if req is not None:
            for msg_id in (req.msg_id, req.barrier_id):
                self._shell_waiters.pop(msg_id or "", None)

    async def _run_silent(self, code: str, timeout: float = 10.0) -> None:
        """Run bookkeeping code (no outputs, no history); used around executions that carry ``env``. A
        refusal (``abort``) is waited out and sent again, as for executions."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for delay in (*ABORT_RETRY_DELAYS_S, None):
            req = self._send_execute(code, None)
            try:
                reply = await asyncio.wait_for(self._wait_done(req), max(0.0, deadline - loop.time()))
            finally:
                self._end_request()
            if delay is None or not _refused(req, reply) or loop.time() + delay > deadline:
                return
            await asyncio.sleep(delay)

    async def execute(self, ex: Execution, env: Mapping[str, str] | None = None) -> None:
        """Run ``ex`` when the kernel is free; returns when it ended. Called by the hub. ``env`` holds for
        this execution only: it is set before and put back after."""
        async with self._lock:
            if ex.ended:
                return
            self.last_activity = time.time()
            try:
                if env:
                    if self.sandbox.spec is None:
                        raise SandboxError("The sandbox is not running.")
                    from ..sandbox.bwrap import sandbox_env

                    base = sandbox_env(self.sandbox.spec)
                    await self._run_silent(env_snippet(self.language, env))
                    try:
                        await self._run(ex)
                    finally:
                        if ex.status != "timeout" and self.state == "running":
                            with contextlib.suppress(Exception):
                                await self._run_silent(
                                    env_snippet(self.language, {k: base.get(k) for k in env}))
                else:
                    await self._run(ex)
            except Exception as exc:
                log.exception("execution %s failed", ex.id)
                if not ex.ended:
                    ex.error = ex.error or {"name": "SandboxError", "value": str(exc), "traceback": []}
                    await ex.finish("killed", "sandbox_error")
            finally:
                self._end_request()
                self.last_activity = time.time()

    async def _run(self, ex: Execution) -> None:
        """Send ``ex`` to the kernel (again, after a refusal) and end it from the kernel's answer, or stop it:
        timeout, an escalated interrupt, output past the cap, the kernel dying."""
        sandbox = self.sandbox
        if ex.ended:  # cancelled while the env of the execution was being set
            return
        if sandbox.state != "running":
            ex.error = {"name": "SandboxStopped", "value": f"The sandbox is {sandbox.state}.", "traceback": []}
            await ex.finish("killed", sandbox.reason or "stopped")
            return
        if self._violation.is_set():
            await self._restart(self._violation_reason)
        elif not await self.km.is_alive():
            await self._restart("the kernel had died")
        oom0, pids0 = sandbox.oom_kills(), sandbox.pids_max_hits()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ex.timeout_s
        self._interrupted = False
        self._escalate = asyncio.Event()
        ex.displays = self.displays
        ex.mark_running()
        await ex.emit({"type": "start"})
        process = getattr(self.km.provisioner, "process", None)
        died = asyncio.ensure_future(process.wait()) if process is not None else loop.create_future()
        try:
            for delay in (*ABORT_RETRY_DELAYS_S, None):
                req = self._send_execute(ex.code, ex)
                ex.msg_id = req.msg_id
                reply = await self._supervise(ex, req, died, deadline, oom0)
                if ex.ended:
                    return
                if delay is not None and _refused(req, reply) and not self._interrupted \
                        and loop.time() + delay < deadline:
                    # Not run (tslab's window after an error, ipykernel's after another client's): wait it out.
                    log.debug("execution %s refused by the kernel; sending it again in %s s", ex.id, delay)
                    self._end_request()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._escalate.wait(), delay)
                    if not self._interrupted:
                        continue
                await self._finish_from_reply(ex, reply, oom0, pids0)
                return
        finally:
            died.cancel()

    async def _supervise(self, ex: Execution, req: _Request, died: asyncio.Future[Any], deadline: float,
                         oom0: int) -> dict[str, Any] | None:
        """Wait for ``req`` to be done and answer its reply (None if lost), unless it has to be stopped first:
        then ``ex`` is ended here."""
        loop = asyncio.get_running_loop()
        done = asyncio.ensure_future(self._wait_done(req))
        escalate = asyncio.ensure_future(self._escalate.wait())
        over = asyncio.ensure_future(ex.over_limit.wait())
        violated = asyncio.ensure_future(self._violation.wait())
        try:
            finished, _ = await asyncio.wait({done, died, escalate, over, violated},
                                             timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
            if done in finished:
                return done.result()
            if died in finished:
                await self._kernel_died(ex, oom0)
                return None
            if violated in finished:
                await self._end_for_violation(ex)
                return None
            if over in finished:
                # Output past the cap: the execution ends now, whatever the kernel does; then the kernel is
                # interrupted (kept if it stops) while this session waits for it before the next execution.
                ex.error = {"name": "OutputLimitExceeded",
                            "value": f"The execution wrote more than its output cap of {ex.output_limit} bytes "
                                     "(output_mb); it was stopped and the rest of its output dropped.",
                            "traceback": []}
                await ex.finish("error", "output_truncated")
                self.sandbox.log(f"execution {ex.id} passed its output cap; interrupting it")
                self._interrupted = True
                with contextlib.suppress(Exception):
                    await self.km.interrupt_kernel()
                await self._settle(ex, done, died, "output_truncated")
                return None
            if escalate in finished:
                # interrupt() sent SIGINT: the request ends by itself, or the kernel is restarted.
                outcome = await self._settle(ex, done, died, "interrupted")
                if outcome == "done":
                    return done.result()
                if outcome == "died":
                    await self._kernel_died(ex, oom0)
                else:
                    ex.error = {"name": "KernelRestarted",
                                "value": f"The kernel did not stop within {INTERRUPT_GRACE_S:g} s of the interrupt "
                                         "and was restarted; its state (variables, imports) was lost.",
                                "traceback": []}
                    await ex.finish("killed", "interrupted")
                return None
            # Timeout: interrupt first; if the kernel does not stop, restart it.
            self.sandbox.log(f"execution {ex.id} timed out after {ex.timeout_s}s; interrupting")
            self._interrupted = True
            with contextlib.suppress(Exception):
                await self.km.interrupt_kernel()
            outcome = await self._settle(ex, done, died, "timeout")
            if ex.error is None or outcome == "restarted":
                lost = "; the kernel did not stop and was restarted (its state was lost)" \
                    if outcome == "restarted" else ""
                ex.error = {"name": "Timeout", "value": f"The execution ran longer than {ex.timeout_s:g} s{lost}.",
                            "traceback": []}
            await ex.finish("timeout", "timeout")
            return None
        finally:
            for task in (done, escalate, over, violated):
                task.cancel()

    async def _settle(self, ex: Execution, done: asyncio.Future[Any], died: asyncio.Future[Any],
                      why: str) -> str:
        """After a SIGINT: wait up to :data:`INTERRUPT_GRACE_S` for the request to end; restart the kernel if it
        did not. Answers ``"done"``, ``"died"`` or ``"restarted"``. No second signal: a kernel that took the
        first one may still be formatting its traceback, and a second one would land in that."""
        violated = asyncio.ensure_future(self._violation.wait())
        try:
            finished, _ = await asyncio.wait({done, died, violated}, timeout=INTERRUPT_GRACE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            violated.cancel()
        if done in finished:
            return "done"
        if died in finished:
            return "died"
        if violated in finished:
            self._end_request()
            await self._restart(self._violation_reason)
            return "restarted"
        self.sandbox.log(f"execution {ex.id}: the kernel ignored the interrupt; restarting it (state lost)")
        self._end_request()
        await self._restart(why)
        return "restarted"

    async def _wait_done(self, req: _Request) -> dict[str, Any] | None:
        """Wait for ``req``'s execute_reply and idle; answers the reply (None when the kernel sent none, e.g.
        after an interrupt that landed in ipykernel's own code). See the module docstring for the barrier."""
        tasks: dict[str, asyncio.Future[Any]] = {"idle": asyncio.ensure_future(req.idle.wait())}
        try:
            await asyncio.wait({tasks["idle"], req.reply}, return_when=asyncio.FIRST_COMPLETED)
            if not (req.idle.is_set() and req.reply.done()):
                # Usually the other marker is a moment behind: no barrier for that.
                await asyncio.wait({tasks["idle"], req.reply}, timeout=BARRIER_AFTER_S,
                                   return_when=asyncio.ALL_COMPLETED)
            if not (req.idle.is_set() and req.reply.done()):
                req.barrier_id, req.barrier_reply = self._send_shell("kernel_info_request", {})
                tasks["seen"] = asyncio.ensure_future(req.barrier_seen.wait())
            while True:
                iopub_done = req.idle.is_set() or req.barrier_seen.is_set()
                shell_done = req.reply.done() or req.barrier_reply.done()
                if iopub_done and shell_done:
                    break
                waiting: set[asyncio.Future[Any]] = set()
                if not iopub_done:
                    waiting |= {tasks["idle"], tasks["seen"]}
                if not shell_done:
                    waiting |= {req.reply, req.barrier_reply}
                handled = self._iopub_handled
                finished, _ = await asyncio.wait(waiting, timeout=DONE_GRACE_S, return_when=asyncio.FIRST_COMPLETED)
                if not finished and not self._iopub_handling and self._iopub_handled == handled:
                    log.debug("request %s: its end markers and the barrier's were lost", req.msg_id)
                    break
        finally:
            for task in tasks.values():
                task.cancel()
        return req.reply.result() if req.reply.done() and not req.reply.cancelled() else None

    async def _finish_from_reply(self, ex: Execution, reply: dict[str, Any] | None, oom0: int,
                                 pids0: int) -> None:
        content = (reply or {}).get("content", {})
        if content.get("execution_count") is not None:
            ex.execution_count = content["execution_count"]
        status = content.get("status")
        if status is None:
            # No reply: the signal landed in the kernel's own code around the cell ("KeyboardInterrupt caught in
            # kernel"), which stopped it without an execute_reply.
            status = "error" if ex.error or self._interrupted else "ok"
        if status in REFUSED:
            status = "error"
        if status == "error" and ex.error is None:
            if self._interrupted:
                ex.error = {"name": "KeyboardInterrupt", "value": "The execution was interrupted.",
                            "traceback": []}
            elif content.get("status") in REFUSED:
                ex.error = {"name": "KernelRefused",
                            "value": f"The kernel answered {content['status']!r} to every attempt to run the "
                                     "code; it did not run.", "traceback": []}
            else:
                ex.keep_error(error_object(self.language, content, ex.stderr, ex.last_stderr))
        reason = None
        if status == "error" and ex.error is not None:
            text = f"{ex.error.get('name')}: {ex.error.get('value')}"
            if self._interrupted or ex.error.get("name") == "KeyboardInterrupt":
                reason = "interrupted"
            elif self.sandbox.oom_kills() > oom0 or ex.error.get("name") == "MemoryError":
                reason = "oom"
            elif self.sandbox.pids_max_hits() > pids0 or _PIDS_ERRORS.search(text):
                reason = "pids"
            elif _DISK_ERRORS.search(text) or _DISK_ERRORS.search(ex.stderr[-2000:]):
                reason = "disk"
        elif _DISK_ERRORS.search(ex.stderr[-2000:]):
            reason = "disk"
        elif self.sandbox.oom_kills() > oom0:
            reason = "oom"  # a child process was OOM-killed while the kernel carried on
        await ex.finish(status if status in ("ok", "error") else "error", reason)

    async def _kernel_died(self, ex: Execution, oom0: int) -> None:
        reason = "oom" if self.sandbox.oom_kills() > oom0 else "killed"
        self.sandbox.log(f"the {self.language} kernel died during execution {ex.id} ({reason}); restarting it")
        ex.error = ex.error or {
            "name": "KernelDied",
            "value": "The kernel ran out of memory and was restarted." if reason == "oom"
            else "The kernel died and was restarted.",
            "traceback": [],
        }
        await ex.finish("killed", reason)
        self._end_request()
        if self.sandbox.state == "running":
            with contextlib.suppress(Exception):
                await self._restart(reason)

    def _violated(self, channel: str, reason: str) -> None:
        """The kernel sent more than it may: called by the kernel's guard (one message past
        :attr:`bounds`; that connection was cut already) and by :meth:`_count` (a flood past twice the running
        execution's output cap). The kernel is restarted (its state is lost) with the reason in the sandbox's
        log: by the running execution's supervisor, which ends that execution ``killed``/``output_truncated``,
        or at once when none runs."""
        if self._violation.is_set() or self.state in ("closed", "failed"):
            return
        self._violation_reason = f"the kernel sent {reason} on its {channel} channel"
        self.sandbox.log(f"{self.language} kernel: {self._violation_reason}; restarting it (its state is lost)")
        self._violation.set()
        if self.state == "running" and not self._lock.locked():
            task = asyncio.ensure_future(self._restart_after_violation())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _restart_after_violation(self) -> None:
        async with self._lock:
            if self._violation.is_set() and self.state == "running":
                with contextlib.suppress(Exception):
                    await self._restart(self._violation_reason)

    async def _end_for_violation(self, ex: Execution) -> None:
        ex.error = {"name": "OutputLimitExceeded",
                    "value": f"Stopped: {self._violation_reason}, more than the gateway takes for an output cap of "
                             f"{ex.output_limit} bytes (output_mb). The kernel was restarted; its state (variables, "
                             "imports) was lost.", "traceback": []}
        ex.truncated = True
        await ex.finish("killed", "output_truncated")
        self._end_request()
        await self._restart(self._violation_reason)

    async def _restart(self, why: str) -> None:
        self._violation.clear()
        self.restarts += 1
        self.state = "restarting"
        await self._tell_restart("restarting")
        try:
            await self._disconnect()
            await self.km.restart_kernel(now=True)
            await self._connect()
            self.state = "running"
            self.sandbox.log(f"{self.language} kernel restarted ({why})")
        finally:
            await self._tell_restart("restarted")

    async def _tell_restart(self, event: str) -> None:
        for listener in list(self.restart_listeners):
            try:
                await listener(event)
            except Exception:
                log.exception("a restart listener of session %s failed on %s", self.id, event)

    async def interrupt(self, *, escalate: bool = False) -> None:
        """Interrupt whatever runs now (SIGINT); the kernel keeps its state. Called by the hub: with
        ``escalate`` (an execution's interrupt), a kernel that has not stopped within :data:`INTERRUPT_GRACE_S`
        is restarted and the execution ends ``killed``/``interrupted``; without it (the Jupyter API's
        interrupt), only the signal is sent, as Jupyter Server does.

        A kernel ignores SIGINT between requests (ipykernel honours it only inside a shell handler), and an
        execution is "running" from just before its request is sent: a signal sent in that gap would be
        lost and the code would run on. So the signal waits (briefly) until the kernel has shown that it
        runs the current execution."""
        req = self._request
        if self._lock.locked() and req is not None and not req.begun.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(req.begun.wait(), INTERRUPT_WAIT_S)
        running = self._lock.locked()
        self._interrupted = self._interrupted or running
        await self.km.interrupt_kernel()
        if escalate and running:
            self._escalate.set()

    async def restart(self) -> None:
        async with self._lock:
            await self._restart("requested")

    async def _shutdown_kernel(self) -> None:
        await self._disconnect()
        if self.km.has_kernel:
            with contextlib.suppress(Exception):
                await self.km.shutdown_kernel(now=True)

    async def close(self) -> None:
        """Stop the kernel; the sandbox carries on. Called by the hub on session_close and sandbox stop."""
        if self.state == "closed":
            return
        self.state = "closed"
        for task in self._tasks:
            task.cancel()
        req = self._request
        if req is not None and req.ex is not None and not req.ex.ended:
            await req.ex.finish("killed", "closed")
        await self._shutdown_kernel()


def _refused(req: _Request, reply: dict[str, Any] | None) -> bool:
    """The kernel answered "abort"/"aborted" to a request it never began (bash_kernel answers "abort" to an
    interrupted cell, after its execute_input: that one ran)."""
    return reply is not None and reply.get("content", {}).get("status") in REFUSED and not req.begun.is_set()


def _error_content(error: Mapping[str, Any]) -> dict[str, Any]:
    return {"ename": error["name"], "evalue": error["value"], "traceback": error["traceback"]}
