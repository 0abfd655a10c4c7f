"""The gateway before authentication (SECURITY.md pitfall 14), against a real ``kernelhub serve``: silent and
slow connections are closed at the header deadline, a stalled request body at the body deadline, one address
cannot hold every connection, running out of descriptors sheds connections without a traceback per attempt,
and a legitimate client is answered throughout.

Floods come from other loopback addresses (127.0.0.2 and up: every 127/8 address is this machine's), bounded
in count and time.
"""

from __future__ import annotations

import contextlib
import resource
import selectors
import socket
import time
from collections.abc import Iterator

import pytest

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root]

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
PER_ADDRESS = 20


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # room for the flood
    gateway = Gateway(extra_args=[f"--ServeApp.header_timeout={HEADER_TIMEOUT}",
                                  f"--ServeApp.max_connections_per_address={PER_ADDRESS}",
                                  f"--ServeApp.body_timeout={BODY_TIMEOUT}",
                                  "--ServeApp.max_connections=1000", "--log-level=INFO"])
    yield gateway
    gateway.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect_from(gw: Gateway, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.port))
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the gateway closes ``sock`` within ``within`` seconds (EOF or reset)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def legit(gw: Gateway) -> None:
    started = time.monotonic()
    status, body = gw.request("GET", "/v1/sandboxes", timeout=10)
    assert status == 200 and body == {"sandboxes": []}
    assert time.monotonic() - started < 2


def test_silent_and_slow_clients_are_closed_at_the_header_deadline(gw: Gateway) -> None:
    silent = [connect_from(gw, "127.0.0.2") for _ in range(10)]
    slow = [connect_from(gw, "127.0.0.3") for _ in range(5)]
    started = time.monotonic()
    try:
        for sock in slow:
            sock.sendall(b"GET /v1/sandboxes HTTP/1.1\r\n")
        # A header line every 0.2 s: never complete, never idle.
        while time.monotonic() - started < HEADER_TIMEOUT + 0.5:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")
            legit(gw)
            time.sleep(0.2)
        for sock in silent + slow:
            assert closed_by_peer(sock, HEADER_TIMEOUT + 5)
        assert time.monotonic() - started < HEADER_TIMEOUT + 6
    finally:
        for sock in silent + slow:
            sock.close()
    # A kept-alive client that sent complete requests is not cut at the header deadline.
    conn = connect_from(gw, "127.0.0.4")
    try:
        for _ in range(2):
            conn.sendall(f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.token}\r\n\r\n"
                         .encode())
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT + 0.5)
    finally:
        conn.close()


def test_a_stalled_body_is_closed_and_a_slow_steady_one_is_answered(gw: Gateway) -> None:
    body = b'{"template": "no-such-template"}'.ljust(400)
    head = (f"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    stalled, steady, chunked = (connect_from(gw, "127.0.0.6") for _ in range(3))
    try:
        started = time.monotonic()
        stalled.sendall(head + body[:10])  # and then nothing
        chunked.sendall(head.replace(f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked")
                        + b"a\r\n" + body[:10] + b"\r\n")
        steady.sendall(head)
        # The steady client sends a chunk every 0.25 s, for more than twice the deadline: never stalled.
        for i in range(0, len(body), 40):
            steady.sendall(body[i:i + 40])
            time.sleep(0.25)
        assert closed_by_peer(stalled, 5) and closed_by_peer(chunked, 5)
        assert time.monotonic() - started < BODY_TIMEOUT + 6
        steady.settimeout(10)
        answer = steady.recv(65536)
        assert answer.startswith(b"HTTP/1.1 4") and b"no-such-template" in answer, answer
    finally:
        for sock in (stalled, steady, chunked):
            sock.close()
    legit(gw)
    # Two closed, one line: anyone may stall a body (on routes without auth too), so the line is rate-limited.
    assert gw.log().count("whose request body sent nothing") == 1, gw.log()


def test_one_address_holds_at_most_its_cap_and_others_are_served(gw: Gateway) -> None:
    flood = [connect_from(gw, "127.0.0.5") for _ in range(PER_ADDRESS * 5)]
    try:
        legit(gw)
        refused = sum(closed_by_peer(sock, 0.3) for sock in flood[PER_ADDRESS:])
        assert refused == len(flood) - PER_ADDRESS
        assert not any(closed_by_peer(sock, 0.01) for sock in flood[:PER_ADDRESS // 2])
    finally:
        for sock in flood:
            sock.close()
    # The cap is per address: once they are gone, that address is served again.
    deadline = time.monotonic() + 10
    while True:
        sock = connect_from(gw, "127.0.0.5")
        try:
            sock.sendall(f"GET /v1/sandboxes HTTP/1.0\r\nAuthorization: Bearer {gw.token}\r\n\r\n".encode())
            sock.settimeout(5)
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
        finally:
            sock.close()
        if answer.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert answer.startswith(b"HTTP/1.1 200")


def test_out_of_descriptors_sheds_connections_and_says_so_once() -> None:
    # A gateway whose connections wait long for their headers, and whose descriptor limit is lowered under its
    # feet: neither the caps (1000) nor the deadline hold the flood back, the limit does.
    gw = Gateway(extra_args=["--ServeApp.header_timeout=60", "--ServeApp.max_connections=1000",
                             f"--ServeApp.max_connections_per_address={PER_ADDRESS}", "--log-level=INFO"])
    try:
        flood_until_out_of_descriptors(gw)
    finally:
        gw.stop()


def flood_until_out_of_descriptors(gw: Gateway) -> None:
    soft, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (400, hard))
    rss_before = rss_mib(gw.proc.pid)
    flood: list[socket.socket] = []
    try:
        for i in range(600):
            flood.append(connect_from(gw, f"127.0.1.{1 + i // PER_ADDRESS}"))
        rss_during = rss_mib(gw.proc.pid)
        # Each connection is held (within the limit) or closed at once: the ones shed are readable (EOF) now.
        with selectors.DefaultSelector() as sel:
            for sock in flood:
                sel.register(sock, selectors.EVENT_READ)
            time.sleep(0.2)
            shed = len(sel.select(timeout=0))
        assert shed > 100 and len(flood) - shed > 100, shed
        assert rss_during - rss_before < 64, (rss_before, rss_during)
    finally:
        for sock in flood:
            sock.close()
        resource.prlimit(gw.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    legit(gw)
    log = gw.log()
    assert log.count("out of file descriptors") == 1, log
    assert "Traceback" not in log, log
    # The warm pool, refilling meanwhile, may fail for want of descriptors too: one warning line per try.
    emfile = [line for line in log.splitlines() if "Too many open files" in line]
    assert all(" W " in line or "[W " in line for line in emfile) and all("pool" in line for line in emfile), log
