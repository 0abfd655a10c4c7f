"""The demo notebooks in ``notebooks/`` run headless with nbclient.

``demo.ipynb`` runs *in* a sandbox, both ways a Jupyter user would run it:

- through the gateway: nbclient with Jupyter Server's ``GatewayKernelManager`` (REST to start, interrupt and stop
  the kernel; its ``GatewayKernelClient`` speaks the legacy websocket framing);
- with the installed kernelspecs: ``kernelhub kernelspecs install``, then nbclient starts ``kernelhub-python``
  with plain jupyter_client, whose provisioner puts the kernel in a sandbox of its own.

The four other demos (an agent's MCP loop, data analysis with the client, four languages in one sandbox,
grading under tight limits) run in a plain Python kernel of this environment and drive a live gateway through
``KERNELHUB_URL`` and ``KERNELHUB_TOKEN``, as a reader would. Each is re-executed into a copy; its cells must all
run, show their key outputs, and leave no sandbox behind; the copy saved in the repository must carry the same
key outputs (it is read on a code host without being run).
"""

from __future__ import annotations

import base64
import json
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

from kernelhub.testing import Gateway

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
def gateway_client(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
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


def test_demo_notebook_through_the_gateway(gateway: Gateway, gateway_client: Any) -> None:
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


# -- the demos that drive a gateway from a plain kernel ---------------------------------------------------

def outputs_text(nb: Any) -> str:
    """Everything the notebook's code cells printed or showed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(str(out.data.get("text/plain", "")))
    return "".join(parts)


def shown(nb: Any, mime: str) -> list[str]:
    return [out.data[mime] for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type in ("execute_result", "display_data") and mime in out.data]


def pngs(nb: Any) -> list[bytes]:
    images = [base64.b64decode(p) for p in shown(nb, "image/png")]
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)
    return images


def check_agent_mcp(nb: Any) -> None:
    text = outputs_text(nb)
    assert "code_execute         Run code" in text and "sandbox_delete       Delete a sandbox" in text
    assert "isError: True" in text and "error: NameError: name 'reading' is not defined" in text
    assert "the model reads: NameError - name 'reading' is not defined" in text
    assert "'average 14.08 over 5 readings'" in text and "busiest hour: 5" in text
    assert "in the structured result: (an image, attached to this result as image content 1;" in text
    assert "- traffic.png (file," in text and "exit code 0" in text and "Deleted sandbox sb" in text
    assert len(pngs(nb)) == 2  # the chart as the run showed it, and the same file downloaded


def check_data_analysis(nb: Any) -> None:
    text = outputs_text(nb)
    assert "day,region,product,units,price" in text and "{'path': 'sales.csv', 'size': " in text
    assert "1080 rows, " in text and "region,revenue\neast," in text
    assert "streamed as it was printed" in text and "north: best day " in text and " deleted" in text
    tables = shown(nb, "text/html")
    assert len(tables) == 2 and all("<table" in t for t in tables) and "gizmo" in tables[1]
    assert len(pngs(nb)) == 2


def check_languages(nb: Any) -> None:
    text = outputs_text(nb)
    for language in ("python", "javascript", "typescript", "bash"):
        assert f"[{language}: ok]" in text, language
    assert "javascript wrote squares.json: 9 1 16 1 25 81 4 36" in text
    assert "typescript wrote total.txt: 173" in text and "total of squares: 173, as user user" in text
    assert "python checks: 173 == 173" in text
    assert all(f" jupyter {lang} running" in text for lang in ("python", "node", "typescript", "bash"))
    assert "62 total" in text and ":/workspace$" in text and " deleted" in text


def check_grading(nb: Any) -> None:
    rows = {line.split()[0]: line.split()[1:4] for line in outputs_text(nb).splitlines()
            if line.split() and line.split()[0] in ("ada", "ben", "cleo", "dev", "eli")}
    assert rows == {"ada": ["pass", "ok", "-"], "ben": ["fail", "error", "-"], "cleo": ["fail", "timeout", "timeout"],
                    "dev": ["fail", "killed", "oom"], "eli": ["fail", "error", "pids"]}, rows
    assert "every limit ended in its reason" in outputs_text(nb)


DEMOS = {"agent_mcp": check_agent_mcp, "data_analysis": check_data_analysis, "languages": check_languages,
         "grading": check_grading}


@pytest.fixture
def plain_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A ``python3`` kernelspec of this environment's Python (which has the client and the mcp SDK), first on
    JUPYTER_PATH: the kernel a reader's Jupyter would start, not a sandboxed one."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def running_sandboxes(gw: Gateway) -> set[str]:
    status, body = gw.request("GET", "/v1/sandboxes")
    assert status == 200, body
    return {sb["id"] for sb in body["sandboxes"] if sb["state"] in ("starting", "running")}


@pytest.mark.parametrize("name", DEMOS)
def test_demo_drives_a_live_gateway(name: str, gateway: Gateway, plain_kernel: str,
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert saved.metadata.kernelspec.name == "python3"
    DEMOS[name](saved)  # the copy in the repository shows its outputs
    monkeypatch.setenv("KERNELHUB_URL", gateway.url)
    monkeypatch.setenv("KERNELHUB_TOKEN", gateway.token)
    before = running_sandboxes(gateway)
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, kernel_name=plain_kernel, timeout=120, startup_timeout=60,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    DEMOS[name](nb)
    assert running_sandboxes(gateway) <= before, "the notebook left a sandbox running"
