"""Hostile code against real sandboxes, one section per attack class of SECURITY.md; each test asserts the safe
outcome. Gateway API cases live with the handler tests; limits in depth in test_limits.py."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session

from kernelhub.errors import InvalidRequest, SandboxError
from kernelhub.sandbox import bwrap
from kernelhub.sandbox.limits import Limits
from kernelhub.sandbox.sandbox import Sandbox
from kernelhub.testing import until

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

CANARY = "KH_HOST_CANARY_" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def sb(factory: Any, runner: asyncio.Runner) -> Iterator[Sandbox]:
    # The canary is in the gateway's environment while the sandbox starts: nothing of it may get in.
    os.environ[CANARY] = "secret-value"
    try:
        sandbox = runner.run(factory.create(limits=Limits(memory_mb=256, pids=64, disk_mb=64)))
    finally:
        del os.environ[CANARY]
    yield sandbox
    runner.run(sandbox.stop())


@pytest.fixture(scope="module")
def other(factory: Any, runner: asyncio.Runner) -> Iterator[Sandbox]:
    sandbox = runner.run(factory.create(limits=Limits(memory_mb=128, pids=32, disk_mb=16)))
    yield sandbox
    runner.run(sandbox.stop())


def as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run on the host as ``uid``, as a sandbox would be if it ever got out of its namespaces."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv],
                          capture_output=True, text=True, timeout=30)


def ok(result: tuple[int, str]) -> str:
    code, out = result
    assert code == 0, out
    return out


# ------------------------------------------------------------------------------------------------------------
# Filesystem escape


def test_host_root_and_secrets_are_not_there(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    code, out = runner.run(sh(sb, "cat /etc/shadow"))
    assert code != 0 and "No such file" in out
    top = set(ok(runner.run(sh(sb, "ls -A /"))).split())
    assert top <= {"bin", "dev", "etc", "home", "lib", "lib64", "node_modules", "opt", "proc", "run", "sbin", "tmp",
                   "usr", "workspace"}, top
    etc = set(ok(runner.run(sh(sb, "ls -A /etc"))).split())
    assert not etc & {"shadow", "gshadow", "sudoers", "ssh", "machine-id", "hostname.host"}
    assert ok(runner.run(sh(sb, "cat /etc/passwd"))).count("\n") == 3  # root, user, nobody
    # The host paths behind the binds lead nowhere.
    state = str(sb.factory.state_dir)
    for path in (state, "/root", "/var", "/work", "/home/user/..", "/proc/1/root/etc/shadow"):
        code, out = runner.run(sh(sb, f"cat {path}/* 2>&1; ls {path}/sandboxes 2>&1"))
        assert "Permission denied" in out or "No such file" in out or "Is a directory" in out, (path, out)
        assert "root:" not in out


def test_system_directories_are_read_only(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    targets = ["/usr/x", "/usr/bin/python3", "/opt/kernelhub/python/bin/python", "/node_modules/x",
               "/opt/kernelhub-agent/agent.py", "/etc/passwd", "/etc/ld.so.cache"]
    for target in targets:
        code, out = runner.run(sh(sb, f"echo pwned >> {target}"))
        assert code != 0 and ("Read-only file system" in out or "Permission denied" in out), (target, out)
    agent = Path(sb.factory.state_dir) / "agent" / "agent.py"
    assert b"pwned" not in agent.read_bytes()


def test_another_sandbox_workspace_is_unreachable(sb: Sandbox, other: Sandbox, runner: asyncio.Runner,
                                                  sh: Any) -> None:
    token = secrets.token_hex(8)
    ok(runner.run(sh(other, f"echo {token} > /workspace/secret-{token}")))
    assert other.workspace is not None
    host_path = other.workspace.path / f"secret-{token}"
    assert host_path.read_text().strip() == token
    code, out = runner.run(sh(sb, f"cat {host_path}; cat /proc/*/root{host_path}; ls /workspace"))
    assert token not in out.replace(str(host_path), "")
    # Nor anywhere else in the sandbox's view (grep over everything it can read, not /proc and /usr).
    code, out = runner.run(sh(sb, f"grep -rl {token} / --exclude-dir=proc --exclude-dir=usr 2>/dev/null"))
    assert out.strip() == "", out
    # Each sandbox's own workspace is a different filesystem.
    assert ok(runner.run(sh(sb, "stat -c %d /workspace"))) != ok(runner.run(sh(other, "stat -c %d /workspace")))


def test_symlinks_planted_in_the_workspace_are_not_followed(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    ok(runner.run(sh(sb, "ln -sfn /etc/shadow /workspace/leak && ln -sfn /etc /workspace/etcdir "
                         "&& ln -sfn ../../../../etc /workspace/up")))
    ws = sb.workspace
    assert ws is not None
    shadow = Path("/etc/shadow").read_bytes()
    for rel in ("leak", "etcdir/shadow", "up/shadow"):
        with pytest.raises(InvalidRequest) as info:
            ws.open_read(rel)
        assert "symbolic link" in info.value.message
        with pytest.raises(InvalidRequest):
            ws.open_write(rel)
    with pytest.raises(InvalidRequest):
        ws.list_dir("etcdir")
    ws.delete("leak")  # removes the link, never its target
    assert Path("/etc/shadow").read_bytes() == shadow
    assert not os.path.lexists(ws.path / "leak")


# ------------------------------------------------------------------------------------------------------------
# Privilege escalation


def test_sandbox_user_is_an_unprivileged_host_uid_of_its_own(sb: Sandbox, other: Sandbox, runner: asyncio.Runner,
                                                             sh: Any) -> None:
    assert ok(runner.run(sh(sb, "id -u; id -g"))).split() == ["1000", "1000"]
    assert sb.uid >= sb.factory.uid_base and sb.uid != other.uid
    # Seen from the host, the sandbox's user 1000 is the sandbox's host uid and nothing else is mapped.
    assert sb.cgroup is not None
    agent = max(sb.cgroup.pids())
    assert Path(f"/proc/{agent}/uid_map").read_text().split() == ["1000", str(sb.uid), "1"]
    ok(runner.run(sh(sb, "touch /workspace/mine && mkdir -p /workspace/d")))
    assert sb.workspace is not None
    for name in ("mine", "d"):
        st = os.stat(sb.workspace.path / name)
        assert (st.st_uid, st.st_gid) == (sb.uid, sb.uid)
    # Every host process in the sandbox's cgroup runs as that uid, bubblewrap included: none as root.
    assert sb.cgroup is not None
    members = sb.cgroup.pids()
    assert len(members) >= 3  # bwrap, its pid 1, the agent
    for pid in members:
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(sb.uid)}, (pid, uids)


def test_no_capabilities_and_no_new_privileges(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    out = ok(runner.run(sh(sb, "grep -E '^(Cap|NoNewPrivs|Uid)' /proc/1/status /proc/2/status /proc/self/status")))
    for line in out.splitlines():
        _, field, value = line.split(":", 2)
        if field.startswith("Cap"):
            assert int(value.strip(), 16) == 0, line
        elif field == "NoNewPrivs":
            assert value.strip() == "1", line


def test_setuid_binaries_and_setuid_calls_do_not_elevate(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    code, out = runner.run(sh(sb, "su -c id root < /dev/null"))
    assert code != 0 and "uid=0" not in out
    code, out = runner.run(sh(sb, "command -v sudo || echo no-sudo"))
    assert "no-sudo" in out or code != 0
    code, out = runner.run(sh(sb, "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m"))
    assert code != 0
    code, out = runner.run(sh(sb, "python3 -c 'import os; os.setuid(0)'"))
    assert code != 0 and ("PermissionError" in out or "Invalid argument" in out), out  # EINVAL: 0 is unmapped
    # /usr (with its setuid binaries) is mounted nosuid.
    mounts = ok(runner.run(sh(sb, "cat /proc/self/mountinfo")))
    usr = next(line for line in mounts.splitlines() if line.split()[4] == "/usr")
    assert "nosuid" in usr.split()[5] and "ro" in usr.split()[5].split(",")
    for path in ("/proc/sys/kernel/hostname", "/proc/sysrq-trigger", "/proc/sys/vm/drop_caches"):
        code, out = runner.run(sh(sb, f"echo 1 > {path}"))
        assert code != 0, path


def test_no_nested_user_namespaces(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    for command in ("unshare -U true", "unshare -r id", "unshare -Urm true", "unshare -n true"):
        code, out = runner.run(sh(sb, command))
        assert code != 0, (command, out)
    script = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
              "print(libc.unshare(0x10000000), ctypes.get_errno())")
    out = ok(runner.run(sh(sb, "", argv=["python3", "-c", script])))
    # The system-call filter answers first (EPERM); --disable-userns (max_user_namespaces 0, ENOSPC) stands
    # behind it.
    assert out.split() == ["-1", str(errno.EPERM)], out


# ------------------------------------------------------------------------------------------------------------
# Process visibility and signals


def test_only_the_sandbox_processes_are_visible(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    out = ok(runner.run(sh(sb, "ps -eo pid=,comm=")))
    rows = [line.split(None, 1) for line in out.strip().splitlines()]
    names = {name for _, name in rows}
    assert names <= {"bwrap", "python3", "bash", "ps"}, rows
    assert int(rows[0][0]) == 1 and max(int(pid) for pid, _ in rows) < 1000
    # The gateway (this test process) is not there to be signalled.
    me = os.getpid()
    code, out = runner.run(sh(sb, f"ls /proc/{me}; kill -0 {me}; kill -9 {me}"))
    assert code != 0 and "No such process" in out
    assert ok(runner.run(sh(sb, "kill -9 1; sleep 0.2; echo still-here"))).strip() == "still-here"


def test_kill_everything_inside_stays_inside(factory: Any, other: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    victim = runner.run(factory.create(limits=Limits(memory_mb=128, pids=32, disk_mb=16)))
    # A host process of the very same uid (as a process that got out would be), and another sandbox's process.
    with subprocess.Popen(["setpriv", f"--reuid={victim.uid}", f"--regid={victim.uid}", "--clear-groups", "--",
                           "sleep", "60"]) as host_same_uid:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            neighbour = runner.run(other.spawn(["sleep", "60"], stdin=devnull, stdout=devnull, stderr=devnull))
        finally:
            os.close(devnull)
        try:
            # This kills the victim's own agent too, often before it could even report the spawn.
            with contextlib.suppress(SandboxError):
                runner.run(sh(victim, "kill -9 -1; kill -KILL -1; kill -9 1"))
            runner.run(until(lambda: victim.state == "failed"))  # its sandbox process is reaped
            assert victim.state == "failed"  # it did kill: everything of its own
            assert host_same_uid.poll() is None
            assert neighbour.returncode is None
            assert ok(runner.run(sh(other, "echo fine"))).strip() == "fine"
        finally:
            host_same_uid.kill()
            runner.run(neighbour.kill())
            runner.run(neighbour.wait())
    runner.run(victim.stop())


# ------------------------------------------------------------------------------------------------------------
# Network egress and host loopback


def test_no_network_interface_but_loopback(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    out = ok(runner.run(sh(sb, "python3 -c 'import socket; print(socket.if_nameindex())'")))
    assert out.strip() == "[(1, 'lo')]"
    script = (
        "import socket\n"
        "for addr in [('1.1.1.1', 53), ('10.0.2.2', 80), ('169.254.169.254', 80)]:\n"
        "    try:\n"
        "        socket.create_connection(addr, timeout=3); print('CONNECTED', addr)\n"
        "    except OSError as e: print(e.errno)\n"
    )
    out = ok(runner.run(sh(sb, "", argv=["python3", "-c", script])))
    assert "CONNECTED" not in out and out.split() == [str(errno.ENETUNREACH)] * 3


def test_host_loopback_service_is_unreachable(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from the host
        script = (
            "import socket\n"
            f"try: socket.create_connection(('127.0.0.1', {port}), timeout=3); print('CONNECTED')\n"
            "except OSError as e: print(e.errno)\n"
        )
        out = ok(runner.run(sh(sb, "", argv=["python3", "-c", script])))
    assert out.strip() == str(errno.ECONNREFUSED)


def test_host_unix_sockets_are_unreachable(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    name = f"kh-host-{secrets.token_hex(4)}"
    path = f"/tmp/{name}.sock"
    with socket.socket(socket.AF_UNIX) as on_disk, socket.socket(socket.AF_UNIX) as abstract:
        on_disk.bind(path)
        os.chmod(path, 0o777)
        on_disk.listen()
        abstract.bind(f"\0{name}")
        abstract.listen()
        try:
            script = (
                "import socket\n"
                f"for addr in ['{path}', '\\0{name}']:\n"
                "    s = socket.socket(socket.AF_UNIX)\n"
                "    try: s.connect(addr); print('CONNECTED')\n"
                "    except OSError as e: print(e.errno)\n"
            )
            out = ok(runner.run(sh(sb, "", argv=["python3", "-c", script])))
        finally:
            os.unlink(path)
    assert out.split() == [str(errno.ENOENT), str(errno.ECONNREFUSED)]
    inside = set(ok(runner.run(sh(sb, "ls -A /run"))).split())
    assert "kernelhub" in inside and not inside & (set(os.listdir("/run")) - {"mount"}), inside


# ------------------------------------------------------------------------------------------------------------
# Resource exhaustion (in depth: test_limits.py)


def test_fork_bomb_in_one_sandbox_does_not_stop_another(factory: Any, other: Sandbox, runner: asyncio.Runner,
                                                       sh: Any) -> None:
    bomb = runner.run(factory.create(limits=Limits(memory_mb=256, pids=24, disk_mb=16)))

    async def scenario() -> list[float]:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            proc = await bomb.spawn(["/bin/bash", "-c", "b() { b | b & }; b; sleep 30"], stdin=devnull,
                                    stdout=devnull, stderr=devnull)
        finally:
            os.close(devnull)
        await until(lambda: bomb.pids_max_hits() > 0)  # the bomb is at its pids limit
        times = []
        for _ in range(5):
            start = time.monotonic()
            code, out = await sh(other, "echo alive; python3 -c 'print(6*7)'", timeout=20)
            assert (code, out.split()) == (0, ["alive", "42"])
            times.append(time.monotonic() - start)
        await proc.kill()
        return times

    times = runner.run(scenario())
    assert bomb.pids_max_hits() > 0
    assert max(times) < 5, times
    runner.run(bomb.stop())


# ------------------------------------------------------------------------------------------------------------
# Kernel channel abuse


def test_kernel_channel_needs_the_key_and_is_the_sandbox_own(sb: Sandbox, other: Sandbox, kernels: Any,
                                                            runner: asyncio.Runner, sh: Any) -> None:
    km, kc = runner.run(kernels.start("kernelhub-python", sandbox=sb))
    try:
        info = km.get_connection_info()
        key = info["key"]
        assert info["transport"] == "ipc" and len(key) >= 32
        assert str(info["ip"]).startswith(str(sb.run_dir))

        # The sandbox-side connection file: the sandbox uid's alone, in a directory that is root's once the
        # kernel has bound, inside a run directory that is root's.
        files = list(sb.run_dir.glob("k-*.json"))
        assert len(files) == 1
        st = files[0].stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == sb.uid
        assert json.loads(files[0].read_text())["key"] == key.decode()
        for directory in (sb.run_dir, files[0].parent):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o755 and directory.stat().st_uid == 0
        # Another sandbox's uid cannot read it or reach the sockets, even with the host path in hand.
        denied = as_uid(other.uid, "cat", str(files[0]))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        shell_path = f"{info['ip']}-{info['shell_port']}"
        denied = as_uid(other.uid, "/usr/bin/python3", "-c",
                        f"import socket; socket.socket(socket.AF_UNIX).connect({shell_path!r})")
        assert denied.returncode != 0 and "PermissionError" in denied.stderr
        inner_file = f"/run/kernelhub/{files[0].name}"
        code, out = runner.run(sh(other, f"ls /run/kernelhub; cat {inner_file}"))
        assert code != 0 and key.decode() not in out

        ctx = zmq.Context()
        try:
            shell = ctx.socket(zmq.DEALER)
            shell.linger = 0
            shell.connect(f"ipc://{shell_path}")
            good = Session(key=key, signature_scheme=info["signature_scheme"])
            forged = Session(key=b"not-the-key", signature_scheme=info["signature_scheme"])
            unsigned = Session(key=b"")

            def replies(wait_ms: int) -> list[dict[str, Any]]:
                got = []
                while shell.poll(wait_ms):
                    _, frames = good.feed_identities(shell.recv_multipart())
                    got.append(good.deserialize(frames))
                    wait_ms = 300
                return got

            forged.send(shell, "kernel_info_request", {})
            unsigned.send(shell, "kernel_info_request", {})
            genuine = good.msg("kernel_info_request", {})
            frames = good.serialize(genuine)
            shell.send_multipart(frames)
            answered = replies(15_000)
            # The kernel handles messages in order: only the signed one got an answer.
            assert [r["parent_header"]["msg_id"] for r in answered] == [genuine["header"]["msg_id"]]
            assert answered[0]["msg_type"] == "kernel_info_reply"
            # A replayed message (same signature) is refused too.
            shell.send_multipart(frames)
            assert replies(1500) == []
            shell.close()
        finally:
            ctx.term()
        reply, out = runner.run(kernels.execute(kc, "print('still', 'fine')"))
        assert reply["status"] == "ok" and out == "still fine\n"
    finally:
        runner.run(kernels.stop(km, kc))
    assert not list(sb.run_dir.glob("k-*")), "the kernel's files stay behind"


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block takes longer, even inside a blocking syscall."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the gateway's event loop was blocked for {seconds} s")

    previous = signal.signal(signal.SIGUSR1, expire)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_the_sandbox_cannot_plant_or_swap_what_the_gateway_connects_to(sb: Sandbox, kernels: Any,
                                                                       runner: asyncio.Runner, sh: Any) -> None:
    # Pitfall 8. The run directory is root's: nothing can be planted at a future kernel's names (a FIFO at
    # its connection file would block the gateway's event loop; a symlink at a socket would send the gateway,
    # as root, to a host socket).
    code, out = runner.run(sh(sb, "mkfifo /run/kernelhub/k-planted.json; ln -s /tmp /run/kernelhub/k-x; "
                                  "mkdir /run/kernelhub/k-y"))
    assert code != 0 and out.count("Permission denied") == 3, out
    with socket.socket(socket.AF_UNIX) as host_service:
        host_service.bind(str(sb.dir / "host-service.sock"))
        host_service.listen()
        host_service.setblocking(False)
        km, kc = runner.run(kernels.start("kernelhub-python", sandbox=sb))
        try:
            sock_dir = os.path.dirname(str(km.get_connection_info()["ip"]))
            inner = f"/run/kernelhub/{os.path.basename(sock_dir)}"
            # Once bound, the kernel's sockets cannot be removed, renamed or replaced from inside — not even
            # by the kernel itself — while they still answer.
            swap = (f"rm -f {inner}/s-1; mv {inner}/s-2 {inner}/x; ln -sf {sb.dir}/host-service.sock {inner}/s-3; "
                    f"mv {inner} /run/kernelhub/moved; chmod 777 {inner}")
            reply, out = runner.run(kernels.execute(kc, f"import subprocess\nr = subprocess.run({swap!r}, "
                                                       "shell=True, capture_output=True, text=True)\n"
                                                       "print(r.stderr.count('ermission denied') + "
                                                       "r.stderr.count('not permitted'))"))
            assert reply["status"] == "ok" and int(out) >= 5, out
            for port in range(1, 6):
                assert stat.S_ISSOCK(os.lstat(f"{sock_dir}/s-{port}").st_mode)
            # Even with the kernel killed from inside, the gateway's reconnects hit only dead sockets.
            kc.execute("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
            time.sleep(1.5)
            with pytest.raises(BlockingIOError):
                host_service.accept()  # nobody connected
        finally:
            runner.run(kernels.stop(km, kc, now=True))
    assert sb.state == "running"


def test_restarts_give_the_sandbox_no_window_to_steer_the_gateway(sb: Sandbox, kernels: Any,
                                                                   runner: asyncio.Runner) -> None:
    # During a restart the new kernel binds in a staging directory the sandbox owns; a process already in the
    # sandbox plants symlinks to a host socket in every directory it can write, as fast as it can. The gateway
    # connects only to the kernel's fixed, root-owned directory, so nothing reaches the host socket.
    host_sock = str(sb.dir / "host-service-2.sock")
    racer = (
        "import os, time\n"
        "end = time.time() + 30\n"
        "while time.time() < end:\n"
        "    for d in os.listdir('/run/kernelhub'):\n"
        "        for p in range(1, 6):\n"
        "            try:\n"
        f"                os.symlink({host_sock!r}, f'/run/kernelhub/{{d}}/s-{{p}}')\n"
        "            except OSError:\n"
        "                pass\n"
    )
    with socket.socket(socket.AF_UNIX) as host_service:
        host_service.bind(host_sock)
        host_service.listen()
        host_service.setblocking(False)
        km, kc = runner.run(kernels.start("kernelhub-python", sandbox=sb))

        async def restarts() -> list[str]:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                proc = await sb.spawn(["python3", "-c", racer], stdin=devnull, stdout=devnull, stderr=devnull)
            finally:
                os.close(devnull)
            outcomes = []
            try:
                await asyncio.sleep(0.2)
                for _ in range(3):
                    try:
                        await km.restart_kernel(now=True)
                        outcomes.append("restarted")
                    except SandboxError as exc:  # the racer won before the seal: refused, also safe
                        assert "tampered" in exc.message, exc.message
                        outcomes.append("refused")
                        break
            finally:
                await proc.kill()
                await proc.wait()
            return outcomes

        try:
            outcomes = runner.run(restarts())
            assert outcomes
            time.sleep(1)
            with pytest.raises(BlockingIOError):
                host_service.accept()  # nobody connected
            if outcomes[-1] == "restarted":
                kc.stop_channels()
                kc = km.client()
                kc.start_channels()
                reply, out = runner.run(kernels.execute(kc, "print('after restarts')"))
                assert reply["status"] == "ok" and out == "after restarts\n"
        finally:
            runner.run(kernels.stop(km, kc, now=True))
    assert sb.state == "running"


def test_the_connection_file_is_never_chowned_through_a_swapped_symlink(sb: Sandbox, runner: asyncio.Runner,
                                                                        kernels: Any, tmp_path: Path) -> None:
    # The gateway (root) writes each kernel's sandbox-side connection file into the sandbox's run dir and
    # gives it to the sandbox uid. Code in the sandbox swaps every such file for a symlink to a host file as
    # fast as it can: a chown by path would follow it and hand that host file to the sandbox uid.
    victim = tmp_path / "host-file"
    victim.write_text("root's\n")
    racer = (
        "import os, time\n"
        "end = time.time() + 60\n"
        "while time.time() < end:\n"
        "    for name in os.listdir('/run/kernelhub'):\n"
        "        for p in ('/run/kernelhub/' + name, '/run/kernelhub/' + name + '/connection.json'):\n"
        "            try:\n"
        f"                os.symlink({str(victim)!r}, p + '.lnk'); os.rename(p + '.lnk', p)\n"
        "            except OSError:\n"
        "                pass\n"
    )

    async def scenario() -> int:
        from jupyter_client.manager import AsyncKernelManager

        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            proc = await sb.spawn(["python3", "-c", racer], stdin=devnull, stdout=devnull, stderr=devnull)
        finally:
            os.close(devnull)
        km = AsyncKernelManager(kernel_name="kernelhub-python")
        attempts = 0
        try:
            await asyncio.sleep(0.3)
            start = time.monotonic()
            while time.monotonic() - start < 6 and os.stat(victim).st_uid == 0:
                # What every kernel start does with the file, without starting the kernel.
                with contextlib.suppress(OSError, SandboxError):
                    await km.pre_start_kernel(sandbox=sb)
                attempts += 1
                if km.provisioner is not None:
                    await km.provisioner.cleanup(restart=True)
                km.cleanup_connection_file()
        finally:
            await proc.kill()
            await proc.wait()
            await km.cleanup_resources()
        return attempts

    attempts = runner.run(scenario())
    assert os.stat(victim).st_uid == 0, f"a host file was chowned to the sandbox uid after {attempts} attempts"
    assert attempts > 200


# ------------------------------------------------------------------------------------------------------------
# Information leaks


def test_no_host_environment_anywhere_inside(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    env = ok(runner.run(sh(sb, "env")))
    names = {line.split("=", 1)[0] for line in env.splitlines() if "=" in line}
    assert CANARY not in names
    # The sandbox's own variables (bwrap.BASE_ENV: PATH, HOME, the tools' cache dirs, ...) and bash's.
    assert names <= set(bwrap.BASE_ENV) | {"HOSTNAME", "PWD", "SHLVL", "_"}, names
    # Every process the sandbox can read, bubblewrap's own pid 1 included (its environ is what it was exec'd
    # with, whatever --clearenv did for its child). The agent's is unreadable: it is not dumpable.
    dump = ok(runner.run(sh(sb, "for f in /proc/[0-9]*/environ; do echo \"== $f\"; tr '\\0' '\\n' < $f 2>/dev/null; "
                                "done; true")))
    assert "== /proc/1/environ" in dump
    assert CANARY not in dump and "secret-value" not in dump
    lines = set(dump.splitlines())
    for host_only in ("HOME=/root", f"PWD={os.getcwd()}", f"PATH={os.environ['PATH']}"):
        assert host_only not in lines, host_only


def test_proc_sys_and_cgroups_show_only_the_sandbox(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    assert ok(runner.run(sh(sb, "tr '\\0' ' ' < /proc/1/cmdline"))).split()[0].endswith("bwrap")
    code, out = runner.run(sh(sb, "ls /sys; ls /sys/fs/cgroup"))
    assert code != 0 and out.count("No such file") == 2
    # The cgroup namespace makes the sandbox its own root: no host cgroup path is shown.
    assert {line.rsplit(":", 1)[1] for line in ok(runner.run(sh(sb, "cat /proc/self/cgroup"))).split()} == {"/"}
    # No block devices, memory or kernel log devices.
    devices = set(ok(runner.run(sh(sb, "ls -A /dev"))).split())
    assert devices <= {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin",
                       "stdout", "stderr", "core", "console"}, devices


def test_dev_shm_and_tmp_are_private(sb: Sandbox, other: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    token = secrets.token_hex(6)
    host_shm = Path(f"/dev/shm/kh-canary-{token}")
    host_tmp = Path(f"/tmp/kh-canary-{token}")
    host_shm.write_text(token)
    host_tmp.write_text(token)
    try:
        code, out = runner.run(sh(sb, f"ls -A /dev/shm /tmp; cat /dev/shm/kh-canary-{token} /tmp/kh-canary-{token}"))
        assert token not in out.replace(f"kh-canary-{token}", "")
        ok(runner.run(sh(sb, f"echo inner > /dev/shm/inner-{token}; echo inner > /tmp/inner-{token}")))
        assert not Path(f"/dev/shm/inner-{token}").exists() and not Path(f"/tmp/inner-{token}").exists()
        code, out = runner.run(sh(other, f"ls /dev/shm/inner-{token} /tmp/inner-{token}"))
        assert code != 0 and out.count("No such file") == 2
        # SysV IPC is private too.
        ok(runner.run(sh(sb, "python3 -c 'import sys; sys.exit(0)'")))
    finally:
        host_shm.unlink()
        host_tmp.unlink()


def test_hostname_is_the_sandbox_own(sb: Sandbox, other: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    names = {ok(runner.run(sh(box, "hostname; cat /etc/hostname; uname -n"))) for box in (sb, other)}
    assert names == {f"{box.hostname}\n" * 3 for box in (sb, other)}
    assert socket.gethostname() not in {sb.hostname, other.hostname}


# ------------------------------------------------------------------------------------------------------------
# Time


def test_no_cpu_rlimit_and_the_real_clock(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    # RLIMIT_CPU is cumulative and would kill a long-lived kernel (pitfall 11): time limits are the gateway's.
    assert ok(runner.run(sh(sb, "ulimit -t; ulimit -Ht"))).split() == ["unlimited", "unlimited"]
    out = ok(runner.run(sh(sb, "grep 'Max cpu time' /proc/1/limits /proc/2/limits")))
    assert out.count("unlimited") == 4, out
    inside = float(ok(runner.run(sh(sb, "date +%s.%N"))))
    assert abs(inside - time.time()) < 2


def test_a_runaway_process_is_killed_with_its_children(sb: Sandbox, runner: asyncio.Runner, sh: Any) -> None:
    async def scenario() -> tuple[int, float]:
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            proc = await sb.spawn(["/bin/bash", "-c", "sleep 1000 & sleep 1001 & while :; do :; done"],
                                  stdin=devnull, stdout=devnull, stderr=devnull)
        finally:
            os.close(devnull)
        # Both children run before the kill: it must reach them, not only the loop.
        children = ("for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done "
                    "| grep -c '^sleep 100[01]'")
        for _ in range(300):
            if (await sh(sb, children))[1].split() == ["2"]:
                break
            await asyncio.sleep(0.05)
        start = time.monotonic()
        await proc.kill()
        code = await asyncio.wait_for(proc.wait(), 5)
        return code, time.monotonic() - start

    code, took = runner.run(scenario())
    assert code == -9 and took < 2
    assert "sleep" not in ok(runner.run(sh(sb, "ps -eo comm=")))
