"""The bubblewrap command line of a sandbox, as pure functions of a :class:`SandboxSpec`.

Nothing here touches the OS: :mod:`kernelhub.sandbox.sandbox` builds a spec, asks :func:`launch_argv` for the
command, and runs it. Keeping the argv pure makes every isolation property readable (and testable) in one place.

How the pieces fit (SECURITY.md pitfalls 1, 2, 9):

- ``/bin/sh`` (still root) writes its own pid into every ``cgroup.procs`` file, so the process and all it will
  ever fork are inside the sandbox's cgroup before any sandbox code exists;
- ``setpriv`` drops to the sandbox's own unprivileged host uid/gid, clears supplementary groups, sets
  no_new_privs and empties the capability sets;
- ``bwrap`` makes the namespaces and the filesystem view, and runs the agent (:mod:`kernelhub.sandbox.agent`)
  which starts every later process of the sandbox.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence

#: Where things appear inside every sandbox.
INNER_WORKSPACE = "/workspace"
INNER_RUN = "/run/kernelhub"
#: Where kernelspecs and ``PATH`` find the runtime's python and node inside (aliases of the runtime's own path).
INNER_RUNTIME = "/opt/kernelhub"
#: The runtime's parts reachable under :data:`INNER_RUNTIME`.
RUNTIME_PARTS = ("python", "node")
INNER_AGENT_DIR = "/opt/kernelhub-agent"
INNER_AGENT = f"{INNER_AGENT_DIR}/agent.py"
#: Where the sandbox's Python finds its start-up hook (on ``PYTHONPATH``; :mod:`kernelhub.sandbox.sitecustomize`).
INNER_SITE_DIR = f"{INNER_AGENT_DIR}/site"
INNER_HOME = "/home/user"
INNER_USER = "user"
INNER_UID = 1000
INNER_GID = 1000

#: System paths bound read-only. /usr holds the interpreters; the merged-/usr symlinks are recreated.
SYSTEM_RO_DIRS = ("/usr",)
MERGED_USR_LINKS = {"/bin": "usr/bin", "/sbin": "usr/sbin", "/lib": "usr/lib", "/lib64": "usr/lib64"}

#: The few host /etc entries that programs need; everything else in /etc (passwd, shadow, hostname, the
#: host's configuration) stays out of view. Generated files replace passwd, group, hosts and hostname.
ETC_RO_ENTRIES = (
    "alternatives",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "localtime",
    "mime.types",
    "fonts",
    "bash.bashrc",
    "profile",
    "inputrc",
    "terminfo",
    "magic",
    "protocols",
    "services",
)
GENERATED_ETC = ("passwd", "group", "hosts", "hostname", "nsswitch.conf")

#: Variables a sandbox starts with; the host environment never leaks in (``--clearenv``).
BASE_ENV = {
    "PATH": f"{INNER_RUNTIME}/python/bin:/node_modules/.bin:/usr/local/bin:/usr/bin:/bin",
    "HOME": INNER_HOME,
    "USER": INNER_USER,
    "LOGNAME": INNER_USER,
    "SHELL": "/bin/bash",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "xterm-256color",
    "TMPDIR": "/tmp",
    "PYTHONUNBUFFERED": "1",
    "MPLCONFIGDIR": "/tmp/.matplotlib",
    # The home is the workspace: caches, histories and profiles of the tools live in /tmp rather than there.
    "IPYTHONDIR": "/tmp/.ipython",
    "XDG_CACHE_HOME": "/tmp/.cache",
    "npm_config_cache": "/tmp/.npm",
    "HISTFILE": "/tmp/.bash_history",
    "NODE_REPL_HISTORY": "",
    "PYTHON_HISTORY": "/tmp/.python_history",
    "NODE_PATH": "/node_modules",
    # The user site (~/.local, in the workspace) for pip install --user: kernelhub.sandbox.sitecustomize.
    "PYTHONPATH": INNER_SITE_DIR,
}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: Variables a request may not set: they would change how the dynamic loader or interpreters start.
RESERVED_ENV = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "JPY_PARENT_PID"})


def valid_env_name(name: str) -> bool:
    return bool(_ENV_NAME.match(name)) and name not in RESERVED_ENV


@dataclasses.dataclass(frozen=True)
class SandboxSpec:
    """Everything the bubblewrap command line depends on. Host paths unless the name says ``inner``."""

    sandbox_id: str
    uid: int
    gid: int
    hostname: str
    workspace: str
    run_dir: str
    etc_dir: str
    agent_dir: str
    runtime_dir: str | None = None
    node_modules: str | None = None
    tmp_size_bytes: int = 256 * 1024 * 1024
    shm_size_bytes: int = 64 * 1024 * 1024
    network: str = "none"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.runtime_dir is not None:
            _check_runtime_dir(self.runtime_dir)
        if self.uid <= 0 or self.gid <= 0:
            raise ValueError("a sandbox never runs as host uid/gid 0")
        if not _HOSTNAME.match(self.hostname):
            raise ValueError(f"bad hostname {self.hostname!r}")
        if self.network != "none":
            raise ValueError(f"network mode {self.network!r} is not supported yet")
        for name in self.env:
            if not valid_env_name(name):
                raise ValueError(f"bad environment variable name {name!r}")


def _check_runtime_dir(path: str) -> None:
    """Refuse a runtime path that cannot appear inside at its own path next to the :data:`INNER_RUNTIME`
    aliases: it must be absolute and normalised, and neither hold ``/opt/kernelhub`` nor sit in an alias."""
    if not path.startswith("/") or posixpath.normpath(path) != path or path == "/":
        raise ValueError(f"the runtime directory must be an absolute, normalised path, not {path!r}")
    if path == INNER_RUNTIME:
        return
    aliases = [f"{INNER_RUNTIME}/{part}" for part in RUNTIME_PARTS]
    if INNER_RUNTIME.startswith(path + "/") or any(path == a or path.startswith(a + "/") for a in aliases):
        raise ValueError(f"the runtime directory {path!r} overlaps the aliases under {INNER_RUNTIME}")


def sandbox_env(spec: SandboxSpec, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process in the sandbox: base, then the sandbox's, then the call's."""
    env = dict(BASE_ENV)
    env["HOSTNAME"] = spec.hostname
    env.update(spec.env)
    if extra:
        env.update(extra)
    return env


