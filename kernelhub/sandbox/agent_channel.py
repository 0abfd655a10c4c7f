"""The gateway's end of the control socket to a sandbox's agent (:mod:`kernelhub.sandbox.agent`).

The socket is one end of a ``SOCK_SEQPACKET`` socketpair whose other end is the agent's fd 0. One JSON object
is one packet; file descriptors (a new process's stdio) travel with a request as ``SCM_RIGHTS``. The
messages are the agent's (see its docstring): the gateway sends ``spawn`` and ``signal``; the agent answers
``ready`` once, ``spawned`` or ``failed`` to a request id, and ``exit`` when a process it started ends.

The agent runs as the sandbox, so what it says is untrusted: a packet that is not a JSON object, an unknown
op or an id nobody asked for is dropped, and nothing it sends can affect another sandbox. Every wait has a
deadline: the agent saying it is ready, room in the socket for a request, a reply.

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
from typing import Any

from ..errors import SandboxError, SandboxNotRunning

__all__ = ["MAX_PACKET", "SEND_TIMEOUT_S", "AgentChannel"]

#: The largest packet read from the agent (the agent's own MAX_PACKET).
MAX_PACKET = 1 << 20
#: Seconds a request may wait for room in the socket before the agent counts as not answering.
SEND_TIMEOUT_S = 5.0


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

    async def request(self, msg: dict[str, Any], fds: Sequence[int] = (), *, timeout: float) -> dict[str, Any]:
        """Send ``msg`` (whose ``id`` comes from :meth:`next_id`) with ``fds`` and answer the agent's reply to
        it (``spawned`` or ``failed``). The caller keeps ownership of ``fds``. Raises :class:`SandboxError`
        when the channel is closed or closes meanwhile, or no reply comes within ``timeout`` seconds."""
        req = msg["id"]
        reply: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[req] = reply
        deadline = self._loop.time() + timeout
        try:
            await self._send(msg, fds, min(deadline, self._loop.time() + SEND_TIMEOUT_S))
            try:
                return await asyncio.wait_for(reply, max(0.0, deadline - self._loop.time()))
            except TimeoutError:
                raise SandboxError(f"The sandbox's agent did not answer within {timeout:g} s.") from None
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
        try:
            data = sock.recv(MAX_PACKET)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            # The agent runs as the sandbox: whatever it says is untrusted and only affects this sandbox.
            msg = json.loads(data)
            op = msg.get("op")
            req = msg.get("id")
        except (ValueError, AttributeError):
            return
        if op == "ready":
            if not self._ready.done():
                self._ready.set_result(msg)
            return
        if op in ("spawned", "failed"):
            reply = self._pending.pop(req, None) if isinstance(req, int) else None
            if reply is not None and not reply.done():
                reply.set_result(msg)
            elif op == "failed":
                self._log(f"agent: {str(msg.get('message'))[:500]}")
            return
        if op == "exit" and isinstance(req, int):
            status = msg.get("status")
            self._on_exit(req, status if isinstance(status, int) else -1)

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
