"""What every HTTP and websocket handler shares: auth, JSON in and out, CORS, and the one place where
:class:`~kernelhub.errors.KernelHubError` becomes ``{"error", "message"}`` (never a traceback).

Handlers get their dependencies through ``initialize(hub=..., tenants=..., config=...)`` from the URL spec
(see :func:`kernelhub.app.make_app`); they parse, call one hub method and shape the answer.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from tornado import httputil, web, websocket

from .. import json_input
from ..errors import (
    Forbidden,
    InvalidRequest,
    KernelHubError,
    PayloadTooLarge,
    Unauthorized,
    UpgradeRequired,
    error_code,
)
from ..services.hub import Hub
from ..services.tenants import Tenant, TenantRegistry

log = logging.getLogger("kernelhub.handlers")

#: Largest request body a route that takes JSON accepts, in bytes.
MAX_JSON_BODY = 8 * 1024 * 1024
#: Content-Length over this many times a route's body limit is refused before a byte of the body is read.
_EARLY_REFUSAL_FACTOR = 4

def json_text(data: Any) -> str:
    """``data`` as JSON text that encodes to UTF-8: a string holding a lone surrogate (a name that is not UTF-8
    slipped through, say) is written as its ASCII escape instead of failing the answer."""
    text = json.dumps(data, ensure_ascii=False, default=str)
    try:
        text.encode()
    except UnicodeEncodeError:
        return json.dumps(data, default=str)
    return text


class GatewayConfig:
    """Settings the surfaces read (from the app's traitlets); plain attributes so tests can build one."""

    def __init__(self, *, allow_origin: str = "", allowed_ws_origins: tuple[str, ...] = (),
                 debug: bool = False, operator_tenant: str = "default") -> None:
        self.allow_origin = allow_origin
        self.allowed_ws_origins = allowed_ws_origins
        self.debug = debug
        #: The tenant whose keys may read ``GET /metrics`` (every tenant's activity, in aggregate).
        self.operator_tenant = operator_tenant


def token_from_request(request: httputil.HTTPServerRequest) -> str | None:
    """``Authorization: Bearer <key>`` or ``token <key>``, else ``?token=``. An empty value is no token.

    Raises :class:`~kernelhub.errors.Unauthorized` saying how to send the key when the header holds something
    else (a bare key, ``Basic ...``): "a key is required" would mislead someone who did send one."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("bearer", "token"):
            return value.strip() or None
        what = "a bare value" if not value.strip() else f"the scheme {scheme[:20]!r}"
        raise Unauthorized(f"The Authorization header holds {what}; send the API key as 'Authorization: Bearer "
                           "<key>' (or 'token <key>', or ?token=<key> in the URL).")
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
        key = token_from_request(self.request)
        self.audit_key = key
        self.tenant = self.tenants.authenticate(key)
        return self.tenant

    #: The key the request presented (kept for its audit fingerprint only; never logged or stored).
    audit_key: str | None = None
    #: The error code the request was answered with, if any.
    audit_error: str | None = None

    def audit(self, action: str, ids: Mapping[str, object] | None, status: int, error: str | None = None,
              code: str | None = None) -> None:
        """Record one action of this connection in the audit log (:meth:`Hub.record_action`): the caller's
        tenant and key fingerprint, ``action``, the ``ids`` it touched, its outcome and the ``code`` it ran."""
        self.hub.record_action(getattr(self, "tenant", None), self.audit_key, action, ids, status, error, code)

    def audit_route(self) -> tuple[str, dict[str, str]]:
        """This request's action (``"POST /v1/sandboxes/{sandbox_id}/execute"``: the method and the path with
        each URL argument that is an id named by the segment before it, :data:`_ID_NAMES`) and those ids."""
        handler: Any = self
        path = self.request.path
        ids: dict[str, str] = {}
        named = {k: v for k, v in (getattr(handler, "path_kwargs", None) or {}).items() if k != "action"}
        for key, arg in [*((None, a) for a in getattr(handler, "path_args", None) or []), *named.items()]:
            if not isinstance(arg, str) or not arg:
                continue
            # A URL argument that is not UTF-8 holds surrogates (surrogateescape): quoted back to its bytes.
            raw = urllib.parse.quote(arg, safe="/:@!$&'()*+,;=-._~", errors="surrogateescape")
            at = path.find(raw)
            if at < 0:
                continue
            before = path[:at].rstrip("/").rsplit("/", 1)[-1]
            name = key or _ID_NAMES.get(before)
            if name is None:
                continue  # a word of the route (an action), not an id
            ids.setdefault(name, arg.encode(errors="surrogateescape").decode(errors="replace"))
            path = f"{path[:at]}{{{name}}}{path[at + len(raw):]}"
        return f"{self.request.method} {path}", ids


#: The id an audited URL argument is recorded as, by the path segment before it.
_ID_NAMES = {"sandboxes": "sandbox_id", "executions": "execution_id", "sessions": "session_id",
             "kernels": "kernel_id", "commands": "command_id", "files": "path", "contexts": "context_id"}
#: Codes of the fields whose value is code (recorded as its SHA-256 and size), by precedence.
_CODE_FIELDS = ("code", "command", "input")

def audited_code(fields: Mapping[str, Any] | None) -> str | None:
    """The code a request or message carries (its ``code``, ``command`` or ``input`` string), for the audit
    log, which keeps its SHA-256 and size."""
    return next((v for f in _CODE_FIELDS if isinstance(v := (fields or {}).get(f), str)), None)


#: Methods a route can implement, in the order an ``Allow`` header lists them.
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(handler_class: type) -> list[str]:
    """The HTTP methods ``handler_class`` implements (tornado answers the others with 405)."""
    unimplemented = web.RequestHandler._unimplemented_method
    return [m for m in _METHODS if getattr(handler_class, m.lower(), unimplemented) is not unimplemented]


def method_not_allowed(handler: web.RequestHandler) -> str:
    """The sentence of a 405 for ``handler``'s request, naming the methods its route allows; also sets the
    ``Allow`` header. Used by every surface's ``write_error`` (REST's and E2B's shapes alike)."""
    allowed = allowed_methods(type(handler))
    handler.set_header("Allow", ", ".join(allowed))
    shown = [m for m in allowed if m not in ("HEAD", "OPTIONS")] or allowed
    method = handler.request.method or ""
    return (f"{method[:32]} is not allowed on {handler.request.path[:200]}; this route allows "
            f"{' and '.join(shown) if len(shown) < 3 else ', '.join(shown[:-1]) + ' and ' + shown[-1]}.")


