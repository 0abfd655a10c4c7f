"""Tenants and their API keys. Keys are compared in constant time; a tenant is just a name.

The app builds the :class:`TenantRegistry` from ``--token`` and ``--api-keys``; every surface authenticates a
request with it, then passes the :class:`Tenant` to each service method, which scopes every id to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidRequest, QuotaExceeded, Unauthorized


@dataclasses.dataclass(frozen=True)
class Tenant:
    """Who is calling. Every sandbox, session and execution belongs to exactly one."""

    name: str


class TenantRegistry:
    """Maps API keys to tenants. Called by every surface before anything else."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        for key, name in keys.items():
            if not isinstance(key, str) or not isinstance(name, str) or not key or not name:
                raise InvalidRequest("API keys and tenant names must be non-empty strings.")
        # Digests of equal length, so compare_digest's time does not depend on the key's length either.
        self._keys = [(hashlib.sha256(k.encode()).digest(), Tenant(n)) for k, n in keys.items()]

    @classmethod
    def from_file(cls, path: str | Path, default_token: str | None = None) -> TenantRegistry:
        """Read ``{"<key>": "<tenant name>", ...}``; ``default_token`` is the tenant ``default``'s key. Raises
        :class:`~kernelhub.errors.InvalidRequest` when the file cannot be read or is not such an object, and when
        the file gives ``default_token`` to another tenant: one key names one tenant, and silently making that
        tenant's key the operator's would show it every tenant's activity (``/metrics``)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"Cannot read the API keys file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidRequest(f"The API keys file {path} must hold a JSON object of key: tenant name.")
        keys = dict(data)
        if default_token:
            other = keys.get(default_token, "default")
            if other != "default":
                raise InvalidRequest(f"The API keys file {path} gives the key of --token (KERNELHUB_TOKEN) to the "
                                     f"tenant {other!r}, but --token is the key of the tenant 'default' (the "
                                     "operator's); give each tenant a key of its own.")
            keys[default_token] = "default"
        return cls(keys)

    def authenticate(self, key: str | None) -> Tenant:
        """The tenant of ``key``; raises :class:`Unauthorized` for a missing or unknown key."""
        if not key:
            raise Unauthorized("An API key is required: send 'Authorization: Bearer <key>'.")
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for candidate, tenant in self._keys:
            # No early exit: every key is compared.
            if hmac.compare_digest(candidate, digest):
                found = tenant
        if found is None:
            raise Unauthorized("The API key is not valid.")
        return found

    def tenants(self) -> list[Tenant]:
        return [t for _, t in self._keys]


class TenantHolds:
    """How much of one resource (``what``, e.g. "open websockets") each tenant holds, at most ``cap`` each.

    :meth:`hold` checks and counts with no await between, so concurrent holders cannot all pass the check;
    every hold is given back once, with the same amount, with :meth:`release`. Built by the hub; used by the
    surfaces for what they hold on a tenant's behalf (websockets; bytes of request bodies being received)."""

    def __init__(self, cap: int, what: str, unit: str = "") -> None:
        self.cap = cap
        self.what = what
        self.unit = unit
        self._held: dict[str, int] = {}

    def held(self, tenant: Tenant) -> int:
        return self._held.get(tenant.name, 0)

    def hold(self, tenant: Tenant, amount: int = 1) -> None:
        """Count ``amount`` more for ``tenant``; raises :class:`~kernelhub.errors.QuotaExceeded` (429) when that
        would pass the cap (nothing is counted then)."""
        if self.held(tenant) + amount > self.cap:
            raise QuotaExceeded(f"Tenant {tenant.name!r} already has {self.held(tenant)}{self.unit} {self.what} "
                                f"of the {self.cap}{self.unit} it may have at once; wait for some to end.")
        self._held[tenant.name] = self.held(tenant) + amount

    def release(self, tenant: Tenant, amount: int = 1) -> None:
        left = self.held(tenant) - amount
        if left > 0:
            self._held[tenant.name] = left
        else:
            self._held.pop(tenant.name, None)
