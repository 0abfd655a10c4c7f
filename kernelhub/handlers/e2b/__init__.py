"""E2B's protocol under ``/e2b``: E2B's unmodified Python SDKs (``e2b``, ``e2b-code-interpreter``) against kernelhub.

Configured with ``E2B_API_KEY`` (a kernelhub tenant's key), ``E2B_API_URL`` and ``E2B_SANDBOX_URL`` (both
``http://HOST:PORT/e2b``), the SDKs send everything to the gateway's own port; docs/e2b-protocol.md records the
protocol. The rooms: :mod:`~.base` (telling the planes apart, authentication, error shapes), :mod:`~.control`
(the control plane), :mod:`~.connect` (Connect over JSON), :mod:`~.envd` (files, filesystem and process RPCs,
port 49983) and :mod:`~.interpreter` (the code interpreter, port 49999). Every route calls the hub, as ``/v1``
does, as the tenant its key (or its sandbox's token) names: one policy for both surfaces.

Mounted by :func:`kernelhub.app.make_app` through :data:`default_handlers`. What matches no route under ``/e2b``
answers in E2B's shape: a control-plane route (pause, resume, templates, volumes, …) 501 after authentication; a
sandbox-plane one 404, or ``unimplemented`` for an RPC.
"""

from __future__ import annotations

from typing import Any

from tornado.routing import PathMatches

from . import control, envd, interpreter
from .base import PREFIX, E2BHandler


class SandboxRouteNotFound(E2BHandler):
    """A sandbox-plane path no route serves (any port): 404, or Connect's ``unimplemented`` for an RPC path."""

    def _answer(self, *args: Any) -> None:
        path = self.request.path[len(PREFIX):].strip("/")
        if "." in path.split("/")[0]:  # <package.Service>/<Method>
            self.send_error_body(501, {"code": "unimplemented", "message": f"No RPC {path[:200]!r} here."})
            return
        self.send_error_body(404, {"code": 404, "message": f"No such route in the sandbox: /{path[:200]}"})

    get = post = put = patch = delete = head = _answer


default_handlers: list[Any] = [
    *envd.default_handlers,
    *interpreter.default_handlers,
    *control.default_handlers,
    (PathMatches(PREFIX + r"(?:/.*)?"), SandboxRouteNotFound, {}),
]
