"""The gateway's HTTP server: tornado's, with its connections bounded before anyone authenticates.

A listening gateway is a target before any key is checked (SECURITY.md pitfall 14). Unbounded, 19,000 idle TCP
connections held every descriptor of the process, and each failed ``accept`` wrote a traceback. Here:

- a connection must send the headers of its first request within ``header_timeout`` seconds (slow or silent
  clients are closed); between two requests of a kept-alive connection, ``idle_timeout`` applies;
- a request body that stalls, the handler taking no chunk of it for ``body_timeout`` seconds, closes its
  connection (what nginx's ``client_body_timeout`` does, 60 s there too), so that a stalled body does not pin
  its tenant's body budget and a connection; a body trickled in within each deadline is bounded by the caps;
- each client address holds at most ``max_per_address`` connections in their HTTP phase, and the server at most
  ``max_connections``; a connection past either cap is closed as soon as it is accepted;
- a request too malformed to reach any handler (bytes HTTP forbids in a header, a bad request line) gets the
  same JSON error as any other bad request, instead of tornado's bare ``400 Bad Request`` without a body;
- one descriptor is kept in reserve: when ``accept`` fails for lack of descriptors (``EMFILE``/``ENFILE``), the
  reserve is freed to accept and close the waiting connections, so the listening socket does not spin, and
  the condition is logged once per :data:`LOG_INTERVAL_S`, not once per attempt (so are closed stalled bodies).

A connection upgraded to a websocket leaves the HTTP phase (it passed authentication to get there) and no
longer counts toward the caps. Who calls what: :class:`kernelhub.app.ServeApp` makes one :class:`GatewayServer`
and adds its listening sockets; tornado calls the rest.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from tornado import gen, httputil, iostream
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop

__all__ = ["GatewayServer", "raise_fd_limit"]

log = logging.getLogger("kernelhub.server")

#: Seconds between two log lines about refused or shed connections.
LOG_INTERVAL_S = 60.0
#: Connections accepted at most per readiness of a listening socket (tornado's own bound: its backlog).
_ACCEPT_BATCH = 128

#: What tornado's HTTP/1.1 connection writes, and nothing else, when a request is too malformed to reach any
#: handler (bytes HTTP forbids in a header, a bad request line, more query fields than it parses, ...).
_BARE_400 = b"HTTP/1.1 400 Bad Request\r\n\r\n"
_MALFORMED_BODY = json.dumps({"error": "invalid_request", "message": (
    "The request is not well-formed HTTP/1.1: its request line or a header holds bytes HTTP does not allow, "
    "or its query string has more fields than the gateway parses (1000).")}).encode()
_JSON_400 = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json; charset=UTF-8\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_MALFORMED_BODY), _MALFORMED_BODY))


def raise_fd_limit(target: int = 65536) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards ``target`` (never above the hard limit); answer the
    soft limit now in force. Called once by ``kernelhub serve``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


class _State:
    """One accepted connection: its client address, whether a request's headers came, its header deadline."""

    __slots__ = ("address", "headers_seen", "timer")

    def __init__(self, address: str) -> None:
        self.address = address
        self.headers_seen = False
        self.timer: object | None = None