class JsonErrorsMixin:
    """The one place where failures become ``{"error", "message"}`` answers, for plain and websocket handlers
    alike (a websocket route answers JSON too until it is upgraded).

    - a :class:`~kernelhub.errors.KernelHubError` raised anywhere in a request, even while tornado decodes the
      URL, is answered with its status, code and message;
    - tornado's own refusals (405 for a method the route lacks, 400s) get a sentence: a 405 names the methods
      the route allows, in the sentence and in an ``Allow`` header;
    - anything else is a bug: a generic 500 without a traceback (the log has it).
    """

    request: httputil.HTTPServerRequest
    _finished: bool
    _reason: str

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """URL path parts and query values are UTF-8 once percent-decoded; anything else is a 400."""
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            where = f"The query argument {name[:64]!r}" if name in self.request.query_arguments else "The URL path"
            raise InvalidRequest(f"{where} is not valid UTF-8 once percent-decoded.") from None

    def send_error_json(self, status: int, error: str, message: str) -> None:
        handler: Any = self
        handler.audit_error = error
        hub = getattr(self, "hub", None)
        if hub is not None:
            hub.telemetry.error(error)
        self._close_if_body_unread()
        handler.set_status(status)
        handler.set_header("Content-Type", "application/json; charset=UTF-8")
        handler.finish(json.dumps({"error": error, "message": message}))

    def _close_if_body_unread(self) -> None:
        """An error answered before the request was read whole (refused in ``prepare`` of a streamed-body handler:
        an oversized upload, a bad key, an unknown sandbox) says ``Connection: close``. tornado ends such a
        connection after the answer (reading the rest would be the only other way) without telling the client,
        which would then send its next request down a dying connection (RFC 9112, 9.6)."""
        body = getattr(self.request, "_body_future", None)  # tornado's own, set for @stream_request_body
        if body is not None and not body.done():
            handler: Any = self
            handler.set_header("Connection", "close")

    def _handle_request_exception(self, e: BaseException) -> None:
        handler: Any = self
        if isinstance(e, KernelHubError):
            if self._finished:
                return
            if isinstance(e, Unauthorized):
                handler.set_header("WWW-Authenticate", 'Bearer realm="kernelhub"')
            handler.clear_header("Content-Disposition")
            self.send_error_json(e.status, e.error, e.message)
            return
        super()._handle_request_exception(e)  # type: ignore[misc]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = tornado_error_message(self, status_code, kwargs.get("exc_info", (None, None, None))[1])
        if message and not message.endswith("."):
            message += "."
        # tornado's own errors (no route, a bad method, a malformed request) carry only a status: the code is the
        # registry's for it (kernelhub.errors.error_code), as a client reading the answer expects.
        self.send_error_json(status_code, error_code(status_code), message)


