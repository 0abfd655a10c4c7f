"""JupyterSession (kernelhub/services/sessions.py) with real kernels in real sandboxes, through the hub: how an
execution ends, in every language.

- Every output reaches every listener, and the stored execution, before ``end``, whatever the order in which
  iopub and shell messages come and wherever an interrupt lands.
- No cell is dropped because a kernel refused it in its abort window (tslab after an error, timeout or
  interrupt); an ``error`` always has a name and a message, JavaScript errors included.
- Display updates replace their output, in the same execution or a later one.
- An interrupt the kernel ignores escalates to a restart; output past the cap stops the execution at once.
- A flood of output does not stay in the kernel's memory.

Plus the pieces underneath, on their own: sending on a zmq.asyncio socket without starving its reader, and the
error objects made from what each kernel sends.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.executions import Execution
from kernelhub.services.hub import Hub
from kernelhub.services.sessions import INTERRUPT_GRACE_S, error_object, send_message
from kernelhub.services.tenants import Tenant

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

ALICE = Tenant("alice")
#: A top-level await ipykernel does not stop on SIGINT (KERNELS.md). "napping" is printed by a callback while the
#: cell awaits (not flushed, so the print is long over when it arrives): once it is seen, a signal lands there.
NAP = ("import asyncio\nasyncio.get_running_loop().call_later(0.1, print, 'napping')\n"
       "await asyncio.sleep(60)")
MiB = 1024 * 1024
LANGUAGES = ("python", "node", "typescript", "bash")


# -- sending on an asyncio socket ------------------------------------------------------------------------------

def test_send_message_does_not_starve_a_recv_waiting_on_the_same_socket() -> None:
    """A reply comes in while the socket's reader waits, and before the event loop has seen it a request goes
    out on the same socket. jupyter_client's Session.send writes through a synchronous shadow of the socket,
    which takes the edge-triggered wake-up and leaves the reader waiting for ever (the Jupyter API's first-cell
    loss); send_message goes through the asyncio socket, which looks again."""

    async def reply_arrives_then_send(send: Any) -> bool:
        ctx = zmq.asyncio.Context()
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        try:
            router.bind("inproc://kh-starve")
            dealer.connect("inproc://kh-starve")
            await dealer.send_multipart([b"hello"])
            ident, _ = await router.recv_multipart()
            reader = asyncio.ensure_future(dealer.recv_multipart())
            await asyncio.sleep(0)  # the reader waits on the socket's fd
            await router.send_multipart([ident, b"reply"])
            # Without yielding to the loop: wait until the reply's wake-up is on the dealer's fd, then send.
            assert select.select([dealer.FD], [], [], 10)[0], "the reply never reached the dealer"
            # libzmq reads a socket's pending commands on send only when about a millisecond has passed since it
            # last did (its command throttle); in the gateway that is the usual case.
            time.sleep(0.01)  # noqa: ASYNC251 - on purpose: the event loop must not run here
            send(dealer, Session(key=b"k").msg("kernel_info_request", {}))
            try:
                await asyncio.wait_for(asyncio.shield(reader), 1.0)
                return True
            except TimeoutError:
                dealer.get(zmq.EVENTS)  # wake it, so that it can be closed cleanly
                await reader
                return False
        finally:
            router.close(linger=0)
            dealer.close(linger=0)
            ctx.term()

    session = Session(key=b"k")
    assert asyncio.run(reply_arrives_then_send(lambda sock, msg: send_message(session, sock, msg)))
    # The same steps with jupyter_client's own send do starve the reader: the test reproduces the fault.
    assert not asyncio.run(reply_arrives_then_send(lambda sock, msg: session.send(sock, msg)))


# -- error objects -----------------------------------------------------------------------------------------

NODE_ERROR = ("evalmachine.<anonymous>:2\nthrow new TypeError('bad thing');\n^\n\nTypeError: bad thing\n"
              "    at evalmachine.<anonymous>:2:7\n    at Script.runInThisContext (node:vm:135:14)\n")


@pytest.mark.parametrize("language, content, stderr, last, expected", [
    ("python", {"ename": "ValueError", "evalue": "x", "traceback": ["tb"]}, "", "", ("ValueError", "x", ["tb"])),
    ("python", {"ename": "ValueError", "evalue": ""}, "", "", ("ValueError", "ValueError (no message).", [])),
    ("python", {"ename": "KeyboardInterrupt"}, "", "", ("KeyboardInterrupt", "The execution was interrupted.", [])),
    ("bash", {"ename": "", "evalue": "2"}, "", "", ("BashError", "The last command exited with status 2.", [])),
    ("node", {"status": "error"}, NODE_ERROR, NODE_ERROR, ("TypeError", "bad thing", NODE_ERROR.splitlines())),
    ("typescript", {"status": "error"}, "x\nError: multi\nline\n    at f\n", "Error: multi\nline\n    at f\n",
     ("Error", "multi\nline", ["Error: multi", "line", "    at f"])),
    ("node", {"status": "error"}, "Error\n    at f\n", "Error\n    at f\n", ("Error", "Error (no message).",
                                                                            ["Error", "    at f"])),
    ("node", {"status": "error"}, "{ a: 1 }\n", "{ a: 1 }\n", ("Error", "{ a: 1 }", ["{ a: 1 }"])),
    ("typescript", {"status": "error"}, "1:5 - Type 'string' is not assignable.\n1:9 - Cannot find name 'q'.\n",
     "1:9 - Cannot find name 'q'.\n", ("CompileError", "Type 'string' is not assignable.\nCannot find name 'q'.",
                                      ["1:5 - Type 'string' is not assignable.", "1:9 - Cannot find name 'q'."])),
    ("node", {"status": "error"}, "", "", ("Error", "Error (no message).", [])),
])
def test_error_objects_always_have_a_name_and_a_message(language: str, content: dict[str, Any], stderr: str,
                                                        last: str, expected: tuple[str, str, list[str]]) -> None:
    error = error_object(language, content, stderr, last)
    assert (error["name"], error["value"], error["traceback"]) == expected


# -- real kernels --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(runner: asyncio.Runner, state_dir: Path) -> Iterator[Hub]:
    made = Hub(SandboxFactory(state_dir=str(state_dir)))
    runner.run(made.start())
    yield made
    runner.run(made.shutdown())


@pytest.fixture(scope="module")
def sessions(hub: Hub, runner: asyncio.Runner) -> dict[str, tuple[str, str]]:
    """language -> (sandbox id, session id): python and bash share a sandbox, node and typescript another."""

    async def make() -> dict[str, tuple[str, str]]:
        py = await hub.create_sandbox(ALICE, "python")
        node = await hub.create_sandbox(ALICE, "node")
        bash = await hub.create_session(ALICE, py.id, "jupyter", "bash")
        ts = await hub.create_session(ALICE, node.id, "jupyter", "typescript")
        return {"python": (py.id, next(iter(py.sessions))), "node": (node.id, next(iter(node.sessions))),
                "bash": (py.id, bash.id), "typescript": (node.id, ts.id)}

    return runner.run(make())


class Recorder:
    """An execution listener; ``first_output`` fires on the first stdout/stderr event."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.first_output = asyncio.Event()

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        if event["type"] in ("stdout", "stderr"):
            self.first_output.set()


