"""The system-call filter of every sandbox process: which calls the kernel answers and which get ``EPERM``.

The policy is an allow-list, Docker's default profile (``moby/profiles``, ``seccomp/default.json``) as it applies
to a process with no capabilities on x86_64 and aarch64, narrowed where a sandbox needs less:

- everything outside :data:`ALLOWED` answers ``EPERM`` (never a kill): among it ``io_uring_*``, ``bpf``,
  ``keyctl``/``add_key``/``request_key``, ``userfaultfd``, ``perf_event_open``, ``kexec_*``, the ``*_module``
  calls, ``mount``/``umount2``/``pivot_root``/``unshare``/``setns``, ``pidfd_getfd``, ``kcmp`` and the new mount
  API (:data:`DENIED` names the ones the tests try);
- ``clone`` only without namespace flags (:data:`CLONE_NAMESPACE_FLAGS`); ``clone3`` passes its flags behind a
  pointer that a filter cannot read, so it answers ``ENOSYS`` and libc falls back to ``clone`` (as Docker does);
- ``socket`` only for ``AF_UNIX``, ``AF_INET``, ``AF_INET6`` and ``AF_NETLINK`` with ``NETLINK_ROUTE`` (glibc's
  ``getaddrinfo`` and Node's ``os.networkInterfaces()`` read addresses through it; no netfilter, audit or
  uevent netlink); ``socketpair`` only for ``AF_UNIX``;
- ``personality`` only the values Docker allows (query, ``PER_LINUX``, ``PER_LINUX32``, ``UNAME26``): no
  ``ADDR_NO_RANDOMIZE``, no ``READ_IMPLIES_EXEC``;
- a call of another ABI (32-bit ``int 0x80``, x32) answers ``EPERM`` as well.

bubblewrap loads the program (``--seccomp FD``) as the very last step before it executes the sandbox's first
process, after it made its namespaces, and in its own pid 1 too; the filter is inherited by every process the
sandbox will ever start and can only be narrowed further.

Who calls what: :class:`~kernelhub.sandbox.sandbox.Sandbox` asks :func:`program_fd` for a fresh descriptor of the
compiled program at each launch; ``kernelhub doctor`` asks :func:`status`. The program is compiled once per
process (:func:`program`). libseccomp is reached through ``pyseccomp``, a ctypes binding of the system's
``libseccomp.so.2`` installable into the gateway's venv (Debian's ``python3-seccomp`` lives in the system
Python only).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import socket
import tempfile
from typing import Any

from .tools import data_fd

__all__ = [
    "ALLOWED",
    "CLONE_NAMESPACE_FLAGS",
    "DENIED",
    "Rule",
    "SeccompUnavailable",
    "program",
    "program_fd",
    "rules",
    "status",
]

#: Calls allowed with any arguments: Docker's unconditional list, plus ``ptrace`` and
#: ``process_vm_readv``/``writev``, which it allows on kernels >= 4.8 (where ptrace can no longer bypass a
#: filter). Names this libseccomp does not know, or that do not exist on this architecture, are left out.
ALLOWED: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "cachestat", "capget", "capset",
    "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64", "clock_getres",
    "clock_getres_time64", "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64",
    "close", "close_range", "connect", "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create",
    "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait",
    "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group", "faccessat",
    "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat",
    "fchmodat2", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr",
    "flock", "fork", "fremovexattr", "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64",
    "fsync", "ftruncate", "ftruncate64", "futex", "futex_requeue", "futex_time64", "futex_wait", "futex_waitv",
    "futex_wake", "futimesat", "getcpu", "getcwd", "getdents", "getdents64", "getegid", "getegid32", "geteuid",
    "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32", "getresuid",
    "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid", "getsockname", "getsockopt",
    "get_thread_area", "gettid", "gettimeofday", "getuid", "getuid32", "getxattr", "getxattrat",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "io_cancel", "ioctl",
    "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set",
    "io_setup", "io_submit", "ipc", "kill", "landlock_add_rule", "landlock_create_ruleset",
    "landlock_restrict_self", "lchown", "lchown32", "lgetxattr", "link", "linkat", "listen", "listmount",
    "listxattr", "listxattrat", "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr", "lstat",
    "lstat64", "madvise", "map_shadow_stack", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir",
    "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mq_getsetattr",
    "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink", "mremap", "mseal", "msgctl", "msgget", "msgrcv", "msgsnd", "msync",
    "munlock", "munlockall", "munmap", "name_to_handle_at", "nanosleep", "newfstatat", "_newselect", "open",
    "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc",
    "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64", "preadv", "preadv2",
    "prlimit64", "process_mrelease", "pselect6", "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read",
    "readahead", "readlink", "readlinkat", "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64",
    "recvmsg", "remap_file_pages", "removexattr", "removexattrat", "rename", "renameat", "renameat2",
    "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo",
    "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_tgsigqueueinfo",
    "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select", "semctl",
    "semget", "semop", "semtimedop", "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg",
    "sendmsg", "sendto", "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups",
    "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32", "setresgid", "setresgid32",
    "setresuid", "setresuid32", "setreuid", "setreuid32", "setrlimit", "set_robust_list", "setsid",
    "setsockopt", "set_thread_area", "set_tid_address", "setuid", "setuid32", "setxattr", "setxattrat",
    "shmat", "shmctl", "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask",
    "sigreturn", "socketcall", "splice", "stat", "stat64", "statfs", "statfs64", "statmount", "statx",
    "symlink", "symlinkat", "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time",
    "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime",
    "timer_settime64", "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64", "times", "tkill", "truncate", "truncate64", "ugetrlimit", "umask", "uname", "unlink",
    "unlinkat", "uretprobe", "utime", "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4",
    "waitid", "waitpid", "write", "writev",
    # Docker's per-architecture additions for the two we run on.
    "arch_prctl", "modify_ldt",
    # Docker allows these on kernels >= 4.8; a sandbox debugging its own processes (gdb, strace) needs them.
    # The agent is out of their reach: it makes itself non-dumpable (SECURITY.md pitfall 13).
    "ptrace", "process_vm_readv", "process_vm_writev",
)

#: Calls the tests prove answer ``EPERM`` inside a sandbox (everything not allowed does; these matter most).
DENIED: tuple[str, ...] = (
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "keyctl", "add_key", "request_key",
    "userfaultfd", "perf_event_open", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "mount", "umount2", "pivot_root", "unshare", "setns", "pidfd_getfd", "kcmp",
    "open_by_handle_at", "fsopen", "fsmount", "move_mount", "open_tree", "chroot", "acct", "swapon",
    "reboot", "syslog", "iopl", "ioperm", "settimeofday", "clock_settime",
)

#: ``CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET``
#: (``linux/sched.h``); Docker's mask for ``clone`` without ``CAP_SYS_ADMIN``.
CLONE_NAMESPACE_FLAGS = 0x7E020000
#: ``personality`` values allowed: ``PER_LINUX``, ``PER_LINUX32``, ``UNAME26``, ``UNAME26 | PER_LINUX32`` and
#: ``0xffffffff`` (query), Docker's.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)
#: ``socket`` families allowed with any protocol.
SOCKET_FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)
#: ``NETLINK_ROUTE`` from ``linux/netlink.h``: the one netlink protocol allowed.
NETLINK_ROUTE = 0


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule of the filter: ``syscall`` answers ``action`` (``"allow"`` or an errno name such as
    ``"ENOSYS"``) when every ``(argument index, op, value)`` of ``args`` holds. ``op`` is ``"eq"`` or
    ``"masked_eq"`` (``value`` is then ``(mask, expected)``). Rules for the same call are alternatives."""

    syscall: str
    action: str = "allow"
    args: tuple[tuple[int, str, Any], ...] = ()


