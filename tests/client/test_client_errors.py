"""Every error the gateway answers reaches the caller typed, from the sync and the async client alike, whatever
the request's shape (JSON, upload, download, websocket, NDJSON stream); no answer at all is a connection error,
never one of the gateway's. Also: the sync client inside a running event loop, and its callbacks' thread."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import IO, Any

import pytest

from kernelhub import errors
from kernelhub.client import (
    ApiClient,
    AsyncApiClient,
    AsyncSandbox,
    DiskQuotaExceededError,
    GatewayConnectionError,
    InvalidRequestError,
    KernelHubError,
    NotFoundError,
    PayloadTooLargeError,
    QuotaExceededError,
    ResponseTimeoutError,
    Sandbox,
    UnauthorizedError,
    _api,
)
from kernelhub.testing import Gateway, free_port

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

MiB = 1024 * 1024
TEN_MIB = bytes(range(256)) * (10 * MiB // 256)


@pytest.fixture(scope="module")
def small(gateway: Gateway) -> Iterator[Sandbox]:
    """A sandbox whose files may have 8 MiB at most, on a 16 MiB workspace."""
    with Sandbox.create("python", limits={"max_file_mb": 8, "disk_mb": 16}, url=gateway.url,
                        token=gateway.token) as sb:
        yield sb


@pytest.fixture(scope="module")
def big_file() -> Iterator[str]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(TEN_MIB)
        f.flush()
        yield f.name


class Unsized(io.RawIOBase):
    """A binary stream that cannot tell its size (a pipe, a socket): uploaded chunked."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._data.read(n)


async def chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def sync_and_async(sandbox_id: str, url: str, token: str) -> tuple[Sandbox, Callable[[], Awaitable[Any]]]:
    """The same sandbox id through a sync client and (made inside a loop) an async one."""
    sync = Sandbox({"id": sandbox_id}, ApiClient(url, token))

    async def make() -> AsyncSandbox:
        return AsyncSandbox({"id": sandbox_id}, AsyncApiClient(url, token))

    return sync, make


#: One request of each shape, for a sync or an async sandbox (the latter's answer is awaited); ``f`` is an open
#: binary file. The sync client takes an async iterable too: it is consumed on its loop thread.
SHAPES: list[tuple[str, Callable[[Any, IO[bytes]], Any]]] = [
    ("json", lambda sb, f: sb.info()),
    ("upload bytes", lambda sb, f: sb.files.write("x.txt", "x")),
    ("upload file", lambda sb, f: sb.files.write("x.bin", f)),
    ("upload unsized", lambda sb, f: sb.files.write("x.bin", Unsized(b"abc" * 1000))),
    ("upload async iterable", lambda sb, f: sb.files.write("x.bin", chunks(b"abc" * 1000))),
    ("download", lambda sb, f: sb.files.read("x.txt")),
    ("websocket", lambda sb, f: sb.run_code("1")),
    ("ndjson", lambda sb, f: sb._api.stream(_api.execute(sb.id, "1"), on_event=lambda event: None)),
]


def every_shape_sync(sb: Sandbox, raises: type[BaseException], big_file: str) -> None:
    """Each shape of request raises ``raises`` from the sync client."""
    for shape, attempt in SHAPES:
        with open(big_file, "rb") as f, pytest.raises(raises) as raised:
            attempt(sb, f)
        assert isinstance(raised.value, KernelHubError), shape


async def every_shape_async(sb: AsyncSandbox, raises: type[BaseException], big_file: str) -> None:
    try:
        for shape, attempt in SHAPES:
            with open(big_file, "rb") as f, pytest.raises(raises) as raised:  # noqa: ASYNC230 - opening is instant
                await attempt(sb, f)
            assert isinstance(raised.value, KernelHubError), shape
    finally:
        await sb.close()


