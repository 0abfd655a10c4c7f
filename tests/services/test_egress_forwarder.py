"""The in-sandbox forwarder (``kernelhub/sandbox/egress_forwarder.py``) run standalone, as the sandbox layer
will run it (``python -I -S -B``, standard library only), in front of a real proxy; real clients through it
(curl, urllib with :func:`proxy_env`, pip against a local package index over HTTP and HTTPS).

Everything stays on 127.0.0.1: test names resolve through the test's resolver, inside the proxy only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import os
import re
import ssl
import subprocess
import sys
import threading
import zipfile
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kernelhub.sandbox import egress_forwarder
from kernelhub.sandbox.egress_forwarder import proxy_env
from kernelhub.services.egress.proxy import SandboxProxy

pytestmark = pytest.mark.timeout(120)
FORWARDER = Path(egress_forwarder.__file__)


@contextlib.asynccontextmanager
async def forwarder(socket_path: str) -> AsyncIterator[str]:
    """Run the forwarder on a free loopback port in front of ``socket_path``; yields ``127.0.0.1:PORT``."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-B", str(FORWARDER), "--listen", "127.0.0.1:0", "--socket", socket_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.fullmatch(r"listening (127\.0\.0\.1:\d+)\n", line)
        assert match, line
        yield match.group(1)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def run(*argv: str, env: Mapping[str, str] | None = None, timeout: float = 90) -> tuple[int, str]:
    """Run a client; answer its exit status and output. Proxy, CA-bundle and pip variables of this machine are
    dropped (``REQUESTS_CA_BUNDLE`` would override pip's ``--cert``); proxy variables come only from ``env``."""
    dropped = ("proxy", "ca_bundle", "ssl_cert", "pip_")
    base = {k: v for k, v in os.environ.items() if not any(d in k.lower() for d in dropped)}
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                env=base | dict(env or {}))
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def test_proxy_env_names_both_spellings() -> None:
    assert proxy_env("127.0.0.1:3128") == {
        "HTTP_PROXY": "http://127.0.0.1:3128", "http_proxy": "http://127.0.0.1:3128",
        "HTTPS_PROXY": "http://127.0.0.1:3128", "https_proxy": "http://127.0.0.1:3128",
        "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}
    # Standard library only: it runs on the kernels' runtime with -I -S.
    imports = set(re.findall(r"^import (\w+)", FORWARDER.read_text(), re.M))
    assert imports <= {"argparse", "selectors", "socket", "sys", "time"}, imports


def test_clients_reach_the_proxy_through_the_forwarder(egress: Any, runner: asyncio.Runner) -> None:
    s = egress.servers

    async def go() -> None:
        proxy: SandboxProxy = await egress.start({"allow": ["svc.test", "metadata.test"]})
        async with forwarder(proxy.socket_path) as listen:
            env = proxy_env(listen)
            code, out = await run("curl", "-sS", "--max-time", "30", f"http://svc.test:{s.http_port}/hello",
                                  env=env)
            assert (code, out) == (0, f"hello from http as svc.test:{s.http_port}")
            code, out = await run("curl", "-sS", "--max-time", "30", "--cacert", str(s.ca),
                                  f"https://svc.test:{s.https_port}/hello", env=env)
            assert (code, out) == (0, f"hello from https as svc.test:{s.https_port}")
            code, out = await run("curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://other.test:{s.http_port}/hello", env=env)
            assert (code, out) == (0, "403")
            code, out = await run("curl", "-sS", "--max-time", "30", "--cacert", str(s.ca),
                                  f"https://other.test:{s.https_port}/hello", env=env)
            assert code != 0 and "403" in out
            fetch = ("import sys, urllib.request, urllib.error\n"
                     "try:\n print(urllib.request.urlopen(sys.argv[1], timeout=30).read().decode())\n"
                     "except urllib.error.HTTPError as e:\n print(e.code, e.read().decode().strip())\n")
            code, out = await run(sys.executable, "-I", "-c", fetch, f"http://svc.test:{s.http_port}/hello",
                                  env=env)
            assert (code, out) == (0, f"hello from http as svc.test:{s.http_port}\n")
            code, out = await run(sys.executable, "-I", "-c", fetch, f"http://metadata.test:{s.http_port}/",
                                  env=env)
            assert out == ("403 egress denied: metadata.test resolves to 169.254.169.254, the cloud metadata "
                           "address, which no network policy opens.\n")
            # NO_PROXY keeps loopback direct: the sandbox's own servers are not sent to the proxy.
            code, out = await run("curl", "-sS", "--max-time", "30", f"http://127.0.0.1:{s.http_port}/hello",
                                  env=env)
            assert (code, out) == (0, f"hello from http as 127.0.0.1:{s.http_port}")
        assert proxy.rx_bytes > 0 and proxy.tx_bytes > 0
        assert [r.target for r in egress.refusals] == [
            f"http://other.test:{s.http_port}/hello", f"other.test:{s.https_port}",
            f"http://metadata.test:{s.http_port}/"]

    runner.run(go())


def test_without_a_proxy_the_forwarder_answers_502(egress: Any, runner: asyncio.Runner) -> None:
    async def go() -> None:
        async with forwarder(str(egress.dir / "missing.sock")) as listen:
            code, out = await run("curl", "-sS", "--max-time", "30", "http://svc.test/",
                                  env=proxy_env(listen))
        assert (code, out) == (0, "The sandbox's egress proxy is not reachable (No such file or directory).\n")

    runner.run(go())


def test_half_closed_streams_are_relayed(egress: Any, runner: asyncio.Runner) -> None:
    # A client that sends its request and shuts its side down still gets the whole answer.
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        async with forwarder(proxy.socket_path) as listen:
            host, port = listen.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET http://svc.test:{s.http_port}/bytes?n=300000 HTTP/1.1\r\nHost: svc.test\r\n"
                         "Connection: close\r\n\r\n".encode())
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 30)
            writer.close()
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\n" + b"x" * 300000)

    runner.run(go())


