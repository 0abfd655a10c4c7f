"""Where kernelhub's cgroups live and what they must offer: group names, the ``kernelhub`` folder rule, the
required controllers.

Only directories below a folder named ``kernelhub`` are ever created or removed; these checks run before any
directory is touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from ...errors import IsolationUnavailable
from .parsing import LIMIT_CONTROLLERS

__all__ = [
    "DEFAULT_PARENT",
    "DEFAULT_ROOT",
    "NAME_RE",
    "OWN_FOLDER",
    "check_name",
    "check_parent",
    "check_require",
    "in_own_folder",
    "make_parent",
    "require_controllers",
]

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "kernelhub"
#: The folder every kernelhub cgroup lives under; nothing outside it is ever created or removed.
OWN_FOLDER = "kernelhub"

# Names are single path components; a leading alphanumeric rules out ".", ".." and hidden entries.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"Invalid cgroup name {name!r}: use letters, digits, '_', '.', '-' (at most 128).")


def check_parent(parent: str) -> list[str]:
    parts = parent.split("/") if isinstance(parent, str) else []
    if not parts or not all(NAME_RE.match(part) for part in parts) or OWN_FOLDER not in parts:
        # Refusing anything not below a "kernelhub" folder keeps remove() and cleanup_stale() away from
        # cgroups that belong to the rest of the system.
        raise ValueError(
            f"Invalid cgroup parent {parent!r}: want a relative path of plain names through {OWN_FOLDER!r}."
        )
    return parts


def check_require(require: Iterable[str]) -> frozenset[str]:
    required = frozenset(require)
    unknown = required - set(LIMIT_CONTROLLERS)
    if unknown:
        raise ValueError(f"Unknown controller(s) {sorted(unknown)}; known: {', '.join(LIMIT_CONTROLLERS)}.")
    return required


def make_parent(base: str, parts: list[str]) -> str:
    """Create ``base/parent`` from the ``kernelhub`` folder down and return it.

    Folders above ``kernelhub`` (a systemd-delegated subtree, say) must exist already: they are not ours.
    """
    own = parts.index(OWN_FOLDER)
    path = os.path.join(base, *parts[:own]) if own else base
    if not os.path.isdir(path):
        raise IsolationUnavailable(f"cgroup folder {path} does not exist.")
    for part in parts[own:]:
        path = os.path.join(path, part)
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as e:
            raise IsolationUnavailable(f"Cannot create cgroup folder {path}: {e.strerror}.") from e
    return path



def in_own_folder(root: str, path: str) -> bool:
    relative = os.path.relpath(path, root)
    return OWN_FOLDER in relative.split(os.sep)



def require_controllers(required: frozenset[str], have: Iterable[str], where: str) -> None:
    missing = sorted(required - set(have))
    if missing:
        raise IsolationUnavailable(
            f"This host cannot enforce {', '.join(missing)} limits: {where} has no usable "
            f"{'controller' if len(missing) == 1 else 'controllers'} {', '.join(missing)}."
        )

