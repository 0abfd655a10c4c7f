"""Tests of kernelhub.sandbox.cgroups.detect against the real kernel: statfs detection and the probe."""

from __future__ import annotations

import os

import pytest

from kernelhub.errors import IsolationUnavailable
from kernelhub.sandbox.cgroups import (
    create_cgroup,
    detect_version,
    probe,
)
from kernelhub.sandbox.limits import Limits
from tests.sandbox.cgroups.support import (
    V1_ROOT,
    V2_ROOT,
    real,
    unique,
)


@real
def test_detect_version() -> None:
    assert detect_version(V1_ROOT) == 1  # tmpfs with v1 hierarchies (and a v2 mount beside them)
    assert detect_version(V2_ROOT) == 2
    assert detect_version("/proc") is None
    assert detect_version("/nonexistent-cgroup-root") is None


@real
def test_probe_v1_and_v2() -> None:
    report = probe(V1_ROOT)
    assert report["version"] == 1
    for controller in ("memory", "cpu", "cpuacct", "pids", "freezer"):
        assert report["controllers"][controller]["available"], controller
        assert report["controllers"][controller]["writable"], controller
    assert report["freezer"] is True
    assert report["swap_accounting"] == os.path.exists(f"{V1_ROOT}/memory/memory.memsw.limit_in_bytes")
    assert report["error"] is None

    report = probe(V2_ROOT)
    assert report["version"] == 2
    assert report["kill"] is True and report["freezer"] is True
    # No controllers are (or can be) enabled on this machine's v2 mount.
    assert not any(c["writable"] for c in report["controllers"].values())

    assert probe("/proc")["version"] is None


@real
def test_version_mismatch_is_unavailable() -> None:
    with pytest.raises(IsolationUnavailable):
        create_cgroup(unique(), Limits(), root=V1_ROOT, version=2, require=())
    with pytest.raises(IsolationUnavailable):
        create_cgroup(unique(), Limits(), root=V2_ROOT, version=1, require=())