@pytest.mark.parametrize("case", ["missing sandbox 404", "bad key 401"])
def test_every_shape_of_request_raises_the_typed_error(case: str, gateway: Gateway, small: Sandbox,
                                                       big_file: str) -> None:
    sandbox_id, token, raises = {
        "missing sandbox 404": ("sbnosuchsandbox", gateway.token, NotFoundError),
        "bad key 401": (small.id, "not-a-key", UnauthorizedError),
    }[case]
    sync, make = sync_and_async(sandbox_id, gateway.url, token)
    every_shape_sync(sync, raises, big_file)

    async def main() -> None:
        await every_shape_async(await make(), raises, big_file)

    asyncio.run(main())


def test_oversized_upload_is_payload_too_large(small: Sandbox, gateway: Gateway, big_file: str) -> None:
    """issue 7 item 7: 10 MiB into max_file_mb 8 was reported as a broken pipe; the gateway had answered 413."""
    sources: list[tuple[str, Callable[[], Any]]] = [
        ("bytes", lambda: TEN_MIB),
        ("file object", lambda: open(big_file, "rb")),  # noqa: SIM115 - the client reads it, the test closes it
        ("unsized stream", lambda: Unsized(TEN_MIB)),
    ]
    for shape, source in sources:
        data = source()
        try:
            with pytest.raises(PayloadTooLargeError) as raised:
                small.files.write("big.bin", data)
        finally:
            if hasattr(data, "close"):
                data.close()
        assert (raised.value.status, raised.value.error) == (413, "payload_too_large"), shape
        assert "max_file_mb" in raised.value.message and not small.files.exists("big.bin")

    async def main() -> None:
        sb = AsyncSandbox({"id": small.id}, AsyncApiClient(gateway.url, gateway.token))
        try:
            for shape, source in [*sources, ("async iterable", lambda: chunks(TEN_MIB))]:
                data = source()
                try:
                    with pytest.raises(PayloadTooLargeError) as raised:
                        await sb.files.write("big.bin", data)
                finally:
                    if hasattr(data, "close"):
                        data.close()
                assert raised.value.status == 413, shape
                assert not await sb.files.exists("big.bin")
            # Under the limit, each source arrives whole.
            part = TEN_MIB[: 3 * MiB + 17]
            for name, data in (("f1.bin", io.BytesIO(part)), ("f2.bin", chunks(part))):
                assert await sb.files.write(name, data) == {"path": name, "size": len(part)}
                assert await sb.files.read(name, format="bytes") == part
                await sb.files.remove(name)
        finally:
            await sb.close()

    asyncio.run(main())
    # The connection that was refused mid-upload did not poison the sync client's pool.
    with open(big_file, "rb") as f:
        f.seek(len(TEN_MIB) - 2 * MiB)
        assert small.files.write("tail.bin", f) == {"path": "tail.bin", "size": 2 * MiB}
    assert small.files.read("tail.bin", format="bytes") == TEN_MIB[-2 * MiB:]
    small.files.remove("tail.bin")


def test_full_workspace_mid_upload_is_disk_quota(small: Sandbox) -> None:
    """The 507 the gateway answers after reading a body it could not store is typed too."""
    with pytest.raises(DiskQuotaExceededError) as raised:
        for i in range(5):  # 35 MiB cannot fit in 16
            small.files.write(f"fill{i}.bin", Unsized(TEN_MIB[: 7 * MiB]))
    assert raised.value.status == 507 and raised.value.error == "disk"
    assert isinstance(raised.value, QuotaExceededError)
    small.commands.run("rm -f fill*.bin", check=True)


