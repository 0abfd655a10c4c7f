"""Sandbox code against its own agent (SECURITY.md pitfall 13), through a real gateway: the agent cannot be
traced or robbed of its control socket, stopping or killing it hangs nothing and leaves nothing running, and a
false report of a process's end never leaves that process running untracked."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import pytest

from kernelhub.sandbox.sandbox import KILL_DEADLINE_S, Sandbox
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

# Runs in the sandbox. The agent is pid 2 (bwrap's pid 1 started it). Every way to the agent's socket.
STEAL = r"""
import ctypes, errno, json, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
def err(r):
    return ctypes.get_errno() if r == -1 else 0
assert "agent.py" in open("/proc/2/cmdline").read()
out["ptrace_attach"] = err(libc.ptrace(16, 2, 0, 0))
out["ptrace_seize"] = err(libc.ptrace(0x4206, 2, 0, 0))
pidfd = os.pidfd_open(2)
out["pidfd_getfd"] = sorted({err(libc.syscall(438, pidfd, fd, 0)) for fd in range(64)})
for path in ("/proc/2/mem", "/proc/2/fd", "/proc/2/environ"):
    try:
        os.listdir(path) if path.endswith("fd") else open(path, "rb").read(1)
        out[path] = 0
    except OSError as exc:
        out[path] = exc.errno
buf = ctypes.create_string_buffer(8)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
local = iovec(ctypes.cast(buf, ctypes.c_void_p), 8)
remote = iovec(0x400000, 8)
out["process_vm_readv"] = err(libc.process_vm_readv(2, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
out["pid1_fds"] = sorted(os.readlink(f"/proc/1/fd/{fd}").split(":")[0] for fd in os.listdir("/proc/1/fd"))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sid(gateway_sandbox: str) -> str:
    return gateway_sandbox


def command(gw: Gateway, sid: str, script: str, **fields: Any) -> dict[str, Any]:
    status, body = gw.request("POST", f"/v1/sandboxes/{sid}/commands", {"command": script, **fields})
    assert status == 200, body
    return body


def test_the_agent_cannot_be_traced_or_robbed_of_its_socket(gateway: Gateway, sid: str) -> None:
    for run in ("command", "kernel"):
        if run == "command":
            body = command(gateway, sid, "python3 -", stdin=STEAL)
            assert body["exit_code"] == 0, body
            out = json.loads(body["stdout"])
        else:
            status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": STEAL})
            assert status == 200 and ex["status"] == "ok", ex
            out = json.loads(ex["stdout"])
        assert out == {
            "ptrace_attach": 1, "ptrace_seize": 1, "pidfd_getfd": [1],  # EPERM
            "/proc/2/mem": 13, "/proc/2/fd": 13, "/proc/2/environ": 13,  # EACCES
            "process_vm_readv": 1,
            # bwrap's pid 1 (traceable: same uid, dumpable) holds no socket: /dev/null, its log pipe, an eventfd.
            "pid1_fds": ["/dev/null", "/dev/null", "anon_inode", "pipe"],
        }, run


def test_a_stopped_agent_hangs_no_command_past_its_timeout(gateway: Gateway, sid: str) -> None:
    started = time.monotonic()
    body = command(gateway, sid, "echo before; kill -STOP 2; sleep 60", timeout_s=2)
    elapsed = time.monotonic() - started
    # At its deadline the command's tree gets SIGTERM from the host (its cgroup's members), which bash and sleep
    # die of (143); the exit the stopped agent cannot report is counted by the gateway's own deadline.
    assert body["reason"] == "timeout" and body["exit_code"] == 143 and body["stdout"] == "before\n", body
    assert elapsed < 2 + 2 * KILL_DEADLINE_S + 10, elapsed
    # The gateway woke the agent: the sandbox goes on working.
    assert command(gateway, sid, "echo after")["stdout"] == "after\n"
    status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "print('kernel ok')"})
    assert status == 200 and ex["stdout"] == "kernel ok\n"


def test_killing_the_agent_fails_the_sandbox_and_leaves_nothing(gateway: Gateway) -> None:
    status, sb = gateway.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201
    try:
        status, _ = gateway.request("POST", f"/v1/sandboxes/{sb['id']}/commands",
                                    {"command": "sleep 0.2; kill -9 2; sleep 30", "timeout_s": 20})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status, info = gateway.request("GET", f"/v1/sandboxes/{sb['id']}")
            if info["state"] == "failed":
                break
            time.sleep(0.1)
        assert info["state"] == "failed", info
        status, body = gateway.request("POST", f"/v1/sandboxes/{sb['id']}/commands", {"command": "true"})
        assert 400 <= status < 500 and body["error"], body
    finally:
        gateway.request("DELETE", f"/v1/sandboxes/{sb['id']}")


def test_a_false_report_of_an_end_never_leaves_the_process_running(factory: Any, runner: asyncio.Runner,
                                                                 sh: Any) -> None:
    sandbox: Sandbox = runner.run(factory.create())
    try:
        async def main() -> None:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                proc = await sandbox.spawn(["sleep", "300"], stdin=devnull, stdout=devnull, stderr=devnull)
            finally:
                os.close(devnull)
            code, out = await sh(sandbox, "pgrep -x sleep")
            assert out.split() == [str(proc.pid)]
            # What a hijacked agent would say: the process ended, while it runs on.
            sandbox._on_process_exit(proc.req_id, 0)
            assert await asyncio.wait_for(proc.wait(), 1) == 0
            code, out = await sh(sandbox, "for i in $(seq 50); do pgrep -x sleep || exit 0; sleep 0.1; done; exit 1")
            assert code == 0, out
            assert any("while it was running; killed it" in line for line in sandbox.logs(10))

        runner.run(main())
    finally:
        runner.run(sandbox.stop())
