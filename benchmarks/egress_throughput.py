"""Throughput and request latency through the egress proxy against a direct connection, measured in one run.

A local HTTP server (asyncio, one response of ``--mb`` MiB from memory, Content-Length framed) on 127.0.0.1.
Three ways to fetch it, interleaved so that drift on the machine hits all alike:

- direct: TCP to the server;
- proxy: the sandbox's view without the forwarder, the proxy's unix socket (absolute-URI ``GET``);
- forwarder: TCP to the in-sandbox forwarder (run here as a subprocess), which relays to the proxy.

Also the time of a small request (``/small``, 100 bytes) on a new connection each time, the usual shape of a
package manager's index requests. Run: ``.venv/bin/python benchmarks/egress_throughput.py [-n 5] [--mb 256]``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernelhub.sandbox import egress_forwarder
from kernelhub.services.egress.proxy import EgressService


async def serve(payload: bytes) -> asyncio.Server:
    small = b"s" * 100

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = small if b"/small " in head.split(b"\r\n", 1)[0] else payload
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def fetch(open_connection: object, path: str, port: int) -> int:
    reader, writer = await open_connection()  # type: ignore[operator]
    writer.write(f"GET http://bench.test:{port}{path} HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n"
                 .encode())
    total = 0
    while chunk := await reader.read(1 << 20):
        total += len(chunk)
    writer.close()
    return total


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--small", type=int, default=200, help="small requests per way")
    args = parser.parse_args()
    server = await serve(b"x" * (args.mb << 20))
    port = server.sockets[0].getsockname()[1]

    async def resolver(host: str, port: int) -> list[ipaddress.IPv4Address]:
        return [ipaddress.IPv4Address("127.0.0.1")]

    with tempfile.TemporaryDirectory() as tmp:
        service = EgressService(resolver=resolver, allow_private="127.0.0.1/32", connection_burst=100000,
                                connection_rate=100000)
        proxy = await service.open("bench", str(Path(tmp) / "p.sock"), {"allow": ["bench.test"]})
        fwd = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-B", egress_forwarder.__file__, "--listen", "127.0.0.1:0", "--socket",
            proxy.socket_path, stdout=subprocess.PIPE)
        try:
            assert fwd.stdout is not None
            line = await fwd.stdout.readline()
            fport = int(re.fullmatch(rb"listening 127\.0\.0\.1:(\d+)\n", line).group(1))  # type: ignore[union-attr]
            ways = {
                "direct": lambda: asyncio.open_connection("127.0.0.1", port),
                "proxy": lambda: asyncio.open_unix_connection(proxy.socket_path),
                "forwarder": lambda: asyncio.open_connection("127.0.0.1", fport),
            }
            rates: dict[str, list[float]] = {w: [] for w in ways}
            small: dict[str, list[float]] = {w: [] for w in ways}
            for _ in range(args.n):
                for way, opener in ways.items():
                    start = time.perf_counter()
                    got = await fetch(opener, "/big", port)
                    rates[way].append(got / (time.perf_counter() - start) / 2**20)
                    start = time.perf_counter()
                    for _ in range(args.small // args.n):
                        await fetch(opener, "/small", port)
                    small[way].append((time.perf_counter() - start) / (args.small // args.n) * 1000)
            print(f"{args.mb} MiB download, median of {args.n} (MiB/s), and a 100-byte request on a new "
                  "connection (ms):")
            base_rate, base_small = statistics.median(rates["direct"]), statistics.median(small["direct"])
            for way in ways:
                rate, ms = statistics.median(rates[way]), statistics.median(small[way])
                print(f"  {way:10s} {rate:8.0f} MiB/s ({rate / base_rate:4.2f}x direct)   "
                      f"{ms:6.2f} ms ({ms / base_small:4.1f}x direct)")
            print(f"proxy counters: {proxy.metrics()}")
        finally:
            fwd.terminate()
            await fwd.wait()
            await service.close_all()
            server.close()


if __name__ == "__main__":
    asyncio.run(main())
