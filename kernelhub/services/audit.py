"""The audit log: every action on every surface, in a hash chain, in the store's file and a JSON-lines mirror.

:class:`AuditLog` records one entry per action (a REST route, a websocket message, a Jupyter API call, an MCP
tool): who (``tenant``, ``key_id``), what (``action``: the MCP tool name or the route, e.g. ``code_execute``,
``POST /api/kernels``), on what (``sandbox_id`` and the other ``ids`` it touched), how it ended (``status``:
the HTTP status or, for websockets and MCP, the one the same outcome has in REST; ``error``: the error code)
and, for code, its ``code_sha256`` and ``code_bytes`` (the code itself, ``code``, only with
``record_code``). Entries live in the ``audit`` table of the :class:`~kernelhub.services.store.Store`'s file and
are written through its worker (never on the event loop).

**An entry** (also the API's shape, ``GET /v1/audit``, and a line of the mirror)::

    {"seq": 7, "time": "2026-01-02T03:04:05.123456Z", "tenant": "alice", "key_id": "k_3f0a9c1e5b7d2a48",
     "action": "code_execute", "sandbox_id": "sb0123456789", "ids": {"execution_id": "ex..."},
     "status": 200, "code_sha256": "…", "code_bytes": 12, "prev_hash": "…", "hash": "…"}

Fields that do not apply (``tenant`` of an unauthenticated call, ``error`` of a success, the code fields of
an action without code, empty ``ids``) are absent, never ``null``. ``seq`` counts from 1 without gaps.

**The chain.** ``hash`` is the SHA-256 (lower-case hex) of the entry's canonical form: the UTF-8 bytes of the
JSON object of every present field except ``hash`` (``prev_hash`` and ``seq`` included), keys sorted, no
whitespace (``separators=(",", ":")``), non-ASCII characters as themselves (``ensure_ascii=False``). Values
are only strings, integers and the ``ids`` object of strings, so this is also RFC 8785 (JCS) form and any
language can recompute it. ``prev_hash`` is the previous entry's ``hash``; the first entry's is
:data:`GENESIS` (64 zeros). Editing, removing, inserting or reordering entries therefore breaks the chain at
the first entry concerned, which :func:`verify` names. The chain has no secret: someone able to rewrite the
file can recompute every hash after the entries they changed. The defence is a copy they cannot reach, i.e.
the mirror shipped off the host: ``kernelhub audit verify --jsonl FILE`` checks such a copy, and its hashes
must match the database's.

**Key fingerprints.** ``key_id`` is ``"k_"`` and the first 16 hex digits (64 bits) of HMAC-SHA256 of the API
key under a per-state-directory secret (``<state_dir>/audit.secret``, 32 random bytes, mode 0600, made on
first use): the same key always has the same id, the id reveals nothing of the key (not even to someone
guessing short keys, without the secret), and the key itself is never stored. Losing the secret file changes
every key's id from then on; the chain is unaffected.

**The mirror** (``<state_dir>/audit.jsonl`` unless configured otherwise): each committed entry as one line
(its canonical form with ``hash``), appended in ``seq`` order after the transaction that stored it commits (so
it never holds an entry the database lost). Delivery is *at least once*: after a crash between a commit and its
mirror write, the next start appends what the mirror missed (from ``audit_meta``'s ``mirror_seq``), which may
repeat the last batch's lines; readers deduplicate by ``seq``. The file is opened, appended and closed for
each batch, so an external rotation (``logrotate`` renaming it) takes effect at once; kernelhub never rotates
or truncates it. It is not ``fsync``\\ed unless ``fsync_mirror`` is set: a process crash loses nothing (the
lines are in the kernel's page cache), a power cut may lose the last seconds, as for the database
(:mod:`kernelhub.services.store`).

**Retention** (``retention_s`` and/or ``max_entries``): older entries are deleted from the database (never
from the mirror) by :meth:`AuditLog.prune`, never ones the mirror has not received yet. The chain stays
verifiable: ``audit_meta`` keeps a checkpoint, the ``seq`` and ``hash`` of the last pruned entry, and the first
kept entry must follow it. ``audit_meta`` also keeps the chain's head (``head_seq``, ``head_hash``), so entries
removed from the end are detected too.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, StoreError
from ..models import iso_micro
from .store import DB_NAME, MIGRATIONS, Store, code_digest, connect, schema_version, utf8_text

__all__ = ["GENESIS", "AuditLog", "BadEntry", "canonical", "compare_mirror", "entry_hash", "main", "run_verify",
           "verify", "verify_jsonl"]

log = logging.getLogger(__name__)

#: ``prev_hash`` of the first entry.
GENESIS = "0" * 64
#: The schema version that added the audit log (:data:`~kernelhub.services.store.MIGRATIONS`).
AUDIT_SCHEMA_VERSION = 2
SECRET_NAME = "audit.secret"
MIRROR_NAME = "audit.jsonl"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Lengths past which a field is cut when recorded (what a caller controls must not bloat the log).
_MAX = {"tenant": 256, "key_id": 64, "action": 256, "error": 128, "id": 1024}
_MAX_IDS = 16
_CURSOR_PREFIX = "a1:"
#: The largest ``seq`` SQLite's INTEGER holds (a cursor past it is not one this gateway gave out).
_MAX_SEQ = 2**63 - 1


# ------------------------------------------------------------------------------------------------------------
# The chain


def canonical(entry: Mapping[str, Any]) -> bytes:
    """The bytes ``hash`` is computed over: every present field of ``entry`` but ``hash``, as JSON with sorted
    keys, no whitespace, UTF-8 (module docstring). ``None`` values count as absent."""
    body = {k: v for k, v in entry.items() if k != "hash" and v is not None}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256, lower-case hex, of :func:`canonical` ``(entry)``."""
    return hashlib.sha256(canonical(entry)).hexdigest()


