"""Fixtures of the workspace tests: a base directory the sandbox uid can traverse, a workspace in each mode,
and a stand-in for the host next to it. Each is checked for leftovers when it goes. For the attacks run through
a real gateway: ``gateway_sandbox``, a python sandbox made through REST, deleted at module end."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelhub.sandbox.workspace import Workspace
from kernelhub.testing import Gateway
from tests.sandbox.workspace_support import (
    GID,
    LIMITS,
    MODES,
    UID,
    _mounts_under,
    _sandbox_dir,
)


@pytest.fixture(scope="module")
def gateway_sandbox(gateway: Gateway) -> Iterator[str]:
    """The id of a python sandbox created through the gateway's REST API; deleted when the module ends."""
    status, body = gateway.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, body
    yield body["id"]
    gateway.request("DELETE", f"/v1/sandboxes/{body['id']}")


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh directory the sandbox uid can traverse; checked for leftover mounts and loop devices after."""
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kh-ws-test-"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        leftovers = _mounts_under(path)
        for point in reversed(leftovers):
            subprocess.run(["umount", "-l", point], check=False)
        shutil.rmtree(path, ignore_errors=True)
        assert not leftovers, f"mounts left behind: {leftovers}"


@pytest.fixture(params=MODES)
def ws(request: pytest.FixtureRequest, base: Path) -> Iterator[Workspace]:
    workspace = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode=request.param)
    asyncio.run(workspace.create())
    try:
        yield workspace
    finally:
        asyncio.run(workspace.destroy())
        assert not _mounts_under(workspace.path)
        assert not workspace.path.exists()


@pytest.fixture
def outside(base: Path) -> Path:
    """A directory next to the sandbox, standing in for the host: nothing in it may ever change."""
    path = base / "outside"
    path.mkdir()
    (path / "secret.txt").write_text("host secret\n")
    return path