def bwrap_argv(spec: SandboxSpec, command: Sequence[str], *, bwrap: str = "bwrap",
               seccomp_fd: int | None = None) -> list[str]:
    """The bubblewrap invocation that runs ``command`` as the sandbox's first process; with ``seccomp_fd``, the
    system-call filter read from that descriptor (:mod:`kernelhub.sandbox.seccomp`) holds for every process in
    the sandbox (bwrap loads it last, right before it executes ``command``, and in its own pid 1)."""
    return [bwrap, *bwrap_options(spec, seccomp_fd=seccomp_fd), "--", *command]


def bwrap_options(spec: SandboxSpec, *, seccomp_fd: int | None = None) -> list[str]:
    """The options of :func:`bwrap_argv`, without the program name and the command."""
    argv = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        "--unshare-net",
        # Nested user namespaces are the usual way into kernel bugs; nothing in a sandbox needs them.
        "--disable-userns",
        "--uid", str(INNER_UID),
        "--gid", str(INNER_GID),
        "--hostname", spec.hostname,
        "--cap-drop", "ALL",
        "--new-session",
        "--die-with-parent",
        "--clearenv",
    ]
    for path in SYSTEM_RO_DIRS:
        argv += ["--ro-bind", path, path]
    # /usr/local is the host admin's: hide it behind an empty read-only tmpfs.
    argv += ["--tmpfs", "/usr/local", "--remount-ro", "/usr/local"]
    for link, target in MERGED_USR_LINKS.items():
        argv += ["--symlink", target, link]
    for entry in ETC_RO_ENTRIES:
        argv += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
    for entry in GENERATED_ETC:
        argv += ["--ro-bind", f"{spec.etc_dir}/{entry}", f"/etc/{entry}"]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(spec.shm_size_bytes), "--tmpfs", "/dev/shm",
        "--size", str(spec.tmp_size_bytes), "--tmpfs", "/tmp",
        "--dir", "/run",
    ]
    if spec.runtime_dir:
        # At its host path, so that every absolute path its installers wrote holds inside as outside: pip's and
        # jupyter's scripts start with ``#!<runtime>/python/bin/python3``. /opt/kernelhub/{python,node} stay
        # the names kernelspecs and PATH use, as symlinks into it.
        argv += ["--ro-bind", spec.runtime_dir, spec.runtime_dir]
        if spec.runtime_dir != INNER_RUNTIME:
            for part in RUNTIME_PARTS:
                argv += ["--symlink", f"{spec.runtime_dir}/{part}", f"{INNER_RUNTIME}/{part}"]
    if spec.node_modules:
        # Bound at /node_modules so that Node's resolution from /workspace finds tslab's @types/node.
        argv += ["--ro-bind", spec.node_modules, "/node_modules"]
    argv += ["--ro-bind", spec.agent_dir, INNER_AGENT_DIR]
    # Bound after the tmpfs mounts so that none of them hides it (KERNELS.md).
    argv += ["--bind", spec.run_dir, INNER_RUN]
    argv += ["--bind", spec.workspace, INNER_WORKSPACE]
    # The home is the workspace too (E2B's /home/user, E2B.md P9): what a user keeps there persists and counts
    # against the disk quota. The tools' own dotfiles go to /tmp instead (BASE_ENV), not into the workspace.
    argv += ["--bind", spec.workspace, INNER_HOME]
    # Nothing is writable outside /workspace, /tmp, /dev/shm and the home: not even bwrap's root tmpfs.
    argv += ["--remount-ro", "/"]
    argv += ["--chdir", INNER_WORKSPACE]
    for key, value in sandbox_env(spec).items():
        argv += ["--setenv", key, value]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