def tornado_error_message(handler: Any, status_code: int, exc: BaseException | None) -> str:
    """The sentence for an error tornado answers itself (``write_error``: no route, a bad method, a malformed
    request, a bug): its ``HTTPError``'s message below 500, the allowed methods for a 405, and for a 5xx a
    sentence that gives nothing of the bug away. Used by every surface's ``write_error`` (/v1, /api, /e2b)."""
    message = handler._reason
    if isinstance(exc, web.HTTPError) and exc.log_message and status_code < 500:
        message = exc.log_message % exc.args if exc.args else exc.log_message
    if status_code == 405:
        message = method_not_allowed(handler)
    elif status_code >= 500:
        message = "The gateway hit an internal error; the sandbox and your data are unaffected."
    return str(message)


@web.stream_request_body
class BaseHandler(AuthMixin, JsonErrorsMixin, web.RequestHandler):
    """JSON REST handler: authenticated in ``prepare``, errors as ``{"error", "message"}``.

    Every request body is streamed in and capped (``@stream_request_body``, see :meth:`data_received`): the
    gateway's HTTP server accepts large bodies for file uploads, and no route may buffer gigabytes a client,
    authenticated or not, sends it. A body over :meth:`body_limit` is counted, dropped and answered 413, before
    a byte of it is read when its Content-Length already says so. A handler that streams its body elsewhere
    (uploads) overrides ``data_received`` and ``body_limit``.
    """

    auth_required = True
    #: Whether each request is an entry of the audit log (made when it ends, :meth:`on_finish`): every
    #: authenticated route's is; ``/mcp`` records its tools instead.
    audited = True
    _body: bytearray
    _body_size = 0
    #: Bytes of the body held against the tenant's Hub.max_request_body_mb_per_tenant, given back at the end.
    _body_held = 0
    _body_refused: KernelHubError | None = None
    _json: dict[str, Any] | None = None
    _created: str | None = None

    def on_finish(self) -> None:
        """The one audit hook of every HTTP route: the request's action, ids and outcome, and the code its
        JSON body carried (``code``, ``command`` or ``input``), once answered; and the body's bytes held against
        the tenant's cap are given back."""
        self._release_body()
        if not self.audited or not self.auth_required or self.request.method == "OPTIONS":
            return
        action, ids = self.audit_route()
        if self._created is not None:
            ids["created"] = self._created
        self.audit(action, ids, self.get_status(), self.audit_error, audited_code(self._json))

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")
        origin = getattr(self, "config", None) and self.config.allow_origin
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
            self.set_header("Vary", "Origin")

    def prepare(self) -> Any:
        self._body = bytearray()
        if self.request.method == "OPTIONS":
            return
        if self.auth_required:
            self.authenticate()
        limit = self.body_limit()
        length = self.request.headers.get("Content-Length", "")
        if limit is not None and length.isdigit() and int(length) > limit * _EARLY_REFUSAL_FACTOR:
            raise PayloadTooLarge(f"The request body may be at most {limit} bytes.")

    def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight: answered without auth, as browsers send no credentials with it."""
        self.set_status(204)
        self.finish()

    # -- the body -----------------------------------------------------------------------------------------

    def body_limit(self) -> int | None:
        """The most bytes of body this request may have; None when the handler streams it elsewhere."""
        return MAX_JSON_BODY

    def data_received(self, chunk: bytes) -> Any:
        self._body_size += len(chunk)
        limit = self.body_limit()
        if limit is not None and self._body_size <= limit and self._body_refused is None:
            tenant = getattr(self, "tenant", None)
            if tenant is not None:
                # What is buffered whole counts against the tenant's share: without it, one key's connections
                # each held a 96 MiB MCP body, unfinished, for as long as they liked.
                try:
                    self.hub.hold_request_body(tenant, len(chunk))
                except KernelHubError as exc:
                    self._body_refused = exc
                    self._release_body()
                    return
                self._body_held += len(chunk)
            self._body += chunk

    def _release_body(self) -> None:
        if self._body_held:
            self.hub.release_request_body(self.tenant, self._body_held)
            self._body_held = 0
        self._body = bytearray()

    def on_connection_close(self) -> None:
        self._release_body()
        super().on_connection_close()

    def body(self) -> bytes:
        """The whole request body (read before the method runs); a 413 when it was over :meth:`body_limit`, a
        429 when the tenant's requests had ``Hub.max_request_body_mb_per_tenant`` buffered already."""
        limit = self.body_limit()
        if limit is not None and self._body_size > limit:
            raise PayloadTooLarge(f"The request body may be at most {limit} bytes.")
        if self._body_refused is not None:
            raise self._body_refused
        return bytes(self._body)

    def json_body(self, *, required: bool = True) -> dict[str, Any]:
        """The body as a JSON object, parsed by :func:`kernelhub.json_input.loads`; ``{}`` when empty and not
        ``required``. Whatever the Content-Type says: clients such as ``curl -d`` label JSON as a form."""
        body = self.body()
        if not body.strip():
            if required:
                raise InvalidRequest("The request needs a JSON object body.")
            return {}
        data = json_input.loads(body)
        if not isinstance(data, dict):
            raise InvalidRequest("The body must be a JSON object.")
        self._json = data
        return data

    def send_json(self, data: Any, status: int = 200) -> None:
        if status in (201, 202) and isinstance(data, dict) and isinstance(data.get("id"), str):
            self._created = data["id"]  # what the request made, for its audit entry
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json_text(data).encode())