class _HeadersSeen(httputil.HTTPMessageDelegate):
    """Passes every call on to tornado's delegate; notes that a request's headers arrived, and closes the
    connection when its body sends nothing for ``body_timeout`` seconds.

    The clock restarts with each chunk the handler has taken, and stops while the handler holds the body back
    (its ``data_received`` answered an awaitable, for flow control): that is not a stalled client. One timer per
    body: a chunk only notes the loop's time (a 1 GiB upload is 16,384 chunks of 64 KiB), and the timer, when
    it fires before the body was quiet that long, waits out the rest. Not tornado's own ``body_timeout``
    (``HTTP1ConnectionParameters``): that one bounds the whole body, and would cut a large upload on a slow
    link while it still progresses."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, state: _State | None,
                 stream: iostream.IOStream | None, body_timeout: float | None,
                 on_stalled: Callable[[str], None]) -> None:
        self.delegate = delegate
        self.state = state
        self.stream = stream
        self.body_timeout = body_timeout
        self.on_stalled = on_stalled  # told the client's address when a stalled body's connection is closed
        self._timer: object | None = None
        self._last_chunk = 0.0  # the loop's time when the handler last took a chunk
        self._held = False  # the handler holds the body back

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        if self.state is not None:
            self.state.headers_seen = True
        has_body = headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in headers
        if has_body and self.body_timeout is not None and self.stream is not None:
            self._last_chunk = IOLoop.current().time()
            self._timer = IOLoop.current().call_later(self.body_timeout, self._deadline)
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        result = self.delegate.data_received(chunk)
        if result is None:
            self._last_chunk = IOLoop.current().time()
        else:
            self._held = True
            result = gen.convert_yielded(result)
            result.add_done_callback(self._released)
        return result

    def _released(self, _: object) -> None:
        self._held = False
        self._last_chunk = IOLoop.current().time()

    def finish(self) -> None:
        self._stop()
        self.delegate.finish()

    def on_connection_close(self) -> None:
        self._stop()
        self.delegate.on_connection_close()

    def _stop(self) -> None:
        if self._timer is not None:
            IOLoop.current().remove_timeout(self._timer)
            self._timer = None

    def _deadline(self) -> None:
        assert self.body_timeout is not None and self.stream is not None  # armed only with both
        loop = IOLoop.current()
        wait = self.body_timeout if self._held else self._last_chunk + self.body_timeout - loop.time()
        if wait > 0:
            self._timer = loop.call_later(wait, self._deadline)
            return
        self._timer = None
        if not self.stream.closed():
            self.on_stalled(self.state.address if self.state is not None else "?")
            self.stream.close()


class GatewayServer(HTTPServer):
    """tornado's HTTPServer with the bounds of this module. ``header_timeout``, ``idle_timeout``,
    ``body_timeout`` (seconds; None: no body deadline), ``max_per_address`` and ``max_connections``
    (connections) come on top of HTTPServer's own arguments."""

    def initialize(self, *args: Any, header_timeout: float = 10.0, idle_timeout: float = 75.0,  # type: ignore[override]
                   body_timeout: float | None = 60.0, max_per_address: int = 128, max_connections: int = 4096,
                   **kwargs: Any) -> None:
        kwargs["idle_connection_timeout"] = idle_timeout
        super().initialize(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_stall_timeout = body_timeout  # HTTPServer.initialize takes body_timeout too, for the whole body
        self.max_per_address = max_per_address
        self.max_connections = max_connections
        self._states: dict[iostream.IOStream, _State] = {}
        self._per_address: collections.Counter[str] = collections.Counter()
        self._reserve: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._refused = 0
        self._shed = 0
        self._stalled = 0
        self._logged_at = self._stall_logged_at = -LOG_INTERVAL_S

    # -- accepting ------------------------------------------------------------------------------------------

    def add_sockets(self, sockets: Any) -> None:
        io_loop = IOLoop.current()
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            io_loop.add_handler(sock, self._on_acceptable, IOLoop.READ)
            self._handlers[sock.fileno()] = functools.partial(io_loop.remove_handler, sock)

    def _on_acceptable(self, sock: socket.socket, events: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            if sock.fileno() not in self._sockets:
                return  # stopped
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                self._shed_waiting(sock)
                return
            peer = address[0] if isinstance(address, tuple) and address else ""
            if len(self._states) >= self.max_connections or self._per_address[peer] >= self.max_per_address:
                connection.close()
                self._refused += 1
                self._report()
                continue
            self._handle_connection(connection, address)

    def _shed_waiting(self, sock: socket.socket) -> None:
        """Out of descriptors: free the reserve, accept and close what waits (a client gets an answer, the
        listening socket stops being readable), take the reserve back."""
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        try:
            for _ in range(_ACCEPT_BATCH):
                try:
                    connection, _address = sock.accept()
                except (BlockingIOError, ConnectionAbortedError):
                    break
                except OSError:
                    break  # still no descriptor: other parts of the gateway took it
                connection.close()
                self._shed += 1
        finally:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._reserve = None
        self._report(out_of_fds=True)

    def _report(self, out_of_fds: bool = False) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_INTERVAL_S:
            return
        self._logged_at = now
        if out_of_fds:
            log.warning("out of file descriptors: %d connections closed on arrival so far (%d open)",
                        self._shed, len(self._states))
        else:
            log.warning("connection caps reached: %d connections refused so far (%d open, at most %d per "
                        "address and %d in all)", self._refused, len(self._states), self.max_per_address,
                        self.max_connections)

    # -- connections ------------------------------------------------------------------------------------------

    def handle_stream(self, stream: iostream.IOStream, address: Any) -> None:
        peer = address[0] if isinstance(address, tuple) and address else ""
        state = _State(peer)
        self._states[stream] = state
        self._per_address[peer] += 1
        state.timer = IOLoop.current().call_later(self.header_timeout, self._header_deadline, stream)
        write = stream.write

        def write_json_refusal(data: bytes | memoryview, *args: Any, **kwargs: Any) -> Any:
            return write(_JSON_400 if data == _BARE_400 else data, *args, **kwargs)

        stream.write = write_json_refusal  # type: ignore[method-assign]  # this connection's stream only
        super().handle_stream(stream, address)

    def _header_deadline(self, stream: iostream.IOStream) -> None:
        state = self._states.get(stream)
        if state is not None and not state.headers_seen:
            stream.close()

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> Any:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(server_conn, "stream", None)
        return _HeadersSeen(delegate, self._states.get(stream), stream,  # type: ignore[arg-type]
                            self.body_stall_timeout, self._body_stalled)

    def _body_stalled(self, address: str) -> None:
        """A stalled body's connection is being closed: counted, and logged once per :data:`LOG_INTERVAL_S`
        (anyone may send a body to a route without auth, so a line per connection is a log flood)."""
        self._stalled += 1
        now = time.monotonic()
        if now - self._stall_logged_at >= LOG_INTERVAL_S:
            self._stall_logged_at = now
            log.info("closed a connection from %s whose request body sent nothing for %g s (%d so far)", address,
                     self.body_stall_timeout, self._stalled)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        state = self._states.pop(getattr(server_conn, "stream", None), None)  # type: ignore[arg-type]
        if state is None:
            return
        if state.timer is not None:
            IOLoop.current().remove_timeout(state.timer)
        self._per_address[state.address] -= 1
        if self._per_address[state.address] <= 0:
            del self._per_address[state.address]

    @property
    def open_connections(self) -> int:
        """Connections in their HTTP phase now."""
        return len(self._states)

    def stop(self) -> None:
        super().stop()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
