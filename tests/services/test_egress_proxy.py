"""The egress proxy end to end: real unix sockets, real HTTP and HTTPS servers on 127.0.0.1 (the operator's
``allow_private`` is 127.0.0.1/32 unless a test says otherwise), names resolved by a table the test controls.

Each test speaks to the proxy as a sandbox would (through its unix socket): allowed and refused destinations
by domain, port, deny over allow, "none" and "open"; hostile literals and names; SNI checks; floods; byte
counters; live policy changes; HTTP framing and header hygiene; upstream failures; who may use the socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from typing import Any

import h11
import pytest

from kernelhub.errors import Conflict, InvalidRequest
from kernelhub.services.egress.policy import NONE, parse_policy
from kernelhub.services.egress.proxy import ProxyLimits, SandboxProxy

pytestmark = pytest.mark.timeout(60)


def run(runner: asyncio.Runner, coro: Any) -> Any:
    return runner.run(coro)


def denied(kit: Any, phrase: str) -> list[str]:
    """The refusals reported so far whose reason contains ``phrase`` (their log lines)."""
    return [r.log_line() for r in kit.refusals if phrase in r.reason]


# -- allowed and refused ----------------------------------------------------------------------------------------

def test_allowed_by_domain_over_http_and_https(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        answer = await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")
        assert answer.status == 200 and answer.text == f"hello from http as svc.test:{s.http_port}"
        answer = await egress.https_get(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 200 and answer.text == "hello from https as svc.test"
        assert egress.refusals == []
        assert egress.dns.asked == ["svc.test", "svc.test"]

    run(runner, go())


def test_refused_by_domain_without_looking_the_name_up(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        answer = await egress.get(proxy, f"http://other.test:{s.http_port}/hello")
        assert answer.status == 403
        assert answer.text == f"egress denied: other.test:{s.http_port} matches no allow entry of the sandbox's " \
                              "network policy.\n"
        answer, _reader, writer = await egress.connect(proxy, f"secret-data.attacker.test:{s.https_port}")
        writer.close()
        assert answer.status == 403 and "matches no allow entry" in answer.text
        # Names the policy refuses are never resolved: no DNS exfiltration through the proxy.
        assert egress.dns.asked == []
        lines = [r.log_line() for r in egress.refusals]
        assert lines == [
            f"egress denied: GET http://other.test:{s.http_port}/hello: other.test:{s.http_port} matches no allow "
            "entry of the sandbox's network policy.",
            f"egress denied: CONNECT secret-data.attacker.test:{s.https_port}: secret-data.attacker.test:"
            f"{s.https_port} matches no allow entry of the sandbox's network policy."]
        assert all(r.status == 403 and r.sandbox_id == "sb1" for r in egress.refusals)

    run(runner, go())


def test_refused_by_port(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": [f"svc.test:{s.http_port}", f"*.svc.test:{s.https_port}"]})
        assert (await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")).status == 200
        assert (await egress.https_get(proxy, f"api.svc.test:{s.https_port}")).status == 200
        answer = await egress.https_get(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 403 and f"svc.test:{s.https_port} matches no allow entry" in answer.text
        answer = await egress.get(proxy, f"http://api.svc.test:{s.http_port}/hello")
        assert answer.status == 403

    run(runner, go())


def test_deny_wins_over_allow(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test", "*.svc.test"], "deny": ["bad.svc.test"]})
        assert (await egress.https_get(proxy, f"api.svc.test:{s.https_port}")).status == 200
        answer = await egress.https_get(proxy, f"bad.svc.test:{s.https_port}")
        assert answer.status == 403 and 'matches the deny entry "bad.svc.test"' in answer.text
        # A deny network refuses names that resolve into it, even ones an allow entry names.
        proxy = await egress.start({"allow": ["svc.test"], "deny": ["127.0.0.0/8"]})
        answer = await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")
        assert answer.status == 403
        assert 'svc.test resolves to 127.0.0.1, which matches the deny entry "127.0.0.0/8"' in answer.text

    run(runner, go())


def test_none_refuses_everything(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start("none")
        for url in (f"http://svc.test:{s.http_port}/hello", f"http://127.0.0.1:{s.http_port}/hello"):
            answer = await egress.get(proxy, url)
            assert answer.status == 403 and 'network policy is "none"' in answer.text
        answer = await egress.https_get(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 403 and 'network policy is "none"' in answer.text
        assert egress.dns.asked == []
        assert len(denied(egress, '"none"')) == 3

    run(runner, go())


def test_open_reaches_a_private_range_only_when_the_operator_lists_it(egress: Any,
                                                                       runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        listed = await egress.start("open")
        assert (await egress.get(listed, f"http://svc.test:{s.http_port}/hello")).status == 200
        assert (await egress.https_get(listed, f"other.test:{s.https_port}")).status == 200
        assert (await egress.get(listed, f"http://127.0.0.1:{s.http_port}/hello")).status == 200
        unlisted = await egress.start("open", allow_private="")
        answer = await egress.get(unlisted, f"http://svc.test:{s.http_port}/hello")
        assert answer.status == 403
        assert answer.text == "egress denied: svc.test resolves to 127.0.0.1, a loopback address, which no " \
                              "network policy opens.\n"
        answer = await egress.https_get(unlisted, f"127.0.0.1:{s.https_port}")
        assert answer.status == 403 and "127.0.0.1 is a loopback address" in answer.text
        other_range = await egress.start("open", allow_private="10.0.0.0/8")
        assert (await egress.get(other_range, f"http://svc.test:{s.http_port}/hello")).status == 403

    run(runner, go())


@pytest.mark.parametrize("name, phrase", [
    ("metadata.test", "metadata.test resolves to 169.254.169.254, the cloud metadata address"),
    ("six.test", "six.test resolves to ::1, a loopback address"),
    ("mixed.test", "mixed.test resolves to 10.1.2.3, a private (RFC 1918) address"),
])
def test_names_resolving_to_refused_addresses(egress: Any, runner: asyncio.Runner, name: str, phrase: str) -> None:
    # A public-looking name that resolves (through a resolver the test controls) into a range no policy opens
    # is refused after resolution, even under "open" with 127.0.0.1 listed by the operator.
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start("open")
        for answer in (await egress.get(proxy, f"http://{name}:{s.http_port}/hello"),
                       await egress.https_get(proxy, f"{name}:{s.https_port}")):
            assert answer.status == 403 and phrase in answer.text
        assert egress.dns.asked == [name, name]

    run(runner, go())


def test_a_name_resolving_to_an_ipv4_mapped_address_is_judged_as_ipv4(egress: Any,
                                                                       runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["mapped.test"]})
        assert (await egress.get(proxy, f"http://mapped.test:{s.http_port}/hello")).status == 200
        proxy = await egress.start({"allow": ["mapped.test"]}, allow_private="")
        answer = await egress.get(proxy, f"http://mapped.test:{s.http_port}/hello")
        assert answer.status == 403 and "resolves to 127.0.0.1, a loopback address" in answer.text

    run(runner, go())


def test_hostile_literals(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers
    hp = s.http_port

    async def go() -> None:
        proxy = await egress.start("open")
        # Every spelling of 127.0.0.1 is read as 127.0.0.1 (and so reaches the listed range, and no other).
        for host in ("2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "[::ffff:127.0.0.1]",
                     "[::ffff:7f00:1]", "127.0.0.1."):
            answer = await egress.get(proxy, f"http://{host}:{hp}/hello")
            assert (answer.status, answer.text) == (200, f"hello from http as 127.0.0.1:{hp}"), host
        for host, phrase in (("[::1]", "::1 is a loopback address"),
                             ("127.0.0.2", "127.0.0.2 is a loopback address"),
                             ("2852039166", "169.254.169.254 is the cloud metadata address"),
                             ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254 is the cloud metadata address"),
                             ("[::ffff:169.254.169.254]", "169.254.169.254 is the cloud metadata address"),
                             ("[64:ff9b::7f00:1]", "NAT64 address embedding 127.0.0.1"),
                             ("[fd00:ec2::254]", "the cloud metadata address"),
                             ("0.0.0.0", "unspecified"), ("[::]", "the unspecified address"),
                             ("10.0.0.1", "private (RFC 1918)"), ("100.64.0.1", "carrier-grade NAT")):
            answer = await egress.get(proxy, f"http://{host}:{hp}/hello")
            assert answer.status == 403 and phrase in answer.text, (host, answer)
        for target, phrase in ((f"0x7g.1:{hp}", "looks like an IPv4 address but is not a valid one"),
                               (f"exa%mple.test:{hp}", "is not a valid host name"),
                               (f"1.2.3.4.5:{hp}", "not a valid one"),
                               (f"256.0.0.1:{hp}", "not a valid one"),
                               (f"[fe80::1%25eth0]:{hp}", "zone ids"),
                               (f"[::1:{hp}", "unclosed bracket"),
                               ("svc.test", "names no port"),
                               (f"svc.test:{hp}0000", "not a port number")):
            answer, _r, writer = await egress.connect(proxy, target)
            writer.close()
            assert answer.status == 400 and phrase in answer.text, (target, answer)
        assert egress.dns.asked == []
        # Under an allow list, a literal of an allowed name's address is not the name.
        proxy = await egress.start({"allow": ["svc.test"]})
        answer = await egress.get(proxy, f"http://2130706433:{hp}/hello")
        assert answer.status == 403 and f"127.0.0.1:{hp} matches no allow entry" in answer.text

    run(runner, go())


# -- TLS ---------------------------------------------------------------------------------------------------------

def test_sni_must_name_the_connect_host(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers
    target = f"svc.test:{s.https_port}"

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test", f"127.0.0.1:{s.https_port}"]})
        assert (await egress.https_get(proxy, target)).status == 200
        for sni, phrase in (("other.test", "names other.test, not svc.test that the CONNECT asked for"),
                            ("SVC.test.evil", "names svc.test.evil, not svc.test"),
                            (None, "names no server (SNI)")):
            with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
                await egress.https_get(proxy, target, sni=sni)
            assert denied(egress, phrase), egress.refusals
        # Upper case and a trailing dot name the same host.
        ctx = egress.servers.client_context()
        ctx.check_hostname = False
        assert (await egress.https_get(proxy, target, sni="SVC.TEST.", context=ctx)).status == 200
        # An allowed address cannot carry a name (domain fronting onto an allowed IP); no SNI is fine there.
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await egress.https_get(proxy, f"127.0.0.1:{s.https_port}", sni="svc.test")
        assert denied(egress, "names svc.test, not 127.0.0.1")
        assert (await egress.https_get(proxy, f"127.0.0.1:{s.https_port}")).status == 200
        assert all(r.status == 403 and r.method == "CONNECT" for r in egress.refusals)

    run(runner, go())


@pytest.mark.parametrize("first_bytes, phrase", [
    (b"GET / HTTP/1.1\r\nHost: svc.test\r\n\r\n", "CONNECT carries TLS only"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "CONNECT carries TLS only"),
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "not a ClientHello"),
])
def test_a_tunnel_carries_tls_only(egress: Any, runner: asyncio.Runner, first_bytes: bytes, phrase: str) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        answer, reader, writer = await egress.connect(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 200
        writer.write(first_bytes)
        assert await asyncio.wait_for(reader.read(), 30) == b""  # closed, nothing forwarded back
        writer.close()
        assert denied(egress, phrase)
        assert proxy.tx_bytes == 0

    run(runner, go())


def test_a_silent_tunnel_is_closed(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, handshake_timeout=0.3)
        answer, reader, writer = await egress.connect(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 200
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        assert denied(egress, "no TLS ClientHello came within 0.3 s")
        # A connection that never sends a whole request head is closed too.
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(b"GET http://svc.test/ HTTP/1.1\r\nHost: svc")
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()

    run(runner, go())


def test_an_idle_tunnel_is_closed(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, idle_timeout=0.5)
        answer, reader, writer = await egress.connect(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 200
        await writer.start_tls(s.client_context(), server_hostname="svc.test")
        writer.write(b"GET /hello HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"hello from https"), 30)
        # Then nothing either way: the proxy closes the tunnel after the idle timeout.
        assert await asyncio.wait_for(reader.read(), 30) == b" as svc.test"
        writer.close()
        assert proxy.active_connections == 0

    run(runner, go())


def test_a_download_the_sandbox_stops_reading_is_closed(egress: Any, runner: asyncio.Runner) -> None:
    """A plain HTTP response the sandbox stops reading: nothing moves for the idle timeout, so the connection
    (and its upstream one) is closed, as a tunnel's is; it used to wait for the sandbox for ever. And either
    way, the proxy's end is closed at once, not left holding what it could not write."""
    s = egress.servers

    async def stalled(proxy: SandboxProxy, request: bytes, tls: bool = False) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, proxy.socket_path)
            await loop.sock_sendall(sock, request)
            got = b""
            while b"xxxx" not in got and b"200 Connection established" not in got:
                got += await loop.sock_recv(sock, 1024)  # the download started; then nothing more is read
            if tls:  # a ClientHello for svc.test: the tunnel is up, and the server's answer is left unread
                hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                              server_hostname="svc.test")
                with pytest.raises(ssl.SSLWantReadError):
                    hello.do_handshake()
                await loop.sock_sendall(sock, out.read())
            tasks = [c.task for c in proxy._conns if c.task is not None]
            assert len(tasks) == 1
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)  # the connection ends
            assert proxy.active_connections == 0
            # And the proxy's end is closed, not left waiting to flush what the sandbox will never read (an
            # open descriptor the connection bound no longer counts).
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(100):
                    sock.send(b"x" * 1024)
        finally:
            sock.close()

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, idle_timeout=0.5)
        await stalled(proxy, f"GET http://svc.test:{s.http_port}/bytes?n=50000000 HTTP/1.1\r\nHost: svc.test\r\n"
                             "\r\n".encode())
        await stalled(proxy, f"CONNECT svc.test:{s.https_port} HTTP/1.1\r\nHost: svc.test\r\n\r\n".encode(),
                      tls=True)

    run(runner, go())


