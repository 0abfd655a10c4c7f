"""Streamable HTTP at ``/mcp`` on the gateway: a tornado handler in front of the SDK's session manager.

The SDK's transport is an ASGI application (:class:`mcp.server.streamable_http_manager.StreamableHTTPSessionManager`);
:class:`MCPHandler` authenticates the request exactly as every REST route does (``Authorization: Bearer <key>``,
``token <key>`` or ``?token=``; 401 otherwise), then hands it to the manager as an ASGI call: the request body
is the one ``http.request`` message, the answer's messages are written and flushed as they come (server-sent
events carry progress notifications while a tool runs), and a closed connection is an ``http.disconnect``.

The manager runs stateless: every POST is served on its own, so nothing is kept between requests and the tenant
is read from each request. Tools run as that tenant against the gateway's in-process hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import MutableMapping
from typing import Any

from mcp.server import ServerRequestContext
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from tornado import iostream

from ..errors import Unauthorized
from ..handlers.base import BaseHandler, GatewayConfig, error_code
from ..services.hub import Hub
from ..services.tenants import Tenant, TenantRegistry
from .backends import HubBackend
from .server import build_server

log = logging.getLogger("kernelhub.mcp")

#: The ASGI scope key that carries the authenticated tenant to the tools, and the one that carries its API key
#: (for the audit log's key fingerprint).
TENANT_KEY = "kernelhub.tenant"
API_KEY = "kernelhub.key"
#: Largest JSON-RPC request body accepted (file_upload carries files base64-encoded).
MAX_REQUEST_BYTES = 96 * 1024 * 1024
#: Response headers tornado sets itself.
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive"}


class MCPBridge:
    """The gateway's one MCP server and session manager, started on the first request."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.server = build_server(self._backend_for)
        self.manager = StreamableHTTPSessionManager(app=self.server, stateless=True, json_response=False,
                                                    max_request_body_size=MAX_REQUEST_BYTES)
        self._ready: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def _backend_for(self, ctx: ServerRequestContext[Any, Any]) -> HubBackend:
        scope = getattr(ctx.request, "scope", None) or {}
        tenant = scope.get(TENANT_KEY)
        if not isinstance(tenant, Tenant):
            raise Unauthorized("This MCP request carries no authenticated key.")
        key = scope.get(API_KEY)
        return HubBackend(self.hub, tenant, key if isinstance(key, str) else None)

    async def ensure_running(self) -> None:
        if self._ready is None:
            self._ready = asyncio.Event()
            self._task = asyncio.ensure_future(self._run(self._ready))
        await self._ready.wait()

    async def _run(self, ready: asyncio.Event) -> None:
        # Lives as long as the gateway's loop; cancelled with the loop's other tasks at shutdown.
        async with self.manager.run():
            ready.set()
            await asyncio.Event().wait()


class MCPHandler(BaseHandler):
    """``POST /mcp``: the MCP streamable HTTP transport behind the gateway's auth. The body is
    streamed in and capped at :data:`MAX_REQUEST_BYTES` by :class:`~kernelhub.handlers.base.BaseHandler`, as
    the REST routes cap theirs."""

    bridge: MCPBridge
    audited = False  # each tool call is an entry (kernelhub.mcp.server.audit_tool), not the POST carrying it

    def initialize(self, hub: Hub, tenants: TenantRegistry, config: GatewayConfig,  # type: ignore[override]
                   bridge: MCPBridge, **kwargs: Any) -> None:
        super().initialize(hub=hub, tenants=tenants, config=config)
        self.bridge = bridge
        self._disconnected = asyncio.Event()

    def body_limit(self) -> int | None:
        return MAX_REQUEST_BYTES

    def on_connection_close(self) -> None:
        self._disconnected.set()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._disconnected.set()
        super().on_finish()

    async def post(self) -> None:
        # Only POST: the manager runs stateless, so there is no session to stream to (GET) or end (DELETE),
        # and the transport's spec lets a server answer those 405 (this route's own, with Allow: POST).
        await self._asgi()

    def _scope(self) -> dict[str, Any]:
        request = self.request
        host, _, port = (request.host or "").rpartition(":")
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.protocol,
            "path": request.path,
            "raw_path": request.path.encode("latin-1", "replace"),
            "query_string": (request.query or "").encode("latin-1", "replace"),
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1", "replace"))
                        for k, v in request.headers.get_all()],
            "client": (request.remote_ip, 0),
            "server": (host or request.host, int(port) if port.isdigit() else 80),
            "state": {},
            TENANT_KEY: self.tenant,
            API_KEY: self.audit_key,
        }

    async def _asgi(self) -> None:
        body = self.body()
        await self.bridge.ensure_running()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self._disconnected.wait()
            return {"type": "http.disconnect"}

        refusal: dict[str, Any] = {}  # a plain-text (or empty) error answer of the SDK's, being collected

        async def send(message: MutableMapping[str, Any]) -> None:
            if self._finished or self._disconnected.is_set():
                return
            if message["type"] == "http.response.start":
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
                if message["status"] >= 400 and "json" not in headers.get("content-type", ""):
                    refusal.update(status=message["status"], text=b"")
                    return
                self.set_status(message["status"])
                self.clear_header("Content-Type")
                for raw_name, raw_value in message.get("headers", []):
                    name = raw_name.decode("latin-1")
                    if name.lower() not in _HOP_HEADERS:
                        self.add_header(name, raw_value.decode("latin-1"))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if refusal:
                    refusal["text"] += chunk
                    if not message.get("more_body"):
                        self._send_refusal(**refusal)
                    return
                if chunk:
                    self.write(chunk)
                if message.get("more_body"):
                    try:
                        await self.flush()
                    except iostream.StreamClosedError:
                        self._disconnected.set()
                else:
                    self.finish()

        await self.bridge.manager.handle_request(self._scope(), receive, send)
        if not self._finished:
            with contextlib.suppress(iostream.StreamClosedError):
                self.finish()


    def _send_refusal(self, status: int, text: bytes) -> None:
        """The SDK refused the request at the HTTP level with plain text or nothing (a 400 for the
        Content-Type, 406, 421...): answered as every route answers errors, ``{"error", "message"}``."""
        message = text.decode("utf-8", "replace").strip()
        if status == 406:
            message = ("An MCP request must accept both application/json and text/event-stream (its Accept "
                       "header)")
        elif status == 400 and "content-type" in message.lower():
            message = "An MCP request is JSON: send it with Content-Type: application/json"
        message = message or f"The MCP transport refused the request ({status})"
        self.send_error_json(status, error_code(status), message if message.endswith(".") else message + ".")


def handlers(hub: Hub, tenants: TenantRegistry, config: GatewayConfig) -> list[tuple[str, type, dict[str, Any]]]:
    """The ``/mcp`` route for :func:`kernelhub.app.make_app`."""
    bridge = MCPBridge(hub)
    return [(r"/mcp/?", MCPHandler, {"hub": hub, "tenants": tenants, "config": config, "bridge": bridge})]