def rules() -> list[Rule]:
    """The whole policy as data, in the order it is compiled. Pure; the tests read it."""
    out = [Rule(name) for name in ALLOWED]
    out.append(Rule("clone", args=((0, "masked_eq", (CLONE_NAMESPACE_FLAGS, 0)),)))
    out.append(Rule("clone3", action="ENOSYS"))
    out += [Rule("socket", args=((0, "eq", family),)) for family in SOCKET_FAMILIES]
    out.append(Rule("socket", args=((0, "eq", socket.AF_NETLINK), (2, "eq", NETLINK_ROUTE))))
    out.append(Rule("socketpair", args=((0, "eq", socket.AF_UNIX),)))
    out += [Rule("personality", args=((0, "eq", value),)) for value in PERSONALITIES]
    return out


class SeccompUnavailable(RuntimeError):
    """libseccomp (through ``pyseccomp``) is missing or refused the policy; the message says which."""


def _pyseccomp() -> Any:
    try:
        import pyseccomp  # noqa: PLC0415 - optional at import time: doctor reports its absence
    except (ImportError, OSError) as exc:  # OSError: libseccomp.so.2 itself is missing
        raise SeccompUnavailable(f"libseccomp is not usable: {exc} (apt-get install libseccomp2; pip install "
                                 "pyseccomp)") from None
    return pyseccomp


@functools.cache
def program() -> bytes:
    """The filter compiled to a classic BPF program (``struct sock_filter`` array, native arch), once per
    process. Raises :class:`SeccompUnavailable`."""
    sc = _pyseccomp()
    eperm = sc.ERRNO(errno.EPERM)
    try:
        flt = sc.SyscallFilter(eperm)
        # Another ABI's calls (int 0x80, x32) are refused too, rather than killing the process.
        flt.set_attr(sc.Attr.ACT_BADARCH, eperm)
        # bwrap sets no_new_privs itself; the program is exported, never loaded here.
        flt.set_attr(sc.Attr.CTL_NNP, 0)
        for rule in rules():
            number = sc.resolve_syscall(sc.Arch.NATIVE, rule.syscall)
            if number == -1:
                continue  # newer than this libseccomp: it answers EPERM like every call not listed
            action = sc.ALLOW if rule.action == "allow" else sc.ERRNO(getattr(errno, rule.action))
            args = []
            for index, op, value in rule.args:
                if op == "eq":
                    args.append(sc.Arg(index, sc.EQ, value))
                else:
                    mask, expected = value
                    args.append(sc.Arg(index, sc.MASKED_EQ, mask, expected))
            flt.add_rule(action, number, *args)
        with tempfile.TemporaryFile() as f:
            flt.export_bpf(f)
            f.seek(0)
            return f.read()
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp could not compile the filter: {exc}") from None


def program_fd() -> int:
    """A new file descriptor (close-on-exec, read position 0) holding :func:`program`, for bubblewrap's
    ``--seccomp FD``: the launcher passes it to bwrap, which reads and closes it before the sandbox's first
    process exists. The caller closes its own copy. Raises :class:`SeccompUnavailable`."""
    return data_fd("kernelhub-seccomp", program())


def status() -> tuple[bool, str]:
    """Whether the filter can be built here, and a sentence for ``kernelhub doctor``."""
    try:
        data = program()
    except SeccompUnavailable as exc:
        return False, str(exc)
    return True, (f"{len(data) // 8} BPF instructions from {len(rules())} rules (Docker's allow-list, narrowed); "
                  "denied calls answer EPERM, clone3 ENOSYS")
