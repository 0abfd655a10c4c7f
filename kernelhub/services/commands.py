"""Shell commands in a sandbox (``command_execute``): exit code, separate stdout and stderr, stdin, timeout.

Commands do not go through bash_kernel (KERNELS.md: 105 ms a round trip); the agent starts ``/bin/bash -c``
directly with host pipes as its stdio (:func:`kernelhub.sandbox.pipes.run_piped`). This module is the policy:
what a command may be, where it runs, and which reason its end gets.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequest
from ..sandbox.pipes import run_piped

if TYPE_CHECKING:
    from ..sandbox.sandbox import Sandbox


async def run_command(
    sandbox: Sandbox,
    command: str,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float,
    stdin: str | bytes | None = None,
    output_limit: int,
) -> dict[str, Any]:
    """Run ``command`` with bash in the sandbox as its uid; called by the hub for ``command_execute``."""
    if not isinstance(command, str) or not command.strip():
        raise InvalidRequest("command must be a non-empty string.")
    if "\x00" in command:
        raise InvalidRequest("command must not contain NUL bytes.")
    workdir = cwd or "/workspace"
    if not workdir.startswith("/"):
        workdir = "/workspace/" + workdir
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    started = time.monotonic()
    run = await run_piped(sandbox, ["/bin/bash", "-c", command], stdin=data, env=dict(env or {}), cwd=workdir,
                          timeout_s=timeout_s, output_limit=output_limit)
    code = run.status
    reason = "timeout" if run.timed_out else None
    if reason is None and run.truncated:
        reason = "output_truncated"
    if reason is None and code == -signal.SIGKILL and sandbox.oom_kills() > 0:
        reason = "oom"
    result: dict[str, Any] = {
        "exit_code": code if code >= 0 else 128 - code,
        "stdout": run.stdout.decode(errors="replace"),
        "stderr": run.stderr.decode(errors="replace"),
        "duration_ms": int((time.monotonic() - started) * 1000),
    }
    if reason:
        result["reason"] = reason
    if run.truncated:
        result["truncated"] = True
    return result
