"""Time from ``kernelhub serve`` to every sandbox restored, after the gateway was killed (issue 10).

A gateway creates ``N`` sandboxes (python, 20 by default; each with a file in its workspace and a variable in
its kernel), then is killed with SIGKILL. A successor is started on the same state directory; the time measured
runs from its ``Popen`` to the first answer of its HTTP port: the gateway restores every sandbox before it
listens (kernelhub.services.sandboxes.Sandboxes._restore), so that moment is also the one from which every
sandbox answers. Each is then checked: ``running``, ``restored_at`` set, its file there, a fresh kernel (the
variable gone). For comparison the same successor's start with nothing to restore is timed too (the fixed cost
of ``kernelhub serve``), and the first gateway's N creates.

The machine's load (``/proc/loadavg``) is printed at the start and the end. Run as root:
``.venv/bin/python benchmarks/restore.py [--sandboxes 20]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from kernelhub.testing import Gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sandboxes", type=int, default=20)
    args = parser.parse_args()
    n = args.sandboxes
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    # No warm pool: its refill would compete with the restore for the two cores and blur what is measured.
    extra = ["--pool-size", "0", "--max-sandboxes", str(max(20, n))]

    t0 = time.monotonic()
    empty = Gateway(extra_args=extra)
    empty_start = time.monotonic() - t0
    empty.stop()

    first = Gateway(extra_args=extra)
    ids: list[str] = []
    try:
        t0 = time.monotonic()
        for i in range(n):
            status, sb = first.request("POST", "/v1/sandboxes", {"template": "python", "metadata": {"i": i}})
            assert status == 201, sb
            ids.append(sb["id"])
            assert first.request("PUT", f"/v1/sandboxes/{sb['id']}/files/n.txt", raw=str(i).encode())[0] == 201
            assert first.request("POST", f"/v1/sandboxes/{sb['id']}/execute", {"code": "x = 1"})[0] == 200
        created = time.monotonic() - t0
        first.crash()
    except BaseException:
        first.stop()
        raise

    t0 = time.monotonic()
    second = Gateway(extra_args=extra, state_dir=first.state_dir)
    restored = time.monotonic() - t0
    try:
        for i, sid in enumerate(ids):
            status, info = second.request("GET", f"/v1/sandboxes/{sid}")
            assert status == 200 and info["state"] == "running" and "restored_at" in info, info
            assert second.request("GET", f"/v1/sandboxes/{sid}/files/n.txt") == (200, str(i).encode())
            status, ex = second.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "print('x' in dir())"})
            assert (status, ex["stdout"]) == (200, "False\n"), ex
        line = next((ln for ln in second.log().splitlines() if "restored" in ln), "")
    finally:
        second.stop()
        shutil.rmtree(first.state_dir, ignore_errors=True)
    print(f"{n} sandboxes created one after another by the first gateway: {created:.1f} s "
          f"({created / n * 1000:.0f} ms each)")
    print(f"kernelhub serve -> answering, nothing to restore:             {empty_start:.2f} s")
    print(f"kernelhub serve -> answering with all {n} restored (after kill -9): {restored:.2f} s "
          f"(ratio to an empty start {restored / empty_start:.1f}x); every one checked: running, restored_at, "
          "its file, a fresh kernel")
    if line:
        print(f"gateway log: {line.strip()[:200]}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
