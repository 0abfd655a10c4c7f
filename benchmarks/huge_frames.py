"""The gateway's memory under a kernel that sends huge messages (SECURITY.md pitfall 12; issue 9 item 2).

kernelhub: a real gateway (``kernelhub serve``), every socket to a kernel through its channel guard
(``kernelhub/sandbox/channel_guard.py``) with ``ZMQ_MAXMSGSIZE`` set. Peer, in the same run: the same gateway
with the gateway's kernel sockets made as jupyter_client makes them (no guard, ``ZMQ_MAXMSGSIZE`` unset), which
is how kernelhub read kernels before; it is started through this script's own launcher module, which swaps that
one method back and runs ``kernelhub serve``.

Each attack is python code in a sandbox (4096 MB of memory, the default output cap of 10 MiB) that
writes on its kernel's iopub socket with the kernel's key, zero-copy from ``mmap``\\ ed memory it never touched
(free for the sandbox):

- ``1GiB-frame``: one message with one 1 GiB buffer;
- ``100x8MiB-frames``: one message of 100 frames that all point at the same 8 MiB (800 MiB in all, each frame
  under any sensible ``ZMQ_MAXMSGSIZE``);
- ``near-max-flood``: 100 messages of 16 MiB each (just under the guard's bound of 16 MiB and an envelope),
  interrupts ignored.

Reported per attack and gateway (a fresh gateway each, so that its peak RSS is the attack's): the RSS before,
the peak (VmHWM) during, how the execution ended, and how long it took.

Measured here (2 shared cores), peak RSS growth of the gateway over the attack:

================  =========  ==========
attack            kernelhub  unbounded
================  =========  ==========
1GiB-frame           0.2 MiB   889 MiB (the message passed; the execution ended "ok")
100x8MiB-frames     16 MiB     808 MiB
near-max-flood      64 MiB      57 MiB (both stopped by the per-execution count of received bytes, which the
                                       peer keeps: only the socket layer differs)
================  =========  ==========

With the guard the first two end ``killed``/``output_truncated`` in under a second, the kernel restarted with the
reason in ``sandbox_logs``. Run it again with ``.venv/bin/python benchmarks/huge_frames.py`` (as root: sandboxes
need it).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

from kernelhub.testing import FORGE_PRELUDE, Gateway

MiB = 1024 * 1024

PRELUDE = FORGE_PRELUDE
EMPTY = "'display_data', {'data': {}, 'metadata': {}}"
ATTACKS = {
    "1GiB-frame": PRELUDE + f"_forge({EMPTY}, buffers=[memoryview(_mmap.mmap(-1, 1 << 30))])",
    "100x8MiB-frames": PRELUDE + f"_m = memoryview(_mmap.mmap(-1, 8 << 20))\n_forge({EMPTY}, buffers=[_m] * 100)",
    "near-max-flood": PRELUDE + "_m = memoryview(_mmap.mmap(-1, 16 << 20))\n"
                      f"for _i in range(100):\n    try:\n        _forge({EMPTY}, buffers=[_m])\n"
                      "    except KeyboardInterrupt:\n        pass\n",
}

#: The peer's launcher: kernelhub serve with the gateway's kernel sockets made as jupyter_client makes them.
UNBOUNDED_LAUNCHER = '''
from jupyter_client.manager import AsyncKernelManager
from kernelhub import cli
from kernelhub.sandbox import kernel_manager
kernel_manager.GuardedKernelManager._create_connected_socket = AsyncKernelManager._create_connected_socket
raise SystemExit(cli.main())
'''


def memory(pid: int) -> dict[str, float]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def attack(name: str, code: str, launcher: str | None) -> dict[str, Any]:
    env = {"PYTHONPATH": os.path.dirname(launcher)} if launcher else None
    module = os.path.splitext(os.path.basename(launcher))[0] if launcher else "kernelhub.cli"
    gw = Gateway(env=env, module=module)
    try:
        # Memory enough that the sender is not the first to run out (it may still: its kernel copies pages).
        status, sandbox = gw.request("POST", "/v1/sandboxes", {"template": "python", "limits": {"memory_mb": 4096}})
        assert status == 201, sandbox
        before = memory(gw.proc.pid)
        started = time.monotonic()
        status, ex = gw.request("POST", f"/v1/sandboxes/{sandbox['id']}/execute",
                                {"code": code, "timeout_s": 120}, timeout=600)
        took = time.monotonic() - started
        after = memory(gw.proc.pid) if gw.proc.poll() is None else {"VmRSS": float("nan"), "VmHWM": float("nan")}
        ended = f"{ex.get('status')}/{ex.get('reason')}" if isinstance(ex, dict) and "status" in ex else str(status)
        alive = gw.proc.poll() is None
        return {"before": before["VmRSS"], "peak": after["VmHWM"], "ended": ended, "s": took, "alive": alive}
    finally:
        gw.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        launcher = os.path.join(tmp, "kh_unbounded_serve.py")
        with open(launcher, "w") as f:
            f.write(UNBOUNDED_LAUNCHER)
        rows = []
        for name, code in ATTACKS.items():
            for peer, path in (("kernelhub", None), ("unbounded", launcher)):
                result = attack(name, code, path)
                rows.append((name, peer, result))
                print(f"{name:16} {peer:10} RSS {result['before']:7.1f} MiB -> peak {result['peak']:8.1f} MiB  "
                      f"(+{result['peak'] - result['before']:7.1f})  {result['ended']:26} {result['s']:6.1f} s"
                      f"{'' if result['alive'] else '  GATEWAY DIED'}", flush=True)
    print()
    for name in ATTACKS:
        k = next(r for n, p, r in rows if n == name and p == "kernelhub")
        u = next(r for n, p, r in rows if n == name and p == "unbounded")
        growth_k, growth_u = k["peak"] - k["before"], u["peak"] - u["before"]
        print(f"{name:16} peak RSS growth: kernelhub {growth_k:7.1f} MiB, unbounded {growth_u:7.1f} MiB "
              f"(ratio {growth_u / max(growth_k, 1.0):5.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
