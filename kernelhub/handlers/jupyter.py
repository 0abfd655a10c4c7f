"""The Jupyter API: kernelhub as a drop-in for the Jupyter Kernel Gateway.

Routes and shapes are Jupyter Server's (``services/kernels/handlers.py``, ``services/kernelspecs/handlers.py``,
``kernelspecs/handlers.py``), so ``jupyter lab --gateway-url=... --GatewayClient.auth_token=...``, Jupyter Server's
``GatewayKernelManager`` and any Kernel Gateway client work unchanged. Every kernel runs in a sandbox of its own
(:meth:`Hub.start_kernel`); a tenant sees only its own kernels, and another tenant's kernel id answers 404.

The websocket (``/api/kernels/{id}/channels``) relays between the client and the kernel's ZeroMQ sockets the way
Jupyter Server's ``ZMQChannelsWebsocketConnection`` does: each connection gets sockets of its own (identity = the
client's ``session_id``), the client's messages are signed again with the kernel's key (clients never know it),
and the kernel's messages go out tagged with their channel. Two framings: Jupyter's legacy one (one JSON text
message per Jupyter message with a ``"channel"`` key; the legacy binary format when there are buffers), and
``v1.kernel.websocket.jupyter.org`` when the client offers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
import os
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import quote

import zmq
import zmq.asyncio
from jupyter_client.jsonutil import extract_dates, json_default
from jupyter_client.session import Session
from tornado.websocket import WebSocketClosedError

from ..errors import InvalidRequest, NotFound, QuotaExceeded
from ..models import iso_micro
from ..services.sandboxes import SandboxRecord
from ..services.sessions import JupyterSession, send_message, send_raw_message
from .base import BaseHandler, WebSocketBase, log

#: What ``GET /api`` reports: the Jupyter Server API version these routes follow.
JUPYTER_API_VERSION = "2.14.0"
DEFAULT_KERNEL_NAME = "kernelhub-python"
WS_V1 = "v1.kernel.websocket.jupyter.org"
#: Channels a client may talk to (heartbeats are the gateway's business, as in Jupyter Server).
CHANNELS = ("shell", "control", "stdin", "iopub")
#: How long a new connection nudges the kernel with kernel_info_request until its iopub subscription is live.
NUDGE_TIMEOUT_S = 10.0
#: How often an open connection checks that its kernel still exists and still runs.
WATCH_INTERVAL_S = 1.0
#: A kernel that died this many times within the window is not restarted again (Jupyter Server's restart_limit).
AUTORESTART_LIMIT = 5
AUTORESTART_WINDOW_S = 300.0

_KERNEL_ID = r"(?P<kernel_id>[\w-]+)"
T = TypeVar("T")
_KERNEL_NAME = r"(?P<kernel_name>[\w.\-%]+)"


# -- websocket framings (copied from jupyter_server.services.kernels.connection.base, which the runtime does not
# -- depend on; the formats are Jupyter's, not ours) -----------------------------------------------------------


def serialize_binary_message(msg: dict[str, Any]) -> bytes:
    """Legacy binary framing: a count of parts, their offsets, the JSON message, then its buffers."""
    msg = msg.copy()
    buffers = list(msg.pop("buffers"))
    bmsg = json.dumps(msg, default=json_default).encode("utf8")
    buffers.insert(0, bmsg)
    nbufs = len(buffers)
    offsets = [4 * (nbufs + 1)]
    for buf in buffers[:-1]:
        offsets.append(offsets[-1] + len(buf))
    offsets_buf = struct.pack("!" + "I" * (nbufs + 1), nbufs, *offsets)
    buffers.insert(0, offsets_buf)
    return b"".join(buffers)


def _check_offsets(offsets: list[int], start: int, size: int) -> None:
    """The offsets of a binary frame must be ascending and within it: a client's frame is untrusted, and a
    count or offset it makes up must not make the gateway allocate or loop on its say-so."""
    if any(b < a for a, b in zip([start, *offsets], offsets, strict=False)) or (offsets and offsets[-1] > size):
        raise ValueError("the frame's offsets are not ascending within the frame")


def deserialize_binary_message(bmsg: bytes) -> dict[str, Any]:
    """Inverse of :func:`serialize_binary_message`; ValueError for a frame that is not one."""
    if len(bmsg) < 8:
        raise ValueError("a binary message has at least a count and one offset")
    nbufs = struct.unpack("!I", bmsg[:4])[0]
    if not 1 <= nbufs <= len(bmsg) // 4 - 1:
        raise ValueError(f"a binary message cannot hold {nbufs} parts")
    offsets: list[Any] = list(struct.unpack("!" + "I" * nbufs, bmsg[4: 4 * (nbufs + 1)]))
    _check_offsets(offsets, 4 * (nbufs + 1), len(bmsg))
    offsets.append(None)
    bufs = [bmsg[start:stop] for start, stop in zip(offsets[:-1], offsets[1:], strict=False)]
    msg = json.loads(bufs[0].decode("utf8"))
    if not isinstance(msg, dict) or not isinstance(msg.get("header"), dict):
        raise ValueError("a message is a JSON object with a header")
    msg["header"] = extract_dates(msg["header"])
    msg["parent_header"] = extract_dates(msg.get("parent_header") or {})
    msg["buffers"] = bufs[1:]
    return msg


def serialize_msg_to_ws_v1(msg_list: list[bytes], channel: str) -> bytes:
    """v1 framing: 8-byte little-endian offset count and offsets, the channel name, then the message's parts
    (header, parent_header, metadata, content, buffers...) as the kernel sent them."""
    channel_b = channel.encode("utf-8")
    offsets = [8 * (1 + 1 + len(msg_list) + 1)]
    offsets.append(len(channel_b) + offsets[-1])
    for part in msg_list:
        offsets.append(len(part) + offsets[-1])
    head = len(offsets).to_bytes(8, byteorder="little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return b"".join([head, channel_b, *msg_list])


def deserialize_msg_from_ws_v1(ws_msg: bytes) -> tuple[str, list[bytes]]:
    """Inverse of :func:`serialize_msg_to_ws_v1`: the channel and the message's parts; ValueError for a frame
    that is not one."""
    offset_number = int.from_bytes(ws_msg[:8], "little")
    if not 2 <= offset_number <= len(ws_msg) // 8 - 1:
        raise ValueError(f"a v1 message cannot hold {offset_number} offsets")
    offsets = [int.from_bytes(ws_msg[8 * (i + 1): 8 * (i + 2)], "little") for i in range(offset_number)]
    _check_offsets(offsets, 8 * (offset_number + 1), len(ws_msg))
    channel = ws_msg[offsets[0]: offsets[1]].decode("utf-8")
    msg_list = [ws_msg[offsets[i]: offsets[i + 1]] for i in range(1, offset_number - 1)]
    return channel, msg_list


# -- models ------------------------------------------------------------------------------------------------


def kernelspec_model(name: str, spec: dict[str, Any], resource_dir: str) -> dict[str, Any]:
    """Jupyter Server's kernelspec model: the spec plus URLs of its resource files (logos, kernel.js/css)."""
    resources: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for fname in sorted(os.listdir(resource_dir)):
            if fname in ("kernel.js", "kernel.css"):
                resources[fname] = f"/kernelspecs/{quote(name)}/{quote(fname)}"
            elif fname.startswith("logo-"):
                resources[os.path.splitext(fname)[0]] = f"/kernelspecs/{quote(name)}/{quote(fname)}"
    return {"name": name, "spec": spec, "resources": resources}


