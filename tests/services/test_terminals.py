"""Terminal sessions in a real sandbox: a login shell on a PTY of the sandbox's own devpts, driven by
``execute`` and by terminado-shaped websockets on a real tornado server.

One sandbox serves the module (conftest's ``factory`` checks that nothing is left once it stopped); every test
closes its own sessions.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from tornado import httpserver, web, websocket
from tornado.testing import bind_unused_port

from kernelhub.errors import Conflict, InvalidRequest, NotFound
from kernelhub.handlers.terminal import TerminalWebSocket
from kernelhub.sandbox import pty as sandbox_pty
from kernelhub.sandbox.limits import Limits
from kernelhub.sandbox.sandbox import Sandbox
from kernelhub.services.hub import Hub
from kernelhub.services.tenants import Tenant
from kernelhub.services.terminals import TerminalSession
from kernelhub.testing import until

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


@pytest.fixture(scope="module")
def sandbox(runner: asyncio.Runner, factory: Any) -> Iterator[Sandbox]:
    sb = runner.run(factory.create())
    try:
        yield sb
    finally:
        runner.run(sb.stop())


@pytest.fixture
def terminal(runner: asyncio.Runner, sandbox: Sandbox) -> Iterator[TerminalSession]:
    session = TerminalSession(sandbox)
    runner.run(session.start())
    try:
        yield session
    finally:
        runner.run(session.close())


def lines(text: str) -> list[str]:
    """The terminal's lines without control sequences (bracketed-paste toggles and the like)."""
    return [line.strip() for line in re.split(r"\r\n|\r|\n", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text))]


def test_shell_identity_tty_and_cwd(runner: asyncio.Runner, terminal: TerminalSession, sandbox: Sandbox) -> None:
    assert terminal.type == "terminal" and terminal.state == "running" and not terminal.busy
    assert terminal.id.startswith("se")
    assert terminal.to_dict() == {"id": terminal.id, "sandbox_id": sandbox.id, "type": "terminal",
                                  "language": None, "state": "running"}
    out = runner.run(terminal.execute("echo hello; id -u; tty", 10))["output"]
    assert "hello" in lines(out) and "1000" in lines(out)
    assert any(line.startswith("/dev/pts/") for line in lines(out))  # the sandbox's own devpts
    out = runner.run(terminal.execute("pwd; echo $TERM; echo 'h\u00e9llo \u2713'\n", 10))["output"]
    assert "/workspace" in lines(out) and "xterm-256color" in lines(out)
    assert "h\u00e9llo \u2713" in lines(out)
    assert lines(out)[-1].endswith(":/workspace$")  # the output runs up to the next prompt


def test_execute_returns_once_quiet_or_at_timeout(runner: asyncio.Runner, terminal: TerminalSession) -> None:
    async def body() -> None:
        assert terminal.terminal is not None
        t0 = time.monotonic()
        out = (await terminal.execute("sleep 1; echo late-line", 10))["output"]
        assert time.monotonic() - t0 < 0.9  # quiet for 0.3 s: the command still runs
        assert "late-line" not in lines(out)
        # What nobody reads still goes to the replay buffer of later websocket clients.
        assert await until(lambda: "late-line" in lines("".join(terminal.terminal.read_buffer)))  # type: ignore

        t0 = time.monotonic()
        out = (await terminal.execute("while :; do echo tick; sleep 0.1; done", 1.0))["output"]
        assert 0.9 < time.monotonic() - t0 < 1.5  # never quiet: the timeout ends it
        assert lines(out).count("tick") >= 5
        await terminal.execute("\x03", 2)  # Ctrl-C
        assert "after" in lines((await terminal.execute("echo after", 5))["output"])

    runner.run(body())


def test_resize(runner: asyncio.Runner, terminal: TerminalSession) -> None:
    assert terminal.terminal is not None
    assert terminal.terminal.ptyproc.getwinsize() == (24, 80)
    terminal.terminal.ptyproc.setwinsize(40, 100)
    assert terminal.terminal.ptyproc.getwinsize() == (40, 100)
    out = runner.run(terminal.execute("stty size", 10))["output"]
    assert "40 100" in lines(out)


