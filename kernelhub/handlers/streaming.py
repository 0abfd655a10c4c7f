"""Streamed answers: one item after another, each flushed as it comes, keepalives while nothing does; and a
workspace file sent as it is read (:func:`send_download`).

:class:`StreamingMixin` serves the command routes' NDJSON (:mod:`kernelhub.handlers.commands`) and the E2B
surface's NDJSON and Connect streams (:mod:`kernelhub.handlers.e2b`). A handler calls :meth:`begin_stream` with
its content type, then :meth:`pump` with an async iterator of the encoded items; the pump ends when the items
do or when the client goes away (tornado's ``on_connection_close``), and never buffers more than one item: a slow
client holds back the producer, which bounds what it keeps (a command's output buffer).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tornado import iostream, web
from tornado.http1connection import HTTP1Connection

if TYPE_CHECKING:
    from ..sandbox.files import FileChunks


class StreamingMixin(web.RequestHandler):
    """A request handler that answers with a stream (see the module)."""

    _gone_future: asyncio.Future[None] | None = None

    @property
    def gone(self) -> asyncio.Future[None]:
        """Done once the client closed the connection."""
        if self._gone_future is None:
            self._gone_future = asyncio.get_running_loop().create_future()
        return self._gone_future

    def on_connection_close(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        super().on_connection_close()

    def begin_stream(self, content_type: str, status: int = 200) -> None:
        """Set the status and headers of a streamed answer, with Nagle's delay off (KERNELS.md)."""
        self.set_status(status)
        self.set_header("Content-Type", content_type)
        self.set_header("X-Accel-Buffering", "no")
        self.set_header("Cache-Control", "no-store")
        if isinstance(self.request.connection, HTTP1Connection) and self.request.connection.stream is not None:
            self.request.connection.stream.set_nodelay(True)

    async def pump(self, items: AsyncIterator[bytes], *, keepalive: bytes | None = None,
                   interval: float = 10.0) -> bool:
        """Write and flush each of ``items``; while none comes for ``interval`` seconds, write ``keepalive``
        (when given). Answers True when the items ended, False when the client went away first."""
        iterator = aiter(items)
        pending: asyncio.Future[bytes] = asyncio.ensure_future(anext(iterator))
        try:
            while True:
                waiting: set[asyncio.Future[Any]] = {pending, self.gone}
                done, _ = await asyncio.wait(waiting, timeout=interval if keepalive else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if self.gone.done():
                    return False
                if pending in done:
                    try:
                        item = pending.result()
                    except StopAsyncIteration:
                        return True
                    pending = asyncio.ensure_future(anext(iterator))
                else:
                    assert keepalive is not None
                    item = keepalive
                self.write(item)
                try:
                    await self.flush()
                except iostream.StreamClosedError:
                    return False
        finally:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
            closer = getattr(iterator, "aclose", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    await closer()


async def send_download(handler: web.RequestHandler, download: FileChunks) -> None:
    """Answer ``download``'s bytes (``Content-Length`` its size, ``application/octet-stream``) chunk by chunk,
    each flushed before the next is read, and finish. The caller holds ``async with download`` (the file closes
    however this ends). A client that went away ends it quietly; a file the sandbox truncated meanwhile ends the
    connection rather than lie about the length. Used by the REST and the E2B file routes."""
    handler.set_header("Content-Type", "application/octet-stream")
    handler.set_header("Content-Length", str(download.size))
    async for chunk in download:
        handler.write(chunk)
        try:
            await handler.flush()
        except iostream.StreamClosedError:
            return
    if download.sent < download.size and isinstance(handler.request.connection, HTTP1Connection):
        handler.request.connection.stream.close()
        return
    handler.finish()
