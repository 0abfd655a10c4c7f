"""A bound on what a kernel can make the gateway hold: every gateway socket to a kernel reads through a guard.

The kernel is the attacker's process (SECURITY.md pitfall 12): it holds its HMAC key, speaks ZeroMQ itself, and
can point a message's frames at ``mmap``\\ ed memory it never touched, which costs it nothing. ZeroMQ bounds what
the receiving side allocates only per frame (``ZMQ_MAXMSGSIZE``), and a multipart message is allocated whole
before the reader sees any of it (libzmq's pipes pass on complete messages only). Measured here with pyzmq 27.3
(libzmq 4.3.5): one message of 100 frames that all point at the same untouched 8 MiB ``mmap`` (22 MiB RSS in
the sender) took the receiver to 844 MiB RSS, with ``ZMQ_MAXMSGSIZE`` at 16 MiB.

So each gateway socket to a kernel (:meth:`ChannelGuard.link`) connects to a unix socket of the guard, in a
directory of the gateway's that the sandbox never sees, and the guard connects on to the kernel's own ipc
socket and copies bytes both ways. The gateway's side of the copy is plain pass-through; the kernel's side is
read frame by frame (ZMTP 3, the wire format of ZeroMQ: https://rfc.zeromq.org/spec/23/), before anything is
allocated for it, and:

- a frame or a message (its frames together) larger than :attr:`ChannelBounds.max_message` bytes, a command
  larger than :data:`MAX_COMMAND_BYTES`, or a greeting that is not ZMTP 3 cuts the connection and is reported
  (:attr:`ChannelGuard.on_violation`) before more than one read of it (at most :data:`READ_BYTES`) was passed on;
- bytes passed on to a gateway socket and not yet read from it by the gateway (:meth:`consumed`) are held to
  :attr:`ChannelBounds.window`: past it the guard stops reading from the kernel until the gateway has read, so
  a kernel that writes faster than the gateway reads fills its own buffers, not the gateway's;
- messages are held to :attr:`ChannelBounds.messages_per_s` a second on each link, in bursts of
  :attr:`ChannelBounds.message_burst`: the gateway spends about 50 µs of its loop on each message it reads
  whatever its size (issue 9: 5,000 small iopub messages a second, each under the envelope that output caps do not
  count, cost the gateway a quarter of a core per sandbox, without end), so a link past the rate is cut and
  reported as for a message too large. The bucket is the link's, kept across reconnections.

What one link costs the gateway: three descriptors (the listening socket, the accepted one, the one to the
kernel) besides the ZeroMQ socket's own two, no thread, and at most ``window`` + :data:`READ_BYTES` bytes held
for the kernel (the asyncio transports' write buffers are kept small by pausing the other side). The sockets
themselves get ``ZMQ_MAXMSGSIZE`` too (:func:`socket_options`).

Who calls what: :class:`~kernelhub.sandbox.kernel_manager.GuardedKernelManager` makes one guard per kernel and a
:class:`GuardedSocket` (through a link of its own) for every socket it opens to that kernel; whoever reads or
closes such a socket does so as with any asyncio ZeroMQ socket, and the socket tells its link. No policy here:
the owner of the kernel decides what a violation means.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import zmq
import zmq.asyncio

__all__ = ["ChannelBounds", "ChannelGuard", "DropLog", "GuardedSocket", "Link", "TokenBucket", "socket_options"]

log = logging.getLogger("kernelhub.channel_guard")

#: The largest ZMTP command (READY with its properties, SUBSCRIBE, PING, ...) a kernel may send, in bytes.
MAX_COMMAND_BYTES = 64 * 1024
#: Bytes read from a kernel's socket at a time (asyncio's own read size for unix sockets).
READ_BYTES = 256 * 1024
#: How many bytes the asyncio transports may buffer on either side before the other side is paused.
_WRITE_HIGH = 256 * 1024
#: Messages a gateway socket queues for a kernel that does not read them (``ZMQ_SNDHWM``); past it a send waits,
#: and a sender that awaits it (the Jupyter relay) stops reading its client.
SEND_HWM = 8
#: Messages a second one link passes on from a kernel, sustained, and in a burst (the defaults of
#: ``SandboxFactory.kernel_messages_per_s`` and ``kernel_message_burst``). Measured here (2 cores shared with other
#: test runs; messages a second on the session's iopub link, the busiest second of each run, through the gateway):
#: honest kernels peak at 7,890 (bash_kernel, ``seq 1 2000000``), 5,451 (bash, an ``echo`` loop), 4,816 and
#: 4,608 (python, ``sys.stderr.flush()`` / ``print(..., flush=True)`` every line), 3,971 (the same from a thread),
#: 2,786 (``clear_output(wait=True)`` + print), 2,489 (``DisplayHandle.update`` loop), 2,110 (``display`` loop)
#: and under 200 (python, a ``print`` loop: ipykernel batches). tslab sent 3,628 (``console.log`` with an ``await``
#: every 100 lines) before kernelhub's preload (``tslab_ipc.js``) gathered its writes; now 77, and under 20 for a
#: synchronous loop. A kernel sending prebuilt status messages as fast as it can got 16,000 to 17,600 a second
#: through (the gateway's own ceiling for one kernel). Honest kernels that print a line a message are held back by
#: the gateway's handling of real output, about half that ceiling, so the bound lies between them (1.27 times the
#: busiest honest kernel: not far above it); the burst (ten seconds at the bound) absorbs an honest peak past it.
#: The attack of issue 9 (5,000 a second) is under the bound: it cannot be told from bash's ``seq`` by its rate.
MESSAGES_PER_S = 10_000.0
MESSAGE_BURST = 100_000
_GREETING = 64
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04


@dataclasses.dataclass(frozen=True)
class ChannelBounds:
    """What one kernel may send the gateway. ``max_message``: bytes of one message, its frames together (and
    of one frame: ``ZMQ_MAXMSGSIZE``). ``window``: bytes of messages passed on to one gateway socket and not yet
    read from it; at least ``max_message`` (a message must fit), raised to it otherwise. ``messages_per_s`` and
    ``message_burst``: messages one link passes on a second, sustained, and at most at once (a link starts with a
    full burst; :data:`MESSAGES_PER_S`, :data:`MESSAGE_BURST`)."""

    max_message: int
    window: int
    messages_per_s: float = MESSAGES_PER_S
    message_burst: int = MESSAGE_BURST

    def __post_init__(self) -> None:
        if self.max_message < 1024:
            raise ValueError("max_message must be at least 1024 bytes")
        if not (self.messages_per_s > 0 and self.message_burst >= 1):
            raise ValueError("messages_per_s and message_burst must be positive")
        if self.window < self.max_message:
            object.__setattr__(self, "window", self.max_message)


def socket_options(sock: zmq.Socket[Any], bounds: ChannelBounds) -> None:
    """``ZMQ_MAXMSGSIZE`` on a gateway socket to a kernel: libzmq refuses (and disconnects) a frame over it
    before allocating it. The guard bounds whole messages; this is the same bound one level down."""
    sock.setsockopt(zmq.MAXMSGSIZE, bounds.max_message)


class TokenBucket:
    """At most ``rate`` units a second, in bursts of at most ``capacity`` (it starts full)."""

    def __init__(self, capacity: int, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self._level = float(capacity)
        self._at = time.monotonic()

    def take(self, amount: int) -> bool:
        """Take ``amount``; False (and nothing taken) when there is not that much left."""
        now = time.monotonic()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        if amount > self._level:
            return False
        self._level -= amount
        return True


class _FrameReader:
    """Follows the ZMTP 3 stream a kernel sends (greeting, then frames) without keeping any of it: each call of
    :meth:`feed` answers the payload bytes of messages that went by, and raises :class:`ValueError` with a
    sentence for anything out of bounds (``rate``: the messages it may see, taken one at each message's end)."""

    def __init__(self, max_message: int, rate: TokenBucket | None = None) -> None:
        self.max_message = max_message
        self.rate = rate
        self._greeting = bytearray()
        self._header = bytearray()
        self._need = 0  # body bytes of the current frame still to come
        self._command = False
        self._more = False
        #: Payload bytes passed on of the message being received, not yet complete; and its size as declared
        #: by the frame headers so far (what the bound is checked against).
        self.partial = 0
        self._declared = 0
        self.messages = 0

    def feed(self, data: memoryview) -> int:
        """Advance over ``data``; answers the payload bytes of message frames in it. On :class:`ValueError`,
        none of ``data`` is to be passed on, and :attr:`partial` counts only what was."""
        before = self.partial
        try:
            return self._feed(data)
        except ValueError:
            self.partial = before
            raise

    def _feed(self, data: memoryview) -> int:
        payload = 0
        i, n = 0, len(data)
        while i < n:
            if len(self._greeting) < _GREETING:
                take = min(_GREETING - len(self._greeting), n - i)
                self._greeting += data[i:i + take]
                i += take
                if len(self._greeting) >= 1 and self._greeting[0] != 0xFF:
                    raise ValueError("the kernel's socket does not speak ZMTP 3 (no greeting signature)")
                if len(self._greeting) >= 11 and (self._greeting[9] != 0x7F or self._greeting[10] < 3):
                    raise ValueError("the kernel's socket speaks a ZMTP version before 3")
                continue
            if self._need:
                take = min(self._need, n - i)
                self._need -= take
                i += take
                if not self._command:
                    payload += take
                    self.partial += take
                    if not self._need and not self._more:
                        self._end_message()
                continue
            # A frame header: flags, then a 1-byte or 8-byte size.
            self._header.append(data[i])
            i += 1
            flags = self._header[0]
            if flags & 0xF8:
                raise ValueError(f"a frame with unknown flags {flags:#04x}")
            size_len = 8 if flags & _LONG else 1
            if len(self._header) < 1 + size_len:
                continue
            size = struct.unpack(">Q", bytes(self._header[1:9]))[0] if size_len == 8 else self._header[1]
            self._header.clear()
            self._command = bool(flags & _COMMAND)
            if self._command:
                if size > MAX_COMMAND_BYTES:
                    raise ValueError(f"a ZMTP command of {size} bytes (at most {MAX_COMMAND_BYTES})")
            else:
                self._more = bool(flags & _MORE)
                self._declared += size
                if self._declared > self.max_message:
                    raise ValueError(f"a message of at least {self._declared} bytes (at most {self.max_message})")
            self._need = size
            if not size and not self._command and not self._more:
                self._end_message()
        return payload

    def _end_message(self) -> None:
        self.partial = self._declared = 0
        self.messages += 1
        if self.rate is not None and not self.rate.take(1):
            raise ValueError(f"more than {self.rate.capacity} messages at more than {self.rate.rate:g} a second")


class _Side(asyncio.Protocol):
    """One end of a link's connection pair; hands what it reads to the pair."""

    def __init__(self, pair: _Pair, upstream: bool) -> None:
        self.pair = pair
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        self.pair.received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pair.close()

    def pause_writing(self) -> None:
        self.pair.other(self).pause("write")

    def resume_writing(self) -> None:
        self.pair.other(self).resume("write")

    def pause(self, why: str) -> None:
        self.pair.paused.add((self.upstream, why))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self, why: str) -> None:
        self.pair.paused.discard((self.upstream, why))
        if self.transport is not None and not self.transport.is_closing() and \
                not any(up == self.upstream for up, _ in self.pair.paused):
            self.transport.resume_reading()