def args_data(options: Sequence[str]) -> bytes:
    """``options`` as bubblewrap's ``--args FD`` reads them: each one NUL-terminated. Raises ValueError for an
    option holding a NUL byte (it would split in two)."""
    if any("\0" in option for option in options):
        raise ValueError("a bubblewrap option cannot contain a NUL byte")
    return b"".join(option.encode() + b"\0" for option in options)


def agent_command(python: str = "/usr/bin/python3") -> list[str]:
    """The sandbox's first process: the agent that starts every other one."""
    return [python, "-I", "-S", "-B", INNER_AGENT]


_JOIN_SCRIPT = (
    'while [ "$1" != "--" ]; do echo $$ > "$1" || exit 121; shift; done; shift; exec "$@"'
)


def launch_argv(
    spec: SandboxSpec,
    cgroup_procs_files: Iterable[str],
    command: Sequence[str],
    *,
    bwrap: str = "bwrap",
    setpriv: str = "setpriv",
    as_root: bool = True,
    seccomp_fd: int | None = None,
    args_fd: int | None = None,
) -> list[str]:
    """The whole launch: join the cgroups, drop to the sandbox uid, then bubblewrap.

    ``as_root`` is false when the gateway itself is unprivileged (``kernelhub doctor`` reports the loss): then
    there is no uid to drop to and the cgroup files must already be writable by the caller. With ``args_fd``,
    bubblewrap reads its options (:func:`args_data` of :func:`bwrap_options`) from that descriptor instead of its
    command line: bwrap stays the sandbox's pid 1, whose ``/proc/1/cmdline`` every process inside can read, and
    the options name host paths (the state directory, the sandbox's own). bwrap closes both descriptors before
    anything of the sandbox runs.
    """
    if args_fd is not None:
        inner = [bwrap, "--args", str(args_fd), "--", *command]
    else:
        inner = bwrap_argv(spec, command, bwrap=bwrap, seccomp_fd=seccomp_fd)
    if as_root:
        inner = [
            setpriv,
            f"--reuid={spec.uid}",
            f"--regid={spec.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            *inner,
        ]
    files = list(cgroup_procs_files)
    if not files:
        return inner
    return ["/bin/sh", "-c", _JOIN_SCRIPT, "kernelhub-join", *files, "--", *inner]


def passwd_files(spec: SandboxSpec) -> dict[str, str]:
    """Contents of the generated /etc files: only the sandbox's own user, no host accounts."""
    return {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"{INNER_USER}:x:{INNER_UID}:{INNER_GID}:sandbox user:{INNER_HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\n{INNER_USER}:x:{INNER_GID}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1 localhost {spec.hostname}\n::1 localhost ip6-localhost ip6-loopback\n",
        "hostname": f"{spec.hostname}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    }