async def execute(hub: Hub, where: tuple[str, str], code: str, **kwargs: Any) -> Execution:
    return await hub.execute(ALICE, where[0], code, session_id=where[1], **kwargs)


def assert_consistent(ex: Execution, *recorders: Recorder) -> dict[str, Any]:
    """Every listener got the same events; start first, one end last, after every output; the end and the
    stored execution agree with the events. Answers the ended execution."""
    first = recorders[0].events
    for rec in recorders[1:]:
        assert rec.events == first
    kinds = [e["type"] for e in first]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 1, kinds
    end = first[-1]["execution"]
    assert end == ex.to_dict()
    assert "".join(e["text"] for e in first if e["type"] == "stdout") == end["stdout"]
    assert "".join(e["text"] for e in first if e["type"] == "stderr") == end["stderr"]
    # The results, replayed from the events: each update replaces the data of the results with its display_id.
    results: list[dict[str, Any]] = []
    for e in first:
        if e["type"] == "result":
            results.append({k: v for k, v in e.items() if k not in ("type", "execution_id")})
        elif e["type"] == "update":
            for r in results:
                if r.get("display_id") == e["display_id"]:
                    r["data"] = e["data"]
    assert [(r["data"], r.get("display_id")) for r in results] == \
        [(r["data"], r.get("display_id")) for r in end["results"]]
    if end["status"] == "error":
        errors = [e for e in first if e["type"] == "error"]
        assert errors, f"an error ended the execution but no error event came: {kinds}"
        assert {k: errors[-1][k] for k in ("name", "value", "traceback")} == end["error"]
        assert end["error"]["name"] and end["error"]["value"]
    return end


