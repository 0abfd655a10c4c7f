"""The channel guard (kernelhub/sandbox/channel_guard.py) between real ZeroMQ sockets: a "kernel" that binds
ROUTER and PUB sockets on ipc paths, and gateway sockets that connect through the guard. Messages pass both ways
unchanged (identities included); a frame or a message past the bound cuts the connection before the gateway
allocates it, and the socket reconnects; what the gateway does not read is held to the window; anything that is
not ZMTP 3 is refused."""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from kernelhub.sandbox.channel_guard import READ_BYTES, ChannelBounds, ChannelGuard, DropLog
from kernelhub.testing import until

MiB = 1024 * 1024
BOUNDS = ChannelBounds(max_message=4 * MiB, window=8 * MiB)


def run(tmp_path: Path, body: Callable[[ChannelGuard, zmq.asyncio.Context, Path, list[tuple[str, str]]],
                                       Awaitable[None]]) -> list[tuple[str, str]]:
    violations: list[tuple[str, str]] = []

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        guard = ChannelGuard(tmp_path / "guard", BOUNDS, lambda channel, reason: violations.append((channel, reason)))
        try:
            await body(guard, ctx, tmp_path, violations)
        finally:
            guard.close()
            ctx.destroy(linger=0)

    asyncio.run(asyncio.wait_for(main(), 60))
    return violations


def test_messages_pass_both_ways_with_identities(tmp_path: Path) -> None:
    async def body(guard: ChannelGuard, ctx: zmq.asyncio.Context, tmp: Path, _: Any) -> None:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/shell")
        dealer = guard.socket(ctx, zmq.DEALER, "shell", f"ipc://{tmp}/shell", identity=b"client-1")
        assert dealer.getsockopt(zmq.MAXMSGSIZE) == BOUNDS.max_message
        await dealer.send_multipart([b"hello", b"x" * 100_000])
        identity, *parts = await router.recv_multipart()
        assert identity == b"client-1" and parts == [b"hello", b"x" * 100_000]
        await router.send_multipart([b"client-1", b"reply", b"y" * (3 * MiB)])
        assert await dealer.recv_multipart() == [b"reply", b"y" * (3 * MiB)]
        link = dealer.link
        assert link is not None and link.received == link.read == 5 + 3 * MiB and link.outstanding == 0
        dealer.close(linger=0)
        assert guard.links == 0 and not os.path.exists(link.path)
        router.close(linger=0)

    assert run(tmp_path, body) == []


@pytest.mark.parametrize("frames", [
    [b"topic", b"?" * (64 * MiB)],  # one frame past the bound
    [b"topic", *[b"!" * (MiB - 1)] * 8],  # frames under it, a message past it
], ids=["one-frame", "many-frames"])
def test_a_message_past_the_bound_is_cut_before_it_is_allocated(tmp_path: Path, frames: list[bytes]) -> None:
    async def body(guard: ChannelGuard, ctx: zmq.asyncio.Context, tmp: Path, violations: list[Any]) -> None:
        pub = ctx.socket(zmq.PUB)
        pub.bind(f"ipc://{tmp}/iopub")
        sub = guard.socket(ctx, zmq.SUB, "iopub", f"ipc://{tmp}/iopub")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        while True:  # the subscription takes a moment to reach the publisher
            await pub.send_multipart([b"topic", b"hello"])
            try:
                assert await asyncio.wait_for(sub.recv_multipart(), 0.2) == [b"topic", b"hello"]
                break
            except TimeoutError:
                pass
        await pub.send_multipart(frames)
        assert await until(lambda: bool(violations))
        link = sub.link
        assert link is not None and link.outstanding <= READ_BYTES
        # The socket reconnects through the guard, and the next message gets through.
        while True:
            await pub.send_multipart([b"topic", b"after"])
            try:
                got = await asyncio.wait_for(sub.recv_multipart(), 0.2)
                break
            except TimeoutError:
                pass
        assert got == [b"topic", b"after"]
        pub.close(linger=0)
        sub.close(linger=0)

    violations = run(tmp_path, body)
    assert violations[0][0] == "iopub" and "a message of at least" in violations[0][1]


def test_the_window_holds_back_a_kernel_the_gateway_does_not_read(tmp_path: Path) -> None:
    async def body(guard: ChannelGuard, ctx: zmq.asyncio.Context, tmp: Path, _: Any) -> None:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/shell")
        router.setsockopt(zmq.SNDHWM, 0)
        dealer = guard.socket(ctx, zmq.DEALER, "shell", f"ipc://{tmp}/shell", identity=b"me")
        await dealer.send(b"hi")
        await router.recv_multipart()
        # 64 messages of 1 MiB (zero-copy from one untouched mmap): 64 MiB, while nobody reads.
        chunk = memoryview(mmap.mmap(-1, MiB))
        for _ in range(64):
            router.send_multipart([b"me", chunk], copy=False)
        link = dealer.link
        assert link is not None
        assert await until(lambda: link.received >= BOUNDS.window)
        await asyncio.sleep(0.5)
        assert link.received <= BOUNDS.window + READ_BYTES
        # Reading lets the rest through, all of it, in order.
        for _ in range(64):
            parts = await dealer.recv_multipart()
            assert len(parts[0]) == MiB
        assert link.received == link.read == 64 * MiB
        router.close(linger=0)
        dealer.close(linger=0)

    assert run(tmp_path, body) == []


def test_anything_but_zmtp3_is_refused(tmp_path: Path) -> None:
    async def body(guard: ChannelGuard, ctx: zmq.asyncio.Context, tmp: Path, violations: list[Any]) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(tmp / "fake"))
        server.listen(1)
        server.setblocking(False)
        dealer = guard.socket(ctx, zmq.DEALER, "control", f"ipc://{tmp}/fake")
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(server)
        await loop.sock_sendall(conn, b"GET / HTTP/1.1\r\n\r\n" + b"\x00" * 100)
        assert await until(lambda: bool(violations))
        conn.close()
        server.close()
        dealer.close(linger=0)

    violations = run(tmp_path, body)
    assert violations == [("control", "the kernel's socket does not speak ZMTP 3 (no greeting signature)")]


def test_only_ipc_kernels_are_guarded(tmp_path: Path) -> None:
    async def body(guard: ChannelGuard, ctx: zmq.asyncio.Context, tmp: Path, _: Any) -> None:
        with pytest.raises(ValueError, match="must be ipc"):
            guard.socket(ctx, zmq.DEALER, "shell", "tcp://127.0.0.1:5555")
        assert guard.links == 0

    run(tmp_path, body)


def test_bounds_hold_a_message() -> None:
    assert ChannelBounds(max_message=2 * MiB, window=MiB).window == 2 * MiB
    with pytest.raises(ValueError):
        ChannelBounds(max_message=10, window=10)


def test_drops_are_logged_once_an_interval(caplog: pytest.LogCaptureFixture) -> None:
    drops = DropLog("sandbox sbx", interval=3600)
    for i in range(1000):
        drops.note(f"reason {i}")
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert lines == ["sandbox sbx: dropped 1 kernel message since the last report (the last: reason 0)"]
    assert drops.total == 1000
