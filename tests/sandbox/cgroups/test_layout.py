"""Tests of kernelhub.sandbox.cgroups.layout: names and parents outside a kernelhub folder are refused
before anything is touched."""

from __future__ import annotations

import asyncio

import pytest

from kernelhub.sandbox.cgroups import (
    cleanup_stale,
    create_cgroup,
)
from kernelhub.sandbox.limits import Limits
from tests.sandbox.cgroups.support import (
    V1_ROOT,
)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "-x", "x" * 129, "white space"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        create_cgroup(name, Limits(), root=V1_ROOT)


@pytest.mark.parametrize("parent", ["", "system.slice", "/kernelhub", "kernelhub/../x", "kernelhub//x"])
def test_parents_outside_a_kernelhub_folder_are_refused(parent: str) -> None:
    with pytest.raises(ValueError):
        create_cgroup("x", Limits(), root=V1_ROOT, parent=parent)
    with pytest.raises(ValueError):
        asyncio.run(cleanup_stale(set(), root=V1_ROOT, parent=parent))


def test_unknown_required_controller_is_refused() -> None:
    with pytest.raises(ValueError):
        create_cgroup("x", Limits(), root=V1_ROOT, require=("memory", "blkio"))
