"""``kernelhub serve``: configuration, wiring and start/stop of the gateway.

Every option is a traitlet on the class it configures, settable from the command line, a config file
(``--config FILE``, Python or JSON traitlets config) and a ``KERNELHUB_*`` variable named in its help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from typing import Any

from tornado import web
from traitlets import Bool, Integer, List, Unicode, default
from traitlets.config import Application

from . import __version__
from .errors import KernelHubError
from .handlers.base import GatewayConfig, GatewayHTTPServer, NotFoundHandler
from .sandbox import doctor
from .sandbox.sandbox import SandboxFactory
from .services.hub import Hub
from .services.tenants import TenantRegistry


def _env(name: str, fallback: str = "") -> str:
    return os.environ.get(name, fallback)


def make_app(hub: Hub, tenants: TenantRegistry, config: GatewayConfig, **settings: Any) -> web.Application:
    """The tornado application with every surface mounted; used by ``serve`` and by tests."""
    deps = {"hub": hub, "tenants": tenants, "config": config}
    routes: list[Any] = []
    from .handlers import jupyter, rest, streams, terminal

    for module in (rest, streams, terminal, jupyter):
        for spec in getattr(module, "default_handlers", []):
            pattern, handler = spec[0], spec[1]
            extra = spec[2] if len(spec) > 2 else {}
            routes.append((pattern, handler, {**deps, **extra}))
    with contextlib.suppress(ImportError):
        from .mcp import http as mcp_http

        for pattern, handler, extra in mcp_http.handlers(hub, tenants, config):
            routes.append((pattern, handler, extra))
    return web.Application(
        routes,
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        websocket_ping_interval=30,
        websocket_max_message_size=64 * 1024 * 1024,
        compress_response=False,
        **settings,
    )


class KernelHubApp(Application):
    """The gateway process."""

    name = "kernelhub"
    version = __version__
    description = (
        "Start the kernelhub gateway: the REST API (/v1), its NDJSON and websocket streams, the Jupyter API "
        "(/api, a drop-in for the Jupyter Kernel Gateway) and MCP over streamable HTTP (/mcp). Every sandbox "
        "runs in bubblewrap namespaces under a cgroup and a host uid of its own; run as root for that. Every "
        "option can also come from a config file (--config) or a KERNELHUB_* variable (named in --help-all)."
    )
    examples = """
