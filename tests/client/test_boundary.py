"""``import kernelhub.client`` needs none of the server: a subprocess in which the server's dependencies and
layers cannot be imported still imports the client and uses its errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("tornado", "zmq", "jupyter_client", "jupyter_core", "traitlets", "ipykernel", "terminado",
           "kernelhub.services", "kernelhub.handlers", "kernelhub.sandbox", "kernelhub.mcp", "kernelhub.app",
           "kernelhub.cli")

SCRIPT = textwrap.dedent("""
    import sys

    BLOCKED = {blocked!r}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked: {{name}}")
            return None

    sys.meta_path.insert(0, Refuse())

    import kernelhub.client
    from kernelhub import errors
    from kernelhub.client import GatewayConnectionError, NotFoundError, PayloadTooLargeError, Sandbox
    from kernelhub.client.errors import error_from_response

    exc = error_from_response(413, b'{{"error": "payload_too_large", "message": "Too big."}}')
    assert type(exc) is PayloadTooLargeError is errors.PayloadTooLarge and exc.status == 413
    assert isinstance(error_from_response(404, b""), NotFoundError)
    try:
        Sandbox.list(url="http://127.0.0.1:{port}", token="x")
    except GatewayConnectionError as err:
        assert err.status == 0
    else:
        raise AssertionError("a closed port answered")
    leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    assert not leaked, leaked
    print("ok")
""")


def test_the_client_imports_without_the_server() -> None:
    from kernelhub.testing import free_port

    script = SCRIPT.format(blocked=BLOCKED, port=free_port())
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_blocker_blocks() -> None:
    """The hook above does refuse what it names (else the test could not fail)."""
    script = SCRIPT.split("import kernelhub.client")[0].format(blocked=BLOCKED, port=0) + "import tornado\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "blocked: tornado" in done.stderr
