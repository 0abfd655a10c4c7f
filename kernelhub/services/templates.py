"""Templates: the named blueprints ``sandbox_create`` picks from (its ``template`` argument).

A :class:`Template` names the language of a sandbox's first kernel, limits over the gateway's defaults, the
network mode and extra environment variables. :data:`BUILTIN_TEMPLATES` are always there; the operator adds
more with ``--Hub.extra_templates`` (``KERNELHUB_TEMPLATES``), read by :func:`parse_templates`. The
:class:`~kernelhub.services.hub.Hub` builds the table once; :class:`~kernelhub.services.sandboxes.Sandboxes`
and :class:`~kernelhub.services.kernels.Kernels` read it, and ``GET /v1/templates`` lists it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidRequest
from ..sandbox.limits import Limits, resolve_limits
from .sessions import LANGUAGES


@dataclasses.dataclass(frozen=True)
class Template:
    """A named blueprint for a sandbox: the language of its first kernel, default limits, network mode."""

    name: str
    language: str
    limits: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    network: str = "none"
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""

    def base_limits(self, defaults: Limits, maximum: Limits) -> Limits:
        """The limits of a sandbox of this template whose request names none: the template's over the
        gateway's ``defaults``, within ``maximum``. Raises :class:`~kernelhub.errors.InvalidRequest` for a
        template limit out of bounds."""
        return resolve_limits(self.limits, defaults, maximum) if self.limits else defaults

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "language": self.language, "limits": dict(self.limits),
                "network": self.network, "description": self.description}


BUILTIN_TEMPLATES = {
    "python": Template("python", "python", description="Python 3 (ipykernel) with numpy, pandas, matplotlib"),
    "node": Template("node", "node", description="JavaScript and TypeScript (tslab)"),
    "bash": Template("bash", "bash", description="Bash (bash_kernel)"),
}


def parse_templates(data: Mapping[str, Any]) -> dict[str, Template]:
    """The templates of ``--Hub.extra_templates`` (``KERNELHUB_TEMPLATES``): ``{name: {language, limits,
    network, env, description}}``, already parsed from JSON by :mod:`kernelhub.settings`. Raises
    :class:`~kernelhub.errors.InvalidRequest` for a template that is not an object or names an unknown language;
    the limits are checked when a sandbox is created from the template."""
    out = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise InvalidRequest(f"template {name!r}: expected an object {{language, limits, network, env, "
                                 f"description}}, not {spec!r}")
        language = spec.get("language", "python")
        if language not in LANGUAGES:
            raise InvalidRequest(f"template {name!r}: unknown language {language!r}")
        out[name] = Template(name, language, spec.get("limits", {}), spec.get("network", "none"),
                             spec.get("env", {}), spec.get("description", ""))
    return out
