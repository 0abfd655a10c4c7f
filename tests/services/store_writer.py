"""A store writer for the SIGKILL test (tests/services/test_store.py): writes executions and audit entries as
fast as it can, forever, printing ``started ID`` once an execution is committed and ``done ID SEQ`` once it
finished and its audit entry (sequence number SEQ) is committed. Usage: ``store_writer.py STATE_DIR PREFIX``."""

from __future__ import annotations

import asyncio
import sys
import time

from kernelhub.errors import NotFound
from kernelhub.services.audit import AuditLog
from kernelhub.services.store import SandboxRow, Store


async def main(state_dir: str, prefix: str) -> None:
    store = await Store.open(state_dir)
    audit = await AuditLog.open(store, state_dir)
    try:
        await store.get_sandbox("sb1")
    except NotFound:
        now = time.time()
        await store.put_sandbox(SandboxRow("sb1", "alice", "python", {}, now, now + 3600, state="running"))
    n = 0
    while True:
        ex_id = f"{prefix}-{n}"
        await store.start_execution(id=ex_id, tenant="alice", sandbox_id="sb1", session_id="se1",
                                    code=f"print({n})", output_limit=1_000_000)
        print("started", ex_id, flush=True)
        store.update_execution(ex_id, status="running", started_at=time.time())
        for j in range(5):
            store.append_output(ex_id, {"type": "stdout", "text": f"{ex_id} line {j}\n"})
        store.append_output(ex_id, {"type": "result", "is_main_result": True, "data": {"text/plain": ex_id}})
        await store.finish_execution(ex_id, "ok")
        entry = await audit.record("alice", "k_writer", "code_execute",
                                   {"sandbox_id": "sb1", "execution_id": ex_id}, 200, code=f"print({n})")
        print("done", ex_id, entry["seq"], flush=True)
        n += 1


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
