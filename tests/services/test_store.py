"""The durable store: schema and migrations, round trips of every record kind, outputs reassembled (display
updates, the output cap), the single writer's batching and its concurrency, history bounds, tenant isolation,
and a writer killed with SIGKILL mid-write leaving a consistent file.

Real SQLite files in temporary state directories; no sandboxes (the store is plain data).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from kernelhub.errors import NotFound
from kernelhub.services import store as store_module
from kernelhub.services.audit import AuditLog, verify
from kernelhub.services.executions import Execution
from kernelhub.services.store import (
    DB_NAME,
    MIGRATIONS,
    Migration,
    SandboxRow,
    SessionRow,
    Store,
    StoreError,
    code_digest,
    connect,
    migrate,
    schema_version,
)

WRITER = Path(__file__).with_name("store_writer.py")
NOW = 1_800_000_000.0


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def run(body: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(body())


def sandbox(sandbox_id: str = "sb1", tenant: str = "alice", **kwargs: Any) -> SandboxRow:
    return SandboxRow(sandbox_id, tenant, "python", {"memory_mb": 512, "output_mb": 10.0}, NOW, NOW + 86400,
                      **kwargs)


async def open_with_sandbox(state: Path, *sandboxes: SandboxRow, **kwargs: Any) -> Store:
    store = await Store.open(state, **kwargs)
    for row in sandboxes or (sandbox(),):
        await store.put_sandbox(row)
    return store


async def start(store: Store, ex_id: str, *, tenant: str = "alice", sandbox_id: str = "sb1",
                limit: int = 1_000_000, code: str = "print(1)") -> None:
    await store.start_execution(id=ex_id, tenant=tenant, sandbox_id=sandbox_id, session_id="se1", code=code,
                                output_limit=limit, timeout_s=30.0, created_at=NOW)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event the writer waits on (see :func:`hold_writer`); set at teardown so no test leaves it stuck."""
    event = threading.Event()
    yield event
    event.set()


def hold_writer(store: Store, gate: threading.Event) -> asyncio.Future[Any]:
    """Keep the writer busy until ``gate`` is set: what is queued meanwhile is taken as one batch."""
    return store.submit(lambda _conn: gate.wait(30))


# -- schema and migrations ------------------------------------------------------------------------------------


