"""``KERNELHUB_*`` variables: every configurable trait of every command has one and it works, the order of
command line > config file > variable > default holds, bad values name their variable, and the help shows each
option's true default and variable (from the same tag)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets import Bool, Container, Dict, Enum, Float, Integer, List, TraitType, Unicode
from traitlets.config import Configurable

from kernelhub.app import KernelHubApp, ServeApp
from kernelhub.cli import MainApp
from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.hub import Hub
from kernelhub.services.pool import Pool
from kernelhub.settings import ConfigError, env_config, env_var, parse_text, trait_help

#: Valid non-default values for options whose value the class checks beyond its type.
SAMPLES: dict[str, Any] = {
    "Hub.default_limits": {"memory_mb": 300},
    "Hub.max_limits": {"memory_mb": 2048},
    "Hub.extra_templates": {"tiny": {"language": "bash", "limits": {"memory_mb": 128}}},
    "Hub.template_aliases": {"sh": "bash"},
    "Pool.sizes": {"node": 1},
    "EgressService.allow_private": "10.20.0.0/16",
    "EgressService.hosts": {"mirror.internal": ["10.20.0.5"]},
}


def commands(app_class: type[KernelHubApp] = MainApp) -> Iterator[type[KernelHubApp]]:
    """Every command class under ``kernelhub``, the root included."""
    yield app_class
    for sub, _ in app_class.subcommands.values():
        assert isinstance(sub, type) and issubclass(sub, KernelHubApp)
        yield from commands(sub)


def own_traits(cls: type[Configurable]) -> dict[str, TraitType[Any, Any]]:
    """The configurable traits kernelhub declares on ``cls`` and its parents (traitlets' own logging
    options excluded)."""
    return {name: trait for name, trait in cls.class_traits(config=True).items()
            if trait.this_class is not None and trait.this_class.__module__.startswith("kernelhub")}


def every_option() -> list[tuple[type[KernelHubApp], type[Configurable], str]]:
    out = []
    for command in commands():
        app = command()
        for cls in app.configured_classes():
            out += [(command, cls, name) for name in sorted(own_traits(cls))]
    return out


def sample(cls: type[Configurable], trait: TraitType[Any, Any], tmp_path: Path) -> tuple[str, Any]:
    """A variable's text and the value it must give: never the default."""
    key = f"{trait.this_class.__name__ if trait.this_class else cls.__name__}.{trait.name}"
    default = trait.default()
    if key in SAMPLES:
        value = SAMPLES[key]
        return (value if isinstance(value, str) else json.dumps(value)), value
    if isinstance(trait, Bool):
        return ("no", False) if default else ("yes", True)
    if isinstance(trait, Enum):
        value = next(v for v in trait.values or () if v != default)
        return str(value).lower(), value  # CaselessStrEnum takes any case
    if isinstance(trait, Integer):
        return str(default + 7), default + 7
    if isinstance(trait, Float):
        return str(default + 1.5), default + 1.5
    if isinstance(trait, List):
        return "a.example, b.example", ["a.example", "b.example"]
    if isinstance(trait, (Dict, Container)):
        raise AssertionError(f"add a valid sample value for {key} to SAMPLES")
    assert isinstance(trait, Unicode), f"{key}: no sample for {type(trait).__name__}"
    if trait.name == "config_file":
        path = tmp_path / "empty_config.py"
        path.write_text("# nothing\n")
        return str(path), str(path)
    return f"{trait.name}-from-env", f"{trait.name}-from-env"


def configured(app: KernelHubApp, cls: type[Configurable]) -> Configurable:
    """The instance of ``cls`` that the command would make, configured by ``app``."""
    if isinstance(app, cls):
        return app
    if cls is Hub:
        return Hub(SandboxFactory(parent=app), parent=app)
    if cls is Pool:
        return Hub(SandboxFactory(parent=app), parent=app).pool
    return cls(parent=app)


@pytest.mark.parametrize(("command", "cls", "name"), every_option(),
                         ids=[f"{c.__name__}-{k.__name__}.{n}" for c, k, n in every_option()])
