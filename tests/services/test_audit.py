"""The audit log: entries and their hash chain, key fingerprints, tenant-scoped paged reads, the JSON-lines
mirror, retention, and ``kernelhub audit verify`` finding an edited, deleted, swapped or inserted entry by raw
SQLite and naming the first bad one.

Real SQLite files in temporary state directories; no sandboxes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sqlite3
import stat
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from kernelhub.errors import InvalidRequest, StoreError
from kernelhub.services.audit import (
    GENESIS,
    AuditLog,
    _row_entry,  # noqa: PLC2701 - the tests rewrite rows as an attacker would
    canonical,
    compare_mirror,
    entry_hash,
    main,
    verify,
    verify_jsonl,
)
from kernelhub.services.store import DB_NAME, MIGRATIONS, Store, code_digest, connect, migrate

# A run of mixed actions as the surfaces will record them: REST routes, websocket messages, the Jupyter API and
# MCP tools, successes and failures, with and without code, one unauthenticated call.
ACTIONS: list[dict[str, Any]] = [
    {"tenant": "alice", "key": "alice-key", "action": "sandbox_create", "ids": {"sandbox_id": "sb1"},
     "status": 201},
    {"tenant": "alice", "key": "alice-key", "action": "code_execute",
     "ids": {"sandbox_id": "sb1", "execution_id": "ex1", "session_id": "se1"}, "status": 200, "code": "print(1)"},
    {"tenant": "bob", "key": "bob-key", "action": "sandbox_info", "ids": {"sandbox_id": "sb1"}, "status": 404,
     "error": "not_found"},
    {"tenant": None, "key": "wrong-key", "action": "GET /v1/sandboxes", "ids": {}, "status": 401,
     "error": "unauthorized"},
    {"tenant": "alice", "key": "alice-key", "action": "ws execute",
     "ids": {"sandbox_id": "sb1", "execution_id": "ex2"}, "status": 200, "code": "for i in range(3): print(i)"},
    {"tenant": "alice", "key": "alice-key", "action": "POST /api/kernels", "ids": {"kernel_id": "k1",
     "sandbox_id": "sb2"}, "status": 201},
    {"tenant": "bob", "key": "bob-key", "action": "file_upload", "ids": {"sandbox_id": "sb3",
     "path": "data/ünï.csv"}, "status": 201},
    {"tenant": "alice", "key": "alice-key", "action": "code_execute", "ids": {"sandbox_id": "sb1"},
     "status": 400, "error": "invalid_request", "code": "x = 'é'\ud800"},
    {"tenant": "bob", "key": "bob-key", "action": "sandbox_delete", "ids": {"sandbox_id": "sb3"}, "status": 204},
    {"tenant": "alice", "key": "alice-key", "action": "execution_status", "ids": {"execution_id": "ex1",
     "ignored": None}, "status": 200},
]


def run(body: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(body())


async def open_log(state: Path, **options: Any) -> tuple[Store, AuditLog]:
    store = await Store.open(state)
    try:
        return store, await AuditLog.open(store, state, **options)
    except BaseException:
        await store.close()
        raise


async def close(store: Store, audit: AuditLog) -> None:
    await audit.close()
    await store.close()


def record_actions(state: Path, actions: list[dict[str, Any]] = ACTIONS, **options: Any) -> list[dict[str, Any]]:
    async def body() -> list[dict[str, Any]]:
        store, audit = await open_log(state, **options)
        try:
            futures = [audit.record(a["tenant"], audit.fingerprint(a["key"]), a["action"], a["ids"], a["status"],
                                    a.get("error"), a.get("code")) for a in actions]
            return list(await asyncio.gather(*futures))
        finally:
            await close(store, audit)

    return run(body)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def recorded(state: Path) -> list[dict[str, Any]]:
    """The mixed actions, recorded twice over (20 entries)."""
    return record_actions(state, ACTIONS * 2)


def db(state: Path) -> sqlite3.Connection:
    return sqlite3.connect(state / DB_NAME, isolation_level=None)


def mirror_lines(state: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


# -- entries and the chain ----------------------------------------------------------------------------------


def test_the_canonical_form_is_sorted_compact_utf8_json_without_hash() -> None:
    entry = {"seq": 1, "time": "2026-01-02T03:04:05.000006Z", "tenant": "zoë", "action": "code_execute",
             "ids": {"z": "1", "a": "2"}, "status": 200, "error": None, "prev_hash": GENESIS, "hash": "ignored"}
    text = ('{"action":"code_execute","ids":{"a":"2","z":"1"},"prev_hash":"' + GENESIS + '","seq":1,'
            '"status":200,"tenant":"zoë","time":"2026-01-02T03:04:05.000006Z"}')
    assert canonical(entry) == text.encode("utf-8")
    assert entry_hash(entry) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_entries_hold_what_each_action_did_and_chain_from_genesis(state: Path,
                                                                   recorded: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in recorded] == list(range(1, 21))
    assert recorded[0]["prev_hash"] == GENESIS
    for before, after in zip(recorded, recorded[1:], strict=False):
        assert after["prev_hash"] == before["hash"]
    for entry in recorded:
        assert entry["hash"] == entry_hash(entry)
        assert entry["time"].endswith("Z") and len(entry["time"]) == 27

    execute = recorded[1]
    assert {k: v for k, v in execute.items() if k not in ("time", "hash", "prev_hash")} == {
        "seq": 2, "tenant": "alice", "key_id": execute["key_id"], "action": "code_execute", "sandbox_id": "sb1",
        "ids": {"execution_id": "ex1", "session_id": "se1"}, "status": 200,
        "code_sha256": hashlib.sha256(b"print(1)").hexdigest(), "code_bytes": 8,
    }
    assert "code" not in execute  # not unless the operator asks for it
    unauthenticated = recorded[3]
    assert "tenant" not in unauthenticated and unauthenticated["error"] == "unauthorized"
    assert "ids" not in unauthenticated and "sandbox_id" not in unauthenticated
    assert (recorded[7]["code_sha256"], recorded[7]["code_bytes"]) == code_digest("x = 'é'\ud800")
    assert recorded[9]["ids"] == {"execution_id": "ex1"}  # None ids are left out
    assert verify(state / DB_NAME) is None


def test_keys_are_fingerprinted_never_stored(state: Path, recorded: list[dict[str, Any]]) -> None:
    ids = {a["key"]: e["key_id"] for a, e in zip(ACTIONS * 2, recorded, strict=True)}
    assert len(set(ids.values())) == 3
    for key_id in ids.values():
        assert key_id.startswith("k_") and len(key_id) == 18
        int(key_id[2:], 16)
    secret = state / "audit.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_bytes()) == 32

    async def again() -> str:
        store, audit = await open_log(state)
        try:
            return audit.fingerprint("alice-key")
        finally:
            await close(store, audit)

    assert run(again) == ids["alice-key"]  # the same secret after a restart: the same id
    for path in state.iterdir():
        if path.is_file() and path.name != "audit.secret":
            data = path.read_bytes()
            for key in ("alice-key", "bob-key", "wrong-key"):
                assert key.encode() not in data, (key, path.name)


def test_code_is_recorded_only_when_configured(state: Path) -> None:
    entries = record_actions(state, ACTIONS[1:2], record_code=True)
    assert entries[0]["code"] == "print(1)"
    assert entries[0]["code_sha256"] == hashlib.sha256(b"print(1)").hexdigest()
    assert verify(state / DB_NAME) is None


def test_record_refuses_a_status_that_is_not_http(state: Path) -> None:
    async def body() -> None:
        store, audit = await open_log(state)
        try:
            for status in (True, 42, "200", 600):
                with pytest.raises(ValueError):
                    audit.record("alice", None, "x", {}, status)  # type: ignore[arg-type]
        finally:
            await close(store, audit)

    run(body)


def test_long_values_are_cut(state: Path) -> None:
    entries = record_actions(state, [{"tenant": "t" * 1000, "key": "k", "action": "a" * 1000,
                                      "ids": {"sandbox_id": "s" * 5000, "path": "p" * 5000}, "status": 200,
                                      "error": "e" * 1000}])
    entry = entries[0]
    assert (len(entry["tenant"]), len(entry["action"]), len(entry["error"])) == (256, 256, 128)
    assert (len(entry["sandbox_id"]), len(entry["ids"]["path"])) == (1024, 1024)


def test_concurrent_records_get_consecutive_seqs(state: Path) -> None:
    async def body() -> list[int]:
        store, audit = await open_log(state)
        try:
            async def one(n: int) -> int:
                await asyncio.sleep(0)
                entry = await audit.record("alice", None, "sandbox_info", {"sandbox_id": f"sb{n}"}, 200)
                return int(entry["seq"])

            return list(await asyncio.gather(*(one(n) for n in range(300))))
        finally:
            await close(store, audit)

    assert sorted(run(body)) == list(range(1, 301))
    assert verify(state / DB_NAME) is None


class FailOnce:
    """A batch listener whose ``before_commit`` raises once when armed: the whole batch is rolled back."""

    def __init__(self) -> None:
        self.armed = False

    def before_commit(self, conn: sqlite3.Connection) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("injected failure")

    def committed(self, conn: sqlite3.Connection) -> None:
        pass

    def rolled_back(self, conn: sqlite3.Connection) -> None:
        pass


def test_a_rolled_back_batch_leaves_no_trace_in_the_chain_or_the_mirror(state: Path) -> None:
    gate = threading.Event()

    async def body() -> None:
        store, audit = await open_log(state)
        failing = FailOnce()
        store.add_batch_listener(failing)
        try:
            first = await audit.record("alice", None, "sandbox_list", {}, 200)
            held = store.submit(lambda _conn: gate.wait(30))
            lost = audit.record("alice", None, "sandbox_create", {"sandbox_id": "sb1"}, 201)
            failing.armed = True
            gate.set()
            with pytest.raises(StoreError, match="injected failure"):
                await held
            with pytest.raises(StoreError):
                await lost
            after = await audit.record("alice", None, "sandbox_info", {"sandbox_id": "sb1"}, 200)
            assert (after["seq"], after["prev_hash"]) == (2, first["hash"])
        finally:
            gate.set()
            await close(store, audit)

    run(body)
    assert verify(state / DB_NAME) is None
    assert [e["action"] for e in mirror_lines(state)] == ["sandbox_list", "sandbox_info"]


# -- verify finds tampering -----------------------------------------------------------------------------


@pytest.mark.parametrize(("column", "value"), [
    ("status", 200), ("tenant", "mallory"), ("action", "sandbox_info"), ("code_sha256", "0" * 64),
    ("time", "2020-01-01T00:00:00.000000Z"), ("error", None), ("code", "print('not what ran')"),
])
def test_verify_names_an_edited_entry(state: Path, recorded: list[dict[str, Any]], column: str,
                                      value: object) -> None:
    conn = db(state)
    conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = 8", (value,))
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 8
    assert "changed" in bad.problem
    assert bad.time == (value if column == "time" else recorded[7]["time"])


def test_verify_names_the_entry_after_a_deleted_one(state: Path, recorded: list[dict[str, Any]]) -> None:
    conn = db(state)
    conn.execute("DELETE FROM audit WHERE seq = 5")
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and (bad.seq, bad.time) == (6, recorded[5]["time"])
    assert "entry 5 is missing" in bad.problem


def test_verify_names_the_first_of_two_swapped_entries(state: Path, recorded: list[dict[str, Any]]) -> None:
    columns = "time, tenant, key_id, action, sandbox_id, ids, status, error, code_sha256, code_bytes, code, " \
              "prev_hash, hash"
    conn = db(state)
    rows = {seq: conn.execute(f"SELECT {columns} FROM audit WHERE seq = ?", (seq,)).fetchone() for seq in (11, 12)}
    assignments = ", ".join(f"{c.strip()} = ?" for c in columns.split(","))
    conn.execute("BEGIN")
    conn.execute(f"UPDATE audit SET {assignments} WHERE seq = 11", rows[12])
    conn.execute(f"UPDATE audit SET {assignments} WHERE seq = 12", rows[11])
    conn.execute("COMMIT")
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and (bad.seq, bad.time) == (11, recorded[11]["time"])


def _shift_up_from(conn: sqlite3.Connection, seq: int) -> None:
    for (s,) in conn.execute("SELECT seq FROM audit WHERE seq >= ? ORDER BY seq DESC", (seq,)).fetchall():
        conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (s + 1, s))


def test_verify_names_an_inserted_entry(state: Path, recorded: list[dict[str, Any]]) -> None:
    """Made up without the chain: the inserted entry itself is bad."""
    conn = db(state)
    _shift_up_from(conn, 4)
    conn.execute("INSERT INTO audit (seq, time, tenant, action, status, prev_hash, hash) VALUES (4, ?, 'alice', "
                 "'sandbox_delete', 204, ?, ?)", (recorded[3]["time"], recorded[2]["hash"], "f" * 64))
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 4 and "changed" in bad.problem


def test_verify_names_the_entry_after_a_forged_insertion(state: Path, recorded: list[dict[str, Any]]) -> None:
    """Forged with a correct hash and prev_hash: the chain breaks at the entry it displaced."""
    forged = {"seq": 4, "time": recorded[2]["time"], "tenant": "alice", "action": "sandbox_delete",
              "status": 204, "prev_hash": recorded[2]["hash"]}
    forged["hash"] = entry_hash(forged)
    conn = db(state)
    _shift_up_from(conn, 4)
    conn.execute("INSERT INTO audit (seq, time, tenant, action, status, prev_hash, hash) VALUES (:seq, :time, "
                 ":tenant, :action, :status, :prev_hash, :hash)", forged)
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and (bad.seq, bad.time) == (5, recorded[3]["time"])


def test_verify_finds_entries_removed_from_or_added_at_the_end(state: Path,
                                                                recorded: list[dict[str, Any]]) -> None:
    conn = db(state)
    conn.execute("DELETE FROM audit WHERE seq >= 19")
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 19 and "entries 19 to 20 are missing" in bad.problem

    conn.execute("INSERT INTO audit (seq, time, action, status, prev_hash, hash) VALUES (:seq, :time, :action, "
                 ":status, :prev_hash, :hash)", recorded[18])
    conn.execute("INSERT INTO audit (seq, time, action, status, prev_hash, hash) VALUES (:seq, :time, :action, "
                 ":status, :prev_hash, :hash)", recorded[19])
    bad = verify(state / DB_NAME)  # the originals lost their other fields: changed
    assert bad is not None and bad.seq == 19

    conn.execute("DELETE FROM audit WHERE seq >= 19")
    extra = {"seq": 19, "time": recorded[17]["time"], "action": "x", "status": 200,
             "prev_hash": recorded[17]["hash"]}
    conn.execute("INSERT INTO audit (seq, time, action, status, prev_hash, hash) VALUES (:seq, :time, :action, "
                 ":status, :prev_hash, :hash)", {**extra, "hash": entry_hash(extra)})
    conn.execute("UPDATE audit_meta SET value = '18' WHERE name = 'head_seq'")
    conn.execute("UPDATE audit_meta SET value = ? WHERE name = 'head_hash'", (recorded[17]["hash"],))
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 19 and "after the log's head" in bad.problem


def test_a_restart_does_not_cover_entries_removed_from_the_end(state: Path, recorded: list[dict[str, Any]]) -> None:
    """Entries cut from the end (or the last one replaced) while the gateway was down: the next gateway goes on
    from the head its metadata records, so the gap stays, named, instead of being covered by new entries."""
    conn = db(state)
    conn.execute("DELETE FROM audit WHERE seq >= 19")
    conn.close()
    after = record_actions(state, ACTIONS[:2])
    assert [e["seq"] for e in after] == [21, 22] and after[0]["prev_hash"] == recorded[-1]["hash"]
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 21 and "entries 19 to 20 are missing" in bad.problem

    conn = db(state)
    conn.execute("UPDATE audit SET status = 500, hash = ? WHERE seq = 22",
                 (entry_hash({**after[1], "status": 500}),))
    conn.close()
    record_actions(state, ACTIONS[:1])
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 21  # still the first break; the replaced 22 is behind it


# -- kernelhub audit verify -------------------------------------------------------------------------------


def test_verify_command_exit_codes_and_sentences(state: Path, recorded: list[dict[str, Any]],
                                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--state-dir", str(state), "--jsonl", str(state / "audit.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "is intact: 20 entries, 1 to 20" in out and recorded[-1]["hash"] in out
    assert "audit.jsonl is intact" in out

    conn = db(state)
    conn.execute("UPDATE audit SET status = 500 WHERE seq = 13")
    conn.close()
    assert main([f"--state-dir={state}"]) == 1
    assert f"is broken at entry 13 ({recorded[12]['time']}): its content does not match its hash" in \
        capsys.readouterr().out

    assert main([]) == 2
    assert "--state-dir" in capsys.readouterr().err
    assert main(["--state-dir", str(tmp_path / "nowhere")]) == 2
    assert "There is no kernelhub database" in capsys.readouterr().err
    assert main(["--state-dir", str(state), "--bogus"]) == 2
    assert main(["--state-dir", str(state), "--jsonl", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err

    older = tmp_path / "older"
    older.mkdir()
    conn = connect(older / DB_NAME)
    migrate(conn, MIGRATIONS[:1])
    conn.close()
    assert main(["--state-dir", str(older)]) == 2
    assert "has no audit log (schema version 1)" in capsys.readouterr().err


def test_verify_command_reads_the_state_dir_variable(state: Path, recorded: list[dict[str, Any]],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KERNELHUB_STATE_DIR", str(state))
    assert main([]) == 0
    assert "intact" in capsys.readouterr().out


def test_verify_works_while_a_gateway_writes(state: Path) -> None:
    async def body() -> None:
        store, audit = await open_log(state)
        try:
            for _ in range(5):
                await audit.record("alice", None, "sandbox_info", {}, 200)
                assert await asyncio.get_running_loop().run_in_executor(None, verify, state / DB_NAME) is None
        finally:
            await close(store, audit)

    run(body)


# -- the mirror ---------------------------------------------------------------------------------------------


def test_the_mirror_matches_the_database(state: Path, recorded: list[dict[str, Any]]) -> None:
    lines = mirror_lines(state)
    assert lines == recorded
    assert stat.S_IMODE((state / "audit.jsonl").stat().st_mode) == 0o600
    assert verify_jsonl(state / "audit.jsonl") is None


def test_verify_jsonl_finds_tampering_and_allows_rotation_and_repeats(state: Path,
                                                                      recorded: list[dict[str, Any]],
                                                                      tmp_path: Path) -> None:
    text = (state / "audit.jsonl").read_text().splitlines(keepends=True)
    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(text[6:] + text[-1:]))  # rotated away the first 6; the last line delivered twice
    assert verify_jsonl(copy) is None

    edited = json.loads(text[9])
    edited["status"] = 500
    copy.write_text("".join(text[:9]) + json.dumps(edited) + "\n" + "".join(text[10:]))
    bad = verify_jsonl(copy)
    assert bad is not None and bad.seq == 10

    copy.write_text("".join(text[:4] + text[5:]))
    bad = verify_jsonl(copy)
    assert bad is not None and bad.seq == 6 and "entry 5 is missing" in bad.problem

    copy.write_text("".join(text[:3] + [text[4], text[3]] + text[5:]))
    bad = verify_jsonl(copy)
    assert bad is not None and bad.seq == 5 and "missing" in bad.problem

    repeated_but_changed = json.loads(text[2])
    repeated_but_changed["tenant"] = "mallory"
    copy.write_text("".join(text[:3]) + json.dumps(repeated_but_changed) + "\n" + "".join(text[3:]))
    assert verify_jsonl(copy) is not None

    copy.write_text("".join(text[:3]) + "not json\n")
    bad = verify_jsonl(copy)
    assert bad is not None and "line 4, which is not a JSON object" in str(bad)


def rewrite_chain(state: Path, seq: int, **changes: Any) -> None:
    """What someone able to write the database can do: change entry ``seq`` and recompute every hash after it and
    the head, so that the database's own chain holds."""
    conn = db(state)
    conn.row_factory = sqlite3.Row
    prev = GENESIS
    for row in [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]:
        if row["seq"] == seq:
            row |= changes
        row["prev_hash"] = prev
        row["hash"] = prev = entry_hash(_row_entry(row))
        conn.execute("UPDATE audit SET status = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                     (row["status"], row["prev_hash"], row["hash"], row["seq"]))
    conn.execute("UPDATE audit_meta SET value = ? WHERE name = 'head_hash'", (prev,))
    conn.close()


def test_verify_compares_the_mirror_with_the_database(state: Path, recorded: list[dict[str, Any]],
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Each chain alone cannot show a rewrite with recomputed hashes, nor a forged entry past the other's end,
    nor entries cut from the mirror's end: verify compares the two, and checks the state directory's own
    mirror without being asked."""
    mirror = state / "audit.jsonl"
    text = mirror.read_text().splitlines(keepends=True)
    assert compare_mirror(mirror, state / DB_NAME, own=True) is None

    # A forged entry with a valid hash appended to the mirror.
    forged = dict(recorded[-1], seq=21, prev_hash=recorded[-1]["hash"], action="sandbox_delete")
    forged["hash"] = entry_hash(forged)
    mirror.write_text("".join(text) + json.dumps(forged) + "\n")
    assert verify_jsonl(mirror) is None
    assert main(["--state-dir", str(state)]) == 1
    assert "broken at entry 21" in capsys.readouterr().out

    # The mirror's tail cut (a shipped copy may be older than the database: only the live mirror is held to it).
    mirror.write_text("".join(text[:17]))
    bad = compare_mirror(mirror, state / DB_NAME, own=True)
    assert bad is not None and bad.seq == 18 and "entries 18 to 20 are missing from the end" in bad.problem
    copy = tmp_path / "older.jsonl"
    copy.write_text("".join(text[:17]))
    assert main(["--state-dir", str(state), "--jsonl", str(copy)]) == 0
    capsys.readouterr()

    # The database rewritten with recomputed hashes: its chain holds, the mirror shows it.
    mirror.write_text("".join(text))
    rewrite_chain(state, 7, status=204)
    assert verify(state / DB_NAME) is None
    assert main(["--state-dir", str(state)]) == 1
    out = capsys.readouterr().out
    assert "kernelhub.db is intact" in out and "broken at entry 7" in out and "differs from entry 7" in out


def test_verify_names_damaged_metadata_and_ids_instead_of_a_traceback(state: Path, recorded: list[dict[str, Any]],
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    conn = db(state)
    conn.execute("UPDATE audit SET ids = '{not json' WHERE seq = 2")
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 2 and "does not match its hash" in bad.problem
    for name in ("head_seq", "pruned_seq", "mirror_seq"):
        conn = db(state)
        kept = conn.execute("SELECT value FROM audit_meta WHERE name = ?", (name,)).fetchone()
        conn.execute("INSERT INTO audit_meta (name, value) VALUES (?, 'xx') "
                     "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name,))
        conn.close()
        if name != "mirror_seq":
            assert main(["--state-dir", str(state)]) == 1
            assert f"broken at its metadata: audit_meta holds 'xx' as {name}" in capsys.readouterr().out
        if name != "pruned_seq":  # (which a gateway reads only when it prunes)
            # The gateway refuses to start on it with a sentence: not a traceback, not a silent reset of the chain.
            with pytest.raises(StoreError, match=f"audit_meta holds 'xx' as {name}"):
                record_actions(state, [])
        conn = db(state)
        if kept is None:
            conn.execute("DELETE FROM audit_meta WHERE name = ?", (name,))
        else:
            conn.execute("UPDATE audit_meta SET value = ? WHERE name = ?", (kept[0], name))
        conn.close()


def test_the_mirror_catches_up_after_a_crash_between_commit_and_write(state: Path,
                                                                       recorded: list[dict[str, Any]]) -> None:
    # As if the gateway died after committing entries 18 to 20 but before appending them to the mirror.
    lines = (state / "audit.jsonl").read_text().splitlines(keepends=True)
    (state / "audit.jsonl").write_text("".join(lines[:17]))
    conn = db(state)
    conn.execute("UPDATE audit_meta SET value = '17' WHERE name = 'mirror_seq'")
    conn.close()
    record_actions(state, ACTIONS[:1])
    assert mirror_lines(state)[:20] == recorded
    assert [e["seq"] for e in mirror_lines(state)] == list(range(1, 22))
    # The next start repeats nothing.
    record_actions(state, [])
    assert len(mirror_lines(state)) == 21


def test_a_failing_mirror_is_retried_and_never_loses_entries(state: Path) -> None:
    state.mkdir()
    (state / "audit.jsonl").mkdir()  # cannot be opened for writing
    record_actions(state, ACTIONS[:3], max_entries=1)

    async def body() -> int:
        store, audit = await open_log(state, max_entries=1)
        try:
            return await audit.prune()  # nothing the mirror lacks may go
        finally:
            await close(store, audit)

    assert run(body) == 0
    (state / "audit.jsonl").rmdir()
    record_actions(state, ACTIONS[3:4])
    assert [e["seq"] for e in mirror_lines(state)] == [1, 2, 3, 4]


def test_no_mirror_when_none_is_configured(state: Path) -> None:
    record_actions(state, ACTIONS[:2], mirror_path=None)
    assert not (state / "audit.jsonl").exists()
    assert verify(state / DB_NAME) is None


# -- reading ----------------------------------------------------------------------------------------------


def test_a_tenant_reads_only_its_own_entries_page_by_page(state: Path, recorded: list[dict[str, Any]]) -> None:
    async def body() -> None:
        store, audit = await open_log(state)
        try:
            alice = [e for e in recorded if e.get("tenant") == "alice"]
            got: list[dict[str, Any]] = []
            cursor = None
            pages = 0
            while True:
                page = await audit.read("alice", limit="3", cursor=cursor)
                got += page["entries"]
                pages += 1
                cursor = page["next"]
                if cursor is None:
                    break
            assert got == alice and pages == (len(alice) + 2) // 3
            assert (await audit.read("carol"))["entries"] == []
            assert [e["tenant"] for e in (await audit.read("bob", limit=1000))["entries"]] == ["bob"] * 6

            since = recorded[10]["time"]
            later = await audit.read("alice", since=since)
            assert later["entries"] == [e for e in alice if e["time"] >= since] and later["next"] is None
            assert (await audit.read("alice", since="2999-01-01T00:00:00Z"))["entries"] == []
            offset = (await audit.read("alice", since=since.replace("Z", "+00:00")))["entries"]
            assert offset == later["entries"]
            first = await audit.read("alice", since=since, limit=1)
            second = await audit.read("alice", since=since, limit=1, cursor=first["next"])
            assert first["entries"] + second["entries"] == later["entries"][:2]

            for bad in ({"since": "yesterday"}, {"since": 5}, {"limit": 0}, {"limit": 1001}, {"limit": "x"},
                        {"limit": True}, {"cursor": "!!"}, {"cursor": "bm9wZQ"},
                        # A seq past SQLite's integers (was a 500: OverflowError in the query).
                        {"cursor": base64.urlsafe_b64encode(b"a1:" + b"9" * 44).decode().rstrip("=")}):
                with pytest.raises(InvalidRequest):
                    await audit.read("alice", **bad)
        finally:
            await close(store, audit)

    run(body)


# -- retention ----------------------------------------------------------------------------------------------


def test_retention_by_count_keeps_the_chain_verifiable(state: Path, recorded: list[dict[str, Any]],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    more = record_actions(state, ACTIONS[:2], max_entries=5)  # open prunes to 5, then 2 more
    assert [e["seq"] for e in more] == [21, 22]
    conn = db(state)
    assert [r[0] for r in conn.execute("SELECT seq FROM audit ORDER BY seq")] == [16, 17, 18, 19, 20, 21, 22]
    assert dict(conn.execute("SELECT name, value FROM audit_meta WHERE name LIKE 'pruned%'")) == \
        {"pruned_seq": "15", "pruned_hash": recorded[14]["hash"]}
    conn.close()
    assert main(["--state-dir", str(state)]) == 0
    assert "7 entries, 16 to 22" in capsys.readouterr().out
    # The first kept entry must still follow the checkpoint.
    conn = db(state)
    conn.execute("DELETE FROM audit WHERE seq = 16")
    conn.close()
    bad = verify(state / DB_NAME)
    assert bad is not None and bad.seq == 17 and "entry 16 is missing" in bad.problem
    # The mirror keeps everything.
    assert [e["seq"] for e in mirror_lines(state)] == list(range(1, 23))


def test_retention_by_age_can_empty_the_log_and_the_chain_goes_on(state: Path,
                                                                  recorded: list[dict[str, Any]],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    async def body() -> None:
        store, audit = await open_log(state, retention_s=3600)
        try:
            assert await audit.prune() == 0  # all younger than an hour
            assert await audit.prune(now=4_000_000_000) == 20
            assert main(["--state-dir", str(state)]) == 0
            assert "holds no entries (entries up to 20 were pruned)" in capsys.readouterr().out
            entry = await audit.record("alice", None, "sandbox_list", {}, 200)
            assert (entry["seq"], entry["prev_hash"]) == (21, recorded[-1]["hash"])
        finally:
            await close(store, audit)

    run(body)
    assert verify(state / DB_NAME) is None


def test_retention_options_are_checked(state: Path) -> None:
    async def body() -> None:
        store = await Store.open(state)
        try:
            with pytest.raises(ValueError):
                await AuditLog.open(store, state, retention_s=0)
            with pytest.raises(ValueError):
                await AuditLog.open(store, state, max_entries=0)
        finally:
            await store.close()

    run(body)
