"""``Sandbox.create()`` + ``run_code("print(1)")`` through E2B's own SDK against kernelhub's ``/e2b``, next to
the same two calls through kernelhub's own client, in the same run against the same gateway.

Both are the sync clients an agent would use: E2B's ``e2b_code_interpreter.Sandbox`` configured by
``E2B_API_KEY``/``E2B_API_URL``/``E2B_SANDBOX_URL``, and ``kernelhub.client.Sandbox``. Each run creates a sandbox,
runs ``print(1)`` (checking its stdout), and kills it; runs are interleaved so that machine noise hits both
alike, after one warm-up of each. Also reported: the second ``run_code`` in the same sandbox (the per-call cost
once the kernel is up), and a foreground ``commands.run("echo 1")`` through each. Usage:
``.venv/bin/python benchmarks/e2b_vs_client.py [N]`` (as root; needs the ``test`` extra's e2b SDKs).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from kernelhub.client import Sandbox as KernelhubSandbox
from kernelhub.testing import Gateway


def then(sandbox: Any) -> tuple[float, float]:
    """After the first ``print(1)`` (timed by the caller): the next run_code and a command, in seconds; then
    the sandbox is killed. Both clients spell these the same way."""
    t1 = time.perf_counter()
    sandbox.run_code("print(2)")
    t2 = time.perf_counter()
    assert sandbox.commands.run("echo 1").stdout == "1\n"
    t3 = time.perf_counter()
    sandbox.kill()
    return t2 - t1, t3 - t2


def e2b_once(_gw: Gateway) -> tuple[float, float, float]:
    from e2b_code_interpreter import Sandbox

    t0 = time.perf_counter()
    sandbox = Sandbox.create()
    first = sandbox.run_code("print(1)")
    created = time.perf_counter() - t0
    assert first.logs.stdout == ["1\n"], first
    return (created, *then(sandbox))


def kernelhub_once(gw: Gateway) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    sandbox = KernelhubSandbox.create("python", url=gw.url, token=gw.token)
    first = sandbox.run_code("print(1)")
    created = time.perf_counter() - t0
    assert first.stdout == "1\n", first
    return (created, *then(sandbox))


def report(name: str, runs: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    medians = tuple(statistics.median(r[i] for r in runs) * 1000 for i in range(3))
    print(f"{name:<22} create + run_code('print(1)'): median {medians[0]:6.0f} ms   "
          f"next run_code: {medians[1]:5.1f} ms   commands.run('echo 1'): {medians[2]:5.1f} ms")
    return medians  # type: ignore[return-value]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    gw = Gateway()
    os.environ.update(E2B_API_KEY=gw.token, E2B_API_URL=f"{gw.url}/e2b", E2B_SANDBOX_URL=f"{gw.url}/e2b")
    peers: dict[str, Callable[[Gateway], tuple[float, float, float]]] = {
        "E2B SDK -> /e2b": e2b_once, "kernelhub client": kernelhub_once}
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in peers}
    try:
        for once in peers.values():
            once(gw)  # warm-up: imports, connection pools, page cache
        for _ in range(n):
            for name, once in peers.items():
                runs[name].append(once(gw))
    finally:
        gw.stop()
    print(f"runs: {n} each, interleaved")
    e2b = report("E2B SDK -> /e2b", runs["E2B SDK -> /e2b"])
    ours = report("kernelhub client", runs["kernelhub client"])
    print(f"ratio E2B SDK / kernelhub client: create+run {e2b[0] / ours[0]:.2f}, next run_code "
          f"{e2b[1] / ours[1]:.2f}, commands.run {e2b[2] / ours[2]:.2f}")


if __name__ == "__main__":
    main()