def test_a_refusal_reaches_a_client_still_sending(egress: Any, runner: asyncio.Runner) -> None:
    # The proxy refuses on the request head and closes without reading the body; the forwarder must pass the
    # answer on, and not reset the client's connection while the client is still sending.
    s = egress.servers

    async def go() -> None:
        proxy = await egress.start({"allow": ["svc.test"]})
        async with forwarder(proxy.socket_path) as listen:
            host, port = listen.split(":")
            for target in (f"http://other.test:{s.http_port}/echo", f"http://svc.test:{s.http_port}/echo"):
                reader, writer = await asyncio.open_connection(host, int(port))
                body = b"z" * 4_000_000
                writer.write(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                             "Connection: close\r\n\r\n".encode())
                sending = asyncio.ensure_future(writer.drain())
                writer.write(body)
                answer = await asyncio.wait_for(reader.read(), 60)
                writer.close()
                sending.cancel()
                if "other.test" in target:
                    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
                    assert answer.endswith(b"egress denied: other.test:%d matches no allow entry of the "
                                           b"sandbox's network policy.\n" % s.http_port)
                else:
                    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n" + body)

    runner.run(go())


# -- pip --------------------------------------------------------------------------------------------------------

def build_index(root: Path) -> str:
    """A package index with one tiny pure-Python wheel (made here, with its RECORD); returns its name."""
    name, version = "kh_egress_probe", "0.1"
    wheel = root / "packages" / f"{name}-{version}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    files = {
        f"{name}/__init__.py": b"ANSWER = 42\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: kernelhub-tests\nRoot-Is-Purelib: "
                                             b"true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{name}-{version}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{name}-{version}.dist-info/RECORD", record)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    project = root / "simple" / name.replace("_", "-")
    project.mkdir(parents=True)
    (project / "index.html").write_text(
        f'<html><body><a href="../../packages/{wheel.name}#sha256={sha}">{wheel.name}</a></body></html>\n')
    return name


@contextlib.asynccontextmanager
async def http_index(root: Path) -> AsyncIterator[int]:
    """``python -m http.server`` over ``root`` on a free loopback port; yields the port."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.search(r"port (\d+)", line)
        assert match, line
        yield int(match.group(1))
    finally:
        proc.terminate()
        await proc.wait()


def test_pip_installs_through_the_proxy(egress: Any, runner: asyncio.Runner, tmp_path: Path) -> None:
    root = tmp_path / "index"
    name = build_index(root)
    s = egress.servers
    pip = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "--no-cache-dir",
           "--no-input", "--retries", "0", "--timeout", "30"]
    tls_server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(http.server.SimpleHTTPRequestHandler, directory=str(root)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(s.ca.with_name("server.pem"), s.ca.with_name("server.key"))
    tls_server.socket = ctx.wrap_socket(tls_server.socket, server_side=True)
    tls_thread = threading.Thread(target=tls_server.serve_forever, daemon=True)
    tls_thread.start()
    tls_port = tls_server.server_address[1]

    async def go() -> None:
        proxy = await egress.start({"allow": ["pypi.test"]})
        async with http_index(root) as port, forwarder(proxy.socket_path) as listen:
            via = ["--proxy", f"http://{listen}"]
            code, out = await run(*pip, "download", "--no-deps", "-d", str(tmp_path / "dl"), *via,
                                  "--trusted-host", "pypi.test", "--index-url", f"http://pypi.test:{port}/simple/",
                                  name)
            assert code == 0, out
            assert [p.name for p in (tmp_path / "dl").iterdir()] == [f"{name}-0.1-py3-none-any.whl"]
            code, out = await run(*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), *via,
                                  "--cert", str(s.ca), "--index-url", f"https://pypi.test:{tls_port}/simple/", name)
            assert code == 0, out
            code, out = await run(sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, sys.argv[1]); "
                                  f"import {name}; print({name}.ANSWER)", str(tmp_path / "site"))
            assert (code, out) == (0, "42\n")
            assert proxy.rx_bytes > 1000
            # The same index under a policy that does not list it: pip fails, the proxy says why.
            egress.services[0].set_policy(proxy.sandbox_id, {"allow": ["files.pypi.test"]})
            code, out = await run(*pip, "download", "--no-deps", "-d", str(tmp_path / "dl2"), *via,
                                  "--trusted-host", "pypi.test", "--index-url", f"http://pypi.test:{port}/simple/",
                                  name)
            assert code != 0
            assert any(r.reason == f"pypi.test:{port} matches no allow entry of the sandbox's network policy."
                       for r in egress.refusals)
            assert all("egress denied" in r.log_line() for r in egress.refusals)

    try:
        runner.run(go())
    finally:
        tls_server.shutdown()
        tls_server.server_close()