LOOPS = {
    "python": "import time\nfor i in range(1000):\n    print(i, flush=True)\n    time.sleep(0.05)",
    "node": "for (let i = 0; ; i++) { if (i % 20000000 === 0) console.log(i) }",
    "typescript": "for (let i: number = 0; ; i++) { if (i % 20000000 === 0) console.log(i) }",
    "bash": "for i in $(seq 1000); do echo $i; sleep 0.05; done",
}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("when", ["at_once", "after_output"])
def test_an_interrupt_ends_with_every_output_and_an_error_event(hub: Hub, sessions: dict[str, tuple[str, str]],
                                                                runner: asyncio.Runner, language: str,
                                                                when: str) -> None:
    """The interrupt lands wherever it lands (ipykernel's own code around the cell, the cell, tslab's
    transpiler): every round ends ``error``/``interrupted`` with an ``error`` event before the ``end``, the
    same for every listener and in the stored execution."""

    async def main() -> None:
        for _ in range(3):
            a, b = Recorder(), Recorder()
            ex = await execute(hub, sessions[language], LOOPS[language], listener=a, wait=False)
            ex.add_listener(b)
            if when == "at_once":
                await ex.wait_started()
            else:
                await asyncio.wait_for(a.first_output.wait(), 60)
            await hub.interrupt_execution(ALICE, ex.id)
            await asyncio.wait_for(ex.wait(), 60)
            end = assert_consistent(ex, a, b)
            assert (end["status"], end["reason"]) == ("error", "interrupted"), end

    runner.run(main())


ERRORS = {
    "python": ("raise ValueError('x')", "ValueError", "x"),
    "node": ("throw new Error('x')", "Error", "x"),
    "typescript": ("throw new RangeError('x')", "RangeError", "x"),
    "bash": ("false", "BashError", "The last command exited with status 1."),
}
PRINT_ONE = {"python": "print(1)", "node": "console.log(1)", "typescript": "console.log(1)", "bash": "echo 1"}
SPIN = {"python": "while True: pass", "node": "while (true) {}", "typescript": "while (true) {}",
        "bash": "while true; do :; done"}


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("after", ["error", "timeout", "interrupt"])
def test_a_cell_sent_right_after_a_failure_runs(hub: Hub, sessions: dict[str, tuple[str, str]],
                                               runner: asyncio.Runner, language: str, after: str) -> None:
    """The next cell is queued before the failing one ends, so it goes to the kernel the moment the failure is
    answered: inside tslab's abort window, where it used to be lost (``error``, no error, no count)."""
    where = sessions[language]

    async def main() -> None:
        code = ERRORS[language][0] if after == "error" else SPIN[language]
        failing = await execute(hub, where, code, wait=False, timeout_s=2 if after == "timeout" else None)
        rec = Recorder()
        following = await execute(hub, where, PRINT_ONE[language], wait=False, listener=rec)
        if after == "interrupt":
            await failing.wait_started()
            await hub.interrupt_execution(ALICE, failing.id)
        await asyncio.wait_for(failing.wait(), 60)
        await asyncio.wait_for(following.wait(), 60)
        assert failing.status == {"error": "error", "timeout": "timeout", "interrupt": "error"}[after]
        assert failing.error is not None and failing.error["name"] and failing.error["value"]
        if after == "error":
            assert (failing.error["name"], failing.error["value"]) == ERRORS[language][1:]
        end = assert_consistent(following, rec)
        assert end["status"] == "ok" and end["stdout"] == "1\n" and end["error"] is None, end
        assert isinstance(end["execution_count"], int)

    runner.run(main())


@pytest.mark.parametrize("language", ["node", "typescript"])
def test_a_cell_with_env_right_after_an_error_runs(hub: Hub, sessions: dict[str, tuple[str, str]],
                                                   runner: asyncio.Runner, language: str) -> None:
    """``env`` is set by bookkeeping code sent before the cell: that one waits out the abort window too."""
    where = sessions[language]

    async def main() -> None:
        failing = await execute(hub, where, "throw new Error('x')", wait=False)
        following = await execute(hub, where, "console.log(process.env.KH_ONLY_NOW)", env={"KH_ONLY_NOW": "yes"},
                                  wait=False)
        await asyncio.wait_for(failing.wait(), 60)
        await asyncio.wait_for(following.wait(), 60)
        assert following.status == "ok" and following.stdout == "yes\n", following.to_dict()
        after = await execute(hub, where, "console.log(process.env.KH_ONLY_NOW)")
        assert after.stdout == "undefined\n"

    runner.run(main())


