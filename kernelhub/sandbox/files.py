"""The gateway's file API in a workspace that hostile sandbox code controls: upload, download, list, delete.

Sandbox code may plant symlinks, FIFOs and hard links anywhere at any time, so every path is walked component by
component with ``openat(dirfd, name, O_NOFOLLOW)`` from a descriptor of the workspace root, and a symlink
anywhere on the way is refused, never followed - not even one that points back inside (SECURITY.md, pitfall
10). ``..`` never reaches the kernel: :func:`split_workspace_path` refuses it first. Recursive work (delete,
counting a tree) is a descriptor walk that keeps a bounded window of directories open and gives up on a tree
that keeps changing.

Who calls what: the hub's file methods (:mod:`kernelhub.services.hub`) call the methods of
:class:`WorkspaceFiles` on a sandbox's :class:`~kernelhub.sandbox.workspace.Workspace` (the one subclass,
which supplies the root), hand surfaces an :class:`UploadWriter` to feed an upload into and a
:class:`FileChunks` to stream a download from. The methods are synchronous (a handful of syscalls each);
callers run them between awaits or in a thread, and :class:`FileChunks` reads in a thread itself.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import heapq
import os
import secrets
import stat as stat_mod
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import (
    Conflict,
    DiskQuotaExceeded,
    InvalidRequest,
    KernelHubError,
    NotFound,
    PayloadTooLarge,
    SandboxError,
)
from .limits import Limits

__all__ = [
    "DIR_FLAGS",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "FileChunks",
    "TreeChanged",
    "UploadWriter",
    "WorkspaceFiles",
    "path_fields",
    "remove_tree",
    "split_workspace_path",
]

MiB = 1024 * 1024
#: Linux's NAME_MAX and PATH_MAX; longer names could never be created, so they are refused up front.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096

# Directories are only ever entered through these flags: O_NOFOLLOW makes a planted symlink fail with ELOOP
# instead of being followed, O_DIRECTORY makes a planted file fail with ENOTDIR.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the sandbox planted must not hang the gateway; the fstat right after refuses it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_WRITE_FLAGS = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# A tree walk keeps at most this many directory descriptors open, however deep the sandbox nests.
_FD_WINDOW = 64
#: Bytes a download reads from disk at a time (and a surface sends before it waits for the client).
DOWNLOAD_CHUNK_BYTES = 256 * 1024

# ------------------------------------------------------------------------------------------------------------
# Paths


def _shorten(text: str, limit: int = 80) -> str:
    """A path for an error message: a hostile path must not turn into a megabyte of error body."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def split_workspace_path(path: str) -> list[str]:
    """Split a path relative to ``/workspace`` (as a file route gives it) into safe single components.

    Called by the :class:`WorkspaceFiles` methods (so by every file route) and by :class:`UploadWriter`. ``""`` and
    ``"/"`` are the workspace root (``[]``); duplicate and trailing slashes are ignored and ``.`` components
    dropped. Refused with :class:`InvalidRequest`: absolute paths, ``..`` anywhere (even where it would stay
    inside), NUL bytes, text that cannot be encoded to bytes, names over 255 bytes and paths over 4096 bytes.
    A backslash is an ordinary filename character on Linux and is kept. Bytes that are not UTF-8 come as
    surrogate escapes (U+DC80-U+DCFF, Python's ``surrogateescape``; the file route decodes URLs so) and name
    those bytes; any other lone surrogate is refused.
    """
    if not isinstance(path, str):
        raise InvalidRequest("A workspace path must be a string.")
    if "\x00" in path:
        raise InvalidRequest("A workspace path may not contain a NUL byte.")
    try:
        encoded = os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidRequest("A workspace path must be text (it holds a lone UTF-16 surrogate).") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidRequest(f"A workspace path may be at most {MAX_PATH_BYTES} bytes long.")
    if path.startswith("/") and path.strip("/"):
        raise InvalidRequest(
            f"The path {_shorten(path)} is absolute; file paths are relative to /workspace "
            "(write 'data/x.csv', not '/workspace/data/x.csv')."
        )
    parts: list[str] = []
    for name in path.split("/"):
        if name in ("", "."):
            continue
        if name == "..":
            raise InvalidRequest(f"The path {_shorten(path)} contains '..'; paths may not leave /workspace.")
        if len(os.fsencode(name)) > MAX_NAME_BYTES:
            raise InvalidRequest(f"A file name in the workspace may be at most {MAX_NAME_BYTES} bytes long.")
        parts.append(name)
    return parts


