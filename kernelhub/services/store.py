"""The durable store: sandboxes, sessions, executions and their outputs in one SQLite file under ``--state-dir``.

:class:`Store` keeps what a gateway restart must not lose (issue 10): every sandbox's plain record, its
sessions, every execution with its status, timings and outputs up to the output cap, and (through
:class:`~kernelhub.services.audit.AuditLog`, on the same file) the audit log. It does not hold live objects;
the services rebuild those from what it answers.

**The file.** ``<state_dir>/kernelhub.db``, mode 0600 (it holds sandboxes' ``env``, which may carry secrets, and,
if the operator asks for it, audited code), with an ``flock`` on ``<state_dir>/kernelhub.db.lock`` so that a
second gateway on the same state directory is refused instead of restoring the same sandboxes twice.
Pragmas, each for a reason:

- ``journal_mode=WAL``: readers (``kernelhub audit verify``, a backup) never block the writer, and a commit is
  one sequential append to the ``-wal`` file.
- ``synchronous=NORMAL``: a commit ``write()``\\s the WAL but does not ``fsync`` it; the WAL is synced when it
  is checkpointed into the database, which a thread of its own does (``PASSIVE``, with its own connection) at
  most :data:`CHECKPOINT_INTERVAL_S` (1 s) or :data:`CHECKPOINT_COMMITS` commits apart; the writer's own
  automatic checkpoints are off, so a commit does not wait on an ``fsync`` (except under sustained load, once
  per :data:`WAL_MAX_BYTES` written). A *process* crash (``kill -9``, an
  exception, an OOM kill) loses nothing that was committed: the data is in the kernel's page cache and the next
  open replays the WAL. A *power cut* or kernel panic may lose the transactions committed since the last
  checkpoint (about the last second), never the file's consistency: SQLite's WAL is crash-safe in that mode
  (https://www.sqlite.org/pragma.html#pragma_synchronous, https://www.sqlite.org/wal.html). ``FULL`` would
  ``fsync`` on every commit (about 4 ms on this kind of machine, for every create and execute); running
  sandboxes do not survive a power cut anyway, so that cost buys little here.
- ``foreign_keys=ON``: a sandbox's sessions, executions and outputs go with it (``ON DELETE CASCADE``).
- ``auto_vacuum=INCREMENTAL`` (set when the file is made): pruned outputs give their pages back to the file
  system (``PRAGMA incremental_vacuum`` after a batch that deleted rows), so the file's size follows the history
  bounds instead of its high-water mark.
- ``journal_size_limit``: the ``-wal`` file is truncated back to this size after a checkpoint.

**One writer thread.** Every statement runs on one worker thread holding the one connection; the event loop
only puts work on a queue (:meth:`Store.submit`, :meth:`Store.post`) and never waits on SQLite. The worker
takes everything queued at once and runs it in one transaction (group commit), each operation inside a
``SAVEPOINT`` so that one failing operation leaves the others of its batch intact; the futures of a batch are
resolved with one wake-up of the loop. Output appends (:meth:`Store.append_output`) are posted without a
future, and adjacent stream chunks of one execution in a batch are merged into one row. Operations run in the
order they were queued: an execution's appends are stored before its finish, and a read sees every write
queued before it.

**Schema.** A ``schema_version`` table lists the migrations applied; :data:`MIGRATIONS` is the ordered list,
applied at open in one transaction (all or nothing). A database written by a newer kernelhub (a version past
the end of the list) is refused with a sentence saying so.

**Outputs.** An execution's stdout, stderr and results are rows of ``outputs`` (one per event, appended,
never rewritten) holding the API's event shapes (API.md, "Streaming"): ``stdout``/``stderr`` text,
``result`` ``{is_main_result, data, metadata?, display_id?}`` and ``update`` ``{display_id, data,
metadata?}``. :meth:`Store.get_execution` reassembles them into the API's execution shape: streams
concatenated, results in order, an update replacing the ``data`` (and ``metadata``) of every earlier result
with its ``display_id`` (Jupyter's ``update_display_data``; an update with no such result changes nothing).
Every appended byte counts against the execution's ``output_limit`` (so the cap bounds the disk an execution
uses, updates included); past it the event is dropped (a stream chunk is cut at the cap), ``truncated`` is set
and ``reason`` becomes ``output_truncated`` unless it had one. The error (``{name, value, traceback}``) is a
column of the execution, bounded on its own (:data:`MAX_TRACEBACK_LINES`, :data:`MAX_ERROR_FIELD_CHARS`).

**History bounds.** Per tenant, at most ``history_count`` finished executions and ``history_bytes`` bytes of
their outputs are kept; finishing one past either bound deletes that tenant's oldest finished executions (and
their outputs). Unfinished executions are never pruned.

Times are Unix seconds (floats) everywhere in this module, as in
:class:`~kernelhub.services.sandboxes.SandboxRecord`; the API's ISO strings are made on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import NotFound, StoreError
from ..models import iso

__all__ = [
    "DB_NAME",
    "MIGRATIONS",
    "Migration",
    "SandboxRow",
    "SessionRow",
    "Store",
    "StoreError",
    "code_digest",
    "connect",
    "migrate",
    "schema_version",
    "utf8_text",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The database's file name under ``--state-dir``.
DB_NAME = "kernelhub.db"
#: Most operations one transaction takes from the queue.
MAX_BATCH = 512
#: Milliseconds the writer waits for a lock another process holds (a backup, ``sqlite3`` by hand) before the
#: operations of its batch fail.
BUSY_TIMEOUT_MS = 10_000
#: The WAL is checkpointed into the database (and only then ``fsync``\ed) by a thread of its own, at most this
#: many seconds and this many commits apart, so that the writer's commits do not wait on an ``fsync``.
CHECKPOINT_INTERVAL_S = 1.0
CHECKPOINT_COMMITS = 256
#: Under a steady stream of commits a PASSIVE checkpoint never catches up with the writer and the WAL would only
#: grow: past this size the checkpointer truncates it instead (TRUNCATE holds the writer off while it copies
#: what is left and syncs: under sustained load only, one pause per this many bytes written). Past twice this
#: size (a checkpointer starved of CPU) the writer truncates it itself, so the bound holds whatever the
#: scheduling.
WAL_MAX_BYTES = 16 * 1024 * 1024
#: Bytes the ``-wal`` file is cut back to after a checkpoint.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
#: An execution's error keeps at most this many traceback lines, each field at most this many characters.
MAX_TRACEBACK_LINES = 200
MAX_ERROR_FIELD_CHARS = 16 * 1024
#: Execution statuses that are final (API.md).
ENDED = ("ok", "error", "timeout", "killed")


def code_digest(code: str) -> tuple[str, int]:
    """``(sha256 hex, size in bytes)`` of ``code`` as UTF-8. Lone surrogates (which JSON can carry) are hashed
    as their ``surrogatepass`` bytes rather than failing. Used for executions and the audit log alike."""
    data = code.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest(), len(data)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def utf8_text(value: str) -> str:
    """Text SQLite (and any UTF-8 file) can store: lone surrogates (valid in JSON, not in UTF-8) become U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


