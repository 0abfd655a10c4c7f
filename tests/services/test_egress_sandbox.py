"""Egress from inside a real sandbox (bubblewrap, its own network namespace with only loopback), wired by hand
the way the integration will wire it: the proxy's socket in the sandbox's run directory (``/run/kernelhub``
inside), the forwarder started through the agent on the sandbox's Python, the proxy variables set.

Hostile cases run as the sandbox's own code: a raw socket that ignores the proxy, name lookups, the proxy's
unix socket used directly for what the policy forbids, a TLS name other than the CONNECT host, a flood.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelhub.sandbox import egress_forwarder
from kernelhub.sandbox.egress_forwarder import INNER_SOCKET, proxy_env
from kernelhub.sandbox.sandbox import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups, pytest.mark.timeout(180)]
ENV = proxy_env("127.0.0.1:3128")
CA = "/run/kernelhub/test-ca.pem"


@pytest.fixture(scope="module")
def sandbox(runner: asyncio.Runner, factory: Any, egress_servers: Any) -> Iterator[Sandbox]:
    """A sandbox with the forwarder running inside on 127.0.0.1:3128 (each test starts its own proxy)."""
    sb = runner.run(factory.create())
    try:
        # The run directory is the sandbox's /run/kernelhub (root's, read-only to the sandbox).
        for source, name in ((Path(egress_forwarder.__file__), "egress_forwarder.py"),
                             (egress_servers.ca, "test-ca.pem")):
            shutil.copyfile(source, sb.run_dir / name)
            os.chmod(sb.run_dir / name, 0o644)
        runner.run(start_forwarder(sb))
        yield sb
    finally:
        runner.run(sb.stop())


async def start_forwarder(sb: Sandbox) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    err = sb.log_pipe("egress-forwarder: ")
    try:
        await sb.spawn([sb.factory.agent_python, "-I", "-S", "-B", "/run/kernelhub/egress_forwarder.py",
                        "--listen", "127.0.0.1:3128", "--socket", INNER_SOCKET], stdin=devnull, stdout=w,
                       stderr=err)
    finally:
        os.close(w)
        os.close(err)
        os.close(devnull)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(os.read, r, 200), 60)
    finally:
        os.close(r)
    assert line == b"listening 127.0.0.1:3128\n", line


async def open_proxy(egress: Any, sb: Sandbox, policy: Any, **config: Any) -> Any:
    return await egress.start(policy, path=str(sb.run_dir / "egress.sock"), owner=(sb.uid, sb.gid), log=sb.log,
                              **config)


def test_policy_inside_the_sandbox(egress: Any, runner: asyncio.Runner, sandbox: Sandbox, sh: Any) -> None:
    s = egress.servers

    async def go() -> None:
        proxy = await open_proxy(egress, sandbox, {"allow": ["svc.test"]})
        code, out = await sh(sandbox, f"curl -sS --max-time 30 http://svc.test:{s.http_port}/hello", env=ENV)
        assert (code, out) == (0, f"hello from http as svc.test:{s.http_port}")
        code, out = await sh(sandbox, f"curl -sS --max-time 30 --cacert {CA} https://svc.test:{s.https_port}/hello",
                             env=ENV)
        assert (code, out) == (0, f"hello from https as svc.test:{s.https_port}")
        code, out = await sh(sandbox, f"curl -sS --max-time 30 http://other.test:{s.http_port}/hello", env=ENV)
        assert (code, out) == (0, f"egress denied: other.test:{s.http_port} matches no allow entry of the "
                                  "sandbox's network policy.\n")
        assert any("egress denied: GET http://other.test" in line for line in sandbox.logs(20))
        # PATCH-like: a new policy applies to the next connection.
        egress.services[-1].set_policy(proxy.sandbox_id, {"allow": ["other.test"]})
        code, out = await sh(sandbox, f"curl -sS --max-time 30 --cacert {CA} https://other.test:{s.https_port}/hello",
                             env=ENV)
        assert (code, out) == (0, f"hello from https as other.test:{s.https_port}")
        code, out = await sh(sandbox, f"curl -sS --max-time 30 --cacert {CA} https://svc.test:{s.https_port}/hello",
                             env=ENV)
        assert code != 0 and "403" in out
        assert proxy.metrics()["net_rx_bytes"] > 0 and proxy.metrics()["net_tx_bytes"] > 0

    runner.run(go())


#: Hostile code for a sandbox with the forwarder on 127.0.0.1:3128: ``python -c HOSTILE HTTP_PORT HTTPS_PORT CA
#: TARGETS`` where TARGETS is a JSON list of ``[name, "host:port"]`` to CONNECT to through the proxy's own socket;
#: prints a JSON object of each attempt's first answer line and body, or the exception's name. Also used by
#: tests/handlers/test_egress.py.
HOSTILE = r"""
import json, socket, ssl, sys
port, tls_port, ca, targets = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
out = {}
def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as exc:
        out[name] = type(exc).__name__
# A raw socket that ignores the proxy: the host's servers are not in this network namespace.
attempt("raw", lambda: socket.create_connection(("127.0.0.1", port), timeout=5) and "connected")
attempt("dns", lambda: socket.getaddrinfo("svc.test", 80))
attempt("routes", lambda: open("/proc/net/route").read().splitlines()[1:])
def via_socket(request):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect("/run/kernelhub/egress.sock")
    s.sendall(request)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data.split(b"\r\n")[0].decode() + " | " + data.split(b"\r\n\r\n", 1)[1].decode().strip()