def _line(entry: Mapping[str, Any]) -> str:
    """The entry as one line of the mirror: its canonical form with ``hash``."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


@dataclasses.dataclass(frozen=True)
class BadEntry:
    """The first entry at which a chain does not hold: its ``seq``, its ``time`` (None when the entry itself
    is missing) and what is wrong with it, as a sentence."""

    seq: int
    time: str | None
    problem: str

    def __str__(self) -> str:
        if self.seq == 0:  # not an entry: a line of a mirror, or the log's metadata
            return self.problem
        when = f" ({self.time})" if self.time else ""
        return f"entry {self.seq}{when}: {self.problem}"


def _check_chain(entries: Iterable[Mapping[str, Any]], start_seq: int, start_hash: str, *,
                 mirror: bool = False) -> tuple[BadEntry | None, int, int, str]:
    """Walk ``entries`` (in ``seq`` order) from the checkpoint ``(start_seq, start_hash)``; answers the first
    bad entry or None, how many entries were checked, and the last ``seq`` and ``hash`` reached.

    ``mirror``: the entries are lines of a mirror, which may start anywhere in the chain (after a rotation:
    the first line's own ``seq`` and ``prev_hash`` are the starting point) and may repeat a line right after
    itself (at-least-once delivery; the repeat must be identical)."""
    seq, last_hash, count = start_seq, start_hash, 0
    previous: Mapping[str, Any] | None = None
    for entry in entries:
        entry_seq = entry.get("seq")
        when = entry.get("time") if isinstance(entry.get("time"), str) else None
        if not isinstance(entry_seq, int) or isinstance(entry_seq, bool):
            return BadEntry(seq + 1, when, "it has no valid sequence number"), count, seq, last_hash
        if mirror and previous is None:
            seq, last_hash = entry_seq - 1, str(entry.get("prev_hash"))
        if mirror and entry == previous:
            continue
        if entry_seq != seq + 1:
            if entry_seq > seq + 1:
                one = entry_seq == seq + 2
                missing = f"entry {seq + 1} is" if one else f"entries {seq + 1} to {entry_seq - 1} are"
                problem = f"{missing} missing before it"
            else:
                problem = f"it comes after entry {seq}: entries are out of order"
            return BadEntry(entry_seq, when, problem), count, seq, last_hash
        if entry_hash(entry) != entry.get("hash"):
            return BadEntry(entry_seq, when, "its content does not match its hash: it was changed"), count, seq, \
                last_hash
        if entry.get("prev_hash") != last_hash:
            return BadEntry(entry_seq, when, f"its prev_hash is not the hash of entry {seq}: an entry before it "
                            "was changed, removed or inserted"), count, seq, last_hash
        seq, last_hash, count, previous = entry_seq, str(entry["hash"]), count + 1, entry
    return None, count, seq, last_hash


#: The columns of the ``audit`` table, which are the fields of an entry.
_COLUMNS = ("seq", "time", "tenant", "key_id", "action", "sandbox_id", "ids", "status", "error", "code_sha256",
            "code_bytes", "code", "prev_hash", "hash")


def _row_entry(row: sqlite3.Row | Mapping[str, Any]) -> dict[str, Any]:
    """An ``audit`` row as the entry it stores (absent fields left out). ``ids`` that are not JSON (changed by
    hand) stay the text they are, so the entry's hash no longer matches and :func:`verify` names it."""
    entry: dict[str, Any] = {}
    for name in _COLUMNS:
        value = row[name]
        if value is None:
            continue
        if name == "ids":
            with contextlib.suppress(ValueError, TypeError):
                value = json.loads(value)
        entry[name] = value
    return entry


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return {name: value for name, value in conn.execute("SELECT name, value FROM audit_meta")}


def _meta_problem(meta: Mapping[str, object], *names: str) -> str | None:
    """Where ``audit_meta`` holds, as one of ``names``, something kernelhub never writes there (not an entry
    number): the damage in words, or None. It was changed outside kernelhub."""
    for name in names:
        value = meta.get(name, "0")
        try:
            number = int(value) if isinstance(value, (str, int)) else -1
        except ValueError:
            number = -1
        if number < 0:
            return (f"its metadata: audit_meta holds {str(value)[:40]!r} as {name}, not an entry number; it was "
                    "changed outside kernelhub")
    return None


def _meta_int(meta: Mapping[str, object], name: str) -> int:
    """The entry number ``audit_meta`` keeps as ``name`` (0 when absent). Raises :class:`StoreError` for a value
    that is not one (a StoreError of its own would share the ``store_error`` code: one code, one class)."""
    problem = _meta_problem(meta, name)
    if problem is not None:
        raise StoreError(f"The audit log is damaged at {problem}. Run kernelhub audit verify.")
    return int(str(meta.get(name, "0")))


@dataclasses.dataclass(frozen=True)
class _Report:
    bad: BadEntry | None
    entries: int
    first_seq: int
    last_seq: int
    last_hash: str
    pruned_seq: int


def _check_db(db_path: Path) -> _Report:
    """Verify the audit chain of the database at ``db_path`` (read-only; safe while a gateway writes it)."""
    if not db_path.is_file():
        raise FileNotFoundError(f"There is no kernelhub database at {db_path}.")
    try:
        conn = connect(db_path, readonly=True)
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot open {db_path}: {exc}.") from None
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("BEGIN")  # one snapshot for the whole walk
        version = schema_version(conn)
        if version < AUDIT_SCHEMA_VERSION:
            raise StoreError(f"The database {db_path} has no audit log (schema version {version}).")
        if version > MIGRATIONS[-1].version:
            raise StoreError(f"The database {db_path} was written by a newer kernelhub (schema version "
                             f"{version}); verify it with that version.")
        meta = _meta(conn)
        problem = _meta_problem(meta, "pruned_seq", "head_seq")
        if problem is not None:
            conn.execute("COMMIT")
            return _Report(BadEntry(0, None, problem), 0, 0, 0, GENESIS, 0)
        pruned_seq, head_seq = _meta_int(meta, "pruned_seq"), _meta_int(meta, "head_seq")
        pruned_hash = meta.get("pruned_hash", GENESIS)
        rows = conn.execute("SELECT * FROM audit ORDER BY seq")
        bad, count, last_seq, last_hash = _check_chain((_row_entry(r) for r in rows), pruned_seq, pruned_hash)
        if bad is None and "head_seq" in meta:
            head_hash = meta.get("head_hash")
            if last_seq < head_seq:
                missing = f"entry {head_seq} is" if head_seq == last_seq + 1 else \
                    f"entries {last_seq + 1} to {head_seq} are"
                bad = BadEntry(last_seq + 1, None, f"{missing} missing from the end of the log (its head is "
                               f"entry {head_seq})")
            elif last_seq > head_seq:
                extra = conn.execute("SELECT time FROM audit WHERE seq = ?", (head_seq + 1,)).fetchone()
                bad = BadEntry(head_seq + 1, extra[0] if extra else None,
                               f"it comes after the log's head (entry {head_seq}): it was added outside kernelhub")
            elif last_hash != head_hash:
                bad = BadEntry(last_seq, None, "its hash is not the one the log's head records: the last entry was "
                               "replaced")
        conn.execute("COMMIT")
        return _Report(bad, count, pruned_seq + 1, last_seq, last_hash, pruned_seq)
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot read the audit log in {db_path}: {exc}.") from None
    finally:
        conn.close()


def verify(db_path: str | Path) -> BadEntry | None:
    """The first bad entry of the audit log in the database at ``db_path`` (a changed, removed, inserted or
    reordered entry, or entries missing at either end), or None when the chain holds. Read-only; safe while a
    gateway writes the file. Raises :class:`FileNotFoundError` for a missing file and
    :class:`~kernelhub.errors.StoreError` for one that is not a kernelhub database with an audit log
    this version can read."""
    return _check_db(Path(db_path)).bad


def _jsonl_entries(path: Path, problems: list[BadEntry]) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                entry = json.loads(raw)
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
            except ValueError:
                problems.append(BadEntry(0, None, f"line {number}, which is not a JSON object (cut short, or "
                                         "changed)"))
                return
            yield entry


def verify_jsonl(path: str | Path) -> BadEntry | None:
    """The first bad entry of a mirror file (:class:`AuditLog`'s JSON lines, or a shipped copy of them), or
    None. The file may start anywhere in the chain (after a rotation) and may repeat a line (at-least-once
    delivery); any other break is reported like :func:`verify`'s. Raises :class:`OSError` when unreadable."""
    problems: list[BadEntry] = []
    bad, *_ = _check_chain(_jsonl_entries(Path(path), problems), 0, GENESIS, mirror=True)
    return problems[0] if problems else bad


def compare_mirror(path: str | Path, db_path: str | Path, *, own: bool = False) -> BadEntry | None:
    """The first entry of a mirror file (or a shipped copy) that disagrees with the database at ``db_path``, or
    None: an entry whose hash is not the database's entry of the same ``seq`` (one of the two was changed; when
    both chains verify, one was rewritten with its hashes recomputed, which the chain alone cannot show), or one
    past the database's last entry (added outside kernelhub). With ``own`` (the gateway's live mirror, not an
    older copy) entries missing from its end are found too: the database records how far the mirror was
    written. Entries the database pruned are not compared. Read-only; safe while a gateway writes both. Raises
    :class:`OSError` for an unreadable file and :class:`~kernelhub.errors.StoreError` for the database."""
    problems: list[BadEntry] = []
    try:
        conn = connect(Path(db_path), readonly=True)
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot open {db_path}: {exc}.") from None
    try:
        # What the mirror holds was committed before it was written: with this snapshot taken first, every line
        # read after it is in it, or was committed after it (checked again below).
        conn.execute("BEGIN")
        meta = _meta(conn)
        if _meta_problem(meta, "pruned_seq", "mirror_seq") is not None:
            return None  # the database's own check names it
        pruned, written = _meta_int(meta, "pruned_seq"), _meta_int(meta, "mirror_seq")

        def head() -> int:
            return int(conn.execute("SELECT max(seq) FROM audit").fetchone()[0] or pruned)

        last_db, last, previous = head(), 0, None
        for entry in _jsonl_entries(Path(path), problems):
            if entry == previous:
                continue
            previous = entry
            seq = entry.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                return None  # verify_jsonl names it
            when = entry.get("time") if isinstance(entry.get("time"), str) else None
            last = seq
            if seq > last_db:
                conn.execute("COMMIT")  # a newer snapshot: the gateway may have gone on meanwhile
                conn.execute("BEGIN")
                last_db = head()
                if seq > last_db:
                    return BadEntry(seq, when, f"it is not in the database, whose last entry is {last_db}: it was "
                                    "added to the mirror outside kernelhub, or removed from the database")
            if seq <= pruned:
                continue
            row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
            if row is not None and row[0] != entry.get("hash"):
                return BadEntry(seq, when, f"it differs from entry {seq} of the database: one of the two was "
                                "changed (if both chains hold, one was rewritten and its hashes recomputed)")
        if problems:
            return None  # verify_jsonl names it
        if own and 0 < last < written:
            return BadEntry(last + 1, None, f"{'entry' if written == last + 1 else 'entries'} {last + 1}"
                            f"{'' if written == last + 1 else f' to {written}'} "
                            f"{'is' if written == last + 1 else 'are'} missing from the end of the mirror (the "
                            f"database records that it was written up to entry {written})")
        return None
    except sqlite3.Error as exc:
        raise StoreError(f"Cannot read the audit log in {db_path}: {exc}.") from None
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------------------
# The log


def _load_secret(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            secret = os.read(fd, 4096)
        finally:
            os.close(fd)
        if len(secret) < 16:
            raise StoreError(f"The audit secret {path} is shorter than 16 bytes; remove it to make a new one "
                             "(key ids change).") from None
        return secret
    try:
        secret = secrets.token_bytes(32)
        os.write(fd, secret)
        os.fsync(fd)
    finally:
        os.close(fd)
    return secret


def _cut(value: object, limit: int) -> str:
    return utf8_text(str(value))[:limit]


def _parse_since(since: object) -> str | None:
    if since is None or since == "":
        return None
    if not isinstance(since, str) or len(since) > 64:
        raise InvalidRequest("since must be an ISO 8601 time such as 2026-01-02T03:04:05Z.")
    try:
        moment = datetime.datetime.fromisoformat(since)
    except ValueError:
        raise InvalidRequest(f"since {since!r} is not an ISO 8601 time such as 2026-01-02T03:04:05Z.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    try:
        return iso_micro(moment.timestamp())
    except (OverflowError, OSError, ValueError):
        raise InvalidRequest(f"since {since!r} is out of range.") from None


def _parse_limit(limit: object) -> int:
    if limit is None or limit == "":
        return DEFAULT_LIMIT
    try:
        n = int(limit) if isinstance(limit, (int, str)) and not isinstance(limit, bool) else -1
    except ValueError:
        n = -1
    if not 1 <= n <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}.")
    return n


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: object) -> int:
    if cursor is None or cursor == "":
        return 0
    try:
        if not isinstance(cursor, str) or len(cursor) > 64:
            raise ValueError
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(_CURSOR_PREFIX):
            raise ValueError
        seq = int(text[len(_CURSOR_PREFIX):])
        if not 0 <= seq <= _MAX_SEQ:
            raise ValueError
        return seq
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this gateway gave out; use the 'next' value of a previous "
                             "answer.") from None


