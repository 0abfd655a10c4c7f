"""What every E2B handler shares: telling the planes apart, authentication, E2B's error shapes.

E2B's SDKs send everything to one endpoint (E2B.md 3): requests with an ``E2b-Sandbox-Id`` header are for a
sandbox's inside, on the port that ``E2b-Sandbox-Port`` names (49983: envd, 49999: the code interpreter); the
others are the control plane. :class:`SandboxPort` and :class:`ControlPlane` are the route matchers that say so.

- :class:`ControlHandler`: authenticated by ``X-API-Key`` (a kernelhub tenant's key; ``Authorization: Bearer``
  works too); errors ``{"code": <status>, "message"}``.
- :class:`SandboxHandler`: authenticated by the sandbox's own token (:mod:`kernelhub.services.tokens`), which
  names its tenant; every hub call then goes as that tenant, so another tenant's sandbox is as unknown here as
  on ``/v1``. A sandbox that is unknown, stopped, or not the token's answers ``502 {"message": "… was not
  found"}``, the text on which the SDK raises ``SandboxNotRunningException``. Errors of plain routes are
  ``{"code": <status>, "message"}``; of RPCs, Connect's (:mod:`~kernelhub.handlers.e2b.connect`).

Every error the SDK would retry (502, 503, 504) carries ``Should-Retry: false``: none of ours gets better by
sending the same request again. Nothing here decides policy: each handler calls the hub as ``/v1`` does.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from tornado import httputil, web
from tornado.routing import PathMatches

from ...errors import KernelHubError, NotFound, SandboxNotRunning, error_for
from ...services.tenants import Tenant
from ..base import BaseHandler, token_from_request, tornado_error_message
from .connect import ConnectError, connect_error

log = logging.getLogger("kernelhub.e2b")

#: Where the E2B surface is mounted; E2B_API_URL and E2B_SANDBOX_URL are both ``http://HOST:PORT/e2b``.
PREFIX = "/e2b"
#: envd's port and the code interpreter's, as the SDK names them in ``E2b-Sandbox-Port``.
ENVD_PORT = 49983
INTERPRETER_PORT = 49999
#: The envd version advertised: the SDK's feature switch (E2B.md P5): octet-stream uploads, close_stdin,
#: no implicit user; below 0.6.2, so the SDK sends no file metadata headers and starts no watchers.
ENVD_VERSION = "0.5.7"


class ControlPlane(PathMatches):
    """A control-plane route: the path under :data:`PREFIX`, and no ``E2b-Sandbox-Id`` header."""

    def __init__(self, pattern: str) -> None:
        super().__init__(PREFIX + pattern)

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if "E2b-Sandbox-Id" in request.headers:
            return None
        return super().match(request)


class SandboxPort(PathMatches):
    """A sandbox-plane route: ``E2b-Sandbox-Id`` present, ``E2b-Sandbox-Port`` equal to ``port``, the path under
    :data:`PREFIX` (a doubled slash after it, from an ``E2B_SANDBOX_URL`` ending in ``/``, is accepted)."""

    def __init__(self, port: int, pattern: str) -> None:
        super().__init__(PREFIX + "/+" + pattern.lstrip("/"))
        self.port = str(port)

    def match(self, request: httputil.HTTPServerRequest) -> dict[str, Any] | None:
        if "E2b-Sandbox-Id" not in request.headers:
            return None
        if request.headers.get("E2b-Sandbox-Port", "").strip() != self.port:
            return None
        return super().match(request)


class E2BHandler(BaseHandler):
    """Base of the E2B handlers: kernelhub's capped JSON body reading, E2B's error bodies."""

    auth_required = False

    async def prepare(self) -> None:  # type: ignore[override]
        # BaseHandler's: a body is capped at body_limit() as it comes (and refused at once when its
        # Content-Length is far over); /files, which streams its body to disk, has no such limit.
        BaseHandler.prepare(self)

    def send_error_body(self, status: int, body: dict[str, Any]) -> None:
        if self._finished:
            return
        self.clear_header("Content-Disposition")
        self._close_if_body_unread()
        if status in (502, 503, 504):
            self.set_header("Should-Retry", "false")
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def render_error(self, exc: KernelHubError) -> None:
        """One of kernelhub's errors in this plane's shape; the default is the control plane's."""
        self.send_error_body(exc.status, {"code": exc.status, "message": exc.message})

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, web.Finish):
            if not self._finished:
                self.finish()
            return
        if isinstance(e, KernelHubError):
            self.render_error(e)
            return
        if isinstance(e, ConnectError):
            self.send_error_body(e.status, e.to_dict())
            return
        super()._handle_request_exception(e)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # tornado's own errors (a bad method, a malformed request) and bugs: the same shape, never a traceback.
        message = tornado_error_message(self, status_code, kwargs.get("exc_info", (None, None, None))[1])
        self.render_error(error_for(None, message, status_code))


class ControlHandler(E2BHandler):
    """A control-plane handler: the tenant of the API key (``X-API-Key``) before anything else."""

    tenant: Tenant

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        if self.request.method == "OPTIONS":
            return
        key = self.request.headers.get("X-API-Key", "").strip() or token_from_request(self.request)
        self.tenant = self.tenants.authenticate(key)


class SandboxHandler(E2BHandler):
    """A sandbox-plane handler: the sandbox of ``E2b-Sandbox-Id`` and its owner, from the sandbox's token.

    ``traffic`` handlers (the code interpreter's) also take the traffic token (``E2B-Traffic-Access-Token``)."""

    traffic = False
    sandbox_id: str
    tenant: Tenant

    async def prepare(self) -> None:  # type: ignore[override]
        await super().prepare()
        self.sandbox_id = self.request.headers.get("E2b-Sandbox-Id", "").strip()[:128]
        envd = self.request.headers.get("X-Access-Token")
        traffic = self.request.headers.get("E2B-Traffic-Access-Token") if self.traffic else None
        self.tenant = self.hub.sandbox_by_token(self.sandbox_id, envd=envd, traffic=traffic)

    def render_gone(self) -> None:
        self.send_error_body(502, {"code": 502, "message": f"The sandbox {self.sandbox_id} was not found: it is "
                                                           "not running, or the access token is not its own."})

    def render_error(self, exc: KernelHubError) -> None:
        if isinstance(exc, SandboxNotRunning) or (isinstance(exc, NotFound) and not hasattr(self, "tenant")):
            self.render_gone()
            return
        self.send_error_body(exc.status, {"code": exc.status, "message": exc.message})


class RpcHandler(SandboxHandler):
    """An envd RPC: errors in Connect's shape (the sandbox being gone stays a plain 502, as E2B's proxy says)."""

    def render_error(self, exc: KernelHubError) -> None:
        if isinstance(exc, SandboxNotRunning) or (isinstance(exc, NotFound) and not hasattr(self, "tenant")):
            self.render_gone()
            return
        error = connect_error(exc)
        self.send_error_body(error.status, error.to_dict())
