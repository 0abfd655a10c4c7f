"""The warm pool against its peers, all in one run: kernelhub, the Jupyter Kernel Gateway and bare jupyter_client.

Peers: the Jupyter Kernel Gateway (``pip install -e '.[bench]'``) serving the gateway venv's own ipykernel, and
jupyter_client starting that same ipykernel directly on ipc sockets (no gateway, no sandbox: the floor).
Figures, each printed beside its peers with the ratio:

1. create -> first stdout of ``print(1)``, sequential, p50 and p95: kernelhub ``POST /v1/sandboxes`` then an
   NDJSON execute, with the default pool warm before each create (the pool is what is measured); the Kernel
   Gateway ``POST /api/kernels`` then an execute on its websocket; bare ``start_kernel`` then execute;
2. 20 creates at once, each then printing (kernelhub with ``--pool-size 20``, warm): the time until all 20 have
   printed, for each of the three;
3. the websocket execute round trip of ``x = 1`` on a warm sandbox (``/v1/sandboxes/{id}/stream``, until the
   ``end`` event), idle and while the pool refills after a burst, against the bare floor (jupyter_client
   ``execute`` until both the reply and the kernel's idle status);
4. 20 sandboxes executing ``x = 1`` back to back over their websockets for a few seconds, executions per second
   in all, against 20 bare ipykernels driven by jupyter_client in the same way;
5. PSS (``/proc/PID/smaps_rollup``) of an idle python sandbox (every process in its cgroup) against a bare
   ipykernel.

The machine's load (``/proc/loadavg``) is printed at the start and the end: run it when the machine is quiet.
Run as root: ``.venv/bin/python benchmarks/pool.py [--runs 15] [--seconds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.manager import AsyncKernelManager
from websockets.asyncio.client import connect as ws_connect
from websockets.sync.client import connect as ws_connect_sync

from kernelhub.testing import Gateway, free_port, terminate

KG_TOKEN = "kg-bench-token"
#: Where the bare kernels' ipc sockets go (removed at the end).
IPC_DIR = tempfile.mkdtemp(prefix="kh-bench-ipc-")


# -- helpers -----------------------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/smaps_rollup") as f:
            total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    return total


def execute_msg(code: str, session: str) -> dict[str, Any]:
    """A Jupyter execute_request as the Kernel Gateway's websocket takes it (legacy JSON framing)."""
    return {"header": {"msg_id": uuid.uuid4().hex, "username": "bench", "session": session,
                       "msg_type": "execute_request", "version": "5.3",
                       "date": datetime.datetime.now(datetime.UTC).isoformat()},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}


# -- kernelhub ---------------------------------------------------------------------------------------------

