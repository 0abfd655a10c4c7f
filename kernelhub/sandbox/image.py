"""A workspace's ext4 image on a loop device: the kernel enforces its disk and file quota for everyone.

An image is a sparse file of ``disk_mb`` (the host pays only for what is written) holding an ext4 filesystem
with ``files`` inodes and no blocks reserved for root (``-m 0``), so the gateway's own root writes hit the same
quota as the sandbox's. It is mounted ``nosuid,nodev`` (not ``noexec``: users run programs they wrote) through
a loop device that ``mount`` sets to autoclear, so the device goes away with the last reference.

Who calls what: :class:`~kernelhub.sandbox.workspace.Workspace` creates, mounts and unmounts images and reads
their usage through these functions; ``Workspace(mode="auto")`` and ``kernelhub doctor`` ask
:func:`loop_available`. Every tool runs through :func:`kernelhub.sandbox.tools.run_tool`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
from pathlib import Path

from ..errors import HostDiskFull, SandboxError
from .tools import TOOL_ENV, run_tool

__all__ = [
    "EXT4_RESERVED_INODES",
    "MiB",
    "check_host_space",
    "image_capacity",
    "image_usage",
    "is_mounted",
    "loop_available",
    "make_image",
    "mount_image",
    "unmount",
]

MiB = 1024 * 1024
# ext4 keeps inodes 1-10 for itself (EXT4_GOOD_OLD_FIRST_INO = 11); the root directory is one of them. mkfs is
# asked for ``files`` more than that so the sandbox can really create ``files`` files and directories.
EXT4_RESERVED_INODES = 10
_UMOUNT_ATTEMPTS = 5

_loop_available: bool | None = None


async def loop_available() -> bool:
    """Whether this machine can give workspaces a real quota: root, e2fsprogs and a free loop device.

    ``mode="auto"`` asks this on create; ``kernelhub doctor`` reports it. The answer is cached for the
    process."""
    global _loop_available
    if _loop_available is None:
        ok = os.geteuid() == 0 and all(
            shutil.which(cmd, path=TOOL_ENV["PATH"])
            for cmd in ("mkfs.ext4", "mount", "umount", "losetup")
        )
        if ok:
            rc, _ = await run_tool("losetup", "--find")
            ok = rc == 0
        _loop_available = ok
    return _loop_available


def is_mounted(path: Path) -> bool:
    return os.path.ismount(path)


def check_host_space(directory: Path, disk_mb: int, min_free_mb: int) -> None:
    """Keep the host disk safe: an image of ``disk_mb``, once full, must leave ``min_free_mb`` free on the
    filesystem holding ``directory``. Raises :class:`SandboxError` ``host_disk_full`` (507) otherwise."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free - disk_mb * MiB < min_free_mb * MiB:
        raise HostDiskFull(
            f"The host disk has {free // MiB} MiB free; a {disk_mb} MiB workspace would "
            f"leave less than the {min_free_mb} MiB the gateway keeps free."
        )


async def make_image(image: Path, *, disk_mb: int, files: int, uid: int, gid: int) -> None:
    """Create ``image`` (it must not exist) as a sparse file of ``disk_mb`` MiB and make an ext4 filesystem in
    it with room for ``files`` files and its root directory owned by ``uid``:``gid``. Raises
    :class:`SandboxError` if mkfs fails and OSError if the file cannot be made; the caller removes what is
    left."""
    # O_EXCL|O_NOFOLLOW: never reuse or follow whatever is there. 0600: the raw image is the gateway's
    # alone; a sandbox able to write it could feed the kernel a crafted filesystem.
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, disk_mb * MiB)
    finally:
        os.close(fd)
    rc, out = await run_tool(
        "mkfs.ext4",
        "-q",
        "-F",
        # No blocks reserved for root: the gateway writes uploads as root and must hit the same quota.
        "-m",
        "0",
        "-N",
        str(files + EXT4_RESERVED_INODES),
        # lazy_journal_init: the image is sparse, so the unwritten journal already reads as zeros; this
        # keeps a fresh 1 GiB workspace at well under 1 MiB of host disk instead of 33 MiB.
        "-E",
        f"root_owner={uid}:{gid},lazy_journal_init=1",
        str(image),
    )
    if rc != 0:
        raise SandboxError(f"Could not make the workspace filesystem: {out or f'mkfs.ext4 exit {rc}'}.")