kernelhub serve                                   # 127.0.0.1:8888, prints a generated token
kernelhub serve --ip 0.0.0.0 --port 9000 --token KEY
kernelhub serve --api-keys keys.json              # {"<key>": "<tenant name>", ...}
kernelhub serve --Hub.default_limits='{"memory_mb": 1024}' --Hub.max_sandboxes_per_tenant=50
KERNELHUB_TOKEN=KEY KERNELHUB_STATE_DIR=/srv/kernelhub kernelhub serve
"""

    aliases = {
        "ip": "KernelHubApp.ip",
        "port": "KernelHubApp.port",
        "token": "KernelHubApp.token",
        "api-keys": "KernelHubApp.api_keys_file",
        "state-dir": "SandboxFactory.state_dir",
        "config": "KernelHubApp.config_file",
        "isolation": "SandboxFactory.isolation",
        "allow-origin": "KernelHubApp.allow_origin",
        "max-sandboxes": "Hub.max_sandboxes_per_tenant",
        "log-level": "Application.log_level",
    }
    flags = {
        "debug": ({"Application": {"log_level": 10}}, "log at DEBUG level"),
    }

    ip = Unicode(help="Interface to listen on (KERNELHUB_IP env var).", config=True)

    @default("ip")
    def _ip_default(self) -> str:
        return _env("KERNELHUB_IP", "127.0.0.1")

    port = Integer(help="Port to listen on; 0 picks a free one (KERNELHUB_PORT env var).", config=True)

    @default("port")
    def _port_default(self) -> int:
        return int(_env("KERNELHUB_PORT", "8888"))

    token = Unicode(help="API key of the tenant 'default'; generated and printed when empty and no "
                    "--api-keys file is given (KERNELHUB_TOKEN env var).", config=True)

    @default("token")
    def _token_default(self) -> str:
        return _env("KERNELHUB_TOKEN")

    api_keys_file = Unicode(help='JSON file {"<key>": "<tenant name>", ...} of more tenants '
                            "(KERNELHUB_API_KEYS env var).", config=True)

    @default("api_keys_file")
    def _api_keys_default(self) -> str:
        return _env("KERNELHUB_API_KEYS")

    config_file = Unicode(help="A traitlets config file (.py or .json) (KERNELHUB_CONFIG env var).", config=True)

    @default("config_file")
    def _config_file_default(self) -> str:
        return _env("KERNELHUB_CONFIG")

    allow_origin = Unicode(help="Access-Control-Allow-Origin for REST answers; empty disables CORS "
                           "(KERNELHUB_ALLOW_ORIGIN env var).", config=True)

    @default("allow_origin")
    def _allow_origin_default(self) -> str:
        return _env("KERNELHUB_ALLOW_ORIGIN")

    allowed_ws_origins = List(Unicode(), help="Origins allowed to open websockets besides the gateway's own "
                              "host; '*' allows any (KERNELHUB_WS_ORIGINS env var, comma-separated).",
                              config=True)

    @default("allowed_ws_origins")
    def _ws_origins_default(self) -> list[str]:
        return [o.strip() for o in _env("KERNELHUB_WS_ORIGINS").split(",") if o.strip()]

    skip_doctor = Bool(False, help="Start even if `kernelhub doctor` finds that the isolation policy cannot be "
                       "enforced (KERNELHUB_SKIP_DOCTOR env var).", config=True)

    @default("skip_doctor")
    def _skip_doctor_default(self) -> bool:
        return _env("KERNELHUB_SKIP_DOCTOR") in ("1", "true", "yes")

    classes = [SandboxFactory, Hub]

    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        if self.config_file:
            path = os.path.abspath(self.config_file)
            if not os.path.exists(path):
                raise KernelHubError(f"The config file {path} does not exist.", status=400, error="bad_config")
            self.load_config_file(os.path.basename(path), os.path.dirname(path))
            # The command line wins over the file.
            if self.cli_config:
                self.update_config(self.cli_config)

    def _tenants(self) -> tuple[TenantRegistry, bool]:
        generated = False
        token = self.token
        if not token and not self.api_keys_file:
            token, generated = secrets.token_urlsafe(24), True
            self.token = token
        if self.api_keys_file:
            return TenantRegistry.from_file(self.api_keys_file, default_token=token or None), generated
        return TenantRegistry({token: "default"}), generated

    async def _serve(self) -> None:
        factory = SandboxFactory(parent=self)
        if factory.isolation == "strict" and not self.skip_doctor:
            results = await doctor.checks_async(bwrap=factory.bwrap_path, cgroup_root=factory.cgroup_root,
                                                runtime_dir=factory.runtime_dir)
            if not doctor.enforceable(results):
                failed = [f"{c.name}: {c.detail}" for c in results if c.required and not c.ok]
                raise KernelHubError(
                    "Refusing to start: this machine cannot enforce strict isolation ("
                    + "; ".join(failed) + "). Fix it, or start with --isolation=relaxed to run with less.",
                    error="isolation_unavailable", status=503)
        tenants, generated = self._tenants()
        hub = Hub(factory, parent=self)
        await hub.start()
        config = GatewayConfig(allow_origin=self.allow_origin, allowed_ws_origins=tuple(self.allowed_ws_origins),
                               debug=self.log.isEnabledFor(logging.DEBUG))
        app = make_app(hub, tenants, config)
        server = GatewayHTTPServer(app, max_body_size=20 * 1024 * 1024 * 1024, idle_connection_timeout=3600)
        sockets = __import__("tornado.netutil", fromlist=["bind_sockets"]).bind_sockets(self.port, self.ip)
        server.add_sockets(sockets)
        port = sockets[0].getsockname()[1]
        url = f"http://{self.ip}:{port}"
        self.log.info("kernelhub %s listening on %s (state in %s)", __version__, url, factory.state_dir)
        if generated:
            print(f"kernelhub: token for tenant 'default': {self.token}\n    {url}/v1/sandboxes?token={self.token}",
                  flush=True)
        print(f"kernelhub: listening on {url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            self.log.info("kernelhub stopping: ending every sandbox")
            server.stop()
            await hub.shutdown()

    def start(self) -> None:
        asyncio.run(self._serve())


def main(argv: list[str] | None = None) -> int:
    """Entry of ``kernelhub serve``."""
    app = KernelHubApp()
    try:
        app.initialize(argv)
        app.start()
    except KernelHubError as exc:
        print(f"kernelhub: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kernelhub: {exc}", file=sys.stderr)
        return 1
    return 0
