"""Files in a sandbox's ``/workspace``: ``file_upload``, ``file_download``, ``file_list``, ``file_delete``.

:class:`Files` decides who may touch which sandbox's workspace (the tenant's own, running) and what a path
argument must be; the sandbox layer's :class:`~kernelhub.sandbox.workspace.Workspace` resolves paths inside the
workspace and does the I/O, refusing escapes (``..``, symlinks) and sizes over ``max_file_mb``. Built by
:class:`~kernelhub.services.hub.Hub` on :class:`~kernelhub.services.sandboxes.Sandboxes`; the REST file routes
and the MCP file tools call it through the hub.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from ..sandbox.files import FileChunks, UploadWriter
from ..sandbox.workspace import Workspace
from .sandboxes import Sandboxes
from .tenants import Tenant


class Files:
    """The workspace of each running sandbox in :class:`~kernelhub.services.sandboxes.Sandboxes`, by tenant."""

    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes

    def _workspace(self, tenant: Tenant, sandbox_id: object) -> Workspace:
        record, sandbox = self.sandboxes.running(tenant, sandbox_id)
        assert sandbox.workspace is not None
        return sandbox.workspace

    def open_upload(self, tenant: Tenant, sandbox_id: object, path: object) -> UploadWriter:
        """``file_upload``: a writer the surface feeds chunk by chunk, then ``finish()``es."""
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        return UploadWriter(self._workspace(tenant, sandbox_id), path)

    def open_download(self, tenant: Tenant, sandbox_id: object, path: object) -> FileChunks:
        """``file_download``: the file as an async stream of chunks with its ``size``; the caller iterates it
        inside ``async with`` so that the file is closed however the download ends."""
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        return self._workspace(tenant, sandbox_id).open_download(path)

    def list_files(self, tenant: Tenant, sandbox_id: object, path: object = "") -> list[dict[str, Any]]:
        """``file_list``: the entries of the directory ``path`` (``""``: ``/workspace``), shaped by
        :meth:`~kernelhub.sandbox.workspace.Workspace.list_dir`."""
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        return self._workspace(tenant, sandbox_id).list_dir(path)

    def delete_file(self, tenant: Tenant, sandbox_id: object, path: object) -> None:
        """``file_delete``: a file, or a directory with what is in it; never ``/workspace`` itself."""
        if not isinstance(path, str) or not path.strip("/"):
            raise InvalidRequest("path must name a file or directory inside the workspace.")
        self._workspace(tenant, sandbox_id).delete(path)

    def max_file_bytes(self, tenant: Tenant, sandbox_id: object) -> int:
        """The sandbox's ``max_file_mb`` in bytes: the REST upload route refuses a larger body before reading it."""
        record = self.sandboxes.get_sandbox(tenant, sandbox_id)
        return record.limits.max_file_mb * 1024 * 1024

    # -- what the E2B surface needs besides (E2B.md 5.2) ---------------------------------------------------

    def describe_file(self, tenant: Tenant, sandbox_id: object, path: object) -> dict[str, Any]:
        """One entry with its mode, permissions, owner and symlink target
        (:meth:`~kernelhub.sandbox.files.WorkspaceFiles.describe`); ``""`` is ``/workspace`` itself."""
        return self._workspace(tenant, sandbox_id).describe(_path(path))

    def describe_dir(self, tenant: Tenant, sandbox_id: object, path: object, depth: object = 1) -> list[dict[str, Any]]:
        """The entries below a directory down to ``depth`` levels (1 to 16), each as :meth:`describe_file`."""
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 16:
            raise InvalidRequest("depth must be a whole number from 1 to 16.")
        record, _ = self.sandboxes.running(tenant, sandbox_id)
        return self._workspace(tenant, sandbox_id).describe_dir(_path(path), depth, limit=record.limits.files)

    def make_dir(self, tenant: Tenant, sandbox_id: object, path: object) -> bool:
        """Make a directory and its parents; False when it was there already."""
        return self._workspace(tenant, sandbox_id).make_dir(_path(path))

    def move_file(self, tenant: Tenant, sandbox_id: object, source: object, destination: object) -> None:
        """Rename a file or directory inside the workspace (the destination's parents are made)."""
        self._workspace(tenant, sandbox_id).move(_path(source), _path(destination))


def _path(path: object) -> str:
    if not isinstance(path, str):
        raise InvalidRequest("path must be a string.")
    return path
