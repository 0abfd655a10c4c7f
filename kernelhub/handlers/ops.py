"""What operators and their tools ask a running gateway: ``GET /healthz`` and ``GET /metrics``.

- ``/healthz`` needs no key (load balancers and orchestrators send none) and is cheap: it asks
  :meth:`~kernelhub.services.hub.Hub.health` whether a sandbox could start now (a few ``stat`` calls; no sandbox
  is started). 200 ``{"status": "ok"}``, or 503 ``{"status": "unavailable", "error": "unavailable", "message",
  "reasons": [sentence…]}``.
- ``/metrics`` is the Prometheus text format of :class:`~kernelhub.services.telemetry.Telemetry`. It shows
  every tenant's activity in aggregate, so only the operator's keys may read it: those of the tenant
  ``--operator-tenant`` (``default``, whose key is ``--token``); any other valid key is a 403.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..errors import Forbidden
from .base import BaseHandler


class HealthHandler(BaseHandler):
    """``GET /healthz`` (and ``HEAD``): whether this gateway can start sandboxes; no auth."""

    auth_required = False

    def get(self) -> None:
        reasons = self.hub.health()
        if not reasons:
            self.send_json({"status": "ok"})
            return
        message = "This gateway cannot start sandboxes now: " + "; ".join(reasons) + "."
        self.send_json({"status": "unavailable", "error": "unavailable", "message": message, "reasons": reasons},
                       503)

    def head(self) -> None:
        self.set_status(200 if not self.hub.health() else 503)
        self.finish()


class PrometheusHandler(BaseHandler):
    """``GET /metrics``: the Prometheus text format, for the operator's keys only."""

    def get(self) -> None:
        operator = self.config.operator_tenant
        if self.tenant.name != operator:
            raise Forbidden(f"/metrics shows every tenant's activity: only the keys of the tenant {operator!r} "
                            "(the operator's, set with --operator-tenant) may read it.")
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.hub.telemetry.registry))


default_handlers: list[Any] = [
    (r"/healthz", HealthHandler),
    (r"/metrics", PrometheusHandler),
]
