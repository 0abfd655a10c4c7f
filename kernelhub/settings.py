"""``KERNELHUB_*`` variables for traitlets options: one tag, one loader, one help renderer.

Every configurable trait names its variable in its metadata, next to its declaration::

    port = Integer(8888, help="Port to listen on; 0 picks a free one.", config=True).tag(env="KERNELHUB_PORT")

:func:`env_config` turns the variables that are set into a traitlets :class:`~traitlets.config.Config` for the
classes given. The command line applies it under its config file and options (command line > config file >
environment > default, see :class:`kernelhub.app.KernelHubApp`); plain ``jupyter_client`` gets the same for
the provisioner's own factory. :func:`trait_help` writes an option's ``--help`` from the same tag, so help and
behaviour cannot drift. A trait whose default is computed at run time (an ``@default`` method) says what it is
in ``.tag(default_help="...")``, because traitlets can only show a static default.

How a text (a variable, or one value on the command line) becomes a value, in :func:`parse_text`:

- Dict and List traits: JSON (``{"memory_mb": 1024}``, ``["a", "b"]``); a List of strings also takes a
  comma-separated list (``a,b``);
- Integer: a whole number; Float: a number; Bool: ``1/true/yes/on`` or ``0/false/no/off``;
- anything else: the text itself; an Enum checks that it is one of its choices.

An empty variable counts as unset. A value that does not fit raises :class:`ConfigError` naming its source
(the variable, the option or the config file).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from textwrap import indent
from typing import Any

from traitlets import Bool, Container, Dict, Enum, Float, HasTraits, Integer, List, TraitError, TraitType, Unicode
from traitlets.config import Config, Configurable
from traitlets.config.loader import DeferredConfig, DeferredConfigList
from traitlets.utils.text import wrap_paragraphs

from .errors import KernelHubError

#: Metadata key of a trait's variable.
ENV = "env"
#: Metadata key of the words shown as the default of a trait whose default is computed at run time.
DEFAULT_HELP = "default_help"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(KernelHubError):
    """A setting that cannot be used: an unknown option or command, a value of the wrong type, a missing or
    broken config file. ``message`` names where it came from. The command line exits 2 on it. Never an HTTP
    answer (``status`` 0), so it is outside the code registry that answers are read with."""

    status = 0
    error = "bad_config"


def env_var(trait: TraitType[Any, Any]) -> str | None:
    """The ``KERNELHUB_*`` variable of ``trait``, or None when it has none."""
    value = trait.metadata.get(ENV)
    return str(value) if value else None


def env_config(classes: Iterable[type[Configurable]], environ: Mapping[str, str] | None = None) -> Config:
    """The config that the set ``KERNELHUB_*`` variables (``environ``, default ``os.environ``) give ``classes``.

    Each value goes to the section of the class that declares its trait (``Hub``, ``SandboxFactory``, the
    app's base class), the least specific one, so that a config file or command line naming a subclass still
    wins. Raises :class:`ConfigError` naming the variable when its text does not fit the trait.
    """
    environ = os.environ if environ is None else environ
    config = Config()
    for cls in classes:
        for name, trait in cls.class_traits(config=True).items():
            var = env_var(trait)
            text = environ.get(var, "") if var else ""
            if var and text:
                owner = trait.this_class.__name__ if trait.this_class else cls.__name__
                config[owner][name] = parse_text(trait, text, var)
    return config


def parse_text(trait: TraitType[Any, Any], text: str, source: str) -> Any:
    """``text`` as a value of ``trait`` (see the module's rules); ``source`` names it in the error, which reads
    ``KERNELHUB_PORT='eighty': expected an int (invalid literal ...).``"""
    try:
        if isinstance(trait, (Dict, Container)):
            value = _json_or_list(trait, text)
        elif isinstance(trait, Bool):
            value = _bool(text)
        elif isinstance(trait, Integer):
            value = int(text)
        elif isinstance(trait, Float):
            value = float(text)
        elif isinstance(trait, Enum) and not all(isinstance(v, str) for v in trait.values or ()):
            value = int(text) if text.lstrip("-").isdigit() else text
        else:
            value = text
    except ValueError as exc:
        raise ConfigError(f"{source}={text!r}: expected {trait.info()} ({exc}).") from None
    if not _accepts(trait, value):
        raise ConfigError(f"{source}={text!r}: expected {trait.info()}.")
    return value


def parse_cli(trait: TraitType[Any, Any], value: Any, source: str) -> Any:
    """A command-line value (a string, or a list of them for a container option) as a value of ``trait``.

    One string follows :func:`parse_text` (JSON for a Dict or List option, as in its variable). A Dict also
    takes ``key=value`` items, each value JSON or else a string (``--Hub.default_limits memory_mb=1024
    --Hub.default_limits cpu=2``); a List, several items (``--ServeApp.allowed_ws_origins a --ServeApp...
    b``)."""
    if isinstance(value, DeferredConfigList):
        texts = [str(v) for v in value]
        if isinstance(trait, Dict) and not (len(texts) == 1 and texts[0].lstrip().startswith("{")):
            parsed: Any = {}
            for text in texts:
                key, equals, item = text.partition("=")
                if not equals or not key:
                    raise ConfigError(f"{source}: {text!r} is not a key=value item (or a JSON object).")
                parsed[key] = _json_or_text(item)
            check_value(trait, parsed, source)
            return parsed
        if len(texts) != 1 and hasattr(trait, "from_string_list"):
            try:
                parsed = trait.from_string_list(texts)
            except (ValueError, SyntaxError) as exc:
                raise ConfigError(f"{source}={texts!r}: expected {trait.info()} ({exc}).") from None
            check_value(trait, parsed, source)
            return parsed
        value = texts[0]
    return parse_text(trait, str(value), source)


def check_value(trait: TraitType[Any, Any], value: Any, source: str) -> None:
    """Raise :class:`ConfigError` unless ``trait`` accepts ``value``."""
    if not _accepts(trait, value):
        raise ConfigError(f"{source}: expected {trait.info()}, not {value!r}.")


def _accepts(trait: TraitType[Any, Any], value: Any) -> bool:
    # Checked on a copy of the trait, so that no configurable is built (nor the real trait rebound).
    probe = HasTraits()
    probe.add_traits(value=copy.deepcopy(trait))
    try:
        probe.value = value  # type: ignore[attr-defined]
    except TraitError:
        return False
    return True


def check_config(config: Config, classes: Iterable[type[Configurable]], where: str) -> Config:
    """``config`` with every value checked (and command-line text parsed) against ``classes`` and their
    parents. Raises :class:`ConfigError` for a section or option that no class has, or a value that does not
    fit; ``where`` names the source ("the command line", a file)."""
    known = {c.__name__: c for cls in classes for c in cls.mro() if issubclass(c, Configurable)}
    out = Config()
    for section, values in config.items():
        cls = known.get(section)
        if cls is None or not isinstance(values, Mapping):
            shown = section if isinstance(values, Mapping) else f"{section}={values!r}"
            raise ConfigError(f"{where}: unknown option {shown!r} (the options are in --help-all).")
        traits = cls.class_traits(config=True)
        for name, value in values.items():
            trait = traits.get(name)
            if trait is None:
                options = ", ".join(sorted(traits)) or "none"
                raise ConfigError(f"{where}: {section} has no option {name!r} (its options: {options}).")
            source = f"{where}: {section}.{name}"
            if isinstance(value, DeferredConfig):
                value = parse_cli(trait, value, source)
            else:
                check_value(trait, value, source)
            out[section][name] = value
    return out


def trait_help(cls: type[Configurable], trait: TraitType[Any, Any], *, option: str | None = None) -> list[str]:
    """The ``--help`` lines of one option: its name, help text, choices, true default and variable.

    ``option`` is the alias it is shown under (``port``), with the full ``--Class.trait`` name it stands for;
    without it the full name heads the entry (``--help-all``).
    """
    full = f"{cls.__name__}.{trait.name}"
    kind = trait.__class__.__name__
    lines = [f"--{option or full}=<{kind}>"]
    if trait.help:
        lines.append(indent("\n\n".join(wrap_paragraphs(trait.help, 76)), "    "))
    if isinstance(trait, Enum):
        lines.append(f"    Choices: {', '.join(repr(v) for v in trait.values or ())}")
    lines.append(f"    Default: {default_text(trait)}")
    var = env_var(trait)
    if var:
        lines.append(f"    Environment: {var}{_format_note(trait)}")
    if option:
        lines.append(f"    Equivalent to: [--{full}]")
    return lines


def default_text(trait: TraitType[Any, Any]) -> str:
    """The default as ``--help`` shows it: the ``default_help`` tag of a computed default, else its repr."""
    words = trait.metadata.get(DEFAULT_HELP)
    if words:
        return str(words)
    if isinstance(trait, (Dict, Container)):
        return json.dumps(trait.default())
    return trait.default_value_repr()


def _format_note(trait: TraitType[Any, Any]) -> str:
    if isinstance(trait, Dict):
        return " (a JSON object)"
    if isinstance(trait, List) and isinstance(trait._trait, Unicode):
        return " (a JSON array, or comma-separated)"
    if isinstance(trait, Container):
        return " (a JSON array)"
    if isinstance(trait, Bool):
        return " (1/true/yes or 0/false/no)"
    return ""


def _json_or_list(trait: TraitType[Any, Any], text: str) -> Any:
    stripped = text.strip()
    strings = isinstance(trait, List) and isinstance(trait._trait, Unicode)
    if strings and not stripped.startswith("["):
        return [part.strip() for part in stripped.split(",") if part.strip()]
    try:
        return json.loads(stripped)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"say one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}")
