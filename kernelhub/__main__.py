"""``kernelhub`` (the console script) and ``python -m kernelhub``: the command line of :mod:`kernelhub.cli`.

Where only the client is installed (``pip install kernelhub``, without the ``server`` extra) the command line's
modules cannot be imported; this says so, and how to install the server, instead of a traceback.
"""

from __future__ import annotations

import sys

#: What ``kernelhub[server]`` brings that the client alone has not (top-level module names).
SERVER_MODULES = ("tornado", "traitlets", "jupyter_client", "jupyter_core", "zmq", "ipykernel", "terminado", "mcp",
                  "nbformat", "cgroupspy", "prometheus_client", "h11", "idna")


def main() -> int:
    """Run ``kernelhub``; exit 1 with a sentence when the server's packages are missing."""
    try:
        from .cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        print(f"kernelhub: this environment has the kernelhub client only (no module {exc.name!r}); the command "
              "line, the gateway and the MCP server need the server: pip install 'kernelhub[server]'.",
              file=sys.stderr)
        return 1
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
