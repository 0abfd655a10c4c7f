"""The Jupyter API's websocket, ``WS /api/kernels/{id}/channels``, and the registry of who is connected to which
kernel.

The relay works as Jupyter Server's ``ZMQChannelsWebsocketConnection`` does: each connection gets sockets of its
own to the kernel (through the kernel's channel guard, :mod:`kernelhub.sandbox.channel_guard`), the client's
messages are signed again with the kernel's key (clients never know it), and the kernel's messages go out tagged
with their channel, in the framing the client chose (:mod:`kernelhub.handlers.jupyter.framing`). A kernel message
that is badly signed or does not parse is dropped into the sandbox's
:class:`~kernelhub.sandbox.channel_guard.DropLog`.

Each connection's sockets have a ZeroMQ identity of their own: the client's ``session_id`` and a suffix unique to
the connection. JupyterLab reconnects with the same session id after a failed first handshake, while the first
connection is still open; with the session id as the identity, the new sockets connected before the stale ones
had closed, and a kernel whose ROUTER socket does not hand an identity over (tslab; ipykernel sets
``ZMQ_ROUTER_HANDOVER``) ignored the new connection for good.

:class:`KernelConnections` is created by the app (:func:`kernelhub.app.make_app`) and handed to every Jupyter
handler through ``initialize``: it counts each kernel's connections (the kernel model's ``connections``, the cap
``max_connections_per_kernel``), replaces a stale connection that reuses a session id, and passes on what the
kernels service says of a kernel (:meth:`Kernels.add_listener <kernelhub.services.kernels.Kernels.add_listener>`):
around a restart its clients see ``status: restarting`` and their messages are held until the new kernel's
sockets answer; a kernel left dead is announced ``dead``; a kernel that is gone closes its websockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from tornado.websocket import WebSocketClosedError

from ...errors import QuotaExceeded
from ...services.kernels import Kernels
from ...services.sandboxes import SandboxRecord
from ...services.sessions import JupyterSession, send_message, send_raw_message
from ..base import WebSocketBase, log
from .framing import (
    WS_V1,
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

#: Channels a client may talk to (heartbeats are the gateway's business, as in Jupyter Server).
CHANNELS = ("shell", "control", "stdin", "iopub")
#: How long a new connection nudges the kernel with kernel_info_request until its iopub subscription is live.
NUDGE_TIMEOUT_S = 10.0
#: The most a client may send while its kernel restarts (bytes, held until the new kernel answers).
MAX_HELD_BYTES = 64 * 1024 * 1024


class KernelConnections:
    """The open websocket connections of every kernel of the Jupyter API (see the module docstring). Created by
    the app with the hub's kernels service, whose events it subscribes to."""

    def __init__(self, kernels: Kernels) -> None:
        self._open: dict[str, dict[str, KernelChannelsHandler]] = {}
        self._held: dict[str, list[KernelChannelsHandler]] = {}
        kernels.add_listener(self._kernel_event)

    def count(self, kernel_id: str | None) -> int:
        return len(self._open.get(kernel_id or "", {}))

    def add(self, kernel_id: str, key: str, handler: KernelChannelsHandler) -> None:
        """Register ``handler`` under its session id ``key``; a stale connection with the same key is closed
        (its sockets with it) first."""
        conns = self._open.setdefault(kernel_id, {})
        stale = conns.get(key)
        conns[key] = handler
        if stale is not None and stale is not handler:
            log.info("replacing a stale connection to kernel %s", kernel_id)
            stale.close(4000, "Replaced by a newer connection with the same session id.")
            stale.close_sockets()

    def remove(self, kernel_id: str, key: str, handler: KernelChannelsHandler) -> None:
        conns = self._open.get(kernel_id)
        if conns is not None and conns.get(key) is handler:
            del conns[key]
            if not conns:
                del self._open[kernel_id]

    def handlers(self, kernel_id: str | None) -> list[KernelChannelsHandler]:
        return list(self._open.get(kernel_id or "", {}).values())

    async def broadcast_status(self, kernel_id: str | None, state: str) -> None:
        for handler in self.handlers(kernel_id):
            await handler.send_status(state)

    async def _kernel_event(self, kernel_id: str, event: str) -> None:
        """Called by the kernels service (see :class:`~kernelhub.services.kernels.KernelRestarter`)."""
        if event == "restarting":
            # The new kernel's sockets are the same paths and each connection's sockets reconnect by themselves,
            # but a request sent before a connection's iopub subscription reached the new kernel would lose its
            # output: the clients' messages are held, and each connection is nudged before they go out.
            held = self._held[kernel_id] = self.handlers(kernel_id)
            for handler in held:
                handler.hold()
            await self.broadcast_status(kernel_id, "restarting")
        elif event == "restarted":
            held = self._held.pop(kernel_id, [])
            await asyncio.gather(*(handler.release() for handler in held), return_exceptions=True)
        elif event == "dead":
            await self.broadcast_status(kernel_id, "dead")
        elif event == "shutdown":
            for handler in self.handlers(kernel_id):
                handler.close(1001, "The kernel was shut down.")


