"""Per-sandbox limits: the shape, the defaults, and validation of what a request asks for.

Pure functions only: the service layer calls :func:`resolve_limits` when a sandbox is created, the OS layer
reads the resulting :class:`Limits` to set cgroups, rlimits and the workspace size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidRequest

#: Machine-readable reasons with which a limit ends something (API.md, "Limits").
REASONS = ("oom", "pids", "disk", "timeout", "output_truncated", "idle", "lifetime")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandbox may use. Field names are the API's names."""

    memory_mb: int = 512
    cpu: float = 1.0
    pids: int = 128
    disk_mb: int = 1024
    files: int = 10000
    max_file_mb: int = 100
    execution_timeout_s: float = 300.0
    idle_timeout_s: float = 300.0
    max_lifetime_s: float = 86400.0
    output_mb: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb * 1024 * 1024

    @property
    def output_bytes(self) -> int:
        return int(self.output_mb * 1024 * 1024)


#: Lower bounds below which a sandbox could not even start its kernel.
MINIMUM = {
    "memory_mb": 32,
    "cpu": 0.01,
    "pids": 8,
    "disk_mb": 8,
    "files": 64,
    "max_file_mb": 1,
    "execution_timeout_s": 0.1,
    "idle_timeout_s": 1.0,
    "max_lifetime_s": 1.0,
    "output_mb": 0.001,
}

DEFAULT_MAXIMUM = Limits(
    memory_mb=8192,
    cpu=4.0,
    pids=4096,
    disk_mb=20480,
    files=1_000_000,
    max_file_mb=10240,
    execution_timeout_s=3600.0,
    idle_timeout_s=86400.0,
    max_lifetime_s=7 * 86400.0,
    output_mb=100.0,
)

_FIELDS = {f.name: f for f in dataclasses.fields(Limits)}


def _coerce(name: str, value: Any) -> int | float:
    kind = int if _FIELDS[name].type in ("int", int) else float
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"limits.{name} must be a number, not {type(value).__name__}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"limits.{name} must be a finite number.")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidRequest(f"limits.{name} must be a whole number.")
        return int(value)
    return float(value)


def resolve_limits(
    requested: Mapping[str, Any] | None,
    defaults: Limits | None = None,
    maximum: Limits | None = None,
) -> Limits:
    """Merge a request's ``limits`` over the defaults, refusing unknown names and values out of range.

    A request may lower any limit and raise it up to ``maximum``; called by the service layer on create.
    """
    defaults = defaults or Limits()
    maximum = maximum or DEFAULT_MAXIMUM
    if requested is None:
        requested = {}
    if not isinstance(requested, Mapping):
        raise InvalidRequest("limits must be a JSON object.")
    unknown = sorted(set(requested) - set(_FIELDS))
    if unknown:
        raise InvalidRequest(
            f"Unknown limit {unknown[0]!r}; known limits are {', '.join(sorted(_FIELDS))}."
        )
    values: dict[str, Any] = {}
    for name in _FIELDS:
        if name in requested and requested[name] is not None:
            value = _coerce(name, requested[name])
        else:
            value = getattr(defaults, name)
        low, high = MINIMUM[name], getattr(maximum, name)
        if value < low:
            raise InvalidRequest(f"limits.{name} must be at least {low}, got {value}.")
        if value > high:
            raise InvalidRequest(f"limits.{name} may be at most {high} on this gateway, got {value}.")
        values[name] = value
    return Limits(**values)
