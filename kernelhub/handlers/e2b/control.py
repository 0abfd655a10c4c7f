"""E2B's control plane (E2B.md 5.1): create, list, connect, info, timeout, metrics, kill.

Each route authenticates the API key as a kernelhub tenant and calls the hub as ``/v1`` does; what is E2B's
own is the translation:

- ``templateID`` is a template name or alias (``Hub.template_aliases``: ``base`` and ``code-interpreter-v1``
  are ``python``); ``envVars`` is ``env``; ``metadata`` is ``metadata``;
- ``timeout`` (seconds, 300 when absent) is the sandbox's deadline (``expires_at``), moved by
  ``POST /sandboxes/{id}/timeout`` and extended (never shortened) by ``connect``, within the sandbox's
  ``max_lifetime_s`` (raised to a create's ``timeout`` when that is longer than the default, up to the
  gateway's maximum; a longer one is refused before any sandbox is made). The sandbox is not stopped as idle
  before it: E2B has no idle timeout, so the idle limit is asked as long as the gateway allows;
- ``allow_internet_access: false`` is ``network: "none"``; ``true`` (or nothing) leaves the template's network
  policy; a ``network`` object's ``allowOut``/``denyOut`` rules are passed on as kernelhub's policy
  ``{"allow": [...], "deny": [...]}`` (deny rules alone therefore allow nothing: stricter than E2B, where they
  carve holes out of open internet access);
- a sandbox that is not running answers 404, as a killed one does on E2B; ``GET /v2/sandboxes`` lists the
  running ones, pages through ``x-next-token``.

Every other control-plane route (pause, resume, snapshots, templates, volumes, …) answers 501 in E2B's error
shape.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import math
import time
import urllib.parse
from typing import Any

from ...errors import InvalidRequest, NotFound
from ...models import iso
from ...services.sandboxes import SandboxRecord
from .base import ENVD_VERSION, ControlHandler, ControlPlane

#: E2B's default sandbox lifetime when a create names none (seconds).
DEFAULT_TIMEOUT_S = 300
#: Create fields for features kernelhub does not have; asking for them is refused rather than ignored.
UNSUPPORTED_CREATE = {"autoPause": "pausing", "autoResume": "resuming", "mcp": "the MCP gateway",
                      "volumeMounts": "volumes", "iam": "IAM tokens"}
DEFAULT_PAGE = 100
MAX_PAGE = 1000


def _key(record: SandboxRecord) -> tuple[float, str]:
    return (record.created_at, record.id)


def _record_cpu(record: SandboxRecord) -> int:
    return max(1, math.ceil(record.limits.cpu - 1e-9))


def _running(handler: ControlHandler, sandbox_id: str) -> SandboxRecord:
    """The tenant's running sandbox; a stopped one is as gone as on E2B (404)."""
    record = handler.hub.get_sandbox(handler.tenant, sandbox_id)
    if record.state != "running":
        raise NotFound(f"Sandbox {sandbox_id[:64]} is not running ({record.reason or record.state}).")
    return record


def _listed(record: SandboxRecord) -> dict[str, Any]:
    return {
        "templateID": record.template.name,
        "alias": record.template.name,
        "sandboxID": record.id,
        "clientID": "kernelhub",
        "startedAt": iso(record.created_at),
        "endAt": iso(record.expires_at),
        "cpuCount": _record_cpu(record),
        "memoryMB": record.limits.memory_mb,
        "diskSizeMB": record.limits.disk_mb,
        "metadata": {str(k): v if isinstance(v, str) else str(v) for k, v in record.metadata.items()},
        "state": "running" if record.state == "running" else "paused",
        "envdVersion": ENVD_VERSION,
    }


class _SandboxAnswer(ControlHandler):
    def sandbox(self, record: SandboxRecord, status: int) -> None:
        tokens = self.hub.sandbox_tokens(self.tenant, record.id)
        self.send_json({
            "templateID": record.template.name,
            "alias": record.template.name,
            "sandboxID": record.id,
            "clientID": "kernelhub",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": tokens.envd,
            "trafficAccessToken": tokens.traffic,
            "domain": None,
        }, status)