class _Pair:
    """One connection of a gateway socket through the guard: the accepted side (the gateway's ZeroMQ socket)
    and the side to the kernel. A ZeroMQ socket reconnects by itself after the pair ends (a restarted kernel)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.down = _Side(self, upstream=False)
        self.up = _Side(self, upstream=True)
        self.reader = _FrameReader(link.guard.bounds.max_message, link.rate)
        self.paused: set[tuple[bool, str]] = set()
        self.closed = False

    def other(self, side: _Side) -> _Side:
        return self.down if side is self.up else self.up

    def received(self, side: _Side, data: bytes) -> None:
        if self.closed:
            return
        if side is self.up:
            try:
                payload = self.reader.feed(memoryview(data))
            except ValueError as exc:
                self.close()
                self.link.violated(str(exc))
                return
            self.link.forwarded(payload)
        target = self.other(side).transport
        if target is not None and not target.is_closing():
            target.write(data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Parts of a message the gateway's socket had not received whole are dropped by libzmq with the
        # connection: they will never be read, so they no longer count.
        self.link.forwarded(-self.reader.partial)
        for side in (self.down, self.up):
            if side.transport is not None:
                side.transport.abort()
        self.link.pair_closed(self)


class Link:
    """The path of one gateway socket to one of the kernel's sockets. ``endpoint`` is what the gateway's ZeroMQ
    socket connects to; :meth:`consumed` is called with the bytes of every message read from that socket."""

    def __init__(self, guard: ChannelGuard, channel: str, upstream: str, path: str) -> None:
        self.guard = guard
        self.channel = channel
        self.upstream = upstream
        self.path = path
        self.endpoint = f"ipc://{path}"
        #: Payload bytes passed on (counted as they arrive, before the gateway allocates them) and read.
        self.received = 0
        self.read = 0
        #: Messages this link may pass on (kept across the kernel's reconnections: a new connection is no
        #: new budget).
        bounds = guard.bounds
        self.rate = TokenBucket(bounds.message_burst, bounds.messages_per_s)
        self._pair: _Pair | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(path)
            self._listener.listen(8)
        except BaseException:
            self._listener.close()
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._listener.fileno(), self._accept)

    @property
    def outstanding(self) -> int:
        """Bytes passed on to the gateway's socket and not read from it yet (partial messages included)."""
        return self.received - self.read

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("accepting on %s: %s", self.path, exc)
                return
            if self._pair is not None:  # libzmq reconnected: the old connection is dead to it
                self._pair.close()
            pair = self._pair = _Pair(self)
            task = self._loop.create_task(self._connect(pair, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, pair: _Pair, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: pair.down, sock=conn)
            pair.down.pause("connecting")
            await self._loop.create_unix_connection(lambda: pair.up, self.upstream)
        except (OSError, asyncio.CancelledError):
            # The kernel is not (or no longer) listening: ZeroMQ retries the connection by itself.
            conn.close()
            pair.close()
            return
        if pair.closed:
            return
        pair.down.resume("connecting")
        if self.outstanding > self.guard.bounds.window:
            pair.up.pause("window")

    def forwarded(self, payload: int) -> None:
        self.received += payload
        pair = self._pair
        if payload > 0 and pair is not None and self.outstanding > self.guard.bounds.window:
            pair.up.pause("window")

    def consumed(self, nbytes: int) -> None:
        """Called by the :class:`GuardedSocket` with the bytes of each message read from it."""
        self.read += nbytes
        pair = self._pair
        if pair is not None and self.outstanding <= self.guard.bounds.window:
            pair.up.resume("window")

    def violated(self, reason: str) -> None:
        self.guard.violated(self, reason)

    def pair_closed(self, pair: _Pair) -> None:
        if self._pair is pair:
            self._pair = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._pair is not None:
            self._pair.close()
        for task in self._tasks:
            task.cancel()


class GuardedSocket(zmq.asyncio.Socket):
    """A gateway ZeroMQ socket to a kernel that reads through a :class:`Link`: every message it receives is
    reported to the link (so the guard reads on from the kernel), and closing it closes the link. Made by
    :meth:`ChannelGuard.socket`; read and closed as any asyncio socket."""

    link: Link | None = None

    def recv_multipart(self, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
        received = super().recv_multipart(flags, copy, track)
        if self.link is not None:
            received.add_done_callback(self._count)  # type: ignore[attr-defined]
        return received

    def _count(self, received: asyncio.Future[list[Any]]) -> None:
        if self.link is not None and not received.cancelled() and received.exception() is None:
            self.link.consumed(sum(memoryview(part).nbytes for part in received.result()))

    def close(self, linger: int | None = None) -> None:
        super().close(linger)
        link, self.link = self.link, None
        if link is not None:
            link.guard.release(link)


class ChannelGuard:
    """The links of one kernel. ``directory`` is the gateway's own (mode 0700, never bound into a sandbox),
    made here and removed by :meth:`close`; ``on_violation(channel, reason)`` is called (once per cut
    connection) with a sentence saying what the kernel sent."""

    def __init__(self, directory: Path, bounds: ChannelBounds,
                 on_violation: Callable[[str, str], None] | None = None) -> None:
        self.directory = directory
        self.bounds = bounds
        self.on_violation = on_violation
        self.violations = 0
        self._links: set[Link] = set()
        self._names = itertools.count(1)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700, parents=True)

    def socket(self, context: zmq.asyncio.Context, socket_type: int, channel: str, upstream_url: str,
               identity: bytes | None = None) -> GuardedSocket:
        """A gateway socket of ``socket_type`` connected through a new link to the kernel socket at
        ``upstream_url`` (``ipc://path``), with ``ZMQ_MAXMSGSIZE`` set. Raises :class:`ValueError` for any other
        transport (a kernel reached over tcp is not in a sandbox of ours)."""
        if not upstream_url.startswith("ipc://"):
            raise ValueError(f"a guarded kernel socket must be ipc, not {upstream_url[:40]!r}")
        path = str(self.directory / f"{channel[:2]}{next(self._names)}")
        link = Link(self, channel, upstream_url[len("ipc://"):], path)
        self._links.add(link)
        try:
            sock = cast(GuardedSocket, context.socket(socket_type, socket_class=GuardedSocket))
            sock.linger = 1000
            sock.sndhwm = SEND_HWM
            socket_options(sock, self.bounds)
            if identity:
                sock.identity = identity
            sock.connect(link.endpoint)
        except BaseException:
            self.release(link)
            raise
        sock.link = link
        return sock

    def release(self, link: Link) -> None:
        self._links.discard(link)
        link.close()

    def violated(self, link: Link, reason: str) -> None:
        self.violations += 1
        log.warning("a kernel's %s socket sent %s; its connection was cut", link.channel, reason)
        if self.on_violation is not None:
            self.on_violation(link.channel, reason)

    @property
    def links(self) -> int:
        """Links open now (one per open gateway socket to the kernel)."""
        return len(self._links)

    def close(self) -> None:
        """Close every link (the kernel is gone for good) and remove the directory. Sockets still open stay
        open but reach nothing."""
        for link in list(self._links):
            link.close()
        self._links.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


class DropLog:
    """What was dropped from one sandbox's kernels (malformed, badly signed, unknown messages), logged at most
    once per ``interval`` seconds as one line with the count and the last reason, never a traceback each: a
    sandbox sending garbage as fast as it can wrote 35 MB of gateway log in 20 s with one traceback a message.
    One per :class:`~kernelhub.sandbox.sandbox.Sandbox` (``kernel_drops``); readers of its kernels call
    :meth:`note`."""

    def __init__(self, where: str, interval: float = 60.0) -> None:
        self.where = where
        self.interval = interval
        self.total = 0
        self._count = 0
        self._last = ""
        self._logged_at: float | None = None

    def note(self, reason: str) -> None:
        """Count one dropped message; log now if nothing was logged for ``interval`` seconds."""
        self.total += 1
        self._count += 1
        self._last = reason[:200]
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.interval:
            log.warning("%s: dropped %d kernel message%s since the last report (the last: %s)", self.where,
                        self._count, "" if self._count == 1 else "s", self._last)
            self._logged_at = now
            self._count = 0