def test_the_system_resolver(runner: asyncio.Runner) -> None:
    from kernelhub.services.egress.proxy import system_resolver

    addresses = runner.run(system_resolver("localhost", 80))
    assert ipaddress.ip_address("127.0.0.1") in addresses
    assert len(addresses) == len(set(addresses))


# -- bounds ------------------------------------------------------------------------------------------------------

def test_lookups_that_hang_hold_few_threads_and_none_of_the_gateways(egress: Any, runner: asyncio.Runner,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A sandbox asking for names whose servers never answer (here ``*.slow``, whose getaddrinfo blocks) used to
    fill the loop's default thread pool (6 threads on 2 cores), shared with file transfers and every other
    sandbox's lookups: those then timed out too. Now a sandbox holds at most ``max_lookups`` threads of a pool
    of egress's own, until its lookups really end; other sandboxes resolve, the gateway's pool is free."""
    from kernelhub.services.egress.proxy import EgressService

    s = egress.servers
    real = socket.getaddrinfo
    gate = threading.Event()
    blocked = [0, 0]  # now, most at once
    lock = threading.Lock()

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if str(host).endswith(".slow"):
            with lock:
                blocked[0] += 1
                blocked[1] = max(blocked)
            gate.wait(30)
            with lock:
                blocked[0] -= 1
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == "fast.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def go() -> None:
        service = EgressService(allow_private="127.0.0.1/32", connect_timeout=1.0, max_lookups=2)
        egress.services.append(service)
        flooder = await service.open("sbA", str(egress.dir / "a.sock"), "open")
        other = await service.open("sbB", str(egress.dir / "b.sock"), "open")
        try:
            flood = [asyncio.ensure_future(egress.get(flooder, f"http://n{i}.slow/")) for i in range(12)]
            answers = await asyncio.gather(*flood)
            assert {a.status for a in answers} == {504}, answers
            assert blocked == [2, 2]  # still blocked after their requests ended, and never more than two
            answer = await egress.get(other, f"http://fast.test:{s.http_port}/hello")
            assert (answer.status, answer.text) == (200, f"hello from http as fast.test:{s.http_port}")
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5) == "free"
        finally:
            gate.set()

    run(runner, go())


def test_concurrent_connections_are_bounded(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, max_connections=4)
        flood = [asyncio.ensure_future(egress.get(proxy, f"http://svc.test:{s.http_port}/hold"))
                 for _ in range(20)]
        await asyncio.to_thread(s.hold.wait_for, 4)
        # Every connection past the 4 held ones is turned away at once.
        pending, turned = set(flood), []
        while len(turned) < 16:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            turned += [f.result() for f in finished]
        assert all(a.status == 503 and "4 egress connections open, its limit" in a.text for a in turned)
        assert s.hold.held == 4 and proxy.active_connections == 4
        s.hold.release()
        held = await asyncio.gather(*pending)
        assert [a.status for a in held] == [200] * 4
        # Reported at most once a second (a flood must not flood the logs), counting the ones left out.
        reports = [r.reason for r in egress.refusals]
        assert reports and all("4 egress connections open, its limit" in r for r in reports)
        left_out = sum(int(n) for r in reports for n in re.findall(r"\((\d+) more connections", r))
        assert len(reports) + left_out <= 16 and len(reports) < 16
        assert all(r.status == 503 for r in egress.refusals)

    run(runner, go())


def test_connection_rate_is_bounded(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, connection_burst=3, connection_rate=0.001)
        for _ in range(3):
            assert (await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")).status == 200
        answer = await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")
        assert answer.status == 429 and "faster than 0.001 per second" in answer.text
        assert [r.status for r in egress.refusals] == [429]

    run(runner, go())


def test_requests_kept_alive_count_against_the_rate(egress: Any, runner: asyncio.Runner) -> None:
    """Each plain HTTP request is a new connection upstream and a new lookup: on one kept-alive connection from
    the sandbox they used to go as fast as the server answered (hundreds a second under a rate of 2). Every
    request after a connection's first takes a token of the rate too, and one without is answered 429."""
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, connection_burst=3, connection_rate=0.001)
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        client = h11.Connection(h11.CLIENT)
        statuses = []
        for _ in range(4):
            writer.write(client.send(h11.Request(method="GET", target=f"http://svc.test:{s.http_port}/hello",
                                                 headers=[("Host", "svc.test")])))
            writer.write(client.send(h11.EndOfMessage()))
            answer = await egress.read(reader, parser=client)
            statuses.append(answer.status)
            if answer.status != 200:
                break
            client.start_next_cycle()
        writer.close()
        assert statuses == [200, 200, 200, 429], statuses
        assert answer.text == "egress denied: The sandbox opens egress connections faster than 0.001 per second; " \
                              "retry later.\n"
        assert egress.dns.asked == ["svc.test"] * 3
        assert [r.status for r in egress.refusals] == [429]

    run(runner, go())


