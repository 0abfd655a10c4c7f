"""Tests for kernelhub.sandbox.files: path splitting, and the file operations the gateway runs as root
against a workspace that hostile sandbox code filled with symlinks, FIFOs and hard links (both workspace
modes)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from kernelhub.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from kernelhub.sandbox import files as files_mod
from kernelhub.sandbox.files import UploadWriter, split_workspace_path
from kernelhub.sandbox.workspace import Workspace
from tests.sandbox.workspace_support import (
    GID,
    LIMITS,
    UID,
    MiB,
    _read,
    _sandbox_dir,
    _snapshot,
    _write,
)


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
    assert files_mod._iso(0) == "1970-01-01T00:00:00.000000Z"
    assert files_mod._iso(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456Z"
    # The sandbox sets mtimes at will (touch -d); nothing it sets may break a listing.
    assert files_mod._iso(2**63 * 10**9).startswith("9999-12-31T23:59:59")  # st_mtime_ns of a max time_t
    assert files_mod._iso(-(2**63) * 10**9).startswith("0001-01-01T00:00:00")


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
    # A file of the sandbox's own under the final name stays what it was until an upload completes, and after
    # an aborted one; the partial data never had a name in the directory.
    (ws.path / "kept.txt").write_text("the sandbox's own")
    upload = UploadWriter(ws, "kept.txt")
    upload.write(b"half")
    assert sorted(os.listdir(ws.path)) == ["kept.txt"]
    assert (ws.path / "kept.txt").read_text() == "the sandbox's own"
    upload.abort()
    assert sorted(os.listdir(ws.path)) == ["kept.txt"]
    assert (ws.path / "kept.txt").read_text() == "the sandbox's own"
    with UploadWriter(ws, "kept.txt") as upload:
        upload.write(b"whole")
    assert (ws.path / "kept.txt").read_bytes() == b"whole"
    assert sorted(os.listdir(ws.path)) == ["kept.txt"]


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
    monkeypatch.setattr(files_mod, "_FD_WINDOW", 4)  # force the walk to close and reopen ancestors
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


# ------------------------------------------------------------------------------------------------------------
# Downloads: FileChunks closes its descriptor however the download ends


def _until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def _holds(path: Path) -> bool:
    """Whether this process has a descriptor open on ``path``."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                return True
    return False


def test_download_streams_in_chunks_and_closes_at_the_end(ws: Workspace) -> None:
    content = os.urandom(files_mod.DOWNLOAD_CHUNK_BYTES * 2 + 123)
    _write(ws, "dl/data.bin", content)

    async def download() -> list[bytes]:
        async with ws.open_download("dl//data.bin") as chunks:
            assert chunks.size == len(content) and chunks.path == "dl/data.bin"
            assert _holds(ws.path / "dl" / "data.bin")
            return [chunk async for chunk in chunks]

    got = asyncio.run(download())
    assert b"".join(got) == content
    assert [len(c) for c in got] == [files_mod.DOWNLOAD_CHUNK_BYTES] * 2 + [123]
    assert not _holds(ws.path / "dl" / "data.bin")
    with pytest.raises(InvalidRequest):
        ws.open_download("dl")
    with pytest.raises(NotFound):
        ws.open_download("dl/missing.bin")


def test_download_closes_when_the_consumer_stops_early_fails_or_drops_it(ws: Workspace) -> None:
    _write(ws, "big.bin", b"\1" * (files_mod.DOWNLOAD_CHUNK_BYTES * 4))
    target = ws.path / "big.bin"

    async def stop_after_one() -> None:
        async with ws.open_download("big.bin") as chunks:
            async for _chunk in chunks:
                break  # a client that went away after the first chunk
            assert _holds(target)

    async def fail_midway() -> None:
        async with ws.open_download("big.bin") as chunks:
            await anext(chunks)
            raise ConnectionResetError("client gone")

    async def drop() -> None:
        chunks = ws.open_download("big.bin")
        await anext(chunks)
        assert _holds(target)
        del chunks  # never closed by its consumer: collected, and closed then

    asyncio.run(stop_after_one())
    assert not _holds(target)
    with pytest.raises(ConnectionResetError):
        asyncio.run(fail_midway())
    assert not _holds(target)
    asyncio.run(drop())
    assert not _holds(target)


def test_download_ends_early_when_the_sandbox_truncates_the_file(ws: Workspace) -> None:
    _write(ws, "shrinks.bin", b"\2" * (files_mod.DOWNLOAD_CHUNK_BYTES * 3))

    async def download() -> int:
        async with ws.open_download("shrinks.bin") as chunks:
            await anext(chunks)
            os.truncate(ws.path / "shrinks.bin", 10)  # the sandbox, meanwhile
            rest = [chunk async for chunk in chunks]
            assert rest == [] and chunks.closed
            return chunks.sent

    assert asyncio.run(download()) == files_mod.DOWNLOAD_CHUNK_BYTES


def test_a_download_cancelled_mid_read_keeps_its_descriptor_until_the_read_returns() -> None:
    # A pipe stands in for a disk that stalls: the read blocks in its thread until data comes.
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        chunks = files_mod.FileChunks(r, 100, "stalled.bin")
        returned = threading.Event()

        async def cancel_mid_read() -> None:
            task = asyncio.ensure_future(anext(chunks))
            # Until the read is in its thread (a concurrent future says when it runs, not by an event).
            await asyncio.to_thread(_until, lambda: chunks._reading is not None and chunks._reading.running())
            reading = chunks._reading
            assert reading is not None
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await chunks.aclose()
            # Closing now would let the number be reused under the blocked read: it must wait for it.
            assert chunks.closed and os.fstat(r)
            reading.add_done_callback(lambda _done: returned.set())  # runs after the close callback
            os.write(w, b"x")

        asyncio.run(cancel_mid_read())
        assert returned.wait(10)
        with pytest.raises(OSError):
            os.fstat(r)
    finally:
        os.close(w)
        with contextlib.suppress(OSError):
            os.close(r)
