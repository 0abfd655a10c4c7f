"""The sandbox launch as pure functions of a spec (kernelhub.sandbox.bwrap): the bubblewrap argv, the cgroup
join, the generated /etc files."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kernelhub.sandbox import bwrap

SPEC = bwrap.SandboxSpec(
    sandbox_id="sbtest",
    uid=201234,
    gid=201234,
    hostname="sandbox-sbtest",
    workspace="/state/sandboxes/sbtest/workspace",
    run_dir="/state/sandboxes/sbtest/run",
    etc_dir="/state/sandboxes/sbtest/etc",
    agent_dir="/state/agent",
    runtime_dir="/opt/kernelhub/runtime",
    node_modules="/opt/kernelhub/runtime/node/node_modules",
    env={"MY_VAR": "1"},
)


PROCS = ["/sys/fs/cgroup/memory/kernelhub/sbtest/cgroup.procs", "/sys/fs/cgroup/pids/kernelhub/sbtest/cgroup.procs"]


COMMAND = ["/usr/bin/python3", "-I", "/opt/kernelhub-agent/agent.py"]


def pairs(argv: list[str], flag: str) -> list[str]:
    """Every value that follows ``flag`` in ``argv``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def index_of(argv: list[str], *seq: str) -> int:
    for i in range(len(argv) - len(seq) + 1):
        if argv[i : i + len(seq)] == list(seq):
            return i
    raise AssertionError(f"{seq} not in {argv}")


def test_bwrap_argv_isolates_everything() -> None:
    argv = bwrap.bwrap_argv(SPEC, COMMAND, bwrap="/usr/bin/bwrap")
    options = argv[: argv.index("--")]
    assert argv[0] == "/usr/bin/bwrap"
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup",
                 "--unshare-net", "--disable-userns", "--clearenv", "--new-session", "--die-with-parent"):
        assert flag in options, flag
    assert "--share-net" not in options and "--unshare-all" not in options
    assert pairs(options, "--cap-drop") == ["ALL"] and "--cap-add" not in options
    assert pairs(options, "--uid") == [str(bwrap.INNER_UID)] and pairs(options, "--gid") == [str(bwrap.INNER_GID)]
    assert pairs(options, "--hostname") == [SPEC.hostname]
    assert pairs(options, "--proc") == ["/proc"] and pairs(options, "--dev") == ["/dev"]
    # Nothing of the host beyond /usr and a few /etc entries: no /, /sys, /home, /root, /run or /tmp of the host.
    sources = pairs(options, "--bind") + pairs(options, "--ro-bind") + pairs(options, "--ro-bind-try")
    for source in sources:
        assert source == "/usr" or source.startswith(("/etc/", "/state/", "/opt/kernelhub/runtime")), source
    assert not any(s in ("/", "/sys", "/etc", "/proc", "/dev", "/tmp", "/run") for s in sources)
    assert not any(s.startswith("/sys") for s in options)
    assert "/etc/shadow" not in sources and "/etc/passwd" not in sources
    assert index_of(options, "--ro-bind", "/usr", "/usr") >= 0
    # The writable binds are exactly the run dir and the workspace (at /workspace and as the home, E2B's
    # /home/user).
    assert pairs(options, "--bind") == [SPEC.run_dir, SPEC.workspace, SPEC.workspace]
    assert index_of(options, "--bind", SPEC.workspace, bwrap.INNER_HOME) > index_of(
        options, "--bind", SPEC.workspace, bwrap.INNER_WORKSPACE)
    assert bwrap.INNER_HOME not in pairs(options, "--tmpfs")
    assert argv[argv.index("--") + 1 :] == COMMAND


def test_private_tmp_and_shm_with_sizes_and_run_dir_bound_after_them() -> None:
    argv = bwrap.bwrap_argv(SPEC, COMMAND)
    tmp = index_of(argv, "--size", str(SPEC.tmp_size_bytes), "--tmpfs", "/tmp")
    shm = index_of(argv, "--size", str(SPEC.shm_size_bytes), "--tmpfs", "/dev/shm")
    run = index_of(argv, "--bind", SPEC.run_dir, bwrap.INNER_RUN)
    # A later --tmpfs on /tmp or /run would hide the bound run dir (KERNELS.md).
    assert run > tmp and run > shm and run > index_of(argv, "--dir", "/run")
    assert index_of(argv, "--bind", SPEC.workspace, bwrap.INNER_WORKSPACE) > tmp
    assert pairs(argv, "--chdir") == [bwrap.INNER_WORKSPACE]


