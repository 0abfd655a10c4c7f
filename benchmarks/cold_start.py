"""Cold start and round trip of a sandboxed python kernel against a plain ipykernel, measured in one run.

Cold start: from ``start_kernel`` to the first ``kernel_info_reply`` (the moment the kernel is usable, earlier
than ``wait_for_ready``, which also waits for iopub to go quiet). For the sandboxed kernel that includes making
its sandbox (uid, cgroups, workspace image, bubblewrap, agent) through the kernelhub provisioner; the peer is the
gateway venv's own ipykernel started by a plain ``KernelManager`` (``kernel_name="python3"``, tcp). Runs are
interleaved so that drift on the machine hits both alike. Round trip: ``x=1`` from ``execute_request`` to
``execute_reply``, on a warm kernel.

Run as root: ``.venv/bin/python benchmarks/cold_start.py [-n 10] [--round-trips 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager

SANDBOXED, PLAIN = "kernelhub-python", "python3"


async def first_kernel_info(kc: AsyncKernelClient, timeout: float = 60) -> None:
    """Ask for kernel_info until the first reply: a request sent before the kernel bound is re-sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg_id = kc.kernel_info()
        resend_at = time.monotonic() + 0.5
        while time.monotonic() < resend_at:
            try:
                reply = await kc.get_shell_msg(timeout=0.05)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                return
    raise TimeoutError("no kernel_info_reply")


async def round_trips(kc: AsyncKernelClient, count: int) -> list[float]:
    await kc.wait_for_ready(timeout=60)  # let start-up output settle first
    times = []
    for _ in range(count):
        start = time.perf_counter()
        msg_id = kc.execute("x=1")
        while True:
            reply = await kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        times.append(time.perf_counter() - start)
    return times


async def one(kernel_name: str, trips: int) -> tuple[float, list[float]]:
    km = AsyncKernelManager(kernel_name=kernel_name)
    start = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await first_kernel_info(kc)
        cold = time.perf_counter() - start
        return cold, await round_trips(kc, trips)
    finally:
        kc.stop_channels()
        await km.shutdown_kernel()


async def main(n: int, trips: int) -> None:
    cold: dict[str, list[float]] = {SANDBOXED: [], PLAIN: []}
    rtt: dict[str, list[float]] = {SANDBOXED: [], PLAIN: []}
    for i in range(n):
        for name in (SANDBOXED, PLAIN) if i % 2 == 0 else (PLAIN, SANDBOXED):
            c, r = await one(name, trips)
            cold[name].append(c)
            rtt[name].extend(r)
        print(f"run {i + 1}/{n}: sandboxed {cold[SANDBOXED][-1] * 1000:.0f} ms, "
              f"plain {cold[PLAIN][-1] * 1000:.0f} ms", file=sys.stderr)

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    print(f"cold start to first kernel_info_reply (median of {n}, interleaved):")
    print(f"  sandboxed python (kernelhub provisioner): {ms(cold[SANDBOXED]):8.1f} ms")
    print(f"  plain ipykernel (KernelManager python3):  {ms(cold[PLAIN]):8.1f} ms")
    print(f"  ratio sandboxed / plain:                  {ms(cold[SANDBOXED]) / ms(cold[PLAIN]):8.2f}x")
    print(f"x=1 round trip, execute_request -> execute_reply (median of {n * trips}):")
    print(f"  sandboxed python: {ms(rtt[SANDBOXED]):6.2f} ms")
    print(f"  plain ipykernel:  {ms(rtt[PLAIN]):6.2f} ms")
    print(f"  ratio:            {ms(rtt[SANDBOXED]) / ms(rtt[PLAIN]):6.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="cold starts of each kind (default 10)")
    parser.add_argument("--round-trips", type=int, default=20, help="x=1 round trips per kernel (default 20)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("cold_start.py: run as root (sandboxes need a uid of their own, cgroups and loop devices)")
    # A state dir sandbox uids can traverse, and kernelhub's kernelspecs installed by its own CLI into a prefix
    # on JUPYTER_PATH, so the benchmark neither needs nor changes an installation.
    state = tempfile.mkdtemp(dir="/tmp", prefix="kh-bench-")
    os.chmod(state, 0o711)
    specs = tempfile.mkdtemp(prefix="kh-bench-specs-")
    subprocess.run([str(Path(sys.executable).with_name("kernelhub")), "kernelspecs", "install", "--prefix", specs],
                   check=True, capture_output=True)
    os.environ["KERNELHUB_STATE_DIR"] = state
    os.environ["JUPYTER_PATH"] = os.path.join(specs, "share", "jupyter")
    try:
        asyncio.run(main(args.n, args.round_trips))
    finally:
        shutil.rmtree(specs, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
