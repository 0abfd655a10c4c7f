"""The client installs on its own: ``pip install kernelhub`` (no ``server`` extra) into a fresh virtualenv brings
httpx2 and websockets but no tornado, zmq, Jupyter or kernels, and drives a live gateway from there. The wheel
it installs builds without a warning (setuptools' own included), as ``make install`` must."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
#: Distributions of the server that the client alone must not bring.
SERVER_DISTRIBUTIONS = {"tornado", "pyzmq", "jupyter-client", "jupyter-core", "ipykernel", "traitlets", "terminado",
                        "mcp", "nbformat", "cgroupspy", "prometheus-client"}

SCRIPT = textwrap.dedent("""
    import json, sys
    from kernelhub.client import NotFoundError, Sandbox

    with Sandbox.create("python") as sandbox:
        sandbox.files.write("data.csv", "a,b\\n1,2\\n3,4\\n")
        execution = sandbox.run_code("open('data.csv').read().count('\\\\n')")
        lines = sandbox.commands.run("wc -l < data.csv").stdout.strip()
        sandbox_id = sandbox.id
    try:
        Sandbox.connect(sandbox_id)
    except NotFoundError as exc:
        gone = exc.status
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tornado", "zmq", "jupyter_client", "traitlets"))
    print(json.dumps({"status": execution.status, "text": execution.text, "lines": lines, "gone": gone,
                      "leaked": leaked}))
""")


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          **kwargs)  # type: ignore[call-overload]


def test_the_client_installs_alone_and_drives_a_gateway(gateway: Gateway, tmp_path: Path) -> None:
    # The wheel, built as pip builds it for any install from this tree (an isolated build with the
    # build-system's setuptools); -v shows the backend's output, where setuptools writes its warnings.
    built = run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path / "wheels"), str(REPO)])
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    backend = built.stdout + built.stderr
    for warning in ("SetuptoolsDeprecationWarning", "SetuptoolsWarning", "License classifiers", "!!"):
        assert warning not in backend, backend[backend.find(warning) - 2000:][:4000]
    (wheel,) = (tmp_path / "wheels").glob("kernelhub-*.whl")

    env = tmp_path / "client-env"
    assert run([sys.executable, "-m", "venv", str(env)]).returncode == 0
    python = env / "bin" / "python"
    installed = run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr
    listed = run([str(python), "-m", "pip", "list", "--format", "json"])
    names = {d["name"].lower().replace("_", "-") for d in json.loads(listed.stdout)}
    assert {"kernelhub", "httpx2", "websockets"} <= names
    assert not names & SERVER_DISTRIBUTIONS, names & SERVER_DISTRIBUTIONS

    used = run([str(python), "-c", SCRIPT], cwd=tmp_path,
               env={"KERNELHUB_URL": gateway.url, "KERNELHUB_TOKEN": gateway.token, "PATH": "/usr/bin:/bin"})
    assert used.returncode == 0, used.stderr
    answer = json.loads(used.stdout)
    assert answer == {"status": "ok", "text": "3", "lines": "3", "gone": 404, "leaked": []}, answer

    # The command line says what it needs rather than failing with a traceback.
    command = run([str(env / "bin" / "kernelhub"), "serve"])
    assert command.returncode == 1 and "Traceback" not in command.stderr, command.stderr
    assert "pip install 'kernelhub[server]'" in command.stderr and "client only" in command.stderr
