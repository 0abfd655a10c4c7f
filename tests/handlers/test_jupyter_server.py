"""A real Jupyter Server in gateway mode in front of kernelhub: what ``jupyter lab --gateway-url=URL
--GatewayClient.auth_token=KEY`` relies on. JupyterLab only ever talks to its Jupyter Server; the server proxies
kernelspecs, kernels and kernel websockets to us. Everything below goes through Jupyter Server's own REST API
and websocket, as JupyterLab's frontend would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from kernelhub.testing import Gateway, free_port

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups, pytest.mark.slow]

V1 = "v1.kernel.websocket.jupyter.org"


class JupyterServer:
    """``python -m jupyter_server`` in gateway mode, with config and data dirs of its own."""

    def __init__(self, gw: Gateway) -> None:
        self.home = tempfile.mkdtemp(prefix="kh-jupyter-server-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "jupyter-server-token-" + uuid.uuid4().hex
        root = os.path.join(self.home, "root")
        os.mkdir(root)
        env = {**os.environ,
               "JUPYTER_CONFIG_DIR": os.path.join(self.home, "config"),
               "JUPYTER_DATA_DIR": os.path.join(self.home, "data"),
               "JUPYTER_RUNTIME_DIR": os.path.join(self.home, "runtime"),
               "JUPYTER_PLATFORM_DIRS": "1"}
        env.pop("JUPYTER_PATH", None)
        argv = [sys.executable, "-m", "jupyter_server", f"--IdentityProvider.token={self.token}",
                f"--GatewayClient.url={gw.url}", f"--GatewayClient.auth_token={gw.token}",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1",
                "--no-browser", f"--ServerApp.root_dir={root}"]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.log_path = os.path.join(self.home, "server.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                log = self.log()
                self.stop()
                raise RuntimeError(f"jupyter_server exited: {log}")
            try:
                if self.request("GET", "/api/status")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"jupyter_server did not start: {log}")
            time.sleep(0.2)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            with err:
                status, payload, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
        return status, json.loads(payload) if "json" in ctype and payload else payload

    def channels(self, kernel_id: str) -> ClientConnection:
        """The kernel's websocket as JupyterLab opens it: token in the query, v1 offered."""
        url = (self.url.replace("http://", "ws://", 1) + f"/api/kernels/{kernel_id}/channels"
               + f"?session_id={uuid.uuid4().hex}&token={self.token}")
        return connect(url, open_timeout=60, subprotocols=[Subprotocol(V1)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def server(gateway: Gateway) -> Iterator[JupyterServer]:
    js = JupyterServer(gateway)
    try:
        yield js
    finally:
        js.stop()


def execute(ws: ClientConnection, code: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
    """Run code over the legacy framing (Jupyter Server in gateway mode always picks it); stdout and reply."""
    msg = Session().msg("execute_request", content={"code": code, "silent": False, "store_history": True,
                                                     "user_expressions": {}, "allow_stdin": False,
                                                     "stop_on_error": True})
    ws.send(json.dumps({**msg, "channel": "shell"}, default=json_default))
    out, reply, idle = "", None, False
    deadline = time.monotonic() + timeout
    while reply is None or not idle:
        data = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        m = json.loads(data)
        if m["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout":
            out += m["content"]["text"]
        elif m["channel"] == "shell" and m["msg_type"] == "execute_reply":
            reply = m
        elif m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    return out, reply


def test_kernelspecs_through_jupyter_server(server: JupyterServer) -> None:
    status, body = server.request("GET", "/api/kernelspecs")
    assert status == 200, body
    assert "kernelhub-python" in body["kernelspecs"]
    python = body["kernelspecs"]["kernelhub-python"]
    assert python["spec"]["language"] == "python"
    # The server rewrites resource URLs to its own /kernelspecs/..., which it proxies to us with our token.
    logo = python["resources"]["logo-64x64"]
    assert logo.endswith("/kernelspecs/kernelhub-python/logo-64x64.png")
    status, png = server.request("GET", logo)
    assert status == 200 and png.startswith(b"\x89PNG")
    # The server adopts our default kernelspec once it has fetched ours.
    status, body = server.request("GET", "/api/kernelspecs")
    assert body["default"] == "kernelhub-python"
    status, one = server.request("GET", "/api/kernelspecs/kernelhub-python")
    assert status == 200 and one["name"] == "kernelhub-python"


def test_kernel_through_jupyter_server(server: JupyterServer, gateway: Gateway) -> None:
    status, model = server.request("POST", "/api/kernels", {"name": "kernelhub-python"})
    assert status == 201, (model, server.log())
    kernel_id = model["id"]
    try:
        # It is our kernel, in a sandbox of its own, owned by the tenant of the server's auth token.
        status, ours = gateway.request("GET", f"/api/kernels/{kernel_id}")
        assert status == 200 and ours["name"] == "kernelhub-python"
        status, listed = server.request("GET", "/api/kernels")
        assert kernel_id in [k["id"] for k in listed]

        with server.channels(kernel_id) as ws:
            assert ws.subprotocol is None  # gateway mode keeps the legacy framing end to end
            out, reply = execute(ws, "print(6*7)")
            assert out == "42\n"
            assert reply["content"]["status"] == "ok"
            status, ours = gateway.request("GET", f"/api/kernels/{kernel_id}")
            assert ours["connections"] == 1

            status, _ = server.request("POST", f"/api/kernels/{kernel_id}/interrupt")
            assert status == 204
            status, restarted = server.request("POST", f"/api/kernels/{kernel_id}/restart")
            assert status == 200 and restarted["id"] == kernel_id
        with server.channels(kernel_id) as ws:
            out, _ = execute(ws, "import os; print(os.getcwd())")
            assert out == "/workspace\n"
    finally:
        status, _ = server.request("DELETE", f"/api/kernels/{kernel_id}")
    assert status == 204
    status, _ = gateway.request("GET", f"/api/kernels/{kernel_id}")
    assert status == 404


def test_first_cells_are_answered_through_jupyter_server(server: JupyterServer) -> None:
    """JupyterLab on a kernelhub kernel: the frontend sends kernel_info_request and its first cell the moment
    its socket to the server is open, while the server is still connecting to us; then again right after a
    restart. Every request is answered (the first cell used to stay ``[ ]`` now and then)."""
    status, model = server.request("POST", "/api/kernels", {"name": "kernelhub-python"})
    assert status == 201, (model, server.log())
    kernel_id = model["id"]
    try:
        for i in range(6):
            with server.channels(kernel_id) as ws:
                send_at_once(ws, [Session().msg("kernel_info_request", {})])
                out, reply = execute(ws, f"print({i})")
                assert out == f"{i}\n" and reply["content"]["status"] == "ok"
            if i % 2:
                status, _ = server.request("POST", f"/api/kernels/{kernel_id}/restart")
                assert status == 200
    finally:
        server.request("DELETE", f"/api/kernels/{kernel_id}")


def send_at_once(ws: ClientConnection, msgs: list[dict[str, Any]]) -> None:
    for msg in msgs:
        ws.send(json.dumps({**msg, "channel": "shell"}, default=json_default))


def test_notebook_session_through_jupyter_server(server: JupyterServer, gateway: Gateway) -> None:
    """JupyterLab opens a notebook with POST /api/sessions; the server starts the kernel on the gateway."""
    status, session = server.request("POST", "/api/sessions", {
        "path": "demo.ipynb", "name": "demo.ipynb", "type": "notebook", "kernel": {"name": "kernelhub-python"}})
    assert status == 201, (session, server.log())
    kernel_id = session["kernel"]["id"]
    assert session["kernel"]["name"] == "kernelhub-python"
    assert gateway.request("GET", f"/api/kernels/{kernel_id}")[0] == 200
    with server.channels(kernel_id) as ws:
        out, _ = execute(ws, "import pandas as pd\nprint(pd.DataFrame({'a': [1, 2, 3]})['a'].sum())")
        assert out == "6\n"
    status, _ = server.request("DELETE", f"/api/sessions/{session['id']}")
    assert status == 204
    assert gateway.request("GET", f"/api/kernels/{kernel_id}")[0] == 404
