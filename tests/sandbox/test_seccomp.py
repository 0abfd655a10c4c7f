"""The system-call filter (kernelhub.sandbox.seccomp): the policy as data, and every denied call tried from inside
a sandbox through a real gateway (command_execute, and a python kernel's code_execute), answering EPERM (clone3:
ENOSYS) to a process that carries on. Python, Node and bash working under it is the rest of the suite's job;
the calls their runtimes probe (threads, netlink route, io_uring in libuv) are checked here."""

from __future__ import annotations

import asyncio
import errno
import json
from typing import Any

import pyseccomp
import pytest

from kernelhub.errors import IsolationUnavailable
from kernelhub.sandbox import seccomp
from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

# Each probe: (label, syscall number or name, arguments, expected errno or 0 for success). Numbers are resolved
# here, on the host, with the same libseccomp that compiled the filter.
AF_VSOCK, AF_PACKET, AF_NETLINK, AF_BLUETOOTH = 40, 17, 16, 31
NETLINK_NETFILTER, NETLINK_AUDIT = 12, 9
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS = 0x10000000, 0x40000000, 0x00020000
ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC = 0x0040000, 0x0400000
SIGCHLD = 17


def probes() -> list[tuple[str, int, tuple[int, ...], int]]:
    out = []
    for name in seccomp.DENIED:
        number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
        if number >= 0:
            out.append((name, number, (0, 0, 0, 0), errno.EPERM))

    def nr(name: str) -> int:
        return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))

    out += [
        ("clone3", nr("clone3"), (0, 0), errno.ENOSYS),
        ("unshare(CLONE_NEWUSER)", nr("unshare"), (CLONE_NEWUSER,), errno.EPERM),
        ("clone(CLONE_NEWNET)", nr("clone"), (CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0), errno.EPERM),
        ("clone(CLONE_NEWNS)", nr("clone"), (CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0), errno.EPERM),
        ("socket(AF_VSOCK)", nr("socket"), (AF_VSOCK, 1, 0), errno.EPERM),
        ("socket(AF_PACKET)", nr("socket"), (AF_PACKET, 3, 0), errno.EPERM),
        ("socket(AF_BLUETOOTH)", nr("socket"), (AF_BLUETOOTH, 1, 0), errno.EPERM),
        ("socket(AF_VSOCK | high bits)", nr("socket"), (AF_VSOCK | (1 << 32), 1, 0), errno.EPERM),
        ("socket(NETLINK_NETFILTER)", nr("socket"), (AF_NETLINK, 3, NETLINK_NETFILTER), errno.EPERM),
        ("socket(NETLINK_AUDIT)", nr("socket"), (AF_NETLINK, 3, NETLINK_AUDIT), errno.EPERM),
        ("socketpair(AF_INET)", nr("socketpair"), (2, 1, 0, 0), errno.EPERM),
        ("personality(ADDR_NO_RANDOMIZE)", nr("personality"), (ADDR_NO_RANDOMIZE,), errno.EPERM),
        ("personality(READ_IMPLIES_EXEC)", nr("personality"), (READ_IMPLIES_EXEC,), errno.EPERM),
        ("x32 getpid", 0x40000000 | nr("getpid"), (), errno.EPERM),
        # Allowed: what Python, Node and glibc need.
        ("personality(query)", nr("personality"), (0xFFFFFFFF,), 0),
        ("socket(NETLINK_ROUTE)", nr("socket"), (AF_NETLINK, 3, 0), 0),
        ("socket(AF_UNIX)", nr("socket"), (1, 1, 0), 0),
        ("socket(AF_INET6)", nr("socket"), (10, 2, 0), 0),
        ("getpid", nr("getpid"), (), 0),
    ]
    return out


# Runs in the sandbox: each probe through libc's syscall(), then a line that proves the process lived on.
PROBE_SCRIPT = """
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
for label, number, args in json.loads(sys.argv[1]):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(number), *[ctypes.c_ulong(a) for a in args])
    out[label] = ctypes.get_errno() if r == -1 else 0
print(json.dumps(out))
print("still alive")
"""


def expected() -> dict[str, int]:
    return {label: want for label, _, _, want in probes()}


def probe_args() -> str:
    return json.dumps([[label, number, list(args)] for label, number, args, _ in probes()])