def _timeout(body: dict[str, Any], default: float | None) -> float | None:
    value = body.get("timeout", default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise InvalidRequest("timeout must be a positive number of seconds.")
    return float(value)


def _network(body: dict[str, Any]) -> Any:
    allow = body.get("allow_internet_access", body.get("allowInternetAccess"))
    network = body.get("network")
    if allow is not None and not isinstance(allow, bool):
        raise InvalidRequest("allow_internet_access must be true or false.")
    if network is not None:
        if not isinstance(network, dict):
            raise InvalidRequest("network must be an object.")
        rules = {"allow": network.get("allowOut") or [], "deny": network.get("denyOut") or []}
        if rules["allow"] or rules["deny"]:
            return rules
    if allow is False:
        return "none"
    return None


class CreateHandler(_SandboxAnswer):
    """``POST /sandboxes`` (e2b < 2.51) and ``POST /v2/sandboxes``: 201 with the new sandbox and its tokens."""

    async def post(self) -> None:
        body = self.json_body(required=False)
        for name, what in UNSUPPORTED_CREATE.items():
            if body.get(name) not in (None, False, [], {}):
                raise InvalidRequest(f"{name}: kernelhub does not offer {what}.")
        template = body.get("templateID", "base")
        timeout = _timeout(body, DEFAULT_TIMEOUT_S)
        metadata = body.get("metadata")
        env = body.get("envVars")
        assert timeout is not None
        longest = self.hub.maximum.max_lifetime_s
        if timeout > longest:
            # Refused before a sandbox is taken: no sandbox of this gateway may live that long.
            raise InvalidRequest(f"timeout may be at most {longest:g} s on this gateway (the longest "
                                 "max_lifetime_s a sandbox may have).")
        limits = {"idle_timeout_s": self.hub.maximum.idle_timeout_s}
        if timeout > self.hub.defaults.max_lifetime_s:
            # A sandbox asked to live longer than the default lifetime gets that lifetime (within the maximum,
            # checked above), rather than being made, found too short-lived and deleted.
            limits["max_lifetime_s"] = timeout
        record = await self.hub.create_sandbox(self.tenant, template, limits, env, metadata, _network(body))
        try:
            # Counted from the sandbox's creation, as its max_lifetime_s is: a timeout of exactly that lifetime
            # must not end past it by the seconds the kernel took to start.
            self.hub.set_deadline(self.tenant, record.id, max(1e-3, timeout - (time.time() - record.created_at)))
        except BaseException:
            await self.hub.delete_sandbox(self.tenant, record.id)
            raise
        self.sandbox(record, 201)


class ListHandler(ControlHandler):
    """``GET /v2/sandboxes`` (filters ``metadata``, ``state``, ``template``, ``startedAfter``; ``order`` asc or
    desc by start; ``limit`` and ``nextToken``, the next page's token in ``x-next-token``) and ``GET /sandboxes``
    (e2b < 2.51: every running sandbox)."""

    def get(self) -> None:
        records = [r for r in self.hub.list_sandboxes(self.tenant) if r.state == "running"]
        wanted = urllib.parse.parse_qsl(self.get_query_argument("metadata", ""), keep_blank_values=True)
        records = [r for r in records if all(k in r.metadata and str(r.metadata[k]) == v for k, v in wanted)]
        states = {s.strip() for value in self.get_query_arguments("state") for s in value.split(",") if s.strip()}
        if states and "running" not in states:
            records = []
        template = self.get_query_argument("template", "")
        if template:
            name = self.hub.template_aliases.get(template, template)
            records = [r for r in records if r.template.name == name]
        after = self.get_query_argument("startedAfter", "")
        if after:
            try:
                moment = datetime.datetime.fromisoformat(after.replace("Z", "+00:00")).timestamp()
            except ValueError:
                raise InvalidRequest("startedAfter must be an ISO 8601 time.") from None
            records = [r for r in records if r.created_at > moment]
        order = self.get_query_argument("order", "asc").lower()
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be asc or desc.")
        records.sort(key=_key, reverse=order == "desc")
        if self.request.path.rstrip("/").endswith("/v2/sandboxes"):
            records = self._page(records, descending=order == "desc")
        self.send_json([_listed(r) for r in records])

    def _page(self, records: list[SandboxRecord], *, descending: bool) -> list[SandboxRecord]:
        try:
            limit = int(self.get_query_argument("limit", str(DEFAULT_PAGE)))
        except ValueError:
            raise InvalidRequest("limit must be a whole number.") from None
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}.")
        token = self.get_query_argument("nextToken", "")
        if token:
            try:
                after_time, _, after_id = base64.urlsafe_b64decode(token.encode()).decode().partition("|")
                last = (float(after_time), after_id)
            except (binascii.Error, ValueError, UnicodeDecodeError):
                raise InvalidRequest("nextToken is not a token this gateway gave out.") from None
            # The records after the last one given out, in the page order.
            records = [r for r in records if (_key(r) < last) == descending and _key(r) != last]
        page = records[:limit]
        if len(records) > limit:
            end = page[-1]
            self.set_header("x-next-token",
                            base64.urlsafe_b64encode(f"{end.created_at!r}|{end.id}".encode()).decode())
        return page


