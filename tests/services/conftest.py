"""Fixtures for the egress proxy tests: HTTP and HTTPS servers on 127.0.0.1 (a CA and certificate made here),
a resolver the test controls, and a kit that starts proxies and speaks to them like a sandbox would.

Everything stays on loopback: test names (``svc.test``...) resolve only through :class:`FakeDNS`, and every
proxy the kit starts has the operator's ``allow_private`` set to ``127.0.0.1/32`` unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import ipaddress
import json
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kernelhub.services.egress.addresses import IPAddress
from kernelhub.services.egress.proxy import EgressService, Refusal, SandboxProxy

#: Names the test servers answer for (all resolve to 127.0.0.1 through FakeDNS).
TEST_NAMES = ("svc.test", "other.test", "api.svc.test", "bad.svc.test", "pypi.test")


def make_certificates(directory: Path, names: Sequence[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``names`` and 127.0.0.1 -> (ca.pem, server.pem, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kernelhub test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


class Hold:
    """Requests to ``/hold`` wait here until :meth:`release`; :meth:`wait_for` waits until N are held."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.held = 0
        self.released = False

    def enter(self) -> None:
        with self.cond:
            self.held += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.released, timeout=60)
            self.held -= 1

    def wait_for(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.held >= count, timeout=30), f"only {self.held} held"

    def release(self) -> None:
        with self.cond:
            self.released = True
            self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.released = False


class Handler(BaseHTTPRequestHandler):
    """``/hello`` -> who was asked (Host); ``/headers`` -> the request headers as JSON; ``/path`` -> the
    request target; ``/bytes?n=N`` -> N bytes; ``POST /echo`` -> the body back (Content-Length or chunked);
    ``/hold`` -> waits on :class:`Hold`."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/hello":
            self._send(f"hello from {self.server.label} as {self.headers.get('Host')}".encode())
        elif url.path == "/headers":
            self._send(json.dumps([[k.lower(), v] for k, v in self.headers.items()]).encode(), "application/json")
        elif url.path == "/path":
            self._send(self.path.encode())
        elif url.path == "/bytes":
            self._send(b"x" * int(parse_qs(url.query)["n"][0]), "application/octet-stream")
        elif url.path == "/hold":
            self.server.hold.enter()
            self._send(b"released")
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = bytearray(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self._send(bytes(body), "application/octet-stream")


class Servers:
    """An HTTP and an HTTPS server on 127.0.0.1, in threads, sharing one :class:`Hold`."""

    def __init__(self, directory: Path) -> None:
        self.ca, cert, key = make_certificates(directory, TEST_NAMES)
        self.hold = Hold()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.https = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.https.socket = ctx.wrap_socket(self.https.socket, server_side=True)
        for server, label in ((self.http, "http"), (self.https, "https")):
            server.daemon_threads = True
            server.label = label  # type: ignore[attr-defined]
            server.hold = self.hold  # type: ignore[attr-defined]
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.http, self.https)]
        for t in self.threads:
            t.start()

    @property
    def http_port(self) -> int:
        return int(self.http.server_address[1])

    @property
    def https_port(self) -> int:
        return int(self.https.server_address[1])

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def close(self) -> None:
        self.hold.release()
        for s in (self.http, self.https):
            s.shutdown()
            s.server_close()


class FakeDNS:
    """The proxy's resolver in tests: a fixed table; every name asked is recorded in ``asked``."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [ipaddress.ip_address(a) for a in self.table[host]]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


