"""The ``kernelhub`` command: ``serve``, ``mcp``, ``doctor``, ``kernelspecs install|list``.

One traitlets application (:class:`MainApp`) with a subcommand each; every one is a
:class:`~kernelhub.app.KernelHubApp`, so options, ``KERNELHUB_*`` variables, config files, ``--help`` and errors
behave the same everywhere. :func:`main` runs it and turns what went wrong into a sentence on stderr and an exit
status: 2 for a mistake in what was asked (unknown command or option, bad value, missing config file), 1 when
the command could not do it (isolation unavailable, address in use, ...), 0 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from traitlets import Bool, TraitError, Unicode
from traitlets.config import Application

from .app import HubApp, KernelHubApp, ServeApp
from .errors import KernelHubError
from .mcp.server import stdio_embedded, stdio_remote
from .sandbox import doctor
from .sandbox.factory import SandboxFactory
from .sandbox.provisioner import KERNELSPECS_DIR
from .services import audit
from .services.tenants import Tenant
from .settings import ConfigError

#: The entry point group and name that the kernelspecs' ``metadata.kernel_provisioner`` names.
PROVISIONER_GROUP = "jupyter_client.kernel_provisioners"
PROVISIONER_NAME = "kernelhub-provisioner"


class MCPApp(HubApp):
    """``kernelhub mcp``: the seventeen MCP tools over stdio, embedded (a hub in this process, through the
    start-up path ``serve`` uses) or remote (``--url``: a running gateway's REST API)."""

    name = "kernelhub mcp"
    description = """\
Serve kernelhub's seventeen MCP tools (sandbox_create, code_execute, file_upload, ...) over stdio, for an
MCP host such as Claude Desktop or an IDE agent.

Two modes:
  embedded (default)   kernelhub runs in this process: sandboxes are started here (bubblewrap + cgroups, as
                       `kernelhub serve` does; usually needs root) for the tenant 'default', and all of them
                       are stopped when the host closes the server.
  remote (--url)       the tools drive a running gateway (`kernelhub serve`) through its REST API with
                       --token; sandboxes belong to that key's tenant and outlive this process.

The MCP host starts this command itself; stdout carries the protocol, logs go to stderr. The gateway also
serves the same tools over streamable HTTP at http://HOST:PORT/mcp (Authorization: Bearer KEY).
"""
    examples = """\
Claude Desktop (claude_desktop_config.json), embedded:
  {"mcpServers": {"kernelhub": {"command": "/path/to/.venv/bin/kernelhub", "args": ["mcp"]}}}
remote:
  {"mcpServers": {"kernelhub": {"command": "/path/to/.venv/bin/kernelhub",
                                "args": ["mcp", "--url", "http://127.0.0.1:8888"],
                                "env": {"KERNELHUB_TOKEN": "<key>"}}}}
"""
    aliases = {
        "url": "MCPApp.url",
        "token": "MCPApp.token",
        "state-dir": "SandboxFactory.state_dir",
        "config": "KernelHubApp.config_file",
        "isolation": "SandboxFactory.isolation",
        "log-level": "KernelHubApp.log_level",
    }
    flags = {
        "embedded": ({"MCPApp": {"embedded": True}}, "run in this process even if KERNELHUB_URL is set"),
        "debug": ({"KernelHubApp": {"log_level": "DEBUG"}}, "log at DEBUG level"),
    }
    isolation_hint = "Fix it, or run with --isolation relaxed, or drive a gateway with --url."

    url = Unicode("", help="The gateway to drive, e.g. http://127.0.0.1:8888 (the remote mode); empty: the "
                  "service runs in this process.", config=True).tag(env="KERNELHUB_URL")
    token = Unicode("", help="The API key for --url; prefer the variable, as arguments are visible to other "
                    "users of the machine.", config=True).tag(env="KERNELHUB_TOKEN")
    embedded = Bool(False, help="Run in this process even if a --url is set.", config=True).tag(
        env="KERNELHUB_MCP_EMBEDDED")

    def load_settings(self) -> None:
        """As every command's, with one default of its own: embedded, the hub keeps nothing on disk
        (``Hub.durable`` off unless configured): its sandboxes stop with this process, as documented above, and
        its state directory may be a running gateway's, whose store it must not take."""
        super().load_settings()
        if "durable" not in self.config.Hub:
            self.config.Hub.durable = False
            self.update_config(self.config)

    async def serve(self) -> None:
        if self.url and not self.embedded:
            await stdio_remote(self.url, self.token or None)
            return
        async with self.running_hub() as hub:
            await stdio_embedded(hub, Tenant("default"))

    def start(self) -> None:
        asyncio.run(self.serve())


class DoctorApp(KernelHubApp):
    """``kernelhub doctor``: what isolation this machine can enforce, checked with the sandbox factory's own
    settings (bubblewrap, cgroup root, runtime)."""

    name = "kernelhub doctor"
    description = ("Report what isolation this machine can enforce. Exits 1 when the configured policy (--isolation, "
                   "strict by default) cannot be enforced.")
    classes = [SandboxFactory]
    aliases = {"isolation": "SandboxFactory.isolation", "config": "KernelHubApp.config_file",
               "log-level": "KernelHubApp.log_level"}
    flags = {"json": ({"DoctorApp": {"json": True}}, "print the checks as JSON")}

    json = Bool(False, help="Print the checks as JSON.", config=True).tag(env="KERNELHUB_DOCTOR_JSON")

    def start(self) -> None:
        factory = SandboxFactory(parent=self)
        results = doctor.checks(bwrap=factory.bwrap_path, cgroup_root=factory.cgroup_root,
                                runtime_dir=factory.runtime_dir, use_seccomp=factory.seccomp)
        ok = doctor.enforceable(results)
        if self.json:
            print(json.dumps({"isolation": factory.isolation, "enforceable": ok,
                              "checks": [c.__dict__ for c in results]}, indent=2))
        else:
            print(doctor.report(results))
            if ok:
                print("\nStrict isolation can be enforced on this machine.")
            else:
                print("\nStrict isolation can NOT be enforced here; kernelhub refuses to start unless started "
                      "with --isolation=relaxed (KERNELHUB_ISOLATION=relaxed).")
        self.exit(0 if ok or factory.isolation == "relaxed" else 1)


def provisioner_problem(prefix: str) -> str | None:
    """Why the Python environment at ``prefix`` could not start kernelhub's kernelspecs, or None.

    A kernelspec names its provisioner by entry point, which ``jupyter_client`` looks up in the environment
    that reads the spec: the specs start only where ``kernelhub-provisioner`` is installed. A prefix without a
    Python of its own is a data directory (for ``JUPYTER_PATH``), not an environment: nothing to check.
    """
    root = Path(prefix)
    python = next((root / "bin" / n for n in ("python", "python3") if (root / "bin" / n).exists()), None)
    if python is None or (root.exists() and os.path.samefile(root, sys.prefix)):
        return None
    probe = ("from importlib.metadata import entry_points\n"
             f"eps = entry_points(group={PROVISIONER_GROUP!r}, name={PROVISIONER_NAME!r})\n"
             "assert eps, 'no entry point'\n"
             "next(iter(eps)).load()\n")
    try:
        proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"its Python ({python}) did not run: {exc}"
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return (f"its Python ({python}) cannot load the {PROVISIONER_NAME!r} kernel provisioner (entry point group "
            f"{PROVISIONER_GROUP}): {last}. Install kernelhub into that environment first "
            f"({python} -m pip install 'kernelhub[server]'), or install the kernelspecs where kernelhub is installed")


def install_kernelspecs(prefix: str | None = None, user: bool = False) -> list[str]:
    """Install our kernelspecs with jupyter_client's KernelSpecManager; returns the installed paths."""
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    installed = []
    for spec_dir in sorted(KERNELSPECS_DIR.iterdir()):
        if (spec_dir / "kernel.json").exists():
            # install_kernel_spec replaces an existing spec of that name (its ``replace`` is deprecated).
            installed.append(ksm.install_kernel_spec(str(spec_dir), spec_dir.name, user=user, prefix=prefix))
    return installed


class KernelspecsInstallApp(KernelHubApp):
    """``kernelhub kernelspecs install``."""

    name = "kernelhub kernelspecs install"
    description = ("Install kernelhub-python, -javascript, -typescript and -bash for Jupyter. Each names the "
                   "kernelhub-provisioner kernel provisioner, so the environment that reads them must have "
                   "kernelhub installed: an environment given with --prefix is checked for it.")
    aliases = {"prefix": "KernelspecsInstallApp.prefix"}
    flags = {"user": ({"KernelspecsInstallApp": {"user": True}}, "install for the current user")}

    prefix = Unicode("", help="Install under PREFIX/share/jupyter/kernels.", config=True).tag(
        env="KERNELHUB_KERNELSPECS_PREFIX", default_help="this environment (sys.prefix), unless --user")
    user = Bool(False, help="Install for the current user.", config=True).tag(env="KERNELHUB_KERNELSPECS_USER")

    def start(self) -> None:
        prefix = self.prefix or (None if self.user else sys.prefix)
        if prefix:
            problem = provisioner_problem(prefix)
            if problem:
                raise KernelHubError(f"not installing into {prefix}: the kernelspecs would fail there with "
                                     f"NoSuchKernel, because {problem}.", error="provisioner_missing")
            if not (Path(prefix) / "bin").is_dir():
                print(f"note: {prefix} holds no Python environment; Jupyter finds these kernelspecs through "
                      f"JUPYTER_PATH={prefix}/share/jupyter, and starts them where kernelhub is installed.",
                      file=sys.stderr)
        for path in install_kernelspecs(prefix=prefix, user=self.user):
            print(f"installed {path}")


class KernelspecsListApp(KernelHubApp):
    """``kernelhub kernelspecs list``."""

    name = "kernelhub kernelspecs list"
    description = "List the kernelspecs kernelhub ships."
    aliases: dict[str, Any] = {}
    flags: dict[str, Any] = {}

    def start(self) -> None:
        for spec_dir in sorted(KERNELSPECS_DIR.iterdir()):
            print(spec_dir.name)


class KernelspecsApp(KernelHubApp):
    """``kernelhub kernelspecs``: its two subcommands."""

    name = "kernelhub kernelspecs"
    description = "Install or list kernelhub's sandboxed kernelspecs for Jupyter."
    subcommands = {
        "install": (KernelspecsInstallApp, "install kernelhub-python, -javascript, -typescript and -bash"),
        "list": (KernelspecsListApp, "list the kernelspecs kernelhub ships"),
    }
    aliases: dict[str, Any] = {}
    flags: dict[str, Any] = {}
    epilogue = "Run `kernelhub kernelspecs COMMAND --help` for a command's options."


class AuditVerifyApp(KernelHubApp):
    """``kernelhub audit verify``: checks the audit log's hash chain (:func:`kernelhub.services.audit.run_verify`).
    Exits 0 when intact, 1 naming the first bad entry, 2 when there is nothing to check."""

    name = "kernelhub audit verify"
    description = ("Check that the audit log in the state directory's database and its JSON-lines mirror (the "
                   "state directory's audit.jsonl, or with --jsonl another file or a shipped copy) are intact and "
                   "agree: no entry changed, removed, inserted or reordered. Exits 1 naming the first bad entry.")
    classes = [SandboxFactory]
    aliases = {"state-dir": "SandboxFactory.state_dir", "jsonl": "AuditVerifyApp.jsonl",
               "config": "KernelHubApp.config_file", "log-level": "KernelHubApp.log_level"}
    flags: dict[str, Any] = {}

    jsonl = Unicode("", help="Check this JSON-lines mirror of the audit log (or a shipped copy of it) "
                             "instead of the state directory's audit.jsonl.",
                    config=True).tag(env="KERNELHUB_AUDIT_JSONL")

    def start(self) -> None:
        state_dir = SandboxFactory(parent=self).state_dir
        self.exit(audit.run_verify(state_dir, self.jsonl or None))


class AuditApp(KernelHubApp):
    """``kernelhub audit``: its subcommand."""

    name = "kernelhub audit"
    description = "Work with the gateway's audit log."
    subcommands = {"verify": (AuditVerifyApp, "check the audit log's hash chain")}
    aliases: dict[str, Any] = {}
    flags: dict[str, Any] = {}
    epilogue = "Run `kernelhub audit verify --help` for its options."


class MainApp(KernelHubApp):
    """``kernelhub``: the subcommands."""

    name = "kernelhub"
    description = ("kernelhub: a self-hosted, secure code-execution service built on Jupyter kernels. Every "
                   "option of every command can also come from a config file (--config) or its KERNELHUB_* "
                   "variable, named in the command's --help.")
    subcommands = {
        "serve": (ServeApp, "start the gateway (REST, websockets, Jupyter API, MCP over HTTP)"),
        "mcp": (MCPApp, "serve the MCP tools over stdio"),
        "doctor": (DoctorApp, "report what isolation this machine can enforce"),
        "kernelspecs": (KernelspecsApp, "install or list the sandboxed kernelspecs for Jupyter"),
        "audit": (AuditApp, "check the audit log (kernelhub audit verify --state-dir DIR)"),
    }
    examples = """
kernelhub serve --port 9000
kernelhub mcp --url http://127.0.0.1:8888
kernelhub doctor --json
kernelhub kernelspecs install --user
"""
    aliases: dict[str, Any] = {}
    flags: dict[str, Any] = {}
    epilogue = "Run `kernelhub COMMAND --help` for a command's options, `kernelhub --version` for the version."


def _command(app: Application) -> str:
    """The name of the innermost command that ran (``kernelhub serve``), for messages."""
    while app.subapp is not None:
        app = app.subapp
    return str(app.name)


def main(argv: list[str] | None = None) -> int:
    """Entry of ``kernelhub``: runs :class:`MainApp`; answers the exit status (see the module)."""
    app = MainApp()
    try:
        app.initialize(argv)
        app.start()
    except SystemExit as exc:  # --help, --version, doctor's verdict
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, TraitError) as exc:
        print(f"{_command(app)}: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except KernelHubError as exc:
        print(f"{_command(app)}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{_command(app)}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