def kernel_model(session: JupyterSession, connections: int) -> dict[str, Any]:
    """Jupyter Server's kernel model."""
    state = session.execution_state
    if session.state in ("restarting", "closed", "failed"):
        state = {"restarting": "restarting"}.get(session.state, "dead")
    return {
        "id": session.kernel_id,
        "name": session.kernel_name,
        "last_activity": iso_micro(session.last_activity),
        "execution_state": state,
        "connections": connections,
    }


class KernelConnections:
    """The open websocket connections of every kernel: counts them for the kernel model, replaces a stale
    connection that reuses a session id, and tells every client of a kernel about restarts and shutdowns."""

    def __init__(self) -> None:
        self._open: dict[str, dict[str, KernelChannelsHandler]] = {}
        self._restarting: set[str] = set()
        self._given_up: set[str] = set()
        self._autorestarts: dict[str, list[float]] = {}

    def count(self, kernel_id: str | None) -> int:
        return len(self._open.get(kernel_id or "", {}))

    def add(self, kernel_id: str, key: str, handler: KernelChannelsHandler) -> None:
        conns = self._open.setdefault(kernel_id, {})
        stale = conns.get(key)
        conns[key] = handler
        if stale is not None and stale is not handler:
            # A client that reconnects with its session id: the old socket would steal its zmq identity.
            log.info("replacing a stale connection to kernel %s", kernel_id)
            stale.close(4000, "Replaced by a newer connection with the same session id.")

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

    def close_all(self, kernel_id: str | None, reason: str) -> None:
        for handler in self.handlers(kernel_id):
            handler.close(1001, reason)

    async def restart(self, kernel_id: str, restart: Callable[[], Awaitable[T]]) -> T:
        """Run ``restart`` (a hub call) with the kernel's clients told (``status: restarting``) and their
        messages held: the new kernel's sockets are the same paths, and each connection's zmq sockets reconnect
        by themselves, but a request sent before a connection's iopub subscription reached the new kernel would
        lose its output. Each connection is nudged again before its held messages go out."""
        held = self.handlers(kernel_id)
        for handler in held:
            handler.hold()
        await self.broadcast_status(kernel_id, "restarting")
        try:
            return await restart()
        finally:
            await asyncio.gather(*(handler.release() for handler in held), return_exceptions=True)

    async def autorestart(self, handler: KernelChannelsHandler) -> None:
        """Restart a kernel that died under its clients, as Jupyter Server's restarter does; the clients see
        ``status: restarting`` (then the new kernel's own ``starting``/``idle``). A kernel that keeps dying
        (:data:`AUTORESTART_LIMIT` times in :data:`AUTORESTART_WINDOW_S`) is left dead and its clients told so."""
        kernel_id = handler.session.kernel_id
        if kernel_id is None or kernel_id in self._restarting or kernel_id in self._given_up:
            return
        now = time.monotonic()
        recent = [t for t in self._autorestarts.get(kernel_id, []) if now - t < AUTORESTART_WINDOW_S]
        if len(recent) >= AUTORESTART_LIMIT:
            log.warning("kernel %s keeps dying; not restarting it again", kernel_id)
            self._given_up.add(kernel_id)
            await self.broadcast_status(kernel_id, "dead")
            return
        self._autorestarts[kernel_id] = [*recent, now]
        self._restarting.add(kernel_id)
        try:
            log.warning("kernel %s died; restarting it", kernel_id)
            try:
                await self.restart(kernel_id, lambda: handler.hub.restart_kernel(handler.tenant, kernel_id))
            except Exception:
                log.exception("restarting kernel %s failed", kernel_id)
                await self.broadcast_status(kernel_id, "dead")
        finally:
            self._restarting.discard(kernel_id)

    def forget(self, kernel_id: str | None) -> None:
        """Called when a kernel is shut down: its websockets close and its restart history goes."""
        self.close_all(kernel_id, "The kernel was shut down.")
        self._autorestarts.pop(kernel_id or "", None)
        self._given_up.discard(kernel_id or "")