def test_environment_is_only_the_sandbox_own() -> None:
    argv = bwrap.bwrap_argv(SPEC, COMMAND)
    names = pairs(argv, "--setenv")
    env = dict(zip(names, [argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"], strict=True))
    assert env == {**bwrap.BASE_ENV, "HOSTNAME": SPEC.hostname, "MY_VAR": "1"}
    assert "--clearenv" in argv[: argv.index("--setenv")]
    assert bwrap.sandbox_env(SPEC, {"X": "2"})["X"] == "2"


def test_launch_joins_cgroup_then_drops_to_the_uid_then_bwrap() -> None:
    argv = bwrap.launch_argv(SPEC, PROCS, COMMAND, bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv")
    assert argv[:2] == ["/bin/sh", "-c"]
    # The join script gets the procs files before the first "--", then the rest of the chain.
    first_sep = argv.index("--")
    assert argv[4:first_sep] == PROCS
    setpriv = argv.index("/usr/bin/setpriv")
    bwrap_at = argv.index("/usr/bin/bwrap")
    assert first_sep < setpriv < bwrap_at
    drop = argv[setpriv:bwrap_at]
    for flag in (f"--reuid={SPEC.uid}", f"--regid={SPEC.gid}", "--clear-groups", "--no-new-privs",
                 "--inh-caps=-all", "--bounding-set=-all"):
        assert flag in drop, flag
    assert argv[bwrap_at:] == bwrap.bwrap_argv(SPEC, COMMAND, bwrap="/usr/bin/bwrap")


def test_the_join_script_really_writes_its_pid_before_exec(tmp_path: Path) -> None:
    procs = [tmp_path / "a.procs", tmp_path / "b.procs"]
    argv = bwrap.launch_argv(SPEC, [str(p) for p in procs], ["/bin/sh", "-c", "echo $$"], as_root=False)
    # Run only the join step: replace everything after the procs files by a command that reports its pid.
    join = argv[: argv.index("--") + 1] + ["/bin/sh", "-c", "echo $$"]
    out = subprocess.run(join, capture_output=True, text=True, check=True).stdout.strip()
    # exec keeps the pid: the pid written before exec is the workload's own.
    assert [p.read_text().strip() for p in procs] == [out, out]


def test_launch_without_root_or_cgroups() -> None:
    assert bwrap.launch_argv(SPEC, [], COMMAND, as_root=False) == bwrap.bwrap_argv(SPEC, COMMAND)
    assert bwrap.launch_argv(SPEC, [], COMMAND)[0] == "setpriv"


@pytest.mark.parametrize(
    "change",
    [{"uid": 0}, {"gid": 0}, {"hostname": "Bad_Host"}, {"hostname": "x" * 64}, {"network": "host"},
     {"env": {"LD_PRELOAD": "/x.so"}}, {"env": {"JPY_PARENT_PID": "1"}}, {"env": {"A=B": "1"}}],
)
def test_spec_refuses_unsafe_values(change: dict[str, Any]) -> None:
    fields = {f: getattr(SPEC, f) for f in SPEC.__dataclass_fields__}
    with pytest.raises(ValueError):
        bwrap.SandboxSpec(**{**fields, **change})


def test_runtime_appears_at_its_own_path_with_the_inner_names_as_links() -> None:
    # Its installers wrote host paths into it (script shebangs): they must hold inside.
    argv = bwrap.bwrap_argv(SPEC, COMMAND)
    assert index_of(argv, "--ro-bind", "/opt/kernelhub/runtime", "/opt/kernelhub/runtime") >= 0
    assert index_of(argv, "--symlink", "/opt/kernelhub/runtime/python", "/opt/kernelhub/python") >= 0
    assert index_of(argv, "--symlink", "/opt/kernelhub/runtime/node", "/opt/kernelhub/node") >= 0
    # A runtime installed at /opt/kernelhub itself needs no links; elsewhere, the links point there.
    at_inner = bwrap.bwrap_argv(dataclasses.replace(SPEC, runtime_dir=bwrap.INNER_RUNTIME), COMMAND)
    assert index_of(at_inner, "--ro-bind", bwrap.INNER_RUNTIME, bwrap.INNER_RUNTIME) >= 0
    link_targets = [at_inner[i + 2] for i, a in enumerate(at_inner) if a == "--symlink"]
    assert not any(t.startswith(bwrap.INNER_RUNTIME) for t in link_targets), link_targets
    elsewhere = bwrap.bwrap_argv(dataclasses.replace(SPEC, runtime_dir="/srv/rt"), COMMAND)
    assert index_of(elsewhere, "--symlink", "/srv/rt/python", "/opt/kernelhub/python") >= 0


@pytest.mark.parametrize("runtime_dir", ["opt/rt", "/srv/rt/", "/srv/../rt", "/", "/opt",
                                         "/opt/kernelhub/python", "/opt/kernelhub/node/x"])
def test_spec_refuses_runtime_paths_that_cannot_appear_at_their_own_path(runtime_dir: str) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(SPEC, runtime_dir=runtime_dir)


def test_generated_etc_has_no_host_accounts() -> None:
    files = bwrap.passwd_files(SPEC)
    assert set(files) == set(bwrap.GENERATED_ETC)
    assert [line.split(":")[0] for line in files["passwd"].splitlines()] == ["root", "user", "nobody"]
    assert "shadow" not in bwrap.ETC_RO_ENTRIES and "sudoers" not in bwrap.ETC_RO_ENTRIES
