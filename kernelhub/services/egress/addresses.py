"""Addresses a sandbox may never reach, and host names and IP literals read one way only.

Pure functions, no I/O. Two jobs:

- :func:`parse_host` reads a host as a client or a policy wrote it (a DNS name, an IDN, an IPv4 address in any
  form a URL parser accepts, a bracketed or bare IPv6 address) into one canonical form, or refuses it with a
  sentence. Numeric hosts are read as the WHATWG URL standard reads them (``2130706433``, ``0x7f.1``,
  ``0177.0.0.1`` are all 127.0.0.1), which is also what glibc's ``inet_aton`` and so ``getaddrinfo`` would make
  of them: the proxy decides on, and connects to, the address the client meant, and never hands a numeric
  string to a resolver that might read it otherwise.
- :func:`forbidden` says whether an address lies in a range that no policy opens (loopback, RFC 1918,
  link-local and cloud metadata (Azure's public 168.63.129.16 too), carrier-grade NAT, unique local, multicast,
  reserved, documentation...), the
  operator's ``allow_private`` networks being the only exception. IPv4 addresses carried inside IPv6
  (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``) are judged as the IPv4 address they reach.

Sources: RFC 6890 and the IANA IPv4/IPv6 special-purpose address registries; WHATWG URL, "IPv4 parser";
UTS #46 via the ``idna`` package for international names.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Ranges no policy opens, most specific first, each with the noun phrase a refusal names.
_FORBIDDEN_V4: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private (RFC 1918) address"),
    ("100.64.0.0/10", "a carrier-grade NAT (RFC 6598) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.169.254/32", "the cloud metadata address"),
    ("169.254.0.0/16", "a link-local address"),
    # Public, but a cloud host's own agent endpoint: Azure's WireServer and platform DNS, which serves a VM's
    # extension settings (secrets included) to anything on the VM that asks, as 169.254.169.254 does elsewhere.
    ("168.63.129.16/32", "the Azure platform (WireServer) address"),
    ("172.16.0.0/12", "a private (RFC 1918) address"),
    ("192.0.0.0/24", "an IETF protocol assignment (RFC 6890) address"),
    ("192.0.2.0/24", "a documentation (TEST-NET-1) address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private (RFC 1918) address"),
    ("198.18.0.0/15", "a benchmarking (RFC 2544) address"),
    ("198.51.100.0/24", "a documentation (TEST-NET-2) address"),
    ("203.0.113.0/24", "a documentation (TEST-NET-3) address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved or broadcast address"),
)
_FORBIDDEN_V6: tuple[tuple[str, str], ...] = (
    ("::/128", "the unspecified address"),
    ("::1/128", "a loopback address"),
    ("fd00:ec2::254/128", "the cloud metadata address"),
    ("64:ff9b:1::/48", "a local-use NAT64 (RFC 8215) address"),
    ("::/8", "a reserved address (IPv4-compatible and other legacy forms)"),
    ("100::/64", "a discard-only (RFC 6666) address"),
    ("2001::/23", "an IETF protocol assignment address (Teredo, benchmarking, ORCHID)"),
    ("2001:db8::/32", "a documentation address"),
    ("2002::/16", "a 6to4 address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment-routing (RFC 9602) address"),
    ("fc00::/7", "a unique local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
FORBIDDEN_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what) for net, what in _FORBIDDEN_V4 + _FORBIDDEN_V6
)
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMBER_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
MAX_NAME = 253


def unwrap(ip: IPAddress) -> IPAddress:
    """The address a connection to ``ip`` really reaches: an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``)
    is that IPv4 address; anything else is itself."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def forbidden(ip: IPAddress, allow_private: Sequence[IPNetwork] = ()) -> str | None:
    """Why no policy may reach ``ip`` (a noun phrase such as ``"a loopback address"``), or ``None`` if it is
    an ordinary public address or lies in one of the operator's ``allow_private`` networks.

    An IPv4-mapped address is judged as its IPv4 address, a NAT64 ``64:ff9b::/96`` address by the IPv4 address
    it embeds (``allow_private`` lists only IPv4 there), and IPv6 outside global unicast ``2000::/3`` is
    refused whatever it is."""
    ip = unwrap(ip)
    if any(ip.version == net.version and ip in net for net in allow_private):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip in _NAT64:
        # Judged by the IPv4 address it reaches through a translator; the operator's IPv4 ranges do not
        # extend to it (the translator, not this host, would reach them).
        inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        why = forbidden(inner)
        return None if why is None else f"a NAT64 address embedding {inner}, {why}"
    for net, what in FORBIDDEN_RANGES:
        if ip.version == net.version and ip in net:
            return what
    if isinstance(ip, ipaddress.IPv6Address) and ip not in _GLOBAL_UNICAST_V6:
        return "an IPv6 address outside global unicast (2000::/3)"
    return None


