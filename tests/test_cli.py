"""The ``kernelhub`` command, run as a real subprocess: doctor (text, JSON, and on a host it cannot trust),
kernelspecs install (into a data directory, an environment that has kernelhub and one that has not), help and
version, mistakes (exit 2 with a sentence), a busy port, and the start-up that serve and the embedded mcp share."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

KERNELHUB = str(Path(sys.executable).with_name("kernelhub"))
CHECKS = ("root", "bubblewrap", "user namespaces", "seccomp", "bwrap CVE-2020-5291 (GHSA-j2qp-rvxj-43vj)",
          "bwrap CVE-2017-5226", "bwrap CVE-2024-42472", "bwrap CVE-2021-41133", "cgroups", "cgroup memory",
          "cgroup cpu", "cgroup pids", "swap accounting", "freezer", "workspace quota", "python runtime",
          "node runtime")
SPECS = ("kernelhub-bash", "kernelhub-javascript", "kernelhub-python", "kernelhub-typescript")


def kernelhub(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KERNELHUB, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.cgroups
def test_doctor_passes_here_and_prints_every_check() -> None:
    result = kernelhub("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in CHECKS:
        assert any(line.startswith("[") and f"] {name}: " in line for line in lines), name
    assert not any(line.startswith("[FAIL]") for line in lines)
    assert "Strict isolation can be enforced" in result.stdout


@pytest.mark.root
@pytest.mark.bwrap
@pytest.mark.cgroups
def test_doctor_json() -> None:
    result = kernelhub("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["isolation"] == "strict" and report["enforceable"] is True
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    for check in report["checks"]:
        assert set(check) == {"name", "ok", "detail", "required"}
        assert isinstance(check["ok"], bool) and check["detail"]
    by_name = {c["name"]: c for c in report["checks"]}
    # This host has memsw (v1 swap accounting): the doctor must say so.
    memsw = Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
    assert by_name["swap accounting"]["ok"] is memsw


@pytest.mark.root
@pytest.mark.bwrap
def test_doctor_reports_the_filter_and_bubblewrap_advisories_and_needs_the_filter() -> None:
    report = json.loads(kernelhub("doctor", "--json").stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["seccomp"]["ok"] and by_name["seccomp"]["required"] and "EPERM" in by_name["seccomp"]["detail"]
    assert "bubblewrap 0." in by_name["bubblewrap"]["detail"] and "not setuid" in by_name["bubblewrap"]["detail"]
    advisories = [c for c in report["checks"] if c["name"].startswith("bwrap CVE-")]
    assert len(advisories) == 4 and all(c["ok"] and "not affected" in c["detail"] for c in advisories)
    assert all("kernelhub" in c["detail"] for c in advisories)  # why kernelhub's way of calling bwrap is safe
    # Strict isolation without the filter is refused.
    result = kernelhub("doctor", KERNELHUB_SECCOMP="false")
    assert result.returncode == 1 and "[FAIL] seccomp: turned off" in result.stdout, result.stdout
    assert kernelhub("doctor", "--isolation", "relaxed", KERNELHUB_SECCOMP="false").returncode == 0


def test_doctor_fails_without_cgroups(tmp_path: Path) -> None:
    result = kernelhub("doctor", KERNELHUB_CGROUP_ROOT=str(tmp_path))
    assert result.returncode == 1
    assert f"[FAIL] cgroups: no cgroup hierarchy at {tmp_path}" in result.stdout
    for controller in ("memory", "cpu", "pids"):
        assert f"[FAIL] cgroup {controller}:" in result.stdout
    assert "can NOT be enforced" in result.stdout
    # Relaxed isolation accepts the same machine.
    assert kernelhub("doctor", "--isolation", "relaxed", KERNELHUB_CGROUP_ROOT=str(tmp_path)).returncode == 0


@pytest.mark.root
@pytest.mark.cgroups
def test_doctor_fails_on_a_cgroup2_mount_without_controllers() -> None:
    # /sys/fs/cgroup/unified here is cgroup2 with no memory, cpu or pids controller: no limit can hold there.
    root = "/sys/fs/cgroup/unified"
    offered = set(Path(root, "cgroup.controllers").read_text().split())
    assert not offered & {"memory", "cpu", "pids"}
    result = kernelhub("doctor", "--json", KERNELHUB_CGROUP_ROOT=root)
    report = json.loads(result.stdout)
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["cgroups"]["ok"] is True
    for controller in ("memory", "cpu", "pids"):
        assert by_name[f"cgroup {controller}"]["ok"] is False, controller
    assert report["enforceable"] is False and result.returncode == 1


def test_kernelspecs_install_into_a_prefix(tmp_path: Path) -> None:
    result = kernelhub("kernelspecs", "install", "--prefix", str(tmp_path))
    assert result.returncode == 0, result.stderr
    kernels = tmp_path / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kernels.iterdir()) == list(SPECS)
    assert result.stdout.count("installed ") == 4
    for name in SPECS:
        spec = json.loads((kernels / name / "kernel.json").read_text())
        assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "kernelhub-provisioner"
        assert "{connection_file}" in spec["argv"] and spec["display_name"].endswith("(kernelhub sandbox)")
        for logo in ("logo-32x32.png", "logo-64x64.png"):
            assert (kernels / name / logo).read_bytes().startswith(b"\x89PNG"), logo
    # Installing again replaces, and `list` names the same four.
    assert kernelhub("kernelspecs", "install", "--prefix", str(tmp_path)).returncode == 0
    assert kernelhub("kernelspecs", "list").stdout.split() == list(SPECS)


def test_unknown_command_exits_2_with_a_message() -> None:
    result = kernelhub("bogus")
    assert result.returncode == 2
    assert "unknown command 'bogus'" in result.stderr and "kernelhub --help" in result.stderr
    assert result.stdout == ""
    assert kernelhub().returncode == 2
    helped = kernelhub("--help")
    assert helped.returncode == 0 and "doctor" in helped.stdout and "kernelspecs" in helped.stdout
    bad_option = kernelhub("doctor", "--bogus")
    assert bad_option.returncode == 2 and "unrecognized arguments" in bad_option.stderr


# -- one command line: help, version, mistakes ---------------------------------------------------------------

COMMANDS = (("serve",), ("mcp",), ("doctor",), ("kernelspecs", "install"), ("kernelspecs", "list"))


def help_entries(text: str) -> dict[str, list[str]]:
    """``--name=<Type>`` entries of a help text: each option's name and its indented lines."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if re.match(r"--[A-Za-z]", line):
            current = entries.setdefault(line.split("=")[0], [])
        elif current is not None and line.startswith("    "):
            current.append(line.strip())
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_true_defaults_and_each_variable(command: tuple[str, ...]) -> None:
    for option in ("--help", "--help-all"):
        result = kernelhub(*command, option)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert "Undefined" not in result.stdout
        for name, lines in help_entries(result.stdout).items():
            if any(line.startswith("Equivalent to: [--") and "=" in line for line in lines):
                continue  # a flag: it names the variable with the value it sets
            assert any(line.startswith("Default: ") for line in lines), (name, lines)
            assert any(line.startswith("Environment: KERNELHUB_") for line in lines), (name, lines)