def test_display_updates_replace_their_result(hub: Hub, sessions: dict[str, tuple[str, str]],
                                              runner: asyncio.Runner) -> None:
    where = sessions["python"]

    async def main() -> None:
        rec = Recorder()
        first = await execute(hub, where, "h = display('before', display_id=True)\nh.update('after')\n"
                                          "display('other')", listener=rec)
        end = assert_consistent(first, rec)
        [shown, other] = end["results"]
        assert shown["data"]["text/plain"] == "'after'" and shown["display_id"] == first.results[0]["display_id"]
        assert other["data"]["text/plain"] == "'other'" and "display_id" not in other
        [update] = [e for e in rec.events if e["type"] == "update"]
        assert update["display_id"] == shown["display_id"] and update["data"]["text/plain"] == "'after'"
        assert [e["type"] for e in rec.events].count("result") == 2

        rec = Recorder()
        second = await execute(hub, where, "h.update('later')", listener=rec)
        assert second.results == [] and [e["type"] for e in rec.events] == ["start", "update", "end"]
        assert hub.get_execution(ALICE, first.id).to_dict()["results"][0]["data"]["text/plain"] == "'later'"

    runner.run(main())


KEPT = {
    # The cell that keeps running until interrupted, and how each kernel reports the interrupt.
    "python": "import time\ntime.sleep(60)",
    "node": "await new Promise(resolve => setTimeout(resolve, 60000))",
    "bash": "sleep 60",
}
STATE = {
    "python": ("kh_state = 7", "print(kh_state)"),
    "node": ("var khState = 7", "console.log(khState)"),
    "bash": ("KH_STATE=7", "echo $KH_STATE"),
}


@pytest.mark.parametrize("language", ["python", "node", "bash"])
def test_an_interrupt_the_kernel_honours_keeps_its_state(hub: Hub, sessions: dict[str, tuple[str, str]],
                                                         runner: asyncio.Runner, language: str) -> None:
    where = sessions[language]

    async def main() -> None:
        set_state, read_state = STATE[language]
        assert (await execute(hub, where, set_state)).status == "ok"
        rec = Recorder()
        ex = await execute(hub, where, KEPT[language], wait=False, listener=rec)
        await ex.wait_started()
        began = time.monotonic()
        await hub.interrupt_execution(ALICE, ex.id)
        await asyncio.wait_for(ex.wait(), 60)
        assert time.monotonic() - began < INTERRUPT_GRACE_S, "the kernel was restarted, not interrupted"
        end = assert_consistent(ex, rec)
        assert (end["status"], end["reason"]) == ("error", "interrupted"), end
        assert (await execute(hub, where, read_state)).stdout == "7\n"

    runner.run(main())


def test_an_interrupt_the_kernel_ignores_escalates_to_a_restart(hub: Hub, sessions: dict[str, tuple[str, str]],
                                                                runner: asyncio.Runner) -> None:
    """ipykernel does not stop a top-level ``await`` on SIGINT (KERNELS.md): after INTERRUPT_GRACE_S the
    kernel is restarted, and the execution says that the state was lost."""
    where = sessions["python"]

    async def main() -> None:
        assert (await execute(hub, where, "kh_lost = 1")).status == "ok"
        rec = Recorder()
        ex = await execute(hub, where, NAP,
                           wait=False, listener=rec)
        await asyncio.wait_for(rec.first_output.wait(), 60)
        began = time.monotonic()
        await hub.interrupt_execution(ALICE, ex.id)
        await asyncio.wait_for(ex.wait(), 60)
        assert time.monotonic() - began < 30  # far from the 60 s the await would take
        end = assert_consistent(ex, rec)
        assert (end["status"], end["reason"]) == ("killed", "interrupted"), end
        assert end["error"]["name"] == "KernelRestarted" and "state" in end["error"]["value"]
        assert end["stdout"] == "napping\n"
        after = await execute(hub, where, "print('kh_lost' in globals())")
        assert after.status == "ok" and after.stdout == "False\n"

    runner.run(main())