class KernelChannelsHandler(WebSocketBase):
    """``WS /api/kernels/{id}/channels``: the kernel's shell, control, stdin and iopub channels."""

    connections: KernelConnections
    record: SandboxRecord
    session: JupyterSession
    client_session: str
    #: Jupyter messages carry buffers (widgets, arrays): the app's websocket_max_message_size applies.
    message_limit = None

    def initialize(self, connections: KernelConnections, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.connections = connections
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.tasks: list[asyncio.Future[Any]] = []
        self.kernel_id = ""
        self.session_key = ""
        self.zsession: Session | None = None
        self.v1 = False
        self._iopub_seen = asyncio.Event()
        self._nudge_ids: set[str] = set()
        self._held: list[str | bytes] | None = None
        self._held_bytes = 0

    def before_upgrade(self, *args: Any, **kwargs: Any) -> None:
        kernel_id = kwargs.get("kernel_id") or (args[0] if args else "")
        self.record, self.session = self.hub.get_kernel(self.tenant, kernel_id)
        self.kernel_id = kernel_id
        if self.connections.count(kernel_id) >= self.hub.max_connections_per_kernel:
            raise QuotaExceeded(f"Kernel {kernel_id} already has {self.hub.max_connections_per_kernel} open "
                                "websockets, the most it may have; close one first.")
        # Read here, where a bad value is still a JSON 400: after the upgrade it could only end the socket.
        self.client_session = self.get_query_argument("session_id", "") or uuid.uuid4().hex

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        """v1 when the client offers it; otherwise None, the legacy JSON framing."""
        return WS_V1 if WS_V1 in subprotocols else None

    async def open(self, kernel_id: str) -> None:  # type: ignore[override]
        super().open()
        self.v1 = self.selected_subprotocol == WS_V1
        km = self.session.km
        self.zsession = Session(key=km.session.key, signature_scheme=km.session.signature_scheme,
                                session=self.client_session[:128])
        key = f"{kernel_id}:{self.zsession.session}"
        others = [h for h in self.connections.handlers(kernel_id) if h.session_key != key]
        if len(others) >= self.hub.max_connections_per_kernel:
            # Upgrades that passed the check together: counted here with no await before add(), the registry
            # admits the cap and closes the others ("try again later").
            self.close(1013, "The kernel has as many websockets as it may have; close one first.")
            return
        # A stale connection with this session id goes first, its sockets with it (see the module docstring).
        self.session_key = key
        self.connections.add(kernel_id, key, self)
        identity = f"{self.zsession.session}-{uuid.uuid4().hex[:12]}".encode()  # at most 255 bytes
        try:
            for channel in CHANNELS:
                self.sockets[channel] = getattr(km, f"connect_{channel}")(identity=identity)
        except Exception:
            log.exception("connecting to kernel %s failed", kernel_id)
            self.close_sockets()
            self.close(1011, "The kernel cannot be reached.")
            return
        self.record.touch()
        for channel, sock in self.sockets.items():
            self.tasks.append(asyncio.ensure_future(self._relay(channel, sock)))
        # Tornado holds the client's messages until open() returns, so nothing is sent before the iopub
        # subscription is live and no output of the client's first request can be missed.
        if self.session.execution_state != "busy":  # a busy kernel would answer only after its running code
            await self._nudge()

    async def _nudge(self) -> None:
        """Send kernel_info_request on a throwaway shell socket until it is answered and this connection's
        iopub socket has seen a message (Jupyter Server's nudge): a zmq SUB socket receives nothing until its
        subscription reached the kernel. The nudge's own iopub messages are not passed to the client."""
        if self.zsession is None or not self.sockets:
            return
        self._iopub_seen.clear()
        shell: Any = self.session.km.connect_shell()  # a zmq.asyncio socket: the manager's context is asyncio's
        reply = asyncio.ensure_future(shell.recv_multipart())
        seen = asyncio.ensure_future(self._iopub_seen.wait())
        deadline = time.monotonic() + NUDGE_TIMEOUT_S
        try:
            while not (reply.done() and seen.done()) and time.monotonic() < deadline:
                msg = self.zsession.msg("kernel_info_request")
                if len(self._nudge_ids) > 1000:
                    self._nudge_ids.clear()
                self._nudge_ids.add(msg["header"]["msg_id"])
                send_message(self.zsession, shell, msg)
                await asyncio.wait([t for t in (reply, seen) if not t.done()], timeout=0.5)
        except zmq.ZMQError as exc:
            log.debug("nudging kernel %s: %s", self.kernel_id, exc)
        finally:
            reply.cancel()
            seen.cancel()
            await asyncio.gather(reply, seen, return_exceptions=True)
            shell.close(linger=0)
        if not self._iopub_seen.is_set():
            log.warning("kernel %s did not answer the websocket's kernel_info nudge", self.kernel_id)

    def hold(self) -> None:
        """Keep the client's messages from now on until :meth:`release` (called around a restart)."""
        if self._held is None:
            self._held = []
            self._held_bytes = 0

    async def release(self) -> None:
        """Nudge the (restarted) kernel, then send what the client sent meanwhile, in order."""
        try:
            if self.ws_connection is not None:
                await self._nudge()
        finally:
            held, self._held = self._held or [], None
            for message in held:
                self._forward(message)

    async def _relay(self, channel: str, sock: zmq.asyncio.Socket) -> None:
        """Kernel -> client for one channel. Awaiting each write is the back-pressure: a slow client slows the
        reading of its own sockets, not the gateway."""
        while True:
            try:
                parts = await sock.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError:  # the kernel's context went away with the kernel
                self.close(1001, "The kernel was shut down.")
                return
            try:
                msg, data, binary = self._encode_for_client(channel, parts)
            except Exception as exc:  # noqa: BLE001 - a malformed or badly signed message: drop it, keep relaying
                self.session.sandbox.kernel_drops.note(f"to a websocket, {channel}: {type(exc).__name__}: "
                                                       f"{str(exc)[:120]}")
                continue
            if channel == "iopub":
                self._iopub_seen.set()
                self.session.last_activity = time.time()
                if msg["parent_header"].get("msg_id") in self._nudge_ids:
                    continue
            try:
                await self.write_message(data, binary=binary)
            except WebSocketClosedError:
                return

    def _encode_for_client(self, channel: str, parts: list[bytes]) -> tuple[dict[str, Any], bytes | str, bool]:
        """The message (its content unpacked only for the legacy framing) and its websocket frame."""
        assert self.zsession is not None
        msg_list: list[bytes] = self.zsession.feed_identities(parts)[1]  # type: ignore[assignment]
        if self.v1:
            # Checks the signature; the parts then go out as the kernel sent them (minus the signature).
            msg = self.zsession.deserialize(msg_list, content=False)
            return msg, serialize_msg_to_ws_v1(msg_list[1:], channel), True
        msg = self.zsession.deserialize(msg_list)
        out = {**msg, "channel": channel}
        if msg["buffers"]:
            return msg, serialize_binary_message(out), True
        return msg, json.dumps(out, default=json_default), False

    async def on_message(self, message: str | bytes) -> None:
        """Client -> kernel: the message is signed again with the kernel's key and sent on its channel. When the
        kernel does not read (its socket's queue is full), the next client message is not read either (tornado
        waits for this coroutine): the client's messages wait in its own buffers, not the gateway's. During a
        restart they are held, at most :data:`MAX_HELD_BYTES`."""
        self.record.touch()
        self.session.last_activity = time.time()
        if self._held is not None:
            self._held.append(message)
            self._held_bytes += len(message)
            if self._held_bytes > MAX_HELD_BYTES:
                self.close(1013, "Too much was sent while the kernel restarted; reconnect.")
            return
        sent = self._forward(message)
        if sent is not None and not sent.done():
            await asyncio.wait({sent})

    def _forward(self, message: str | bytes) -> asyncio.Future[Any] | None:
        """Send one client frame to the kernel. A frame that is not a Jupyter message in this connection's
        framing closes the socket (1007, with the reason), as a malformed message ends the connection in
        Jupyter Server; one for a channel a client may not write (iopub, or none of the kernel's) is dropped
        with a warning, as there. Answers the send's future, or None when nothing was sent."""
        if self.zsession is None or not self.sockets:
            return None
        try:
            channel, parts, msg = self._parse_client_frame(message)
        except (ValueError, TypeError, KeyError, struct.error, RecursionError) as exc:
            log.warning("closing a websocket of kernel %s after a malformed message: %s", self.kernel_id,
                        str(exc)[:200])
            self.close(1007, f"Not a Jupyter message: {str(exc)[:80]}.".encode()[:120].decode(errors="ignore"))
            return None
        sock = self.sockets.get(channel)
        if sock is None or channel == "iopub":
            log.warning("dropped a message for kernel %s on the channel %r", self.kernel_id, channel[:32])
            return None
        if channel in ("shell", "control"):
            self._audit_request(channel, parts, msg)
        try:
            if parts is not None:
                return send_raw_message(self.zsession, sock, parts)
            return send_message(self.zsession, sock, msg, msg.pop("buffers", None) or [])
        except Exception as exc:  # noqa: BLE001 - any field of the client's message may be unpackable
            log.warning("could not send a message to kernel %s: %s: %s", self.kernel_id, type(exc).__name__,
                        str(exc)[:200])
            return None

    def _audit_request(self, channel: str, parts: list[bytes] | None, msg: dict[str, Any]) -> None:
        """The Jupyter surface's audit hook: each request a client sends on shell or control is an entry (action
        ``WS /api/kernels/{kernel_id}/channels <msg_type>``, the code of an ``execute_request`` as its SHA-256
        and size). Replies on stdin and heartbeats are not actions."""
        try:
            header = json.loads(parts[0]) if parts is not None else msg.get("header")
            msg_type = str(header.get("msg_type", ""))[:64] if isinstance(header, dict) else ""
            content = msg.get("content") if parts is None else \
                (json.loads(parts[3]) if msg_type == "execute_request" else {})
        except (ValueError, UnicodeDecodeError, RecursionError):
            msg_type, content = "", {}
        code = content.get("code") if isinstance(content, dict) else None
        self.audit(f"WS /api/kernels/{{kernel_id}}/channels {msg_type or channel}",
                   {"kernel_id": self.kernel_id, "sandbox_id": self.record.id}, 200, None,
                   code if isinstance(code, str) else None)

    def _parse_client_frame(self, message: str | bytes) -> tuple[str, list[bytes] | None, dict[str, Any]]:
        """A client frame as (channel, the v1 parts to send as they are | None, the legacy message to sign)."""
        if self.v1:
            if isinstance(message, str):
                message = message.encode()
            channel, msg_list = deserialize_msg_from_ws_v1(message)
            if len(msg_list) < 4:
                raise ValueError("a v1 message needs header, parent_header, metadata and content")
            return channel or "shell", msg_list, {}
        if isinstance(message, bytes):
            msg = deserialize_binary_message(message)
        else:
            msg = json.loads(message)
            if not isinstance(msg, dict) or not isinstance(msg.get("header"), dict):
                raise ValueError("a message is a JSON object with a header")
            msg["buffers"] = []  # buffers travel only in the binary framing
        channel = msg.pop("channel", None) or "shell"  # Jupyter Server assumes shell too
        if not isinstance(channel, str):
            raise ValueError("channel must be a string")
        for key in ("parent_header", "metadata", "content"):
            if not isinstance(msg.get(key), dict):
                msg[key] = {}
        return channel, None, msg

    def on_pong(self, data: bytes) -> None:
        # An open, answering client is activity: a kernel a notebook has open is not idle.
        self.record.touch()

    async def send_status(self, state: str) -> None:
        """A ``status`` message on iopub from the gateway itself (``restarting``, ``dead``)."""
        if self.zsession is None or self.ws_connection is None:
            return
        msg = self.zsession.msg("status", {"execution_state": state})
        try:
            if self.v1:
                parts = [self.zsession.pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")]
                await self.write_message(serialize_msg_to_ws_v1(parts, "iopub"), binary=True)
            else:
                msg["channel"] = "iopub"
                await self.write_message(json.dumps(msg, default=json_default))
        except WebSocketClosedError:
            pass

    def close_sockets(self) -> None:
        """Close this connection's sockets to the kernel now; the relays that read them are cancelled first."""
        for task in self.tasks:
            task.cancel()
        for sock in self.sockets.values():
            with contextlib.suppress(Exception):
                sock.close(linger=0)
        self.sockets = {}

    def on_close(self) -> None:
        if self.session_key:
            self.connections.remove(self.kernel_id, self.session_key, self)
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()

        async def cleanup() -> None:
            # Sockets close once the readers have let go of them.
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close_sockets()

        asyncio.ensure_future(cleanup())