def test_serve_help_names_the_documented_options_with_their_defaults() -> None:
    entries = help_entries(kernelhub("serve", "--help").stdout)
    for option in ("--ip", "--port", "--token", "--api-keys", "--state-dir", "--config", "--isolation",
                   "--allow-origin", "--max-sandboxes", "--log-level", "--debug"):
        assert option in entries, option
    assert "Default: 8888" in entries["--port"] and "Environment: KERNELHUB_PORT" in entries["--port"]
    assert "Default: '127.0.0.1'" in entries["--ip"]
    assert "Default: 'strict'" in entries["--isolation"]
    assert "Environment: KERNELHUB_MAX_SANDBOXES_PER_TENANT" in entries["--max-sandboxes"]
    assert "Default: /var/lib/kernelhub as root, else ~/.local/share/kernelhub" in entries["--state-dir"]
    every = help_entries(kernelhub("serve", "--help-all").stdout)
    assert "Environment: KERNELHUB_TEMPLATES (a JSON object)" in every["--Hub.extra_templates"]


def test_version() -> None:
    from kernelhub import __version__

    for argv in (("--version",), ("serve", "--version"), ("-V",)):
        result = kernelhub(*argv)
        assert result.returncode == 0 and result.stdout == f"kernelhub {__version__}\n", argv


