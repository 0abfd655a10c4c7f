"""The sandbox's end of egress: a loopback TCP port that relays every connection to the egress proxy's socket.

A sandbox has its own network namespace with nothing but loopback, so no program in it can reach the
network. The gateway runs a filtering HTTP proxy per sandbox (:mod:`kernelhub.services.egress.proxy`) on a
unix socket in the sandbox's run directory, which bubblewrap binds in at ``/run/kernelhub``. Most programs
speak to a proxy over TCP only (``HTTP_PROXY=http://127.0.0.1:3128``), so this forwarder listens on the
sandbox's loopback and copies bytes both ways to that socket, half-closes included. It reads nothing and
decides nothing: every check is the proxy's, on the gateway's side. A sandbox process that takes the
forwarder over (same uid) gains nothing it did not have: the socket is reachable from the sandbox anyway.

How the sandbox layer starts it (once per sandbox, after the agent is ready and before the first kernel):

- copied next to the agent (``AGENT_FILES`` in :mod:`kernelhub.sandbox.sandbox`), so it is at
  ``/opt/kernelhub-agent/egress_forwarder.py`` inside;
- spawned through the agent like any process, on the runtime's Python, standard library only::

      [agent_python, "-I", "-S", "-B", "/opt/kernelhub-agent/egress_forwarder.py",
       "--listen", "127.0.0.1:3128", "--socket", "/run/kernelhub/egress.sock"]

- it prints one line ``listening 127.0.0.1:PORT`` on stdout once it accepts connections (``--listen
  127.0.0.1:0`` picks a free port and prints it), and a line on stderr for each connection the proxy socket
  refused; it runs until killed;
- every process of the sandbox gets :func:`proxy_env` in its environment.

One thread and a selector, no asyncio: importing asyncio doubles the process's memory (about 19 MiB against 9
MiB resident, measured with Debian's Python 3.11), which the sandbox's memory limit pays for. The callbacks
take no argument, as in the agent's loop (:mod:`kernelhub.sandbox.agent`), so the agent could host a
:class:`Forwarder` on its own selector instead of a process of its own.

Programs that ignore the proxy variables get no network at all; UDP (and so DNS from inside) has no path.
"""

import argparse
import selectors
import socket
import sys
import time

DEFAULT_LISTEN = "127.0.0.1:3128"
INNER_SOCKET = "/run/kernelhub/egress.sock"
_CHUNK = 65536
#: Bytes buffered for a slow reader before the forwarder stops reading from the other side.
_HIGH_WATER = 256 * 1024


def proxy_env(listen=DEFAULT_LISTEN):
    """The variables that send programs through the forwarder: both spellings, since curl reads only the
    lowercase ``http_proxy`` and some tools only the uppercase; ``NO_PROXY`` keeps loopback direct."""
    url = f"http://{listen}"
    env = {}
    for name, value in (("HTTP_PROXY", url), ("HTTPS_PROXY", url), ("NO_PROXY", "localhost,127.0.0.1")):
        env[name] = value
        env[name.lower()] = value
    return env


def plain_response(status, phrase, text):
    """A whole ``Connection: close`` HTTP/1.1 response with a text body, for answering without a parser:
    here when the proxy cannot be reached, in the proxy when it turns a connection away unread."""
    body = text.encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