class SandboxesHandler(CreateHandler, ListHandler):
    """``/sandboxes`` and ``/v2/sandboxes``: ``POST`` creates, ``GET`` lists."""


class ConnectHandler(_SandboxAnswer):
    """``POST /v2/sandboxes/{id}/connect`` and ``POST /sandboxes/{id}/connect``: the sandbox and its tokens;
    a ``timeout`` extends its deadline, never shortens it."""

    async def post(self, sandbox_id: str) -> None:
        body = self.json_body(required=False)
        record = _running(self, sandbox_id)
        timeout = _timeout(body, None)
        if timeout is not None:
            self.hub.set_deadline(self.tenant, record.id, timeout, extend_only=True)
        self.sandbox(record, 200)


class SandboxDetailHandler(ControlHandler):
    """``GET /sandboxes/{id}`` (info) and ``DELETE`` (kill: 204, 404 when unknown)."""

    def get(self, sandbox_id: str) -> None:
        record = _running(self, sandbox_id)
        tokens = self.hub.sandbox_tokens(self.tenant, record.id)
        self.send_json({**_listed(record), "envdAccessToken": tokens.envd, "domain": None,
                        "allowInternetAccess": False})

    async def delete(self, sandbox_id: str) -> None:
        record = _running(self, sandbox_id)
        await self.hub.delete_sandbox(self.tenant, record.id)
        self.set_status(204)
        self.finish()


class TimeoutHandler(ControlHandler):
    """``POST /sandboxes/{id}/timeout`` ``{"timeout": seconds}``: the deadline becomes now + timeout (204)."""

    def post(self, sandbox_id: str) -> None:
        record = _running(self, sandbox_id)
        timeout = _timeout(self.json_body(), None)
        if timeout is None:
            raise InvalidRequest("The field 'timeout' is required.")
        self.hub.set_deadline(self.tenant, record.id, timeout)
        self.set_status(204)
        self.finish()


class MetricsHandler(ControlHandler):
    """``GET /sandboxes/{id}/metrics``: one reading now, as E2B's ``SandboxMetric``."""

    def get(self, sandbox_id: str) -> None:
        record = _running(self, sandbox_id)
        m = self.hub.sandbox_metrics(self.tenant, record.id)
        now = time.time()
        self.send_json([{
            "timestamp": iso(now),
            "timestampUnix": int(now),
            "cpuCount": _record_cpu(record),
            "cpuUsedPct": float(m["cpu_percent"]),
            "memUsed": int(m["memory_bytes"]),
            "memTotal": int(m["memory_limit_bytes"]),
            "memCache": 0,
            "diskUsed": int(m["disk_bytes"]),
            "diskTotal": int(m["disk_limit_bytes"]),
        }])


class UnsupportedHandler(ControlHandler):
    """Every other control-plane route: 501 in E2B's error shape, after authentication."""

    def _unsupported(self, *args: Any) -> None:
        self.send_error_body(501, {"code": 501, "message": f"{self.request.method} {self.request.path} is not "
                                                           "supported by kernelhub's E2B surface."})

    get = post = put = patch = delete = _unsupported


ID = r"([^/]+)"
default_handlers: list[Any] = [
    (ControlPlane(r"/(?:v2/)?sandboxes/?"), SandboxesHandler),
    (ControlPlane(rf"/(?:v2/)?sandboxes/{ID}/connect"), ConnectHandler),
    (ControlPlane(rf"/sandboxes/{ID}/timeout"), TimeoutHandler),
    (ControlPlane(rf"/sandboxes/{ID}/metrics"), MetricsHandler),
    (ControlPlane(rf"/sandboxes/{ID}"), SandboxDetailHandler),
    (ControlPlane(r"(?:/.*)?"), UnsupportedHandler),
]