@pytest.mark.parametrize(("argv", "said"), [
    (("serve", "--bogus"), "kernelhub serve: unrecognized arguments: --bogus; try `kernelhub serve --help`."),
    (("mcp", "--bogus=1"), "kernelhub mcp: unrecognized arguments: --bogus; try `kernelhub mcp --help`."),
    (("kernelspecs", "install", "-x"), "kernelhub kernelspecs install: unrecognized arguments: -x"),
    (("serve", "9000"), "kernelhub serve: unexpected argument '9000'"),
    (("kernelspecs", "bogus"), "kernelhub kernelspecs: unknown command 'bogus'; try `kernelhub kernelspecs --help`"),
    (("kernelspecs",), "kernelhub kernelspecs: say which command: install, list"),
    (("--port", "1"), "kernelhub: unrecognized arguments: --port"),
    (("serve", "--port"), "kernelhub serve: argument --port: expected one argument"),
    (("serve", "--port", "eighty"), "kernelhub serve: --port='eighty': expected an int"),
    (("doctor", "--isolation", "loose"), "kernelhub doctor: --isolation='loose': expected any of ['strict', "),
    (("serve", "--Hub.max_sandboxes=3"), "kernelhub serve: on the command line: Hub has no option 'max_sandboxes'"),
    (("serve", "--Nope.x=3"), "kernelhub serve: on the command line: unknown option 'Nope'"),
    (("serve", "--ServeApp.body_timeout=-1"), "kernelhub serve: ServeApp.body_timeout must be 0 (no deadline) or "),
    (("serve", "--ServeApp.header_timeout=0"), "kernelhub serve: ServeApp.header_timeout must be positive"),
    (("serve", "--ServeApp.max_connections=0"), "kernelhub serve: ServeApp.max_connections must be positive"),
    (("serve", "--config", "/nonexistent/kernelhub_config.py"),
     "the config file /nonexistent/kernelhub_config.py (from --config) does not exist."),
])
def test_mistakes_exit_2_with_a_sentence(argv: tuple[str, ...], said: str) -> None:
    result = kernelhub(*argv)
    assert result.returncode == 2, result.stderr
    assert said in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", (("serve",), ("mcp",), ("doctor",)), ids=" ".join)
def test_a_bad_variable_or_config_file_is_named(command: tuple[str, ...], tmp_path: Path) -> None:
    result = kernelhub(*command, KERNELHUB_ISOLATION="loose")
    assert result.returncode == 2 and result.stderr.startswith(f"kernelhub {command[0]}: KERNELHUB_ISOLATION=")
    broken = tmp_path / "broken.py"
    broken.write_text("c.SandboxFactory.isolation = 'loose'\n")
    result = kernelhub(*command, KERNELHUB_CONFIG=str(broken))
    assert result.returncode == 2
    assert f"the config file {broken} (from KERNELHUB_CONFIG): SandboxFactory.isolation" in result.stderr
    broken.write_text("c.SandboxFactory.isolation = \n")
    result = kernelhub(*command, "--config", str(broken))
    assert result.returncode == 2 and "could not be loaded: SyntaxError" in result.stderr, result.stderr
    assert result.stdout == ""


