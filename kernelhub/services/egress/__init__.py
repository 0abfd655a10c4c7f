"""Egress for sandboxes: network policies and the filtering proxy that enforces them (issue 12).

- :mod:`.addresses`: host names and IP literals read one way, and the ranges no policy opens;
- :mod:`.policy`: the policy's JSON shape, validation and the pure decision on a destination;
- :mod:`.tls`: the server name a TLS ClientHello asks for;
- :mod:`.proxy`: the per-sandbox HTTP forward proxy on a unix socket, and :class:`EgressService` that owns one
  per sandbox.
"""

from .policy import NONE, OPEN, Decision, NetworkPolicy, Target, decide, parse_policy, parse_target
from .proxy import EgressService, ProxyLimits, Refusal, SandboxProxy, system_resolver

__all__ = ["NONE", "OPEN", "Decision", "EgressService", "NetworkPolicy", "ProxyLimits", "Refusal", "SandboxProxy",
           "Target", "decide", "parse_policy", "parse_target", "system_resolver"]