def _join(parts: list[str]) -> str:
    return "/".join(parts)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _iso(mtime_ns: int) -> str:
    """ISO 8601 UTC with ``Z`` (API.md). The sandbox sets mtimes at will, so out-of-range ones are clamped."""
    try:
        moment = _EPOCH + datetime.timedelta(microseconds=mtime_ns // 1000)
    except OverflowError:
        moment = datetime.datetime.min if mtime_ns < 0 else datetime.datetime.max
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _kind(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return "file"
    if stat_mod.S_ISDIR(mode):
        return "dir"
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    return "other"


def _shown(name: str) -> str:
    """A name as text: bytes that are not UTF-8 (which ``os.scandir`` gives as surrogate escapes) become
    U+FFFD, so the name can be written as JSON."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _entry(parts: list[str], st: os.stat_result) -> dict[str, Any]:
    """One file list entry ``{name, path, type, size, modified}``, plus ``url_path`` when the path is not UTF-8.

    Linux names are bytes, and sandbox code may make names that are not UTF-8, which JSON strings cannot hold.
    ``name`` and ``path`` then show each such byte as U+FFFD (for people; two names can look alike), and
    ``url_path`` is the path percent-encoded byte for byte (RFC 3986), to put as it is after ``files/`` in a
    download or delete URL; the file route decodes it back to the same bytes."""
    kind = _kind(st.st_mode)
    return {
        "name": _shown(parts[-1]) if parts else "",
        **path_fields(_join(parts)),
        "type": kind,
        # A directory's st_size is a block count and a symlink's the length of its target: neither is a size a
        # user means, so only regular files report one.
        "size": st.st_size if kind == "file" else 0,
        "modified": _iso(st.st_mtime_ns),
    }


def path_fields(path: str) -> dict[str, str]:
    """A workspace path as the file routes answer it: ``{"path"}``, and ``url_path`` when it is not UTF-8
    (see :func:`_entry`). ``path`` is relative to the workspace, as :func:`split_workspace_path` joins it."""
    shown = _shown(path)
    if shown == path:
        return {"path": path}
    return {"path": shown, "url_path": urllib.parse.quote(path, safe="/", errors="surrogateescape")}


# ------------------------------------------------------------------------------------------------------------
# OS errors -> API errors


def _api_error(exc: OSError, rel: str) -> KernelHubError:
    shown = _shorten(rel or "/")
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"There is no {shown} in the workspace.")
    if code == errno.ELOOP:
        return InvalidRequest(
            f"The path {shown} goes through a symbolic link; the file API does not follow symbolic links."
        )
    if code == errno.ENOTDIR:
        return InvalidRequest(f"A component of the path {shown} is not a directory.")
    if code == errno.EISDIR:
        return InvalidRequest(f"{shown} is a directory.")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskQuotaExceeded("The workspace is full: its disk_mb or files limit is reached.")
    if code == errno.ENAMETOOLONG:
        return InvalidRequest(f"The path {shown} is too long.")
    if code in (errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV):
        return InvalidRequest(f"{shown} cannot be opened by the file API.")
    if code == errno.ENOTEMPTY:
        return Conflict(f"The directory {shown} is not empty.")
    return SandboxError(f"A file operation on {shown} failed: {exc.strerror or exc}.")


@contextlib.contextmanager
def _fs_errors(rel: str) -> Iterator[None]:
    """Turn OS errors into the API's errors; our own errors pass through untouched."""
    try:
        yield
    except OSError as exc:
        raise _api_error(exc, rel) from None


def _close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


# ------------------------------------------------------------------------------------------------------------
# A descriptor-based tree walk that never follows symlinks


class TreeChanged(Exception):
    """The sandbox changed a directory tree under a walk faster than the walk could finish."""


@dataclasses.dataclass
class _Frame:
    name: str
    fd: int | None
    ident: tuple[int, int]
    st: os.stat_result
    pending: list[str] = dataclasses.field(default_factory=list)
    scanned: bool = False


def _file_target(rel: str) -> tuple[list[str], str, str]:
    """A file path to write: its parts, its form for messages and its last part (the file's name). Raises
    :class:`InvalidRequest` for the workspace root and what :func:`split_workspace_path` raises."""
    parts = split_workspace_path(rel)
    if not parts:
        raise InvalidRequest("The workspace root is a directory.")
    return parts, _join(parts), parts[-1]


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _frame_fd(frames: list[_Frame]) -> int:
    """The descriptor of the deepest frame, reopening it (by name, O_NOFOLLOW, from the nearest open ancestor)
    when the window closed it. A reopened directory must be the one walked before: otherwise the sandbox moved
    things. Every descriptor opened here is stored in its frame at once, so the walk's ``finally`` closes it
    on any error."""
    last = len(frames) - 1
    if frames[last].fd is not None:
        return frames[last].fd  # type: ignore[return-value]
    start = max(i for i, frame in enumerate(frames) if frame.fd is not None)
    for i in range(start + 1, last + 1):
        parent = frames[i - 1].fd
        assert parent is not None
        try:
            child = os.open(frames[i].name, DIR_FLAGS, dir_fd=parent)
        except OSError:
            raise TreeChanged from None
        frames[i].fd = child
        if _ident(os.fstat(child)) != frames[i].ident:
            raise TreeChanged
        if i - 1 > start and i - 1 <= last - _FD_WINDOW:
            # Opened only as a stepping stone: keep the window small.
            os.close(parent)
            frames[i - 1].fd = None
    return frames[last].fd  # type: ignore[return-value]


def _walk_tree(
    top_fd: int,
    *,
    on_entry: Callable[[int, str, os.stat_result], None],
    on_dir_done: Callable[[int, str, os.stat_result], bool],
    budget: int,
) -> None:
    """Walk everything below the directory ``top_fd`` (not closed here), children before their directory.

    ``on_entry(dirfd, name, lstat)`` sees every entry that is not a directory being descended into (symlinks
    are entries, never followed); ``on_dir_done(parent_fd, name, lstat)`` sees a subdirectory after its
    contents and returns False to have it walked again (the sandbox added entries meanwhile). No recursion and
    at most ``_FD_WINDOW`` descriptors, so a sandbox nesting directories 100 000 deep exhausts neither. More
    than ``budget`` steps raises :class:`TreeChanged`: a sandbox that keeps adding files cannot keep a
    gateway thread busy forever.
    """
    top_st = os.fstat(top_fd)
    frames = [_Frame(name="", fd=top_fd, ident=_ident(top_st), st=top_st)]
    steps = 0
    try:
        while frames:
            steps += 1
            if steps > budget:
                raise TreeChanged
            frame = frames[-1]
            fd = _frame_fd(frames)
            if not frame.scanned:
                frame.scanned = True
                with os.scandir(fd) as entries:
                    for dirent in entries:
                        steps += 1
                        if steps > budget:
                            raise TreeChanged
                        try:
                            st = dirent.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat_mod.S_ISDIR(st.st_mode):
                            frame.pending.append(dirent.name)
                        else:
                            on_entry(fd, dirent.name, st)
            if frame.pending:
                name = frame.pending.pop()
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    # Swapped for a symlink or a file since the scan: an entry like any other.
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    on_entry(fd, name, st)
                    continue
                child_st = os.fstat(child)
                frames.append(_Frame(name=name, fd=child, ident=_ident(child_st), st=child_st))
                spill = len(frames) - 1 - _FD_WINDOW
                if spill >= 1 and frames[spill].fd is not None:
                    _close_quietly(frames[spill].fd)
                    frames[spill].fd = None
                continue
            frames.pop()
            if not frames:
                break  # the top itself: the caller owns it
            _close_quietly(frame.fd)
            frame.fd = None
            parent_fd = _frame_fd(frames)
            if not on_dir_done(parent_fd, frame.name, frame.st):
                try:
                    again = os.open(frame.name, DIR_FLAGS, dir_fd=parent_fd)
                except OSError:
                    continue  # gone or no longer a directory: nothing left to walk
                again_st = os.fstat(again)
                frames.append(_Frame(name=frame.name, fd=again, ident=_ident(again_st), st=again_st))
    finally:
        for frame in frames[1:]:
            _close_quietly(frame.fd)


def _ignore_missing(func: Callable[[], None]) -> None:
    with contextlib.suppress(FileNotFoundError):
        func()


def _unlink_entry(dirfd: int, name: str, st: os.stat_result) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except (FileNotFoundError, IsADirectoryError):
        pass  # gone, or swapped for a directory: the rescan before rmdir finds it


def _rmdir_entry(dirfd: int, name: str, st: os.stat_result) -> bool:
    try:
        os.rmdir(name, dir_fd=dirfd)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        if exc.errno == errno.ENOTDIR:  # swapped for a symlink or file
            _ignore_missing(lambda: os.unlink(name, dir_fd=dirfd))
            return True
        raise
    return True


def remove_tree(parent_fd: int, name: str, *, budget: int, attempts: int = 5) -> None:
    """Remove ``name`` in ``parent_fd`` and, if it is a directory, everything in it, never following symlinks.

    Used by :meth:`WorkspaceFiles.delete` and by ``Workspace.destroy`` in dir mode instead of
    ``shutil.rmtree`` on a path, so that a symlink the sandbox swaps in mid-delete is removed as a link, not
    followed. Raises :class:`TreeChanged` if the tree keeps changing for ``attempts`` walks."""
    for _ in range(attempts):
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            _ignore_missing(lambda: os.unlink(name, dir_fd=parent_fd))
            return
        try:
            _walk_tree(fd, on_entry=_unlink_entry, on_dir_done=_rmdir_entry, budget=budget)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=parent_fd)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise TreeChanged


# ------------------------------------------------------------------------------------------------------------
# The file API


class WorkspaceFiles(abc.ABC):
    """The file operations of one workspace, each walking down from a descriptor of its root.

    :class:`~kernelhub.sandbox.workspace.Workspace` is the one subclass: it sets the attributes below and
    supplies the root (:meth:`_open_root`). Files and directories the gateway creates belong to the sandbox
    uid (``uid``/``gid``); ``limits`` give the largest upload (``max_file_mb``) and bound every tree walk
    (``files``).
    """

    path: Path
    uid: int
    gid: int
    limits: Limits

    @abc.abstractmethod
    def _open_root(self) -> int:
        """A descriptor of the workspace root (the caller closes it); every file operation starts here and
        only ever goes down. Raises :class:`SandboxError` (``workspace_unavailable``) when there is none."""

    def _walk_budget(self) -> int:
        return max(200_000, 8 * self.limits.files)

    def _own(self, fd: int, mode: int) -> None:
        """Give what the gateway (root) made to the sandbox uid, by descriptor: no swapped path is touched."""
        if os.geteuid() == 0:
            os.fchown(fd, self.uid, self.gid)
        os.fchmod(fd, mode)

    def _open_dirs(self, parts: list[str], *, create: bool = False) -> int:
        """Descend from the root through ``parts`` (all directories), O_NOFOLLOW at every step; answer the
        last one.

        ``create`` makes missing directories, owned by the sandbox uid, mode 0755. OSError escapes to the
        caller."""
        fd = self._open_root()
        try:
            for depth, name in enumerate(parts, 1):
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # O_NOFOLLOW|O_DIRECTORY answers a symlink with ENOTDIR; say which it was.
                    if stat_mod.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise InvalidRequest(
                            f"{_shorten(_join(parts[:depth]))} is a symbolic link; the file API does not "
                            "follow symbolic links."
                        ) from None
                    raise
                except FileNotFoundError:
                    if not create:
                        raise
                    made = True
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        made = False  # the sandbox made it meanwhile; the open below judges what it is
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                    if made:
                        # By descriptor: if the sandbox swapped the new directory for another one, that one is
                        # inside its own workspace anyway, and a symlink would have failed the open.
                        self._own(child, 0o755)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, rel: str) -> tuple[int, os.stat_result]:
        """Open a regular file for reading; answer the fd (the caller closes it) and its ``fstat``. The hub
        hands it on as a :class:`FileChunks`, which closes it.

        Refused: a symlink anywhere on the path (InvalidRequest), a directory ("is a directory"), a FIFO,
        socket or device (InvalidRequest), a missing file (NotFound)."""
        parts = split_workspace_path(rel)
        shown = _join(parts)
        if not parts:
            raise InvalidRequest("The workspace root is a directory.")
        with _fs_errors(shown):
            dirfd = self._open_dirs(parts[:-1])
            try:
                # Look before opening, so that a device or FIFO is never even opened.
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                self._require_regular(st, shown)
                fd = os.open(parts[-1], _READ_FLAGS, dir_fd=dirfd)
            finally:
                os.close(dirfd)
            try:
                st = os.fstat(fd)  # what was opened, not what was looked at: the sandbox may have swapped it
                self._require_regular(st, shown)
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
        return fd, st

    def open_download(self, rel: str) -> FileChunks:
        """:meth:`open_read` for a download: the file as a :class:`FileChunks` stream, which owns (and closes)
        the descriptor. Called by the hub for ``file_download``; raises what :meth:`open_read` raises."""
        fd, st = self.open_read(rel)
        return FileChunks(fd, st.st_size, _join(split_workspace_path(rel)))

    @staticmethod
    def _require_regular(st: os.stat_result, shown: str) -> None:
        if stat_mod.S_ISDIR(st.st_mode):
            raise InvalidRequest(f"{_shorten(shown or '/')} is a directory.")
        if stat_mod.S_ISLNK(st.st_mode):
            raise InvalidRequest(
                f"{_shorten(shown)} is a symbolic link; the file API does not follow symbolic links."
            )
        if not stat_mod.S_ISREG(st.st_mode):
            raise InvalidRequest(f"{_shorten(shown)} is not a regular file.")

    def open_write(self, rel: str, *, make_parents: bool = True) -> int:
        """Create or truncate a regular file for writing and answer its fd (the caller closes it).

        The file upload route prefers :class:`UploadWriter`, which also enforces quotas and cleans up. Parents
        are made (uid-owned, 0755) unless ``make_parents`` is False; a new file is 0644 and owned by the
        sandbox uid. A symlink anywhere, a directory, FIFO, socket or device, and a hard link to a file the
        sandbox does not own are refused, and nothing is truncated before the checks pass."""
        fd, dirfd, _name = self._open_for_write(rel, make_parents=make_parents)
        os.close(dirfd)
        return fd

    def _open_for_write(self, rel: str, *, make_parents: bool) -> tuple[int, int, str]:
        """Like :meth:`open_write`, also answering the parent's descriptor and the name."""
        parts, shown, name = _file_target(rel)
        with _fs_errors(shown):
            dirfd = self._open_dirs(parts[:-1], create=make_parents)
            try:
                made = True
                try:
                    fd = os.open(name, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dirfd)
                except FileExistsError:
                    made = False
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    self._require_regular(st, shown)
                    # No O_TRUNC: nothing is cut short before the fstat below has judged the file.
                    fd = os.open(name, _WRITE_FLAGS, dir_fd=dirfd)
                try:
                    st = os.fstat(fd)
                    self._require_regular(st, shown)
                    if not made and st.st_nlink > 1 and st.st_uid != self.uid and os.geteuid() == 0:
                        # In dir mode the workspace shares a filesystem with the host, and a hard link to a
                        # file the sandbox does not own must not let the gateway overwrite that file for it.
                        raise InvalidRequest(
                            f"{_shorten(shown)} is a hard link to a file the sandbox does not own."
                        )
                    if made:
                        self._own(fd, 0o644)
                    else:
                        os.ftruncate(fd, 0)
                    os.set_blocking(fd, True)
                except BaseException:
                    os.close(fd)
                    if made:
                        _ignore_missing(lambda: os.unlink(name, dir_fd=dirfd))
                    raise
            except BaseException:
                os.close(dirfd)
                raise
        return fd, dirfd, name

    def _open_for_upload(self, rel: str, *, make_parents: bool) -> tuple[int, int, str, str | None]:
        """An unnamed file for an upload to ``rel``, in the directory it goes to: ``(fd, parent fd, final name,
        temporary name)``. :class:`UploadWriter` gives it its name only when the upload is complete, so an
        upload cut half-way (the client gone, the gateway killed) never leaves a partial file under the final
        name. The file is ``O_TMPFILE`` (no name at all until then; the temporary name is None) where the
        filesystem supports it (ext4, tmpfs), else a hidden ``.kh-upload-*`` name made with ``O_EXCL``. The
        final name must be absent or a regular file (it is replaced whole at the end, never written through, so
        a hard link there is not followed); a symlink, directory or other kind is refused as
        :meth:`open_write` refuses it. Parents are made as :meth:`open_write` makes them."""
        parts, shown, name = _file_target(rel)
        with _fs_errors(shown):
            dirfd = self._open_dirs(parts[:-1], create=make_parents)
            try:
                try:
                    self._require_regular(os.stat(name, dir_fd=dirfd, follow_symlinks=False), shown)
                except FileNotFoundError:
                    pass
                temp: str | None = None
                try:
                    fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                        raise
                    temp = f".kh-upload-{secrets.token_hex(8)}"
                    fd = os.open(temp, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dirfd)
                try:
                    self._own(fd, 0o644)
                    os.set_blocking(fd, True)
                except BaseException:
                    os.close(fd)
                    if temp is not None:
                        _ignore_missing(lambda: os.unlink(temp, dir_fd=dirfd))
                    raise
            except BaseException:
                os.close(dirfd)
                raise
        return fd, dirfd, name, temp

    def list_dir(self, rel: str = "") -> list[dict[str, Any]]:
        """The entries of a directory, sorted by name, for the file list route.

        Each is ``{name, path, type: "file"|"dir"|"symlink"|"other", size, modified}`` from ``lstat``: a
        symlink is listed as one and never followed; listing *through* one is refused."""
        return self.list_page(rel)[0]

    def list_page(self, rel: str = "", *, limit: int | None = None,
                  after: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """The first ``limit`` entries (all with None) of a directory whose names sort after ``after``, shaped
        and sorted as in :meth:`list_dir`, and the name to page on from when more follow (else None): the name
        as the file system has it (``os.fsdecode``: bytes that are not UTF-8 as surrogates), not the shown one,
        in which every such byte is U+FFFD and two names can look alike. One ``readdir`` pass picks the page's
        names (``O(n log limit)``); only those are ``lstat``ed. Paging by name is stable: an entry present
        throughout is listed exactly once, whatever is added or removed meanwhile. Blocking: the service runs
        it in a thread. Raises what :meth:`list_dir` raises."""
        parts = split_workspace_path(rel)
        shown = _join(parts)
        entries: list[dict[str, Any]] = []
        with _fs_errors(shown):
            fd = self._open_dirs(parts)
            try:
                with os.scandir(fd) as listing:
                    names: Iterable[str] = (dirent.name for dirent in listing)
                    if after is not None:
                        names = (name for name in names if name > after)
                    page = sorted(names) if limit is None else heapq.nsmallest(limit + 1, names)
                more = limit is not None and len(page) > limit
                following = page[:limit][-1] if more and limit else None
                for name in page[:limit]:
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since readdir
                    entries.append(_entry([*parts, name], st))
            finally:
                os.close(fd)
        return entries, following

    def stat(self, rel: str) -> dict[str, Any]:
        """One entry shaped as in :meth:`list_dir` (``lstat``: a symlink as the last component is reported as
        one); for the file routes' existence and type checks. The root is ``{"name": "", "path": "", "type":
        "dir"}``."""
        parts = split_workspace_path(rel)
        shown = _join(parts)
        with _fs_errors(shown):
            if not parts:
                fd = self._open_root()
                try:
                    return _entry(parts, os.fstat(fd))
                finally:
                    os.close(fd)
            dirfd = self._open_dirs(parts[:-1])
            try:
                return _entry(parts, os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False))
            finally:
                os.close(dirfd)

    def delete(self, rel: str) -> None:
        """Delete a file, a symlink (the link, never its target) or a directory with everything in it.

        For the file delete route. The recursive delete is a descriptor walk that unlinks symlinks as entries,
        so a link to a directory outside loses only the link. The workspace root itself cannot be deleted."""
        parts = split_workspace_path(rel)
        shown = _join(parts)
        if not parts:
            raise InvalidRequest("The workspace root cannot be deleted; delete the entries in it instead.")
        with _fs_errors(shown):
            dirfd = self._open_dirs(parts[:-1])
            try:
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                if stat_mod.S_ISDIR(st.st_mode):
                    try:
                        remove_tree(dirfd, parts[-1], budget=self._walk_budget())
                    except TreeChanged:
                        raise Conflict(
                            f"The directory {_shorten(shown)} kept changing while it was being deleted."
                        ) from None
                else:
                    os.unlink(parts[-1], dir_fd=dirfd)
            finally:
                os.close(dirfd)


    # -- what E2B's filesystem RPCs need besides ---------------------------------------------------------

    def make_dir(self, rel: str) -> bool:
        """Make the directory ``rel`` and its missing parents (owned by the sandbox uid, 0755); True if it was
        made, False if a directory was there already. Raises :class:`Conflict` when something else is there,
        and what the walk raises (symlinks refused, as everywhere)."""
        parts = split_workspace_path(rel)
        shown = _join(parts)
        if not parts:
            return False
        with _fs_errors(shown):
            dirfd = self._open_dirs(parts[:-1], create=True)
            try:
                try:
                    os.mkdir(parts[-1], 0o755, dir_fd=dirfd)
                except FileExistsError:
                    st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                    if not stat_mod.S_ISDIR(st.st_mode):
                        raise Conflict(f"{_shorten(shown)} exists and is not a directory.") from None
                    return False
                fd = os.open(parts[-1], DIR_FLAGS, dir_fd=dirfd)
                try:
                    self._own(fd, 0o755)
                finally:
                    os.close(fd)
                return True
            finally:
                os.close(dirfd)

    def move(self, source: str, destination: str) -> None:
        """Rename ``source`` to ``destination`` (parents of the destination are made; an existing file there is
        replaced, as rename(2) does). Both are walked without following symlinks; the root cannot move."""
        src, dst = split_workspace_path(source), split_workspace_path(destination)
        if not src or not dst:
            raise InvalidRequest("The workspace root cannot be moved or replaced.")
        if dst[:len(src)] == src:
            raise InvalidRequest(f"{_shorten(_join(src))} cannot move into itself.")
        with _fs_errors(_join(src)):
            src_dir = self._open_dirs(src[:-1])
            try:
                os.stat(src[-1], dir_fd=src_dir, follow_symlinks=False)  # a missing source says so by its name
                with _fs_errors(_join(dst)):
                    dst_dir = self._open_dirs(dst[:-1], create=True)
                    try:
                        os.rename(src[-1], dst[-1], src_dir_fd=src_dir, dst_dir_fd=dst_dir)
                    finally:
                        os.close(dst_dir)
            finally:
                os.close(src_dir)

    def describe(self, rel: str) -> dict[str, Any]:
        """One entry as :meth:`stat` gives it, with ``mode`` (permission bits), ``permissions`` (``ls``'s
        ``-rw-r--r--``), ``uid``, ``gid`` and, for a symlink, ``symlink_target`` (read, never followed)."""
        parts = split_workspace_path(rel)
        with _fs_errors(_join(parts)):
            if not parts:
                fd = self._open_root()
                try:
                    return _detailed(parts, os.fstat(fd), None)
                finally:
                    os.close(fd)
            dirfd = self._open_dirs(parts[:-1])
            try:
                st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
                return _detailed(parts, st, _link_target(dirfd, parts[-1], st))
            finally:
                os.close(dirfd)

    def describe_dir(self, rel: str, depth: int = 1, limit: int = 10000) -> list[dict[str, Any]]:
        """The entries below the directory ``rel`` down to ``depth`` levels (1: its own entries), each as
        :meth:`describe` shapes it, at most ``limit`` of them (:class:`InvalidRequest` beyond: ask for less
        depth). Directories are entered without following symlinks; a symlink is an entry, never walked."""
        parts = split_workspace_path(rel)
        out: list[dict[str, Any]] = []
        # Breadth first, by name: each directory is opened (from the root, O_NOFOLLOW at every step) only while
        # it is read, so a wide tree costs no more than one descriptor at a time.
        pending: collections.deque[tuple[list[str], int]] = collections.deque([(parts, 1)])
        while pending:
            where, level = pending.popleft()
            with _fs_errors(_join(where)):
                try:
                    fd = self._open_dirs(where)
                except (OSError, InvalidRequest):
                    if where is parts:
                        raise
                    continue  # gone, or swapped for a symlink or a file since it was listed
                try:
                    with os.scandir(fd) as listing:
                        names = sorted(d.name for d in listing)
                    for name in names:
                        try:
                            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        out.append(_detailed([*where, name], st, _link_target(fd, name, st)))
                        if len(out) > limit:
                            raise InvalidRequest(f"The directory holds more than {limit} entries at that depth; "
                                                 "list less deep.")
                        if stat_mod.S_ISDIR(st.st_mode) and level < depth:
                            pending.append(([*where, name], level + 1))
                finally:
                    os.close(fd)
        return out

    def _tree_usage(self) -> tuple[int, int]:
        """Bytes (allocated blocks) and entries below the root, counted by a descriptor walk (bounded; hard
        links counted once): the usage of a workspace that shares the host filesystem. An estimate if the
        sandbox keeps changing the tree."""
        total = [0, 0]
        seen: set[tuple[int, int]] = set()

        def count(dirfd: int, name: str, st: os.stat_result) -> None:
            if st.st_nlink > 1 and not stat_mod.S_ISDIR(st.st_mode):
                if _ident(st) in seen:
                    return
                seen.add(_ident(st))
            total[0] += st.st_blocks * 512
            total[1] += 1

        def count_dir(dirfd: int, name: str, st: os.stat_result) -> bool:
            count(dirfd, name, st)
            return True

        root = self._open_root()
        try:
            _walk_tree(root, on_entry=count, on_dir_done=count_dir, budget=self._walk_budget())
        except TreeChanged:
            pass  # an estimate is all metrics need
        finally:
            os.close(root)
        return total[0], total[1]


