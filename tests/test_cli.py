"""The ``kernelhub`` command, run as a real subprocess: doctor (text, JSON, and on a host it cannot trust),
kernelspecs install, and unknown commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNELHUB = str(Path(sys.executable).with_name("kernelhub"))
CHECKS = ("root", "bubblewrap", "user namespaces", "cgroups", "cgroup memory", "cgroup cpu", "cgroup pids",
          "swap accounting", "freezer", "workspace quota", "seccomp", "python runtime", "node runtime")
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
