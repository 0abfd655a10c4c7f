"""The ``groups`` fixture of the cgroup tests: every group it made is removed, every process reaped."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sandbox.cgroups.support import Groups


@pytest.fixture
def groups() -> Iterator[Groups]:
    made = Groups()
    try:
        yield made
    finally:
        made.close()
