"""The gateway under a flood of idle, unauthenticated TCP connections: its RSS and a legitimate client's latency.

kernelhub: a real gateway (``kernelhub serve`` on a free port). Peer, in the same run: a plain tornado
``HTTPServer`` with the same application and kernelhub's former settings (``idle_connection_timeout=3600``, no
caps), started through the same code path with the connection bounds turned off. The flood opens N connections
(default 19,000, the figure of the original report) from loopback source addresses 127.1.x.y, a handful per
address as a botnet would, sends nothing, and holds them while a legitimate client on 127.0.0.1 asks
``GET /v1/sandboxes`` once a second. Reported: the server's RSS before and under the flood, how many
connections it held (its open descriptors at the end) and closed, and the legitimate client's latencies. The
flood ends after ``HOLD_S`` seconds.

Measured here (2 shared cores, 19,000 connections): kernelhub 80 -> 100 MiB RSS, every flood connection closed
(4,096 held at most, each for the 10 s header deadline), 15/15 legitimate requests at 2.7 ms median; the
unbounded peer 80 -> 173 MiB, 10,008 descriptors held until its limit, 0/15 legitimate requests answered.

Usage: ``.venv/bin/python benchmarks/connection_flood.py [N]`` (as root: the flood needs a high RLIMIT_NOFILE).
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import socket
import statistics
import sys
import time

from kernelhub.testing import Gateway

HOLD_S = 15.0
PER_ADDRESS = 8


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def flood(gw: Gateway, n: int) -> dict[str, float]:
    pid = gw.proc.pid
    before = rss_mib(pid)
    socks: list[socket.socket] = []
    started = time.monotonic()
    for i in range(n):
        address = f"127.1.{(i // PER_ADDRESS) // 250}.{1 + (i // PER_ADDRESS) % 250}"
        s = socket.socket()
        s.settimeout(2)
        try:
            s.bind((address, 0))
            s.connect(("127.0.0.1", gw.port))
        except OSError:
            s.close()
            continue
        socks.append(s)
    opened = time.monotonic() - started
    latencies: list[float] = []
    peak = before
    held = 0
    sel = selectors.DefaultSelector()
    for s in socks:
        with contextlib.suppress(ValueError, OSError):
            sel.register(s, selectors.EVENT_READ)
    closed: set[int] = set()
    deadline = time.monotonic() + HOLD_S
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            status, _ = gw.request("GET", "/v1/sandboxes", timeout=30)
        except OSError:
            status = 0
        latencies.append((time.perf_counter() - t0) * 1000 if status == 200 else float("inf"))
        peak = max(peak, rss_mib(pid))
        for key, _ in sel.select(timeout=0):
            closed.add(key.fd)
            sel.unregister(key.fileobj)
        held = open_fds(pid)
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0)))
    for s in socks:
        s.close()
    sel.close()
    ok = [x for x in latencies if x != float("inf")]
    return {
        "rss_before": before, "rss_peak": peak, "opened_s": opened, "connected": len(socks), "fds_in_server": held,
        "closed_by_server": len(closed), "legit_ok": len(ok), "legit_all": len(latencies),
        "legit_median_ms": statistics.median(ok) if ok else float("nan"),
        "legit_max_ms": max(ok) if ok else float("nan"),
    }



def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 19000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 1024)), hard))
    results = {}
    for name, args in (
        ("kernelhub", []),
        # The peer: the same server with the bounds off (kernelhub's settings before them).
        ("unbounded", ["--ServeApp.header_timeout=3600", "--ServeApp.idle_timeout=3600",
                       "--ServeApp.max_connections_per_address=1000000", "--ServeApp.max_connections=1000000"]),
    ):
        gw = Gateway(extra_args=args)
        try:
            results[name] = flood(gw, n)
        finally:
            gw.stop()
    print(f"{n} idle connections held {HOLD_S:.0f} s, {PER_ADDRESS} per source address")
    print(f"{'':12} {'connected':>9} {'RSS before':>11} {'RSS peak':>9} {'fds':>6} {'closed':>7} {'legit ok':>9} "
          f"{'median ms':>10} {'max ms':>8}")
    for name, r in results.items():
        print(f"{name:12} {r['connected']:9d} {r['rss_before']:9.1f}Mi {r['rss_peak']:7.1f}Mi {r['fds_in_server']:6d} "
              f"{r['closed_by_server']:7d} {r['legit_ok']:4d}/{r['legit_all']:<4d} {r['legit_median_ms']:10.1f} "
              f"{r['legit_max_ms']:8.1f}")
    k, u = results["kernelhub"], results["unbounded"]
    growth_k, growth_u = k["rss_peak"] - k["rss_before"], u["rss_peak"] - u["rss_before"]
    print(f"RSS growth under the flood: kernelhub {growth_k:.1f} MiB, unbounded {growth_u:.1f} MiB "
          f"(ratio {growth_u / max(growth_k, 0.1):.1f}x)")


if __name__ == "__main__":
    main()