#: Per case: the session's language, a flood (the issue's for python; 10 kB lines for bash_kernel, which sends a
#: message a line and would take minutes to reach 1 MB with short ones; short lines in a synchronous loop for tslab,
#: which used to send nothing more after 2 KB of them until the loop ended, so that the cap never saw the flood),
#: state set before it, and how to read it back.
FLOODS = {
    "python": ("python", "for i in range(10**8): print(i)", "kept = 5", "print(kept)"),
    "node": ("node", "while (true) { console.log('x'.repeat(10000)) }", "var kept = 5", "console.log(kept)"),
    "node-short-lines": ("node", "for (let i = 0; i < 1e8; i++) console.log(i)", "var kept = 5", "console.log(kept)"),
    "typescript": ("typescript", "for (let i: number = 0; i < 1e8; i++) console.log(i)", "var kept: number = 5",
                   "console.log(kept)"),
    "bash": ("bash", "while true; do printf '%010000d\\n' 0; done", "KEPT=5", "echo $KEPT"),
}


@pytest.fixture(scope="module")
def capped(hub: Hub, runner: asyncio.Runner) -> dict[str, tuple[str, str]]:
    """Sessions of every flooding language in one sandbox with output_mb: 1."""

    async def make() -> dict[str, tuple[str, str]]:
        record = await hub.create_sandbox(ALICE, "python", limits={"output_mb": 1})
        out = {"python": (record.id, next(iter(record.sessions)))}
        for language in ("node", "typescript", "bash"):
            out[language] = (record.id, (await hub.create_session(ALICE, record.id, "jupyter", language)).id)
        return out

    return runner.run(make())


@pytest.mark.parametrize("case", sorted(FLOODS))
def test_output_past_the_cap_stops_the_execution_at_once(hub: Hub, capped: dict[str, tuple[str, str]],
                                                         runner: asyncio.Runner, case: str) -> None:
    language, flood, set_state, read_state = FLOODS[case]
    where = capped[language]

    async def main() -> None:
        assert (await execute(hub, where, set_state)).status == "ok"
        rec = Recorder()
        began = time.monotonic()
        ex = await execute(hub, where, flood, timeout_s=300, listener=rec)
        assert time.monotonic() - began < 60  # it used to run on to its timeout
        end = assert_consistent(ex, rec)
        assert (end["status"], end["reason"], end["truncated"]) == ("error", "output_truncated", True), end
        assert end["error"]["name"] == "OutputLimitExceeded"
        assert MiB // 2 < len(end["stdout"].encode()) <= MiB
        # Interrupted, not restarted: the kernel kept its state, and the next execution runs.
        after = await execute(hub, where, read_state)
        assert after.status == "ok" and after.stdout == "5\n", after.to_dict()

    runner.run(main())


def test_a_flood_of_output_does_not_stay_in_the_kernel(hub: Hub, runner: asyncio.Runner) -> None:
    """A million lines into a 256 MB sandbox (cap high enough not to stop them): the kernel's memory after the
    flood is what it was before, and the next cell can use nearly all of the sandbox's memory. IPython 9
    otherwise keeps every write (measured: about 60 bytes a line) and the next cell dies of oom."""

    async def main() -> None:
        record = await hub.create_sandbox(ALICE, "python", limits={"memory_mb": 256, "output_mb": 100})
        warm = await hub.execute(ALICE, record.id, "x = b'x' * 1024; print(x[:1].decode())")
        assert warm.status == "ok"
        before = hub.sandbox_metrics(ALICE, record.id)["memory_bytes"]
        flood = await hub.execute(ALICE, record.id, "for i in range(1_000_000): print(i)", timeout_s=170)
        assert flood.status == "ok" and not flood.truncated, flood.to_dict()["status"]
        assert flood.stdout.endswith("999999\n")
        after = hub.sandbox_metrics(ALICE, record.id)["memory_bytes"]
        assert after - before < 20 * MiB, (before, after)
        big = await hub.execute(ALICE, record.id, "big = b'y' * (150 * 1024 * 1024); print(len(big) >> 20)")
        assert (big.status, big.reason, big.stdout) == ("ok", None, "150\n"), big.to_dict()
        assert hub.sandbox_metrics(ALICE, record.id)["oom_kills"] == 0

    runner.run(main())