def test_byte_counters(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        assert proxy.metrics() == {"net_rx_bytes": 0, "net_tx_bytes": 0}
        answer = await egress.get(proxy, f"http://svc.test:{s.http_port}/bytes?n=100000")
        assert answer.status == 200 and len(answer.body) == 100000
        rx, tx = proxy.rx_bytes, proxy.tx_bytes
        assert 100000 < rx < 100000 + 1000 and 50 < tx < 1000
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(f"POST http://svc.test:{s.http_port}/echo HTTP/1.1\r\nHost: svc.test\r\n"
                     f"Content-Length: 50000\r\nConnection: close\r\n\r\n".encode() + b"y" * 50000)
        answer = await egress.read(reader)
        writer.close()
        assert answer.body == b"y" * 50000
        assert 50000 < proxy.tx_bytes - tx < 50000 + 1000 and 50000 < proxy.rx_bytes - rx < 50000 + 1000
        rx, tx = proxy.rx_bytes, proxy.tx_bytes
        answer = await egress.https_get(proxy, f"svc.test:{s.https_port}", "/bytes?n=200000")
        assert len(answer.body) == 200000
        assert 200000 < proxy.rx_bytes - rx < 200000 + 5000 and 0 < proxy.tx_bytes - tx < 5000
        # Refused requests move nothing.
        rx, tx = proxy.rx_bytes, proxy.tx_bytes
        assert (await egress.get(proxy, f"http://other.test:{s.http_port}/bytes?n=10")).status == 403
        assert proxy.metrics() == {"net_rx_bytes": rx, "net_tx_bytes": tx}
        assert egress.services[0].metrics("sb1") == proxy.metrics()
        assert egress.services[0].metrics("nope") == {"net_rx_bytes": 0, "net_tx_bytes": 0}

    run(runner, go())


# -- live policy --------------------------------------------------------------------------------------------------

def test_a_new_policy_applies_at_once_and_cuts_what_it_refuses(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start("none")
        service = egress.services[0]
        assert (await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")).status == 403
        assert service.set_policy("sb1", {"allow": ["svc.test"]}) == parse_policy({"allow": ["svc.test"]})
        assert proxy.policy.to_json() == {"allow": ["svc.test"], "deny": []}
        assert (await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")).status == 200
        # An open tunnel: TLS up, one request answered, the connection kept alive.
        answer, reader, writer = await egress.connect(proxy, f"svc.test:{s.https_port}")
        assert answer.status == 200
        await writer.start_tls(s.client_context(), server_hostname="svc.test")
        writer.write(b"GET /hello HTTP/1.1\r\nHost: svc.test\r\n\r\n")
        first = await reader.readuntil(b"hello from https as svc.test")
        assert first.startswith(b"HTTP/1.0 200") or first.startswith(b"HTTP/1.1 200")
        # A policy that still allows it leaves it be; one that does not cuts it and says so.
        service.set_policy("sb1", {"allow": ["svc.test", "other.test"]})
        assert proxy.active_connections == 1
        service.set_policy("sb1", {"allow": ["other.test"]})
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            writer.write(b"GET /hello HTTP/1.1\r\nHost: svc.test\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"hello"), 30)
        writer.close()
        assert denied(egress, "cut by a policy change: svc.test:")
        assert (await egress.get(proxy, f"http://svc.test:{s.http_port}/hello")).status == 403
        assert (await egress.get(proxy, f"http://other.test:{s.http_port}/hello")).status == 200
        service.set_policy("sb1", NONE)
        assert (await egress.get(proxy, f"http://other.test:{s.http_port}/hello")).status == 403
        with pytest.raises(InvalidRequest, match="network.allow must be a list"):
            service.set_policy("sb1", {"allow": "svc.test"})
        assert proxy.policy is NONE
        with pytest.raises(Conflict):
            service.set_policy("nope", "open")

    run(runner, go())


# -- HTTP ----------------------------------------------------------------------------------------------------------

def test_keep_alive_requests_are_each_judged(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        client = h11.Connection(h11.CLIENT)
        for host, status in (("svc.test", 200), ("svc.test", 200), ("other.test", 403)):
            url = f"http://{host}:{s.http_port}/hello".encode()
            writer.write(client.send(h11.Request(method="GET", target=url, headers=[("Host", host)])))
            writer.write(client.send(h11.EndOfMessage()))
            answer = await egress.read(reader, parser=client)
            assert answer.status == status
            if status == 200:
                client.start_next_cycle()
        assert answer.headers["connection"] == "close"
        assert await reader.read() == b""
        writer.close()
        assert proxy.rx_bytes > 0

    run(runner, go())


def test_long_targets_are_forwarded_whole(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        path = "/path?" + "q" * 3000 + "&%C3%A9=1"
        answer = await egress.get(proxy, f"http://svc.test:{s.http_port}{path}")
        assert (answer.status, answer.text) == (200, path)
        answer = await egress.raw(proxy, f"GET http://svc.test:{s.http_port}/path?é HTTP/1.1\r\nHost: x\r\n\r\n"
                                  .encode())
        assert answer.status == 400 and "illegal request line" in answer.text
        assert (await egress.get(proxy, f"http://other.test:{s.http_port}{path}")).status == 403
        assert len(egress.refusals[-1].target) == 200  # shortened for the logs only

    run(runner, go())


def test_hop_by_hop_and_proxy_headers_are_not_forwarded(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        answer = await egress.raw(proxy, (
            f"GET http://svc.test:{s.http_port}/headers HTTP/1.1\r\nHost: evil.test\r\n"
            "Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Connection: keep-alive\r\n"
            "Connection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: 300\r\nTE: trailers\r\n"
            "Upgrade: websocket\r\nExpect: 100-continue\r\nX-Kept: yes\r\n\r\n").encode())
        seen = dict(json.loads(answer.body))
        assert seen == {"host": f"svc.test:{s.http_port}", "x-kept": "yes", "connection": "close"}

    run(runner, go())


def test_http_framing(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers
    base = f"http://svc.test:{s.http_port}"

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        chunked = await egress.raw(proxy, (
            f"POST {base}/echo HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").encode())
        assert (chunked.status, chunked.body) == (200, b"hello world")
        head = await egress.raw(proxy, f"HEAD {base}/bytes?n=1000 HTTP/1.1\r\nHost: svc.test\r\n\r\n".encode(),
                                method=b"HEAD")
        assert (head.status, head.headers["content-length"], head.body) == (200, "1000", b"")
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(f"GET {base}/bytes?n=10 HTTP/1.0\r\n\r\n".encode())
        old = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert old.startswith(b"HTTP/1.1 200 ") and old.endswith(b"\r\n\r\n" + b"x" * 10)
        # Expect: 100-continue is answered by the proxy once the destination is reached.
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(f"POST {base}/echo HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 3\r\n"
                     "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30) == b"HTTP/1.1 100 \r\n\r\n"
        writer.write(b"abc")
        rest = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"abc")

    run(runner, go())


def test_an_early_answer_reaches_the_sandbox(egress: Any, runner: asyncio.Runner) -> None:
    # A server that answers before reading the body and then closes (resetting the proxy's connection, since
    # the body is unread) must still have its answer passed on, not a 502.
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
        await writer.drain()
        writer.transport.abort()

    async def go() -> None:
        server = await asyncio.start_server(early, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            proxy = await egress.start({"allow": ["svc.test"]})
            reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
            writer.write(f"POST http://svc.test:{port}/ HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 8000000\r\n"
                         "\r\n".encode())
            writer.write(b"b" * 8_000_000)
            sending = asyncio.ensure_future(writer.drain())
            answer = await egress.read(reader)
            sending.cancel()
            writer.close()
            assert (answer.status, answer.body) == (413, b"too large")
        finally:
            server.close()
            await server.wait_closed()

    run(runner, go())


def test_a_length_beside_chunks_is_not_passed_on(egress: Any, runner: asyncio.Runner) -> None:
    """Request smuggling (CL.TE): h11 frames a message that has both Transfer-Encoding and Content-Length by its
    chunks; the proxy must not hand the length on (a server that reads it would take the rest of the body for a
    second request, with a Host the sandbox chose). The same for a response, which would otherwise be framed
    by a length its body does not have."""
    heads: list[bytes] = []

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def go() -> None:
        upstream = await asyncio.start_server(server, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        try:
            proxy = await egress.start({"allow": ["svc.test"]})
            smuggled = b"GET /admin HTTP/1.1\r\nHost: elsewhere.test\r\n\r\n"
            body = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
            answer = await egress.raw(proxy, (
                f"POST http://svc.test:{port}/ HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 4\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + body)
            assert (answer.status, answer.body) == (200, b"hello")
            assert "content-length" not in answer.headers
            head = heads[0].lower()
            assert b"transfer-encoding: chunked\r\n" in head and b"content-length" not in head, heads
            assert head.endswith(body.lower())
        finally:
            upstream.close()
            await upstream.wait_closed()

    run(runner, go())


def test_a_request_head_has_a_deadline_not_just_a_read_timeout(egress: Any, runner: asyncio.Runner) -> None:
    """Slowloris: a byte every 50 ms never lets a read time out after 0.5 s, but the head as a whole must come
    within the handshake timeout (the first request's from the connection's start, a later one's from its first
    byte), or the connection is closed."""
    s = egress.servers

    async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the attack's pace, not a wait for anything

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]}, handshake_timeout=0.5)
        head = f"GET http://svc.test:{s.http_port}/hello HTTP/1.1\r\nHost: svc.test\r\nX-Pad: ".encode()
        head += b"a" * 400 + b"\r\n\r\n"  # 20 s at that pace
        for earlier in (b"", f"GET http://svc.test:{s.http_port}/hello HTTP/1.1\r\nHost: svc.test\r\n\r\n"
                             .encode()):
            reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
            if earlier:
                client = h11.Connection(h11.CLIENT)
                client.send(h11.Request(method="GET", target=b"/", headers=[("Host", "x")]))
                client.send(h11.EndOfMessage())
                writer.write(earlier)
                assert (await egress.read(reader, parser=client)).status == 200
            sending = asyncio.ensure_future(trickle(writer, head))
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert asyncio.get_running_loop().time() - started < 5
            sending.cancel()
            writer.close()
        assert proxy.active_connections == 0

    run(runner, go())


@pytest.mark.parametrize("request_bytes, status, phrase", [
    (b"GET /hello HTTP/1.1\r\nHost: svc.test\r\n\r\n", 400, "send an absolute http:// URI or CONNECT"),
    (b"GET https://svc.test/hello HTTP/1.1\r\nHost: svc.test\r\n\r\n", 400, "through a CONNECT tunnel"),
    (b"GET ftp://svc.test/x HTTP/1.1\r\nHost: svc.test\r\n\r\n", 400, "send an absolute http:// URI"),
    (b"GET http://user:pw@svc.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n", 400, "user info"),
    (b"GET http:///x HTTP/1.1\r\nHost: svc.test\r\n\r\n", 400, "send an absolute http:// URI"),
    (b"GET http://svc.test\\@other.test/ HTTP/1.1\r\nHost: svc.test\r\n\r\n", 400, "user info"),
    (b"\x00\x01\x02 garbage\r\n\r\n", 400, "The request is malformed: illegal request line"),
    (b"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n", 431,
     "The request is malformed"),
    (b"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     400, "conflicting Content-Length"),
    (b"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "The request is malformed"),
    (b"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nBad Name: x\r\n\r\n", 400, "The request is malformed"),
    (b"GET http://svc.test/ HTTP/1.1\r\nHost: svc.test\r\nX: a\x00b\r\n\r\n", 400, "The request is malformed"),
    (b"CONNECT svc.test:443 HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 2\r\n\r\nab", 400,
     "A CONNECT request carries no body"),
])
def test_malformed_requests_are_refused(egress: Any, runner: asyncio.Runner, request_bytes: bytes, status: int,
                                        phrase: str) -> None:
    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        answer = await egress.raw(proxy, request_bytes)
        assert answer.status == status and phrase in answer.text, answer
        assert answer.headers["connection"] == "close"
        assert [r.status for r in egress.refusals] == [status]
        assert egress.dns.asked == [] and proxy.tx_bytes == 0

    run(runner, go())


def test_upstream_failures_get_502_or_504(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]  # bound, not listening: connections are refused

    async def go() -> None:
        proxy = await egress.start("open", connect_timeout=0.3)
        answer = await egress.get(proxy, f"http://nowhere.test:{s.http_port}/")
        assert answer.status == 502 and "nowhere.test could not be resolved" in answer.text
        answer = await egress.get(proxy, f"http://svc.test:{closed_port}/")
        assert answer.status == 502 and f"Could not connect to svc.test:{closed_port}: 127.0.0.1:" in answer.text
        answer, _r, writer = await egress.connect(proxy, f"svc.test:{closed_port}")
        writer.close()
        assert answer.status == 502

        async def hang(host: str, port: int) -> list[Any]:
            await asyncio.Event().wait()
            raise AssertionError

        proxy.resolver = hang
        answer = await egress.get(proxy, f"http://svc.test:{s.http_port}/")
        assert answer.status == 504 and "Resolving svc.test took longer than 0.3 s" in answer.text
        assert egress.refusals == []  # failures are not refusals

    try:
        run(runner, go())
    finally:
        closed.close()


def test_only_the_sandbox_uid_may_use_the_socket(egress: Any, runner: asyncio.Runner) -> None:
    # The socket is the sandbox's way out: another sandbox's uid must not be able to connect to it.
    owner, stranger = 64990, 64991
    os.chmod(egress.dir, 0o711)
    probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
             "try:\n s.connect(sys.argv[1])\nexcept OSError as e:\n print(type(e).__name__)\n"
             "else:\n s.sendall(b'CONNECT svc.test:443 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n"
             " print(s.recv(100).split(b'\\r\\n')[0].decode())\n")

    async def go() -> None:
        service_proxy: SandboxProxy = await egress.start("none")
        await service_proxy.close()
        proxy = SandboxProxy("sbx", str(egress.dir / "owned.sock"), NONE, limits=ProxyLimits())
        await proxy.start(owner=(owner, owner))
        try:
            st = os.stat(proxy.socket_path)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (owner, owner, 0o600)
            results = {}
            for uid in (owner, stranger):
                proc = await asyncio.create_subprocess_exec(
                    "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-I", "-c",
                    probe, proxy.socket_path, stdout=subprocess.PIPE)
                out, _ = await proc.communicate()
                results[uid] = out.decode().strip()
            assert results == {owner: "HTTP/1.1 403 Forbidden", stranger: "PermissionError"}
        finally:
            await proxy.close()
        assert not os.path.exists(proxy.socket_path)

    run(runner, go())


def test_the_audit_budget_of_refusals() -> None:
    """A sandbox's refusals reach the audit log ``burst`` at once, then ``rate`` a second; the first kept after
    some were left out says how many."""
    from kernelhub.services.egress.proxy import RefusalBudget

    now = [100.0]
    budget = RefusalBudget(3, 0.5, clock=lambda: now[0])
    assert [budget.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 1.0  # half a token
    assert budget.take() is None
    now[0] += 1.0
    assert budget.take() == 3
    now[0] += 1000.0  # refills to the burst, no more
    assert [budget.take() for _ in range(4)] == [0, 0, 0, None]


def test_service_configuration(egress: Any, runner: asyncio.Runner) -> None:
    from traitlets import TraitError

    from kernelhub.services.egress.proxy import EgressService
    from kernelhub.settings import env_config

    environ = {"KERNELHUB_EGRESS_ALLOW_PRIVATE": "10.0.0.0/8, 127.0.0.1", "KERNELHUB_EGRESS_MAX_CONNECTIONS": "7",
               "KERNELHUB_EGRESS_HOSTS": '{"Mirror.Internal.": ["10.1.2.3"]}'}
    service = EgressService(config=env_config([EgressService], environ))
    assert [str(n) for n in service.allowed_private_networks] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert service.limits().max_connections == 7
    assert service.hosts == {"mirror.internal": ["10.1.2.3"]}
    assert run(runner, service.resolver("mirror.internal", 443)) == [ipaddress.ip_address("10.1.2.3")]
    with pytest.raises(TraitError, match="--egress-allow-private: 'bogus' is not a CIDR network"):
        EgressService(allow_private="bogus")
    for hosts, said in (({"10.0.0.1": ["10.0.0.2"]}, "is an address, not a name"),
                        ({"a.test": []}, "expected a non-empty list"), ({"a.test": ["nope"]}, "not an IP address")):
        with pytest.raises(TraitError, match=said):
            EgressService(hosts=hosts)

    async def go() -> None:
        proxy = await egress.start("none")
        with pytest.raises(Conflict):
            await egress.services[0].open("sb1", str(egress.dir / "again.sock"), "open")
        with pytest.raises(InvalidRequest):
            await egress.services[0].open("sb9", str(egress.dir / "bad.sock"), {"allow": ["*"]})
        assert not (egress.dir / "bad.sock").exists()
        await egress.services[0].close("sb1")
        await egress.services[0].close("sb1")
        assert not os.path.exists(proxy.socket_path)
        from kernelhub.errors import SandboxError
        with pytest.raises(SandboxError, match="longer than 107 bytes"):
            await egress.services[0].open("sb2", "/tmp/" + "x" * 120, "none")

    run(runner, go())
