"""The ``kernelhub`` applications: how every command reads its settings, and ``kernelhub serve``.

:class:`KernelHubApp` is the base of every command (``kernelhub`` itself and its subcommands, see
:mod:`kernelhub.cli`). Each option is a traitlet on the class it configures (``ServeApp``, ``SandboxFactory``,
``Hub``...) and takes its value from, strongest first:

1. the command line (``--port 9000``, ``--Hub.max_sandboxes_per_tenant=50``);
2. the config file (``--config FILE`` or ``KERNELHUB_CONFIG``, a traitlets ``.py`` or ``.json`` file);
3. the option's ``KERNELHUB_*`` variable (its ``env`` tag, see :mod:`kernelhub.settings`);
4. its default.

Unknown options, values that do not fit and broken config files raise :class:`~kernelhub.settings.ConfigError`
naming their source, before anything starts. ``--help`` shows each option's true default and its variable.

:class:`HubApp` is the one start-up path of the commands that run a hub in this process (``serve`` and the
embedded ``mcp``): the sandbox factory, the ``kernelhub doctor`` check, and the hub's start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Generator
from copy import deepcopy
from typing import Any

from tornado import netutil, web
from traitlets import Bool, CaselessStrEnum, Float, Integer, List, TraitError, Unicode, observe, validate
from traitlets.config import Application, Config, Configurable
from traitlets.config.loader import ArgumentError, KVArgParseConfigLoader
from traitlets.utils.text import wrap_paragraphs

from . import __version__, redaction
from .errors import IsolationUnavailable, KernelHubError
from .handlers import commands, e2b, jupyter, ops, rest, streams, terminal
from .handlers.base import GatewayConfig, NotFoundHandler
from .mcp import http as mcp_http
from .sandbox import doctor
from .sandbox.factory import SandboxFactory
from .server import GatewayServer, raise_fd_limit
from .services.egress import EgressService
from .services.hub import Hub
from .services.pool import Pool
from .services.tenants import TenantRegistry
from .settings import ConfigError, check_config, env_config, env_var, parse_cli, trait_help

#: Largest request body the gateway reads (file uploads), bytes.
MAX_BODY_BYTES = 20 * 1024 * 1024 * 1024


def make_app(hub: Hub, tenants: TenantRegistry, config: GatewayConfig, **settings: Any) -> web.Application:
    """The tornado application with every surface mounted; used by ``serve`` and by tests."""
    deps = {"hub": hub, "tenants": tenants, "config": config}
    routes: list[Any] = []
    for module in (rest, commands, streams, terminal, e2b, ops):
        for spec in getattr(module, "default_handlers", []):
            pattern, handler = spec[0], spec[1]
            extra = spec[2] if len(spec) > 2 else {}
            routes.append((pattern, handler, {**deps, **extra}))
    # Who is connected to which Jupyter kernel: one registry per application, handed to the Jupyter routes.
    connections = jupyter.KernelConnections(hub.jupyter)
    routes.extend((pattern, handler, {**deps, **extra}) for pattern, handler, extra in jupyter.handlers(connections))
    routes.extend(mcp_http.handlers(hub, tenants, config))
    return web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        websocket_ping_interval=30,
        websocket_max_message_size=64 * 1024 * 1024,
        compress_response=False,
        log_function=redaction.log_request,
        **settings,
    )


class _StrictLoader(KVArgParseConfigLoader):
    """traitlets' command-line loader, with argparse's own errors raised as :class:`ConfigError` (not printed
    with a usage line and ``exit(2)``) and every value of a known option parsed by
    :func:`kernelhub.settings.parse_cli` (JSON for Dict/List options, as their variables)."""

    class parser_class(KVArgParseConfigLoader.parser_class):  # type: ignore[valid-type,misc]  # noqa: N801
        def error(self, message: str) -> Any:
            raise ConfigError(f"{message}.")

    def _exec_config_str(self, lhs: Any, rhs: Any, trait: Any = None) -> None:
        if trait is None:  # not an option of these classes: check_config says so, with the class's options
            super()._exec_config_str(lhs, rhs, trait)
            return
        *path, key = lhs.split(".")
        section = self.config
        for part in path:
            section = section[part]
        section[key] = parse_cli(trait, rhs, f"--{lhs}")


class KernelHubApp(Application):
    """The base of every ``kernelhub`` command: strict command-line parsing, the ``KERNELHUB_*`` variables,
    the config file (applied in that order, see the module) and ``--help`` that shows true defaults and each
    option's variable. Without subcommands of its own a command runs :meth:`start`; with them (``kernelhub``,
    ``kernelhub kernelspecs``) it hands over to the one named first."""

    name = "kernelhub"
    version = __version__
    description = "kernelhub: secure code execution on Jupyter kernels."
    subcommands: dict[str, tuple[str | type[Application], str]] = {}  # type: ignore[assignment]
    aliases: dict[str, Any] = {"config": "KernelHubApp.config_file", "log-level": "KernelHubApp.log_level"}  # type: ignore[assignment]
    flags: dict[str, Any] = {"debug": ({"KernelHubApp": {"log_level": "DEBUG"}}, "log at DEBUG level")}  # type: ignore[assignment]
    #: What the help's epilogue says (a command with subcommands says how to get theirs).
    epilogue = "Every option also takes its value from a config file (--config) and from its KERNELHUB_* " \
               "variable; the command line wins over the file, the file over the variable. All options: " \
               "--help-all."

    config_file = Unicode("", help="A traitlets config file (.py or .json), e.g. "
                          "c.Hub.default_limits = {'memory_mb': 1024}.", config=True).tag(env="KERNELHUB_CONFIG")
    # Jupyter's shape, with the date: a line says when, how bad and where (the logger: the app's class,
    # kernelhub.services, tornado.access, ...).
    log_format = Unicode("[%(levelname)1.1s %(asctime)s.%(msecs)03d %(name)s] %(message)s")
    log_level = CaselessStrEnum(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "WARNING",
                                help="What is logged to stderr.", config=True).tag(env="KERNELHUB_LOG_LEVEL")

    @observe("log_datefmt", "log_format", "log_level", "logging_config")
    def _observe_logging_change(self, change: Any) -> None:
        # traitlets' own handler turns the level into a number, which this Enum of names would refuse.
        self._configure_logging()

    # -- settings -----------------------------------------------------------------------------------------

    def initialize(self, argv: list[str] | None = None) -> None:
        """Read the command line; then, unless a subcommand took over, the variables and the config file.
        Raises :class:`ConfigError` for anything that cannot be used."""
        self.parse_command_line(argv)
        if self.subapp is None:
            self.load_settings()

    def parse_command_line(self, argv: list[str] | None = None) -> None:
        """Dispatch to a subcommand, answer ``--help``/``--version``, or keep the options in ``cli_config``
        (applied by :meth:`load_settings`). Unlike traitlets' own, never prints a usage line or exits on a
        mistake: raises :class:`ConfigError`."""
        argv = list(sys.argv[1:] if argv is None else argv)
        self.argv = argv
        if argv and argv[0] == "help":
            argv = [*argv[1:], "--help"]
        if self.subcommands and argv and argv[0] in self.subcommands:
            self.initialize_subcommand(argv[0], argv[1:])
            return
        if any(arg in argv for arg in ("-h", "--help", "--help-all")):
            self.print_help("--help-all" in argv)
            self.exit(0)
        if "--version" in argv or "-V" in argv:
            self.print_version()
            self.exit(0)
        self._check_option_names(argv)
        flags, aliases = self.flatten_flags()
        classes = list(self._classes_with_config_traits())
        loader = _StrictLoader(argv, aliases, flags, classes=classes, log=self.log)
        try:
            self.cli_config = deepcopy(loader.load_config())
        except (ArgumentError, ConfigError) as exc:
            # traitlets wraps what a value's parsing raised; say the option as it was typed (--port), not as
            # what it stands for (--ServeApp.port).
            cause = exc.__cause__ if isinstance(exc, ArgumentError) else exc
            message = cause.message if isinstance(cause, ConfigError) else str(exc)
            for alias, longname in aliases.items():
                message = message.replace(f"--{longname}=", f"--{alias}=").replace(f"--{longname}:", f"--{alias}:")
            raise ConfigError(message) from None
        self.extra_args = loader.extra_args
        if self.extra_args:
            if self.subcommands:
                raise ConfigError(f"unknown command {self.extra_args[0]!r}; try `{self.name} --help`.")
            raise ConfigError(f"unexpected argument {self.extra_args[0]!r}; try `{self.name} --help`.")

    def initialize_subcommand(self, subc: str, argv: list[str] | None = None) -> None:
        """Hand over to the subcommand ``subc`` with ``argv``: as traitlets does, but a fresh instance (not a
        process-wide singleton) whose errors are raised, not turned into an exit."""
        subapp, _ = self.subcommands[subc]
        assert isinstance(subapp, type) and issubclass(subapp, Application)
        self.subapp = subapp(parent=self)
        self.subapp.initialize(argv)

    def _check_option_names(self, argv: list[str]) -> None:
        """Refuse an option this command does not have (traitlets would take ``--bogus=1`` as a setting with a
        warning, and ``--bogus`` as an option missing its value). ``--Class.trait`` names are checked with
        their values, in :meth:`load_settings`."""
        takes_value = False
        for arg in argv:
            if takes_value or not arg.startswith("-") or arg == "-":
                takes_value = False
                continue
            name, equals, _ = arg.lstrip("-").partition("=")
            if name in self.flags and not equals:
                continue
            if name in self.aliases or ("." in name and arg.startswith("--")):
                takes_value = not equals
                continue
            raise ConfigError(f"unrecognized arguments: {arg.partition('=')[0]}; try `{self.name} --help`.")

    def configured_classes(self) -> list[type[Configurable]]:
        """This command's class and the classes it configures (whose options and variables apply)."""
        return list(dict.fromkeys([type(self), *self.classes]))

    def load_settings(self) -> None:
        """Apply the variables, the config file and the command line, weakest first (see the module)."""
        classes = self.configured_classes()
        cli = check_config(self.cli_config, classes, "on the command line")
        self.update_config(env_config(classes))
        self.update_config(cli)
        if not self.config_file:
            return
        path = os.path.abspath(self.config_file)
        named_by = "--config" if "config_file" in self._cli_traits() else env_var(KernelHubApp.config_file)
        source = f"the config file {path} (from {named_by})"
        loader_class = {".py": self.python_config_loader_class,
                        ".json": self.json_config_loader_class}.get(os.path.splitext(path)[1])
        if loader_class is None:
            raise ConfigError(f"{source} is neither .py nor .json: say which kind of traitlets config it is "
                              "by its name.")
        if not os.path.isfile(path):
            raise ConfigError(f"{source} does not exist.")
        try:
            loaded = loader_class(os.path.basename(path), path=os.path.dirname(path), log=self.log).load_config()
        except Exception as exc:  # noqa: BLE001 - any error in the user's file is the user's to fix
            raise ConfigError(f"{source} could not be loaded: {type(exc).__name__}: {exc}") from None
        merged = Config()
        merged.merge(check_config(loaded, classes, source))
        merged.merge(cli)
        self.update_config(merged)
        self._loaded_config_files.append(path)

    def _cli_traits(self) -> set[str]:
        return {name for section in self.cli_config.values() if isinstance(section, dict) for name in section}

    # -- logging ------------------------------------------------------------------------------------------

    def get_default_logging_config(self) -> dict[str, Any]:
        """traitlets' console logging (stderr, at ``--log-level``), extended to kernelhub's own module loggers
        (``kernelhub.services`` has a line per sandbox lifecycle event at INFO) and tornado's (``tornado.access``
        has a line per request at INFO, and one per 4xx at WARNING)."""
        config: dict[str, Any] = super().get_default_logging_config()
        if "loggers" in config:
            for name in ("kernelhub", "tornado"):
                config["loggers"][name] = {"level": "DEBUG", "handlers": ["console"], "propagate": False}
        # Whatever any of them logs, no API key or header value reaches the console (kernelhub.redaction).
        config.setdefault("filters", {})["redact"] = {"()": "kernelhub.redaction.RedactingFilter"}
        for handler in config.get("handlers", {}).values():
            handler.setdefault("filters", []).append("redact")
        return config

    # -- help ---------------------------------------------------------------------------------------------

    def print_version(self) -> None:
        print(f"kernelhub {self.version}")

    def emit_alias_help(self) -> Generator[str, None, None]:
        """Each alias with its help, choices, true default, variable and full name."""
        owners = {c.__name__: c for cls in self.configured_classes() for c in cls.mro()
                  if isinstance(c, type) and issubclass(c, Configurable)}
        for alias, longname in self.aliases.items():
            section, name = str(longname).split(".")
            cls = owners[section]
            yield from trait_help(cls, cls.class_traits(config=True)[name], option=alias)

    def emit_flag_help(self) -> Generator[str, None, None]:
        """Each flag with its help, the setting it stands for and that setting's variable."""
        owners = {c.__name__: c for cls in self.configured_classes() for c in cls.mro()
                  if isinstance(c, type) and issubclass(c, Configurable)}
        for flag, (config, text) in self.flags.items():
            yield f"--{flag}"
            yield f"    {text}"
            settings = [(section, name, value) for section, values in config.items()
                        for name, value in values.items()]
            yield "    Equivalent to: [" + " ".join(f"--{s}.{n}={v}" for s, n, v in settings) + "]"
            for section, name, value in settings:
                var = env_var(owners[section].class_traits(config=True)[name])
                if var:
                    shown = ("1" if value else "0") if isinstance(value, bool) else value
                    yield f"    Environment: {var}={shown}"

    def emit_help(self, classes: bool = False) -> Generator[str, None, None]:
        """The description, subcommands, options and examples; with ``--help-all`` every option of every
        class this command configures (traitlets' own logging options are left out)."""
        yield from self.emit_description()
        yield from self.emit_subcommands_help()
        yield from self.emit_options_help()
        if classes:
            for cls in self.configured_classes():
                traits = {name: trait for name, trait in sorted(cls.class_traits(config=True).items())
                          if trait.this_class is not None and trait.this_class.__module__.startswith("kernelhub")}
                if not traits:
                    continue
                yield f"{cls.__name__} options"
                yield "-" * len(f"{cls.__name__} options")
                for trait in traits.values():
                    yield from trait_help(cls, trait)
                yield ""
        yield from self.emit_examples()
        yield from self.emit_help_epilogue(classes)

    def emit_help_epilogue(self, classes: bool) -> Generator[str, None, None]:
        yield from wrap_paragraphs(self.epilogue)
        yield ""

    # -- running ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the subcommand; a command with subcommands given none of them is a usage error."""
        if self.subapp is not None:
            self.subapp.start()
            return
        if self.subcommands:
            raise ConfigError(f"say which command: {', '.join(self.subcommands)}; try `{self.name} --help`.")


