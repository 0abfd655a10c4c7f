"""The cgroups package exports what it promises."""

from __future__ import annotations

from kernelhub.sandbox import cgroups


def test_module_exports() -> None:
    for name in cgroups.__all__:
        assert hasattr(cgroups, name), name