# The proxy's own socket, used directly, for what the policy forbids.
for name, target in targets:
    attempt(name, lambda t=target: via_socket(b"CONNECT " + t.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
# A tunnel to an allowed host that names another in its TLS ClientHello.
def fronted():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(b"CONNECT svc.test:%d HTTP/1.1\r\nHost: svc.test\r\n\r\n" % tls_port)
    head = s.recv(4096)
    ctx = ssl.create_default_context(cafile=ca)
    try:
        ctx.wrap_socket(s, server_hostname="other.test")
    except (OSError, ssl.SSLError) as exc:
        return head.split(b"\r\n")[0].decode() + " then closed"
    return "handshake completed"
attempt("fronted", fronted)
print(json.dumps(out))
"""


def test_hostile_code_inside_the_sandbox(egress: Any, runner: asyncio.Runner, sandbox: Sandbox, sh: Any) -> None:
    s = egress.servers

    async def go() -> None:
        await open_proxy(egress, sandbox, {"allow": ["svc.test"]})
        targets = [["metadata", "169.254.169.254:80"], ["loopback6", f"[::1]:{s.http_port}"],
                   ["decimal", f"2130706433:{s.http_port}"], ["mapped", "[::ffff:a9fe:a9fe]:80"],
                   ["other", f"other.test:{s.https_port}"]]
        code, out = await sh(sandbox, "", argv=[sandbox.factory.agent_python, "-I", "-c", HOSTILE,
                                                str(s.http_port), str(s.https_port), CA, json.dumps(targets)])
        assert code == 0, out
        got = json.loads(out)
        assert got["raw"] == "ConnectionRefusedError"
        assert got["dns"] == "gaierror"
        assert got["routes"] == []
        assert got["metadata"] == "HTTP/1.1 403 Forbidden | egress denied: 169.254.169.254 is the cloud metadata " \
                                  "address, which no network policy opens."
        assert got["loopback6"] == "HTTP/1.1 403 Forbidden | egress denied: ::1 is a loopback address, which no " \
                                   "network policy opens."
        assert got["decimal"] == f"HTTP/1.1 403 Forbidden | egress denied: 127.0.0.1:{s.http_port} matches no " \
                                 "allow entry of the sandbox's network policy."
        assert got["mapped"].startswith("HTTP/1.1 403 Forbidden | egress denied: 169.254.169.254 is the cloud")
        assert got["other"].startswith("HTTP/1.1 403 Forbidden | egress denied: other.test:")
        assert got["fronted"] == "HTTP/1.1 200 Connection established then closed"
        assert egress.dns.asked == ["svc.test"]  # nothing the policy refuses was even looked up
        assert any("names other.test, not svc.test" in line for line in sandbox.logs(30))

    runner.run(go())


FLOOD = r"""
import socket, sys, threading
port, count, held = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
results = []
done = threading.Condition()
def one():
    s = socket.create_connection(("127.0.0.1", 3128), timeout=60)
    s.sendall(b"GET http://svc.test:%d/hold HTTP/1.1\r\nHost: svc.test\r\nConnection: close\r\n\r\n" % port)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    with done:
        results.append(data.split(b" ")[1].decode())
        done.notify()
threads = [threading.Thread(target=one) for _ in range(count)]
for t in threads:
    t.start()
with done:
    done.wait_for(lambda: len(results) >= count - held)
print("turned away:", sorted(results), flush=True)
for t in threads:
    t.join()
print("all:", sorted(results), flush=True)
"""


async def spawn_lines(sb: Sandbox, argv: list[str]) -> tuple[Any, asyncio.StreamReader]:
    """Start ``argv`` in the sandbox with its stdout on a pipe read line by line here (to its end, which
    closes the pipe)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        proc = await sb.spawn(argv, stdin=devnull, stdout=w, stderr=w)
    finally:
        os.close(w)
        os.close(devnull)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", buffering=0))
    return proc, reader


def test_a_flood_from_inside_is_bounded(egress: Any, runner: asyncio.Runner, sandbox: Sandbox) -> None:
    s = egress.servers

    async def go() -> None:
        await open_proxy(egress, sandbox, {"allow": ["svc.test"]}, max_connections=8)
        proc, lines = await spawn_lines(sandbox, [sandbox.factory.agent_python, "-I", "-c", FLOOD,
                                                     str(s.http_port), "30", "8"])
        # 22 connections answered 503 at once while 8 wait at the server: the sandbox never has more open.
        first = await asyncio.wait_for(lines.readline(), 60)
        assert first == f"turned away: {sorted(['503'] * 22)}\n".encode()
        await asyncio.to_thread(s.hold.wait_for, 8)
        assert s.hold.held == 8
        s.hold.release()
        last = await asyncio.wait_for(lines.readline(), 60)
        assert last == f"all: {sorted(['200'] * 8 + ['503'] * 22)}\n".encode()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert await asyncio.wait_for(lines.read(), 60) == b""
        reports = [line for line in sandbox.logs(50) if "egress connections open, its limit" in line]
        assert 1 <= len(reports) < 22  # reported, but not once per connection

    runner.run(go())
