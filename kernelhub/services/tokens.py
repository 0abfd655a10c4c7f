"""Per-sandbox access tokens, as E2B issues them: the envd access token and the traffic access token.

E2B's SDKs talk to a sandbox's inside (files, processes, the code interpreter) with a token of that sandbox
instead of the API key: ``X-Access-Token`` (the envd token) and ``E2B-Traffic-Access-Token`` (E2B.md 5.2,
5.3). :class:`SandboxTokens` mints both for a sandbox the first time its owner asks (the E2B surface's create,
connect and info), answers them to the owner only, and names the owner of a sandbox for a token presented with
its id, compared in constant time. A sandbox's tokens go when the sandbox stops.

Built by :class:`~kernelhub.services.hub.Hub`; used by :mod:`kernelhub.handlers.e2b`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets

from ..errors import NotFound, Unauthorized
from .sandboxes import Sandboxes, SandboxRecord
from .tenants import Tenant


@dataclasses.dataclass(frozen=True)
class Tokens:
    """One sandbox's tokens: ``envd`` (``X-Access-Token``) and ``traffic`` (``E2B-Traffic-Access-Token``)."""

    envd: str
    traffic: str


class SandboxTokens:
    """The tokens of every sandbox that has been shown to the E2B surface, by sandbox id."""

    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        self._tokens: dict[str, Tokens] = {}
        sandboxes.on_stop.append(self._forget)

    def _forget(self, record: SandboxRecord) -> None:
        self._tokens.pop(record.id, None)

    def tokens_for(self, tenant: Tenant, sandbox_id: object) -> Tokens:
        """The tokens of the tenant's running sandbox, minted on first use. Raises what
        :meth:`Sandboxes.running <kernelhub.services.sandboxes.Sandboxes.running>` raises."""
        record, _ = self.sandboxes.running(tenant, sandbox_id)
        tokens = self._tokens.get(record.id)
        if tokens is None:
            tokens = self._tokens[record.id] = Tokens(secrets.token_hex(24), secrets.token_hex(24))
        return tokens

    def owner(self, sandbox_id: str, *, envd: str | None = None, traffic: str | None = None) -> Tenant:
        """The tenant owning ``sandbox_id`` when one of the given tokens is that sandbox's (``envd`` matched
        against its envd token, ``traffic`` against its traffic token). Raises
        :class:`~kernelhub.errors.Unauthorized` when no token is given and :class:`~kernelhub.errors.NotFound`
        when the sandbox is unknown, stopped or the token is not its own: a wrong token tells nothing about
        whether the sandbox exists."""
        if not envd and not traffic:
            raise Unauthorized("This sandbox needs its access token (X-Access-Token).")
        record = self.sandboxes.find(sandbox_id)
        tokens = self._tokens.get(sandbox_id)
        expected = tokens or Tokens("\x00", "\x00")  # compared all the same: the time says nothing either
        ok = _same(envd, expected.envd) | _same(traffic, expected.traffic)
        if record is None or tokens is None or not ok or record.state != "running":
            raise NotFound(f"Sandbox {sandbox_id[:64]} was not found.")
        return record.tenant


def _same(given: str | None, expected: str) -> bool:
    # Digests of equal length, so that the comparison's time depends on neither token's length.
    digest = hashlib.sha256((given or "").encode()).digest()
    return bool(given) and hmac.compare_digest(digest, hashlib.sha256(expected.encode()).digest())