class HubApp(KernelHubApp):
    """A command that runs a hub in this process: ``kernelhub serve`` and the embedded ``kernelhub mcp``.

    :meth:`running_hub` is their one start-up path: the sandbox factory, the ``kernelhub doctor`` check when
    isolation is strict, the hub's start (which reaps what a crashed process left) and, on the way out, its
    shutdown (every sandbox stopped)."""

    classes = [SandboxFactory, Hub, Pool, EgressService]
    #: How this command says what to do when the doctor check fails.
    isolation_hint = "Fix it, or start with --isolation=relaxed to run with less."

    skip_doctor = Bool(False, help="Start even if `kernelhub doctor` finds that the isolation policy cannot be "
                       "enforced.", config=True).tag(env="KERNELHUB_SKIP_DOCTOR")

    @contextlib.asynccontextmanager
    async def running_hub(self) -> AsyncIterator[Hub]:
        """The started hub; stopped (every sandbox with it) when the block ends. Raises
        :class:`~kernelhub.errors.IsolationUnavailable` when strict isolation cannot be enforced here."""
        factory = SandboxFactory(parent=self)
        if factory.isolation == "strict" and not self.skip_doctor:
            results = await doctor.checks_async(bwrap=factory.bwrap_path, cgroup_root=factory.cgroup_root,
                                                runtime_dir=factory.runtime_dir, use_seccomp=factory.seccomp)
            if not doctor.enforceable(results):
                failed = "; ".join(f"{c.name}: {c.detail}" for c in results if c.required and not c.ok)
                raise IsolationUnavailable(f"Refusing to start: this machine cannot enforce strict isolation "
                                           f"({failed}). {self.isolation_hint}")
        hub = Hub(factory, parent=self)
        await hub.start()
        try:
            yield hub
        finally:
            await hub.shutdown()


