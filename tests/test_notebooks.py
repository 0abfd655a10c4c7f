"""The demo notebooks in ``notebooks/`` run headless with nbclient, both ways a Jupyter user would run them:

- through the gateway: nbclient with Jupyter Server's ``GatewayKernelManager`` (REST to start, interrupt and stop
  the kernel; its ``GatewayKernelClient`` speaks the legacy websocket framing);
- with the installed kernelspecs: ``kernelhub kernelspecs install``, then nbclient starts ``kernelhub-python``
  with plain jupyter_client, whose provisioner puts the kernel in a sandbox of its own.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from kernelhub.testing import Gateway, gateway  # noqa: F401

pytestmark = [
    pytest.mark.root,
    pytest.mark.bwrap,
    pytest.mark.cgroups,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_server.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:jupyter_events.*"),
]

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def check_demo_outputs(nb: Any) -> None:
    """What notebooks/demo.ipynb must show: no errors, the computed values, a DataFrame and a plot."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "working directory: /workspace" in text
    assert "sum of squares 0..9 = 285" in text
    assert "{'square': 55, 'cube': 225}" in text
    results = [o for o in outputs if o.output_type == "execute_result"]
    assert any(o.data.get("text/plain") == "570" for o in results)
    assert any("text/html" in o.data and "<table" in o.data["text/html"] for o in results), "no DataFrame table"
    pngs = [o.data["image/png"] for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert pngs, "the matplotlib cell showed no image/png"
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert all(c.execution_count for c in code)


def load_demo() -> Any:
    return nbformat.read(NOTEBOOKS / "demo.ipynb", as_version=4)


@pytest.fixture
def gateway_client(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:  # noqa: F811
    """Jupyter Server's GatewayClient pointed at our gateway, as ``--GatewayClient.url/auth_token`` would."""
    from jupyter_server.gateway import managers
    from jupyter_server.gateway.gateway_client import GatewayClient

    # GatewayKernelClient opens its websocket without the auth headers its REST calls carry (jupyter_server
    # 2.x); a gateway that requires a token (ours, and the Kernel Gateway with KG_AUTH_TOKEN) needs them.
    create_connection = managers.websocket.create_connection
    opened: list[Any] = []

    def with_auth(url: str, **kwargs: Any) -> Any:
        kwargs.setdefault("header", [f"Authorization: token {gateway.token}"])
        ws = create_connection(url, **kwargs)
        opened.append(ws)
        return ws

    monkeypatch.setattr(managers.websocket, "create_connection", with_auth)
    GatewayClient.clear_instance()
    client = GatewayClient.instance(url=gateway.url, auth_token=gateway.token, request_timeout=120.0)
    try:
        yield client
    finally:
        # When the server closes first (it does once the kernel is shut down), websocket-client's close()
        # returns early and leaves its socket open; close what it left.
        for ws in opened:
            ws.shutdown()
        GatewayClient.clear_instance()


def test_demo_notebook_through_the_gateway(gateway: Gateway, gateway_client: Any) -> None:  # noqa: F811
    from jupyter_server.gateway.managers import GatewayKernelManager

    nb = load_demo()
    before = {k["id"] for k in gateway.request("GET", "/api/kernels")[1]}
    client = NotebookClient(nb, kernel_manager_class=GatewayKernelManager, timeout=120, startup_timeout=60)
    # GatewayKernelManager.start_kernel takes the kernelspec from its kwargs (its default is python3).
    client.execute(kernel_name="kernelhub-python")
    check_demo_outputs(nb)
    # nbclient shut the kernel down through the gateway: its sandbox is gone.
    after = {k["id"] for k in gateway.request("GET", "/api/kernels")[1]}
    assert after <= before


@pytest.fixture
def installed_kernelspecs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    prefix = Path(tempfile.mkdtemp(prefix="kh-kernelspecs-"))
    state_dir = Path(tempfile.mkdtemp(prefix="kh-nb-state-", dir="/tmp"))
    os.chmod(state_dir, 0o711)  # sandbox uids must traverse it
    try:
        out = subprocess.run([sys.executable, "-m", "kernelhub.cli", "kernelspecs", "install", "--prefix",
                              str(prefix)], capture_output=True, text=True, check=True)
        assert "kernelhub-python" in out.stdout
        monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        monkeypatch.setenv("KERNELHUB_STATE_DIR", str(state_dir))
        yield prefix
    finally:
        subprocess.run(["rm", "-rf", str(prefix)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(state_dir)], check=False)


def test_demo_notebook_with_the_installed_kernelspec(installed_kernelspecs: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("kernelhub-python")
    assert spec.resource_dir.startswith(str(installed_kernelspecs))
    nb = load_demo()
    NotebookClient(nb, timeout=120, startup_timeout=60, kernel_name="kernelhub-python").execute()
    check_demo_outputs(nb)
