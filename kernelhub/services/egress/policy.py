"""A sandbox's network policy: its JSON shape, its validation, and the pure decision on one destination.

Shapes (API.md, "Network policy")::

    "none"                                   no egress at all (the default)
    "open"                                   any public address
    {"allow": [entry, ...], "deny": [entry, ...]}

An entry is a domain (``example.com``), a wildcard (``*.example.com``: every name below it, not the name
itself), either of them with ``:port``, an IP address (``203.0.113.7``, ``2001:db8::1``, ``[2001:db8::1]:443``)
or a CIDR network (``198.51.100.0/24``, with a port ``198.51.100.0/24:443``). Entries are normalised
(lowercase, IDNA, no trailing dot, canonical addresses, any numeric IPv4 form to dotted quad) so that comparing
them is comparing strings and networks.

How a destination is judged (:func:`decide`), in order:

1. ``"none"`` refuses everything.
2. A destination named by a DNS name: a matching deny entry refuses it; under an allow list, only a matching
   domain or wildcard entry lets it through. This happens *before* the name is resolved, so a name the policy
   refuses is never looked up (no DNS exfiltration through the proxy).
3. A destination given as an address literal: a matching deny address/network refuses it; under an allow
   list, only a matching address or network entry lets it through.
4. Every address the connection may use (the literal, or each address the name resolved to) must be outside
   the always-refused ranges (:func:`kernelhub.services.egress.addresses.forbidden`, the operator's
   ``allow_private`` networks excepted) and match no deny address/network entry. Deny wins over allow.

Address and network entries in an allow list open addresses written as literals, not names that happen to
resolve into them: deciding a name by its addresses would mean resolving every name a sandbox asks for.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from typing import Any, Literal

from ...errors import InvalidRequest
from .addresses import IPAddress, IPNetwork, forbidden, parse_host, parse_network, parse_port, split_host_port

MAX_ENTRIES = 256
MAX_ENTRY_CHARS = 300


@dataclasses.dataclass(frozen=True)
class Entry:
    """One allow or deny entry, normalised. ``text`` is its canonical spelling (what the sandbox shows).

    Exactly one of ``name`` (a domain; with ``wildcard`` every name strictly below it) and ``network`` (an
    address is a /32 or /128) is set. ``port`` is ``None`` for every port."""

    text: str
    name: str | None = None
    wildcard: bool = False
    network: IPNetwork | None = None
    port: int | None = None

    def matches_name(self, name: str, port: int) -> bool:
        """Whether a destination written as the DNS name ``name`` (normalised) on ``port`` matches."""
        if self.name is None or (self.port is not None and self.port != port):
            return False
        return name.endswith("." + self.name) if self.wildcard else name == self.name

    def matches_address(self, ip: IPAddress, port: int) -> bool:
        """Whether a connection to ``ip`` (already unwrapped from IPv4-mapped form) on ``port`` matches."""
        if self.network is None or (self.port is not None and self.port != port):
            return False
        return ip.version == self.network.version and ip in self.network


def parse_entry(text: str) -> Entry:
    """One policy entry as written -> its normalised :class:`Entry`. Raises ``ValueError`` with a sentence."""
    raw = text.strip()
    if not raw:
        raise ValueError("an entry is empty")
    if len(raw) > MAX_ENTRY_CHARS:
        raise ValueError(f"an entry is longer than {MAX_ENTRY_CHARS} characters")
    if raw == "*" or raw.startswith("*:"):
        raise ValueError('"*" is not an entry; use the policy "open" for any public address')
    if "/" in raw:
        # A network, with an optional port after the prefix length: 10.0.0.0/8:443, 2001:db8::/32:443.
        address, _, rest = raw.partition("/")
        prefix, colon, net_port = rest.partition(":")
        network = parse_network(f"{address}/{prefix}")
        port = parse_port(net_port) if colon else None
        return Entry(text=str(network) + (f":{port}" if port else ""), network=network, port=port)
    wildcard = raw.startswith("*.")
    host_text, port_text = split_host_port(raw[2:] if wildcard else raw)
    if "*" in host_text:
        raise ValueError(f"{raw!r}: a wildcard must be the whole first label, as in '*.example.com'")
    port = parse_port(port_text) if port_text is not None else None
    host, ip = parse_host(host_text)
    suffix = f":{port}" if port is not None else ""
    if ip is not None:
        if wildcard:
            raise ValueError(f"{raw!r}: a wildcard needs a domain name, not an address")
        network = ipaddress.ip_network(ip)
        shown = f"[{host}]" if ip.version == 6 and port is not None else host
        return Entry(text=shown + suffix, network=network, port=port)
    return Entry(text=("*." if wildcard else "") + host + suffix, name=host, wildcard=wildcard, port=port)


@dataclasses.dataclass(frozen=True)
class NetworkPolicy:
    """A validated policy. ``mode`` is ``"none"``, ``"open"`` or ``"list"`` (allow and deny entries)."""

    mode: Literal["none", "open", "list"]
    allow: tuple[Entry, ...] = ()
    deny: tuple[Entry, ...] = ()

    def to_json(self) -> str | dict[str, list[str]]:
        """The policy as the API shows it: ``"none"``, ``"open"`` or ``{"allow": [...], "deny": [...]}``."""
        if self.mode != "list":
            return self.mode
        return {"allow": [e.text for e in self.allow], "deny": [e.text for e in self.deny]}


NONE = NetworkPolicy("none")
OPEN = NetworkPolicy("open")


def parse_policy(value: Any, what: str = "network") -> NetworkPolicy:
    """A policy from its JSON value (a request body or a template). Duplicate entries are dropped.

    Raises :class:`~kernelhub.errors.InvalidRequest` with a sentence naming the field (``what``) and, for a
    bad entry, its index and why."""
    if isinstance(value, NetworkPolicy):
        return value
    if value == "none":
        return NONE
    if value == "open":
        return OPEN
    if not isinstance(value, dict):
        raise InvalidRequest(f'{what} must be "none", "open" or an object {{"allow": [...], "deny": [...]}}.')
    unknown = sorted(str(k) for k in value if k not in ("allow", "deny"))
    if unknown:
        raise InvalidRequest(f"{what} has unknown keys {', '.join(unknown)}; only allow and deny are accepted.")
    lists: dict[str, tuple[Entry, ...]] = {}
    for key in ("allow", "deny"):
        items = value.get(key, [])
        if not isinstance(items, list):
            raise InvalidRequest(f"{what}.{key} must be a list of strings.")
        if len(items) > MAX_ENTRIES:
            raise InvalidRequest(f"{what}.{key} may hold at most {MAX_ENTRIES} entries.")
        entries: dict[str, Entry] = {}
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidRequest(f"{what}.{key}[{i}] must be a string.")
            try:
                entry = parse_entry(item)
            except ValueError as exc:
                reason = str(exc).rstrip(".")
                raise InvalidRequest(f"{what}.{key}[{i}] is not a valid entry: {reason}.") from None
            entries.setdefault(entry.text, entry)
        lists[key] = tuple(entries.values())
    return NetworkPolicy("list", lists["allow"], lists["deny"])


@dataclasses.dataclass(frozen=True)
class Target:
    """A destination as the client asked for it: a normalised DNS ``host`` (``ip`` is ``None``) or an address
    literal (``host`` is its canonical text), and a port."""

    host: str
    port: int
    ip: IPAddress | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.ip is not None and self.ip.version == 6 else self.host
        return f"{host}:{self.port}"


def parse_target(authority: str, default_port: int | None = None) -> Target:
    """``host:port`` (a CONNECT target, or a URL's authority with ``default_port``) -> :class:`Target`.

    Raises ``ValueError`` with a sentence: no port where one is needed, a bad host or port, user info."""
    if "@" in authority:
        raise ValueError("user info (user@host) is not accepted in a proxy target")
    host_text, port_text = split_host_port(authority)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{authority[:80]!r} names no port; a CONNECT target is host:port")
        port = default_port
    else:
        port = parse_port(port_text)
    host, ip = parse_host(host_text)
    return Target(host, port, ip)


@dataclasses.dataclass(frozen=True)
class Decision:
    """The answer for one destination: ``reason`` is one sentence naming the rule that decided."""

    allowed: bool
    reason: str


def _match_name(entries: Sequence[Entry], target: Target) -> Entry | None:
    return next((e for e in entries if e.matches_name(target.host, target.port)), None)


def _match_address(entries: Sequence[Entry], ip: IPAddress, port: int) -> Entry | None:
    return next((e for e in entries if e.matches_address(ip, port)), None)


def check_target(policy: NetworkPolicy, target: Target,
                 allow_private: Sequence[IPNetwork] = ()) -> Decision:
    """Everything that can be decided before resolving ``target``: steps 1 to 3 of the module's order, and step
    4 for an address literal. An allowed name must still pass :func:`decide` with its resolved addresses."""
    if policy.mode == "none":
        return Decision(False, f'{target} is refused: the sandbox\'s network policy is "none" (no egress).')
    if target.ip is not None:
        return decide(policy, target, (), allow_private)
    entry = _match_name(policy.deny, target)
    if entry is not None:
        return Decision(False, f'{target} matches the deny entry "{entry.text}".')
    if policy.mode == "open":
        return Decision(True, f'{target} is allowed: the network policy is "open".')
    entry = _match_name(policy.allow, target)
    if entry is None:
        return Decision(False, f"{target} matches no allow entry of the sandbox's network policy.")
    return Decision(True, f'{target} is allowed by the entry "{entry.text}".')


def decide(policy: NetworkPolicy, target: Target, resolved: Sequence[IPAddress],
           allow_private: Sequence[IPNetwork] = ()) -> Decision:
    """Whether a connection for ``target`` may go to the addresses ``resolved`` (ignored for an address
    literal, which is its own address).

    Every address must pass; the proxy connects only to addresses that were judged here, so a second lookup
    (DNS rebinding) cannot change where it goes. Pure: no I/O."""
    named = target.ip is None
    verdict = check_target(policy, target, allow_private) if named or policy.mode == "none" else None
    if verdict is not None and (not verdict.allowed or policy.mode == "none"):
        return verdict
    addresses: list[IPAddress] = list(resolved) if target.ip is None else [target.ip]
    if not addresses:
        return Decision(False, f"{target} resolves to no address.")
    for ip in addresses:
        why = forbidden(ip, allow_private)
        if why is not None:
            said = f"{target.host} resolves to {ip}, {why}" if named else f"{ip} is {why}"
            return Decision(False, f"{said}, which no network policy opens.")
        entry = _match_address(policy.deny, ip, target.port)
        if entry is not None:
            said = f"{target.host} resolves to {ip}, which matches" if named else f"{ip} matches"
            return Decision(False, f'{said} the deny entry "{entry.text}".')
    if verdict is not None:
        return verdict
    if policy.mode == "open":
        return Decision(True, f'{target} is allowed: the network policy is "open".')
    entry = _match_address(policy.allow, addresses[0], target.port)
    if entry is None:
        return Decision(False, f"{target} matches no allow entry of the sandbox's network policy.")
    return Decision(True, f'{target} is allowed by the entry "{entry.text}".')