class AuditLog:
    """The audit log of one gateway, on its :class:`~kernelhub.services.store.Store`. Made by :meth:`open` (by
    the app, after the store); the surfaces call :meth:`fingerprint` when they authenticate and :meth:`record`
    when an action ended; ``GET /v1/audit`` calls :meth:`read`; the hub's reaper calls :meth:`prune` now and
    then; :meth:`close` before the store closes.

    Options (the module docstring says what each does): ``mirror_path`` (None: no mirror), ``fsync_mirror``,
    ``record_code``, ``retention_s`` (seconds; None: no age limit), ``max_entries`` (None: no count limit).
    This object is also the store's :class:`~kernelhub.services.store.BatchListener`: the chain's head lives
    on the store's worker thread."""

    def __init__(self, store: Store, secret: bytes, *, mirror_path: Path | None = None,
                 fsync_mirror: bool = False, record_code: bool = False, retention_s: float | None = None,
                 max_entries: int | None = None) -> None:
        """Use :meth:`open`."""
        if retention_s is not None and retention_s <= 0:
            raise ValueError("retention_s must be positive")
        if max_entries is not None and max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.store = store
        self._secret = secret
        self.mirror_path = mirror_path
        self.fsync_mirror = fsync_mirror
        self.record_code = record_code
        self.retention_s = retention_s
        self.max_entries = max_entries
        # Worker-thread state: the chain's head (committed or in the running batch), the entries of the running
        # batch (for the mirror), what the mirror has, and whether audit_meta must be written.
        self._head_seq = 0
        self._head_hash = GENESIS
        self._batch: list[dict[str, Any]] = []
        self._mirrored_seq = 0
        self._meta_dirty = False
        self._closed = False

    @classmethod
    async def open(cls, store: Store, state_dir: str | Path, *, mirror_path: str | Path | None = MIRROR_NAME,
                   **options: Any) -> AuditLog:
        """The audit log in ``store``'s file: loads the chain's head and the key secret
        (``<state_dir>/audit.secret``, made if missing), appends to the mirror what it missed (a relative
        ``mirror_path`` is under ``state_dir``; None: no mirror), and prunes past the retention. ``options``:
        see :class:`AuditLog`. Raises :class:`~kernelhub.errors.StoreError`."""
        state = Path(state_dir)
        secret = await asyncio.get_running_loop().run_in_executor(None, _load_secret, state / SECRET_NAME)
        mirror = None if mirror_path is None else state / mirror_path
        audit = cls(store, secret, mirror_path=mirror, **options)
        await store.submit(audit._load)
        store.add_batch_listener(audit)
        await store.flush()  # the catch-up of the mirror runs in this batch's commit hook
        await audit.prune()
        return audit

    def _load(self, conn: sqlite3.Connection) -> None:
        """At open: the chain's head, and how far the mirror got."""
        meta = self._load_head(conn)
        self._mirrored_seq = _meta_int(meta, "mirror_seq") if self.mirror_path is not None else self._head_seq

    def _load_head(self, conn: sqlite3.Connection) -> dict[str, str]:
        """The chain's head: the one ``audit_meta`` records (written in the same transaction as every entry), so
        that entries removed from the end, or a last entry replaced, while the gateway was down stay a break
        that :func:`verify` names, instead of being covered by the next entries. Only entries past the
        recorded head (which the chain must go on after) make the head the last row's."""
        meta = _meta(conn)
        row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        if row is not None:
            self._head_seq, self._head_hash = row[0], row[1]
        else:
            self._head_seq = _meta_int(meta, "pruned_seq")
            self._head_hash = meta.get("pruned_hash", GENESIS)
        if "head_seq" in meta:
            head_seq, head_hash = _meta_int(meta, "head_seq"), meta.get("head_hash", GENESIS)
            if (head_seq, head_hash) != (self._head_seq, self._head_hash):
                log.error("the audit log's last entry (%d) is not the head its metadata records (%d): entries were "
                          "removed, changed or added outside kernelhub; kernelhub audit verify names the first",
                          self._head_seq, head_seq)
                if head_seq >= self._head_seq:
                    self._head_seq, self._head_hash = head_seq, head_hash
        self._meta_dirty = True
        return meta

    async def close(self) -> None:
        """Write the mirror's position down (so the next start repeats nothing). Idempotent."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(StoreError):
                await self.store.submit(self._mark_dirty)

    def _mark_dirty(self, conn: sqlite3.Connection) -> None:
        self._meta_dirty = True

    # -- recording ----------------------------------------------------------------------------------------

    def fingerprint(self, key: str) -> str:
        """``key_id`` of an API key: ``"k_"`` and 16 hex digits of its HMAC-SHA256 under this state
        directory's secret. Never the key, and not reversible without the secret."""
        mac = hmac.new(self._secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return "k_" + mac.hexdigest()[:16]

    def record(self, tenant: str | None, key_id: str | None, action: str, ids: Mapping[str, object] | None,
               status: int, error: str | None = None, code: str | None = None) -> asyncio.Future[dict[str, Any]]:
        """Record one action that ended. ``ids``: what it touched (``sandbox_id``, ``session_id``,
        ``execution_id``, ``kernel_id``, ``path``…; None values left out); ``status``: the HTTP status of the
        outcome; ``error``: its error code; ``code``: the code it ran (stored as its SHA-256 and size, and as
        itself only with ``record_code``). Long values are cut (:data:`_MAX`).

        Does not wait: the entry is chained and stored by the store's worker in order. The future answers the
        stored entry (with ``seq`` and ``hash``) once committed, or raises
        :class:`~kernelhub.errors.StoreError`; ignoring it is fine (a failure is logged). Raises
        :class:`ValueError` for a status that is not an HTTP status."""
        if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError(f"not an HTTP status: {status!r}")
        fields: dict[str, Any] = dict.fromkeys(_COLUMNS)
        fields |= {
            "tenant": None if tenant is None else _cut(tenant, _MAX["tenant"]),
            "key_id": None if key_id is None else _cut(key_id, _MAX["key_id"]),
            "action": _cut(action, _MAX["action"]),
            "status": status,
            "error": None if error is None else _cut(error, _MAX["error"]),
        }
        other: dict[str, str] = {}
        for name, value in list((ids or {}).items())[:_MAX_IDS]:
            if value is None:
                continue
            if name == "sandbox_id":
                fields["sandbox_id"] = _cut(value, _MAX["id"])
            else:
                other[_cut(name, 64)] = _cut(value, _MAX["id"])
        fields["ids"] = json.dumps(other, sort_keys=True, separators=(",", ":"), ensure_ascii=False) \
            if other else None
        if code is not None:
            fields["code_sha256"], fields["code_bytes"] = code_digest(code)
            if self.record_code:
                fields["code"] = utf8_text(code)
        future = self.store.submit(lambda conn: self._append(conn, fields))
        future.add_done_callback(_log_failure)
        return future

    def _append(self, conn: sqlite3.Connection, fields: dict[str, Any]) -> dict[str, Any]:
        row = fields | {"seq": self._head_seq + 1, "time": iso_micro(time.time()), "prev_hash": self._head_hash}
        entry = _row_entry(row)
        entry["hash"] = row["hash"] = entry_hash(entry)
        conn.execute(f"INSERT INTO audit ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})",
                     row)
        self._head_seq, self._head_hash = row["seq"], row["hash"]
        self._batch.append(entry)
        self._meta_dirty = True
        return entry

    # -- the store's batch listener (worker thread) ---------------------------------------------------------

    def before_commit(self, conn: sqlite3.Connection) -> None:
        if not self._meta_dirty:
            return
        values = [("head_seq", str(self._head_seq)), ("head_hash", self._head_hash)]
        if self.mirror_path is not None:
            values.append(("mirror_seq", str(self._mirrored_seq)))
        conn.executemany("INSERT INTO audit_meta (name, value) VALUES (?, ?) "
                         "ON CONFLICT (name) DO UPDATE SET value = excluded.value", values)
        self._meta_dirty = False

    def committed(self, conn: sqlite3.Connection) -> None:
        batch, self._batch = self._batch, []
        if self.mirror_path is None:
            self._mirrored_seq = self._head_seq  # nothing to wait for before pruning
            return
        if self._mirrored_seq >= self._head_seq:
            return
        if not batch or batch[0]["seq"] != self._mirrored_seq + 1:
            # Behind (a failed write, or the catch-up at start): the missing entries come from the file.
            rows = conn.execute("SELECT * FROM audit WHERE seq > ? ORDER BY seq", (self._mirrored_seq,))
            batch = [_row_entry(r) for r in rows]
        if not batch:
            return
        data = "".join(_line(e) for e in batch).encode("utf-8")
        try:
            fd = os.open(self.mirror_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync_mirror:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("could not append to the audit mirror %s (it will be retried): %s", self.mirror_path, exc)
            return
        self._mirrored_seq = batch[-1]["seq"]
        self._meta_dirty = True  # written down with the next batch

    def rolled_back(self, conn: sqlite3.Connection) -> None:
        # The entries of the batch are gone: the head is the last committed one again. The mirror's position is
        # the file's, which the rollback did not touch.
        self._batch = []
        self._load_head(conn)

    # -- reading and pruning ------------------------------------------------------------------------------

    async def read(self, tenant: str, since: object = None, limit: object = None,
                   cursor: object = None) -> dict[str, Any]:
        """``GET /v1/audit``: the tenant's own entries from ``since`` (an ISO 8601 time; naive means UTC) on,
        oldest first, at most ``limit`` (1 to 1000, default 100; a query string's text is accepted), after
        ``cursor`` (the ``next`` of the previous page). Answers ``{"entries": [entry…], "next": cursor |
        None}``; ``next`` is None on the last page. Raises :class:`~kernelhub.errors.InvalidRequest` for a
        bad ``since``, ``limit`` or ``cursor``."""
        since_iso = _parse_since(since)
        n = _parse_limit(limit)
        after = _decode_cursor(cursor)

        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            lower = after
            if since_iso is not None and after == 0:
                # Start at the first entry of that time (the time index), not at the tenant's first entry.
                first = conn.execute("SELECT min(seq) FROM audit WHERE tenant = ? AND time >= ?",
                                     (tenant, since_iso)).fetchone()[0]
                if first is None:
                    return {"entries": [], "next": None}
                lower = first - 1
            sql = "SELECT * FROM audit WHERE tenant = ? AND seq > ?"
            args: list[Any] = [tenant, lower]
            if since_iso is not None:
                sql += " AND time >= ?"
                args.append(since_iso)
            rows = conn.execute(sql + " ORDER BY seq LIMIT ?", (*args, n + 1)).fetchall()
            entries = [_row_entry(r) for r in rows[:n]]
            more = len(rows) > n
            return {"entries": entries, "next": _encode_cursor(entries[-1]["seq"]) if more else None}

        return await self.store.submit(op)

    async def prune(self, now: float | None = None) -> int:
        """Delete entries past the retention (older than ``retention_s``, beyond the newest ``max_entries``),
        never one the mirror has not received; keeps the checkpoint (module docstring). Answers how many
        went."""
        if self.retention_s is None and self.max_entries is None:
            return 0
        moment = time.time() if now is None else now

        def op(conn: sqlite3.Connection) -> int:
            meta = _meta(conn)
            pruned = _meta_int(meta, "pruned_seq")
            cutoff = pruned
            if self.retention_s is not None:
                old = conn.execute("SELECT max(seq) FROM audit WHERE time < ?",
                                   (iso_micro(moment - self.retention_s),)).fetchone()[0]
                cutoff = max(cutoff, old or 0)
            if self.max_entries is not None:
                cutoff = max(cutoff, self._head_seq - self.max_entries)
            cutoff = min(cutoff, self._mirrored_seq, self._head_seq)
            if cutoff <= pruned:
                return 0
            last = conn.execute("SELECT hash FROM audit WHERE seq = ?", (cutoff,)).fetchone()
            if last is None:
                return 0
            gone = conn.execute("DELETE FROM audit WHERE seq <= ?", (cutoff,)).rowcount
            conn.executemany("INSERT INTO audit_meta (name, value) VALUES (?, ?) "
                             "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                             [("pruned_seq", str(cutoff)), ("pruned_hash", last[0])])
            self.store.note_deleted()
            return int(gone)

        return await self.store.submit(op)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("an audit entry could not be stored: %s", future.exception())


# ------------------------------------------------------------------------------------------------------------
# kernelhub audit verify


def main(argv: Sequence[str] | None = None) -> int:
    """``kernelhub audit verify --state-dir DIR [--jsonl FILE]``: checks the audit chain of ``DIR``'s database
    (``--state-dir`` defaults to ``KERNELHUB_STATE_DIR``), and with ``--jsonl`` also a mirror file or a shipped
    copy of it. Prints one sentence a check. Exit status: 0 when intact, 1 naming the first bad entry, 2 for a
    usage error (no state directory, no database, not a kernelhub database, unreadable file)."""
    parser = argparse.ArgumentParser(prog="kernelhub audit verify",
                                     description="Check that the audit log's hash chain is intact.")
    parser.add_argument("--state-dir", default=os.environ.get("KERNELHUB_STATE_DIR"),
                        help="the gateway's state directory (KERNELHUB_STATE_DIR env var)")
    parser.add_argument("--jsonl", help="also check this JSON-lines mirror (or a shipped copy of it)")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    return run_verify(args.state_dir, args.jsonl)


def run_verify(state_dir: str | None, jsonl: str | None = None) -> int:
    """What ``kernelhub audit verify`` does once its options are read (:func:`main` gives the exit statuses):
    checks ``state_dir``'s database and a mirror file (``jsonl``, else the state directory's own
    ``audit.jsonl`` when there is one): its own chain and its agreement with the database
    (:func:`compare_mirror`); prints one sentence a check."""
    if not state_dir:
        print("kernelhub audit verify: give the gateway's state directory with --state-dir DIR.", file=sys.stderr)
        return 2
    db_path = Path(state_dir) / DB_NAME
    try:
        report = _check_db(db_path)
    except (FileNotFoundError, StoreError) as exc:
        print(f"kernelhub audit verify: {exc}", file=sys.stderr)
        return 2
    status = 0
    if report.bad is not None:
        print(f"The audit log in {db_path} is broken at {report.bad}.")
        status = 1
    elif report.entries == 0:
        print(f"The audit log in {db_path} is intact: it holds no entries"
              f"{f' (entries up to {report.pruned_seq} were pruned)' if report.pruned_seq else ''}.")
    else:
        print(f"The audit log in {db_path} is intact: {report.entries} entries, {report.first_seq} to "
              f"{report.last_seq}; the last hash is {report.last_hash}.")
    own_mirror = Path(state_dir) / MIRROR_NAME
    if not jsonl and own_mirror.is_file():
        jsonl = str(own_mirror)
    if jsonl:
        try:
            own = Path(jsonl).resolve() == own_mirror.resolve()
            bad = verify_jsonl(jsonl) or compare_mirror(jsonl, db_path, own=own)
        except OSError as exc:
            print(f"kernelhub audit verify: cannot read {jsonl}: {exc.strerror or exc}.", file=sys.stderr)
            return 2
        except StoreError as exc:
            print(f"kernelhub audit verify: {exc}", file=sys.stderr)
            return 2
        if bad is not None:
            print(f"The audit mirror {jsonl} is broken at {bad}.")
            status = 1
        else:
            print(f"The audit mirror {jsonl} is intact and agrees with the database.")
    return status
