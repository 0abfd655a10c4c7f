"""Starts ipykernel inside a sandbox, as ``python -m ipykernel_launcher`` does, without loading its debugger.

Run by the ``kernelhub-python`` kernelspec from ``/opt/kernelhub-agent`` (read-only in every sandbox). Our
kernelspecs declare ``"debugger": false``, yet ipykernel imports debugpy whenever it is installed, to offer the
debugger in ``kernel_info``: 7.3 MiB of PSS per kernel, a fifth of an idle python sandbox (measured with
``/proc/PID/smaps_rollup``: 27.4 MiB without it, 34.7 MiB with it, ipykernel 7.4 on Python 3.11). So debugpy is
kept out while ipykernel decides whether it has a debugger, then allowed again: user code may import it.

Standard library and the kernels' runtime only; nothing of kernelhub is importable here.
"""

import sys

# This file's directory (the agent's) must not shadow the user's modules (ipykernel_launcher drops the cwd).
del sys.path[0]
sys.modules["debugpy"] = None  # type: ignore[assignment]  # an import of it now raises ImportError
import ipykernel.debugger  # noqa: E402,F401  - caches _is_debugpy_available = False

del sys.modules["debugpy"]

from ipykernel import kernelapp  # noqa: E402

kernelapp.launch_new_instance()
