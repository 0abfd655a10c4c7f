"""Limits (kernelhub.sandbox.limits): requested limits resolved against defaults and maximums (pure), then every
limit against code that tries to exhaust it, in real sandboxes: memory (a kernel OOM-killed, the cgroup says
so), pids, CPU quota, workspace disk, the run directory, file size, open files and /tmp; and a stop that leaves
nothing. Each of those tests makes a sandbox with the limits it attacks and checks the cleanup itself."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from kernelhub.errors import InvalidRequest
from kernelhub.sandbox.limits import DEFAULT_MAXIMUM, Limits, resolve_limits
from kernelhub.sandbox.sandbox import Sandbox

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]
MiB = 1024 * 1024


# ------------------------------------------------------------------------------------------------------------
# Resolving requested limits (pure)


def test_resolve_limits_defaults_lowering_and_raising() -> None:
    assert resolve_limits(None) == Limits() == resolve_limits({})
    assert resolve_limits({"memory_mb": None}) == Limits()
    lowered = resolve_limits({"memory_mb": 64, "cpu": 0.25, "pids": 16})
    assert (lowered.memory_mb, lowered.cpu, lowered.pids, lowered.disk_mb) == (64, 0.25, 16, Limits().disk_mb)
    raised = resolve_limits({"memory_mb": DEFAULT_MAXIMUM.memory_mb, "cpu": 4})
    assert raised.memory_mb == DEFAULT_MAXIMUM.memory_mb and raised.cpu == 4.0 and isinstance(raised.cpu, float)
    assert resolve_limits({"pids": 32.0}).pids == 32 and isinstance(resolve_limits({"pids": 32.0}).pids, int)
    assert resolve_limits({"memory_mb": 100}, maximum=Limits(memory_mb=100)).memory_mb == 100
    assert resolve_limits({}, defaults=Limits(memory_mb=64)).memory_mb == 64


@pytest.mark.parametrize(
    ("requested", "words"),
    [
        ({"memory_mb": DEFAULT_MAXIMUM.memory_mb + 1}, "at most"),
        ({"cpu": 4.5}, "at most"),
        ({"pids": 100_000}, "at most"),
        ({"memory_mb": 8}, "at least"),
        ({"pids": 0}, "at least"),
        ({"disk_mb": -1}, "at least"),
        ({"memroy_mb": 64}, "Unknown limit 'memroy_mb'"),
        ({"memory_mb": "512"}, "must be a number"),
        ({"memory_mb": True}, "must be a number"),
        ({"cpu": [1]}, "must be a number"),
        ({"memory_mb": 64.5}, "whole number"),
        ({"cpu": math.nan}, "finite"),
        ({"cpu": math.inf}, "finite"),
    ],
)
def test_resolve_limits_refuses(requested: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_limits(requested)
    assert words in info.value.message
    assert info.value.status == 400


def test_resolve_limits_refuses_non_mappings_and_respects_a_lower_maximum() -> None:
    with pytest.raises(InvalidRequest):
        resolve_limits([("memory_mb", 64)])  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        resolve_limits({"memory_mb": 101}, maximum=Limits(memory_mb=100))


# ------------------------------------------------------------------------------------------------------------
# Exhausting each limit in a real sandbox


@pytest.fixture(scope="module")
def box(factory: Any, leftovers_of: Any) -> Any:
    """``async with box(limits) as sb``: a sandbox that is stopped, and proven clean, afterwards."""

    @asynccontextmanager
    async def make(limits: Limits) -> AsyncIterator[Sandbox]:
        sandbox = await factory.create(limits=limits)
        try:
            yield sandbox
        finally:
            await sandbox.stop()
            assert leftovers_of(sandbox.id, sandbox.uid, factory.state_dir) == []
            assert sandbox.uid not in factory.uids.held()

    return make


async def spawn_quiet(sb: Sandbox, argv: list[str]) -> Any:
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        return await sb.spawn(argv, stdin=devnull, stdout=devnull, stderr=devnull)
    finally:
        os.close(devnull)


def test_memory_bomb_in_a_kernel_is_an_oom_kill(box: Any, kernels: Any, runner: asyncio.Runner, sh: Any) -> None:
    async def scenario() -> None:
        async with box(Limits(memory_mb=128)) as sb:
            km, kc = await kernels.start("kernelhub-python", sandbox=sb)
            try:
                reply, out = await kernels.execute(kc, "x = 1; print('alive')")
                assert out == "alive\n"
                kc.execute("a = bytearray(600 * 1024 * 1024)")
                deadline = time.monotonic() + 60
                while await km.is_alive():
                    assert time.monotonic() < deadline, "the kernel survived a 600 MB allocation in 128 MB"
                    await asyncio.sleep(0.1)
                assert sb.oom_kills() >= 1
                metrics = sb.metrics()
                assert metrics["oom_kills"] >= 1 and metrics["memory_peak_bytes"] <= 128 * MiB
                # The sandbox itself (its agent) carries on.
                assert sb.state == "running"
                assert await sh(sb, "echo ok") == (0, "ok\n")
            finally:
                await kernels.stop(km, kc, now=True)

    runner.run(scenario())


def test_fork_bomb_is_held_by_pids(box: Any, runner: asyncio.Runner, sh: Any) -> None:
    bomb = (
        "import os, time\n"
        "end = time.monotonic() + 3\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.001)\n"
        "os._exit(0)\n"
    )

    async def scenario() -> None:
        async with box(Limits(pids=32, memory_mb=512)) as sb:
            assert sb.metrics()["pids_limit"] == 32
            proc = await spawn_quiet(sb, ["python3", "-c", bomb])
            peak = 0
            start = time.monotonic()
            while time.monotonic() - start < 2.5:
                peak = max(peak, sb.metrics()["pids"])
                await asyncio.sleep(0.02)
            assert sb.pids_max_hits() > 0
            assert 16 < peak <= 32, peak
            await proc.kill()
            # Once the bomb has burnt out, the sandbox answers again.
            deadline = time.monotonic() + 20
            while sb.metrics()["pids"] > 4:
                assert time.monotonic() < deadline, sb.metrics()
                await asyncio.sleep(0.1)
            assert await sh(sb, "echo ok") == (0, "ok\n")

    runner.run(scenario())


def test_cpu_is_held_near_its_quota(box: Any, runner: asyncio.Runner) -> None:
    async def scenario() -> float:
        async with box(Limits(cpu=0.5)) as sb:
            # Two spinners: on two cores they would take 2 CPUs without the quota.
            proc = await spawn_quiet(sb, ["/bin/bash", "-c", "(while :; do :; done) & while :; do :; done"])
            await asyncio.sleep(0.5)
            before, t0 = sb.metrics()["cpu_seconds"], time.monotonic()
            await asyncio.sleep(3)
            used, wall = sb.metrics()["cpu_seconds"] - before, time.monotonic() - t0
            await proc.kill()
            return used / wall

    share = runner.run(scenario())
    # 0.5 CPU asked; unthrottled, the two spinners would take about 2.0 (less on a busy host, hence 0.1).
    assert 0.1 < share < 0.8, share


def test_workspace_disk_fill_is_enospc_and_the_host_disk_is_untouched(box: Any, runner: asyncio.Runner,
                                                                      sh: Any) -> None:
    async def scenario() -> None:
        async with box(Limits(disk_mb=16, max_file_mb=64)) as sb:
            assert sb.workspace is not None and sb.workspace.quota_enforced
            host = os.statvfs(sb.dir)
            code, out = await sh(sb, "dd if=/dev/zero of=/workspace/fill bs=1M count=64")
            assert code != 0 and "No space left on device" in out, out
            size = os.stat(sb.workspace.path / "fill").st_size
            assert 8 * MiB < size <= 16 * MiB
            # The host holds the sparse image and nothing more.
            assert os.stat(sb.workspace.image).st_blocks * 512 <= 17 * MiB
            after = os.statvfs(sb.dir)
            assert (host.f_bavail - after.f_bavail) * after.f_frsize < 48 * MiB
            # Many small files hit the same wall (python: no fork per file).
            code, out = await sh(sb, "python3 -c \"\nimport os\nfor i in range(100000):\n"
                                     "    open(f'/workspace/f{i}', 'w').write('x' * 4096)\n\"")
            assert code != 0 and "No space left on device" in out, out
            assert sb.metrics()["disk_bytes"] <= 16 * MiB
            # Freeing space makes the workspace usable again.
            assert (await sh(sb, "rm -f /workspace/f* && echo hi > /workspace/after && cat /workspace/after"))[1] \
                == "hi\n"

    runner.run(scenario())


def test_run_dir_cannot_fill_the_host_disk(box: Any, runner: asyncio.Runner, sh: Any) -> None:
    # /run/kernelhub (the kernels' sockets and connection files) is a small root-owned tmpfs: the sandbox
    # cannot write to it at all, and what its kernels bind there is bounded and charged to its memory cgroup.
    async def scenario() -> None:
        async with box(Limits(disk_mb=16, max_file_mb=8)) as sb:
            host = os.statvfs(sb.dir)
            code, out = await sh(sb, "head -c 8000000 /dev/zero > /run/kernelhub/f1")
            assert code != 0 and "Permission denied" in out, out
            assert not list(sb.run_dir.glob("f*"))
            assert os.statvfs(sb.run_dir).f_blocks * os.statvfs(sb.run_dir).f_frsize <= 4 * MiB
            after = os.statvfs(sb.dir)
            assert (host.f_bavail - after.f_bavail) * after.f_frsize < 48 * MiB

    runner.run(scenario())


def test_max_file_mb_is_rlimit_fsize(box: Any, runner: asyncio.Runner, sh: Any) -> None:
    write = (
        "import errno, resource, sys\n"
        "print(resource.getrlimit(resource.RLIMIT_FSIZE))\n"
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)\n"
        "    print('raised')\n"
        "except (ValueError, OSError):\n"
        "    print('cannot raise')\n"
        "for path in ('/workspace/big', '/tmp/big'):\n"
        "    try:\n"
        "        with open(path, 'wb') as f:\n"
        "            f.write(b'x' * (8 << 20))\n"
        "        print('wrote all')\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno])\n"
    )

    async def scenario() -> None:
        async with box(Limits(max_file_mb=4, disk_mb=64)) as sb:
            code, out = await sh(sb, "", argv=["python3", "-c", write])
            assert code == 0 and out.split("\n") == [f"({4 * MiB}, {4 * MiB})", "cannot raise", "EFBIG", "EFBIG",
                                                      ""], out
            assert sb.workspace is not None
            assert os.stat(sb.workspace.path / "big").st_size == 4 * MiB
            # Any program, in any directory: the limit is the process's, not the filesystem's.
            code, out = await sh(sb, "dd if=/dev/zero of=/tmp/dd bs=1M count=8; dd if=/dev/zero of=/workspace/dd "
                                     "bs=1M count=8")
            assert code != 0 and out.count("File too large") == 2, out
            assert os.stat(sb.workspace.path / "dd").st_size <= 4 * MiB

    runner.run(scenario())


def test_open_files_are_limited(box: Any, runner: asyncio.Runner, sh: Any) -> None:
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "print(soft, hard)\n"
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 2, hard * 2)); print('raised')\n"
        "except (ValueError, OSError): print('cannot raise')\n"
        "files = []\n"
        "try:\n"
        "    while True: files.append(open('/dev/null'))\n"
        "except OSError as e: print(e.strerror, len(files) < hard)\n"
    )

    async def scenario() -> None:
        async with box(Limits()) as sb:
            code, out = await sh(sb, "", argv=["python3", "-c", script])
            assert code == 0 and out.splitlines() == ["4096 4096", "cannot raise", "Too many open files True"], out

    runner.run(scenario())


def test_tmpfs_mounts_are_bounded_and_filling_them_leaves_the_sandbox_usable(box: Any, runner: asyncio.Runner,
                                                                              sh: Any) -> None:
    async def scenario() -> None:
        async with box(Limits(memory_mb=64, max_file_mb=256)) as sb:
            code, out = await sh(sb, "df -B1 --output=size /tmp /dev/shm | tail -2")
            sizes = [int(x) for x in out.split()]
            # Together 3/8 of the memory limit (their pages are charged to the memory cgroup).
            assert sizes == [16 * MiB, 8 * MiB], sizes
            host = os.statvfs("/tmp")
            code, out = await sh(sb, "for d in /tmp /dev/shm; do head -c 40000000 /dev/zero > $d/fill;"
                                     " done; touch /newfile /run/x /etc/x; df -B1 --output=used /tmp | tail -1")
            assert out.count("No space left on device") == 2, out
            assert "/newfile" in out and "Read-only file system" in out, out
            # Both full, and the sandbox still runs things (the root is read-only, nothing else grows).
            assert await sh(sb, "echo still alive") == (0, "still alive\n")
            assert sb.metrics()["memory_peak_bytes"] <= 64 * MiB
            after = os.statvfs("/tmp")
            assert (host.f_bavail - after.f_bavail) * after.f_frsize < 48 * MiB

    runner.run(scenario())


def test_stop_leaves_no_process_cgroup_mount_or_uid(factory: Any, runner: asyncio.Runner, sh: Any,
                                                    leftovers_of: Any) -> None:
    async def scenario() -> tuple[str, int, list[int]]:
        sb = await factory.create(limits=Limits(memory_mb=128))
        # Orphans that left the process group and session of what started them, and a stuck writer.
        await sh(sb, "setsid sleep 1000 & (setsid sh -c 'sleep 1001 &' &); "
                     "nohup sh -c 'while :; do echo x >> /workspace/log; sleep 0.1; done' >/dev/null 2>&1 &")
        assert sb.cgroup is not None
        members = sorted(sb.cgroup.pids())
        await sb.stop()
        return sb.id, sb.uid, members

    sandbox_id, uid, members = runner.run(scenario())
    assert len(members) >= 5, members
    assert leftovers_of(sandbox_id, uid, factory.state_dir) == []
    assert uid not in factory.uids.held() and not factory.live()
    # Gone, or a zombie of bwrap's waiting for the host's init to reap it.
    alive = [pid for pid in members if os.path.exists(f"/proc/{pid}")
             and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()]
    assert not alive