class _Pair:
    """One client connection and its connection to the proxy (``None`` when the proxy could not be reached:
    the client then gets ``pending`` and its input is drained).

    Each side has an output buffer (what is to be written to it) and flags: its input ended, writing to it
    failed. A reset while reading counts as the end of input: the proxy closes at once after a refusal and
    what it wrote before must still reach the client. When the proxy stops taking data, the client's input is
    read and dropped until the client closes, so that closing with unread data does not reset the client
    before it has read the answer. When the client is gone, everything is closed."""

    def __init__(self, selector, client, upstream, pending=b""):
        self.selector = selector
        self.client = client
        self.upstream = upstream
        self.peer = {client: upstream, upstream: client}
        self.out = {client: bytearray(pending), upstream: bytearray()}
        self.ended = {client: False, upstream: upstream is None}
        self.dead = {client: False, upstream: upstream is None}
        self.shut = {client: False, upstream: upstream is None}
        self.events = {}
        self.closed = False
        self.update()

    def callback(self, sock):
        return lambda: self.on_ready(sock)

    def on_ready(self, sock):
        peer = self.peer[sock]
        if self.out[sock] and not self.dead[sock]:
            try:
                sent = sock.send(self.out[sock])
                del self.out[sock][:sent]
            except BlockingIOError:
                pass
            except OSError:
                self.dead[sock] = True
                self.out[sock].clear()
        if not self.ended[sock] and len(self.out[peer]) < _HIGH_WATER:
            try:
                data = sock.recv(_CHUNK)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.ended[sock] = True
            elif data and not self.dead[peer]:
                self.out[peer] += data
        self.update()

    def update(self):
        if self.dead[self.client]:
            return self.close()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            peer = self.peer[sock]
            if not self.shut[sock] and not self.out[sock] and (self.ended[peer] or self.dead[peer]):
                self.shut[sock] = True
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if self.ended[self.client] and (self.ended[self.upstream] or self.dead[self.upstream]) \
                and not self.out[self.client]:
            return self.close()
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            want = 0
            if not self.ended[sock] and len(self.out[self.peer[sock]]) < _HIGH_WATER:
                want |= selectors.EVENT_READ
            if self.out[sock] and not self.dead[sock]:
                want |= selectors.EVENT_WRITE
            have = self.events.get(sock, 0)
            if want == have:
                continue
            if not have:
                self.selector.register(sock, want, self.callback(sock))
            elif not want:
                self.selector.unregister(sock)
            else:
                self.selector.modify(sock, want, self.callback(sock))
            self.events[sock] = want

    def close(self):
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is None:
                continue
            if self.events.get(sock):
                self.selector.unregister(sock)
            sock.close()


class Forwarder:
    """Listens on ``host:port`` (``address`` once bound) and relays each connection to ``socket_path``.

    Registers with ``selector``; each registration's data is a callback without arguments. Call :meth:`tick`
    at least every :attr:`TICK` seconds (it resumes accepting after running out of file descriptors)."""

    TICK = 0.5

    def __init__(self, selector, host, port, socket_path):
        self.selector = selector
        self.socket_path = socket_path
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()[:2]
        self.paused_until = None
        selector.register(self.listener, selectors.EVENT_READ, self.on_accept)

    def on_accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors: stop accepting for a moment
                print(f"egress forwarder: accept failed: {exc}", file=sys.stderr, flush=True)
                self.selector.unregister(self.listener)
                self.paused_until = time.monotonic() + self.TICK
                return
            client.setblocking(False)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.setblocking(False)
            try:
                upstream.connect(self.socket_path)
            except OSError as exc:  # a unix connect does not wait: EAGAIN is a full backlog
                upstream.close()
                print(f"egress forwarder: cannot reach {self.socket_path}: {exc}", file=sys.stderr, flush=True)
                reason = f"The sandbox's egress proxy is not reachable ({exc.strerror or exc}).\n"
                _Pair(self.selector, client, None, plain_response(502, "Bad Gateway", reason))
                continue
            _Pair(self.selector, client, upstream)

    def tick(self):
        if self.paused_until is not None and time.monotonic() >= self.paused_until:
            self.paused_until = None
            self.selector.register(self.listener, selectors.EVENT_READ, self.on_accept)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Relay a loopback TCP port to the egress proxy's socket.")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port to listen on (port 0: any free)")
    parser.add_argument("--socket", default=INNER_SOCKET, help="the egress proxy's unix socket")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    selector = selectors.DefaultSelector()
    forwarder = Forwarder(selector, host.strip("[]"), int(port), args.socket)
    print(f"listening {args.listen.rpartition(':')[0]}:{forwarder.address[1]}", flush=True)
    try:
        while True:
            for key, _ in selector.select(Forwarder.TICK):
                key.data()
            forwarder.tick()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
