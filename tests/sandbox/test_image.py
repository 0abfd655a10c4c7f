"""Tests for kernelhub.sandbox.image through loop-mode workspaces (root): ownership, mount options, quotas
for root and the sandbox uid, host-space checks, unmounting busy mounts, reattaching after a restart."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from kernelhub.errors import (
    DiskQuotaExceeded,
    NotFound,
    SandboxError,
)
from kernelhub.sandbox.files import UploadWriter
from kernelhub.sandbox.limits import Limits
from kernelhub.sandbox.workspace import Workspace
from tests.sandbox.workspace_support import (
    GID,
    LIMITS,
    UID,
    MiB,
    _as_sandbox,
    _loops_for,
    _mounts_under,
    _read,
    _sandbox_dir,
    _write,
)


@pytest.mark.root
class TestLoop:
    def test_create_owned_by_uid_and_mounted_nosuid_nodev(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        try:
            assert ws.mode == "loop" and ws.quota_enforced
            st = os.stat(ws.path)
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o755)
            assert os.listdir(ws.path) == []  # no lost+found
            with open("/proc/self/mounts") as mounts:
                line = next(line for line in mounts if line.split()[1] == str(ws.path))
            fstype, options = line.split()[2], line.split()[3].split(",")
            assert fstype == "ext4"
            assert "nosuid" in options and "nodev" in options
            assert "noexec" not in options  # users run programs they wrote
            img = os.stat(ws.image)
            assert (img.st_uid, stat.S_IMODE(img.st_mode)) == (0, 0o600)
            assert img.st_size == LIMITS.disk_mb * MiB
            assert img.st_blocks * 512 < 2 * MiB  # sparse: the host pays only for what is written
            assert 12 * MiB < ws.capacity() <= LIMITS.disk_mb * MiB
            used, files = ws.usage()
            assert used < 64 * 1024 and files == 0
        finally:
            asyncio.run(ws.destroy())

    def test_sandbox_uid_can_use_its_workspace_but_not_the_image(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        try:
            assert _as_sandbox("sh", "-c", f"echo hi > {ws.path}/mine").returncode == 0
            st = os.stat(ws.path / "mine")
            assert (st.st_uid, st.st_gid) == (UID, GID)
            assert _as_sandbox("cat", str(ws.image)).returncode != 0
            assert _as_sandbox("ls", str(ws.sandbox_dir)).returncode != 0  # 0711: reachable, not listable
        finally:
            asyncio.run(ws.destroy())

    def test_root_writes_hit_the_quota(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        try:
            fd = ws.open_write("big.bin")
            written = 0
            chunk = b"\xa5" * MiB
            with pytest.raises(OSError) as info:
                for _ in range(64):
                    written += os.write(fd, chunk)
            os.close(fd)
            assert info.value.errno == errno.ENOSPC  # even for root: mkfs -m 0 leaves nothing reserved
            assert 8 * MiB < written <= LIMITS.disk_mb * MiB
            ws.delete("big.bin")
            assert ws.usage()[0] < MiB
        finally:
            asyncio.run(ws.destroy())

    def test_upload_into_full_workspace_is_disk_and_leaves_nothing(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        try:
            upload = UploadWriter(ws, "dir/huge.bin", max_bytes=1024 * MiB)
            with pytest.raises(DiskQuotaExceeded) as info:
                for _ in range(64):
                    upload.write(b"\0" * MiB)
            assert (info.value.status, info.value.error) == (507, "disk")
            assert upload.closed
            with pytest.raises(NotFound):
                ws.stat("dir/huge.bin")
            assert ws.usage()[0] < MiB  # the space came back
            _write(ws, "small.txt", b"still works\n")
            assert _read(ws, "small.txt") == b"still works\n"
        finally:
            asyncio.run(ws.destroy())

    def test_files_limit(self, base: Path) -> None:
        limits = Limits(disk_mb=16, files=64, max_file_mb=1)
        ws = Workspace(_sandbox_dir(base), UID, GID, limits, mode="loop")
        asyncio.run(ws.create())
        try:
            created = 0
            with pytest.raises(DiskQuotaExceeded):
                for i in range(1000):
                    os.close(ws.open_write(f"f{i}"))
                    created += 1
            # mkfs rounds the inode count up to whole inode-table blocks per group: some slack, never less.
            assert limits.files <= created <= limits.files + 32
            assert ws.usage()[1] == created
            # The sandbox uid is held to the same count.
            touched = _as_sandbox("touch", f"{ws.path}/one-more")
            assert touched.returncode != 0
            assert b"No space left" in touched.stderr
        finally:
            asyncio.run(ws.destroy())

    def test_host_disk_full_refused_and_nothing_made(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop", min_host_free_mb=10**9)
        with pytest.raises(SandboxError) as info:
            asyncio.run(ws.create())
        assert (info.value.status, info.value.error) == (507, "host_disk_full")
        assert "MiB" in info.value.message
        assert os.listdir(ws.sandbox_dir) == []

    def test_destroy_unmounts_removes_image_and_is_idempotent(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        _write(ws, "a/b.txt", b"x" * 1000)
        assert _mounts_under(ws.path) == [str(ws.path)]
        assert _loops_for(ws.image)
        asyncio.run(ws.destroy())
        assert _mounts_under(ws.path) == []
        assert not ws.image.exists() and not ws.path.exists()
        assert _loops_for(ws.image) == []  # mount's loop device is autoclear
        asyncio.run(ws.destroy())  # again: nothing to do, no error
        assert os.listdir(ws.sandbox_dir) == []

    def test_destroy_busy_mount_detaches_lazily(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        holder = ws.open_write("held.txt")  # an open file keeps the mount busy
        try:
            asyncio.run(ws.destroy())
            assert _mounts_under(ws.path) == []
            assert not ws.path.exists() and not ws.image.exists()
        finally:
            os.close(holder)
        assert _loops_for(ws.image) == []  # the last reference is gone: the loop device detached

    def test_reattach_after_restart_keeps_files(self, base: Path) -> None:
        sandbox_dir = _sandbox_dir(base)
        ws = Workspace(sandbox_dir, UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        _write(ws, "notes/keep.txt", b"survives a restart\n")
        subprocess.run(["umount", str(ws.path)], check=True)  # as a host reboot would leave it

        # With the image there but unmounted, nothing may land on the host disk under the mount point.
        with pytest.raises(SandboxError) as info:
            ws.open_write("lost.txt")
        assert info.value.error == "workspace_unavailable"
        assert os.listdir(ws.path) == []

        again = Workspace(sandbox_dir, UID, GID, LIMITS)  # auto: an existing image means loop
        asyncio.run(again.reattach())
        try:
            assert again.mode == "loop" and again.quota_enforced
            assert _read(again, "notes/keep.txt") == b"survives a restart\n"
            asyncio.run(again.reattach())  # already mounted: no second mount
            assert _mounts_under(again.path) == [str(again.path)]
        finally:
            asyncio.run(again.destroy())
        assert _loops_for(again.image) == []

    def test_reattach_missing_workspace(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        with pytest.raises(SandboxError, match="missing"):
            asyncio.run(ws.reattach())

    def test_create_refuses_existing_and_auto_picks_loop(self, base: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS)
        asyncio.run(ws.create())
        try:
            assert ws.mode == "loop"
            _write(ws, "data.txt", b"precious")
            with pytest.raises(SandboxError, match="already exists"):
                asyncio.run(Workspace(ws.sandbox_dir, UID, GID, LIMITS, mode="loop").create())
            assert _read(ws, "data.txt") == b"precious"  # the refused create removed nothing
        finally:
            asyncio.run(ws.destroy())

    def test_hard_link_from_outside_is_impossible(self, base: Path, outside: Path) -> None:
        ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="loop")
        asyncio.run(ws.create())
        try:
            with pytest.raises(OSError) as info:
                os.link(outside / "secret.txt", ws.path / "secret.txt")
            assert info.value.errno == errno.EXDEV  # its own filesystem
        finally:
            asyncio.run(ws.destroy())