class _AnyMethod(tuple[str, ...]):
    """A ``SUPPORTED_METHODS`` that holds every method name, so tornado lets any method reach ``prepare``."""

    def __contains__(self, item: object) -> bool:
        return True


#: The collections whose members' ids are path segments, with what one member is called in a sentence.
_ID_SEGMENTS = {"sandboxes": "sandbox", "executions": "execution", "sessions": "session", "kernels": "kernel",
                "kernelspecs": "kernelspec"}
_EMPTY_ID = re.compile(r"^/(?:v1|api)/(?P<collection>" + "|".join(_ID_SEGMENTS) + r")/(?P<rest>/.*)$")


def missing_id(path: str) -> str | None:
    """The sentence for a path whose id segment is empty (``/v1/sandboxes//execute``: an unset variable in a
    script, most often), or None when the path has no such gap."""
    match = _EMPTY_ID.match(path)
    if match is None:
        return None
    collection = match["collection"]
    return (f"The {_ID_SEGMENTS[collection]} id is missing in {path[:200]}: it goes between "
            f"{path[:match.start('rest')]} and {match['rest'][:100]} (is the variable that holds it empty?)")


class NotFoundHandler(BaseHandler):
    """Any route no handler matches: a JSON 404 (after auth, so it tells nothing to strangers), whatever the
    method: there is no route whose methods a 405 could name. A path with an empty id segment says that the
    id is missing (:func:`missing_id`)."""

    SUPPORTED_METHODS = _AnyMethod()

    def prepare(self) -> None:
        super().prepare()
        path = self.request.path
        raise web.HTTPError(404, "%s", missing_id(path) or f"No such route: {path[:200]}")