class Kernelhub:
    """A kernelhub gateway (``kernelhub.testing.Gateway``) and the calls the figures make on it."""

    def __init__(self, *args: str) -> None:
        self.gw = Gateway(extra_args=list(args))
        self.auth = {"Authorization": f"Bearer {self.gw.token}", "Content-Type": "application/json"}

    def pool(self) -> dict[str, int]:
        _, body = self.gw.request("GET", "/v1/templates")
        return next(t["pool"] for t in body["templates"] if t["name"] == "python")

    def wait_warm(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while (state := self.pool())["ready"] < state["size"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pool did not fill: {state}")
            time.sleep(0.05)

    def create_and_print(self) -> tuple[str, float]:
        """POST /v1/sandboxes, then print(1) over NDJSON: (sandbox id, seconds to the first stdout)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.gw.port, timeout=120)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/sandboxes", json.dumps({"template": "python"}), self.auth)
        resp = conn.getresponse()
        sandbox = json.loads(resp.read())
        assert resp.status == 201, sandbox
        conn.request("POST", f"/v1/sandboxes/{sandbox['id']}/execute", json.dumps({"code": "print(1)"}),
                     {**self.auth, "Accept": "application/x-ndjson"})
        resp = conn.getresponse()
        while json.loads(resp.readline())["type"] != "stdout":
            pass
        elapsed = time.perf_counter() - t0
        resp.read()
        conn.close()
        return sandbox["id"], elapsed

    def delete(self, sandbox_id: str) -> None:
        self.gw.request("DELETE", f"/v1/sandboxes/{sandbox_id}")

    def stream_url(self, sandbox_id: str) -> str:
        return f"ws://127.0.0.1:{self.gw.port}/v1/sandboxes/{sandbox_id}/stream?token={self.gw.token}"

    def sandbox_pids(self, sandbox_id: str) -> list[int]:
        with open(f"/sys/fs/cgroup/pids/kernelhub/{sandbox_id}/cgroup.procs") as f:
            return [int(x) for x in f.read().split()]

    def stop(self) -> None:
        self.gw.stop()


async def kh_round_trips(ws: Any, count: int) -> list[float]:
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        await ws.send(json.dumps({"type": "execute", "code": "x = 1", "request_id": str(i)}))
        while json.loads(await ws.recv())["type"] != "end":
            pass
        times.append(time.perf_counter() - t0)
    return times


async def kh_loop(ws: Any, stop_at: float) -> int:
    done = 0
    while time.perf_counter() < stop_at:
        await ws.send(json.dumps({"type": "execute", "code": "x = 1"}))
        while json.loads(await ws.recv())["type"] != "end":
            pass
        done += 1
    return done


# -- the Jupyter Kernel Gateway ----------------------------------------------------------------------------

class KernelGateway:
    """``jupyter kernelgateway`` on a free port, serving the venv's own python3 kernelspec."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
             f"--KernelGatewayApp.port={self.port}", f"--KernelGatewayApp.auth_token={KG_TOKEN}",
             "--KernelGatewayApp.log_level=ERROR"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                self._request("GET", "/api")
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("the Kernel Gateway did not start") from None
                time.sleep(0.1)

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"token {KG_TOKEN}"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            payload = resp.read()
        return json.loads(payload) if payload else None

    def create_and_print(self) -> tuple[str, float]:
        t0 = time.perf_counter()
        kernel = self._request("POST", "/api/kernels", {"name": "python3"})
        url = f"ws://127.0.0.1:{self.port}/api/kernels/{kernel['id']}/channels?token={KG_TOKEN}"
        with ws_connect_sync(url, max_size=None) as ws:
            ws.send(json.dumps(execute_msg("print(1)", uuid.uuid4().hex)))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("msg_type") == "stream" or msg.get("header", {}).get("msg_type") == "stream":
                    return kernel["id"], time.perf_counter() - t0

    def delete(self, kernel_id: str) -> None:
        self._request("DELETE", f"/api/kernels/{kernel_id}")

    def stop(self) -> None:
        terminate(self.proc, 30)


# -- bare jupyter_client -----------------------------------------------------------------------------------

async def bare_start(timeout: float = 120) -> tuple[AsyncKernelManager, AsyncKernelClient]:
    """The venv's ipykernel on ipc sockets (tcp ports picked by jupyter_client can collide when many start at
    once; kernelhub's kernels use ipc too), usable at its first kernel_info_reply once iopub has joined
    (KERNELS.md), as the gateways wait. Raises TimeoutError if it does not get there."""
    km = AsyncKernelManager(kernel_name="python3", transport="ipc",
                            ip=os.path.join(IPC_DIR, uuid.uuid4().hex[:12]))
    await km.start_kernel(stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    deadline = time.monotonic() + timeout
    while True:
        try:
            await kc.kernel_info(reply=True, timeout=0.5)
            await kc.get_iopub_msg(timeout=0.2)
            return km, kc
        except (TimeoutError, queue.Empty):
            if time.monotonic() > deadline or not await km.is_alive():
                await bare_stop(km, kc)
                raise TimeoutError("a bare ipykernel did not start") from None


async def bare_stop(km: AsyncKernelManager, kc: AsyncKernelClient) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


async def bare_create_and_print() -> float:
    t0 = time.perf_counter()
    km, kc = await bare_start()
    try:
        kc.execute("print(1)")
        while (await kc.get_iopub_msg(timeout=30))["msg_type"] != "stream":
            pass
        return time.perf_counter() - t0
    finally:
        await bare_stop(km, kc)


async def bare_execute(kc: AsyncKernelClient, code: str) -> None:
    """Until both the execute_reply and the idle status of the request (what kernelhub's ``end`` waits for):
    ipykernel sends the reply, then idle, so each channel is awaited in turn, without polling."""
    msg_id = kc.execute(code)
    while (await kc.get_shell_msg(timeout=30))["parent_header"].get("msg_id") != msg_id:
        pass
    while True:
        msg = await kc.get_iopub_msg(timeout=30)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            return


async def bare_round_trips(kc: AsyncKernelClient, count: int) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        await bare_execute(kc, "x = 1")
        times.append(time.perf_counter() - t0)
    return times


async def bare_loop(kc: AsyncKernelClient, stop_at: float) -> int:
    done = 0
    while time.perf_counter() < stop_at:
        await bare_execute(kc, "x = 1")
        done += 1
    return done


# -- figures -----------------------------------------------------------------------------------------------

async def round_trip_figures(kh: Kernelhub, sandbox_id: str, count: int) -> dict[str, list[float]]:
    """Round trips on a warm sandbox and a bare kernel, in alternating batches so that the machine's noise hits
    both alike: first with the pool full, then while it refills after a burst of creates that emptied it."""
    out: dict[str, list[float]] = {"kernelhub idle": [], "bare idle": [], "kernelhub refill": [], "bare refill": []}
    km, kc = await bare_start()
    try:
        async with ws_connect(kh.stream_url(sandbox_id), max_size=None) as ws:
            await kh_round_trips(ws, 20)
            await bare_round_trips(kc, 20)
            for _ in range(10):
                out["kernelhub idle"] += await kh_round_trips(ws, count // 10)
                out["bare idle"] += await bare_round_trips(kc, count // 10)
            await asyncio.to_thread(kh.wait_warm)
            burst = [(await asyncio.to_thread(kh.create_and_print))[0] for _ in range(kh.pool()["size"])]
            while (state := await asyncio.to_thread(kh.pool))["starting"] or state["ready"] < state["size"]:
                out["kernelhub refill"] += await kh_round_trips(ws, 10)
                out["bare refill"] += await bare_round_trips(kc, 10)
            for other in burst:
                await asyncio.to_thread(kh.delete, other)
    finally:
        await bare_stop(km, kc)
    return out


async def throughput_figures(kh: Kernelhub, n: int, seconds: float) -> tuple[int, int]:
    """Executions of ``x = 1`` done by ``n`` sandboxes (one websocket each) and by ``n`` bare kernels (one
    jupyter_client each), all back to back, in two rounds of ``seconds`` each, alternating."""
    ids = [(await asyncio.to_thread(kh.create_and_print))[0] for _ in range(n)]
    kernels = await asyncio.gather(*(bare_start() for _ in range(n)))
    done = {"kh": 0, "bare": 0}
    try:
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(ws_connect(kh.stream_url(i), max_size=None)) for i in ids]
            for _ in range(2):
                stop_at = time.perf_counter() + seconds
                done["kh"] += sum(await asyncio.gather(*(kh_loop(ws, stop_at) for ws in sockets)))
                stop_at = time.perf_counter() + seconds
                done["bare"] += sum(await asyncio.gather(*(bare_loop(kc, stop_at) for _, kc in kernels)))
    finally:
        await asyncio.gather(*(bare_stop(km, kc) for km, kc in kernels))
        for sandbox_id in ids:
            await asyncio.to_thread(kh.delete, sandbox_id)
    return done["kh"], done["bare"]


def pss_figures(kh: Kernelhub, n: int = 3) -> tuple[float, float]:
    """Median PSS of ``n`` idle python sandboxes (every process in the cgroup; nothing executed in them) and of
    ``n`` bare ipykernels, each measured 2 s after it was ready."""
    kh.wait_warm()
    ids = []
    for _ in range(n):
        status, sandbox = kh.gw.request("POST", "/v1/sandboxes", {"template": "python"})
        assert status == 201, sandbox
        ids.append(sandbox["id"])
    time.sleep(2)
    sandboxes = [pss(kh.sandbox_pids(i)) for i in ids]
    for sandbox_id in ids:
        kh.delete(sandbox_id)

    async def bare() -> list[int]:
        kernels = [await bare_start() for _ in range(n)]
        await asyncio.sleep(2)
        sizes = [pss([km.provisioner.process.pid]) for km, _ in kernels]  # type: ignore[union-attr]
        for km, kc in kernels:
            await bare_stop(km, kc)
        return sizes

    return statistics.median(sandboxes), statistics.median(asyncio.run(bare()))


def report(title: str, rows: list[tuple[str, float]], fmt: Callable[[float], str] = ms) -> None:
    print(title)
    base = rows[0][1]
    for name, value in rows:
        ratio = f"  ({value / base:5.2f}x kernelhub)" if name != rows[0][0] and base else ""
        print(f"  {name:<44} {fmt(value)}{ratio}")


def in_threads(fn: Callable[[], Any], n: int) -> tuple[float, list[Any]]:
    """Start ``fn`` in ``n`` threads at once; (seconds until the last one returned, their results)."""
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n + 1)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    print(f"[{time.strftime('%H:%M:%S')}] {name} (load {loadavg()})", file=sys.stderr, flush=True)
    yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="sequential creates of each kind (default 15)")
    parser.add_argument("--trips", type=int, default=200, help="round trips per figure (default 200)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput run (default 5)")
    parser.add_argument("--burst", type=int, default=20, help="creates at once (default 20)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("pool.py: run as root (sandboxes need a uid of their own, cgroups and loop devices)")
    print(f"load at start: {loadavg()}   ({os.cpu_count()} CPUs)")
    kg = KernelGateway()
    kh = Kernelhub()
    try:
        # 1. sequential create -> first stdout
        with section("sequential creates"):
            kh.wait_warm()
            kh.delete(kh.create_and_print()[0])  # warm caches on every side
            kg.delete(kg.create_and_print()[0])
            asyncio.run(bare_create_and_print())
            seq: dict[str, list[float]] = {"kernelhub": [], "kg": [], "bare": []}
            for _ in range(args.runs):
                kh.wait_warm()
                sandbox_id, took = kh.create_and_print()
                seq["kernelhub"].append(took)
                kh.delete(sandbox_id)
                kernel_id, took = kg.create_and_print()
                seq["kg"].append(took)
                kg.delete(kernel_id)
                seq["bare"].append(asyncio.run(bare_create_and_print()))
        for q, label in ((0.5, "p50"), (0.95, "p95")):
            report(f"create -> first stdout of print(1), sequential, {label} of {args.runs} "
                   f"(kernelhub: default pool, warm):",
                   [("kernelhub (REST create + NDJSON execute)", pct(seq["kernelhub"], q)),
                    ("Jupyter Kernel Gateway (REST + websocket)", pct(seq["kg"], q)),
                    ("bare jupyter_client (start_kernel)", pct(seq["bare"], q))])

        # 3. websocket round trip, idle and while the pool refills; 5. PSS
        with section("round trips"):
            kh.wait_warm()
            sandbox_id, _ = kh.create_and_print()
            trips = asyncio.run(round_trip_figures(kh, sandbox_id, args.trips))
            kh.delete(sandbox_id)
        floor = statistics.median(trips["bare idle"])
        print("websocket execute round trip of x = 1, median (kernelhub and bare interleaved in batches; "
              "ratio to the bare floor):")
        for name, label in (("bare idle", "bare jupyter_client, the floor (reply + idle)"),
                            ("kernelhub idle", "kernelhub /stream"),
                            ("bare refill", "bare jupyter_client, while kernelhub's pool refills"),
                            ("kernelhub refill", "kernelhub /stream, while its pool refills")):
            values = trips[name]
            print(f"  {label:<52} {ms(statistics.median(values))}  ({statistics.median(values) / floor:5.2f}x "
                  f"floor, {len(values)} trips)")

        # 5. memory of an idle sandbox against a bare kernel
        with section("memory"):
            sandbox_pss, bare_pss = pss_figures(kh)
        print("PSS of an idle python kernel with everything around it (median of 3, 2 s after it was ready):")
        print(f"  kernelhub sandbox (bwrap, agent, kernel)      {sandbox_pss / 2**20:8.1f} MiB  "
              f"({sandbox_pss / bare_pss:5.2f}x bare)")
        print(f"  bare ipykernel                                {bare_pss / 2**20:8.1f} MiB")

        # 4. throughput of 20 sandboxes against 20 bare kernels, in two alternating rounds each
        with section("throughput"):
            kh_done, bare_done = asyncio.run(throughput_figures(kh, args.burst, args.seconds / 2))
        print(f"{args.burst} kernels executing x = 1 back to back for {args.seconds:g} s (two alternating rounds), "
              "executions per second:")
        print(f"  kernelhub (websockets)                        {kh_done / args.seconds:8.1f}/s  "
              f"({kh_done / bare_done:5.2f}x bare)")
        print(f"  bare jupyter_client                           {bare_done / args.seconds:8.1f}/s")
    finally:
        kh.stop()

    # 2. a burst of creates with a pool of that size
    kh20 = Kernelhub("--pool-size", str(args.burst))
    try:
        with section(f"{args.burst} creates at once"):
            kh20.wait_warm()
            kh_all, kh_made = in_threads(kh20.create_and_print, args.burst)
            for sandbox_id, _ in kh_made:
                kh20.delete(sandbox_id)
            kg_all, kg_made = in_threads(kg.create_and_print, args.burst)
            for kernel_id, _ in kg_made:
                kg.delete(kernel_id)

            async def bare_burst() -> float:
                t0 = time.perf_counter()
                await asyncio.gather(*(bare_create_and_print() for _ in range(args.burst)))
                return time.perf_counter() - t0

            bare_all = asyncio.run(bare_burst())
        report(f"{args.burst} creates at once, each then printing: until the last has printed "
               f"(kernelhub: --pool-size {args.burst}, warm):",
               [("kernelhub", kh_all), ("Jupyter Kernel Gateway", kg_all), ("bare jupyter_client", bare_all)])
        print(f"  kernelhub slowest single create -> print       {ms(max(t for _, t in kh_made))}")
    finally:
        kh20.stop()
        kg.stop()
    print(f"load at end: {loadavg()}")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(IPC_DIR, ignore_errors=True)
