"""The Jupyter API's kernels over REST: ``GET /api``, ``GET|POST /api/kernels``, ``GET|DELETE /api/kernels/{id}``
and ``POST /api/kernels/{id}/interrupt|restart``, in Jupyter Server's shapes (``services/kernels/handlers.py``).

Each call is one hub method (:class:`~kernelhub.services.kernels.Kernels`): every kernel runs in a sandbox of its
own, a tenant sees only its own kernels, and another tenant's kernel id answers 404. The kernel model's
``connections`` is the count of the websockets registry
(:class:`~kernelhub.handlers.jupyter.channels.KernelConnections`), handed to these handlers through
``initialize``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from ...errors import InvalidRequest
from ...models import iso_micro
from ...services.sessions import JupyterSession
from ..base import BaseHandler
from .channels import KernelConnections
from .kernelspecs import DEFAULT_KERNEL_NAME

#: What ``GET /api`` reports: the Jupyter Server API version these routes follow.
JUPYTER_API_VERSION = "2.14.0"


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


class ApiVersionHandler(BaseHandler):
    """``GET /api``: the API version, without auth (Jupyter Server and the Kernel Gateway answer it to anyone,
    and clients use it as a liveness probe)."""

    auth_required = False

    def get(self) -> None:
        self.send_json({"version": JUPYTER_API_VERSION})


class KernelsHandler(BaseHandler):
    """Base of the kernel routes: the websockets registry comes through ``initialize``."""

    connections: KernelConnections

    def initialize(self, connections: KernelConnections, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.connections = connections

    def model(self, session: JupyterSession) -> dict[str, Any]:
        return kernel_model(session, self.connections.count(session.kernel_id))


class MainKernelHandler(KernelsHandler):
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


class KernelHandler(KernelsHandler):
    """``GET /api/kernels/{id}`` and ``DELETE /api/kernels/{id}`` (stops the kernel's sandbox; its websockets are
    closed when the hub says it is gone)."""

    def get(self, kernel_id: str) -> None:
        _, session = self.hub.get_kernel(self.tenant, kernel_id)
        self.send_json(self.model(session))

    async def delete(self, kernel_id: str) -> None:
        await self.hub.shutdown_kernel(self.tenant, kernel_id)
        self.set_status(204)
        self.finish()


class KernelActionHandler(KernelsHandler):
    """``POST /api/kernels/{id}/interrupt`` (204) and ``POST /api/kernels/{id}/restart`` (200, the model)."""

    async def post(self, kernel_id: str, action: str) -> None:
        if action == "interrupt":
            await self.hub.interrupt_kernel(self.tenant, kernel_id)
            self.set_status(204)
            self.finish()
            return
        _, session = await self.hub.restart_kernel(self.tenant, kernel_id)
        self.send_json(self.model(session))
