"""Tests for kernelhub.sandbox.workspace: what ties the image and the file API together (modes, usage)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from kernelhub.sandbox.workspace import Workspace
from tests.sandbox.workspace_support import (
    GID,
    LIMITS,
    UID,
    MiB,
    _mounts_under,
    _sandbox_dir,
    _write,
)


def test_dir_mode_without_root_features(base: Path) -> None:
    ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="dir")
    asyncio.run(ws.create())
    try:
        assert ws.mode == "dir" and not ws.quota_enforced
        assert not ws.image.exists() and _mounts_under(ws.path) == []
        st = os.stat(ws.path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (UID, 0o755)
        _write(ws, "a/b.bin", b"z" * 100_000)
        used, files = ws.usage()
        assert used >= 100_000 and files == 2  # a/ and a/b.bin
        assert ws.capacity() == LIMITS.disk_mb * MiB
        asyncio.run(ws.reattach())
    finally:
        asyncio.run(ws.destroy())
    assert os.listdir(ws.sandbox_dir) == []
    asyncio.run(ws.destroy())


def test_bad_mode() -> None:
    with pytest.raises(ValueError):
        Workspace(Path("/nonexistent"), UID, GID, LIMITS, mode="tmpfs")


def test_usage_counts(ws: Workspace) -> None:
    before = ws.usage()
    _write(ws, "one/two.bin", b"\1" * MiB)
    used, files = ws.usage()
    assert used - before[0] >= MiB
    assert files - before[1] == 2
