"""The ``kernelhub`` command: ``serve``, ``mcp``, ``doctor``, ``kernelspecs install``.

A thin surface: each subcommand hands its arguments to the layer that owns them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _doctor(argv: list[str]) -> int:
    from .sandbox import doctor

    parser = argparse.ArgumentParser(
        prog="kernelhub doctor",
        description="Report what isolation this machine can enforce. Exits 1 when the configured policy "
        "(KERNELHUB_ISOLATION, strict by default) cannot be enforced.",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--isolation", choices=["strict", "relaxed"],
                        default=os.environ.get("KERNELHUB_ISOLATION", "strict"),
                        help="the policy to check against (KERNELHUB_ISOLATION env var)")
    args = parser.parse_args(argv)
    results = doctor.checks(
        cgroup_root=os.environ.get("KERNELHUB_CGROUP_ROOT", "/sys/fs/cgroup"),
        runtime_dir=os.environ.get("KERNELHUB_RUNTIME_DIR", "/opt/kernelhub/runtime"),
    )
    ok = doctor.enforceable(results)
    if args.json:
        print(json.dumps({"isolation": args.isolation, "enforceable": ok,
                          "checks": [c.__dict__ for c in results]}, indent=2))
    else:
        print(doctor.report(results))
        if ok:
            print("\nStrict isolation can be enforced on this machine.")
        else:
            print(f"\nStrict isolation can NOT be enforced here{'' if args.isolation == 'strict' else ''}; "
                  "kernelhub refuses to start unless KERNELHUB_ISOLATION=relaxed.")
    return 0 if ok or args.isolation == "relaxed" else 1


def install_kernelspecs(prefix: str | None = None, user: bool = False) -> list[str]:
    """Install our kernelspecs with jupyter_client's KernelSpecManager; returns the installed paths."""
    from jupyter_client.kernelspec import KernelSpecManager

    from .sandbox.provisioner import KERNELSPECS_DIR

    ksm = KernelSpecManager()
    installed = []
    for spec_dir in sorted(KERNELSPECS_DIR.iterdir()):
        if (spec_dir / "kernel.json").exists():
            # install_kernel_spec replaces an existing spec of that name (its ``replace`` is deprecated).
            installed.append(ksm.install_kernel_spec(str(spec_dir), spec_dir.name, user=user, prefix=prefix))
    return installed


def _kernelspecs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kernelhub kernelspecs",
                                     description="Install kernelhub's sandboxed kernelspecs for Jupyter.")
    sub = parser.add_subparsers(dest="action", required=True)
    inst = sub.add_parser("install", help="install kernelhub-python, -javascript, -typescript and -bash")
    inst.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels (default: sys.prefix)")
    inst.add_argument("--user", action="store_true", help="install for the current user")
    sub.add_parser("list", help="list the kernelspecs kernelhub ships")
    args = parser.parse_args(argv)
    if args.action == "list":
        from .sandbox.provisioner import KERNELSPECS_DIR

        for spec_dir in sorted(KERNELSPECS_DIR.iterdir()):
            print(spec_dir.name)
        return 0
    prefix = args.prefix if args.prefix or args.user else sys.prefix
    for path in install_kernelspecs(prefix=prefix, user=args.user):
        print(f"installed {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": "start the gateway (REST, websockets, Jupyter API, MCP over HTTP)",
        "mcp": "serve the MCP tools over stdio",
        "doctor": "report what isolation this machine can enforce",
        "kernelspecs": "install the sandboxed kernelspecs for Jupyter",
    }
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: kernelhub {serve,mcp,doctor,kernelspecs} [options]\n")
        for name, text in commands.items():
            print(f"  {name:<12} {text}")
        print("\nRun `kernelhub COMMAND --help` for a command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "doctor":
        return _doctor(rest)
    if command == "kernelspecs":
        return _kernelspecs(rest)
    if command == "serve":
        from .app import main as serve_main

        return serve_main(rest)
    if command == "mcp":
        from .mcp.server import main as mcp_main

        return mcp_main(rest)
    print(f"kernelhub: unknown command {command!r}; try `kernelhub --help`.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

