"""Packages a template lists (``"packages": {"pip": [...], "npm": [...]}``), installed when a sandbox starts.

Called by :class:`~kernelhub.services.sandboxes.Sandboxes` after the sandbox's egress is up and before its first
kernel is handed to anyone. Each manager runs once, inside the sandbox as any of its processes (its uid, cgroup,
proxy variables), in ``/workspace``, with its output line by line in the sandbox log (``sandbox_logs``):

- pip: ``python -m pip install --user`` into ``~/.local`` (the home is the workspace), which the sandbox's
  Python puts on ``sys.path`` (:mod:`kernelhub.sandbox.sitecustomize`); its cache is ``$XDG_CACHE_HOME/pip``,
  ``/tmp/.cache/pip`` inside;
- npm: ``npm install`` in ``/workspace`` (``/workspace/node_modules``); its cache is ``npm_config_cache``,
  ``/tmp/.npm`` inside. npm takes the nearest directory up from its working directory that holds a
  ``package.json`` or a ``node_modules`` as the project, and ``/`` has one: the kernels' read-only
  ``/node_modules`` (tslab and its types). So a sandbox that gets egress gets an empty ``/workspace/node_modules``
  first (:func:`prepare_npm`), and ``npm install X`` by hand in ``/workspace`` installs there too.

Both reach their index through the egress proxy, so the sandbox's network policy must allow it (the template's
``env`` may name another index: ``PIP_INDEX_URL``, ``npm_config_registry``). A failed install is logged with
its exit status and the sandbox carries on: it is the user's to see in the log and retry by hand.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence

from ..errors import KernelHubError
from ..sandbox.bwrap import INNER_RUNTIME, INNER_WORKSPACE
from ..sandbox.sandbox import Sandbox

#: The command line of each manager, before the packages.
COMMANDS: dict[str, tuple[str, ...]] = {
    "pip": (f"{INNER_RUNTIME}/python/bin/python", "-m", "pip", "install", "--user", "--no-input",
            "--disable-pip-version-check", "--progress-bar", "off"),
    "npm": ("npm", "install", "--no-audit", "--no-fund", "--no-progress", "--no-update-notifier"),
}


async def install_packages(sandbox: Sandbox, packages: Mapping[str, Sequence[str]], timeout: float) -> dict[str, int]:
    """Install ``packages`` (``{"pip": [...], "npm": [...]}``) in the running ``sandbox``, one manager after
    the other, each given ``timeout`` seconds (then killed). Answers each manager's exit status (negative: the
    signal that ended it). Raises nothing of its own: what cannot start is logged and counted as status 127."""
    results: dict[str, int] = {}
    for manager, names in packages.items():
        if not names:
            continue
        argv = [*COMMANDS[manager], *names]
        sandbox.log(f"packages: {' '.join(argv)}")
        results[manager] = status = await _run_logged(sandbox, argv, f"{manager}: ", timeout)
        sandbox.log(f"packages: {manager} install {'done' if status == 0 else f'failed (exit status {status})'}")
    return results


async def prepare_npm(sandbox: Sandbox) -> None:
    """Make ``/workspace/node_modules`` (as the sandbox's user, inside: nothing it planted is followed with
    more rights than its own), so that npm takes ``/workspace`` as the project (see the module). Called when
    a sandbox gets egress. A failure is logged, not raised: npm is then the user's to point
    (``--prefix /workspace``)."""
    status = await _run_logged(sandbox, ["mkdir", "-p", f"{INNER_WORKSPACE}/node_modules"], "npm prefix: ", 30)
    if status != 0:
        sandbox.log(f"npm prefix: mkdir {INNER_WORKSPACE}/node_modules failed (exit status {status})")


async def _run_logged(sandbox: Sandbox, argv: list[str], prefix: str, timeout: float) -> int:
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    out = sandbox.log_pipe(prefix)
    try:
        proc = await sandbox.spawn(argv, stdin=devnull, stdout=out, stderr=out, cgroup=sandbox.command_cgroup())
    except KernelHubError as exc:
        sandbox.log(f"{prefix}could not start: {exc.message}")
        return 127
    finally:
        os.close(out)
        os.close(devnull)
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        sandbox.log(f"{prefix}still running after {timeout:g} s; killed")
        await proc.kill()
        return await proc.wait()