@web.stream_request_body
class WebSocketBase(AuthMixin, JsonErrorsMixin, websocket.WebSocketHandler):
    """Websocket handler: authenticated before the upgrade, origin checked, Nagle off (KERNELS.md).

    Until the upgrade it answers as a REST route does (JSON errors, a 405 naming GET); a request that is not a
    websocket handshake is a 400 with a sentence. An upgrade request has no body: one sent anyway is dropped as
    it arrives (``@stream_request_body``), never buffered. Messages are capped at :attr:`max_message_size`
    bytes; a bigger one closes the socket with 1009 ("message too big"), as tornado does.
    """

    #: The largest message a client may send, in bytes; None for the app's ``websocket_max_message_size``.
    message_limit: int | None = MAX_JSON_BODY

    @property
    def max_message_size(self) -> int:
        return self.message_limit or int(super().max_message_size)

    def data_received(self, chunk: bytes) -> None:
        pass

    def before_upgrade(self, *args: Any, **kwargs: Any) -> None:
        """Called after auth and before the upgrade with the URL's arguments: look up what the socket is for,
        so that an unknown (or another tenant's) id is a plain JSON 404 rather than an opened-then-closed socket.
        Gets the URL's groups as tornado passes them (positional, or by name for named groups)."""

    async def get(self, *args: Any, **kwargs: Any) -> None:
        action, ids = self.audit_route()
        try:
            self.authenticate()
            self._check_handshake()
            self.before_upgrade(*args, **kwargs)
            # Each open websocket holds a descriptor of the gateway: without a cap one tenant's sockets could
            # take them all (Hub.max_websockets_per_tenant).
            self.hub.hold_websocket(self.tenant)
        except KernelHubError as exc:
            self._handle_request_exception(exc)
            self.audit(action, ids, exc.status, exc.error)
            return
        self.audit(action, ids, 101)
        try:
            await super().get(*args, **kwargs)  # returns once the socket is closed, or the upgrade failed
        finally:
            self.hub.release_websocket(self.tenant)

    def _check_handshake(self) -> None:
        """Refuse, with JSON and a sentence, every handshake tornado would refuse with plain text or no body
        (RFC 6455 section 4.2.1: Upgrade, Connection, Sec-WebSocket-Key and -Version; the origin check)."""
        headers = self.request.headers
        connection = [part.strip().lower() for part in headers.get("Connection", "").split(",")]
        if headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection:
            raise InvalidRequest(f"{self.request.path[:200]} is a websocket; open it with a websocket handshake "
                                 "(Connection: Upgrade, Upgrade: websocket).")
        if headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
            self.set_header("Sec-WebSocket-Version", "13")  # RFC 6455 section 4.4: the versions spoken here
            raise UpgradeRequired("This gateway speaks websocket version 13 (Sec-WebSocket-Version: 13).")
        if not headers.get("Sec-WebSocket-Key") or not headers.get("Host"):
            raise InvalidRequest("A websocket handshake needs the Host and Sec-WebSocket-Key headers.")
        origin = headers.get("Origin") or headers.get("Sec-Websocket-Origin")
        if origin and not self.check_origin(origin):
            raise Forbidden(f"Websockets from the origin {origin[:200]!r} are not allowed on this gateway.")

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