async def read_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None = None,
                        parser: h11.Connection | None = None, method: bytes = b"GET") -> Response:
    """One response read with h11 (a client connection that 'sent' ``method`` if no ``parser`` is given)."""
    if parser is None:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
        parser.send(h11.EndOfMessage())
    status, headers, body = 0, {}, bytearray()
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            parser.receive_data(await asyncio.wait_for(reader.read(65536), 30))
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
            headers = {k.decode(): v.decode() for k, v in event.headers}
            if method == b"CONNECT" and 200 <= status < 300:
                return Response(status, headers, b"")
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Response(status, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError("closed before a whole response")


class Kit:
    """Starts proxies (through :class:`EgressService`) and talks to them as a sandbox would."""

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="kh-egress-"))
        self.dns = FakeDNS({})
        self.refusals: list[Refusal] = []
        self.services: list[EgressService] = []
        self._n = 0

    def reset(self) -> None:
        self.dns = FakeDNS({name: ["127.0.0.1"] for name in TEST_NAMES} | {
            "metadata.test": ["169.254.169.254"], "mapped.test": ["::ffff:127.0.0.1"],
            "mixed.test": ["127.0.0.1", "10.1.2.3"], "six.test": ["::1"]})
        self.refusals = []
        self.servers.hold.reset()

    async def start(self, policy: Any, *, path: str | None = None, owner: tuple[int, int] | None = None,
                    log: Callable[[str], Any] | None = None, **config: Any) -> SandboxProxy:
        """A proxy for a new sandbox id with ``policy``, on ``path`` (default: a new socket in the kit's
        directory) owned by ``owner``; refusals are kept in ``refusals`` and their lines passed to ``log``.
        ``config`` sets :class:`EgressService` traits (``allow_private`` defaults to 127.0.0.1/32)."""
        config.setdefault("allow_private", "127.0.0.1/32")
        service = EgressService(resolver=self.dns, **config)
        self.services.append(service)
        self._n += 1

        def on_denied(refusal: Refusal) -> None:
            self.refusals.append(refusal)
            if log is not None:
                log(refusal.log_line())

        return await service.open(f"sb{self._n}", path or str(self.dir / f"p{self._n}.sock"), policy,
                                  owner=owner, on_denied=on_denied)

    read = staticmethod(read_response)

    async def raw(self, proxy: SandboxProxy, data: bytes, method: bytes = b"GET") -> Response:
        """Send ``data`` as is and read one response."""
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        try:
            writer.write(data)
            await writer.drain()
            return await read_response(reader, method=method)
        finally:
            writer.close()

    async def get(self, proxy: SandboxProxy, url: str, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """``GET url`` (absolute http URI) through the proxy."""
        host = urlsplit(url).netloc
        head = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        return await self.raw(proxy, (head + "\r\n").encode())

    async def connect(self, proxy: SandboxProxy, target: str) -> tuple[Response, asyncio.StreamReader,
                                                                       asyncio.StreamWriter]:
        """``CONNECT target``: the proxy's answer and the open streams (closed by the caller)."""
        reader, writer = await asyncio.open_unix_connection(proxy.socket_path)
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        await writer.drain()
        return await read_response(reader, method=b"CONNECT"), reader, writer

    async def https_get(self, proxy: SandboxProxy, target: str, path: str = "/hello",
                        sni: str | None = "", context: ssl.SSLContext | None = None) -> Response:
        """A TLS request through ``CONNECT target`` with ``sni`` (default: the target's host; ``None``: no
        SNI, certificate names not checked). Raises ``ConnectionError``/``ssl.SSLError`` when the tunnel is
        cut."""
        answer, reader, writer = await self.connect(proxy, target)
        try:
            if answer.status != 200:
                return answer
            host = target.rsplit(":", 1)[0].strip("[]")
            ctx = context or self.servers.client_context()
            if sni is None:
                ctx.check_hostname = False
            await writer.start_tls(ctx, server_hostname=host if sni == "" else sni)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            return await read_response(reader)
        finally:
            writer.close()

    async def aclose(self) -> None:
        for service in self.services:
            await service.close_all()
        self.services = []

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def egress_servers() -> Iterator[Servers]:
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="kh-egress-srv-"))
    servers = Servers(directory)
    yield servers
    servers.close()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def egress(egress_servers: Servers, runner: asyncio.Runner) -> Iterator[Kit]:
    """A :class:`Kit` for one test: fresh resolver table and refusal list; its proxies stop afterwards.

    A safety net on the loop: any connection the proxy tries to an address other than 127.0.0.1 fails with
    ENETUNREACH before a packet is sent, and fails the test (tests never reach beyond this machine)."""
    kit = Kit(egress_servers)
    kit.reset()
    loop = runner.get_loop()
    real_connect = loop.sock_connect
    strays: list[Any] = []

    async def loopback_only(sock: socket.socket, address: Any) -> None:
        if isinstance(address, tuple) and address[0] != "127.0.0.1":
            strays.append(address)
            raise OSError(errno.ENETUNREACH, "tests connect to 127.0.0.1 only")
        await real_connect(sock, address)

    loop.sock_connect = loopback_only  # type: ignore[method-assign]
    try:
        yield kit
        runner.run(kit.aclose())
    finally:
        del loop.sock_connect
        kit.cleanup()
    assert strays == [], f"the proxy tried to connect beyond loopback: {strays}"
