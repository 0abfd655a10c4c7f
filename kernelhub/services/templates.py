"""Templates: the named blueprints ``sandbox_create`` picks from (its ``template`` argument).

A :class:`Template` names the language of a sandbox's first kernel, limits over the gateway's defaults, the
network policy (:mod:`kernelhub.services.egress.policy`), extra environment variables and packages installed
at sandbox start (:mod:`kernelhub.services.packages`). :data:`BUILTIN_TEMPLATES` are always there; the operator adds
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
from .egress.policy import NONE, NetworkPolicy, parse_policy
from .sessions import LANGUAGES

#: Package managers a template may list packages for, and the most packages per manager.
PACKAGE_MANAGERS = ("pip", "npm")
MAX_PACKAGES = 64


@dataclasses.dataclass(frozen=True)
class Template:
    """A named blueprint for a sandbox: the language of its first kernel, default limits, network policy,
    environment, and ``packages`` (``{"pip": [...], "npm": [...]}``, requirement specifiers) installed when a
    sandbox of it starts."""

    name: str
    language: str
    limits: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    network: NetworkPolicy = NONE
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    description: str = ""
    packages: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def base_limits(self, defaults: Limits, maximum: Limits) -> Limits:
        """The limits of a sandbox of this template whose request names none: the template's over the
        gateway's ``defaults``, within ``maximum``. Raises :class:`~kernelhub.errors.InvalidRequest` for a
        template limit out of bounds."""
        return resolve_limits(self.limits, defaults, maximum) if self.limits else defaults

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "language": self.language, "limits": dict(self.limits),
               "network": self.network.to_json(), "description": self.description}
        if self.packages:
            out["packages"] = {k: list(v) for k, v in self.packages.items()}
        return out


BUILTIN_TEMPLATES = {
    "python": Template("python", "python", description="Python 3 (ipykernel) with numpy, pandas, matplotlib"),
    "node": Template("node", "node", description="JavaScript and TypeScript (tslab)"),
    "bash": Template("bash", "bash", description="Bash (bash_kernel)"),
}


def parse_templates(data: Mapping[str, Any]) -> dict[str, Template]:
    """The templates of ``--Hub.extra_templates`` (``KERNELHUB_TEMPLATES``): ``{name: {language, limits,
    network, env, description, packages}}``, already parsed from JSON by :mod:`kernelhub.settings`. Raises
    :class:`~kernelhub.errors.InvalidRequest` for a template that is not an object, names an unknown language,
    or has a bad network policy or package list; the limits are checked when a sandbox is created from the
    template."""
    out = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise InvalidRequest(f"template {name!r}: expected an object {{language, limits, network, env, "
                                 f"description, packages}}, not {spec!r}")
        language = spec.get("language", "python")
        if language not in LANGUAGES:
            raise InvalidRequest(f"template {name!r}: unknown language {language!r}")
        network = parse_policy(spec.get("network", "none"), f"template {name!r}: network")
        out[name] = Template(name, language, spec.get("limits", {}), network, spec.get("env", {}),
                             spec.get("description", ""), parse_packages(spec.get("packages"), name))
    return out


def parse_packages(value: Any, template: str) -> dict[str, tuple[str, ...]]:
    """A template's ``packages``: ``{"pip": [...], "npm": [...]}`` of requirement specifiers (``requests``,
    ``numpy==2.1``, ``lodash@4``), at most :data:`MAX_PACKAGES` each. Options (a leading ``-``) are refused:
    an index is chosen with the template's ``env`` (``PIP_INDEX_URL``, ``npm_config_registry``). Raises
    :class:`~kernelhub.errors.InvalidRequest` naming the template."""
    if value is None:
        return {}
    what = f"template {template!r}: packages"
    if not isinstance(value, dict) or set(value) - set(PACKAGE_MANAGERS):
        raise InvalidRequest(f'{what} must be an object {{"pip": [...], "npm": [...]}}.')
    out: dict[str, tuple[str, ...]] = {}
    for manager, items in value.items():
        if not isinstance(items, list) or len(items) > MAX_PACKAGES or \
                not all(isinstance(i, str) and i.strip() and not i.startswith("-") for i in items):
            raise InvalidRequest(f"{what}.{manager} must be a list of at most {MAX_PACKAGES} package names "
                                 "(no options; choose an index with the template's env).")
        if items:
            out[manager] = tuple(i.strip() for i in items)
    return out
