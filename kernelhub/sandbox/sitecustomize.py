"""The user site for the sandbox's Python: ``pip install --user X`` (and plain ``pip install X``) work, and what
they install imports, in the running kernel too.

The kernels' Python is a virtual environment (``/opt/kernelhub/python``, read-only, shared by every sandbox)
made without system site-packages, and such an environment turns the user site off: ``site.ENABLE_USER_SITE``
is False and pip refuses ``--user`` ("User site-packages are not visible in this virtualenv"; pip 26,
``pip/_internal/commands/install.py``, ``decide_user_install``). Packages belong in the sandbox's own writable
space, the home (``/home/user``, which is the workspace), so this module, found through ``PYTHONPATH`` at
``/opt/kernelhub-agent/site`` (read-only, the gateway's), turns it on again for that environment:

- ``~/.local/lib/pythonX.Y/site-packages`` goes on ``sys.path`` before the environment's site-packages, as a
  plain interpreter orders them; it is created when missing (while the sandbox has egress, the only time an
  index can be reached), because a directory that did not exist when a kernel first imported something is never
  looked at again by that kernel (``sys.path_importer_cache`` keeps None for it);
- pip (``pip ...``, ``python -m pip ...``) is told the user site is visible, which it now is.

Nothing changes for another interpreter (the system's ``/usr/bin/python3``). Standard library only, and cheap:
every Python start in the sandbox runs it.
"""

import os
import site
import sys


def _enable_user_site() -> None:
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix):
        return  # not a virtual environment: the interpreter's own rules hold
    site.ENABLE_USER_SITE = True
    path = site.getusersitepackages()
    if os.environ.get("HTTP_PROXY") and not os.path.isdir(path):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            pass
    if path not in sys.path:
        at = next((i for i, p in enumerate(sys.path) if p.endswith("site-packages")), len(sys.path))
        sys.path.insert(at, path)
    argv = getattr(sys, "orig_argv", [])
    runs_pip = (len(argv) > 1 and os.path.basename(argv[1]).startswith("pip")) or \
        any(a == "-m" and b == "pip" for a, b in zip(argv, argv[1:], strict=False))
    if runs_pip:
        try:
            from pip._internal.utils import virtualenv
        except ImportError:
            return
        virtualenv.virtualenv_no_global = lambda: False  # the user site is on sys.path, see above


_enable_user_site()
