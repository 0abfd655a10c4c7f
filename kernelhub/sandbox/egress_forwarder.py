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

Programs that ignore the proxy variables get no network at all; UDP (and so DNS from inside) has no path.
"""

import argparse
import asyncio
import socket
import sys

DEFAULT_LISTEN = "127.0.0.1:3128"
INNER_SOCKET = "/run/kernelhub/egress.sock"
_CHUNK = 65536


def proxy_env(listen=DEFAULT_LISTEN):
    """The variables that send programs through the forwarder: both spellings, since curl reads only the
    lowercase ``http_proxy`` and some tools only the uppercase; ``NO_PROXY`` keeps loopback direct."""
    url = f"http://{listen}"
    env = {}
    for name, value in (("HTTP_PROXY", url), ("HTTPS_PROXY", url), ("NO_PROXY", "localhost,127.0.0.1")):
        env[name] = value
        env[name.lower()] = value
    return env


async def _pump(loop, src, dst):
    """Copy ``src`` to ``dst`` (sockets) until EOF, then half-close ``dst``; ``dst`` ``None`` drops the data.

    A reset while reading counts as EOF: the proxy closes at once after a refusal, and what it wrote before
    must still reach the client (asyncio streams would drop it). Once ``dst`` is gone the rest of ``src`` is
    read and dropped, so that closing the client's socket with unread data does not reset the connection
    before the client has read the proxy's answer."""
    while True:
        try:
            data = await loop.sock_recv(src, _CHUNK)
        except OSError:
            data = b""
        if not data:
            break
        if dst is not None:
            try:
                await loop.sock_sendall(dst, data)
            except OSError:
                dst = None
    if dst is not None:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _unavailable(reason):
    body = f"The sandbox's egress proxy is not reachable ({reason}).\n".encode()
    head = (f"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


class Forwarder:
    def __init__(self, socket_path):
        self.socket_path = socket_path
        self.tasks = set()

    async def handle(self, client):
        loop = asyncio.get_running_loop()
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            try:
                await loop.sock_connect(upstream, self.socket_path)
            except OSError as exc:
                print(f"egress forwarder: cannot reach {self.socket_path}: {exc}", file=sys.stderr, flush=True)
                try:
                    await loop.sock_sendall(client, _unavailable(exc.strerror or str(exc)))
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    return
                await _pump(loop, client, None)
                return
            await asyncio.gather(_pump(loop, client, upstream), _pump(loop, upstream, client))
        finally:
            upstream.close()
            client.close()

    async def serve(self, host, port):
        loop = asyncio.get_running_loop()
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        listener.setblocking(False)
        print(f"listening {host}:{listener.getsockname()[1]}", flush=True)
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors: wait for some to close
                print(f"egress forwarder: accept failed: {exc}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.1)
                continue
            client.setblocking(False)
            task = loop.create_task(self.handle(client))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Relay a loopback TCP port to the egress proxy's socket.")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="host:port to listen on (port 0: any free)")
    parser.add_argument("--socket", default=INNER_SOCKET, help="the egress proxy's unix socket")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        asyncio.run(Forwarder(args.socket).serve(host.strip("[]"), int(port)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
