"""The user site for the sandbox's Python: ``pip install --user X`` (and plain ``pip install X``) work, and what
they install imports, in the running kernel too.

The kernels' Python is a virtual environment (``/opt/kernelhub/python``, read-only, shared by every sandbox)
made without system site-packages, and such an environment turns the user site off: ``site.ENABLE_USER_SITE``
is False and pip refuses ``--user`` ("User site-packages are not visible in this virtualenv"; pip 26,
``pip/_internal/commands/install.py``, ``decide_user_install``). Packages belong in the sandbox's own writable
space, the home (``/home/user``, which is the workspace), so this module, found through ``PYTHONPATH`` at
``/opt/kernelhub-agent/site`` (read-only, the gateway's), turns it on again for that environment:

- ``~/.local/lib/pythonX.Y/site-packages`` goes on ``sys.path`` before the environment's site-packages, as a
  plain interpreter orders them, with a finder of its own: the directory need not exist yet. A plain entry for a
  missing directory would be remembered as having no finder (``sys.path_importer_cache`` keeps None), so a
  kernel started before the first ``pip install`` would never see what it installed; this finder looks again
  whenever the directory's modification time changes, as every ``FileFinder`` does;
- pip (``pip ...``, ``python -m pip ...``) is told the user site is visible, which it now is.

Nothing changes for another interpreter (the system's ``/usr/bin/python3``). Its own directory leaves
``sys.path`` once it ran: nothing of the gateway's stays importable, or shadows a module of the user's. Standard
library only, and cheap (about a millisecond): every Python start in the sandbox runs it.
"""

import os
import site
import sys
from importlib import machinery


def _enable_user_site() -> None:
    if sys.prefix == getattr(sys, "base_prefix", sys.prefix):
        return  # not a virtual environment: the interpreter's own rules hold
    site.ENABLE_USER_SITE = True
    path = site.getusersitepackages()
    if path not in sys.path:
        at = next((i for i, p in enumerate(sys.path) if p.endswith("site-packages")), len(sys.path))
        sys.path.insert(at, path)
    details = ((machinery.ExtensionFileLoader, machinery.EXTENSION_SUFFIXES),
               (machinery.SourceFileLoader, machinery.SOURCE_SUFFIXES),
               (machinery.SourcelessFileLoader, machinery.BYTECODE_SUFFIXES))

    def user_site_finder(entry: str) -> machinery.FileFinder:
        if entry != path:
            raise ImportError("not the user site")
        return machinery.FileFinder(entry, *details)

    sys.path_hooks.insert(0, user_site_finder)
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
if os.path.dirname(os.path.abspath(__file__)) in sys.path:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))