# ------------------------------------------------------------------------------------------------------------
# Schema and migrations


@dataclasses.dataclass(frozen=True)
class Migration:
    """One step of the schema: ``version`` (1, 2, ... in order), what it adds, and its statements (run one by one
    inside the migration's transaction; ``executescript`` would commit on its own)."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sandboxes, sessions, executions and their outputs", (
        """CREATE TABLE sandboxes (
            id TEXT PRIMARY KEY,
            tenant TEXT NOT NULL,
            template TEXT NOT NULL,
            limits TEXT NOT NULL,
            network TEXT NOT NULL,
            metadata TEXT NOT NULL,
            env TEXT NOT NULL,
            state TEXT NOT NULL,
            reason TEXT,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            last_activity REAL NOT NULL,
            restored_at REAL,
            paused_at REAL,
            on_idle TEXT NOT NULL DEFAULT 'stop',
            jupyter_api INTEGER NOT NULL DEFAULT 0,
            uid INTEGER,
            sandbox_dir TEXT,
            workspace_mode TEXT,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX sandboxes_by_tenant ON sandboxes (tenant, state)",
        "CREATE INDEX sandboxes_by_state ON sandboxes (state)",
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
            type TEXT NOT NULL,
            language TEXT,
            state TEXT NOT NULL,
            kernel_id TEXT,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX sessions_by_sandbox ON sessions (sandbox_id)",
        """CREATE TABLE executions (
            id TEXT NOT NULL PRIMARY KEY,
            tenant TEXT NOT NULL,
            sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
            session_id TEXT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT,
            execution_count INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            timeout_s REAL,
            truncated INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            code_sha256 TEXT NOT NULL,
            code_bytes INTEGER NOT NULL,
            output_limit INTEGER NOT NULL,
            output_bytes INTEGER NOT NULL DEFAULT 0,
            output_seq INTEGER NOT NULL DEFAULT 0
        ) WITHOUT ROWID""",
        "CREATE INDEX executions_by_sandbox ON executions (sandbox_id)",
        "CREATE INDEX executions_by_tenant ON executions (tenant, finished_at)",
        """CREATE TABLE outputs (
            execution_id TEXT NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            body TEXT NOT NULL,
            PRIMARY KEY (execution_id, seq)
        )""",
    )),
    Migration(2, "the audit log and its chain's checkpoints", (
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            tenant TEXT,
            key_id TEXT,
            action TEXT NOT NULL,
            sandbox_id TEXT,
            ids TEXT,
            status INTEGER NOT NULL,
            error TEXT,
            code_sha256 TEXT,
            code_bytes INTEGER,
            code TEXT,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        "CREATE INDEX audit_by_tenant ON audit (tenant, seq)",
        "CREATE INDEX audit_by_tenant_time ON audit (tenant, time)",
        "CREATE INDEX audit_by_time ON audit (time)",
        "CREATE TABLE audit_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )),
)


def schema_version(conn: sqlite3.Connection) -> int:
    """The highest migration applied to ``conn``'s database, 0 for a new one."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if found is None:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    value = row[0]
    if value is None:
        return 0
    if not isinstance(value, int) or value < 0:
        raise StoreError(f"The database's schema_version table holds {str(value)[:40]!r}, not a version number: it "
                         "was damaged or is not kernelhub's. Restore it from a backup, or use another --state-dir.")
    return value


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS, *, where: str = "") -> int:
    """Bring ``conn``'s database up to the last of ``migrations``, in one transaction; answers the version.

    ``conn`` must be in autocommit mode (``isolation_level=None``, as :func:`connect` makes it). Raises
    :class:`StoreError` when the database is newer than the last migration (it was written by a newer
    kernelhub: opening it could lose what this version does not know) and when a migration fails (nothing of
    any migration of this call is then applied). ``where`` names the file in those sentences."""
    place = f" {where}" if where else ""
    known = migrations[-1].version if migrations else 0
    current = schema_version(conn)
    if current > known:
        raise StoreError(
            f"The database{place} has schema version {current}, written by a newer kernelhub; this kernelhub "
            f"knows versions up to {known}. Upgrade kernelhub, or use another --state-dir."
        )
    pending = [m for m in migrations if m.version > current]
    if not pending:
        return current
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, description TEXT "
                     "NOT NULL, applied_at REAL NOT NULL)")
        for migration in pending:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                         (migration.version, migration.description, time.time()))
        conn.execute("COMMIT")
    except BaseException as exc:
        conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"Could not upgrade the database{place} to schema version {known}: {exc}.") from exc
        raise
    return known


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to the database at ``path`` with kernelhub's pragmas (module docstring), in autocommit mode
    (transactions are explicit). ``readonly`` opens an existing file without creating or writing it (for
    ``kernelhub audit verify``); otherwise a new file is created with mode 0600 and incremental auto-vacuum.
    Raises :class:`sqlite3.Error` (the caller words it)."""
    path = Path(path)
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return conn
    fresh = not path.exists()
    if fresh:
        # Made before SQLite sees it, so the file and its -wal/-shm (SQLite gives them the database's mode) are
        # the gateway's alone from the start.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # Only takes effect before the first table exists.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"the database could not switch to WAL mode (it is in {mode} mode)")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
    except BaseException:
        conn.close()
        raise
    return conn


# ------------------------------------------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class SandboxRow:
    """What the store keeps of one sandbox: the plain fields of
    :class:`~kernelhub.services.sandboxes.SandboxRecord` and what a restart needs to bring it back.

    ``limits`` is the API's limits object (:meth:`Limits.to_dict`); ``network`` is the API's network value
    (``"none"``, ``"open"`` or ``{"allow", "deny"}``); ``metadata`` and ``env`` are JSON objects (``env`` is
    what the sandbox's kernels were started with: the template's merged with the request's). ``state`` is the
    API's (``starting``, ``running``, ``paused``, ``stopped``, ``failed``). Times are Unix seconds.
    ``uid`` is the host uid the sandbox ran as (its workspace's files belong to it), ``sandbox_dir`` the host
    directory holding its workspace (the ext4 image ``workspace.img`` in loop mode, the ``workspace``
    directory in dir mode) and ``workspace_mode`` ``"loop"`` or ``"dir"``: with them the restart re-attaches
    the workspace (:meth:`~kernelhub.sandbox.workspace.Workspace.reattach`) instead of making a new one."""

    id: str
    tenant: str
    template: str
    limits: dict[str, Any]
    created_at: float
    expires_at: float
    network: Any = "none"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    state: str = "starting"
    reason: str | None = None
    last_activity: float | None = None
    restored_at: float | None = None
    paused_at: float | None = None
    on_idle: str = "stop"
    jupyter_api: bool = False
    uid: int | None = None
    sandbox_dir: str | None = None
    workspace_mode: str | None = None

    @classmethod
    def _from_db(cls, row: sqlite3.Row) -> SandboxRow:
        return cls(
            id=row["id"], tenant=row["tenant"], template=row["template"], limits=json.loads(row["limits"]),
            created_at=row["created_at"], expires_at=row["expires_at"], network=json.loads(row["network"]),
            metadata=json.loads(row["metadata"]), env=json.loads(row["env"]), state=row["state"],
            reason=row["reason"], last_activity=row["last_activity"], restored_at=row["restored_at"],
            paused_at=row["paused_at"], on_idle=row["on_idle"], jupyter_api=bool(row["jupyter_api"]),
            uid=row["uid"], sandbox_dir=row["sandbox_dir"], workspace_mode=row["workspace_mode"],
        )


#: Fields of a sandbox :meth:`Store.update_sandbox` may change, and how each is stored.
_SANDBOX_UPDATES: dict[str, Callable[[Any], Any]] = {
    "state": str, "reason": lambda v: v, "last_activity": float, "restored_at": lambda v: v,
    "paused_at": lambda v: v, "on_idle": str, "expires_at": float, "network": _json, "metadata": _json,
    "uid": lambda v: v, "sandbox_dir": lambda v: v, "workspace_mode": lambda v: v,
    "jupyter_api": lambda v: int(bool(v)),
}


@dataclasses.dataclass
class SessionRow:
    """One session of a sandbox: ``type`` ``"jupyter"`` (``language`` python, node, typescript or bash;
    ``kernel_id`` its Jupyter kernel id) or ``"terminal"``; ``state`` the API's."""

    id: str
    sandbox_id: str
    type: str
    language: str | None = None
    state: str = "starting"
    kernel_id: str | None = None
    created_at: float = dataclasses.field(default_factory=time.time)


#: Fields of a session :meth:`Store.update_session` may change.
_SESSION_UPDATES: dict[str, Callable[[Any], Any]] = {"state": str, "kernel_id": lambda v: v,
                                                     "language": lambda v: v}


# ------------------------------------------------------------------------------------------------------------
# The worker


class BatchListener(Protocol):
    """Told about each transaction the worker commits; registered with :meth:`Store.add_batch_listener` by
    modules that keep state of their own in the same file (the audit log keeps its chain's head). Every method
    runs on the worker thread."""

    def before_commit(self, conn: sqlite3.Connection) -> None:
        """Last writes of the batch's transaction; raising rolls the whole batch back."""

    def committed(self, conn: sqlite3.Connection) -> None:
        """After a successful commit (outside any transaction)."""

    def rolled_back(self, conn: sqlite3.Connection) -> None:
        """After the batch's transaction was rolled back: forget what it changed."""


Op = Callable[[sqlite3.Connection], Any]


@dataclasses.dataclass(eq=False)
class _Item:
    # The operation, or None for an append of stream text (``stream``).
    fn: Op | None
    future: asyncio.Future[Any] | None = None
    # (execution_id, "stdout"|"stderr", text) for appends of stream text, which adjacent ones merge into.
    stream: tuple[str, str, str] | None = None
    # Runs outside any transaction, alone (opening and migrating the file).
    alone: bool = False


_STOP = _Item(None)


@dataclasses.dataclass
class StoreStats:
    """What the worker did: operations run, transactions committed, stream appends merged into another."""

    ops: int = 0
    batches: int = 0
    merged: int = 0


class Store:
    """The durable store of one gateway: one SQLite file, one writer thread. Made by :meth:`open` (by the app
    at start-up, before the services), closed by :meth:`close` (at exit, after them).

    ``history_count`` and ``history_bytes`` bound each tenant's finished executions (module docstring).
    Methods that answer return an :class:`asyncio.Future`, queued when the method is called (so calls run in
    the order they are made, awaited or not) and resolved by the worker; :meth:`append_output`,
    :meth:`update_execution` and :meth:`post` queue work nobody waits for. Every method must be called from
    the event loop; each raises :class:`StoreError` (through its future) when SQLite fails, and at once when
    the store is closed."""

    def __init__(self, path: Path, *, history_count: int = 1000, history_bytes: int = 256 * 1024 * 1024) -> None:
        """Use :meth:`open`."""
        if history_count < 1 or history_bytes < 1:
            raise ValueError("history bounds must be positive")
        self.path = path
        self.history_count = history_count
        self.history_bytes = history_bytes
        self.stats = StoreStats()
        # Loop side: what was posted since the last hand-over, and whether a hand-over is scheduled. The worker
        # gets lists of items: one queue put (one wake-up) per loop iteration, not per output chunk.
        self._queue: queue.SimpleQueue[list[_Item]] = queue.SimpleQueue()
        self._pending: list[_Item] = []
        self._push_scheduled = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._closed = False
        self._listeners: list[BatchListener] = []
        # Worker-thread state: per-tenant (count, bytes) of finished executions, loaded lazily; whether the
        # batch deleted rows (then pages are given back to the file system).
        self._usage: dict[str, list[int]] = {}
        self._freed = False
        # Commits since the last checkpoint (written by the worker, zeroed by the checkpointer: a lost increment
        # only delays a checkpoint), and the checkpointer's wake-up.
        self._commits_since_checkpoint = 0
        self._checkpoint_wanted = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self._checkpointer_stop = False
        # One checkpoint at a time (the checkpointer's, or the writer's own when the WAL outgrew the bound).
        self._checkpoint_lock = threading.Lock()
        self._wal_path = path.with_name(path.name + "-wal")

    # -- opening and closing ------------------------------------------------------------------------------

    @classmethod
    async def open(cls, state_dir: str | Path, *, migrations: Sequence[Migration] = MIGRATIONS,
                   **kwargs: Any) -> Store:
        """The store of ``state_dir`` (made if missing, mode 0711 as the sandbox factory makes it), its file
        created or upgraded to the last of ``migrations``. Raises :class:`StoreError` for a file another
        gateway holds, one from a newer kernelhub, and one SQLite cannot open. ``kwargs``: the history
        bounds (:class:`Store`)."""
        state = Path(state_dir)
        try:
            state.mkdir(mode=0o711, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot make the state directory {state}: {exc.strerror or exc}.") from None
        store = cls(state / DB_NAME, **kwargs)
        store._take_lock()
        store._thread = threading.Thread(target=store._run, name="kernelhub-store", daemon=True)
        store._thread.start()
        try:
            await store.submit(lambda _conn: store._open_in_worker(migrations), transaction=False)
        except BaseException:
            await store.close()
            raise
        store._checkpointer = threading.Thread(target=store._checkpoint_loop, name="kernelhub-store-checkpoint",
                                               daemon=True)
        store._checkpointer.start()
        return store

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"Another kernelhub gateway is using {self.path}; give each gateway its own "
                             "--state-dir.") from None
        self._lock_fd = fd

    def _open_in_worker(self, migrations: Sequence[Migration]) -> None:
        try:
            conn = connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"Cannot open the database {self.path}: {exc}.") from None
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpointer's job (module docstring)
            migrate(conn, migrations, where=str(self.path))
        except BaseException as exc:
            conn.close()  # a refused file is left as it was: no checkpoint
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"Cannot open the database {self.path}: {exc}.") from None
            raise
        self._conn = conn

    async def close(self) -> None:
        """Finish what is queued, checkpoint the WAL into the database, close the file and release the lock.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._checkpointer is not None:
            self._checkpointer_stop = True
            self._checkpoint_wanted.set()
            await loop.run_in_executor(None, self._checkpointer.join)
        if self._thread is not None:
            self._push()
            self._queue.put([_STOP])
            await loop.run_in_executor(None, self._thread.join)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the queue ------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[[sqlite3.Connection], T], *, transaction: bool = True) -> asyncio.Future[T]:
        """Queue ``fn(conn)`` for the worker; the future answers its result or raises what it raised (an
        :class:`sqlite3.Error` as :class:`StoreError`). ``fn`` runs inside the batch's transaction, in a
        savepoint of its own (``transaction=False``: outside any, for work that manages its own). For the
        modules of this package that keep tables in this file; must be called from the event loop."""
        self._check_open()
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(fn, future, alone=not transaction))
        self._push()  # someone waits: hand it over now
        return future

    def post(self, fn: Op) -> None:
        """Queue ``fn(conn)`` without waiting for it; a failure is logged. Ordered like :meth:`submit`."""
        self._enqueue(_Item(fn))

    def _enqueue(self, item: _Item) -> None:
        """Queue an item nobody waits for: handed to the worker with the next :meth:`submit` or at the end of
        this loop iteration, whichever comes first."""
        self._check_open()
        self._pending.append(item)
        if not self._push_scheduled:
            self._push_scheduled = True
            asyncio.get_running_loop().call_soon(self._push)

    def _push(self) -> None:
        self._push_scheduled = False
        if self._pending:
            items, self._pending = self._pending, []
            self._queue.put(items)

    def flush(self) -> asyncio.Future[None]:
        """Wait until everything queued before this call is committed."""
        return self.submit(lambda _conn: None)

    def add_batch_listener(self, listener: BatchListener) -> None:
        """Have ``listener`` told about every batch from now on (see :class:`BatchListener`)."""
        self._listeners.append(listener)

    def note_deleted(self) -> None:
        """Called by an operation (on the worker) that deleted rows: once the batch committed, the freed pages
        are given back to the file system."""
        self._freed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (every method then raises :class:`StoreError`)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("The store is closed.")

    def _run(self) -> None:
        """The worker thread: take what is queued, run it as one transaction, resolve its futures."""
        while True:
            batch = list(self._queue.get())
            while len(batch) < MAX_BATCH:
                try:
                    batch.extend(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            batch = [item for item in batch if item is not _STOP]
            try:
                # Work that must run outside a transaction (opening, migrating) runs alone, in order.
                start = 0
                for i, item in enumerate(batch):
                    if item.alone:
                        self._run_batch(batch[start:i])
                        self._run_alone(item)
                        start = i + 1
                self._run_batch(batch[start:])
            except Exception as exc:  # a bug here must not stop the one writer: its waiters hear of it
                log.exception("the store's writer failed")
                # (A future an earlier step already answered keeps that answer: see _set_results.)
                self._resolve([(item, (False, StoreError(f"The store failed: {exc}."))) for item in batch])
            if stop:
                self._shutdown_worker()
                return

    def _run_alone(self, item: _Item) -> None:
        assert item.fn is not None
        try:
            result: tuple[bool, Any] = (True, item.fn(self._conn))  # type: ignore[arg-type]
        except BaseException as exc:
            result = (False, exc)
        self._resolve([(item, result)])

    def _merge_streams(self, batch: list[_Item]) -> list[_Item]:
        out: list[_Item] = []
        for item in batch:
            prev = out[-1] if out else None
            if (item.stream is not None and prev is not None and prev.stream is not None
                    and prev.future is None and item.future is None
                    and prev.stream[:2] == item.stream[:2]):
                ex_id, name, text = prev.stream
                merged = text + item.stream[2]
                out[-1] = _Item(None, None, (ex_id, name, merged))
                self.stats.merged += 1
            else:
                out.append(item)
        return out

    def _run_batch(self, batch: list[_Item]) -> None:
        if not batch:
            return
        conn = self._conn
        if conn is None:  # the open failed: nothing can run
            self._resolve([(item, (False, StoreError("The store is not open."))) for item in batch])
            return
        batch = self._merge_streams(batch)
        results: list[tuple[_Item, tuple[bool, Any]]] = []
        self._freed = False
        try:
            # IMMEDIATE: the write lock is taken (or waited for, e.g. behind a TRUNCATE checkpoint) before
            # anything is read; a deferred transaction whose snapshot a checkpoint restarted would fail at once.
            conn.execute("BEGIN IMMEDIATE")
            for item in batch:
                conn.execute("SAVEPOINT op")
                try:
                    if item.fn is not None:
                        value = item.fn(conn)
                    else:  # a stream chunk (made into an operation here, off the loop)
                        assert item.stream is not None
                        value = self._append(conn, *item.stream, stream=True)
                except BaseException as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    self._usage.clear()  # the op may have counted what its rollback undid
                    results.append((item, (False, exc)))
                else:
                    conn.execute("RELEASE op")
                    results.append((item, (True, value)))
            for listener in self._listeners:
                listener.before_commit(conn)
            conn.execute("COMMIT")
        except Exception as exc:
            # SQLite failed (disk full, I/O error, a lock held past the timeout) or a listener raised: nothing of
            # the batch is kept, and every waiter hears so.
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._usage.clear()
            for listener in self._listeners:
                try:
                    listener.rolled_back(conn)
                except Exception:
                    log.exception("a store listener failed after a rollback")
            failure = StoreError(f"The store could not commit: {exc}.")
            log.error("a store batch of %d operations was rolled back: %s", len(batch), exc)
            results = [(item, (False, failure)) for item in batch]
        else:
            self._commits_since_checkpoint += 1
            if self._commits_since_checkpoint >= CHECKPOINT_COMMITS:
                self._checkpoint_wanted.set()
            if self._wal_size() > 2 * WAL_MAX_BYTES:
                self._checkpoint(conn, "TRUNCATE")
            # The waiters go on first: what follows (the audit mirror's write, a vacuum) is not theirs to wait for.
            self._resolve(results)
            results = []
            for listener in self._listeners:
                try:
                    listener.committed(conn)
                except Exception:
                    log.exception("a store listener failed after a commit")
            if self._freed:
                self._vacuum(conn)
        self.stats.ops += len(batch)
        self.stats.batches += 1
        self._resolve(results)

    @staticmethod
    def _vacuum(conn: sqlite3.Connection) -> None:
        """Give the pages of deleted rows back to the file system (``auto_vacuum = INCREMENTAL``), in a
        transaction of its own. The pragma frees one page per step and ``execute`` steps a statement without
        result columns once; ``executescript`` steps it to the end (it would commit an open transaction first,
        hence after the batch's commit)."""
        try:
            conn.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            log.warning("could not give freed pages back to the file system: %s", exc)

    def _resolve(self, results: list[tuple[_Item, tuple[bool, Any]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], tuple[bool, Any]]]] = {}
        for item, (ok, value) in results:
            if not ok and isinstance(value, sqlite3.Error):
                value = StoreError(f"The store failed: {value}.")
            if item.future is None:
                if not ok:
                    log.error("a queued store operation failed: %s", value)
                continue
            by_loop.setdefault(item.future.get_loop(), []).append((item.future, (ok, value)))
        for loop, pairs in by_loop.items():
            # One wake-up of each loop per batch, however many futures it resolves.
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_set_results, pairs)

    def _checkpoint_loop(self) -> None:
        """The checkpointer thread: copy the WAL into the database (and ``fsync`` both) when there were commits,
        every :data:`CHECKPOINT_INTERVAL_S` or sooner when the worker asks; ``PASSIVE`` (the writer carries on)
        unless the WAL outgrew :data:`WAL_MAX_BYTES`."""
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            log.error("the store's checkpointer cannot open %s: %s", self.path, exc)
            return
        try:
            while True:
                self._checkpoint_wanted.wait(CHECKPOINT_INTERVAL_S)
                self._checkpoint_wanted.clear()
                if self._checkpointer_stop:
                    return
                if self._commits_since_checkpoint == 0:
                    continue
                self._commits_since_checkpoint = 0
                self._checkpoint(conn, "TRUNCATE" if self._wal_size() > WAL_MAX_BYTES else "PASSIVE")
        finally:
            conn.close()

    def _wal_size(self) -> int:
        try:
            return self._wal_path.stat().st_size
        except OSError:
            return 0

    def _checkpoint(self, conn: sqlite3.Connection, mode: str) -> None:
        with self._checkpoint_lock:
            try:
                conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            except sqlite3.Error as exc:
                log.warning("could not checkpoint %s: %s", self.path, exc)

    def _shutdown_worker(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    # -- sandboxes ----------------------------------------------------------------------------------------

    def put_sandbox(self, sandbox: SandboxRow) -> asyncio.Future[None]:
        """Insert or replace the sandbox ``sandbox.id`` (its sessions and executions stay)."""
        values = (
            sandbox.id, sandbox.tenant, sandbox.template, _json(sandbox.limits), _json(sandbox.network),
            _json(sandbox.metadata), _json(sandbox.env), sandbox.state, sandbox.reason, sandbox.created_at,
            sandbox.expires_at, sandbox.last_activity if sandbox.last_activity is not None else sandbox.created_at,
            sandbox.restored_at, sandbox.paused_at, sandbox.on_idle, int(sandbox.jupyter_api), sandbox.uid,
            sandbox.sandbox_dir, sandbox.workspace_mode, time.time(),
        )

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO sandboxes (id, tenant, template, limits, network, metadata, env, state, reason, "
                "created_at, expires_at, last_activity, restored_at, paused_at, on_idle, jupyter_api, uid, "
                "sandbox_dir, workspace_mode, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, template = excluded.template, "
                "limits = excluded.limits, network = excluded.network, metadata = excluded.metadata, "
                "env = excluded.env, state = excluded.state, reason = excluded.reason, "
                "created_at = excluded.created_at, expires_at = excluded.expires_at, "
                "last_activity = excluded.last_activity, restored_at = excluded.restored_at, "
                "paused_at = excluded.paused_at, on_idle = excluded.on_idle, jupyter_api = excluded.jupyter_api, "
                "uid = excluded.uid, sandbox_dir = excluded.sandbox_dir, "
                "workspace_mode = excluded.workspace_mode, updated_at = excluded.updated_at",
                values)

        return self.submit(op)

    def update_sandbox(self, sandbox_id: str, **fields: Any) -> asyncio.Future[None]:
        """Change some fields of a stored sandbox: ``state``, ``reason``, ``last_activity``, ``restored_at``,
        ``paused_at``, ``on_idle``, ``expires_at``, ``network``, ``metadata``, ``uid``, ``sandbox_dir``,
        ``workspace_mode``, ``jupyter_api``. Raises :class:`ValueError` for another name and
        :class:`~kernelhub.errors.NotFound` for an unknown id."""
        return self._update("sandbox", sandbox_id, fields, _SANDBOX_UPDATES)

    def _update(self, kind: str, row_id: str, fields: Mapping[str, Any],
                allowed: Mapping[str, Callable[[Any], Any]]) -> asyncio.Future[None]:
        """``UPDATE`` the ``allowed`` ``fields`` (each stored as its converter makes it) of the row ``row_id`` of
        the table of ``kind`` (sandbox or session)."""
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(f"cannot update {kind} field {unknown[0]!r}")
        if not fields:
            return self.flush()
        names = sorted(fields)
        values: list[Any] = [allowed[n](fields[n]) for n in names]
        if kind == "sandbox":
            names.append("updated_at")
            values.append(time.time())
        table = "sandboxes" if kind == "sandbox" else "sessions"
        sql = f"UPDATE {table} SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?"

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, (*values, row_id)).rowcount == 0:
                raise NotFound(f"No {kind} {row_id!r}.")

        return self.submit(op)

    def get_sandbox(self, sandbox_id: str, tenant: str | None = None) -> asyncio.Future[SandboxRow]:
        """The stored sandbox ``sandbox_id``; with ``tenant``, only if it is that tenant's. Raises
        :class:`~kernelhub.errors.NotFound` otherwise (the same for an unknown id and another tenant's)."""

        def op(conn: sqlite3.Connection) -> SandboxRow:
            row = conn.execute("SELECT * FROM sandboxes WHERE id = ?", (sandbox_id,)).fetchone()
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise NotFound(f"No sandbox {sandbox_id[:64]!r}.")
            return SandboxRow._from_db(row)

        return self.submit(op)

    def list_sandboxes(self, tenant: str | None = None, states: Iterable[str] | None = None, *,
                       on_bad: Callable[[str, Exception], None] | None = None) -> asyncio.Future[list[SandboxRow]]:
        """Stored sandboxes, oldest first: of ``tenant`` (every tenant's when None), in one of ``states`` (any
        state when None). A row that cannot be read (a field that is not the JSON it must be: damaged by hand or
        on disk) raises, or with ``on_bad`` is left out and told to it (its id and the error; called on the
        store's thread)."""
        clauses, args = [], []
        if tenant is not None:
            clauses.append("tenant = ?")
            args.append(tenant)
        if states is not None:
            wanted = list(states)
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            args.extend(wanted)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT * FROM sandboxes{where} ORDER BY created_at, id"

        def op(conn: sqlite3.Connection) -> list[SandboxRow]:
            out = []
            for r in conn.execute(sql, args):
                try:
                    out.append(SandboxRow._from_db(r))
                except (ValueError, TypeError) as exc:
                    if on_bad is None:
                        raise StoreError(f"The stored sandbox {str(r['id'])[:64]!r} cannot be read: {exc}.") from None
                    on_bad(str(r["id"]), exc)
            return out

        return self.submit(op)

    def delete_sandbox(self, sandbox_id: str) -> asyncio.Future[bool]:
        """Forget the sandbox with its sessions, executions and their outputs; False if it was not stored."""

        def op(conn: sqlite3.Connection) -> bool:
            deleted = conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,)).rowcount > 0
            if deleted:
                self._usage.clear()
                self._freed = True
            return deleted

        return self.submit(op)

    # -- sessions -----------------------------------------------------------------------------------------

    def put_session(self, session: SessionRow) -> asyncio.Future[None]:
        """Insert or replace a session. Raises :class:`StoreError` if its sandbox is not stored."""
        values = (session.id, session.sandbox_id, session.type, session.language, session.state,
                  session.kernel_id, session.created_at)
        return self.submit(lambda conn: _run(conn,
            "INSERT OR REPLACE INTO sessions (id, sandbox_id, type, language, state, kernel_id, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", values))

    def update_session(self, session_id: str, **fields: Any) -> asyncio.Future[None]:
        """Change ``state``, ``kernel_id`` or ``language`` of a stored session. Raises :class:`ValueError` for
        another name and :class:`~kernelhub.errors.NotFound` for an unknown id."""
        return self._update("session", session_id, fields, _SESSION_UPDATES)

    def delete_session(self, session_id: str) -> asyncio.Future[bool]:
        """Forget a closed session; False if it was not stored. Its executions stay."""
        return self.submit(
            lambda conn: conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0)

    def list_sessions(self, sandbox_id: str) -> asyncio.Future[list[SessionRow]]:
        """The stored sessions of a sandbox, oldest first."""

        def op(conn: sqlite3.Connection) -> list[SessionRow]:
            rows = conn.execute("SELECT * FROM sessions WHERE sandbox_id = ? ORDER BY created_at, rowid",
                                (sandbox_id,))
            return [SessionRow(r["id"], r["sandbox_id"], r["type"], r["language"], r["state"], r["kernel_id"],
                               r["created_at"]) for r in rows]

        return self.submit(op)

    # -- executions ---------------------------------------------------------------------------------------

    def start_execution(self, *, id: str, tenant: str, sandbox_id: str, session_id: str, code: str,
                        output_limit: int, timeout_s: float | None = None, status: str = "queued",
                        created_at: float | None = None) -> asyncio.Future[None]:
        """Store a new execution (``queued`` unless said otherwise) of ``code`` (kept as its SHA-256 and size
        only). ``output_limit`` is the cap in bytes on what :meth:`append_output` stores for it
        (``limits.output_bytes``). Raises :class:`StoreError` if the sandbox is not stored or the id is taken.
        Awaiting it before the id is announced makes the id survive a crash."""
        sha, size = code_digest(code)
        values = (id, tenant, sandbox_id, session_id, status, time.time() if created_at is None else created_at,
                  timeout_s, sha, size, int(output_limit))
        return self.submit(lambda conn: _run(conn,
            "INSERT INTO executions (id, tenant, sandbox_id, session_id, status, created_at, timeout_s, "
            "code_sha256, code_bytes, output_limit) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values))

    def update_execution(self, execution_id: str, *, status: str | None = None, started_at: float | None = None,
                         execution_count: int | None = None) -> None:
        """Queue a change of an unfinished execution: ``status`` (``running``), ``started_at`` (Unix
        seconds), ``execution_count``; fields left None stay. Not awaited: ordered before what follows."""
        names = [n for n, v in (("status", status), ("started_at", started_at),
                                ("execution_count", execution_count)) if v is not None]
        if not names:
            return
        values = [v for v in (status, started_at, execution_count) if v is not None]
        sql = f"UPDATE executions SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ? AND finished_at IS NULL"
        self.post(lambda conn: conn.execute(sql, (*values, execution_id)))

    def append_output(self, execution_id: str, event: Mapping[str, Any]) -> None:
        """Queue one output event of a running execution, in the API's event shapes: ``{"type": "stdout" |
        "stderr", "text"}``, ``{"type": "result", "is_main_result", "data", "metadata"?, "display_id"?}``,
        ``{"type": "update", "display_id", "data", "metadata"?}`` or ``{"type": "error", "name", "value",
        "traceback"}`` (the last replaces the execution's error). Not awaited (the hot path); ordered before
        the execution's finish. Past ``output_limit`` the event is dropped or cut (module docstring); events
        for an unknown or finished execution are dropped. Raises :class:`ValueError` for another ``type``."""
        kind = event.get("type")
        if kind in ("stdout", "stderr"):
            text = utf8_text(str(event.get("text", "")))
            self._enqueue(_Item(None, None, (execution_id, str(kind), text)))
        elif kind in ("result", "update"):
            body: dict[str, Any] = {"data": event.get("data") or {}}
            if kind == "result":
                body["is_main_result"] = bool(event.get("is_main_result"))
            if event.get("metadata"):
                body["metadata"] = event["metadata"]
            if event.get("display_id") is not None:
                body["display_id"] = str(event["display_id"])
            elif kind == "update":
                return  # an update names the display it replaces, or it is nothing
            self.post(self._body_op(execution_id, str(kind), utf8_text(_json(body))))
        elif kind == "error":
            error = {
                "name": utf8_text(str(event.get("name", "")))[:MAX_ERROR_FIELD_CHARS],
                "value": utf8_text(str(event.get("value", "")))[:MAX_ERROR_FIELD_CHARS],
                "traceback": [utf8_text(str(line))[:MAX_ERROR_FIELD_CHARS]
                              for line in list(event.get("traceback") or [])[:MAX_TRACEBACK_LINES]],
            }
            text = _json(error)
            self.post(lambda conn: conn.execute(
                "UPDATE executions SET error = ? WHERE id = ? AND finished_at IS NULL", (text, execution_id)))
        else:
            raise ValueError(f"not an output event type: {kind!r}")

    def _body_op(self, execution_id: str, kind: str, body: str) -> Op:
        def op(conn: sqlite3.Connection) -> None:
            self._append(conn, execution_id, kind, body, stream=False)
        return op

    @staticmethod
    def _append(conn: sqlite3.Connection, execution_id: str, kind: str, body: str, *, stream: bool) -> None:
        row = conn.execute("SELECT output_bytes, output_limit, output_seq, truncated, reason FROM executions "
                           "WHERE id = ? AND finished_at IS NULL", (execution_id,)).fetchone()
        if row is None:
            return
        used, limit, seq, truncated, reason = row
        data = body.encode("utf-8")
        room = limit - used
        if len(data) > room:
            if not truncated:
                conn.execute("UPDATE executions SET truncated = 1, reason = coalesce(reason, 'output_truncated') "
                             "WHERE id = ?", (execution_id,))
            if not stream or room <= 0:
                return
            # A stream chunk keeps what fits, cut at a character boundary.
            body = data[:room].decode("utf-8", errors="ignore")
            data = body.encode("utf-8")
            if not data:
                return
        conn.execute("UPDATE executions SET output_bytes = ?, output_seq = ? WHERE id = ?",
                     (used + len(data), seq + 1, execution_id))
        conn.execute("INSERT INTO outputs (execution_id, seq, kind, body) VALUES (?, ?, ?, ?)",
                     (execution_id, seq + 1, kind, body))

    def finish_execution(self, execution_id: str, status: str, reason: str | None = None,
                         finished_at: float | None = None,
                         execution_count: int | None = None) -> asyncio.Future[None]:
        """End an execution with ``status`` (``ok``, ``error``, ``timeout``, ``killed``) and ``reason`` (kept
        only if it had none, as in :meth:`Execution.finish`), after every output queued before. Finishing an
        ended execution changes nothing. Then prunes the tenant's history past its bounds. Raises
        :class:`ValueError` for another status, :class:`~kernelhub.errors.NotFound` for an unknown id."""
        if status not in ENDED:
            raise ValueError(f"not a final status: {status!r}")
        now = time.time() if finished_at is None else finished_at

        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT tenant, finished_at FROM executions WHERE id = ?", (execution_id,)).fetchone()
            if row is None:
                raise NotFound(f"No execution {execution_id!r}.")
            if row["finished_at"] is not None:
                return
            conn.execute(
                "UPDATE executions SET status = ?, reason = coalesce(reason, ?), finished_at = ?, "
                "started_at = coalesce(started_at, ?), execution_count = coalesce(?, execution_count) "
                "WHERE id = ?", (status, reason, now, now, execution_count, execution_id))
            self._count_finished(conn, row["tenant"], execution_id)

        return self.submit(op)

    def _count_finished(self, conn: sqlite3.Connection, tenant: str, execution_id: str) -> None:
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._usage[tenant] = self._tenant_usage(conn, tenant)
        else:
            size = conn.execute("SELECT output_bytes FROM executions WHERE id = ?", (execution_id,)).fetchone()[0]
            usage[0] += 1
            usage[1] += size
        if usage[0] > self.history_count or usage[1] > self.history_bytes:
            self._prune_tenant(conn, tenant)

    @staticmethod
    def _tenant_usage(conn: sqlite3.Connection, tenant: str) -> list[int]:
        count, size = conn.execute(
            "SELECT count(*), coalesce(sum(output_bytes), 0) FROM executions "
            "WHERE tenant = ? AND finished_at IS NOT NULL", (tenant,)).fetchone()
        return [count, size]

    def _prune_tenant(self, conn: sqlite3.Connection, tenant: str) -> int:
        """Delete the tenant's oldest finished executions until it is within both bounds."""
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._usage[tenant] = self._tenant_usage(conn, tenant)
        doomed: list[str] = []
        if usage[0] > self.history_count or usage[1] > self.history_bytes:
            # Oldest first through the (tenant, finished_at) index; the cursor stops as soon as both hold.
            rows = conn.execute("SELECT id, output_bytes FROM executions WHERE tenant = ? AND finished_at IS NOT "
                                "NULL ORDER BY finished_at", (tenant,))
            for ex_id, ex_bytes in rows:
                if usage[0] <= self.history_count and usage[1] <= self.history_bytes:
                    break
                doomed.append(ex_id)
                usage[0] -= 1
                usage[1] -= ex_bytes
            rows.close()
        if doomed:
            conn.executemany("DELETE FROM executions WHERE id = ?", [(d,) for d in doomed])
            self._freed = True
        return len(doomed)

    def prune(self, tenant: str | None = None) -> asyncio.Future[int]:
        """Delete finished executions past the history bounds, of ``tenant`` or of every tenant; answers how
        many went. (Finishing an execution already prunes its tenant; this is for bounds lowered by a new
        configuration.)"""

        def op(conn: sqlite3.Connection) -> int:
            tenants = [tenant] if tenant is not None else \
                [r[0] for r in conn.execute("SELECT DISTINCT tenant FROM executions")]
            return sum(self._prune_tenant(conn, t) for t in tenants)

        return self.submit(op)

    def history_usage(self, tenant: str) -> asyncio.Future[tuple[int, int]]:
        """``(finished executions, bytes of their outputs)`` the store keeps for ``tenant``."""
        return self.submit(lambda conn: (lambda u: (u[0], u[1]))(self._tenant_usage(conn, tenant)))

    def mark_cut_executions(self, reason: str = "gateway_restart",
                            finished_at: float | None = None) -> asyncio.Future[list[str]]:
        """For the restart path: end every execution still ``queued`` or ``running`` (the gateway died under
        them) as ``killed`` with ``reason`` (which replaces any earlier reason: this is why it ended). Answers
        their ids. Call once at start-up, before anything runs."""
        now = time.time() if finished_at is None else finished_at

        def op(conn: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM executions WHERE finished_at IS NULL ORDER BY created_at, id")]
            conn.execute("UPDATE executions SET status = 'killed', reason = ?, finished_at = ?, "
                         "started_at = coalesce(started_at, ?) WHERE finished_at IS NULL", (reason, now, now))
            self._usage.clear()
            for tenant in {r[0] for r in conn.execute("SELECT DISTINCT tenant FROM executions")}:
                self._prune_tenant(conn, tenant)
            return ids

        return self.submit(op)

    def get_execution(self, tenant: str, execution_id: str) -> asyncio.Future[dict[str, Any]]:
        """``execution_status`` from the store: the tenant's execution in the API's shape (API.md,
        ``execution``), outputs reassembled (module docstring). Raises :class:`~kernelhub.errors.NotFound`
        for an unknown id, a pruned one and another tenant's."""

        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            row = conn.execute("SELECT * FROM executions WHERE id = ?", (execution_id,)).fetchone()
            if row is None or row["tenant"] != tenant:
                raise NotFound(f"No execution {execution_id[:64]!r}.")
            outputs = conn.execute("SELECT kind, body FROM outputs WHERE execution_id = ? ORDER BY seq",
                                   (execution_id,)).fetchall()
            return _execution_shape(row, outputs)

        return self.submit(op)

    def execution_ids(self, sandbox_id: str) -> asyncio.Future[list[str]]:
        """The ids of a sandbox's stored executions, oldest first."""
        return self.submit(lambda conn: [r[0] for r in conn.execute(
            "SELECT id FROM executions WHERE sandbox_id = ? ORDER BY created_at, id", (sandbox_id,))])


def _run(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> None:
    conn.execute(sql, args)


def _set_results(pairs: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for future, (ok, value) in pairs:
        if future.done():  # cancelled by its waiter
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _execution_shape(row: sqlite3.Row, outputs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The API's execution from its row and its outputs in order (display updates applied)."""
    stdout: list[str] = []
    stderr: list[str] = []
    results: list[dict[str, Any]] = []
    for kind, body in outputs:
        if kind == "stdout":
            stdout.append(body)
        elif kind == "stderr":
            stderr.append(body)
        elif kind == "result":
            results.append(json.loads(body))
        elif kind == "update":
            update = json.loads(body)
            for result in results:
                if result.get("display_id") == update["display_id"]:
                    result["data"] = update["data"]
                    if "metadata" in update:
                        result["metadata"] = update["metadata"]
    started, finished = row["started_at"], row["finished_at"]
    duration = None
    if started is not None:
        duration = int(((finished if finished is not None else time.time()) - started) * 1000)
    return {
        "id": row["id"],
        "sandbox_id": row["sandbox_id"],
        "session_id": row["session_id"],
        "status": row["status"],
        "execution_count": row["execution_count"],
        "stdout": "".join(stdout),
        "stderr": "".join(stderr),
        "results": results,
        "error": json.loads(row["error"]) if row["error"] else None,
        "reason": row["reason"],
        "truncated": bool(row["truncated"]),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_ms": duration,
    }
