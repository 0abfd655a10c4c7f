"""The agent: the first process inside a sandbox, which starts every later one.

It runs inside bubblewrap as the sandbox's user, with no capabilities and no_new_privs, so everything it
starts (kernels, commands, terminals) shares the sandbox's namespaces, cgroup, uid and workspace; it holds no
privilege that the sandbox's own code lacks, so code that takes it over gains nothing.

It talks to the gateway over a ``SOCK_SEQPACKET`` unix socket that is its fd 0 (the gateway keeps the other
end of a socketpair). A socket on fd 0 cannot be reopened through ``/proc/PID/fd``, and there is no path a
process could plant a symlink at, unlike a listening socket in a shared directory. The gateway passes the new
process's stdio as file descriptors (``SCM_RIGHTS``), so the gateway owns pipes and PTYs on the host side.

Messages are JSON objects, one a packet.
gateway -> agent: ``{"op": "spawn", "id", "argv", "env", "cwd", "pty"}`` with 3 fds (stdin, stdout, stderr)
or 1 fd (a PTY slave, used for all three); ``{"op": "signal", "id", "signal", "group"}``.
agent -> gateway: ``{"op": "ready"}`` once; ``{"op": "spawned", "id", "pid"}``; ``{"op": "failed", "id",
"message"}``; ``{"op": "exit", "id", "status"}`` (negative: killed by that signal).

Standard library only: it runs on the kernels' runtime Python with ``-I -S``. Single-threaded, so forking is
safe. The gateway closing its end makes the agent kill everything it started and exit.
"""

import array
import fcntl
import json
import os
import resource
import selectors
import signal
import socket
import sys
import termios

MAX_PACKET = 1 << 20
MAX_FDS = 3


def apply_rlimits(limits):
    """Lower the rlimits every process of the sandbox inherits (lowering needs no privilege)."""
    names = {
        "nofile": resource.RLIMIT_NOFILE,
        "fsize": resource.RLIMIT_FSIZE,
        "core": resource.RLIMIT_CORE,
        "nproc": resource.RLIMIT_NPROC,
        "stack": resource.RLIMIT_STACK,
    }
    for name, value in limits.items():
        res = names[name]
        soft, hard = resource.getrlimit(res)
        value = int(value)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))


class Agent:
    def __init__(self, ctl):
        self.ctl = ctl
        self.by_pid = {}  # pid -> request id
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        # A handler (not SIG_DFL) so that SIGCHLD writes to the wakeup fd.
        signal.signal(signal.SIGCHLD, lambda *_: None)
        # The sandbox's own code may send these to us; they must not stop the agent.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)

    def send(self, obj):
        try:
            self.ctl.sendmsg([json.dumps(obj).encode()])
        except OSError:
            pass

    def run(self):
        self.selector.register(self.ctl, selectors.EVENT_READ, self.on_message)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.on_wake)
        self.send({"op": "ready", "pid": os.getpid()})
        while True:
            for key, _ in self.selector.select():
                key.data()

    def on_wake(self):
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        self.reap()

    def reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            req = self.by_pid.pop(pid, None)
            if req is not None:
                self.send({"op": "exit", "id": req, "status": os.waitstatus_to_exitcode(status)})

    def on_message(self):
        fds = array.array("i")
        try:
            data, ancdata, flags, _ = self.ctl.recvmsg(MAX_PACKET, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
        except InterruptedError:
            return
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - (len(cdata) % fds.itemsize)
                fds.frombytes(cdata[:usable])
        if not data:
            self.shutdown()
        try:
            msg = json.loads(data)
            op = msg["op"]
            if op == "spawn":
                self.spawn(msg, list(fds))
            elif op == "signal":
                self.signal(msg)
            else:
                self.send({"op": "failed", "id": msg.get("id"), "message": f"unknown op {op!r}"})
        except Exception as exc:  # a bad message must not end the agent
            self.send({"op": "failed", "id": None, "message": f"bad message: {exc}"})
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def spawn(self, msg, fds):
        req = msg["id"]
        argv = [str(a) for a in msg["argv"]]
        env = {str(k): str(v) for k, v in msg.get("env", {}).items()}
        cwd = msg.get("cwd") or "/workspace"
        pty = bool(msg.get("pty"))
        if len(fds) not in (1, 3) or not argv:
            self.send({"op": "failed", "id": req, "message": "spawn needs argv and 1 or 3 fds"})
            return
        stdio = fds * 3 if len(fds) == 1 else fds
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            self.send({"op": "failed", "id": req, "message": f"{type(exc).__name__}: {exc}", "errno": exc.errno})
            return
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(err_r)
            os.close(err_w)
            # EAGAIN here is the pids limit (or RLIMIT_NPROC): the gateway reports reason "pids".
            self.send({"op": "failed", "id": req, "message": f"{type(exc).__name__}: {exc}", "errno": exc.errno})
            return
        if pid == 0:  # child
            try:
                os.setsid()
                for target, fd in enumerate(stdio):
                    os.dup2(fd, target)
                if pty:
                    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
                os.closerange(3, err_w)
                os.closerange(err_w + 1, 65536)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                # Prefer the sandbox's workload over the agent when the memory cgroup must kill something.
                try:
                    with open("/proc/self/oom_score_adj", "w") as f:
                        f.write("500")
                except OSError:
                    pass
                os.chdir(cwd)
                os.execvpe(argv[0], argv, env)
            except BaseException as exc:
                try:
                    os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
                finally:
                    os._exit(127)
        os.close(err_w)
        chunks = []
        while True:
            chunk = os.read(err_r, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(err_r)
        if chunks:
            # exec failed: the child has exited; reap it here so no exit message follows.
            os.waitpid(pid, 0)
            self.send({"op": "failed", "id": req, "message": b"".join(chunks).decode(errors="replace")})
            return
        self.by_pid[pid] = req
        self.send({"op": "spawned", "id": req, "pid": pid})

    def signal(self, msg):
        target = None
        for pid, req in self.by_pid.items():
            if req == msg["id"]:
                target = pid
        if target is None:
            return
        sig = int(msg["signal"])
        try:
            if msg.get("group", True):
                os.killpg(target, sig)
            else:
                os.kill(target, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def shutdown(self):
        for pid in list(self.by_pid):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        os._exit(0)


def main():
    limits = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    apply_rlimits(limits)
    inherited = socket.socket(fileno=0)
    # Move the control socket off fd 0 (children get their own stdio), then point 0 at /dev/null.
    ctl = inherited.dup()
    inherited.detach()
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.close(devnull)
    ctl.setblocking(True)
    Agent(ctl).run()


if __name__ == "__main__":
    main()
