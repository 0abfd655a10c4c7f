"""Network policies as pure functions: parsing and normalising entries, reading hosts (hostile literals
included), the ranges no policy opens, and the decision on a destination."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from kernelhub.errors import InvalidRequest
from kernelhub.services.egress.addresses import (
    forbidden,
    parse_host,
    parse_ipv4_number_form,
    parse_networks,
)
from kernelhub.services.egress.policy import (
    NONE,
    OPEN,
    NetworkPolicy,
    Target,
    check_target,
    decide,
    parse_entry,
    parse_policy,
    parse_target,
)

ip = ipaddress.ip_address
LOCAL = parse_networks("127.0.0.1/32")


# -- hosts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("written, host, address", [
    ("Example.COM", "example.com", None),
    ("example.com.", "example.com", None),
    ("bücher.example", "xn--bcher-kva.example", None),
    ("ＥＸＡＭＰＬＥ．com", "example.com", None),         # full-width letters and dot (UTS #46)
    ("a.b-c.d_e.example", "a.b-c.d_e.example", None),
    ("exa\u200bmple.com", "example.com", None),         # UTS #46 drops a zero-width space
    ("1.2.3.4", "1.2.3.4", "1.2.3.4"),
    ("2130706433", "127.0.0.1", "127.0.0.1"),            # decimal integer
    ("0x7f000001", "127.0.0.1", "127.0.0.1"),            # hex integer
    ("0x7f.1", "127.0.0.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1", "127.0.0.1"),            # octal part
    ("127.1", "127.0.0.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1", "127.0.0.1"),
    ("0", "0.0.0.0", "0.0.0.0"),
    ("169.254.43518", "169.254.169.254", "169.254.169.254"),
    ("0xA9.0xFE.0xA9.0xFE", "169.254.169.254", "169.254.169.254"),
    ("１２７.０.０.１", "127.0.0.1", "127.0.0.1"),          # full-width digits
    ("1.2.3.4.", "1.2.3.4", "1.2.3.4"),
    ("[::1]", "::1", "::1"),
    ("::1", "::1", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1", "::1"),
    ("[::ffff:127.0.0.1]", "127.0.0.1", "127.0.0.1"),    # IPv4-mapped: the IPv4 address it reaches
    ("[::ffff:7f00:1]", "127.0.0.1", "127.0.0.1"),
    ("[::FFFF:A9FE:A9FE]", "169.254.169.254", "169.254.169.254"),
    ("[2001:DB8::1]", "2001:db8::1", "2001:db8::1"),
])
def test_hosts_are_read_one_way(written: str, host: str, address: str | None) -> None:
    got_host, got_ip = parse_host(written)
    assert got_host == host
    assert got_ip == (ip(address) if address else None)


@pytest.mark.parametrize("written", [
    "", ".", "a..b", "exa mple.com", "-a.com", "a-.com", "a" * 64 + ".com", ("a" * 63 + ".") * 4 + "com",
    "*.example.com", "ex*ample.com", "%31%32%37.0.0.1", "example.com/x", "a@b",
    "256.0.0.1", "1.2.3.4.5", "0x100.1.1.1", "4294967296", "08.0.0.1", "0x7g.1", "1.2.3.0x", "foo.123",
    "1..2", "[::1", "[fe80::1%25eth0]", "fe80::1%eth0", "[::1]x", "::g", "[1.2.3.4]",
    "a\x00b.com", "0x", "1.0x.1",
])
def test_bad_hosts_are_refused(written: str) -> None:
    with pytest.raises(ValueError):
        parse_host(written)


@pytest.mark.parametrize("written", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "1.2.3.4", "0x7f000001",
                                     "017700000001", "255.255.255.255", "0.0.0.0", "10.0.258", "0xff.0xffffff"])
def test_numeric_forms_agree_with_inet_aton(written: str) -> None:
    # glibc's inet_aton (what getaddrinfo would do with a numeric name) reads them the same way.
    assert parse_ipv4_number_form(written).packed == socket.inet_aton(written)


@pytest.mark.parametrize("authority, expected", [
    ("example.com:443", Target("example.com", 443)),
    ("EXAMPLE.com.:8080", Target("example.com", 8080)),
    ("[::ffff:127.0.0.1]:80", Target("127.0.0.1", 80, ip("127.0.0.1"))),
    ("[2001:db8::1]:443", Target("2001:db8::1", 443, ip("2001:db8::1"))),
    ("2130706433:80", Target("127.0.0.1", 80, ip("127.0.0.1"))),
])
def test_targets(authority: str, expected: Target) -> None:
    assert parse_target(authority) == expected


@pytest.mark.parametrize("authority", ["example.com", "example.com:", "example.com:0", "example.com:65536",
                                       "example.com:+80", "example.com:٨٠", "example.com: 80",
                                       "user@example.com:80", "a:b:c", "[::1]80", "[::1]:", ":80"])
def test_bad_targets(authority: str) -> None:
    with pytest.raises(ValueError):
        parse_target(authority)


def test_default_port_for_urls() -> None:
    assert parse_target("example.com", 80) == Target("example.com", 80)
    assert str(Target("2001:db8::1", 443, ip("2001:db8::1"))) == "[2001:db8::1]:443"


# -- ranges no policy opens -----------------------------------------------------------------------------------

@pytest.mark.parametrize("address, what", [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("10.1.2.3", "RFC 1918"),
    ("172.16.0.1", "RFC 1918"), ("172.31.255.255", "RFC 1918"), ("192.168.1.1", "RFC 1918"),
    ("169.254.169.254", "metadata"), ("169.254.1.1", "link-local"), ("100.64.0.1", "carrier-grade NAT"),
    ("100.100.100.200", "carrier-grade NAT"), ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
    ("192.0.0.192", "IETF"), ("192.0.2.1", "documentation"), ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"), ("168.63.129.16", "Azure platform (WireServer)"),
    ("::ffff:168.63.129.16", "Azure platform"), ("64:ff9b::a83f:8110", "Azure platform"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fc00::1", "unique local"),
    ("fd00:ec2::254", "metadata"), ("ff02::1", "multicast"), ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "metadata"), ("::ffff:10.0.0.1", "RFC 1918"),
    ("::127.0.0.1", "IPv4-compatible"), ("64:ff9b::7f00:1", "NAT64 address embedding 127.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "metadata"), ("64:ff9b:1::1", "local-use NAT64"), ("2001::1", "Teredo"),
    ("2001:db8::1", "documentation"), ("2002:7f00:1::1", "6to4"), ("100::1", "discard"),
    ("4000::1", "outside global unicast"),
])
def test_forbidden_ranges(address: str, what: str) -> None:
    reason = forbidden(ip(address))
    assert reason is not None and what in reason


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "8.8.8.8", "2606:4700::1111", "168.63.129.15",
                                     "168.63.129.17",
                                     "2a00:1450:4001::1", "::ffff:93.184.216.34", "64:ff9b::5db8:d822"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden(ip(address)) is None


def test_allow_private_is_the_only_exception() -> None:
    nets = parse_networks("127.0.0.1/32, 10.20.0.0/16,fd00:1::/64")
    assert forbidden(ip("127.0.0.1"), nets) is None
    assert forbidden(ip("::ffff:127.0.0.1"), nets) is None
    assert forbidden(ip("64:ff9b::7f00:1"), nets) == "a NAT64 address embedding 127.0.0.1, a loopback address"
    assert forbidden(ip("10.20.3.4"), nets) is None
    assert forbidden(ip("fd00:1::5"), nets) is None
    assert forbidden(ip("127.0.0.2"), nets) == "a loopback address"
    assert forbidden(ip("::1"), nets) == "a loopback address"
    assert forbidden(ip("10.21.0.1"), nets) == "a private (RFC 1918) address"
    assert forbidden(ip("169.254.169.254"), nets) == "the cloud metadata address"


@pytest.mark.parametrize("text", ["127.0.0.1/33", "10.0.0.0/8,bogus", "0x7f.0.0.0/8", "010.0.0.0/8",
                                  "fe80::/10%eth0"])
def test_bad_operator_networks(text: str) -> None:
    with pytest.raises(ValueError):
        parse_networks(text)


def test_operator_networks_normalise() -> None:
    assert parse_networks("10.1.2.3/8,,::ffff:127.0.0.0/104, 127.0.0.1") == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"))


# -- policies ---------------------------------------------------------------------------------------------------

def test_policy_shapes_round_trip() -> None:
    assert parse_policy("none") is NONE and NONE.to_json() == "none"
    assert parse_policy("open") is OPEN and OPEN.to_json() == "open"
    policy = parse_policy({"allow": ["PyPI.org.", "*.PythonHosted.org", "example.com:8443", "1.2.3.4",
                                     "[2001:DB8::1]:443", "2001:db8::2", "198.51.100.7/24", "bücher.de",
                                     "pypi.org", "2130706433:80"],
                           "deny": ["evil.pypi.org"]})
    assert parse_policy({"deny": ["2001:db8::/32:443", "10.1.2.3/8:22"]}).to_json()["deny"] == [  # type: ignore[index]
        "2001:db8::/32:443", "10.0.0.0/8:22"]
    assert policy.to_json() == {
        "allow": ["pypi.org", "*.pythonhosted.org", "example.com:8443", "1.2.3.4", "[2001:db8::1]:443",
                  "2001:db8::2", "198.51.100.0/24", "xn--bcher-kva.de", "127.0.0.1:80"],
        "deny": ["evil.pypi.org"]}
    assert parse_policy(policy.to_json()) == policy
    assert parse_policy({}) == NetworkPolicy("list")
    assert parse_policy({"deny": ["x.com"]}).to_json() == {"allow": [], "deny": ["x.com"]}


@pytest.mark.parametrize("value, message", [
    (None, 'network must be "none", "open" or an object'),
    ("all", 'network must be "none", "open" or an object'),
    (["example.com"], 'network must be "none", "open" or an object'),
    ({"allow": "example.com"}, "network.allow must be a list of strings"),
    ({"allow": [], "block": []}, "unknown keys block"),
    ({"allow": [3]}, "network.allow[0] must be a string"),
    ({"allow": ["ok.com", "*"]}, 'network.allow[1] is not a valid entry: "*" is not an entry; use the policy '
                                 '"open"'),
    ({"allow": ["foo.*.com"]}, "a wildcard must be the whole first label"),
    ({"allow": ["*foo.com"]}, "a wildcard must be the whole first label"),
    ({"allow": ["*.1.2.3.4"]}, "a wildcard needs a domain name"),
    ({"allow": ["example.com:0"]}, "is not a port number"),
    ({"allow": ["example.com:99999"]}, "is not a port number"),
    ({"allow": ["256.1.1.1"]}, "not a valid one"),
    ({"deny": ["10.0.0.0/40"]}, "network.deny[0] is not a valid entry"),
    ({"allow": ["ex ample.com"]}, "is not a valid host name"),
    ({"allow": [""]}, "an entry is empty"),
    ({"allow": ["a" * 400]}, "longer than 300 characters"),
    ({"allow": ["x.com"] * 257}, "at most 256 entries"),
    ({"allow": ["[fe80::1%eth0]:80"]}, "zone ids"),
])
def test_bad_policies_say_why(value: object, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_policy(value)
    assert message in info.value.message
    assert info.value.status == 400 and info.value.message.endswith(".")


def test_entry_kinds() -> None:
    assert parse_entry("*.example.com:443").matches_name("a.b.example.com", 443)
    assert not parse_entry("*.example.com:443").matches_name("example.com", 443)
    assert not parse_entry("*.example.com:443").matches_name("a.example.com", 80)
    assert not parse_entry("*.example.com").matches_name("badexample.com", 443)
    assert parse_entry("example.com").matches_name("example.com", 1)
    assert not parse_entry("example.com").matches_name("a.example.com", 443)
    assert parse_entry("10.0.0.0/8").matches_address(ip("10.9.9.9"), 22)
    assert not parse_entry("10.0.0.0/8").matches_address(ip("::ffff:a09:909"), 22)  # callers unwrap first


# -- decisions ----------------------------------------------------------------------------------------------------

LIST = parse_policy({"allow": ["svc.test", "*.svc.test", "port.test:8443", "203.0.113.9", "93.184.216.0/24",
                               "127.0.0.1:8080", "[2606:4700::1111]:443", "1.1.0.0/16:443"],
                     "deny": ["bad.svc.test", "*.evil.svc.test", "93.184.216.66", "1.1.1.0/24:443"]})
PUBLIC = [ip("93.184.216.34")]


@pytest.mark.parametrize("policy, target, resolved, allow_private, allowed, phrase", [
    (NONE, "svc.test:443", PUBLIC, (), False, 'network policy is "none"'),
    (NONE, "93.184.216.34:443", [], (), False, 'network policy is "none"'),
    (OPEN, "anything.example:443", PUBLIC, (), True, 'the network policy is "open"'),
    (OPEN, "93.184.216.34:80", [], (), True, '"open"'),
    (OPEN, "local.test:80", [ip("127.0.0.1")], (), False, "local.test resolves to 127.0.0.1, a loopback"),
    (OPEN, "local.test:80", [ip("127.0.0.1")], LOCAL, True, '"open"'),
    (OPEN, "local.test:80", [ip("127.0.0.2")], LOCAL, False, "loopback"),
    (OPEN, "meta.test:80", [ip("169.254.169.254")], LOCAL, False, "the cloud metadata address"),
    (OPEN, "meta.test:80", [ip("::ffff:169.254.169.254")], LOCAL, False, "the cloud metadata address"),
    (OPEN, "mixed.test:80", [ip("93.184.216.34"), ip("10.0.0.1")], (), False, "10.0.0.1, a private"),
    (OPEN, "127.0.0.1:80", [], (), False, "127.0.0.1 is a loopback address"),
    (OPEN, "127.0.0.1:80", [], LOCAL, True, '"open"'),
    (OPEN, "2130706433:80", [], (), False, "127.0.0.1 is a loopback address"),
    (OPEN, "[::1]:80", [], LOCAL, False, "::1 is a loopback address"),
    (OPEN, "[::ffff:127.0.0.1]:80", [], LOCAL, True, '"open"'),
    (OPEN, "169.254.169.254:80", [], LOCAL, False, "the cloud metadata address"),
    (OPEN, "[fd00:ec2::254]:80", [], (), False, "the cloud metadata address"),
    (OPEN, "[64:ff9b::a9fe:a9fe]:80", [], (), False, "NAT64 address embedding 169.254.169.254"),
    (OPEN, "[2002:a9fe:a9fe::1]:80", [], (), False, "6to4"),
    (OPEN, "svc.test:80", [], (), False, "resolves to no address"),
    (LIST, "svc.test:443", PUBLIC, (), True, 'allowed by the entry "svc.test"'),
    (LIST, "SVC.test.:80", PUBLIC, (), True, 'allowed by the entry "svc.test"'),
    (LIST, "api.svc.test:443", PUBLIC, (), True, 'allowed by the entry "*.svc.test"'),
    (LIST, "bad.svc.test:443", PUBLIC, (), False, 'matches the deny entry "bad.svc.test"'),
    (LIST, "x.evil.svc.test:443", PUBLIC, (), False, 'matches the deny entry "*.evil.svc.test"'),
    (LIST, "other.test:443", PUBLIC, (), False, "matches no allow entry"),
    (LIST, "svc.test.evil:443", PUBLIC, (), False, "matches no allow entry"),
    (LIST, "port.test:8443", PUBLIC, (), True, '"port.test:8443"'),
    (LIST, "port.test:443", PUBLIC, (), False, "matches no allow entry"),
    (LIST, "svc.test:443", [ip("93.184.216.66")], (), False, "resolves to 93.184.216.66, which matches the "
                                                             'deny entry "93.184.216.66"'),
    (LIST, "svc.test:443", [ip("93.184.216.7"), ip("93.184.216.66")], (), False, '"93.184.216.66"'),
    (LIST, "svc.test:443", [ip("127.0.0.1")], (), False, "a loopback address"),
    (LIST, "svc.test:443", [ip("127.0.0.1")], LOCAL, True, '"svc.test"'),
    (LIST, "203.0.113.9:443", [], (), False, "documentation"),
    (LIST, "93.184.216.7:80", [], (), True, '"93.184.216.0/24"'),
    (LIST, "93.184.216.66:443", [], (), False, '93.184.216.66 matches the deny entry "93.184.216.66"'),
    (LIST, "93.184.217.34:443", [], (), False, "matches no allow entry"),
    (LIST, "1.1.2.2:443", [], (), True, '"1.1.0.0/16:443"'),
    (LIST, "1.1.2.2:80", [], (), False, "matches no allow entry"),
    (LIST, "1.1.1.1:443", [], (), False, 'deny entry "1.1.1.0/24:443"'),
    (LIST, "203.0.113.9:443", [], parse_networks("203.0.113.0/24"), True, '"203.0.113.9"'),
    (LIST, "127.0.0.1:8080", [], LOCAL, True, '"127.0.0.1:8080"'),
    (LIST, "0x7f.1:8080", [], LOCAL, True, '"127.0.0.1:8080"'),
    (LIST, "127.0.0.1:8081", [], LOCAL, False, "matches no allow entry"),
    (LIST, "[2606:4700::1111]:443", [], (), True, '"[2606:4700::1111]:443"'),
    (LIST, "[2606:4700::1111]:80", [], (), False, "matches no allow entry"),
])
def test_decisions(policy: NetworkPolicy, target: str, resolved: list[ipaddress.IPv4Address],
                   allow_private: tuple[ipaddress.IPv4Network, ...], allowed: bool, phrase: str) -> None:
    verdict = decide(policy, parse_target(target), resolved, allow_private)
    assert verdict.allowed is allowed, verdict.reason
    assert phrase in verdict.reason
    assert verdict.reason.endswith(".")


def test_names_are_judged_before_any_lookup() -> None:
    # A name the policy cannot allow is refused without resolving it (no DNS exfiltration); an allowed name
    # needs its addresses; "none" refuses everything up front.
    assert not check_target(LIST, parse_target("secret.attacker.example:443")).allowed
    assert not check_target(LIST, parse_target("bad.svc.test:443")).allowed
    assert check_target(LIST, parse_target("svc.test:443")).allowed
    assert check_target(OPEN, parse_target("anything.example:443")).allowed
    assert not check_target(NONE, parse_target("svc.test:443")).allowed
    assert not check_target(OPEN, parse_target("127.0.0.1:80")).allowed
