"""What every HTTP and websocket handler shares: auth, JSON in and out, CORS, and the one place where
:class:`~kernelhub.errors.KernelHubError` becomes ``{"error", "message"}`` (never a traceback).

Handlers get their dependencies through ``initialize(hub=..., tenants=..., config=...)`` from the URL spec
(see :func:`kernelhub.app.make_app`); they parse, call one hub method and shape the answer.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlparse

from tornado import httputil, web, websocket

from ..errors import InvalidRequest, KernelHubError, PayloadTooLarge, Unauthorized, error_code
from ..services.hub import Hub
from ..services.tenants import Tenant, TenantRegistry

log = logging.getLogger("kernelhub.handlers")

MAX_JSON_BODY = 8 * 1024 * 1024

class GatewayConfig:
    """Settings the surfaces read (from the app's traitlets); plain attributes so tests can build one."""

    def __init__(self, *, allow_origin: str = "", allowed_ws_origins: tuple[str, ...] = (),
                 debug: bool = False) -> None:
        self.allow_origin = allow_origin
        self.allowed_ws_origins = allowed_ws_origins
        self.debug = debug


def token_from_request(request: httputil.HTTPServerRequest) -> str | None:
    """``Authorization: Bearer <key>`` or ``token <key>``, else ``?token=``. An empty value is no token."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("bearer", "token"):
            return value.strip() or None
        return None
    values = request.query_arguments.get("token")
    if values:
        return values[-1].decode(errors="replace").strip() or None
    return None


class AuthMixin:
    """Auth and dependencies for both plain and websocket handlers."""

    hub: Hub
    tenants: TenantRegistry
    config: GatewayConfig
    tenant: Tenant
    request: httputil.HTTPServerRequest

    def initialize(self, hub: Hub, tenants: TenantRegistry, config: GatewayConfig, **kwargs: Any) -> None:
        self.hub = hub
        self.tenants = tenants
        self.config = config

    def authenticate(self) -> Tenant:
        self.tenant = self.tenants.authenticate(token_from_request(self.request))
        return self.tenant


class BaseHandler(AuthMixin, web.RequestHandler):
    """JSON REST handler: authenticated in ``prepare``, errors as ``{"error", "message"}``."""

    auth_required = True

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        origin = getattr(self, "config", None) and self.config.allow_origin
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
            self.set_header("Vary", "Origin")

    def prepare(self) -> None:
        if self.request.method == "OPTIONS":
            return
        if self.auth_required:
            self.authenticate()

    def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight: answered without auth, as browsers send no credentials with it."""
        self.set_status(204)
        self.finish()

    # -- JSON ---------------------------------------------------------------------------------------------

    def json_body(self, *, required: bool = True) -> dict[str, Any]:
        body = self.request.body
        if not body:
            if required:
                raise InvalidRequest("The request needs a JSON object body.")
            return {}
        if len(body) > MAX_JSON_BODY:
            raise PayloadTooLarge("The JSON body is too large.")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"The body is not valid JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise InvalidRequest("The body must be a JSON object.")
        return data

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(data, ensure_ascii=False, default=str))

    # -- errors -------------------------------------------------------------------------------------------

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, KernelHubError):
            if self._finished:
                return
            if isinstance(e, Unauthorized):
                self.set_header("WWW-Authenticate", 'Bearer realm="kernelhub"')
            self.clear_header("Content-Disposition")
            self._close_if_body_unread()
            self.send_json(e.to_dict(), e.status)
            return
        super()._handle_request_exception(e)  # type: ignore[misc]

    def _close_if_body_unread(self) -> None:
        """An error answered before the request was read whole (refused in ``prepare`` of a streamed-body handler:
        an oversized upload, a bad key, an unknown sandbox) says ``Connection: close``. tornado ends such a
        connection after the answer (reading the rest would be the only other way) without telling the client,
        which would then send its next request down a dying connection (RFC 9112, 9.6)."""
        body = getattr(self.request, "_body_future", None)  # tornado's own, set for @stream_request_body
        if body is not None and not body.done():
            self.set_header("Connection", "close")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # tornado's own errors (no route, a bad method, a malformed request) carry only a status: the code is the
        # registry's for it (kernelhub.errors.error_code), as a client reading the answer expects.
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message and status_code < 500:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if status_code >= 500:
            message = "The gateway hit an internal error; the sandbox and your data are unaffected."
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self._close_if_body_unread()
        self.finish(json.dumps({"error": error_code(status_code), "message": str(message)}))


class NotFoundHandler(BaseHandler):
    """Any route no handler matches: a JSON 404 (after auth, so it tells nothing to strangers)."""

    def prepare(self) -> None:
        super().prepare()
        raise web.HTTPError(404, "No such route: %s", self.request.path)


class WebSocketBase(AuthMixin, websocket.WebSocketHandler):
    """Websocket handler: authenticated before the upgrade, origin checked, Nagle off (KERNELS.md)."""

    def before_upgrade(self, *args: Any, **kwargs: Any) -> None:
        """Called after auth and before the upgrade with the URL's arguments: look up what the socket is for,
        so that an unknown (or another tenant's) id is a plain JSON 404 rather than an opened-then-closed socket.
        Gets the URL's groups as tornado passes them (positional, or by name for named groups)."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        try:
            self.authenticate()
            self.before_upgrade(*args, **kwargs)
        except KernelHubError as exc:
            self.set_status(exc.status)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(json.dumps(exc.to_dict()))
            return
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        """Same host, or an origin on the configured list. Non-browser clients send no Origin."""
        allowed = self.config.allowed_ws_origins
        if "*" in allowed or origin in allowed:
            return True
        parsed = urlparse(origin)
        host = self.request.headers.get("Host", "")
        return parsed.netloc.lower() == host.lower()

    def open(self, *args: Any, **kwargs: Any) -> Any:  # subclasses call super().open() first
        self.set_nodelay(True)
        return None