def test_bad_requests_are_invalid_request(gateway: Gateway, small: Sandbox) -> None:
    with pytest.raises(InvalidRequestError) as bad:
        Sandbox.create("no-such-template", url=gateway.url, token=gateway.token)
    assert bad.value.status == 400 and bad.value.error == "invalid_request"
    with pytest.raises(InvalidRequestError):
        small.run_code("1", language="cobol")  # the websocket's rejected event
    with pytest.raises(InvalidRequestError):
        small._api.stream(_api.execute(small.id, "1", language="cobol"))
    with pytest.raises((InvalidRequestError, NotFoundError)):
        small.files.write("../outside.txt", "x")

    async def main() -> None:
        with pytest.raises(InvalidRequestError):
            await AsyncSandbox.create(limits={"memory_mb": 10 ** 9}, url=gateway.url, token=gateway.token)
        sb = AsyncSandbox({"id": small.id}, AsyncApiClient(gateway.url, gateway.token))
        try:
            with pytest.raises(InvalidRequestError):
                await sb.run_code("1", timeout=-1)
            with pytest.raises(InvalidRequestError):
                await sb._api.stream(_api.execute(small.id, "1", timeout_s=-1))
        finally:
            await sb.close()

    asyncio.run(main())


def test_quota_is_429(gateway: Gateway) -> None:
    """A sandbox holds at most 16 sessions: the next is refused 429 (quota_exceeded), sync and async."""
    with Sandbox.create("python", url=gateway.url, token=gateway.token) as sb:
        with pytest.raises(QuotaExceededError) as refused:
            for _ in range(16):
                sb.sessions.create("terminal")
        assert (refused.value.status, refused.value.error) == (429, "quota_exceeded")
        assert len(sb.info()["sessions"]) == 16

        async def main() -> None:
            again = AsyncSandbox({"id": sb.id}, AsyncApiClient(gateway.url, gateway.token))
            try:
                with pytest.raises(QuotaExceededError) as also:
                    await again.sessions.create("terminal")
                assert also.value.status == 429
            finally:
                await again.close()

        asyncio.run(main())


def test_connection_refused_is_not_a_gateway_answer(big_file: str) -> None:
    """A closed port: a GatewayConnectionError (status 0) from every shape of request, and none of the classes
    an answer of the gateway is made into."""
    url = f"http://127.0.0.1:{free_port()}"
    answer_classes = tuple(c for c in errors.STATUS_CLASSES.values() if c is not errors.KernelHubError)

    def check(exc: BaseException) -> None:
        assert isinstance(exc, GatewayConnectionError) and isinstance(exc, ConnectionError)
        assert exc.status == 0 and exc.error == "connection_error" and url in exc.message
        assert not isinstance(exc, answer_classes) and not isinstance(exc, errors.SandboxError)

    sync, make = sync_and_async("sbwhatever", url, "x")
    with pytest.raises(GatewayConnectionError) as raised:
        Sandbox.list(url=url, token="x")
    check(raised.value)
    every_shape_sync(sync, GatewayConnectionError, big_file)

    async def main() -> None:
        with pytest.raises(GatewayConnectionError) as raised:
            await AsyncSandbox.create(url=url, token="x")
        check(raised.value)
        await every_shape_async(await make(), GatewayConnectionError, big_file)

    asyncio.run(main())