def test_a_json_variable_that_is_not_json_is_named() -> None:
    for var in ("KERNELHUB_TEMPLATES", "KERNELHUB_DEFAULT_LIMITS", "KERNELHUB_MAX_LIMITS"):
        result = kernelhub("serve", **{var: "{memory_mb: 1}"})
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"kernelhub serve: {var}='{{memory_mb: 1}}': expected a dict (not valid JSON")


# -- serve and the embedded mcp: one start-up path ------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "variable"])
def test_a_busy_port_is_named_with_how_to_choose_another(how: str, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--state-dir", str(tmp_path / "state"), "--isolation", "relaxed"]
        result = (kernelhub(*argv, "--port", str(port)) if how == "option"
                  else kernelhub(*argv, KERNELHUB_PORT=str(port)))
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in result.stderr
    assert "--port N (or KERNELHUB_PORT=N), or --port 0" in result.stderr and "Errno" not in result.stderr
    # Bound before anything started: no state directory, nothing reaped.
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(("command", "hint"), [
    (("serve", "--port", "0"), "start with --isolation=relaxed"),
    (("mcp",), "or drive a gateway with --url"),
])
def test_serve_and_embedded_mcp_refuse_what_isolation_cannot_hold(command: tuple[str, ...], hint: str,
                                                                  tmp_path: Path) -> None:
    result = kernelhub(*command, "--state-dir", str(tmp_path / "state"), KERNELHUB_CGROUP_ROOT=str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert f"kernelhub {command[0]}: Refusing to start: this machine cannot enforce strict isolation" in result.stderr
    assert f"cgroups: no cgroup hierarchy at {tmp_path}" in result.stderr and hint in result.stderr
    assert result.stdout == ""  # for mcp, stdout is the protocol's


def test_the_mcp_package_does_not_import_the_app() -> None:
    code = ("import sys, kernelhub.mcp.server, kernelhub.mcp.http\n"
            "assert 'kernelhub.app' not in sys.modules and 'kernelhub.cli' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- kernelspecs install into another environment ---------------------------------------------------------------


def make_env(path: Path, *, with_kernelhub: bool) -> Path:
    """A real venv at ``path``; with kernelhub importable there (through this venv's site-packages) or not."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    if with_kernelhub:
        ours = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
        (theirs,) = path.glob("lib/python*/site-packages")
        (theirs / "kernelhub_here.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return path / "bin" / "python"


def test_kernelspecs_install_refuses_an_environment_without_the_provisioner(tmp_path: Path) -> None:
    python = make_env(tmp_path / "env", with_kernelhub=False)
    result = kernelhub("kernelspecs", "install", "--prefix", str(tmp_path / "env"))
    assert result.returncode == 1 and result.stdout == ""
    message = result.stderr
    assert message.startswith(f"kernelhub kernelspecs install: not installing into {tmp_path / 'env'}: "), message
    assert "NoSuchKernel" in message and f"its Python ({python})" in message and "'kernelhub-provisioner'" in message
    assert f"{python} -m pip install 'kernelhub[server]'" in message
    assert not (tmp_path / "env" / "share" / "jupyter").exists()


def test_kernelspecs_install_into_an_environment_that_can_start_them(tmp_path: Path) -> None:
    python = make_env(tmp_path / "env", with_kernelhub=True)
    result = kernelhub("kernelspecs", "install", "--prefix", str(tmp_path / "env"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("installed ") == 4 and result.stderr == ""
    # That environment's jupyter_client finds the specs and their provisioner (what NoSuchKernel is about).
    code = ("from jupyter_client.kernelspec import KernelSpecManager\n"
            "from jupyter_client.provisioning import KernelProvisionerFactory as F\n"
            "spec = KernelSpecManager().get_kernel_spec('kernelhub-python')\n"
            "assert F.instance().is_provisioner_available(spec)\n"
            "print(spec.resource_dir)")
    found = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")})
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().startswith(str(tmp_path / "env" / "share" / "jupyter" / "kernels"))