def parse_networks(value: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """Operator CIDRs (``--egress-allow-private``): a comma-separated string or a list of ``a.b.c.d/n`` or
    ``v6::/n`` (a bare address is its /32 or /128). Raises ``ValueError`` with a sentence for a bad entry."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[IPNetwork] = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        out.append(parse_network(text))
    return tuple(out)


def parse_network(text: str) -> IPNetwork:
    """One CIDR in canonical dotted or colon notation; host bits are cleared (``10.1.2.3/8`` is ``10.0.0.0/8``)
    and an IPv4-mapped IPv6 network becomes its IPv4 network. Raises ``ValueError`` with a sentence."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not a CIDR network such as 10.0.0.0/8 or 2001:db8::/32.") from None
    if "%" in text:
        raise ValueError(f"{text!r}: IPv6 zone ids are not accepted.")
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network(f"{v4}/{net.prefixlen - 96}")
    return net


def parse_ipv4_number_form(host: str) -> ipaddress.IPv4Address:
    """The WHATWG URL IPv4 parser: 1 to 4 dot-separated parts, each decimal, octal (leading ``0``) or hex
    (``0x``), the last filling the remaining bytes (``127.1``, ``2130706433``, ``0x7f.0.0.1``). Stricter than
    WHATWG where glibc's ``inet_aton`` is: a bare ``0x`` is refused, not read as 0. ``host`` is lowercase ASCII
    without a trailing dot. Raises ``ValueError`` with a sentence."""
    parts = host.split(".")
    bad = ValueError(f"{host!r} looks like an IPv4 address but is not a valid one.")
    if len(parts) > 4 or any(p == "" for p in parts):
        raise bad
    numbers: list[int] = []
    for part in parts:
        if not re.fullmatch(r"0x[0-9a-f]+|[0-9]+", part):
            raise bad
        try:
            if part.startswith("0x"):
                numbers.append(int(part[2:], 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part[1:], 8))
            else:
                numbers.append(int(part, 10))
        except ValueError:  # 8 or 9 in an octal part
            raise bad from None
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise bad
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return ipaddress.IPv4Address(value)


def parse_host(host: str) -> tuple[str, IPAddress | None]:
    """Canonical ``(host, ip)`` for a host as written: ``ip`` is set for an address literal (and ``host`` is
    then its canonical text, IPv6 without brackets), ``None`` for a DNS name (lowercase ASCII, IDNA-encoded,
    no trailing dot). Raises ``ValueError`` with a sentence for anything else (empty labels, zone ids, spaces,
    wildcards, percent-escapes, over-long names, numeric forms that are not an address)."""
    text = host
    if not text:
        raise ValueError("The host name is empty.")
    if len(text) > 4 * MAX_NAME:
        raise ValueError("The host name is too long.")
    if text.startswith("[") or ":" in text:
        if text.startswith("[") and not text.endswith("]"):
            raise ValueError(f"{text[:80]!r} has an unclosed bracket.")
        inner = text[1:-1] if text.startswith("[") else text
        if "%" in inner:
            raise ValueError(f"{text[:80]!r}: IPv6 zone ids are not accepted.")
        try:
            ip6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{text[:80]!r} is not a valid IPv6 address.") from None
        ip = unwrap(ip6)
        return str(ip), ip
    if text.isascii():
        name = text.lower()
    else:
        # UTS #46 maps full-width digits and dots too, so the IPv4 check below sees what a resolver would.
        try:
            name = idna.encode(text, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ValueError(f"{text[:80]!r} is not a valid international domain name.") from None
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if _NUMBER_LABEL.match(labels[-1]):
        ip4 = parse_ipv4_number_form(name)
        return str(ip4), ip4
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"{text[:80]!r} is not a valid host name (1 to {MAX_NAME} characters).")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(f"{text[:80]!r} is not a valid host name: each dot-separated label must be 1 to 63 "
                             "letters, digits, hyphens or underscores, not starting or ending with a hyphen.")
    return name, None


def parse_port(text: str) -> int:
    """A TCP port written in ASCII decimal, 1 to 65535. Raises ``ValueError`` with a sentence."""
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise ValueError(f"{text[:20]!r} is not a port number (1 to 65535).")
    return int(text)


def split_host_port(text: str) -> tuple[str, str | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare ``v6`` -> (host, port text or None)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text[:80]!r} has an unclosed bracket.")
        rest = text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text[:80]!r}: only ':port' may follow a bracketed address.")
        return text[: end + 1], rest[1:] if rest else None
    if text.count(":") > 1:
        return text, None
    host, sep, port = text.partition(":")
    return host, port if sep else None
