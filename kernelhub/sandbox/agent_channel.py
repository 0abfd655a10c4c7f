"""The gateway's end of the control socket to a sandbox's agent (:mod:`kernelhub.sandbox.agent`).

The socket is one end of a ``SOCK_SEQPACKET`` socketpair whose other end is the agent's fd 0. One JSON object
is one packet; file descriptors (a new process's stdio) travel with a request as ``SCM_RIGHTS``. The
messages are the agent's (see its docstring): the gateway sends ``spawn`` and ``signal``; the agent answers
``ready`` once, ``spawned`` or ``failed`` to a request id, and ``exit`` when a process it started ends.

The agent runs as the sandbox, and although it makes itself unreachable to the sandbox's code (non-dumpable:
no ptrace, no ``pidfd_getfd``, no ``/proc/PID/mem``), what it says stays untrusted (SECURITY.md pitfall 13):

- a packet larger than :data:`MAX_REPLY`, not a JSON object, with an unknown op, or naming an id nobody asked
  for is dropped (counted, and logged at most once per :data:`DROP_LOG_INTERVAL_S`);
- ``exit`` counts only for a process the agent reported ``spawned``, once; a ``spawned`` that comes after its
  request gave up is answered with a SIGKILL, so no process runs untracked;
- descriptors the agent sends are never accepted (``recv`` without a control buffer: the kernel closes them);
- at most :data:`RATE_PER_S` packets a second are read (a burst of :data:`BURST`): past that the channel stops
  reading until the budget refills, so a flood costs the gateway a bounded share of its loop and makes the
  flooder block on its own socket; honest messages queued behind it are read later, not lost.

Every wait has a deadline: the agent saying it is ready, room in the socket for a request, a reply.

Who calls what: :class:`~kernelhub.sandbox.sandbox.Sandbox` makes one :class:`AgentChannel` when it starts its
agent, awaits :meth:`AgentChannel.wait_ready`, spawns processes with :meth:`AgentChannel.request`, signals
them with :meth:`AgentChannel.send` and closes the channel when it stops; the channel reports process exits
and its own end through the callbacks it was given.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

from ..errors import SandboxError, SandboxNotRunning

__all__ = ["BURST", "MAX_PACKET", "MAX_REPLY", "RATE_PER_S", "SEND_TIMEOUT_S", "SLOW_REPLY_S", "AgentChannel"]

#: The largest packet the agent reads from the gateway (the agent's own MAX_PACKET).
MAX_PACKET = 1 << 20
#: The largest packet read from the agent: its messages are a few hundred bytes (a failure message at most
#: about 4 KiB); anything longer arrives truncated and is dropped as malformed.
MAX_REPLY = 64 * 1024
#: Seconds a request may wait for room in the socket before the agent counts as not answering.
SEND_TIMEOUT_S = 5.0
#: Seconds a reply may be late before the waiter's ``on_slow`` is called (and again each such interval).
SLOW_REPLY_S = 1.0
#: Packets a second read from one agent, and the burst allowed above that rate. An honest agent sends two
#: per process (``spawned``, ``exit``).
RATE_PER_S = 500.0
BURST = 1000
#: Seconds between two log lines about dropped packets.
DROP_LOG_INTERVAL_S = 10.0
_SIGKILL = 9


class AgentChannel:
    """The control channel to one sandbox's agent, on the event loop that created it.

    ``sock`` is the gateway's end of the socketpair; the channel owns it from now on. ``on_exit(id, status)``
    is called when the agent reports that the process of request ``id`` ended (``status`` as
    ``os.waitstatus_to_exitcode``: negative for a signal); ``on_closed()`` once the agent closed its end (it
    exited or was killed); ``log(text)`` with what the agent reports outside any request.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        on_exit: Callable[[int, int], None],
        on_closed: Callable[[], None],
        log: Callable[[str], None],
    ) -> None:
        self._sock: socket.socket | None = sock
        self._on_exit = on_exit
        self._on_closed = on_closed
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ready: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._write_waiters: list[asyncio.Future[None]] = []
        #: Request ids whose process the agent reported running: the only ones an ``exit`` may name.
        self._running: set[int] = set()
        self._tokens = float(BURST)
        self._refilled = self._loop.time()
        self._paused: asyncio.TimerHandle | None = None
        self._dropped = 0
        self._drop_logged = -DROP_LOG_INTERVAL_S
        self._tasks: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def closed(self) -> bool:
        return self._sock is None

    def next_id(self) -> int:
        """A request id not used before on this channel."""
        self._next_id += 1
        return self._next_id

    # -- waiting ------------------------------------------------------------------------------------------

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        """The agent's ``ready`` message, once it came. Raises :class:`SandboxError` if it does not come within
        ``timeout`` seconds, or with the reason given to :meth:`fail_ready` (the launcher died)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            raise SandboxError(f"The sandbox's agent was not ready within {timeout:g} s.") from None

    def fail_ready(self, exc: BaseException) -> None:
        """Make :meth:`wait_ready` raise ``exc`` if the agent has not said it is ready (its process died)."""
        if not self._ready.done():
            self._ready.set_exception(exc)
            self._ready.exception()  # retrieved: nobody may be waiting any more

    async def request(self, msg: dict[str, Any], fds: Sequence[int] = (), *, timeout: float,
                      on_slow: Callable[[], None] | None = None) -> dict[str, Any]:
        """Send ``msg`` (whose ``id`` comes from :meth:`next_id`) with ``fds`` and answer the agent's reply to
        it (``spawned`` or ``failed``). The caller keeps ownership of ``fds``. ``on_slow`` is called each
        :data:`SLOW_REPLY_S` seconds the reply is late (the sandbox: wake an agent its own code stopped, which
        the process just started may have done before the agent could answer). Raises :class:`SandboxError`
        when the channel is closed or closes meanwhile, or no reply comes within ``timeout`` seconds."""
        req = msg["id"]
        reply: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[req] = reply
        deadline = self._loop.time() + timeout
        try:
            await self._send(msg, fds, min(deadline, self._loop.time() + SEND_TIMEOUT_S))
            while True:
                left = deadline - self._loop.time()
                if left <= 0:
                    raise SandboxError(f"The sandbox's agent did not answer within {timeout:g} s.")
                try:
                    return await asyncio.wait_for(asyncio.shield(reply), min(left, SLOW_REPLY_S))
                except TimeoutError:
                    if on_slow is not None and left > SLOW_REPLY_S:  # not at the deadline: it raises next
                        on_slow()
        finally:
            self._pending.pop(req, None)

    async def send(self, msg: dict[str, Any], fds: Sequence[int] = (), *, timeout: float = SEND_TIMEOUT_S) -> None:
        """Send ``msg`` (and ``fds``) without waiting for a reply, e.g. a signal. Raises :class:`SandboxError`
        when the channel is closed or the socket has no room within ``timeout`` seconds."""
        await self._send(msg, fds, self._loop.time() + timeout)

    async def _send(self, msg: dict[str, Any], fds: Sequence[int], deadline: float) -> None:
        data = json.dumps(msg).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            sock = self._sock
            if sock is None:
                raise SandboxNotRunning("The sandbox is not running.")
            try:
                sock.sendmsg([data], anc)
                return
            except BlockingIOError:
                pass
            except OSError as exc:
                raise SandboxNotRunning("The sandbox is not running.") from exc
            if not await self._writable(deadline):
                raise SandboxError("The sandbox's agent does not answer.")

    async def _writable(self, deadline: float) -> bool:
        """Wait until the socket has room or the channel closed (True), or ``deadline`` passed (False)."""
        assert self._sock is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        if not self._write_waiters:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        self._write_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, max(0.0, deadline - self._loop.time()))
        except TimeoutError:
            return False
        finally:
            with contextlib.suppress(ValueError):
                self._write_waiters.remove(waiter)
            if not self._write_waiters and self._sock is not None:
                self._loop.remove_writer(self._sock.fileno())
        return True

    def _on_writable(self) -> None:
        waiters, self._write_waiters = self._write_waiters, []
        if self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- receiving ----------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if not self._take_token():
            return
        try:
            # recv, not recvmsg: descriptors the agent attaches are closed by the kernel, never received.
            data = sock.recv(MAX_REPLY)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            msg = json.loads(data)
            op = msg.get("op")
            req = msg.get("id")
        except (ValueError, AttributeError, RecursionError):
            self._drop("a malformed packet")
            return
        if op == "ready":
            if not self._ready.done():
                self._ready.set_result(msg)
            else:
                self._drop("a second ready")
            return
        if op in ("spawned", "failed"):
            self._on_reply(op, req, msg)
            return
        if op == "exit" and _is_int(req) and req in self._running:
            self._running.discard(req)
            status = msg.get("status")
            self._on_exit(req, status if _is_int(status) and -64 <= status <= 255 else -1)
            return
        self._drop(f"an unexpected {str(op)[:40]!r} message")

    def _on_reply(self, op: str, req: Any, msg: dict[str, Any]) -> None:
        reply = self._pending.pop(req, None) if _is_int(req) else None
        if reply is not None and not reply.done():
            if op == "spawned":
                pid = msg.get("pid")
                if not (_is_int(pid) and 0 < pid < 1 << 22):
                    self._kill_late(req)
                    reply.set_result({"op": "failed", "id": req, "message": "the agent reported no valid pid"})
                    return
                self._running.add(req)
            reply.set_result(msg)
        elif op == "spawned" and _is_int(req) and 0 < req <= self._next_id and req not in self._running:
            # Its request gave up (deadline, cancelled caller): nobody tracks this process, so it must not run.
            self._kill_late(req)
        elif op == "failed" and req is None:
            self._log(f"agent: {str(msg.get('message'))[:500]}")
        else:
            self._drop(f"a {op!r} reply nobody asked for")

    def _kill_late(self, req: int) -> None:
        task = self._loop.create_task(self._send_quietly({"op": "signal", "id": req, "signal": _SIGKILL,
                                                          "group": True}))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_quietly(self, msg: dict[str, Any]) -> None:
        with contextlib.suppress(SandboxError):
            await self.send(msg)

    def _take_token(self) -> bool:
        """Spend one packet of the read budget; without one, stop reading until the budget has refilled."""
        now = self._loop.time()
        self._tokens = min(float(BURST), self._tokens + (now - self._refilled) * RATE_PER_S)
        self._refilled = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if self._paused is None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._paused = self._loop.call_later((1 - self._tokens) / RATE_PER_S, self._resume)
        return False

    def _resume(self) -> None:
        self._paused = None
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _drop(self, what: str) -> None:
        self._dropped += 1
        now = self._loop.time()
        if now - self._drop_logged >= DROP_LOG_INTERVAL_S:
            self._drop_logged = now
            self._log(f"agent: dropped {what} ({self._dropped} dropped so far)")

    @property
    def dropped(self) -> int:
        """How many packets from the agent were dropped as malformed or unexpected."""
        return self._dropped

    # -- the end ------------------------------------------------------------------------------------------

    def fail_pending(self) -> None:
        """Fail every request still waiting for its reply: the sandbox stopped."""
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(SandboxError("The sandbox stopped."))
        self._pending.clear()

    def close(self) -> None:
        """Close the socket (the agent then kills everything it started and exits), fail what waits on it and
        call ``on_closed``. Idempotent; called by the sandbox when it stops and by the channel on EOF."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock.fileno())
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock.fileno())
        sock.close()
        self.fail_ready(SandboxError("The sandbox's agent closed its channel."))
        self.fail_pending()
        waiters, self._write_waiters = self._write_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)  # the send loop then finds the channel closed
        self._on_closed()


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
