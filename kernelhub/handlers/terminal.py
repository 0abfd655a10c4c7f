"""``WS /v1/sessions/{id}/terminal``: a terminal session's PTY over a websocket, in terminado's message shape.

Messages are JSON arrays, as with ``terminado.TermSocket``:

- client -> server: ``["stdin", text]`` (keystrokes; Enter is ``"\\r"``), ``["set_size", rows, cols]``;
- server -> client: ``["setup", {}]`` once attached, then ``["stdout", text]`` (first a replay of what the
  terminal printed before, up to 256 KiB), and ``["disconnect", 1]`` when the shell ended or the session was
  closed; the socket closes after it.

The gateway's route refuses before the upgrade, with a JSON error as any route: 404 (no such session for this
tenant), 400 (not a terminal session), 409 (the terminal ended). A socket that can no longer attach once
upgraded (the session ended in between; and always for :class:`TerminalWebSocket` without that check) is closed
with code ``4000 + HTTP status`` and the error's message as reason: 4404, 4400, 4409. A malformed frame closes
it with 4400 and a sentence as reason.

Several sockets may share one terminal; it is sized to the smallest of them. A socket whose client reads slowly
pauses reading the terminal (the shell then blocks on its output) instead of letting the gateway buffer it; a
shell that reads its input slowly makes the socket stop taking messages.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from terminado.websocket import TermSocket
from tornado import websocket

from .. import json_input
from ..errors import InvalidRequest, KernelHubError
from ..services.terminals import TerminalSession
from .base import AuthMixin, WebSocketBase

if TYPE_CHECKING:
    from asyncio import Future

    from ..services.hub import Hub

#: Largest rows or cols taken from ``set_size``.
MAX_DIMENSION = 1000
#: Output bytes a socket may have queued before it pauses the terminal, and where it resumes it.
PAUSE_BYTES = 1024 * 1024
RESUME_BYTES = 256 * 1024


class TerminalWebSocket(TermSocket):
    """terminado's ``TermSocket`` attached to a :class:`~kernelhub.services.terminals.TerminalSession`.

    Gets ``hub`` through ``initialize`` (URL spec) and the session through :meth:`get_session`, which a
    subclass provides (:class:`TerminalHandler` does it with the caller's tenant). The URL pattern has one
    group: the session id.
    """

    hub: Hub
    session: TerminalSession | None = None
    terminal: Any = None

    def initialize(self, hub: Hub, **kwargs: Any) -> None:  # type: ignore[override]
        self.hub = hub
        self.term_manager: Any = None
        self.term_name = ""
        self.size = (None, None)
        self.terminal = None
        self.session = None
        self._blocking_io_executor: Any = None
        self._enable_output_logging = False
        self._user_command = ""
        self._unsent = 0
        self._paused = False

    def get_session(self, session_id: str) -> TerminalSession | Awaitable[TerminalSession]:
        """Hook: the session ``session_id`` names, if the caller may use it. Called once by :meth:`open`; may
        answer an awaitable. Raise a :class:`~kernelhub.errors.KernelHubError` (``NotFound`` for unknown ids
        and other tenants' ids) to refuse; the socket is then closed with ``4000 + status``."""
        raise NotImplementedError

    async def open(self, session_id: str, *args: Any) -> None:  # type: ignore[override]
        """Attach to the session's terminal: ``["setup", {}]``, then the replay of earlier output."""
        self.set_nodelay(True)  # KERNELS.md: Nagle's delay costs ~40 ms a keystroke otherwise
        try:
            found = self.get_session(session_id)
            session = await found if inspect.isawaitable(found) else found
            if getattr(session, "type", None) != "terminal":
                raise InvalidRequest(f"Session {session_id[:64]!r} is not a terminal session.")
            terminal = session.manager.get_terminal()
        except KernelHubError as exc:
            self.close_for(exc)
            return
        self.session = session
        self.term_manager = session.manager
        self._blocking_io_executor = session.manager.blocking_io_executor
        self.term_name = session.id
        self.terminal = terminal
        terminal.clients.append(self)
        self.send_json_message(["setup", {}])
        replay = "".join(terminal.read_buffer)
        if replay:
            self.on_pty_read(replay)

    async def on_message(self, message: str | bytes) -> None:  # type: ignore[override]
        """``["stdin", text]`` or ``["set_size", rows, cols, ...]``; other message types are ignored, as
        terminado does. A frame that is not a JSON array starting with a string (binary frames included) closes
        the socket with 4400 and a reason: terminado's protocol has no error message. Waits while the shell has
        not taken earlier input, so that a flood waits in the client, not in the gateway."""
        try:
            if isinstance(message, bytes):
                raise InvalidRequest("Terminal messages are JSON arrays in text frames, not binary frames.")
            command = json_input.loads(message, "A terminal message")
            if not isinstance(command, list) or not command or not isinstance(command[0], str):
                raise InvalidRequest('A terminal message is a JSON array such as ["stdin", "ls\\r"].')
        except KernelHubError as exc:
            self.close_for(exc)
            return
        terminal = self.terminal
        if terminal is None:
            return
        if command[0] == "stdin" and len(command) >= 2 and isinstance(command[1], str):
            if self.session is not None:
                self.session.last_activity = time.time()
            terminal.ptyproc.write(command[1])
            await terminal.ptyproc.drain()
        elif command[0] == "set_size" and len(command) >= 3:
            rows, cols = command[1], command[2]
            if all(type(v) is int and 1 <= v <= MAX_DIMENSION for v in (rows, cols)):
                self.size = (rows, cols)  # type: ignore[assignment]
                terminal.resize_to_smallest()

    def close_for(self, exc: KernelHubError) -> None:
        """Close with ``4000 + status`` and the error's message as reason (cut to the 123 bytes a reason has)."""
        code = 4000 + exc.status if 400 <= exc.status < 1000 else 4500
        self.close(code, exc.message.encode()[:120].decode(errors="ignore"))

    def send_json_message(self, content: Any) -> None:
        """Send one message; past :data:`PAUSE_BYTES` unsent, pause the terminal until the client catches up."""
        data = json.dumps(content)
        try:
            future = self.write_message(data)
        except websocket.WebSocketClosedError:
            return
        self._unsent += len(data)
        if self._unsent > PAUSE_BYTES and not self._paused and self.session is not None:
            self._paused = True
            self.session.pause_reading(self)
        future.add_done_callback(functools.partial(self._sent, len(data)))

    def _sent(self, size: int, future: Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # a closed socket is an ordinary disconnect
        self._unsent -= size
        if self._paused and self._unsent <= RESUME_BYTES:
            self._release()

    def _release(self) -> None:
        if self._paused and self.session is not None:
            self._paused = False
            self.session.resume_reading(self)

    def on_close(self) -> None:
        """Detach; the terminal carries on for other clients and for ``session_execute``."""
        terminal, self.terminal = self.terminal, None
        if terminal is not None:
            if self in terminal.clients:
                terminal.clients.remove(self)
            terminal.resize_to_smallest()
        self._release()


class TerminalHandler(TerminalWebSocket, WebSocketBase):
    """The gateway's route: authenticated before the upgrade and origin-checked by
    :class:`~kernelhub.handlers.base.WebSocketBase`; sessions resolved for the caller's tenant."""

    def initialize(self, hub: Hub, **kwargs: Any) -> None:  # type: ignore[override]
        AuthMixin.initialize(self, hub=hub, **kwargs)
        TerminalWebSocket.initialize(self, hub=hub)

    def before_upgrade(self, session_id: str, *args: Any) -> None:
        """Refuse before the upgrade, as ``/stream`` and ``/api`` do: an unknown or another tenant's session is
        a JSON 404, a jupyter session a 400, an ended terminal a 409. :meth:`open` checks again (the session
        may end between the two)."""
        session = self.get_session(session_id)
        if getattr(session, "type", None) != "terminal":
            raise InvalidRequest(f"Session {session_id[:64]!r} is not a terminal session.")
        session.manager.get_terminal()

    def get_session(self, session_id: str) -> TerminalSession:
        _, session = self.hub.get_session(self.tenant, session_id)
        return session  # type: ignore[return-value]  # open() refuses a jupyter session (4400)


default_handlers: list[Any] = [(r"/v1/sessions/([^/]+)/terminal", TerminalHandler)]
