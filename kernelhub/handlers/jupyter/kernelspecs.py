"""The Jupyter API's kernelspecs: ``GET /api/kernelspecs``, ``GET /api/kernelspecs/{name}`` and their resource
files (``GET /kernelspecs/{name}/{file}``, the logos), in Jupyter Server's shapes
(``services/kernelspecs/handlers.py``, ``kernelspecs/handlers.py``). The kernelspecs are the hub's
(:attr:`Hub.kernel_spec_manager <kernelhub.services.hub.Hub>`): the ones kernelhub ships, each naming the sandbox
provisioner.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
from typing import Any
from urllib.parse import quote

from ...errors import NotFound
from ..base import BaseHandler

#: The kernelspec of a kernel whose request names none.
DEFAULT_KERNEL_NAME = "kernelhub-python"


def kernelspec_model(name: str, spec: dict[str, Any], resource_dir: str) -> dict[str, Any]:
    """Jupyter Server's kernelspec model: the spec plus URLs of its resource files (logos, kernel.js/css)."""
    resources: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for fname in sorted(os.listdir(resource_dir)):
            if fname in ("kernel.js", "kernel.css"):
                resources[fname] = f"/kernelspecs/{quote(name)}/{quote(fname)}"
            elif fname.startswith("logo-"):
                resources[os.path.splitext(fname)[0]] = f"/kernelspecs/{quote(name)}/{quote(fname)}"
    return {"name": name, "spec": spec, "resources": resources}


class MainKernelSpecHandler(BaseHandler):
    """``GET /api/kernelspecs``: every kernelspec kernelhub serves, and the default one."""

    def get(self) -> None:
        ksm = self.hub.kernel_spec_manager
        specs = {}
        for name, info in sorted(ksm.get_all_specs().items()):
            specs[name] = kernelspec_model(name, info["spec"], info["resource_dir"])
        self.send_json({"default": DEFAULT_KERNEL_NAME, "kernelspecs": specs})


class KernelSpecHandler(BaseHandler):
    """``GET /api/kernelspecs/{name}``."""

    def get(self, kernel_name: str) -> None:
        try:
            spec = self.hub.kernel_spec_manager.get_kernel_spec(kernel_name)
        except KeyError:
            raise NotFound(f"No kernelspec {kernel_name[:64]!r}.") from None
        self.send_json(kernelspec_model(kernel_name, spec.to_dict(), spec.resource_dir))


class KernelSpecResourceHandler(BaseHandler):
    """``GET /kernelspecs/{name}/{file}``: a file of the kernelspec's directory (its logos). Only plain files
    directly in that directory; anything that names a path, hidden files and symlinks out are 404."""

    def _resolve(self, name: str, path: str) -> str:
        try:
            resource_dir = self.hub.kernel_spec_manager.get_kernel_spec(name).resource_dir
        except KeyError:
            raise NotFound(f"No kernelspec {name[:64]!r}.") from None
        if not path or "/" in path or "\\" in path or "\x00" in path or path.startswith("."):
            raise NotFound(f"No resource {path[:64]!r} in kernelspec {name}.")
        root = os.path.realpath(resource_dir)
        full = os.path.realpath(os.path.join(root, path))
        if os.path.dirname(full) != root or not os.path.isfile(full):
            raise NotFound(f"No resource {path[:64]!r} in kernelspec {name}.")
        return full

    def _serve(self, kernel_name: str, path: str, include_body: bool) -> None:
        full = self._resolve(kernel_name, path)
        with open(full, "rb") as f:
            data = f.read()
        self.set_header("Content-Type", mimetypes.guess_type(full)[0] or "application/octet-stream")
        self.set_header("Cache-Control", "private, max-age=2592000")
        self.set_header("Content-Length", str(len(data)))
        self.finish(data if include_body else None)

    def get(self, kernel_name: str, path: str) -> None:
        self._serve(kernel_name, path, True)

    def head(self, kernel_name: str, path: str) -> None:
        self._serve(kernel_name, path, False)
