"""Time from ``POST /v1/sandboxes`` to the first stdout of ``print(1)``, against a plain local ipykernel.

kernelhub: a real gateway (``kernelhub serve`` on a free port), sandbox create + NDJSON execute, measured to the
first ``stdout`` event. Peer, in the same run: jupyter_client starting the gateway venv's own unsandboxed
ipykernel and executing ``print(1)``, measured to the first ``stream`` message. Runs are interleaved so that
machine noise hits both alike. Usage: ``.venv/bin/python benchmarks/first_output.py [N]`` (as root).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import statistics
import sys
import time

from jupyter_client.manager import AsyncKernelManager

from kernelhub.testing import Gateway


def kernelhub_once(gw: Gateway) -> tuple[float, float]:
    auth = {"Authorization": f"Bearer {gw.token}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/sandboxes", json.dumps({"template": "python"}), auth)
    resp = conn.getresponse()
    sandbox = json.loads(resp.read())
    assert resp.status == 201, sandbox
    created = time.perf_counter()
    conn.request("POST", f"/v1/sandboxes/{sandbox['id']}/execute", json.dumps({"code": "print(1)"}),
                 {**auth, "Accept": "application/x-ndjson"})
    resp = conn.getresponse()
    while True:
        event = json.loads(resp.readline())
        if event["type"] == "stdout":
            first = time.perf_counter()
            break
    resp.read()
    conn.close()
    gw.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")
    return first - t0, created - t0


async def plain_once() -> float:
    km = AsyncKernelManager(kernel_name="python3")
    t0 = time.perf_counter()
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        # Like the gateway: usable at the first kernel_info_reply once iopub has joined (KERNELS.md).
        while True:
            try:
                await kc.kernel_info(reply=True, timeout=0.5)
                await kc.get_iopub_msg(timeout=0.2)
                break
            except (TimeoutError, queue.Empty):
                continue
        kc.execute("print(1)")
        while True:
            msg = await kc.get_iopub_msg(timeout=30)
            if msg["msg_type"] == "stream":
                return time.perf_counter() - t0
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    gw = Gateway()
    ours, creates, plain = [], [], []
    try:
        kernelhub_once(gw)  # warm caches on both sides
        asyncio.run(plain_once())
        for _ in range(n):
            first, created = kernelhub_once(gw)
            ours.append(first)
            creates.append(created)
            plain.append(asyncio.run(plain_once()))
            time.sleep(0.2)
    finally:
        gw.stop()
    med_ours, med_plain = statistics.median(ours), statistics.median(plain)
    print(f"runs: {n}")
    print(f"kernelhub  POST /v1/sandboxes -> first stdout of print(1): median {med_ours * 1000:.0f} ms "
          f"(create alone {statistics.median(creates) * 1000:.0f} ms)")
    print(f"plain      start_kernel -> first stdout of print(1):        median {med_plain * 1000:.0f} ms")
    print(f"ratio kernelhub / plain: {med_ours / med_plain:.2f}")


if __name__ == "__main__":
    main()
