"""The client's HTTP transport: httpx's own, with TCP connections that keep an early answer readable.

When the gateway refuses an upload before reading its body (over ``max_file_mb``: 413; a bad key: 401; an
unknown sandbox: 404), it answers and closes the connection; the client, still sending, gets a reset. httpcore
then reads the answer, which is what it suppresses the write error for ("servers can sometimes close the request
preemptively and then respond with a well formed HTTP error response"). Over anyio's asyncio streams, though, the
failed write has already closed the transport, and the answer, sitting in the socket's receive buffer (Linux
keeps what arrived before the reset readable), is lost: the caller saw ``Broken pipe`` (issue 7, item 7).

:class:`SocketStream` drives the socket with the event loop's ``sock_sendall``/``sock_recv`` instead, so a failed
write leaves it open and the answer is read. TLS connections (a gateway behind an HTTPS proxy, which reads
bodies whole before passing them on) are handed to httpcore's anyio stream at ``start_tls``.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import anyio.abc
import httpcore2
import httpx2

_SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class SocketStream(httpcore2.AsyncNetworkStream):
    """One plain TCP connection, driven with the running loop's socket calls. A write that fails raises
    :class:`httpcore2.WriteError` and leaves the socket open for the answer to be read."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.get_running_loop().sock_recv(self._sock, max_bytes)
        except TimeoutError as exc:
            raise httpcore2.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore2.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_sendall(self._sock, buffer)
        except TimeoutError as exc:
            raise httpcore2.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore2.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._sock.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore2.AsyncNetworkStream:
        # httpcore's own anyio stream, which it does not re-export: imported here, so that a move of it in a later
        # httpcore2 could break only TLS connections.
        from httpcore2._backends.anyio import AnyIOStream

        stream = await anyio.abc.SocketStream.from_socket(self._sock)
        return await AnyIOStream(stream).start_tls(ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "is_readable":
            # An idle pooled connection that is readable was closed by the server: httpcore then drops it.
            if self._sock.fileno() < 0:
                return True
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        return None


class SocketBackend(httpcore2.AsyncNetworkBackend):
    """Makes :class:`SocketStream` connections (TCP_NODELAY on, as anyio's: KERNELS.md on Nagle delays)."""

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[_SocketOption] | None = None) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        failure: OSError | None = None
        try:
            async with asyncio.timeout(timeout):
                for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
                    sock = socket.socket(family, kind, proto)
                    try:
                        sock.setblocking(False)
                        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        for option in socket_options or ():
                            sock.setsockopt(*option)
                        if local_address:
                            sock.bind((local_address, 0))
                        await loop.sock_connect(sock, address)
                        return SocketStream(sock)
                    except OSError as exc:
                        sock.close()
                        failure = exc
                    except BaseException:
                        sock.close()
                        raise
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(str(exc)) from exc
        except OSError as exc:  # name resolution
            raise httpcore2.ConnectError(str(exc)) from exc
        raise httpcore2.ConnectError(str(failure or f"{host} has no address"))

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[_SocketOption] | None = None,
                                  ) -> httpcore2.AsyncNetworkStream:
        return await httpcore2.AnyIOBackend().connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class GatewayTransport(httpx2.AsyncHTTPTransport):
    """:class:`httpx2.AsyncHTTPTransport` whose connection pool connects with :class:`SocketBackend`. (Proxies
    from the environment keep httpx's own transports.)"""

    def __init__(self) -> None:
        # Not the parent's __init__: its pool would be made only to be replaced; handle_async_request and
        # aclose use nothing but this pool.
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=httpx2.create_ssl_context(), max_connections=100, max_keepalive_connections=20,
            keepalive_expiry=5.0, network_backend=SocketBackend())
