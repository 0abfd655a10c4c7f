"""Checks of request values that more than one service judges: environment variables and timeouts.

The surfaces check the JSON types of a request's top-level fields; what is inside them (an env object's names
and values, a timeout against the sandbox's ``execution_timeout_s``) is judged here, by the service that uses
it: :mod:`~kernelhub.services.sandboxes` (``sandbox_create``'s env), :mod:`~kernelhub.services.executor`
(``code_execute``, ``session_execute``, ``command_execute``) and :mod:`~kernelhub.services.kernels`
(``POST /api/kernels``'s ``KERNEL_*`` variables). Every failure is an
:class:`~kernelhub.errors.InvalidRequest` whose message names the field.
"""

from __future__ import annotations

from ..errors import InvalidRequest
from ..sandbox import bwrap


def check_env(env: object, what: str = "env") -> dict[str, str]:
    """``env`` (None, or a JSON object as a request sent it) as environment variables: at most 256, names
    that :func:`~kernelhub.sandbox.bwrap.valid_env_name` allows, values strings of at most 32768 characters
    without NUL bytes. Raises :class:`~kernelhub.errors.InvalidRequest` whose message starts with ``what``."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise InvalidRequest(f"{what} must be a JSON object of strings.")
    if len(env) > 256:
        raise InvalidRequest(f"{what} may hold at most 256 variables.")
    out = {}
    for key, value in env.items():
        if not isinstance(key, str) or not bwrap.valid_env_name(key):
            raise InvalidRequest(f"{what}: {str(key)[:64]!r} is not an allowed environment variable name.")
        if not isinstance(value, str):
            raise InvalidRequest(f"{what}.{key} must be a string.")
        if "\x00" in value or len(value) > 32768:
            raise InvalidRequest(f"{what}.{key} must be at most 32768 characters without NUL bytes.")
        out[key] = value
    return out


def check_timeout(value: object, limit: float) -> float:
    """A request's ``timeout_s`` in seconds: ``limit`` (the sandbox's ``execution_timeout_s``) for None, else a
    positive number up to ``limit``. Raises :class:`~kernelhub.errors.InvalidRequest` otherwise."""
    if value is None:
        return limit
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidRequest("timeout_s must be a number of seconds.")
    if value <= 0:
        raise InvalidRequest("timeout_s must be positive.")
    if value > limit:
        raise InvalidRequest(f"timeout_s may be at most {limit:g} for this sandbox (its execution_timeout_s).")
    return float(value)
