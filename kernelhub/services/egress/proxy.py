"""The egress proxy: one HTTP/1.1 forward proxy per sandbox, on a unix socket bound into the sandbox.

A sandbox has no network of its own (only its loopback). Its one way out is this proxy's socket, which the
sandbox layer binds into it and offers on a loopback port (:mod:`kernelhub.sandbox.egress_forwarder`), with
``HTTP(S)_PROXY`` pointing there. The proxy, on the gateway's side, speaks:

- ``CONNECT host:port`` (what clients do for ``https://``): the destination is judged, connected, answered
  ``200``, and the tunnel's first bytes must be a TLS ClientHello whose SNI names the same host
  (:mod:`.tls`); otherwise the tunnel is closed before a byte is forwarded;
- absolute-URI requests (``GET http://host/path``): judged, forwarded over a fresh upstream connection with
  hop-by-hop and ``Proxy-*`` headers removed and ``Host`` taken from the URL; the sandbox's side may keep its
  connection alive for further requests, each judged anew.

HTTP is parsed and written by ``h11`` (sans-IO, the parser under httpcore/httpx): its state machine handles
framing (Content-Length, chunked, close-delimited, HEAD, 1xx, HTTP/1.0 peers, CONNECT's switch to a raw
tunnel) and bounds header sizes, which hand-written parsing gets wrong in exactly the places an attacker
probes (request smuggling through conflicting lengths, header folding, bare LF).

The proxy resolves names itself (a :data:`Resolver`, replaceable by tests), judges every resolved address
(:func:`~.policy.decide`) and connects only to those addresses: no second lookup, so no DNS rebinding window.
Per sandbox it bounds concurrent connections and the rate of new ones, times out connects, slow request
heads and idle tunnels, counts bytes to and from the network, reports every refusal to a callback, and takes
a new policy at once (:meth:`SandboxProxy.set_policy`), cutting live connections the new policy refuses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import http
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import h11
from traitlets import Dict, Float, Integer, TraitError, Unicode, validate
from traitlets.config import LoggingConfigurable

from ...errors import Conflict, SandboxError
from ...sandbox.egress_forwarder import plain_response
from ..packages import prepare_npm
from .addresses import IPAddress, IPNetwork, parse_host, parse_networks, unwrap
from .policy import NetworkPolicy, Target, check_target, decide, parse_policy, parse_target
from .tls import ClientHelloBuffer, NotClientHello

if TYPE_CHECKING:
    from ...sandbox.sandbox import Sandbox

log = logging.getLogger("kernelhub.egress")

#: ``await resolver(host, port)`` -> the addresses ``host`` resolves to (raises ``OSError`` when it does not).
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

#: Largest request head from a sandbox and response head from a server (h11 refuses larger ones).
MAX_REQUEST_HEAD = 16 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
_CHUNK = 64 * 1024
#: Refusals of one sandbox passed on to :attr:`EgressService.on_refusal` (the audit log): this many at once, then
#: this many a second; the sandbox log has every one.
AUDIT_BURST = 50
AUDIT_RATE = 1.0
#: Unix socket paths are limited to 108 bytes with the NUL (sun_path).
MAX_SOCKET_PATH = 107
#: Headers for one hop only (RFC 9110 7.6.1), and ``Expect`` (the proxy answers ``100 Continue`` itself).
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"expect", b"host"})


async def system_resolver(host: str, port: int, executor: concurrent.futures.Executor | None = None
                          ) -> list[IPAddress]:
    """The host's resolver (``getaddrinfo`` in a thread of ``executor``, by default the loop's), every distinct
    address in its order."""
    infos = await asyncio.get_running_loop().run_in_executor(executor, functools.partial(
        socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
    out: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


@dataclasses.dataclass(frozen=True)
class Refusal:
    """One refused request or tunnel, as the ``on_denied`` callback gets it.

    ``status`` is what the sandbox was answered (403 policy, 400 malformed, 429 rate, 503 too many
    connections; for a tunnel cut after its ``200``, 403), ``reason`` the sentence it was given."""

    sandbox_id: str
    method: str
    target: str
    status: int
    reason: str

    def log_line(self) -> str:
        """The line for the sandbox log (contains ``egress denied``, as API.md promises)."""
        asked = f"{self.method} {self.target}: " if self.method else ""
        return f"egress denied: {asked}{self.reason}"


@dataclasses.dataclass(frozen=True)
class ProxyLimits:
    """Per-sandbox bounds. Times in seconds; ``rate`` new connections per second after a ``burst``."""

    max_connections: int = 64
    rate: float = 20.0
    burst: int = 100
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    idle_timeout: float = 300.0
    max_lookups: int = 4


class RefusalBudget:
    """How many of a sandbox's refusals go to the audit log: ``burst`` at once, then ``rate`` a second. The log is
    durable and hash-chained: a sandbox refused in a loop (20 a second, its connection rate) must not grow it by
    millions of entries a day; its own log (``sandbox_logs``, bounded) has every one."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = float(burst)
        self.rate = rate
        self.clock = clock
        self.tokens = self.burst
        self.at = clock()
        self.left_out = 0

    def take(self) -> int | None:
        """For one refusal: ``None`` if it is left out, else how many were left out since the last one kept."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            self.left_out += 1
            return None
        self.tokens -= 1
        left_out, self.left_out = self.left_out, 0
        return left_out


class _Reply(Exception):
    """An answer instead of a forwarded response: ``status`` and a sentence; ``refusal`` ones are reported."""

    def __init__(self, status: int, reason: str, *, refusal: bool = False, reported: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.refusal = refusal
        self.reported = reported


class _Conn:
    """One connection from the sandbox: its task, and what it reaches once judged (for live policy cuts)."""

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.method = ""
        self.asked = ""
        self.target: Target | None = None
        self.addresses: Sequence[IPAddress] = ()
        self.last = time.monotonic()
        self.cut: str | None = None
        #: Ended because nothing moved for a timeout: closed at once (see :meth:`SandboxProxy._accept`).
        self.stalled = False


def _end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without hop-by-hop ones, those ``Connection`` names, ``Proxy-*`` and ``Host``; and without
    ``Content-Length`` when the message came with a ``Transfer-Encoding``.

    h11 frames such a message by its chunks and ignores the length (RFC 9112 6.3), and so must the next hop:
    passing both on would let the sandbox smuggle a second request, with a ``Host`` of its choosing, to a
    server that reads the length instead (CL.TE), and would frame a response by a length its body does not
    have. The RFC's rule for an intermediary: remove the ``Content-Length`` before forwarding."""
    named = {token.strip().lower() for name, value in headers if name == b"connection"
             for token in value.split(b",")}
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    return [(name, value) for name, value in headers
            if name not in _HOP_BY_HOP and name not in named and not name.startswith(b"proxy-")
            and not (chunked and name == b"content-length")]


