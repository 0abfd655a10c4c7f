"""Files in a sandbox's ``/workspace``: ``file_upload``, ``file_download``, ``file_list``, ``file_delete``.

:class:`Files` decides who may touch which sandbox's workspace (the tenant's own, running) and what a path
argument must be; the sandbox layer's :class:`~kernelhub.sandbox.workspace.Workspace` resolves paths inside the
workspace and does the I/O, refusing escapes (``..``, symlinks) and sizes over ``max_file_mb``. Built by
:class:`~kernelhub.services.hub.Hub` on :class:`~kernelhub.services.sandboxes.Sandboxes`; the REST file routes
and the MCP file tools call it through the hub.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

from ..errors import InvalidRequest
from ..sandbox.files import FileChunks, UploadWriter, split_workspace_path
from ..sandbox.workspace import Workspace
from .sandboxes import Sandboxes
from .tenants import Tenant

#: Entries of one ``file_list`` page when the request names no ``limit``, and the most it may ask for.
DEFAULT_PAGE = 1000
MAX_PAGE = 10000


class Files:
    """The workspace of each running sandbox in :class:`~kernelhub.services.sandboxes.Sandboxes`, by tenant.

    Listing and deleting walk directories that may hold hundreds of thousands of entries: they run in a
    thread, never on the event loop that serves every tenant."""

    def __init__(self, sandboxes: Sandboxes) -> None:
        self.sandboxes = sandboxes
        # Signs file_list cursors: a cursor is opaque, and good only for the sandbox and directory it came from.
        self._cursor_key = secrets.token_bytes(32)

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

    async def list_files(self, tenant: Tenant, sandbox_id: object, path: object = "", *, limit: object = None,
                         cursor: object = None) -> dict[str, Any]:
        """``file_list``: ``{"entries": [...], "next": cursor | None}``, the entries of the directory ``path``
        (``""``: ``/workspace``) shaped by :meth:`~kernelhub.sandbox.workspace.Workspace.list_dir`, sorted by
        name, at most ``limit`` (1 to :data:`MAX_PAGE`, default :data:`DEFAULT_PAGE`) of them after ``cursor``
        (the ``next`` of the page before). Raises :class:`InvalidRequest` for a bad limit or a cursor that is
        not this directory's."""
        if not isinstance(path, str):
            raise InvalidRequest("path must be a string.")
        page_size = _page_size(limit)
        workspace = self._workspace(tenant, sandbox_id)
        where = "/".join(split_workspace_path(path))
        after = self._read_cursor(cursor, str(sandbox_id), where) if cursor not in (None, "") else None
        entries, last = await asyncio.to_thread(workspace.list_page, path, limit=page_size, after=after)
        following = self._make_cursor(str(sandbox_id), where, last) if last is not None else None
        return {"entries": entries, "next": following}

    def _make_cursor(self, sandbox_id: str, where: str, last: str) -> str:
        # ``last`` may hold surrogates (a name that is not UTF-8): JSON escapes them (``\udce9``) and gives them back.
        payload = base64.urlsafe_b64encode(json.dumps([sandbox_id, where, last]).encode()).rstrip(b"=")
        mac = hmac.new(self._cursor_key, payload, hashlib.sha256).digest()[:16]
        return payload.decode() + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def _read_cursor(self, cursor: object, sandbox_id: str, where: str) -> str:
        bad = InvalidRequest("cursor is not one this listing gave (use the 'next' of the page before, for the "
                             "same sandbox and directory; cursors end with the gateway that made them).")
        if not isinstance(cursor, str) or cursor.count(".") != 1 or len(cursor) > 8192:
            raise bad
        payload, _, mac = cursor.partition(".")
        want = base64.urlsafe_b64encode(hmac.new(self._cursor_key, payload.encode(), hashlib.sha256)
                                        .digest()[:16]).rstrip(b"=").decode()
        if not hmac.compare_digest(mac, want):
            raise bad
        try:
            owner, directory, last = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, TypeError):
            raise bad from None
        if owner != sandbox_id or directory != where or not isinstance(last, str):
            raise bad
        return last

    async def delete_file(self, tenant: Tenant, sandbox_id: object, path: object) -> None:
        """``file_delete``: a file, or a directory with what is in it; never ``/workspace`` itself."""
        if not isinstance(path, str) or not path.strip("/"):
            raise InvalidRequest("path must name a file or directory inside the workspace.")
        await asyncio.to_thread(self._workspace(tenant, sandbox_id).delete, path)

    def max_file_bytes(self, tenant: Tenant, sandbox_id: object) -> int:
        """The sandbox's ``max_file_mb`` in bytes: the REST upload route refuses a larger body before reading it."""
        record = self.sandboxes.get_sandbox(tenant, sandbox_id)
        return record.limits.max_file_mb * 1024 * 1024

    # -- what the E2B surface needs besides (E2B.md 5.2) ---------------------------------------------------

    def describe_file(self, tenant: Tenant, sandbox_id: object, path: object) -> dict[str, Any]:
        """One entry with its mode, permissions, owner and symlink target
        (:meth:`~kernelhub.sandbox.files.WorkspaceFiles.describe`); ``""`` is ``/workspace`` itself."""
        return self._workspace(tenant, sandbox_id).describe(_path(path))

    async def describe_dir(self, tenant: Tenant, sandbox_id: object, path: object,
                           depth: object = 1) -> list[dict[str, Any]]:
        """The entries below a directory down to ``depth`` levels (1 to 16), each as :meth:`describe_file`;
        walked off the event loop (a directory may hold the sandbox's whole ``files`` limit)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 16:
            raise InvalidRequest("depth must be a whole number from 1 to 16.")
        record, _ = self.sandboxes.running(tenant, sandbox_id)
        workspace = self._workspace(tenant, sandbox_id)
        return await asyncio.to_thread(workspace.describe_dir, _path(path), depth, limit=record.limits.files)

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


def _page_size(limit: object) -> int:
    if limit is None or limit == "":
        return DEFAULT_PAGE
    if isinstance(limit, str) and limit.isdigit():
        limit = int(limit)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}.")
    return limit
