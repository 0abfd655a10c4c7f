"""Helpers shared by the workspace tests (test_image, test_files, test_workspace).

Workspaces live under a fresh ``/tmp`` directory with mode 0711 (pytest's ``tmp_path`` is 0700, which the
sandbox uid could not traverse). Loop-mode tests need root and are marked ``root``; dir mode runs anywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kernelhub.sandbox.files import UploadWriter
from kernelhub.sandbox.limits import Limits
from kernelhub.sandbox.workspace import Workspace

IS_ROOT = os.geteuid() == 0
# An unprivileged uid of the sandbox's own, as the uid allocator would hand out; without root, our own.
UID = GID = 200_731 if IS_ROOT else os.getuid()
# The suite runs as root (tests/conftest.py stops it otherwise): nothing here is skipped.
ROOT = [pytest.mark.root]
MODES = ["dir", pytest.param("loop", marks=ROOT)]
MiB = 1024 * 1024
LIMITS = Limits(disk_mb=16, files=512, max_file_mb=4)


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def _loops_for(path: Path) -> list[str]:
    if not shutil.which("losetup"):
        return []
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(path) in line]


def _sandbox_dir(base: Path, name: str = "sb") -> Path:
    path = base / name
    path.mkdir()
    os.chmod(path, 0o711)  # as the sandbox service makes it: root-owned, traversable, not listable
    return path


def _write(ws: Workspace, rel: str, data: bytes) -> None:
    with UploadWriter(ws, rel) as upload:
        upload.write(data)


def _read(ws: Workspace, rel: str) -> bytes:
    fd, st = ws.open_read(rel)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _as_sandbox(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command as the sandbox uid, as code in the sandbox would (without the rest of the sandbox)."""
    return subprocess.run(argv, user=UID, group=GID, extra_groups=[], capture_output=True, check=False)


def _snapshot(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_size
