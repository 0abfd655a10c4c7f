"""A sandbox's ``/workspace``: kept on disk, owned by the sandbox uid, held to its disk and file quota.

:class:`Workspace` ties three rooms together:

* where the files live: as root an ext4 image on a loop device (``mode="loop"``, :mod:`kernelhub.sandbox.image`),
  so ``disk_mb`` and ``files`` are enforced by the kernel for everyone, the gateway's own root writes
  included; without root a plain directory (``mode="dir"``) where nothing is enforced;
* the gateway's file API on them (upload, download, list, delete), which never leaves the workspace however
  sandbox code plants symlinks (:mod:`kernelhub.sandbox.files`, whose :class:`WorkspaceFiles` it extends);
* its lifecycle: :meth:`Workspace.create` before the sandbox starts, :meth:`Workspace.reattach` after a
  gateway restart, :meth:`Workspace.destroy` with the sandbox. :class:`~kernelhub.sandbox.sandbox.Sandbox`
  bind-mounts :attr:`Workspace.path` read-write at ``/workspace``.

Lifecycle methods are coroutines because they run ``mkfs``, ``mount`` and ``umount``; the file methods are
synchronous (a handful of syscalls each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat as stat_mod
from pathlib import Path

from ..errors import IsolationUnavailable, SandboxError, WorkspaceUnavailable
from .files import DIR_FLAGS, TreeChanged, WorkspaceFiles, remove_tree
from .image import (
    MiB,
    check_host_space,
    image_capacity,
    image_usage,
    is_mounted,
    loop_available,
    make_image,
    mount_image,
    unmount,
)
from .limits import Limits

__all__ = ["Workspace"]


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat_mod.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


class Workspace(WorkspaceFiles):
    """The ``/workspace`` of one sandbox, at ``sandbox_dir/"workspace"`` on the host.

    Created by :class:`~kernelhub.sandbox.sandbox.Sandbox` before its processes start (:meth:`create`), removed
    when it stops or by the factory's reaping (:meth:`destroy`); :meth:`reattach` remounts one that outlived a
    gateway restart. ``sandbox_dir`` is
    made by the caller, root-owned with mode 0711, so the sandbox uid can reach its workspace but nothing else
    in it. The hub's file methods use :meth:`open_read`, :meth:`open_download`, :meth:`open_write`,
    :class:`~kernelhub.sandbox.files.UploadWriter`, :meth:`list_dir`, :meth:`stat` and :meth:`delete` (all
    from :class:`~kernelhub.sandbox.files.WorkspaceFiles`); the metrics use :meth:`usage` and
    :meth:`capacity`.

    ``mode``: ``"loop"`` an ext4 image on a loop device (needs root; enforces ``disk_mb`` and ``files``),
    ``"dir"`` a plain directory (enforces nothing; for a gateway without root), ``"auto"`` loop where
    :func:`~kernelhub.sandbox.loop_available`. ``min_host_free_mb``: creating refuses (``host_disk_full``, 507) when the
    workspace, once full, would leave the host filesystem holding ``sandbox_dir`` with less free space than
    this.
    """

    IMAGE_NAME = "workspace.img"
    MOUNT_NAME = "workspace"

    def __init__(
        self,
        sandbox_dir: Path,
        uid: int,
        gid: int,
        limits: Limits,
        *,
        mode: str = "auto",
        min_host_free_mb: int = 1024,
    ) -> None:
        if mode not in ("auto", "loop", "dir"):
            raise ValueError(f"workspace mode must be 'auto', 'loop' or 'dir', not {mode!r}")
        self.sandbox_dir = Path(sandbox_dir)
        self.uid = uid
        self.gid = gid
        self.limits = limits
        self.requested_mode: str = mode
        self.min_host_free_mb = min_host_free_mb
        #: The host mount point (loop) or directory (dir) that is bind-mounted as ``/workspace``.
        self.path = self.sandbox_dir / self.MOUNT_NAME
        #: The ext4 image in loop mode.
        self.image = self.sandbox_dir / self.IMAGE_NAME
        self._mode: str | None = None if mode == "auto" else mode
        self._lock = asyncio.Lock()

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def mode(self) -> str | None:
        """``"loop"`` or ``"dir"`` once :meth:`create` or :meth:`reattach` decided (None before, in auto)."""
        return self._mode

    @property
    def quota_enforced(self) -> bool:
        """Whether ``disk_mb`` and ``files`` are enforced by the kernel (loop mode). False until decided."""
        return self._mode == "loop"

    def __repr__(self) -> str:
        return f"<Workspace {str(self.path)!r} mode={self._mode or self.requested_mode}>"

    async def _resolve_mode(self) -> str:
        if self._mode is None:
            self._mode = "loop" if await loop_available() else "dir"
        elif self._mode == "loop" and not await loop_available():
            raise IsolationUnavailable(
                "A loop-mounted workspace needs root, e2fsprogs and a free loop device; "
                "this gateway can only offer workspace mode 'dir' (no disk quota)."
            )
        return self._mode

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def create(self) -> None:
        """Make a new, empty workspace. Called by the sandbox before its processes start.

        Loop mode: a sparse image of ``disk_mb`` (no host space used until written), ext4 with ``files``
        inodes and no root-reserved blocks, mounted ``nosuid,nodev`` (not ``noexec``: users run programs they
        wrote), root directory owned by the sandbox uid. On any failure everything made so far is removed
        again.
        """
        async with self._lock:
            mode = await self._resolve_mode()
            # Refuse before touching anything: the clean-up below must only ever remove what this call made.
            if _exists(self.image) or is_mounted(self.path) or self._has_content():
                raise SandboxError(f"A workspace already exists in {self.sandbox_dir}; reattach it instead.")
            if mode == "loop":
                check_host_space(self.sandbox_dir, self.limits.disk_mb, self.min_host_free_mb)
            try:
                self._make_mount_point()
                if mode == "loop":
                    await self._create_loop()
                self._own_root()
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    await self._teardown()
                if isinstance(exc, OSError):
                    raise SandboxError(f"Could not create the workspace: {exc.strerror or exc}.") from exc
                raise

    def _has_content(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return not stat_mod.S_ISDIR(st.st_mode) or bool(os.listdir(self.path))

    def _make_mount_point(self) -> None:
        try:
            os.mkdir(self.path, 0o755)
        except FileExistsError:
            st = os.lstat(self.path)
            if not stat_mod.S_ISDIR(st.st_mode):
                raise SandboxError(f"{self.path} exists and is not a directory.") from None
            if os.listdir(self.path):
                # Mounting over files would hide them, and they would not count against the quota.
                raise SandboxError(
                    f"{self.path} is not empty; refusing to mount a workspace over it."
                ) from None

    async def _create_loop(self) -> None:
        await make_image(self.image, disk_mb=self.limits.disk_mb, files=self.limits.files,
                               uid=self.uid, gid=self.gid)
        await mount_image(self.image, self.path)
        root = self._open_root()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir("lost+found", dir_fd=root)
        finally:
            os.close(root)

    def _own_root(self) -> None:
        root = self._open_root()
        try:
            self._own(root, 0o755)
        finally:
            os.close(root)

    async def reattach(self) -> None:
        """Bring back an existing workspace, e.g. after a gateway restart: mount its image if not mounted.

        Used when a paused sandbox resumes and when a restarted gateway restores the sandboxes its store
        records. Nothing is formatted or emptied; a missing workspace raises :class:`SandboxError`. In auto mode
        an existing image means loop mode. A workspace whose root belongs to another uid (the sandbox's old uid
        was taken while it was paused) is given to this one: every file and directory of the old uid in it,
        found by a walk that follows no symlink (no process of the sandbox runs meanwhile).
        """
        async with self._lock:
            if self._mode is None:
                self._mode = "loop" if _exists(self.image) else "dir"
            if self._mode == "loop":
                if not _is_regular_file(self.image):
                    raise SandboxError(f"The workspace image {self.image} is missing.")
                if not is_mounted(self.path):
                    self._make_mount_point()
                    await mount_image(self.image, self.path)
            else:
                try:
                    st = os.lstat(self.path)
                except FileNotFoundError:
                    raise SandboxError(f"The workspace directory {self.path} is missing.") from None
                if not stat_mod.S_ISDIR(st.st_mode):
                    raise SandboxError(f"{self.path} is not a directory.")
            old_uid = os.lstat(self.path).st_uid
            if old_uid != self.uid:
                await asyncio.get_running_loop().run_in_executor(None, self._reown, old_uid)

    def _reown(self, old_uid: int) -> None:
        """Give everything of ``old_uid`` in the workspace to this workspace's uid (never following a link)."""
        os.lchown(self.path, self.uid, self.gid)
        for top, dirs, files in os.walk(self.path, followlinks=False):
            for name in dirs + files:
                path = os.path.join(top, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.lstat(path).st_uid == old_uid:
                        os.lchown(path, self.uid, self.gid)

    async def detach(self) -> None:
        """Unmount the workspace but keep it (its image in loop mode; a directory stays as it is): for a sandbox
        that pauses, or stops with the gateway and is restored by the next one. :meth:`reattach` mounts it
        again. Idempotent; raises :class:`SandboxError` when it cannot be unmounted."""
        async with self._lock:
            try:
                await unmount(self.path)
            except OSError as exc:
                raise SandboxError(f"Could not unmount the workspace: {exc.strerror or exc}.") from exc

    async def destroy(self) -> None:
        """Unmount and delete the workspace and everything in it. Idempotent; called when a sandbox goes.

        A busy mount is retried, then detached lazily (``umount -l``) so a stuck reader cannot keep a
        sandbox's disk alive; the loop device goes away with the last reference (mount sets it to autoclear).
        """
        async with self._lock:
            try:
                await self._teardown()
            except OSError as exc:
                raise SandboxError(f"Could not remove the workspace: {exc.strerror or exc}.") from exc

    async def _teardown(self) -> None:
        await unmount(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.image)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat_mod.S_ISDIR(st.st_mode):
            os.unlink(self.path)
            return
        # sandbox_dir is the caller's own root-owned directory: no O_NOFOLLOW, it may be reached by a link.
        parent = os.open(self.sandbox_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_tree(parent, self.MOUNT_NAME, budget=self._walk_budget(), attempts=10)
        except TreeChanged:
            raise SandboxError(f"Could not remove {self.path}: its contents kept changing.") from None
        finally:
            os.close(parent)

    # -- accounting ------------------------------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """Bytes and files (inodes) the workspace uses; for sandbox metrics (``disk_bytes``).

        Loop mode reads ``statvfs`` of the workspace filesystem (ext4's own inodes not counted). Dir mode
        shares the host filesystem, so it counts the tree instead (descriptor walk, bounded; hard links
        counted once).
        """
        if self._image_present():
            return image_usage(self._statvfs())
        return self._tree_usage()

    def capacity(self) -> int:
        """Bytes the sandbox can store when empty (``disk_limit_bytes``): what ext4 leaves of ``disk_mb``
        after its journal and inode tables. Dir mode has no quota and answers the nominal ``disk_mb``."""
        if self._image_present():
            return image_capacity(self._statvfs())
        return self.limits.disk_mb * MiB

    def _statvfs(self) -> os.statvfs_result:
        root = self._open_root()  # refuses an unmounted image rather than report the host disk
        try:
            return os.fstatvfs(root)
        finally:
            os.close(root)

    def _image_present(self) -> bool:
        return self._mode == "loop" or (self._mode is None and _exists(self.image))

    def _open_root(self) -> int:
        """A descriptor of the workspace root. Every file operation starts here and only ever goes down."""
        try:
            fd = os.open(self.path, DIR_FLAGS)
        except FileNotFoundError:
            raise WorkspaceUnavailable("The workspace is not available.") from None
        if _exists(self.image):
            # An image without its mount would send writes to the host disk under the mount point.
            if os.fstat(fd).st_dev == os.stat(self.sandbox_dir).st_dev:
                os.close(fd)
                raise WorkspaceUnavailable("The workspace is not mounted.")
        return fd