def test_pause_and_resume_reading(runner: asyncio.Runner, terminal: TerminalSession) -> None:
    async def body() -> None:
        assert terminal.terminal is not None
        received = terminal.terminal.received
        client = object()
        terminal.pause_reading(client)
        terminal.terminal.ptyproc.write("echo paused-output\n")
        await asyncio.sleep(0.5)
        assert terminal.terminal.received == received  # nothing read while a client holds a pause
        terminal.resume_reading(client)
        assert await until(lambda: "paused-output" in lines("".join(terminal.terminal.read_buffer)[-200:]))  # type: ignore

    runner.run(body())


def test_host_pty_fallback(runner: asyncio.Runner, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the sandbox's devpts cannot be reached, a host PTY serves; only ``tty`` tells the difference."""
    monkeypatch.setattr(sandbox_pty, "_open_sandbox_ptmx", lambda launcher_pid, sandbox_id: None)

    async def body() -> None:
        session = TerminalSession(sandbox)
        await session.start()
        try:
            out = lines((await session.execute("echo fallback; tty; stty size", 5))["output"])
            assert "fallback" in out and "not a tty" in out and "24 80" in out
        finally:
            await session.close()

    runner.run(body())


def test_through_the_hub(runner: asyncio.Runner, factory: Any) -> None:
    """The hub's view: session_create type terminal, session_execute, the sandbox's sessions, session_close."""
    hub = Hub(factory)
    alice = Tenant("alice")

    async def body() -> None:
        record = await hub.create_sandbox(alice, "python")
        try:
            session = await hub.create_session(alice, record.id, "terminal")
            assert session.to_dict() in record.to_dict()["sessions"]
            with pytest.raises(InvalidRequest):
                await hub.create_session(alice, record.id, "terminal", "python")
            result = await hub.session_execute(alice, session.id, "echo via-hub")
            assert set(result) == {"output"} and "via-hub" in lines(result["output"])
            await hub.close_session(alice, session.id)
            assert session.state == "closed"
            with pytest.raises(NotFound):
                await hub.session_execute(alice, session.id, "echo gone")
        finally:
            await hub.delete_sandbox(alice, record.id)

    runner.run(body())


def test_output_is_capped_by_output_mb(runner: asyncio.Runner, factory: Any) -> None:
    async def body() -> dict[str, Any]:
        sb = await factory.create(limits=Limits(output_mb=0.01))
        try:
            session = TerminalSession(sb)
            await session.start()
            try:
                return await session.execute("head -c 200000 /dev/zero | tr '\\0' x", 5)
            finally:
                await session.close()
        finally:
            await sb.stop()

    result = runner.run(body())
    assert result["reason"] == "output_truncated"
    assert len(result["output"]) == Limits(output_mb=0.01).output_bytes


def test_close_kills_the_shell_and_its_session(runner: asyncio.Runner, sandbox: Sandbox, sh: Any) -> None:
    async def body() -> None:
        baseline = sandbox.metrics()["pids"]
        session = TerminalSession(sandbox)
        await session.start()
        # A background job, a nohup'd one (survives the hang-up) and a foreground one.
        await session.execute("sleep 1001 & nohup sleep 1002 >/dev/null 2>&1 &", 5)
        assert session.terminal is not None
        session.terminal.ptyproc.write("sleep 1003\n")
        assert await until(lambda: sandbox.metrics()["pids"] >= baseline + 4)
        await session.close()
        assert session.state == "closed" and not session.busy
        assert session.terminal.ptyproc.closed
        assert await until(lambda: sandbox.metrics()["pids"] == baseline), sandbox.metrics()
        code, ps = await sh(sandbox, "ps -eo pid,sid,args")
        assert code == 0 and "sleep 100" not in ps and "bash -l" not in ps, ps
        with pytest.raises(Conflict):
            await session.execute("echo too late", 1)
        await session.close()  # idempotent

    runner.run(body())


def test_shell_exit_ends_the_session(runner: asyncio.Runner, sandbox: Sandbox) -> None:
    async def body() -> None:
        session = TerminalSession(sandbox)
        await session.start()
        try:
            await session.execute("exit", 5)
            assert await until(lambda: session.state == "closed")
            await session.close()  # waits for the clean-up the exit started
            assert session.process is not None and session.process.returncode == 0
        finally:
            await session.close()

    runner.run(body())


# -- websockets ---------------------------------------------------------------------------------------------


class _Socket(TerminalWebSocket):
    sessions: dict[str, TerminalSession] = {}

    def get_session(self, session_id: str) -> TerminalSession:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise NotFound(f"No session {session_id!r}.") from None


async def _with_server(body: Callable[[str], Awaitable[None]]) -> None:
    app = web.Application([(r"/terminals/([^/]+)", _Socket, {"hub": None})])
    sock, port = bind_unused_port()
    server = httpserver.HTTPServer(app)
    server.add_sockets([sock])
    try:
        await body(f"ws://127.0.0.1:{port}/terminals/")
    finally:
        server.stop()
        await server.close_all_connections()


async def _read(conn: websocket.WebSocketClientConnection, timeout: float = 10) -> Any:
    msg = await asyncio.wait_for(conn.read_message(), timeout)
    return None if msg is None else json.loads(msg)


async def _stdout_until(conn: websocket.WebSocketClientConnection, needle: str, timeout: float = 10) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while needle not in lines(seen)[:-1]:  # a whole line: the last one may still be growing
        msg = await _read(conn, max(deadline - time.monotonic(), 0.01))
        assert msg is not None, f"closed before {needle!r}; saw {seen!r}"
        assert msg[0] == "stdout", msg
        seen += msg[1]
    return seen


def test_websocket_terminal(runner: asyncio.Runner, terminal: TerminalSession) -> None:
    _Socket.sessions = {terminal.id: terminal}

    async def body(base: str) -> None:
        conn = await websocket.websocket_connect(base + terminal.id)
        try:
            assert await _read(conn) == ["setup", {}]
            assert (await _read(conn))[0] == "stdout"  # the replay: at least the first prompt
            assert terminal.busy
            conn.write_message(json.dumps(["stdin", "echo hi\r"]))
            await _stdout_until(conn, "hi")
            conn.write_message(json.dumps(["set_size", 30, 90]))
            conn.write_message(json.dumps(["stdin", "stty size\r"]))
            await _stdout_until(conn, "30 90")
            assert terminal.terminal is not None and terminal.terminal.ptyproc.getwinsize() == (30, 90)

            # A second client shares the terminal; the terminal takes the smallest size.
            other = await websocket.websocket_connect(base + terminal.id)
            assert await _read(other) == ["setup", {}]
            other.write_message(json.dumps(["set_size", 20, 120]))
            other.write_message(json.dumps(["stdin", "stty size\r"]))
            await _stdout_until(conn, "20 90")
            other.close()
            # Finish the closing handshake, so that the client's socket is closed too, not left to the GC.
            while await _read(other) is not None:
                pass
            assert await until(lambda: len(terminal.terminal.clients) == 1)  # type: ignore[union-attr]
            assert terminal.terminal.ptyproc.getwinsize() == (30, 90)  # type: ignore[union-attr]

            # Messages of terminado's shape with values it cannot use are ignored, as terminado does, and the
            # socket carries on (a frame of another shape closes it: tests/handlers/test_fuzz_sockets.py).
            for odd in ('["set_size", "a", 3]', '["set_size", 0, 5]', '["stdin", 5]', '["stdin"]', '["resize", 1]'):
                conn.write_message(odd)
            # session_execute and the websocket see the same terminal.
            result = await terminal.execute("echo from-execute", 5)
            assert "from-execute" in lines(result["output"])
            await _stdout_until(conn, "from-execute")

            # Closing the session tells the client and closes the socket.
            await terminal.close()
            while (msg := await _read(conn)) is not None and msg[0] == "stdout":
                pass
            assert msg == ["disconnect", 1]
            assert await _read(conn) is None
        finally:
            conn.close()

    runner.run(_with_server(body))


def test_websocket_refused_for_unknown_or_ended_sessions(runner: asyncio.Runner, sandbox: Sandbox) -> None:
    ended = TerminalSession(sandbox)
    _Socket.sessions = {"ended": ended}

    async def body(base: str) -> None:
        await ended.start()
        await ended.close()
        for name, code in (("nope", 4404), ("ended", 4409)):
            conn = await websocket.websocket_connect(base + name)
            try:
                assert await _read(conn) is None
                assert conn.close_code == code, (name, conn.close_code, conn.close_reason)
            finally:
                conn.close()

    runner.run(_with_server(body))