#: The name a workspace's filesystem is mounted from: what ``/proc/self/mountinfo`` shows as its source inside
#: the sandbox, instead of the host's ``/dev/loopN``.
MOUNT_SOURCE = "workspace"


async def mount_image(image: Path, mount_point: Path) -> None:
    """Mount ``image`` at ``mount_point`` through a loop device, ``nosuid,nodev``; SandboxError on failure.

    The loop device is reached through a device node named :data:`MOUNT_SOURCE`, made next to the image for
    the moment of the mount, and mount(2) is given that relative name: the kernel keeps the source string it
    was given, so the sandbox's mountinfo names no host device. The device is set to clear itself when the
    mount goes (``losetup -d`` of a busy device). Where no device node can be made there (a ``nodev``
    filesystem), ``mount -o loop`` names the device."""
    rc, out = await run_tool("losetup", "--find", "--show", str(image))
    if rc != 0:
        raise SandboxError(f"Could not attach the workspace image: {out or f'losetup exit {rc}'}.")
    device = out.splitlines()[-1].strip()
    node_dir = image.parent / f".mount-{os.getpid()}-{image.stat().st_ino}"
    try:
        os.mkdir(node_dir, 0o700)
        try:
            os.mknod(node_dir / MOUNT_SOURCE, 0o600 | stat.S_IFBLK, os.stat(device).st_rdev)
            rc, out = await run_tool("mount", "--no-canonicalize", "-t", "ext4", "-o", "nosuid,nodev",
                                     MOUNT_SOURCE, str(mount_point), cwd=str(node_dir))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(node_dir / MOUNT_SOURCE)
            os.rmdir(node_dir)
    except OSError as exc:
        rc, out = 1, str(exc)
    # Mounted: the device now clears itself when the mount goes. Not mounted: this detaches it.
    await run_tool("losetup", "-d", device)
    if rc == 0:
        return
    rc, out = await run_tool(
        "mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(mount_point)
    )
    if rc != 0:
        raise SandboxError(f"Could not mount the workspace: {out or f'mount exit {rc}'}.")


async def unmount(mount_point: Path) -> None:
    """Unmount everything mounted at ``mount_point``; nothing mounted is fine.

    A busy mount is retried with short backoff, then detached lazily (``umount -l``) so a stuck reader cannot
    keep a sandbox's disk alive. Raises :class:`SandboxError` if something is still mounted after that."""
    # A workspace may be mounted twice (a reattach racing a restart): unmount until nothing is left.
    for _ in range(4):
        if not is_mounted(mount_point):
            return
        out = ""
        for attempt in range(_UMOUNT_ATTEMPTS):
            rc, out = await run_tool("umount", str(mount_point))
            if rc == 0 or not is_mounted(mount_point):
                break
            if attempt < _UMOUNT_ATTEMPTS - 1:
                await asyncio.sleep(0.05 * 2**attempt)  # a kernel that is just exiting lets go soon
        else:
            rc, out = await run_tool("umount", "-l", str(mount_point))
            if rc != 0 and is_mounted(mount_point):
                raise SandboxError(f"Could not unmount the workspace {mount_point}: {out}.")
    if is_mounted(mount_point):
        raise SandboxError(f"The workspace {mount_point} is still mounted.")


def image_usage(st: os.statvfs_result) -> tuple[int, int]:
    """Bytes and files (inodes, ext4's own not counted) in use, from ``statvfs`` of a mounted image."""
    used_bytes = (st.f_blocks - st.f_bfree) * st.f_frsize
    used_files = max(0, st.f_files - st.f_ffree - EXT4_RESERVED_INODES)
    return used_bytes, used_files


def image_capacity(st: os.statvfs_result) -> int:
    """Bytes an empty image can store, from ``statvfs`` of it mounted: what ext4 leaves of ``disk_mb`` after
    its journal and inode tables."""
    # f_bfree - f_bavail are ext4's reserved clusters, usable by nobody (not even root) for file data.
    return (st.f_blocks - (st.f_bfree - st.f_bavail)) * st.f_frsize
