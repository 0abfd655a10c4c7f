"""Tests for kernelhub.sandbox.workspace: path splitting, loop-mounted quotas, and the file operations the
gateway runs as root against a workspace that hostile sandbox code filled with symlinks, FIFOs and hard links.

Workspaces live under a fresh ``/tmp`` directory with mode 0711 (pytest's ``tmp_path`` is 0700, which the
sandbox uid could not traverse). Loop-mode tests need root and are marked ``root``; dir mode runs anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelhub.errors import (
    Conflict,
    DiskQuotaExceeded,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SandboxError,
)
from kernelhub.sandbox import workspace as workspace_mod
from kernelhub.sandbox.limits import Limits
from kernelhub.sandbox.workspace import UploadWriter, Workspace, split_workspace_path

IS_ROOT = os.geteuid() == 0
# An unprivileged uid of the sandbox's own, as the uid allocator would hand out; without root, our own.
UID = GID = 200_731 if IS_ROOT else os.getuid()
# The suite runs as root (tests/conftest.py stops it otherwise): nothing here is skipped.
ROOT = [pytest.mark.root]
MODES = ["dir", pytest.param("loop", marks=ROOT)]
MiB = 1024 * 1024
LIMITS = Limits(disk_mb=16, files=512, max_file_mb=4)


# ------------------------------------------------------------------------------------------------------------
# Fixtures


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def _loops_for(path: Path) -> list[str]:
    if not shutil.which("losetup"):
        return []
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if str(path) in line]


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


def _sandbox_dir(base: Path, name: str = "sb") -> Path:
    path = base / name
    path.mkdir()
    os.chmod(path, 0o711)  # as the sandbox service makes it: root-owned, traversable, not listable
    return path


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


# ------------------------------------------------------------------------------------------------------------
# Path splitting (pure)


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("", []),
        ("/", []),
        ("//", []),
        (".", []),
        ("./", []),
        ("a", ["a"]),
        ("a/b/c.txt", ["a", "b", "c.txt"]),
        ("a//b/", ["a", "b"]),
        ("./a/./b/.", ["a", "b"]),
        ("a\\b", ["a\\b"]),
        ("..\\..\\etc", ["..\\..\\etc"]),
        ("...", ["..."]),
        ("..a/a..", ["..a", "a.."]),
        (" lead and trail ", [" lead and trail "]),
        ("données/日本.txt", ["données", "日本.txt"]),
        ("x" * 255, ["x" * 255]),
        ("\udcff.bin", ["\udcff.bin"]),  # a non-UTF-8 name as os.listdir shows it (surrogateescape)
    ],
)
def test_split_accepts(path: str, parts: list[str]) -> None:
    assert split_workspace_path(path) == parts


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../x",
        "a/..",
        "a/../b",
        "a/../../b",
        "./../x",
        "x/./../../../etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        "/workspace/x",
        "/./x",
        "a\x00b",
        "\x00",
        "a/\x00/b",
        "x" * 256,
        "é" * 128,  # 256 bytes in UTF-8
        "a/" + "y" * 300,
        "a/" * 2049,  # 4098 bytes
        "\ud800",  # a lone surrogate: no bytes on disk could have this name
    ],
)
def test_split_refuses(path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        split_workspace_path(path)
    assert info.value.status == 400
    assert info.value.message.endswith(".")
    assert len(info.value.message) < 300  # a hostile path does not balloon the error body


@pytest.mark.parametrize("path", [None, b"a", 3, ["a"]])
def test_split_refuses_non_strings(path: object) -> None:
    with pytest.raises(InvalidRequest):
        split_workspace_path(path)  # type: ignore[arg-type]


def test_split_messages_say_why() -> None:
    with pytest.raises(InvalidRequest, match="absolute"):
        split_workspace_path("/etc/passwd")
    with pytest.raises(InvalidRequest, match=r"'\.\.'"):
        split_workspace_path("a/../../b")
    with pytest.raises(InvalidRequest, match="NUL"):
        split_workspace_path("a\x00b")
    with pytest.raises(InvalidRequest, match="255 bytes"):
        split_workspace_path("n" * 256)
    with pytest.raises(InvalidRequest, match="4096 bytes"):
        split_workspace_path("p/" * 3000)


def test_iso_times_are_utc_z_and_clamped() -> None:
    assert workspace_mod._iso(0) == "1970-01-01T00:00:00.000000Z"
    assert workspace_mod._iso(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"
    # The sandbox sets mtimes at will (touch -d); nothing it sets may break a listing.
    assert workspace_mod._iso(2**63 * 10**9).startswith("9999-12-31T23:59:59")  # st_mtime_ns of a max time_t
    assert workspace_mod._iso(-(2**63) * 10**9).startswith("0001-01-01T00:00:00")


# ------------------------------------------------------------------------------------------------------------
# Loop-mounted workspaces: ownership, quotas, lifecycle (root)


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


# ------------------------------------------------------------------------------------------------------------
# Dir mode


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


# ------------------------------------------------------------------------------------------------------------
# File operations (both modes)


def test_upload_read_list_stat_delete(ws: Workspace) -> None:
    with UploadWriter(ws, "src/pkg/data.csv") as upload:
        upload.write(b"a,b\n")
        upload.write(memoryview(b"1,2\n"))
    assert upload.size == 8 and upload.path == "src/pkg/data.csv"
    for rel, mode in (("src", 0o755), ("src/pkg", 0o755), ("src/pkg/data.csv", 0o644)):
        st = os.lstat(ws.path / rel)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, mode)

    fd, st = ws.open_read("src//pkg/./data.csv")
    try:
        assert stat.S_ISREG(st.st_mode) and st.st_size == 8
        assert os.read(fd, 100) == b"a,b\n1,2\n"
    finally:
        os.close(fd)

    entries = ws.list_dir("src/pkg")
    assert len(entries) == 1
    entry = entries[0]
    assert {k: entry[k] for k in ("name", "path", "type", "size")} == {
        "name": "data.csv",
        "path": "src/pkg/data.csv",
        "type": "file",
        "size": 8,
    }
    assert entry["modified"].endswith("Z")
    modified = datetime.datetime.fromisoformat(entry["modified"].replace("Z", "+00:00"))
    assert abs((modified - datetime.datetime.now(datetime.UTC)).total_seconds()) < 60
    assert [(e["name"], e["type"], e["size"]) for e in ws.list_dir("")] == [("src", "dir", 0)]
    assert ws.list_dir("/") == ws.list_dir("")
    assert ws.stat("src")["type"] == "dir"
    assert ws.stat("")["path"] == "" and ws.stat("")["type"] == "dir"

    fd = ws.open_write("src/pkg/data.csv")  # an existing file is truncated
    os.write(fd, b"new")
    os.close(fd)
    assert _read(ws, "src/pkg/data.csv") == b"new"

    ws.delete("src/pkg/data.csv")
    with pytest.raises(NotFound):
        ws.stat("src/pkg/data.csv")
    ws.delete("src")
    assert ws.list_dir("") == []


def test_errors_are_clear(ws: Workspace) -> None:
    _write(ws, "dir/file.txt", b"x")
    with pytest.raises(InvalidRequest, match="is a directory"):
        ws.open_read("dir")
    with pytest.raises(InvalidRequest, match="is a directory"):
        ws.open_read("")
    with pytest.raises(InvalidRequest, match="is a directory"):
        ws.open_write("dir")
    with pytest.raises(NotFound):
        ws.open_read("nope.txt")
    with pytest.raises(NotFound):
        ws.list_dir("nope")
    with pytest.raises(InvalidRequest, match="not a directory"):
        ws.open_read("dir/file.txt/x")
    with pytest.raises(InvalidRequest, match="not a directory"):
        ws.list_dir("dir/file.txt")
    with pytest.raises(NotFound):
        ws.open_write("missing/parent.txt", make_parents=False)
    with pytest.raises(NotFound):
        ws.delete("nope")
    with pytest.raises(InvalidRequest, match="root cannot be deleted"):
        ws.delete("")
    with pytest.raises(InvalidRequest, match="root cannot be deleted"):
        ws.delete("/")
    with pytest.raises(InvalidRequest):
        ws.open_read("../sb/workspace.img")
    with pytest.raises(InvalidRequest):
        ws.delete("..")


def test_upload_over_max_file_mb_is_refused_and_removed(ws: Workspace) -> None:
    upload = UploadWriter(ws, "big.bin")
    assert upload.max_bytes == LIMITS.max_file_mb * MiB
    with pytest.raises(PayloadTooLarge) as info:
        for _ in range(LIMITS.max_file_mb + 1):
            upload.write(b"\0" * MiB)
    assert info.value.status == 413
    with pytest.raises(NotFound):
        ws.stat("big.bin")
    upload.abort()  # idempotent


def test_upload_abort_and_context_manager_failure_remove_the_file(ws: Workspace) -> None:
    with pytest.raises(RuntimeError):
        with UploadWriter(ws, "partial.txt") as upload:
            upload.write(b"half")
            raise RuntimeError("client went away")
    with pytest.raises(NotFound):
        ws.stat("partial.txt")
    # The sandbox replaced the partial file with its own: abort must not remove that one.
    upload = UploadWriter(ws, "swapped.txt")
    os.rename(ws.path / "swapped.txt", ws.path / "moved.txt")
    (ws.path / "swapped.txt").write_text("the sandbox's own")
    upload.abort()
    assert (ws.path / "swapped.txt").read_text() == "the sandbox's own"


def test_non_utf8_names_round_trip(ws: Workspace) -> None:
    fd = os.open(os.path.join(os.fsencode(ws.path), b"\xff\xfe.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"bytes name")
    os.close(fd)
    [entry] = ws.list_dir("")
    # JSON carries text: U+FFFD for each byte that is not UTF-8, and the bytes themselves percent-encoded in
    # url_path, which the file routes decode (surrogateescape) to the name's bytes again.
    assert (entry["name"], entry["path"], entry["url_path"]) == ("\ufffd\ufffd.bin", "\ufffd\ufffd.bin", "%FF%FE.bin")
    assert _read(ws, urllib.parse.unquote(entry["url_path"], errors="surrogateescape")) == b"bytes name"
    assert ws.stat("\udcff\udcfe.bin")["url_path"] == "%FF%FE.bin"
    assert "url_path" not in ws.stat("")


def test_usage_counts(ws: Workspace) -> None:
    before = ws.usage()
    _write(ws, "one/two.bin", b"\1" * MiB)
    used, files = ws.usage()
    assert used - before[0] >= MiB
    assert files - before[1] == 2


# ------------------------------------------------------------------------------------------------------------
# Symlink, FIFO and hard-link attacks (both modes)


def test_symlinked_directory_to_etc(ws: Workspace) -> None:
    os.symlink("/etc", ws.path / "link")
    hostname_existed = os.path.exists("/etc/hostname")
    for attempt in (
        lambda: ws.open_read("link/passwd"),
        lambda: ws.list_dir("link"),
        lambda: ws.stat("link/passwd"),
        lambda: ws.open_write("link/kernelhub-was-here"),
        lambda: UploadWriter(ws, "link/kernelhub-was-here"),
        lambda: ws.delete("link/hostname"),
    ):
        with pytest.raises((InvalidRequest, NotFound)) as info:
            attempt()
        assert info.value.status in (400, 404)
    assert not os.path.lexists("/etc/kernelhub-was-here")
    assert os.path.exists("/etc/hostname") == hostname_existed
    assert ws.stat("link")["type"] == "symlink"  # the link itself is described, not followed


def test_symlink_to_shadow_is_never_read_or_written(ws: Workspace, outside: Path) -> None:
    # First against a decoy, so that a bug would show here before it could touch the real file.
    decoy = outside / "secret.txt"
    before = _snapshot(decoy)
    os.symlink(decoy, ws.path / "decoy")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        ws.open_read("decoy")
    with pytest.raises(InvalidRequest, match="symbolic link"):
        ws.open_write("decoy")
    with pytest.raises(InvalidRequest):
        UploadWriter(ws, "decoy")
    assert _snapshot(decoy) == before

    shadow = Path("/etc/shadow")
    if not shadow.exists():
        # A machine without shadow passwords: a root-only file of our own stands in for it.
        shadow = outside / "shadow"
        shadow.write_text("root:secret:1:0:99999:7:::\n")
        shadow.chmod(0o600)
    original = _snapshot(shadow)
    os.symlink(shadow, ws.path / "evil")
    try:
        with pytest.raises(InvalidRequest):
            ws.open_read("evil")
        with pytest.raises(InvalidRequest):
            ws.open_write("evil")
        with pytest.raises(InvalidRequest):
            UploadWriter(ws, "evil")
        assert _snapshot(shadow) == original
        assert ws.stat("evil")["type"] == "symlink"
    finally:
        if _snapshot(shadow)[0] != original[0]:  # never leave a broken host behind, even if the test failed
            shadow.write_bytes(original[0])


def test_dangling_symlink_is_not_created_through(ws: Workspace, outside: Path) -> None:
    target = outside / "created-through-link"
    os.symlink(target, ws.path / "new.txt")
    with pytest.raises(InvalidRequest):
        ws.open_write("new.txt")
    with pytest.raises(InvalidRequest):
        _write(ws, "new.txt", b"payload")
    assert not os.path.lexists(target)


def test_symlink_pointing_inside_is_not_followed_either(ws: Workspace) -> None:
    _write(ws, "real/file.txt", b"inside")
    os.symlink("real", ws.path / "alias")
    os.symlink("real/file.txt", ws.path / "file-alias")
    os.symlink(ws.path / "real", ws.path / "abs-alias")
    for rel in ("alias/file.txt", "file-alias", "abs-alias/file.txt"):
        with pytest.raises(InvalidRequest):
            ws.open_read(rel)
    assert _read(ws, "real/file.txt") == b"inside"


def test_symlinked_parent_refused_for_writes(ws: Workspace, outside: Path) -> None:
    _write(ws, "a/keep.txt", b"k")
    os.symlink(outside, ws.path / "a" / "b")
    for rel in ("a/b/x.txt", "a/b/c/d/x.txt"):
        with pytest.raises(InvalidRequest, match="symbolic link"):
            ws.open_write(rel)
        with pytest.raises(InvalidRequest):
            UploadWriter(ws, rel)
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    with pytest.raises(InvalidRequest):
        ws.open_write("a/b/secret.txt", make_parents=False)
    assert (outside / "secret.txt").read_text() == "host secret\n"


def test_list_dir_does_not_follow(ws: Workspace, outside: Path) -> None:
    os.symlink(outside, ws.path / "out-dir")
    os.symlink(outside / "secret.txt", ws.path / "out-file")
    os.symlink("/nonexistent/target", ws.path / "dangling")
    os.mkfifo(ws.path / "pipe")
    entries = {e["name"]: e for e in ws.list_dir("")}
    assert {name: e["type"] for name, e in entries.items()} == {
        "dangling": "symlink",
        "out-dir": "symlink",
        "out-file": "symlink",
        "pipe": "other",
    }
    assert all(e["size"] == 0 for e in entries.values())  # not the target's size
    assert "secret.txt" not in {e["name"] for e in entries.values()}


def test_delete_directory_with_symlink_out_deletes_only_the_link(ws: Workspace, outside: Path) -> None:
    _write(ws, "d/sub/f.txt", b"x")
    os.symlink(outside, ws.path / "d" / "sub" / "escape")
    os.symlink(outside / "secret.txt", ws.path / "d" / "file-escape")
    ws.delete("d")
    assert not os.path.lexists(ws.path / "d")
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "host secret\n"

    os.symlink(outside, ws.path / "top-link")
    ws.delete("top-link")  # a symlink to a directory: the link goes, the directory stays
    assert not os.path.lexists(ws.path / "top-link")
    assert (outside / "secret.txt").exists()


def test_sibling_prefix_is_unreachable(ws: Workspace) -> None:
    # A directory next to the workspace whose name starts with the workspace's: startswith() would pass it.
    sibling = ws.sandbox_dir / "workspace2"
    sibling.mkdir()
    (sibling / "secret").write_text("other sandbox")
    with pytest.raises(InvalidRequest):
        ws.open_read("../workspace2/secret")
    with pytest.raises(NotFound):
        ws.open_read("workspace2/secret")
    os.symlink("../workspace2", ws.path / "w2")
    os.symlink(sibling, ws.path / "w2abs")
    for rel in ("w2/secret", "w2abs/secret"):
        with pytest.raises(InvalidRequest):
            ws.open_read(rel)
        with pytest.raises(InvalidRequest):
            ws.open_write(rel)
    ws.delete("w2")
    ws.delete("w2abs")
    assert (sibling / "secret").read_text() == "other sandbox"


def test_fifo_is_refused_without_hanging(ws: Workspace) -> None:
    os.mkfifo(ws.path / "pipe")
    with pytest.raises(InvalidRequest, match="not a regular file"):
        ws.open_read("pipe")
    with pytest.raises(InvalidRequest):
        ws.open_write("pipe")
    # Even with the sandbox holding the reading end open, the gateway writes nothing into it.
    reader = os.open(ws.path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(InvalidRequest):
            ws.open_write("pipe")
        assert os.read(reader, 10) == b""
    finally:
        os.close(reader)
    ws.delete("pipe")


@pytest.mark.root
def test_hard_link_to_foreign_file_refused_in_dir_mode(base: Path, outside: Path) -> None:
    ws = Workspace(_sandbox_dir(base), UID, GID, LIMITS, mode="dir")
    asyncio.run(ws.create())
    try:
        secret = outside / "secret.txt"  # root-owned, on the same filesystem as a dir-mode workspace
        before = _snapshot(secret)
        os.link(secret, ws.path / "linked.txt")
        with pytest.raises(InvalidRequest, match="hard link"):
            ws.open_write("linked.txt")
        assert _snapshot(secret) == before
        # The sandbox's own hard links are its business.
        _write(ws, "mine.txt", b"1")
        os.link(ws.path / "mine.txt", ws.path / "mine2.txt")
        os.close(ws.open_write("mine2.txt"))
    finally:
        asyncio.run(ws.destroy())
    assert _snapshot(secret) == before


def test_swapping_race_never_writes_outside(ws: Workspace, outside: Path) -> None:
    """The sandbox flips ``d`` between a directory and a symlink out while the gateway writes into it."""
    stop = threading.Event()
    d = ws.path / "d"

    def flipper() -> None:
        while not stop.is_set():
            with _suppress_os():
                os.mkdir(d)
            with _suppress_os():
                os.rmdir(d)
            with _suppress_os():
                os.symlink(outside, d)
            with _suppress_os():
                os.unlink(d)

    thread = threading.Thread(target=flipper)
    thread.start()
    try:
        for i in range(1500):
            with _refused():
                with UploadWriter(ws, f"d/x{i}.txt", make_parents=True) as upload:
                    upload.write(b"race")
            with _refused():
                fd, _ = ws.open_read(f"d/x{i}.txt")
                os.close(fd)
            with _refused():
                ws.delete(f"d/x{i}.txt")  # let the sandbox turn d into a link again
    finally:
        stop.set()
        thread.join()
    assert sorted(os.listdir(outside)) == ["secret.txt"]


def _refused() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(InvalidRequest, NotFound)


def _suppress_os() -> contextlib.AbstractContextManager[None]:
    return contextlib.suppress(OSError)


# ------------------------------------------------------------------------------------------------------------
# Deep trees: descriptor window, budget


def _make_deep(root: Path, depth: int) -> None:
    # Through descriptors: the path would pass PATH_MAX long before the sandbox stops nesting.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir("d", dir_fd=fd)
            os.symlink("/etc", f"link{i}", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        with open(os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep")
    finally:
        os.close(fd)


def test_deep_tree_delete_and_usage(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace_mod, "_FD_WINDOW", 4)  # force the walk to close and reopen ancestors
    (ws.path / "top").mkdir()
    _make_deep(ws.path / "top", 40)
    if ws.mode == "dir":
        used, files = ws.usage()
        assert files == 1 + 40 * 2 + 1  # top, 40 × (d, link), bottom.txt
    open_fds = len(os.listdir("/proc/self/fd"))
    ws.delete("top")
    assert len(os.listdir("/proc/self/fd")) == open_fds  # no descriptor leaked
    assert ws.list_dir("") == []
    assert os.path.exists("/etc/passwd")


def test_delete_gives_up_on_a_tree_that_keeps_growing(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(30):
        _write(ws, f"grow/f{i}", b"")
    monkeypatch.setattr(Workspace, "_walk_budget", lambda self: 10)
    with pytest.raises(Conflict):
        ws.delete("grow")