def _sni_problem(target: Target, server_name: str | None) -> str | None:
    """Why a ClientHello naming ``server_name`` may not go to ``target`` (``None``: it may)."""
    if server_name is None:
        if target.ip is not None:
            return None  # clients send no SNI for an address; the address itself was judged
        return f"the TLS ClientHello names no server (SNI), so the tunnel to {target} cannot be checked."
    try:
        host, _ip = parse_host(server_name)
    except ValueError:
        return f"the TLS ClientHello names {server_name[:80]!r}, which is not a valid host name."
    if host != target.host:
        return f"the TLS ClientHello names {host}, not {target.host} that the CONNECT asked for."
    return None


class SandboxProxy:
    """The egress proxy of one sandbox, listening on ``socket_path``. Created by :class:`EgressService`.

    ``on_denied`` is called (synchronously, exceptions logged and dropped) with a :class:`Refusal` for every
    refusal. ``rx_bytes``/``tx_bytes`` count bytes received from and sent to the network for this sandbox."""

    def __init__(self, sandbox_id: str, socket_path: str, policy: NetworkPolicy, *,
                 allow_private: Sequence[IPNetwork] = (), resolver: Resolver = system_resolver,
                 limits: ProxyLimits | None = None, on_denied: Callable[[Refusal], Any] | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.socket_path = socket_path
        self.allow_private = tuple(allow_private)
        self.resolver = resolver
        self.limits = limits or ProxyLimits()
        self.on_denied = on_denied
        self.rx_bytes = 0
        self.tx_bytes = 0
        self._policy = policy
        self._conns: set[_Conn] = set()
        #: Name lookups of this sandbox in flight, held until the lookup itself ends (see :meth:`_resolve`).
        self._lookups = asyncio.Semaphore(max(1, self.limits.max_lookups))
        self._tokens = float(self.limits.burst)
        self._refilled = time.monotonic()
        self._server: asyncio.AbstractServer | None = None
        self._closed = False
        self._turned_reported: dict[int, float] = {}
        self._turned_quiet: dict[int, int] = {}

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, owner: tuple[int, int] | None = None) -> None:
        """Listen on ``socket_path`` (mode 0600, owned by ``owner`` ``(uid, gid)`` when given: the sandbox's
        host uid, so that only it may connect). Raises :class:`~kernelhub.errors.SandboxError` if the path is
        too long for a unix socket or cannot be bound."""
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise SandboxError(f"The egress socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} "
                               "bytes; choose a shorter state directory.")
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=self.socket_path)
            os.chmod(self.socket_path, 0o600)
            if owner is not None:
                os.chown(self.socket_path, *owner)
        except OSError as exc:
            await self.close()
            raise SandboxError(f"Could not listen on the egress socket {self.socket_path}: {exc}") from exc

    async def close(self) -> None:
        """Stop listening, cut every connection and remove the socket. Idempotent."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self._conns if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    # -- policy and metrics ------------------------------------------------------------------------------------

    @property
    def policy(self) -> NetworkPolicy:
        return self._policy

    def set_policy(self, policy: NetworkPolicy) -> None:
        """Judge every later request by ``policy``, and cut open tunnels and requests it refuses (reported
        to ``on_denied`` like any refusal). Called by the service on ``PATCH`` of the sandbox's network."""
        self._policy = policy
        for conn in list(self._conns):
            if conn.target is None or conn.task is None or conn.cut is not None:
                continue
            verdict = decide(policy, conn.target, conn.addresses, self.allow_private)
            if not verdict.allowed:
                conn.cut = verdict.reason
                self._report(conn, 403, f"cut by a policy change: {verdict.reason}")
                conn.task.cancel()

    def metrics(self) -> dict[str, int]:
        """``{"net_rx_bytes", "net_tx_bytes"}``: bytes from and to the network so far (payload and forwarded
        HTTP heads, not the proxy's own answers)."""
        return {"net_rx_bytes": self.rx_bytes, "net_tx_bytes": self.tx_bytes}

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    # -- connections -----------------------------------------------------------------------------------------

    def _report(self, conn: _Conn, status: int, reason: str) -> None:
        refusal = Refusal(self.sandbox_id, conn.method, conn.asked[:200], status, reason)
        log.info("sandbox %s: %s", self.sandbox_id, refusal.log_line())
        if self.on_denied is not None:
            try:
                self.on_denied(refusal)
            except Exception:
                log.exception("the egress refusal callback failed")

    def _report_turned_away(self, conn: _Conn, status: int, reason: str) -> None:
        """Report a connection turned away by a bound, at most once a second per status: a flood must not
        become a flood of log and audit lines. The next report counts the ones left out."""
        now = time.monotonic()
        if now - self._turned_reported.get(status, -1e9) < 1.0:
            self._turned_quiet[status] = self._turned_quiet.get(status, 0) + 1
            return
        self._turned_reported[status] = now
        quiet = self._turned_quiet.pop(status, 0)
        if quiet:
            reason += f" ({quiet} more connections were turned away since the last report.)"
        self._report(conn, status, reason)

    def _rate_reason(self) -> str:
        return f"The sandbox opens egress connections faster than {self.limits.rate:g} per second; retry later."

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(float(self.limits.burst), self._tokens + (now - self._refilled) * self.limits.rate)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(asyncio.current_task())
        turned_away: tuple[int, str] | None = None
        if self._closed:
            turned_away = (503, "The sandbox's egress proxy is shutting down.")
        elif len(self._conns) >= self.limits.max_connections:
            turned_away = (503, f"The sandbox already has {self.limits.max_connections} egress connections "
                                "open, its limit; close some and retry.")
        elif not self._take_token():
            turned_away = (429, self._rate_reason())
        if turned_away is not None:
            self._report_turned_away(conn, *turned_away)
            status, reason = turned_away
            writer.write(plain_response(status, http.HTTPStatus(status).phrase, f"egress denied: {reason}\n"))
            writer.close()
            return
        self._conns.add(conn)
        try:
            await self._serve(conn, reader, writer)
        except asyncio.CancelledError:
            if conn.cut is None:
                raise
        except TimeoutError:
            conn.stalled = True
        except (ConnectionError, h11.ProtocolError):
            pass  # the sandbox or the server went away mid-stream; nothing to answer
        except Exception:
            log.exception("egress proxy of sandbox %s: unexpected error", self.sandbox_id)
        finally:
            self._conns.discard(conn)
            if conn.cut is not None or conn.stalled:
                # Not close(), which waits to write what is buffered: a sandbox that stopped reading would
                # keep the descriptor open, out of the connection count, for as long as it liked.
                writer.transport.abort()
            else:
                writer.close()

    async def _serve(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests of one connection from the sandbox, until it closes or a tunnel takes it over."""
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        first = True
        while True:
            try:
                event = await self._request_head(client, reader, first)
            except h11.RemoteProtocolError as exc:
                reply = _Reply(exc.error_status_hint, f"The request is malformed: {exc}.", refusal=True)
                await self._answer(conn, client, writer, reply)
                return
            except TimeoutError:
                return
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                return
            conn.method = event.method.decode("ascii", "replace")
            conn.asked = event.target.decode("ascii", "replace")  # h11 refuses targets that are not ASCII
            try:
                if not first and not self._take_token():
                    # Each request is a new connection upstream (and a lookup): kept alive, one connection from
                    # the sandbox would otherwise open them as fast as the servers answer, past the rate.
                    reason = self._rate_reason()
                    self._report_turned_away(conn, 429, reason)
                    raise _Reply(429, reason, refusal=True, reported=True)
                if event.method == b"CONNECT":
                    await self._tunnel(conn, client, reader, writer)
                    return
                if not await self._forward(conn, client, event, reader, writer):
                    return
            except _Reply as reply:
                await self._answer(conn, client, writer, reply)
                return
            if client.our_state is not h11.DONE or client.their_state is not h11.DONE:
                return
            client.start_next_cycle()
            conn.target, conn.addresses = None, ()
            first = False

    async def _request_head(self, client: h11.Connection, reader: asyncio.StreamReader, first: bool) -> Any:
        """The next request head from the sandbox (or what else h11 makes of its bytes), whole within the
        handshake timeout: of the connection's start for its first request, of the request's first byte for a
        later one (which may be awaited for the idle timeout). A deadline for the whole head, not for each
        read: a client trickling a byte at a time (slowloris) would otherwise hold the connection for as long
        as the head may be long. Raises ``TimeoutError``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.handshake_timeout if first else None
        while True:
            event = client.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout_at(deadline if deadline is not None
                                          else loop.time() + self.limits.idle_timeout):
                data = await reader.read(_CHUNK)
            if deadline is None:
                deadline = loop.time() + self.limits.handshake_timeout
            client.receive_data(data)

    async def _next_event(self, parser: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> Any:
        """The next h11 event from ``reader``, each read bounded by ``timeout`` (raises ``TimeoutError``)."""
        while True:
            event = parser.next_event()
            if event is not h11.NEED_DATA:
                return event
            async with asyncio.timeout(timeout):
                data = await reader.read(_CHUNK)
            parser.receive_data(data)

    async def _answer(self, conn: _Conn, client: h11.Connection, writer: asyncio.StreamWriter,
                      reply: _Reply) -> None:
        """Send ``reply`` as the response (then the connection closes); report it if it is a refusal."""
        if reply.refusal and not reply.reported:
            self._report(conn, reply.status, reply.reason)
        if client.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response already began: nothing to do but close
        body = (f"egress denied: {reply.reason}\n" if reply.refusal else f"{reply.reason}\n").encode()
        phrase = http.HTTPStatus(reply.status).phrase.encode()
        with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
            writer.write(client.send(h11.Response(status_code=reply.status, reason=phrase, headers=[
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")])))
            writer.write(client.send(h11.Data(data=body)))
            writer.write(client.send(h11.EndOfMessage()))
            await writer.drain()

    async def _judge(self, conn: _Conn, target: Target) -> Sequence[IPAddress]:
        """The addresses a connection to ``target`` may use, or a :class:`_Reply` (403 refused, 502/504 when
        the name does not resolve). The name is looked up only if the policy could allow it."""
        verdict = check_target(self._policy, target, self.allow_private)
        if not verdict.allowed:
            raise _Reply(403, verdict.reason, refusal=True)
        if target.ip is not None:
            addresses: Sequence[IPAddress] = [target.ip]
        else:
            try:
                async with asyncio.timeout(self.limits.connect_timeout):
                    addresses = [unwrap(a) for a in await self._resolve(target)]
            except TimeoutError:
                raise _Reply(504, f"Resolving {target.host} took longer than {self.limits.connect_timeout:g} s."
                             ) from None
            except (OSError, UnicodeError) as exc:
                raise _Reply(502, f"{target.host} could not be resolved ({exc}).") from None
            # The policy now, not before the lookup: a change during it applies to this connection too.
            verdict = decide(self._policy, target, addresses, self.allow_private)
            if not verdict.allowed:
                raise _Reply(403, verdict.reason, refusal=True)
        conn.target, conn.addresses = target, addresses
        return addresses

    async def _resolve(self, target: Target) -> Sequence[IPAddress]:
        """``target.host`` looked up, at most ``max_lookups`` of this sandbox's at a time (more wait their turn,
        within the caller's timeout).

        A lookup is a thread blocked in ``getaddrinfo`` for as long as the name's servers take to answer (or not:
        tens of seconds), and a timeout here cannot stop that thread. So a slot is given back when the lookup
        ends, not when its caller stops waiting: a sandbox asking for names whose servers never answer holds
        ``max_lookups`` threads of the lookup pool at most, and the other sandboxes' lookups still run."""
        await self._lookups.acquire()
        try:
            lookup = asyncio.ensure_future(self.resolver(target.host, target.port))
        except BaseException:
            self._lookups.release()
            raise

        def done(future: asyncio.Future[Sequence[IPAddress]]) -> None:
            self._lookups.release()
            if not future.cancelled():
                future.exception()  # retrieved: a lookup nobody waits for any more is no error to report

        lookup.add_done_callback(done)
        return await asyncio.shield(lookup)

    async def _open(self, target: Target, addresses: Sequence[IPAddress]) -> socket.socket:
        """A non-blocking TCP socket connected to the first of ``addresses`` that answers (never a name:
        nothing is resolved again), within the connect timeout; a :class:`_Reply` 502 or 504 otherwise.

        Upstream sockets are used directly (``sock_recv``/``sock_sendall``), not through asyncio streams: a
        stream that sees a reset drops the bytes it had buffered, and a server that answers and then resets
        (as many do after an early error) would lose the end of its answer."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                for ip in addresses:
                    sock = socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                                         socket.SOCK_STREAM)
                    try:
                        sock.setblocking(False)
                        await loop.sock_connect(sock, (str(ip), target.port))
                    except OSError as exc:
                        sock.close()
                        errors.append(f"{ip}: {exc.strerror or exc}")
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    return sock
        except TimeoutError:
            raise _Reply(504, f"Connecting to {target} took longer than {self.limits.connect_timeout:g} s."
                         ) from None
        raise _Reply(502, f"Could not connect to {target}: {'; '.join(errors) or 'no address'}.")

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """``writer.drain()`` within the idle timeout: a sandbox that stops reading a response must not hold its
        connection, and the server's, for ever (a tunnel's relay has the same bound). Raises ``TimeoutError``."""
        async with asyncio.timeout(self.limits.idle_timeout):
            await writer.drain()

    async def _send_up(self, sock: socket.socket, data: bytes) -> None:
        if data:
            self.tx_bytes += len(data)
            await asyncio.get_running_loop().sock_sendall(sock, data)

    async def _recv_up(self, sock: socket.socket) -> bytes:
        """The next bytes from the server; a reset reads as the end (what came before it is kept)."""
        try:
            data = await asyncio.get_running_loop().sock_recv(sock, _CHUNK)
        except ConnectionError:
            data = b""
        self.rx_bytes += len(data)
        return data

    async def _tunnel(self, conn: _Conn, client: h11.Connection, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        """``CONNECT host:port``: judge, connect, answer 200, check the ClientHello's SNI, then relay."""
        try:
            target = parse_target(conn.asked, None)
        except ValueError as exc:
            raise _Reply(400, f"{str(exc).rstrip('.')}.", refusal=True) from None
        end = await self._next_event(client, reader, self.limits.handshake_timeout)
        if not isinstance(end, h11.EndOfMessage):
            raise _Reply(400, "A CONNECT request carries no body.", refusal=True)
        addresses = await self._judge(conn, target)
        sock = await self._open(target, addresses)
        try:
            writer.write(client.send(h11.Response(status_code=200, reason=b"Connection established",
                                                  headers=[])))
            await writer.drain()
            early, _closed = client.trailing_data
            hello = ClientHelloBuffer()
            try:
                async with asyncio.timeout(self.limits.handshake_timeout):
                    parsed = hello.feed(early)
                    while parsed is None:
                        chunk = await reader.read(_CHUNK)
                        if not chunk:
                            return
                        parsed = hello.feed(chunk)
            except TimeoutError:
                self._report(conn, 403, f"no TLS ClientHello came within {self.limits.handshake_timeout:g} s; "
                                        "CONNECT carries TLS only.")
                return
            except NotClientHello as exc:
                self._report(conn, 403, str(exc))
                return
            problem = _sni_problem(target, parsed.server_name)
            if problem is not None:
                self._report(conn, 403, problem[0].upper() + problem[1:])
                return
            await self._send_up(sock, bytes(hello.data))
            await self._relay(conn, reader, writer, sock)
        finally:
            sock.close()

    async def _relay(self, conn: _Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     sock: socket.socket) -> None:
        """Copy both ways (half-closes passed on) until both ends finish, one fails, or nothing moved for
        the idle timeout."""

        async def upload() -> None:
            while data := await reader.read(_CHUNK):
                conn.last = time.monotonic()
                await self._send_up(sock, data)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

        async def download() -> None:
            while data := await self._recv_up(sock):
                conn.last = time.monotonic()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()

        pumps = {asyncio.ensure_future(upload()), asyncio.ensure_future(download())}
        try:
            while pending := {p for p in pumps if not p.done()}:
                left = conn.last + self.limits.idle_timeout - time.monotonic()
                if left <= 0:
                    conn.stalled = True
                    return
                done, _ = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if any(not p.cancelled() and p.exception() is not None for p in done):
                    return
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _forward(self, conn: _Conn, client: h11.Connection, request: h11.Request,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """One absolute-URI request: judge, forward over a new upstream connection, relay the response.
        Returns whether the sandbox's connection may carry another request."""
        url = urlsplit(conn.asked)
        if url.scheme == "https":
            raise _Reply(400, "Send https:// requests through a CONNECT tunnel (HTTPS_PROXY), not as an "
                              "absolute URI.", refusal=True)
        if url.scheme != "http" or not url.netloc:
            raise _Reply(400, "This is a forward proxy: send an absolute http:// URI or CONNECT host:port.",
                         refusal=True)
        try:
            target = parse_target(url.netloc, 80)
        except ValueError as exc:
            raise _Reply(400, f"{str(exc).rstrip('.')}.", refusal=True) from None
        addresses = await self._judge(conn, target)
        host = f"[{target.host}]" if target.ip is not None and target.ip.version == 6 else target.host
        headers = _end_to_end(request.headers)
        headers.append((b"host", (host if target.port == 80 else f"{host}:{target.port}").encode()))
        if any(name == b"transfer-encoding" for name, _ in request.headers):
            headers.append((b"transfer-encoding", b"chunked"))  # h11 decoded it; it re-encodes
        headers.append((b"connection", b"close"))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        sock = await self._open(target, addresses)
        server = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        responded = False
        try:
            await self._send_up(sock, server.send(h11.Request(method=request.method, target=path.encode(),
                                                              headers=headers)))
            if client.they_are_waiting_for_100_continue:
                writer.write(client.send(h11.InformationalResponse(status_code=100, headers=[])))
            try:
                while True:
                    event = await self._next_event(client, reader, self.limits.idle_timeout)
                    if isinstance(event, h11.Data):
                        await self._send_up(sock, server.send(h11.Data(data=event.data)))
                    elif isinstance(event, h11.EndOfMessage):
                        await self._send_up(sock, server.send(h11.EndOfMessage()))
                        break
            except ConnectionError:
                pass  # the server stopped reading; it may have answered early (the sandbox's body is left)
            while True:
                try:
                    event = server.next_event()
                    if event is h11.NEED_DATA:
                        async with asyncio.timeout(self.limits.idle_timeout):
                            server.receive_data(await self._recv_up(sock))
                        continue
                except (h11.RemoteProtocolError, OSError, TimeoutError) as exc:
                    if responded:
                        return False
                    status = 504 if isinstance(exc, TimeoutError) else 502
                    raise _Reply(status, f"The server at {target} sent no valid response ({exc or 'timeout'}).")\
                        from None
                if isinstance(event, h11.InformationalResponse):
                    writer.write(client.send(h11.InformationalResponse(
                        status_code=event.status_code, headers=_end_to_end(event.headers), reason=event.reason)))
                elif isinstance(event, h11.Response):
                    responded = True
                    writer.write(client.send(h11.Response(status_code=event.status_code, reason=event.reason,
                                                          headers=_end_to_end(event.headers))))
                elif isinstance(event, h11.Data):
                    writer.write(client.send(h11.Data(data=event.data)))
                    await self._drain(writer)
                elif isinstance(event, h11.EndOfMessage):
                    writer.write(client.send(h11.EndOfMessage()))
                    await self._drain(writer)
                    return True
                else:  # ConnectionClosed before a whole response: h11 raised above instead
                    return False
        except h11.LocalProtocolError as exc:
            if responded:
                return False
            raise _Reply(502, f"The server at {target} sent a response the proxy cannot pass on ({exc}).") \
                from None
        finally:
            sock.close()


class EgressService(LoggingConfigurable):
    """Owns the egress proxy of every sandbox. Created once by the hub, configured here (``--EgressService.*``,
    ``--egress-allow-private`` and the ``KERNELHUB_EGRESS_*`` variables).

    The sandbox service calls :meth:`attach` when a sandbox with a policy other than ``"none"`` starts (before
    its first kernel, or at a pooled sandbox's hand-out), :meth:`update` on ``PATCH`` of its network,
    :meth:`metrics` for ``sandbox_metrics`` and :meth:`close` before the sandbox stops. :meth:`open` is the
    lower level: a proxy on a socket path, without a sandbox (the proxy's own tests)."""

    # Each option's KERNELHUB_* variable is its ``env`` tag, read by kernelhub.settings.
    allow_private = Unicode("", help="Comma-separated CIDRs that sandboxes may reach although they are loopback, "
                            "private, link-local or otherwise never allowed, e.g. 10.20.0.0/16 for an internal "
                            "package mirror.", config=True).tag(env="KERNELHUB_EGRESS_ALLOW_PRIVATE")
    hosts = Dict(help="Names the proxy resolves to fixed addresses instead of asking the system resolver, "
                 '{"name": ["address", ...]} (an /etc/hosts for egress, e.g. a mirror\'s internal name); the '
                 "addresses are judged like any others.", config=True).tag(env="KERNELHUB_EGRESS_HOSTS")
    max_connections = Integer(64, help="Egress connections one sandbox may have open at once.", config=True).tag(
        env="KERNELHUB_EGRESS_MAX_CONNECTIONS")
    connection_rate = Float(20.0, help="New egress connections per second one sandbox may open, sustained.",
                            config=True).tag(env="KERNELHUB_EGRESS_CONNECTION_RATE")
    connection_burst = Integer(100, help="New egress connections one sandbox may open at once before the rate "
                               "applies.", config=True).tag(env="KERNELHUB_EGRESS_CONNECTION_BURST")
    connect_timeout = Float(10.0, help="Seconds to resolve and connect to a destination.", config=True).tag(
        env="KERNELHUB_EGRESS_CONNECT_TIMEOUT")
    handshake_timeout = Float(30.0, help="Seconds a sandbox has to send a request head or a TLS ClientHello.",
                              config=True).tag(env="KERNELHUB_EGRESS_HANDSHAKE_TIMEOUT")
    idle_timeout = Float(300.0, help="Seconds an egress connection may carry nothing before it is closed.",
                         config=True).tag(env="KERNELHUB_EGRESS_IDLE_TIMEOUT")
    max_lookups = Integer(4, help="Name lookups one sandbox may have running at once (more wait their turn); a "
                          "lookup holds a thread of the egress lookup pool until the name's servers answer.",
                          config=True).tag(env="KERNELHUB_EGRESS_MAX_LOOKUPS")
    lookup_threads = Integer(64, help="Threads of the egress lookup pool (getaddrinfo), shared by every sandbox "
                             "and apart from the gateway's own thread pool.", config=True).tag(
        env="KERNELHUB_EGRESS_LOOKUP_THREADS")

    @validate("allow_private")
    def _check_allow_private(self, proposal: Any) -> str:
        try:
            parse_networks(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"--egress-allow-private: {exc}") from None
        return str(proposal["value"])

    @validate("hosts")
    def _check_hosts(self, proposal: Any) -> dict[str, list[str]]:
        try:
            return _hosts_table(proposal["value"])
        except ValueError as exc:
            raise TraitError(f"--EgressService.hosts: {exc}") from None

    def __init__(self, resolver: Resolver | None = None, **kwargs: Any) -> None:
        """``resolver`` replaces the system resolver (tests); names in :attr:`hosts` are answered first."""
        super().__init__(**kwargs)
        self._system = resolver
        #: The threads ``getaddrinfo`` runs in: not the loop's default pool, which file transfers and the store's
        #: helpers share, and which lookups that hang would fill (made at the first system lookup).
        self._lookup_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._proxies: dict[str, SandboxProxy] = {}
        #: Called with refusals of a sandbox attached by :meth:`attach`, after their log line, and how many of
        #: its refusals were left out since the last call: :data:`AUDIT_BURST` at once, then
        #: :data:`AUDIT_RATE` a second (the hub puts them in the audit log). Exceptions are logged and dropped.
        self.on_refusal: Callable[[Refusal, int], Any] | None = None
        #: Bytes of proxies already closed (``rx``, ``tx``) and refusals reported, for :meth:`totals`.
        self._closed_bytes = [0, 0]
        self.denied = 0

    async def resolver(self, host: str, port: int) -> Sequence[IPAddress]:
        """The proxy's :data:`Resolver`: :attr:`hosts` (normalised names), else the system's (or the one given)."""
        fixed = self.hosts.get(host)
        if fixed is not None:
            return [ipaddress.ip_address(a) for a in fixed]
        if self._system is not None:
            return await self._system(host, port)
        if self._lookup_pool is None:
            self._lookup_pool = concurrent.futures.ThreadPoolExecutor(max(1, self.lookup_threads),
                                                                      thread_name_prefix="egress-lookup")
        return await system_resolver(host, port, self._lookup_pool)

    @property
    def allowed_private_networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.allow_private)

    def limits(self) -> ProxyLimits:
        return ProxyLimits(max_connections=self.max_connections, rate=self.connection_rate,
                           burst=self.connection_burst, connect_timeout=self.connect_timeout,
                           handshake_timeout=self.handshake_timeout, idle_timeout=self.idle_timeout,
                           max_lookups=self.max_lookups)

    async def open(self, sandbox_id: str, socket_path: str, policy: Any, *,
                   owner: tuple[int, int] | None = None,
                   on_denied: Callable[[Refusal], Any] | None = None) -> SandboxProxy:
        """Start the proxy of ``sandbox_id`` on ``socket_path`` (see :meth:`SandboxProxy.start` for
        ``owner``) with ``policy`` (a :class:`NetworkPolicy` or its JSON). Raises
        :class:`~kernelhub.errors.InvalidRequest` for a bad policy, :class:`~kernelhub.errors.Conflict` if
        the sandbox has one already, :class:`~kernelhub.errors.SandboxError` if the socket cannot be made."""
        parsed = parse_policy(policy)
        if sandbox_id in self._proxies:
            raise Conflict(f"Sandbox {sandbox_id} already has an egress proxy.")
        proxy = SandboxProxy(sandbox_id, socket_path, parsed, allow_private=self.allowed_private_networks,
                             resolver=self.resolver, limits=self.limits(), on_denied=on_denied)
        self._proxies[sandbox_id] = proxy
        try:
            await proxy.start(owner)
        except BaseException:
            self._proxies.pop(sandbox_id, None)
            raise
        return proxy

    async def attach(self, sandbox: Sandbox, policy: NetworkPolicy) -> None:
        """Give a running sandbox its way out under ``policy``: the proxy on ``egress.sock`` in its run directory
        (its ``/run/kernelhub``, owned by its uid), refusals logged in its log, then the forwarder inside
        (:meth:`Sandbox.start_egress_forwarder`, which sets the proxy variables for every later process) and
        the workspace's ``node_modules`` (:func:`~kernelhub.services.packages.prepare_npm`).
        Nothing for ``"none"``. Raises :class:`~kernelhub.errors.SandboxError` if either cannot start (the
        proxy is closed again); the caller stops the sandbox or answers the error."""
        if policy.mode == "none" or sandbox.id in self._proxies:
            return
        budget = RefusalBudget(AUDIT_BURST, AUDIT_RATE)

        def on_denied(refusal: Refusal) -> None:
            self.denied += 1
            sandbox.log(refusal.log_line())
            if self.on_refusal is None:
                return
            left_out = budget.take()
            if left_out is not None:
                self.on_refusal(refusal, left_out)  # SandboxProxy._report logs what it raises

        await self.open(sandbox.id, str(sandbox.egress_socket), policy, owner=(sandbox.uid, sandbox.gid),
                        on_denied=on_denied)
        try:
            await sandbox.start_egress_forwarder()
            await prepare_npm(sandbox)
        except BaseException:
            await self.close(sandbox.id)
            raise

    async def update(self, sandbox: Sandbox, policy: NetworkPolicy) -> bool:
        """``PATCH`` of a running sandbox's network: new connections follow ``policy`` at once and open ones it
        refuses are cut. A sandbox created with ``"none"`` has no proxy yet: it gets one now (:meth:`attach`);
        answers True then (its processes already running lack the proxy variables, the caller's to set). A
        sandbox that has one gets its forwarder started again if it ended. Going back to ``"none"`` keeps the
        proxy, which then refuses everything. Raises what :meth:`attach` raises."""
        proxy = self._proxies.get(sandbox.id)
        if proxy is not None:
            proxy.set_policy(policy)
            if policy.mode != "none":
                await sandbox.start_egress_forwarder()  # again if the sandbox's code killed it
            return False
        if policy.mode == "none":
            return False
        await self.attach(sandbox, policy)
        return True

    def get(self, sandbox_id: str) -> SandboxProxy | None:
        return self._proxies.get(sandbox_id)

    def set_policy(self, sandbox_id: str, policy: Any) -> NetworkPolicy:
        """Give a running sandbox a new policy (JSON or parsed); new connections follow it at once and open
        ones it refuses are cut. Returns the parsed policy. Raises
        :class:`~kernelhub.errors.InvalidRequest` for a bad one, :class:`~kernelhub.errors.Conflict` if the
        sandbox has no proxy."""
        parsed = parse_policy(policy)
        proxy = self._proxies.get(sandbox_id)
        if proxy is None:
            raise Conflict(f"Sandbox {sandbox_id} has no egress proxy (it is not running).")
        proxy.set_policy(parsed)
        return parsed

    def metrics(self, sandbox_id: str) -> dict[str, int]:
        """``{"net_rx_bytes", "net_tx_bytes"}`` of a sandbox (zeros without a proxy)."""
        proxy = self._proxies.get(sandbox_id)
        return proxy.metrics() if proxy is not None else {"net_rx_bytes": 0, "net_tx_bytes": 0}

    def totals(self) -> dict[str, int]:
        """What ``/metrics`` shows of egress since the gateway started: ``{"net_rx_bytes", "net_tx_bytes"}`` of
        every proxy, closed ones included, ``denied`` (refusals of sandboxes attached by :meth:`attach`) and
        ``proxies`` (open now)."""
        rx, tx = self._closed_bytes
        for proxy in self._proxies.values():
            rx, tx = rx + proxy.rx_bytes, tx + proxy.tx_bytes
        return {"net_rx_bytes": rx, "net_tx_bytes": tx, "denied": self.denied, "proxies": len(self._proxies)}

    async def close(self, sandbox_id: str) -> None:
        """Stop a sandbox's proxy and remove its socket. Idempotent."""
        proxy = self._proxies.pop(sandbox_id, None)
        if proxy is not None:
            await proxy.close()
            self._closed_bytes[0] += proxy.rx_bytes
            self._closed_bytes[1] += proxy.tx_bytes

    async def close_all(self) -> None:
        """Stop every proxy (the app's shutdown), and the lookup pool (lookups still blocked are left to end)."""
        for sandbox_id in list(self._proxies):
            await self.close(sandbox_id)
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
            self._lookup_pool = None


def _hosts_table(value: Any) -> dict[str, list[str]]:
    """``{"name": ["address", ...]}`` with names normalised (:func:`parse_host`) and addresses checked.
    Raises ``ValueError`` with a sentence."""
    if not isinstance(value, dict):
        raise ValueError('expected {"name": ["address", ...]}')
    out: dict[str, list[str]] = {}
    for name, addresses in value.items():
        host, ip = parse_host(str(name))
        if ip is not None:
            raise ValueError(f"{name!r} is an address, not a name")
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"{name!r}: expected a non-empty list of addresses")
        try:
            out[host] = [str(ipaddress.ip_address(a)) for a in addresses]
        except ValueError:
            raise ValueError(f"{name!r}: {addresses!r} holds something that is not an IP address") from None
    return out
