"""The uid allocator (kernelhub.sandbox.uids) across pools and processes sharing one lock directory."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernelhub.errors import SandboxError
from kernelhub.sandbox.uids import UidPool


def test_two_pools_on_one_lock_dir_never_share_a_uid(tmp_path: Path) -> None:
    a, b = UidPool(300_000, 6, tmp_path), UidPool(300_000, 6, tmp_path)
    got_a, got_b = [], []
    for _ in range(3):
        got_a.append(a.acquire())
        got_b.append(b.acquire())
    assert len(set(got_a) | set(got_b)) == 6 and set(got_a) == a.held() and set(got_b) == b.held()
    with pytest.raises(SandboxError) as info:
        b.acquire()
    assert info.value.error == "capacity"
    a.release(got_a[0])
    assert b.acquire() == got_a[0]
    assert not a.try_hold(got_a[0]) and not a.try_hold(got_a[1])  # B's, and A's own
    for uid in list(a.held()):
        a.release(uid)
    assert a.held() == set() and a.try_hold(got_a[1])


def test_a_uid_held_by_another_process_is_skipped(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open("{tmp_path}/300100.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        pool = UidPool(300_100, 2, tmp_path)
        assert pool.acquire() == 300_101
        with pytest.raises(SandboxError):
            pool.acquire()
        holder.kill()
    assert pool.acquire() == 300_100  # the lock went with the process


def test_uid_pool_refuses_low_ranges(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        UidPool(0, 10, tmp_path)
    with pytest.raises(ValueError):
        UidPool(200_000, 0, tmp_path)