class CannotListen(KernelHubError):
    """The gateway's address is taken or not this machine's; the message says which and how to choose another.
    Never an HTTP answer (``status`` 0)."""

    status = 0
    error = "cannot_listen"


class ServeApp(HubApp):
    """``kernelhub serve``: the gateway."""

    name = "kernelhub serve"
    description = (
        "Start the kernelhub gateway: the REST API (/v1), its NDJSON and websocket streams, the Jupyter API "
        "(/api, a drop-in for the Jupyter Kernel Gateway) and MCP over streamable HTTP (/mcp). Every sandbox "
        "runs in bubblewrap namespaces under a cgroup and a host uid of its own; run as root for that."
    )
    examples = """
kernelhub serve                                   # 127.0.0.1:8888, prints a generated token
kernelhub serve --ip 0.0.0.0 --port 9000 --token KEY
kernelhub serve --api-keys keys.json              # {"<key>": "<tenant name>", ...}
kernelhub serve --Hub.default_limits='{"memory_mb": 1024}' --max-sandboxes 50
KERNELHUB_TOKEN=KEY KERNELHUB_STATE_DIR=/srv/kernelhub kernelhub serve
"""
    aliases = {
        "ip": "ServeApp.ip",
        "port": "ServeApp.port",
        "token": "ServeApp.token",
        "api-keys": "ServeApp.api_keys_file",
        "state-dir": "SandboxFactory.state_dir",
        "config": "KernelHubApp.config_file",
        "isolation": "SandboxFactory.isolation",
        "allow-origin": "ServeApp.allow_origin",
        "max-sandboxes": "Hub.max_sandboxes_per_tenant",
        "pool-size": "Pool.size",
        "egress-allow-private": "EgressService.allow_private",
        "log-level": "KernelHubApp.log_level",
        "operator-tenant": "ServeApp.operator_tenant",
    }
    flags = {**KernelHubApp.flags,
             "ephemeral": ({"Hub": {"ephemeral": True}}, "stop every sandbox for good when the gateway stops, "
                           "instead of keeping them for the next start on this state directory")}

    ip = Unicode("127.0.0.1", help="Interface to listen on.", config=True).tag(env="KERNELHUB_IP")
    port = Integer(8888, help="Port to listen on; 0 picks a free one.", config=True).tag(env="KERNELHUB_PORT")
    token = Unicode("", help="API key of the tenant 'default'; generated and printed when empty and no "
                    "--api-keys file is given.", config=True).tag(env="KERNELHUB_TOKEN")
    api_keys_file = Unicode("", help='JSON file {"<key>": "<tenant name>", ...} of more tenants.',
                            config=True).tag(env="KERNELHUB_API_KEYS")
    allow_origin = Unicode("", help="Access-Control-Allow-Origin for REST answers; empty disables CORS.",
                           config=True).tag(env="KERNELHUB_ALLOW_ORIGIN")
    operator_tenant = Unicode("default", help="The tenant whose keys may read GET /metrics (every tenant's "
                              "activity in aggregate); 'default' is the tenant of --token.", config=True).tag(
        env="KERNELHUB_OPERATOR_TENANT")
    allowed_ws_origins = List(Unicode(), help="Origins allowed to open websockets besides the gateway's own "
                              "host; '*' allows any.", config=True).tag(env="KERNELHUB_WS_ORIGINS")
    header_timeout = Float(10.0, help="Seconds a new connection may take to send its first request's headers "
                           "before it is closed (slow or silent clients).", config=True).tag(
        env="KERNELHUB_HEADER_TIMEOUT")
    idle_timeout = Float(75.0, help="Seconds a kept-alive connection may wait for its next request.",
                         config=True).tag(env="KERNELHUB_IDLE_TIMEOUT")
    body_timeout = Float(60.0, help="Seconds a request body may send nothing before its connection is closed "
                         "(a stalled upload); 0 turns the deadline off.", config=True).tag(
        env="KERNELHUB_BODY_TIMEOUT")
    max_connections_per_address = Integer(128, help="Connections in their HTTP phase one client address may "
                                          "hold; more are closed on arrival (websockets do not count).",
                                          config=True).tag(env="KERNELHUB_MAX_CONNECTIONS_PER_ADDRESS")
    max_connections = Integer(4096, help="Connections in their HTTP phase the gateway holds in all; more are "
                              "closed on arrival. Kept below the descriptor limit, with room for sandboxes.",
                              config=True).tag(env="KERNELHUB_MAX_CONNECTIONS")

    @validate("header_timeout", "idle_timeout", "max_connections_per_address", "max_connections")
    def _positive(self, proposal: Any) -> Any:
        if not proposal["value"] > 0:  # 0 or less closed or refused every connection
            raise TraitError(f"ServeApp.{proposal['trait'].name} must be positive; it was {proposal['value']}.")
        return proposal["value"]

    @validate("body_timeout")
    def _not_negative(self, proposal: Any) -> Any:
        if not proposal["value"] >= 0:  # below 0, every request with a body was dropped unanswered
            raise TraitError(f"ServeApp.body_timeout must be 0 (no deadline) or more; it was {proposal['value']}.")
        return proposal["value"]

    def _tenants(self) -> tuple[TenantRegistry, bool]:
        generated = False
        token = self.token
        if not token and not self.api_keys_file:
            token, generated = secrets.token_urlsafe(24), True
            self.token = token
        if self.api_keys_file:
            return TenantRegistry.from_file(self.api_keys_file, default_token=token or None), generated
        return TenantRegistry({token: "default"}), generated

    def bind(self) -> list[socket.socket]:
        """The listening sockets, bound before anything else starts (a second gateway on a busy port must not
        reap the first one's sandboxes). Raises :class:`CannotListen` saying which address is taken and how to
        choose another."""
        try:
            return netutil.bind_sockets(self.port, self.ip)
        except OSError as exc:
            where = f"{self.ip}:{self.port}"
            if exc.errno == errno.EADDRINUSE:
                raise CannotListen(f"cannot listen on {where}: the address is already in use (another kernelhub "
                                  "or another program listens there). Choose another port with --port N (or "
                                  "KERNELHUB_PORT=N), or --port 0 for any free one.") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise CannotListen(f"cannot listen on {where}: {self.ip} is not an address of this machine. "
                                  "Choose another with --ip (or KERNELHUB_IP), e.g. 127.0.0.1 or 0.0.0.0.") from None
            if exc.errno == errno.EACCES:
                raise CannotListen(f"cannot listen on {where}: ports below 1024 need root. Choose another port "
                                  "with --port N (or KERNELHUB_PORT=N).") from None
            raise CannotListen(f"cannot listen on {where}: {exc.strerror or exc}. Check --ip and --port.") from None

    async def serve(self) -> None:
        """Listen, start the hub, serve until SIGINT or SIGTERM, then stop every sandbox."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sockets = self.bind()
        try:
            tenants, generated = self._tenants()
            async with self.running_hub() as hub:
                config = GatewayConfig(allow_origin=self.allow_origin,
                                       allowed_ws_origins=tuple(self.allowed_ws_origins),
                                       debug=self.log.isEnabledFor(logging.DEBUG),
                                       operator_tenant=self.operator_tenant)
                # Half the descriptors at most go to connections: sandboxes need theirs (pipes, sockets).
                fd_limit = raise_fd_limit()
                server = GatewayServer(make_app(hub, tenants, config), max_body_size=MAX_BODY_BYTES,
                                       header_timeout=self.header_timeout, idle_timeout=self.idle_timeout,
                                       body_timeout=self.body_timeout or None,
                                       max_per_address=self.max_connections_per_address,
                                       max_connections=min(self.max_connections, fd_limit // 2))
                server.add_sockets(sockets)
                port = sockets[0].getsockname()[1]
                url = f"http://{self.ip}:{port}"
                self.log.info("kernelhub %s listening on %s (state in %s)", __version__, url,
                              hub.factory.state_dir)
                if generated:
                    print(f"kernelhub: token for tenant 'default': {self.token}\n"
                          f"    {url}/v1/sandboxes?token={self.token}\n"
                          "    (a new one at every start: keep one with --token KEY, KERNELHUB_TOKEN or --api-keys "
                          "FILE)", flush=True)
                print(f"kernelhub: listening on {url}; Ctrl-C or SIGTERM stops it (its sandboxes are kept for the next "
                      "start on this state directory unless --ephemeral)", flush=True)
                try:
                    await stop.wait()
                finally:
                    self.log.info("kernelhub stopping: ending every sandbox")
                    server.stop()
        finally:
            for sock in sockets:
                sock.close()

    def start(self) -> None:
        asyncio.run(self.serve())