def test_no_answer_in_time_is_a_response_timeout(big_file: str) -> None:
    """A server that takes connections and never answers: each shape of request ends after ``request_timeout``
    in a ResponseTimeoutError, a connection error (no answer) and a timeout both."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the backlog; nothing is ever read or answered
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        shapes = [shape for shape in SHAPES if shape[0] in ("json", "upload file", "download", "websocket")]

        def check(exc: BaseException, shape: str) -> None:
            assert isinstance(exc, ResponseTimeoutError) and isinstance(exc, GatewayConnectionError), shape
            assert isinstance(exc, TimeoutError) and isinstance(exc, errors.Timeout) and exc.status == 0, shape
            assert url in exc.message, shape

        sync = Sandbox({"id": "sbsilent"}, ApiClient(url, "x", request_timeout=0.5))
        for shape, attempt in shapes:
            began = time.monotonic()
            with open(big_file, "rb") as f, pytest.raises(ResponseTimeoutError) as raised:
                attempt(sync, f)
            check(raised.value, shape)
            assert time.monotonic() - began < 10, shape

        async def main() -> None:
            sb = AsyncSandbox({"id": "sbsilent"}, AsyncApiClient(url, "x", request_timeout=0.5))
            try:
                for shape, attempt in shapes:
                    with open(big_file, "rb") as f, pytest.raises(ResponseTimeoutError) as raised:  # noqa: ASYNC230
                        await attempt(sb, f)
                    check(raised.value, shape)
            finally:
                await sb.close()

        asyncio.run(main())


def test_sync_client_inside_a_running_event_loop(gateway: Gateway) -> None:
    """As in a Jupyter cell: the calling thread runs an event loop; the sync client still works, and its
    callbacks run in the calling thread."""
    caller = threading.get_ident()
    threads: set[int] = set()
    chunks_seen: list[str] = []

    def on_stdout(text: str) -> None:
        threads.add(threading.get_ident())
        chunks_seen.append(text)

    async def cell() -> None:
        asyncio.get_running_loop()  # running
        with Sandbox.create("python", url=gateway.url, token=gateway.token) as sb:
            ex = sb.run_code("for i in range(3): print(i, flush=True)\n'done'", on_stdout=on_stdout)
            assert ex.text == "'done'" and "".join(chunks_seen) == "0\n1\n2\n"
            assert sb.files.write("in-loop.txt", "yes")["size"] == 3 and sb.files.read("in-loop.txt") == "yes"
            with pytest.raises(NotFoundError):
                sb.files.read("missing.txt")

    asyncio.run(cell())
    assert threads == {caller}


def test_sync_callback_error_interrupts_the_execution(gateway: Gateway) -> None:
    """A sync callback that raises ends run_code with that error, and the execution is interrupted (the kernel
    serves the next one at once rather than after the sleep), as cancelling the async call does."""

    class Stop(Exception):
        pass

    def on_stdout(text: str) -> None:
        raise Stop(text)

    with Sandbox.create("python", url=gateway.url, token=gateway.token) as sb:
        with pytest.raises(Stop):
            sb.run_code("import time\nprint('go', flush=True)\ntime.sleep(60)", on_stdout=on_stdout)
        began = time.monotonic()
        assert sb.run_code("3 * 3").text == "9"
        assert time.monotonic() - began < 15


def test_sync_client_after_fork(gateway: Gateway) -> None:
    """A forked child has no loop thread of its parent's: the sync client starts its own there."""
    Sandbox.list(url=gateway.url, token=gateway.token)  # the parent's loop thread is running
    with warnings.catch_warnings():
        # Python 3.12+ warns of fork() in a process with threads: that is the case under test.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            code = 0 if isinstance(Sandbox.list(url=gateway.url, token=gateway.token), list) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_refusals_before_the_body_say_connection_close(gateway: Gateway, small: Sandbox) -> None:
    """The gateway ends a connection whose request it refused before reading it whole, and says so, so that no
    client sends its next request down it; a refusal after the request was read keeps the connection."""

    def answer(head: str) -> tuple[int, dict[str, str]]:
        with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
            sock.sendall(head.encode() + b"\r\n")  # the headers only: no body follows
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        status_line, *lines = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        return int(status_line.split()[1]), headers

    upload = f"PUT /v1/sandboxes/{small.id}/files/big.bin HTTP/1.1\r\nHost: gw\r\nContent-Length: {10 * MiB}\r\n"
    status, headers = answer(upload + f"Authorization: Bearer {gateway.token}\r\n")
    assert status == 413 and headers.get("connection") == "close"
    status, headers = answer(upload + "Authorization: Bearer not-a-key\r\n")
    assert status == 401 and headers.get("connection") == "close"
    status, headers = answer("GET /v1/sandboxes HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer not-a-key\r\n")
    assert status == 401 and headers.get("connection") == "close"
    # Refused by the route itself, after the (empty) body: the connection stays.
    status, headers = answer(f"GET /v1/executions/exnosuch HTTP/1.1\r\nHost: gw\r\n"
                             f"Authorization: Bearer {gateway.token}\r\n")
    assert status == 404 and "connection" not in headers