@pytest.fixture(scope="module")
def sid(gateway_sandbox: str) -> str:
    return gateway_sandbox


def test_the_policy_allows_none_of_the_denied_calls() -> None:
    allowed = {rule.syscall for rule in seccomp.rules() if rule.action == "allow" and not rule.args}
    assert not allowed & set(seccomp.DENIED)
    for name in ("clone", "socket", "socketpair", "personality"):
        assert name not in allowed and all(rule.args for rule in seccomp.rules() if rule.syscall == name)
    assert [rule.action for rule in seccomp.rules() if rule.syscall == "clone3"] == ["ENOSYS"]
    program = seccomp.program()
    assert program and len(program) % 8 == 0 and seccomp.program() is program  # compiled once


def test_denied_calls_answer_eperm_to_a_command_that_lives_on(gateway: Gateway, sid: str) -> None:
    script = PROBE_SCRIPT.replace("'", "'\\''")
    status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/commands",
                                   {"command": f"python3 -c '{script}' '{probe_args()}'", "timeout_s": 60})
    assert status == 200 and body["exit_code"] == 0, body
    lines = body["stdout"].splitlines()
    assert lines[-1] == "still alive"
    assert json.loads(lines[0]) == expected()


def test_denied_calls_answer_eperm_to_a_kernel_that_lives_on(gateway: Gateway, sid: str) -> None:
    code = f"import sys\nsys.argv = ['probe', {probe_args()!r}]\n" + PROBE_SCRIPT
    status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": code, "timeout_s": 60})
    assert status == 200 and ex["status"] == "ok", ex
    lines = ex["stdout"].splitlines()
    assert lines[-1] == "still alive" and json.loads(lines[0]) == expected()
    # The same kernel carries on with ordinary work.
    status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "print(6 * 7)"})
    assert status == 200 and ex["stdout"] == "42\n"


def test_runtimes_work_under_the_filter(gateway: Gateway, sid: str) -> None:
    # Threads (clone3 -> clone), processes, name lookups (netlink route), sockets, io_uring's absence.
    py = ("import threading, multiprocessing, socket, subprocess\n"
          "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
          "with multiprocessing.Pool(2) as p: print(sum(p.map(abs, [-1, -2])))\n"
          "print(socket.getaddrinfo('localhost', 80, proto=socket.IPPROTO_TCP)[0][4][1])\n"
          "print(subprocess.run(['bash', '-c', 'echo sub'], capture_output=True, text=True).stdout.strip())\n")
    status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": py, "timeout_s": 60})
    assert status == 200 and ex["stdout"] == "3\n80\nsub\n", ex
    # Node: libuv probes io_uring (EPERM here) and falls back; worker threads, child processes, fs, interfaces.
    node = ("const { Worker } = require('worker_threads'); const fs = require('fs');"
            "const os = require('os'); const cp = require('child_process');"
            "fs.writeFileSync('/tmp/n.txt', 'x'.repeat(100000));"
            "fs.promises.readFile('/tmp/n.txt', 'utf8').then(t => {"
            "  console.log(t.length, Object.keys(os.networkInterfaces()).includes('lo'),"
            "              cp.execSync('echo child').toString().trim());"
            "  const w = new Worker('require(\"worker_threads\").parentPort.postMessage(7)', { eval: true });"
            "  w.on('message', m => { console.log('worker', m); w.terminate(); });"
            "});")
    status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/commands",
                                   {"command": "node -", "stdin": node, "timeout_s": 60})
    assert status == 200 and body["exit_code"] == 0, body
    assert body["stdout"] == "100000 true child\nworker 7\n", body
    status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/commands",
                                   {"command": "grep -E '^Seccomp:|^NoNewPrivs:' /proc/self/status | tr -s '\\t' ' '"})
    assert body["stdout"] == "NoNewPrivs: 1\nSeccomp: 2\n", body


def test_strict_isolation_refuses_to_start_without_the_filter(factory: Any, runner: asyncio.Runner) -> None:
    off = SandboxFactory(state_dir=factory.state_dir, seccomp=False)
    with pytest.raises(IsolationUnavailable, match="system-call filter"):
        runner.run(off.create())
    assert not off.live()
    relaxed = SandboxFactory(state_dir=factory.state_dir, seccomp=False, isolation="relaxed")
    assert relaxed.seccomp_program_fd() is None