def test_every_option_takes_its_variable(command: type[KernelHubApp], cls: type[Configurable], name: str,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trait = cls.class_traits(config=True)[name]
    var = env_var(trait)
    assert var and var.startswith("KERNELHUB_"), f"{cls.__name__}.{name} has no KERNELHUB_* variable"
    text, expected = sample(cls, trait, tmp_path)
    assert expected != trait.default()
    monkeypatch.setenv(var, text)
    app = command()
    app.initialize([])
    assert getattr(configured(app, cls), name) == expected


def test_variables_are_unique_per_option() -> None:
    """One variable may serve several commands' options of one meaning (KERNELHUB_TOKEN: the key `serve`
    accepts and the key `mcp --url` sends), never two options of one command."""
    for command in commands():
        app = command()
        seen: dict[str, str] = {}
        for cls in app.configured_classes():
            for name, trait in own_traits(cls).items():
                owner = f"{trait.this_class.__name__}.{name}" if trait.this_class else name
                var = env_var(trait)
                assert var is not None
                assert seen.setdefault(var, owner) == owner, f"{command.name}: {var} sets {seen[var]} and {owner}"


def test_computed_defaults_say_what_they_are() -> None:
    """A default computed at run time (an @default method) has words for --help, never traitlets.Undefined
    or the empty value the trait starts from."""
    for command in commands():
        for cls in command().configured_classes():
            for name, trait in own_traits(cls).items():
                computed = any(name in vars(c).get("_trait_default_generators", {}) for c in cls.mro())
                if computed:
                    assert trait.metadata.get("default_help"), f"{cls.__name__}.{name}"
                lines = "\n".join(trait_help(cls, trait))
                assert "Undefined" not in lines and f"Environment: {env_var(trait)}" in lines, lines


def test_order_command_line_then_file_then_variable_then_default(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "kernelhub_config.py"
    config.write_text("c.ServeApp.port = 2222\nc.Hub.max_sandboxes_per_tenant = 5\n"
                      "c.KernelHubApp.log_level = 'ERROR'\n")

    def started(*argv: str) -> ServeApp:
        app = ServeApp()
        app.initialize(list(argv))
        return app

    assert started().port == 8888
    monkeypatch.setenv("KERNELHUB_PORT", "1111")
    monkeypatch.setenv("KERNELHUB_LOG_LEVEL", "info")
    monkeypatch.setenv("KERNELHUB_MAX_SANDBOXES_PER_TENANT", "7")
    assert started().port == 1111 and started().log_level == "INFO"
    app = started("--config", str(config))
    assert (app.port, app.log_level) == (2222, "ERROR")
    assert Hub(SandboxFactory(parent=app), parent=app).max_sandboxes_per_tenant == 5
    # The file may come from its variable too; the command line beats both.
    monkeypatch.setenv("KERNELHUB_CONFIG", str(config))
    app = started("--port", "3333", "--max-sandboxes", "9", "--log-level", "DEBUG")
    assert (app.port, app.log_level) == (3333, "DEBUG")
    assert Hub(SandboxFactory(parent=app), parent=app).max_sandboxes_per_tenant == 9
    assert started("--debug").log_level == "DEBUG"


def test_json_options_from_the_command_line_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNELHUB_WS_ORIGINS", '["https://a.example"]')
    app = ServeApp()
    app.initialize(['--Hub.default_limits={"memory_mb": 512, "cpu": 1.5}',
                    "--Hub.max_limits", "memory_mb=4096"])
    hub = Hub(SandboxFactory(parent=app), parent=app)
    assert hub.default_limits == {"memory_mb": 512, "cpu": 1.5}
    assert hub.max_limits == {"memory_mb": 4096}
    assert app.allowed_ws_origins == ["https://a.example"]


@pytest.mark.parametrize(("var", "text", "said"), [
    ("KERNELHUB_DEFAULT_LIMITS", "{memory_mb: 1}", "not valid JSON"),
    ("KERNELHUB_TEMPLATES", "[1, 2]", "='[1, 2]': expected a dict"),
    ("KERNELHUB_WS_ORIGINS", '["a", 1]', "expected a list"),
    ("KERNELHUB_PORT", "eighty", "='eighty': expected an int"),
    ("KERNELHUB_REAP_INTERVAL", "soon", "expected a float"),
    ("KERNELHUB_SKIP_DOCTOR", "maybe", "expected a boolean"),
    ("KERNELHUB_ISOLATION", "loose", "='loose': expected any of ['strict', 'relaxed']"),
    ("KERNELHUB_LOG_LEVEL", "LOUD", "expected any of"),
])
def test_a_bad_variable_is_named(var: str, text: str, said: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, text)
    with pytest.raises(ConfigError) as caught:
        ServeApp().initialize([])
    assert caught.value.message.startswith(var) and said in caught.value.message, caught.value.message


def test_an_empty_variable_is_unset() -> None:
    assert env_config([ServeApp, Hub], {"KERNELHUB_PORT": "", "KERNELHUB_DEFAULT_LIMITS": ""}) == {}


def test_parse_text_rules() -> None:
    assert parse_text(List(Unicode()), " a, b ,,c", "X") == ["a", "b", "c"]
    assert parse_text(List(Unicode()), '["a,b"]', "X") == ["a,b"]
    assert parse_text(Dict(), '{"a": [1, true]}', "X") == {"a": [1, True]}
    for text, value in (("1", True), ("YES", True), ("on", True), ("0", False), ("False", False), ("off", False)):
        assert parse_text(Bool(), text, "X") is value
    assert parse_text(Integer(), "-3", "X") == -3 and parse_text(Float(), "2.5", "X") == 2.5
    with pytest.raises(ConfigError, match=r"^X='0': expected an int"):
        parse_text(Integer(min=1), "0", "X")


def test_the_readme_names_every_variable() -> None:
    """The README's Configuration table is written by hand: it must not miss a variable."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for _, cls, name in every_option():
        var = env_var(cls.class_traits(config=True)[name])
        assert f"| `{var}` |" in section, f"{var} ({cls.__name__}.{name}) is missing from README's Configuration"