def test_a_new_database_has_every_migration_and_the_pragmas(state: Path) -> None:
    run(lambda: _close(Store.open(state)))
    db = state / DB_NAME
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    conn = sqlite3.connect(db)
    assert schema_version(conn) == MIGRATIONS[-1].version
    assert [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")] == \
        [m.version for m in MIGRATIONS]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    conn.close()


async def _close(opening: Awaitable[Store]) -> None:
    store = await opening
    await store.close()


def test_a_database_made_by_migration_1_is_upgraded_with_its_data(state: Path) -> None:
    state.mkdir()
    conn = connect(state / DB_NAME)
    assert migrate(conn, MIGRATIONS[:1]) == 1
    conn.execute("INSERT INTO sandboxes (id, tenant, template, limits, network, metadata, env, state, created_at, "
                 "expires_at, last_activity, updated_at) VALUES ('sbold', 'alice', 'python', '{\"memory_mb\": 256}', "
                 "'\"none\"', '{\"k\": 1}', '{}', 'running', 1, 2, 1, 1)")
    conn.execute("INSERT INTO executions (id, tenant, sandbox_id, session_id, status, created_at, started_at, "
                 "finished_at, code_sha256, code_bytes, output_limit, output_bytes, output_seq) VALUES ('exold', "
                 "'alice', 'sbold', 'se', 'ok', 1, 1, 2, 'x', 1, 100, 3, 1)")
    conn.execute("INSERT INTO outputs (execution_id, seq, kind, body) VALUES ('exold', 1, 'stdout', 'hi\n')")
    conn.close()

    async def body() -> None:
        store = await Store.open(state)
        try:
            row = await store.get_sandbox("sbold")
            assert (row.limits, row.metadata, row.state) == ({"memory_mb": 256}, {"k": 1}, "running")
            ex = await store.get_execution("alice", "exold")
            assert (ex["status"], ex["stdout"], ex["duration_ms"]) == ("ok", "hi\n", 1000)
            # What migration 2 added works on the upgraded file.
            audit = await AuditLog.open(store, state, mirror_path=None)
            await audit.record("alice", None, "sandbox_info", {"sandbox_id": "sbold"}, 200)
        finally:
            await store.close()

    run(body)
    conn = sqlite3.connect(state / DB_NAME)
    assert schema_version(conn) == MIGRATIONS[-1].version
    conn.close()
    assert verify(state / DB_NAME) is None


def test_a_database_from_a_newer_kernelhub_is_refused_and_left_alone(state: Path) -> None:
    run(lambda: _close(Store.open(state)))
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("INSERT INTO schema_version (version, description, applied_at) VALUES (99, 'future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as info:
        run(lambda: Store.open(state))
    assert "schema version 99" in info.value.message and "newer kernelhub" in info.value.message
    assert f"up to {MIGRATIONS[-1].version}" in info.value.message
    conn = sqlite3.connect(state / DB_NAME)
    assert schema_version(conn) == 99
    conn.close()
    # The refused open released its lock: a good file opens again at once.
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("DELETE FROM schema_version WHERE version = 99")
    conn.commit()
    conn.close()
    run(lambda: _close(Store.open(state)))


def test_a_damaged_schema_version_is_refused_with_a_sentence(state: Path) -> None:
    """A version that is not a whole number (the table rewritten by hand, or another program's) is a sentence at
    start, not a traceback."""
    state.mkdir()
    conn = sqlite3.connect(state / DB_NAME)
    conn.execute("CREATE TABLE schema_version (version TEXT, description TEXT, applied_at REAL)")
    conn.execute("INSERT INTO schema_version VALUES ('two', 'x', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError) as info:
        run(lambda: Store.open(state))
    assert "schema_version table holds 'two', not a version number" in info.value.message
    with pytest.raises(StoreError):
        verify(state / DB_NAME)


def test_an_unreadable_sandbox_row_is_told_or_raised_not_a_crash(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state, sandbox("sb1"), sandbox("sb2"), sandbox("sb3"))
        try:
            await store.submit(lambda conn: conn.execute("UPDATE sandboxes SET limits = '{bad' WHERE id = 'sb2'"))
            with pytest.raises(StoreError, match="'sb2' cannot be read"):
                await store.list_sandboxes()
            bad: list[str] = []
            rows = await store.list_sandboxes(on_bad=lambda sandbox_id, exc: bad.append(sandbox_id))
            assert [r.id for r in rows] == ["sb1", "sb3"] and bad == ["sb2"]
        finally:
            await store.close()

    run(body)


def test_a_file_that_is_not_a_database_is_refused_with_a_sentence(state: Path) -> None:
    state.mkdir()
    (state / DB_NAME).write_bytes(b"this is not an SQLite file at all, just text" * 100)
    with pytest.raises(StoreError) as info:
        run(lambda: Store.open(state))
    assert f"Cannot open the database {state / DB_NAME}" in info.value.message
    assert "not a database" in info.value.message


def test_a_failing_migration_applies_nothing(state: Path) -> None:
    state.mkdir()
    conn = connect(state / DB_NAME)
    migrate(conn, MIGRATIONS[:1])
    broken = (*MIGRATIONS, Migration(MIGRATIONS[-1].version + 1, "broken", ("CREATE TABLE later (a)",
                                                                             "NOT SQL AT ALL")))
    with pytest.raises(StoreError) as info:
        migrate(conn, broken, where="here.db")
    assert "here.db" in info.value.message
    assert schema_version(conn) == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "audit" not in tables and "later" not in tables
    conn.close()


def test_a_second_gateway_on_the_same_state_dir_is_refused(state: Path) -> None:
    async def body() -> None:
        first = await Store.open(state)
        try:
            with pytest.raises(StoreError) as info:
                await Store.open(state)
            assert "Another kernelhub gateway" in info.value.message
        finally:
            await first.close()
        await (await Store.open(state)).close()

    run(body)


def test_a_closed_store_refuses_calls(state: Path) -> None:
    async def body() -> None:
        store = await Store.open(state)
        await store.close()
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.get_sandbox("sb1")
        with pytest.raises(StoreError, match="closed"):
            store.append_output("ex", {"type": "stdout", "text": "x"})

    run(body)


# -- round trips ------------------------------------------------------------------------------------------


def test_sandboxes_round_trip_and_are_scoped_to_their_tenant(state: Path) -> None:
    async def body() -> None:
        full = sandbox("sb1", network={"allow": ["pypi.org"], "deny": []}, metadata={"owner": "ana", "n": [1]},
                       env={"TOKEN": "x"}, state="running", last_activity=NOW + 5, on_idle="pause",
                       jupyter_api=True, uid=200123, sandbox_dir="/var/lib/kernelhub/sandboxes/sb1",
                       workspace_mode="loop")
        store = await open_with_sandbox(state, full, sandbox("sb2", state="stopped", reason="idle"),
                                        sandbox("sb3", tenant="bob", state="running"))
        try:
            assert await store.get_sandbox("sb1") == full
            assert await store.get_sandbox("sb1", tenant="alice") == full
            with pytest.raises(NotFound):
                await store.get_sandbox("sb1", tenant="bob")
            with pytest.raises(NotFound):
                await store.get_sandbox("nope")
            assert [r.id for r in await store.list_sandboxes("alice")] == ["sb1", "sb2"]
            assert [r.id for r in await store.list_sandboxes("bob")] == ["sb3"]
            assert [r.id for r in await store.list_sandboxes(states=["running"])] == ["sb1", "sb3"]
            assert [r.id for r in await store.list_sandboxes("alice", ["stopped"])] == ["sb2"]
            # A row without last_activity starts at its creation.
            assert (await store.get_sandbox("sb2")).last_activity == NOW

            await store.update_sandbox("sb1", state="paused", paused_at=NOW + 10, reason=None,
                                       metadata={"owner": "bo"}, network="none", restored_at=NOW + 20)
            row = await store.get_sandbox("sb1")
            assert (row.state, row.paused_at, row.metadata, row.network, row.restored_at) == \
                ("paused", NOW + 10, {"owner": "bo"}, "none", NOW + 20)
            assert (row.env, row.uid, row.jupyter_api) == ({"TOKEN": "x"}, 200123, True)
            with pytest.raises(ValueError, match="tenant"):
                await store.update_sandbox("sb1", tenant="bob")
            with pytest.raises(NotFound):
                await store.update_sandbox("nope", state="stopped")
            # put replaces.
            await store.put_sandbox(sandbox("sb2", state="failed", reason="oom"))
            assert (await store.get_sandbox("sb2")).reason == "oom"
        finally:
            await store.close()

    run(body)


def test_sessions_round_trip_and_go_with_their_sandbox(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            await store.put_session(SessionRow("se1", "sb1", "jupyter", "python", "running", "k-1", NOW))
            await store.put_session(SessionRow("se2", "sb1", "terminal", None, "running", None, NOW + 1))
            await store.update_session("se1", state="restarting", kernel_id="k-2")
            assert await store.list_sessions("sb1") == [
                SessionRow("se1", "sb1", "jupyter", "python", "restarting", "k-2", NOW),
                SessionRow("se2", "sb1", "terminal", None, "running", None, NOW + 1),
            ]
            with pytest.raises(ValueError):
                await store.update_session("se1", sandbox_id="sb9")
            with pytest.raises(NotFound):
                await store.update_session("nope", state="closed")
            with pytest.raises(StoreError):  # no such sandbox: the foreign key holds
                await store.put_session(SessionRow("se3", "sb-missing", "jupyter", "bash"))
            assert await store.delete_session("se2") is True
            assert await store.delete_session("se2") is False
            assert [s.id for s in await store.list_sessions("sb1")] == ["se1"]
            await store.delete_sandbox("sb1")
            assert await store.list_sessions("sb1") == []
        finally:
            await store.close()

    run(body)


def test_an_execution_round_trips_in_the_api_shape(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            code = "print('héllo')\n1 + 1"
            await start(store, "ex1", code=code)
            queued = await store.get_execution("alice", "ex1")
            assert (queued["status"], queued["started_at"], queued["duration_ms"]) == ("queued", None, None)
            store.update_execution("ex1", status="running", started_at=NOW + 1)
            store.update_execution("ex1", execution_count=3)
            store.append_output("ex1", {"type": "stdout", "text": "héllo\n"})
            store.append_output("ex1", {"type": "stderr", "text": "warn\n"})
            store.append_output("ex1", {"type": "stdout", "text": "again\n"})
            store.append_output("ex1", {"type": "result", "is_main_result": True, "data": {"text/plain": "2"},
                                        "metadata": {"x": 1}})
            store.append_output("ex1", {"type": "error", "name": "E", "value": "v", "traceback": ["a", "b"]})
            await store.finish_execution("ex1", "error", reason=None, finished_at=NOW + 3.5)
            ex = await store.get_execution("alice", "ex1")
            assert ex == {
                "id": "ex1", "sandbox_id": "sb1", "session_id": "se1", "status": "error", "execution_count": 3,
                "stdout": "héllo\nagain\n", "stderr": "warn\n",
                "results": [{"is_main_result": True, "data": {"text/plain": "2"}, "metadata": {"x": 1}}],
                "error": {"name": "E", "value": "v", "traceback": ["a", "b"]}, "reason": None,
                "truncated": False, "started_at": "2027-01-15T08:00:01.000Z",
                "finished_at": "2027-01-15T08:00:03.500Z", "duration_ms": 2500,
            }
            # The same keys as the in-memory execution answers today.
            live = Execution(tenant="alice", sandbox_id="sb1", session_id="se1", code=code, timeout_s=1,
                             output_limit=10)
            assert set(ex) == set(live.to_dict())
            # Finishing again changes nothing; appends after the end are dropped.
            await store.finish_execution("ex1", "ok", reason="late")
            store.append_output("ex1", {"type": "stdout", "text": "late\n"})
            assert await store.get_execution("alice", "ex1") == ex
            # Only the code's digest is kept.
            conn = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
            row = conn.execute("SELECT code_sha256, code_bytes FROM executions WHERE id = 'ex1'").fetchone()
            conn.close()
            assert row == code_digest(code)
            with pytest.raises(NotFound):
                await store.get_execution("bob", "ex1")
            with pytest.raises(NotFound):
                await store.get_execution("alice", "nope")
            with pytest.raises(NotFound):
                await store.finish_execution("nope", "ok")
            with pytest.raises(ValueError):
                await store.finish_execution("ex1", "running")
            with pytest.raises(ValueError):
                store.append_output("ex1", {"type": "keepalive"})
            with pytest.raises(StoreError):  # the sandbox must be stored first
                await start(store, "ex2", sandbox_id="sb-missing")
        finally:
            await store.close()

    run(body)


def test_display_updates_replace_the_results_with_their_display_id(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            await start(store, "ex1")
            out: list[dict[str, Any]] = [
                {"type": "result", "is_main_result": False, "data": {"text/plain": "0%"}, "display_id": "bar"},
                {"type": "result", "is_main_result": False, "data": {"text/plain": "plain"}},
                {"type": "result", "is_main_result": False, "data": {"text/plain": "a"}, "display_id": "other",
                 "metadata": {"m": 1}},
                {"type": "update", "display_id": "bar", "data": {"text/plain": "50%"}},
                {"type": "result", "is_main_result": False, "data": {"text/plain": "0%"}, "display_id": "bar"},
                {"type": "update", "display_id": "bar", "data": {"text/plain": "100%"}},
                {"type": "update", "display_id": "other", "data": {"text/html": "<b>b</b>"},
                 "metadata": {"m": 2}},
                {"type": "update", "display_id": "unknown", "data": {"text/plain": "ignored"}},
                {"type": "update", "data": {"text/plain": "no display id: ignored"}},
            ]
            for event in out:
                store.append_output("ex1", event)
            await store.finish_execution("ex1", "ok")
            results = (await store.get_execution("alice", "ex1"))["results"]
            assert results == [
                {"is_main_result": False, "data": {"text/plain": "100%"}, "display_id": "bar"},
                {"is_main_result": False, "data": {"text/plain": "plain"}},
                {"is_main_result": False, "data": {"text/html": "<b>b</b>"}, "display_id": "other",
                 "metadata": {"m": 2}},
                {"is_main_result": False, "data": {"text/plain": "100%"}, "display_id": "bar"},
            ]
        finally:
            await store.close()

    run(body)


def test_outputs_stop_at_the_cap_and_mark_the_execution_truncated(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            await start(store, "ex1", limit=100)
            store.append_output("ex1", {"type": "stdout", "text": "a" * 60})
            # 40 bytes of room: 39 "b" and then "é" (2 bytes) does not fit whole, so it is left out.
            store.append_output("ex1", {"type": "stderr", "text": "b" * 39 + "é" + "c" * 10})
            store.append_output("ex1", {"type": "result", "is_main_result": True, "data": {"text/plain": "x"}})
            # One byte is left (the "é" did not fit): "more" keeps its first letter; then nothing fits.
            store.append_output("ex1", {"type": "stdout", "text": "more"})
            store.append_output("ex1", {"type": "stdout", "text": "none"})
            store.append_output("ex1", {"type": "error", "name": "E", "value": "still kept", "traceback": []})
            await store.finish_execution("ex1", "timeout", reason="timeout")
            ex = await store.get_execution("alice", "ex1")
            assert (ex["stdout"], ex["stderr"], ex["results"]) == ("a" * 60 + "m", "b" * 39, [])
            assert (ex["truncated"], ex["reason"], ex["status"]) == (True, "output_truncated", "timeout")
            assert ex["error"] == {"name": "E", "value": "still kept", "traceback": []}

            # Display updates count too: a display updated forever cannot fill the disk.
            await start(store, "ex2", limit=200)
            store.append_output("ex2", {"type": "result", "is_main_result": False, "data": {"text/plain": "0"},
                                        "display_id": "d"})
            for i in range(50):
                store.append_output("ex2", {"type": "update", "display_id": "d", "data": {"text/plain": str(i)}})
            await store.finish_execution("ex2", "ok")
            ex2 = await store.get_execution("alice", "ex2")
            assert ex2["truncated"] is True and ex2["reason"] == "output_truncated"
            assert (await store.history_usage("alice"))[1] <= 100 + 200
            # The error is bounded on its own.
            await start(store, "ex3")
            store.append_output("ex3", {"type": "error", "name": "N" * 100_000, "value": "v",
                                        "traceback": ["line"] * 1000})
            await store.finish_execution("ex3", "error")
            error = (await store.get_execution("alice", "ex3"))["error"]
            assert (len(error["name"]), len(error["traceback"])) == (16 * 1024, 200)
        finally:
            await store.close()

    run(body)


# -- the writer -------------------------------------------------------------------------------------------


def test_what_is_queued_while_the_writer_is_busy_commits_as_one_batch(state: Path, gate: threading.Event) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            await start(store, "ex1")
            held = hold_writer(store, gate)
            before = store.stats.batches
            for i in range(100):
                store.append_output("ex1", {"type": "stdout", "text": f"{i},"})
            finished = asyncio.ensure_future(store.finish_execution("ex1", "ok"))
            gate.set()
            await held
            await finished
            # The gate's batch, then one for everything queued behind it; 100 stream chunks in one row.
            assert store.stats.batches - before <= 2
            assert store.stats.merged >= 99
            assert (await store.get_execution("alice", "ex1"))["stdout"] == "".join(f"{i}," for i in range(100))
        finally:
            await store.close()

    run(body)


def test_a_failing_operation_leaves_the_rest_of_its_batch_committed(state: Path, gate: threading.Event) -> None:
    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE sandboxes SET reason = 'half-done' WHERE id = 'sb1'")
        raise RuntimeError("boom")

    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            held = hold_writer(store, gate)
            failing = store.submit(half_then_fail)
            good = asyncio.ensure_future(store.update_sandbox("sb1", state="running"))
            gate.set()
            await held
            with pytest.raises(RuntimeError, match="boom"):
                await failing
            await good
            row = await store.get_sandbox("sb1")
            assert (row.state, row.reason) == ("running", None)
        finally:
            await store.close()

    run(body)


def test_the_loop_runs_on_while_the_writer_waits_for_a_lock(state: Path) -> None:
    """Another process holds the file's write lock: the store's call waits, the event loop does not."""

    async def body() -> None:
        store = await open_with_sandbox(state)
        other = sqlite3.connect(state / DB_NAME, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            write = asyncio.ensure_future(store.update_sandbox("sb1", state="stopped"))
            ticks = 0
            while ticks < 200:  # the loop keeps turning while the write is stuck behind the lock
                await asyncio.sleep(0)
                ticks += 1
            assert not write.done()
            other.execute("COMMIT")
            await write
            assert (await store.get_sandbox("sb1")).state == "stopped"
        finally:
            other.close()
            await store.close()

    run(body)


def test_checkpoints_run_on_their_own_thread(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer asks, the checkpointer copies the WAL into the file (PASSIVE: the writer carries on)."""
    monkeypatch.setattr(store_module, "CHECKPOINT_COMMITS", 2)
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL_S", 3600.0)  # only the writer's asking wakes it
    done = threading.Event()
    calls: list[tuple[str, str]] = []
    checkpoint = Store._checkpoint

    def recording(self: Store, conn: sqlite3.Connection, mode: str) -> None:
        checkpoint(self, conn, mode)
        calls.append((threading.current_thread().name, mode))
        done.set()

    monkeypatch.setattr(Store, "_checkpoint", recording)

    async def body() -> None:
        store = await open_with_sandbox(state)  # one commit (the migration runs on its own)
        try:
            await store.update_sandbox("sb1", state="running")  # the second
            await asyncio.get_running_loop().run_in_executor(None, done.wait)
        finally:
            await store.close()

    run(body)
    assert calls[0] == ("kernelhub-store-checkpoint", "PASSIVE")
    conn = sqlite3.connect(state / DB_NAME)
    assert conn.execute("SELECT state FROM sandboxes").fetchone() == ("running",)
    conn.close()


def test_the_wal_stays_bounded_under_a_steady_stream_of_commits(state: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """When commits never pause, the WAL is truncated instead of growing with everything ever written, even
    with the checkpointer thread starved (here: never asked): past twice the bound the writer does it."""
    monkeypatch.setattr(store_module, "WAL_MAX_BYTES", 1024 * 1024)
    monkeypatch.setattr(store_module, "CHECKPOINT_COMMITS", 10**9)
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL_S", 3600.0)
    wal = state / (DB_NAME + "-wal")
    chunk = "w" * (512 * 1024)

    async def body() -> None:
        store = await open_with_sandbox(state, history_bytes=1024 * 1024 * 1024)
        try:
            for i in range(64):  # 32 MiB of outputs, two commits each, never a pause
                await start(store, f"ex{i}")
                store.append_output(f"ex{i}", {"type": "stdout", "text": chunk})
                await store.finish_execution(f"ex{i}", "ok")
                # At most twice the bound, then one commit (a 512 KiB chunk and its row) before the check.
                assert wal.stat().st_size < 3 * 1024 * 1024
        finally:
            await store.close()
        assert not wal.exists() or wal.stat().st_size == 0  # close checkpoints everything into the file

    run(body)


def test_many_concurrent_writers_from_the_loop(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state, sandbox("sb1"), sandbox("sb2", tenant="bob"))
        audit = await AuditLog.open(store, state)
        try:
            async def one(n: int) -> None:
                tenant, sb = ("alice", "sb1") if n % 2 else ("bob", "sb2")
                ex_id = f"ex{n}"
                await start(store, ex_id, tenant=tenant, sandbox_id=sb)
                store.update_execution(ex_id, status="running", started_at=NOW)
                for i in range(20):
                    store.append_output(ex_id, {"type": "stdout" if i % 3 else "stderr", "text": f"{n}:{i}\n"})
                    if i % 5 == 0:
                        await asyncio.sleep(0)
                store.append_output(ex_id, {"type": "result", "is_main_result": True, "data": {"n": n}})
                await store.finish_execution(ex_id, "ok")
                await audit.record(tenant, "k_x", "code_execute", {"sandbox_id": sb, "execution_id": ex_id}, 200,
                                   code=f"print({n})")

            await asyncio.gather(*(one(n) for n in range(60)))
            for n in range(60):
                ex = await store.get_execution("alice" if n % 2 else "bob", f"ex{n}")
                assert ex["stdout"] == "".join(f"{n}:{i}\n" for i in range(20) if i % 3)
                assert ex["stderr"] == "".join(f"{n}:{i}\n" for i in range(20) if i % 3 == 0)
                assert ex["results"] == [{"is_main_result": True, "data": {"n": n}}]
            assert store.stats.batches < store.stats.ops
        finally:
            await audit.close()
            await store.close()
        assert verify(state / DB_NAME) is None

    run(body)


# -- bounds, deletion, restart ------------------------------------------------------------------------------


def test_history_is_bounded_per_tenant_by_count(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state, sandbox("sb1"), sandbox("sb2", tenant="bob"), history_count=5)
        try:
            await start(store, "running-first")  # never finished: never pruned
            for i in range(8):
                await start(store, f"a{i}")
                await store.finish_execution(f"a{i}", "ok", finished_at=NOW + i)
            await start(store, "b0", tenant="bob", sandbox_id="sb2")
            await store.finish_execution("b0", "ok", finished_at=NOW - 100)  # older than all of alice's
            for i in range(3):
                with pytest.raises(NotFound):
                    await store.get_execution("alice", f"a{i}")
            for i in range(3, 8):
                assert (await store.get_execution("alice", f"a{i}"))["status"] == "ok"
            assert (await store.get_execution("alice", "running-first"))["status"] == "queued"
            assert (await store.get_execution("bob", "b0"))["status"] == "ok"
            assert await store.history_usage("alice") == (5, 0)
        finally:
            await store.close()

    run(body)


def test_history_is_bounded_per_tenant_by_bytes_and_gives_the_space_back(state: Path) -> None:
    chunk = "x" * (256 * 1024)

    async def body() -> None:
        store = await open_with_sandbox(state, history_bytes=1024 * 1024)
        try:
            for i in range(40):  # 40 MiB written in all
                await start(store, f"ex{i}", limit=2 * 1024 * 1024)
                for _ in range(4):
                    store.append_output(f"ex{i}", {"type": "stdout", "text": chunk})
                await store.finish_execution(f"ex{i}", "ok", finished_at=NOW + i)
            count, size = await store.history_usage("alice")
            assert (count, size) == (1, 1024 * 1024)
            assert len((await store.get_execution("alice", "ex39"))["stdout"]) == 1024 * 1024
            with pytest.raises(NotFound):
                await store.get_execution("alice", "ex38")
            assert await store.prune() == 0
        finally:
            await store.close()
        # The pages of pruned outputs went back to the file system: the file holds about one execution's output.
        assert (state / DB_NAME).stat().st_size < 3 * 1024 * 1024
        conn = sqlite3.connect(state / DB_NAME)
        assert conn.execute("SELECT count(*) FROM outputs").fetchone()[0] > 0
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] < 64
        conn.close()

    run(body)


def test_lowered_bounds_are_applied_by_prune(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        for i in range(6):
            await start(store, f"ex{i}")
            await store.finish_execution(f"ex{i}", "ok", finished_at=NOW + i)
        await store.close()
        store = await Store.open(state, history_count=2)
        try:
            assert await store.prune() == 4
            assert await store.execution_ids("sb1") == ["ex4", "ex5"]
        finally:
            await store.close()

    run(body)


def test_deleting_a_sandbox_deletes_its_executions_and_outputs(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state, sandbox("sb1"), sandbox("sb2"))
        try:
            for sb in ("sb1", "sb2"):
                await start(store, f"{sb}-ex", sandbox_id=sb)
                store.append_output(f"{sb}-ex", {"type": "stdout", "text": "out"})
                await store.finish_execution(f"{sb}-ex", "ok")
            assert await store.delete_sandbox("sb1") is True
            assert await store.delete_sandbox("sb1") is False
            with pytest.raises(NotFound):
                await store.get_execution("alice", "sb1-ex")
            assert (await store.get_execution("alice", "sb2-ex"))["stdout"] == "out"
            assert await store.history_usage("alice") == (1, 3)
        finally:
            await store.close()
        conn = sqlite3.connect(state / DB_NAME)
        assert conn.execute("SELECT count(*) FROM outputs").fetchone()[0] == 1
        conn.close()

    run(body)


def test_mark_cut_executions_ends_what_the_crash_cut(state: Path) -> None:
    async def body() -> None:
        store = await open_with_sandbox(state)
        try:
            await start(store, "queued")
            await start(store, "running", limit=5)
            store.update_execution("running", status="running", started_at=NOW)
            store.append_output("running", {"type": "stdout", "text": "partial output"})  # also truncated
            await start(store, "done")
            await store.finish_execution("done", "ok", finished_at=NOW + 1)
            assert await store.mark_cut_executions(finished_at=NOW + 9) == ["queued", "running"]
            for ex_id in ("queued", "running"):
                ex = await store.get_execution("alice", ex_id)
                assert (ex["status"], ex["reason"], ex["finished_at"]) == \
                    ("killed", "gateway_restart", "2027-01-15T08:00:09.000Z")
            running = await store.get_execution("alice", "running")
            assert (running["stdout"], running["truncated"], running["duration_ms"]) == ("parti", True, 9000)
            assert (await store.get_execution("alice", "done"))["status"] == "ok"
            assert await store.mark_cut_executions() == []
        finally:
            await store.close()

    run(body)


def test_a_writer_killed_mid_write_leaves_a_consistent_database(state: Path) -> None:
    """SIGKILL of a process writing as fast as it can, three times over: each time the file opens, SQLite finds
    it intact, everything the writer reported committed is there, the audit chain verifies and the mirror
    catches up; the execution the kill cut is ended by ``mark_cut_executions``."""
    reported_done: dict[str, int] = {}
    reported_started: set[str] = set()
    for round_, wanted in enumerate((15, 40, 25)):
        child = subprocess.Popen([sys.executable, str(WRITER), str(state), f"r{round_}"], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout is not None
        done = 0
        for line in child.stdout:
            kind, ex_id, *rest = line.split()
            if kind == "started":
                reported_started.add(ex_id)
            else:
                reported_done[ex_id] = int(rest[0])
                done += 1
                if done == wanted:
                    break
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()

        async def check() -> None:
            store = await Store.open(state)
            audit = await AuditLog.open(store, state)
            try:
                cut = await store.mark_cut_executions()
                assert len(cut) <= 1  # the writer has one execution open at a time
                for ex_id in reported_started:
                    ex = await store.get_execution("alice", ex_id)
                    if ex_id in reported_done or ex["status"] == "ok":
                        assert ex["status"] == "ok"
                        assert ex["stdout"] == "".join(f"{ex_id} line {j}\n" for j in range(5))
                        assert ex["results"] == [{"is_main_result": True, "data": {"text/plain": ex_id}}]
                    else:
                        assert (ex["status"], ex["reason"]) == ("killed", "gateway_restart")
                page = await audit.read("alice", limit=1000)
                seqs = {e["ids"]["execution_id"]: e["seq"] for e in page["entries"]}
                for ex_id, seq in reported_done.items():
                    assert seqs[ex_id] == seq
            finally:
                await audit.close()
                await store.close()

        run(check)
        conn = sqlite3.connect(state / DB_NAME)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        db_entries = conn.execute("SELECT seq, hash FROM audit ORDER BY seq").fetchall()
        conn.close()
        assert verify(state / DB_NAME) is None
        mirrored: dict[int, str] = {}
        for raw in (state / "audit.jsonl").read_text().splitlines():
            entry = json.loads(raw)
            assert mirrored.setdefault(entry["seq"], entry["hash"]) == entry["hash"]
        assert sorted(mirrored.items()) == db_entries
    assert len(reported_done) == 15 + 40 + 25