class UploadWriter:
    """Writes one uploaded file into a workspace chunk by chunk; for the file upload route.

    The data goes to an unnamed file in the target's directory (:meth:`WorkspaceFiles._open_for_upload`),
    which :meth:`finish` puts under the final name in one ``rename`` (replacing what was there): a reader never
    sees a half-written file under that name, and an upload cut half-way (the client gone, the gateway killed)
    leaves nothing there. ``write`` raises :class:`PayloadTooLarge` past ``max_bytes`` (default
    ``limits.max_file_mb``) and :class:`DiskQuotaExceeded` (reason ``disk``) when the workspace is full
    (ENOSPC/EDQUOT); either way, and on :meth:`abort`, the partial file is freed. :meth:`finish` answers the
    size. As a context manager it finishes on success and aborts on an exception. Synchronous: the upload
    surfaces (REST ``data_received``, MCP ``file_upload``) call it in a worker thread, since a write may wait on
    the disk.
    """

    def __init__(
        self,
        workspace: WorkspaceFiles,
        rel: str,
        *,
        max_bytes: int | None = None,
        make_parents: bool = True,
    ) -> None:
        self.path = _join(split_workspace_path(rel))
        self.max_bytes = workspace.limits.max_file_mb * MiB if max_bytes is None else max_bytes
        self.size = 0
        self._fd: int | None
        self._dirfd: int | None
        self._fd, self._dirfd, self._name, self._temp = workspace._open_for_upload(rel, make_parents=make_parents)
        self._ident = _ident(os.fstat(self._fd))

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append one chunk; raises and frees the partial file if a limit is hit."""
        if self._fd is None:
            raise SandboxError("This upload is already finished.")
        view = memoryview(data).cast("B")
        if self.size + len(view) > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(
                f"The file is larger than the {self.max_bytes // MiB} MiB a single file may have "
                f"(limits.max_file_mb).",
            )
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.size += written
        except OSError as exc:
            self.abort()
            raise _api_error(exc, self.path) from None

    def finish(self) -> int:
        """Put the file under its final name (replacing what was there) and answer its size. An error on the
        way frees the file and raises."""
        if self._fd is None or self._dirfd is None:
            raise SandboxError("This upload is already finished.")
        fd, dirfd = self._fd, self._dirfd
        try:
            if self._temp is None:
                # linkat(2) of an O_TMPFILE file through its /proc/self/fd link; under a hidden name first, since
                # linkat never replaces an existing name and rename does, atomically.
                self._temp = f".kh-upload-{secrets.token_hex(8)}"
                os.link(f"/proc/self/fd/{fd}", self._temp, dst_dir_fd=dirfd)
            os.rename(self._temp, self._name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            self._temp = None
        except OSError as exc:
            self.abort()
            raise _api_error(exc, self.path) from None
        self._fd = None
        try:
            os.close(fd)
        except OSError as exc:
            raise _api_error(exc, self.path) from None
        finally:
            _close_quietly(self._dirfd)
            self._dirfd = None
        return self.size

    def abort(self) -> None:
        """Give up: free the space and the partial file. Idempotent."""
        if self._fd is not None:
            # Truncate by descriptor first: the space comes back whatever became of a temporary name.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            _close_quietly(self._fd)
            self._fd = None
            self._remove()
        _close_quietly(self._dirfd)
        self._dirfd = None

    def _remove(self) -> None:
        if self._dirfd is None or self._temp is None:
            return
        # Only if the temporary name still is our file: the sandbox may have put something of its own there.
        temp, self._temp = self._temp, None
        with contextlib.suppress(OSError):
            st = os.stat(temp, dir_fd=self._dirfd, follow_symlinks=False)
            if _ident(st) == self._ident:
                os.unlink(temp, dir_fd=self._dirfd)

    def __enter__(self) -> UploadWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self._fd is not None:
            self.finish()
        else:
            self.abort()

    def __del__(self) -> None:
        # An upload the handler forgot (client gone) must not leak descriptors or leave a partial file.
        if getattr(self, "_fd", None) is not None or getattr(self, "_dirfd", None) is not None:
            self.abort()


# Reads for downloads. Their own threads (not the loop's default executor) because closing a stream must be
# able to wait for the read that holds its descriptor: only a concurrent.futures.Future says when that ended.
_DOWNLOAD_READS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kernelhub-download")


class FileChunks:
    """A workspace file opened for download, as an async iterator of chunks: what the hub hands the download
    surfaces (REST ``GET /v1/sandboxes/{id}/files/{path}``, MCP ``file_download``). Made by
    :meth:`WorkspaceFiles.open_download`.

    ``size`` is the file's size in bytes when it was opened. Iterating yields ``bytes`` chunks of at most
    ``chunk_bytes`` and stops after ``size`` bytes, or earlier when the sandbox truncated the file meanwhile
    (``sent`` then stays below ``size``; a consumer that promised ``size`` bytes must not pretend). Each read
    runs in a worker thread, so a slow disk never stalls the event loop; an OS error while reading raises
    :class:`SandboxError`. The descriptor is closed when iteration ends, by :meth:`close`/:meth:`aclose`
    (``async with`` does it however the block ends, a client that went away mid-download included) and at
    garbage collection at the latest. A read still running when the stream is closed keeps the descriptor
    until it returns, so its number is never reused under that read.
    """

    def __init__(self, fd: int, size: int, path: str, *, chunk_bytes: int = DOWNLOAD_CHUNK_BYTES) -> None:
        self.size = size
        self.path = path
        self.sent = 0
        self._fd: int | None = fd
        self._chunk_bytes = chunk_bytes
        self._reading: concurrent.futures.Future[bytes] | None = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __aiter__(self) -> FileChunks:
        return self

    async def __anext__(self) -> bytes:
        fd = self._fd
        if fd is None or self.sent >= self.size:
            self.close()
            raise StopAsyncIteration
        if self._reading is not None:
            raise SandboxError("A download is read by one consumer at a time.")
        reading = _DOWNLOAD_READS.submit(os.read, fd, min(self._chunk_bytes, self.size - self.sent))
        self._reading = reading
        try:
            # Cancelled here, the read may still run in its thread: _reading stays set, so close() waits for it.
            chunk = await asyncio.wrap_future(reading)
        except OSError as exc:
            self._reading = None
            self.close()
            raise _api_error(exc, self.path) from None
        self._reading = None
        if not chunk:  # the sandbox truncated the file meanwhile
            self.close()
            raise StopAsyncIteration
        self.sent += len(chunk)
        return chunk

    def close(self) -> None:
        """Close the descriptor, at once or, if a read holds it, as soon as that read returns. Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        reading, self._reading = self._reading, None
        if reading is None:
            _close_quietly(fd)
        else:
            reading.cancel()  # not started yet: it never will
            reading.add_done_callback(lambda _done: _close_quietly(fd))

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> FileChunks:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A download a surface dropped without closing must not leak its descriptor.
        if getattr(self, "_fd", None) is not None:
            self.close()


# ------------------------------------------------------------------------------------------------------------
# Entries in detail (WorkspaceFiles.describe and describe_dir, for the E2B surface)


def _detailed(parts: list[str], st: os.stat_result, target: str | None) -> dict[str, Any]:
    entry = _entry(parts, st)
    entry.update(mode=stat_mod.S_IMODE(st.st_mode), permissions=stat_mod.filemode(st.st_mode), uid=st.st_uid,
                 gid=st.st_gid)
    if target is not None:
        entry["symlink_target"] = target
    return entry


def _link_target(dirfd: int, name: str, st: os.stat_result) -> str | None:
    if not stat_mod.S_ISLNK(st.st_mode):
        return None
    try:
        return os.readlink(name, dir_fd=dirfd)
    except OSError:
        return None