#: The registry of this process's gateway; handed to every handler below through its URL spec.
CONNECTIONS = KernelConnections()


# -- REST --------------------------------------------------------------------------------------------------


class JupyterHandler(BaseHandler):
    """Base of the Jupyter REST routes: the connection registry comes through ``initialize``."""

    connections: KernelConnections

    def initialize(self, connections: KernelConnections, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.connections = connections

    def model(self, session: JupyterSession) -> dict[str, Any]:
        return kernel_model(session, self.connections.count(session.kernel_id))


class ApiVersionHandler(JupyterHandler):
    """``GET /api``: the API version, without auth (Jupyter Server and the Kernel Gateway answer it to anyone,
    and clients use it as a liveness probe)."""

    auth_required = False

    def get(self) -> None:
        self.send_json({"version": JUPYTER_API_VERSION})


class MainKernelSpecHandler(JupyterHandler):
    """``GET /api/kernelspecs``: every kernelspec kernelhub serves, and the default one."""

    def get(self) -> None:
        ksm = self.hub.kernel_spec_manager
        specs = {}
        for name, info in sorted(ksm.get_all_specs().items()):
            specs[name] = kernelspec_model(name, info["spec"], info["resource_dir"])
        self.send_json({"default": DEFAULT_KERNEL_NAME, "kernelspecs": specs})


class KernelSpecHandler(JupyterHandler):
    """``GET /api/kernelspecs/{name}``."""

    def get(self, kernel_name: str) -> None:
        try:
            spec = self.hub.kernel_spec_manager.get_kernel_spec(kernel_name)
        except KeyError:
            raise NotFound(f"No kernelspec {kernel_name[:64]!r}.") from None
        self.send_json(kernelspec_model(kernel_name, spec.to_dict(), spec.resource_dir))


class KernelSpecResourceHandler(JupyterHandler):
    """``GET /kernelspecs/{name}/{file}``: a file of the kernelspec's directory (its logos). Only plain files
    directly in that directory; anything that names a path, hidden files and symlinks out are 404."""

    def _resolve(self, name: str, path: str) -> str:
        try:
            resource_dir = self.hub.kernel_spec_manager.get_kernel_spec(name).resource_dir
        except KeyError:
            raise NotFound(f"No kernelspec {name[:64]!r}.") from None
        if not path or "/" in path or "\\" in path or "\x00" in path or path.startswith("."):
            raise NotFound(f"No resource {path[:64]!r} in kernelspec {name}.")
        root = os.path.realpath(resource_dir)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.dirname(full) != root or not os.path.isfile(full):
            raise NotFound(f"No resource {path[:64]!r} in kernelspec {name}.")
        return full

    def _serve(self, kernel_name: str, path: str, include_body: bool) -> None:
        full = self._resolve(kernel_name, path)
        with open(full, "rb") as f:
            data = f.read()
        self.set_header("Content-Type", mimetypes.guess_type(full)[0] or "application/octet-stream")
        self.set_header("Cache-Control", "private, max-age=2592000")
        self.set_header("Content-Length", str(len(data)))
        self.finish(data if include_body else None)

    def get(self, kernel_name: str, path: str) -> None:
        self._serve(kernel_name, path, True)

    def head(self, kernel_name: str, path: str) -> None:
        self._serve(kernel_name, path, False)


class MainKernelHandler(JupyterHandler):
    """``GET /api/kernels`` (the caller's kernels) and ``POST /api/kernels`` ``{name?, env?, path?}``."""

    def get(self) -> None:
        self.send_json([self.model(session) for _, session in self.hub.kernels(self.tenant)])

    async def post(self) -> None:
        body = self.json_body(required=False)
        name = body.get("name") or DEFAULT_KERNEL_NAME
        if not isinstance(name, str):
            raise InvalidRequest("name must be a kernelspec name.")
        # ``path`` (the notebook's directory on the client's side) means nothing in a sandbox: kernels start
        # in /workspace. It is accepted and ignored, as the Kernel Gateway does.
        _, session = await self.hub.start_kernel(self.tenant, name, env=body.get("env"))
        self.set_header("Location", f"/api/kernels/{quote(session.kernel_id or '')}")
        self.send_json(self.model(session), 201)


class KernelHandler(JupyterHandler):
    """``GET /api/kernels/{id}`` and ``DELETE /api/kernels/{id}`` (stops the kernel's sandbox)."""

    def get(self, kernel_id: str) -> None:
        _, session = self.hub.get_kernel(self.tenant, kernel_id)
        self.send_json(self.model(session))

    async def delete(self, kernel_id: str) -> None:
        await self.hub.shutdown_kernel(self.tenant, kernel_id)
        self.connections.forget(kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(JupyterHandler):
    """``POST /api/kernels/{id}/interrupt`` (204) and ``POST /api/kernels/{id}/restart`` (200, the model)."""

    async def post(self, kernel_id: str, action: str) -> None:
        if action == "interrupt":
            await self.hub.interrupt_kernel(self.tenant, kernel_id)
            self.set_status(204)
            self.finish()
            return
        self.hub.get_kernel(self.tenant, kernel_id)  # 404 before telling anyone it restarts
        _, session = await self.connections.restart(
            kernel_id, lambda: self.hub.restart_kernel(self.tenant, kernel_id))
        self.send_json(self.model(session))


# -- websocket ---------------------------------------------------------------------------------------------


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
        if self.connections.count(kernel_id) >= self.hub.max_connections_per_kernel:
            # Upgrades that passed the check together: the registry, counted here with no await before add(),
            # admits the cap and closes the others ("try again later").
            self.close(1013, "The kernel has as many websockets as it may have; close one first.")
            return
        km = self.session.km
        self.zsession = Session(key=km.session.key, signature_scheme=km.session.signature_scheme,
                                session=self.client_session[:128])  # a zmq identity is at most 255 bytes
        identity = self.zsession.bsession
        self.session_key = f"{kernel_id}:{self.zsession.session}"
        try:
            for channel in CHANNELS:
                self.sockets[channel] = getattr(km, f"connect_{channel}")(identity=identity)
        except Exception:
            log.exception("connecting to kernel %s failed", kernel_id)
            self._close_sockets()
            self.close(1011, "The kernel cannot be reached.")
            return
        self.connections.add(kernel_id, self.session_key, self)
        self.record.touch()
        for channel, sock in self.sockets.items():
            self.tasks.append(asyncio.ensure_future(self._relay(channel, sock)))
        # Tornado holds the client's messages until open() returns, so nothing is sent before the iopub
        # subscription is live and no output of the client's first request can be missed.
        if self.session.execution_state != "busy":  # a busy kernel would answer only after its running code
            await self._nudge()
        if self.ws_connection is not None:
            self.tasks.append(asyncio.ensure_future(self._watch()))

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
            except Exception as exc:  # a malformed or badly signed message: drop it, keep relaying
                log.debug("dropped a message from kernel %s: %s", self.kernel_id, exc)
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

    async def _watch(self) -> None:
        """Ends the connection when the kernel's sandbox ends, and restarts a kernel that died under it."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            if self.record.state != "running" or self.session.state == "closed":
                self.close(1001, "The kernel was shut down.")
                return
            if self.session.state == "running" and not self.session.busy:
                try:
                    alive = await self.session.km.is_alive()
                except Exception:
                    alive = True
                if not alive:
                    await self.connections.autorestart(self)

    def on_message(self, message: str | bytes) -> None:
        """Client -> kernel: the message is signed again with the kernel's key and sent on its channel."""
        self.record.touch()
        self.session.last_activity = time.time()
        if self._held is not None:
            self._held.append(message)
            return
        self._forward(message)

    def _forward(self, message: str | bytes) -> None:
        """Send one client frame to the kernel. A frame that is not a Jupyter message in this connection's
        framing closes the socket (1007, with the reason), as a malformed message ends the connection in
        Jupyter Server; one for a channel a client may not write (iopub, or none of the kernel's) is dropped
        with a warning, as there."""
        if self.zsession is None or not self.sockets:
            return
        try:
            channel, parts, msg = self._parse_client_frame(message)
        except (ValueError, TypeError, KeyError, struct.error, RecursionError) as exc:
            log.warning("closing a websocket of kernel %s after a malformed message: %s", self.kernel_id,
                        str(exc)[:200])
            self.close(1007, f"Not a Jupyter message: {str(exc)[:80]}.".encode()[:120].decode(errors="ignore"))
            return
        sock = self.sockets.get(channel)
        if sock is None or channel == "iopub":
            log.warning("dropped a message for kernel %s on the channel %r", self.kernel_id, channel[:32])
            return
        try:
            if parts is not None:
                send_raw_message(self.zsession, sock, parts)
            else:
                send_message(self.zsession, sock, msg, msg.pop("buffers", None) or [])
        except Exception as exc:  # noqa: BLE001 - any field of the client's message may be unpackable
            log.warning("could not send a message to kernel %s: %s: %s", self.kernel_id, type(exc).__name__,
                        str(exc)[:200])

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

    def _close_sockets(self) -> None:
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
            self._close_sockets()

        asyncio.ensure_future(cleanup())


_deps = {"connections": CONNECTIONS}

default_handlers: list[Any] = [
    (r"/api/?", ApiVersionHandler, _deps),
    (r"/api/kernelspecs/?", MainKernelSpecHandler, _deps),
    (rf"/api/kernelspecs/{_KERNEL_NAME}/?", KernelSpecHandler, _deps),
    (rf"/kernelspecs/{_KERNEL_NAME}/(?P<path>.*)", KernelSpecResourceHandler, _deps),
    (r"/api/kernels/?", MainKernelHandler, _deps),
    (rf"/api/kernels/{_KERNEL_ID}/?", KernelHandler, _deps),
    (rf"/api/kernels/{_KERNEL_ID}/(?P<action>restart|interrupt)/?", KernelActionHandler, _deps),
    (rf"/api/kernels/{_KERNEL_ID}/channels", KernelChannelsHandler, _deps),
]
