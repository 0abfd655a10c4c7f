"""JupyterLab in a real browser: ``jupyter lab`` in gateway mode in front of the session's gateway, driven in
headless Debian Chromium (``/usr/bin/chromium``, installed by ``scripts/install.sh``) through Playwright.

Playwright is the PyPI package: its driver ships inside the wheel, so pip installs it with the other test extras,
and it drives the system browser through ``executable_path`` (it never downloads one of its own: that download
fails on these machines). Everything is per module: one JupyterLab server with config, data, settings and
workspace dirs of its own, one browser; each test opens a page on a workspace of its own, so no test sees the
tabs another left open.

Screenshots and the websocket frames of failed runs go to ``artifacts/browser/`` at the repository root
(``KERNELHUB_ARTIFACTS`` moves it); its path is printed at the end of the run.
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
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, WebSocket, expect, sync_playwright

from kernelhub.handlers.jupyter import deserialize_binary_message
from kernelhub.testing import Gateway, free_port

CHROMIUM = os.environ.get("KERNELHUB_CHROMIUM", "/usr/bin/chromium")
#: As root Chromium needs --no-sandbox; the rest keep it from reaching for the network (updates, sync, QUIC,
#: first-run pages), which this machine refuses. Playwright adds --headless and a fresh --user-data-dir itself.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("KERNELHUB_ARTIFACTS", Path(__file__).resolve().parents[2] / "artifacts")) / "browser"
#: JupyterLab's own calls out of the machine, all off: the news feed, the update check, the extension manager's
#: PyPI search, and the "get notified about news?" toast (a plugin, disabled through page_config.json).
LAB_OFFLINE_ARGS = ["--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--LabApp.extension_manager=readonly"]
#: How long a page may take to show what was asked of it (load JupyterLab, open a notebook, a menu) on a 2-core
#: machine shared with the rest of the suite; waits on kernels have bounds of their own in the tests.
UI_TIMEOUT_MS = 30_000
LAB_PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}


class JupyterLab:
    """``python -m jupyterlab --gateway-url=GATEWAY --GatewayClient.auth_token=TOKEN`` on a free loopback port,
    with a token of its own, an empty temp root dir and Jupyter dirs of its own (nothing from the user's)."""

    def __init__(self, gw: Gateway) -> None:
        self.home = tempfile.mkdtemp(prefix="kh-jupyterlab-")
        self.root = Path(self.home) / "root"
        self.root.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = "jupyterlab-token-" + uuid.uuid4().hex
        config = Path(self.home) / "config"
        (config / "labconfig").mkdir(parents=True)
        (config / "labconfig" / "page_config.json").write_text(json.dumps(LAB_PAGE_CONFIG))
        env = {**os.environ,
               "JUPYTER_CONFIG_DIR": str(config),
               "JUPYTER_DATA_DIR": os.path.join(self.home, "data"),
               "JUPYTER_RUNTIME_DIR": os.path.join(self.home, "runtime"),
               "JUPYTERLAB_SETTINGS_DIR": os.path.join(self.home, "settings"),
               "JUPYTERLAB_WORKSPACES_DIR": os.path.join(self.home, "workspaces"),
               "JUPYTER_PLATFORM_DIRS": "1"}
        env.pop("JUPYTER_PATH", None)
        argv = [sys.executable, "-m", "jupyterlab", f"--gateway-url={gw.url}", f"--GatewayClient.auth_token={gw.token}",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.port={self.port}",
                "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", "--no-browser",
                f"--ServerApp.root_dir={self.root}", *LAB_OFFLINE_ARGS]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        self.log_path = os.path.join(self.home, "jupyterlab.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"jupyter lab did not start: {log}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return self.request("GET", "/api/status")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-5000:]

    #: The gateway's tiny JSON client serves here too: it needs only ``url`` and ``token``, and Jupyter Server
    #: takes the token as ``Authorization: Bearer``. Answers (status, parsed JSON or bytes).
    request = Gateway.request

    def workspace_url(self, path: str = "") -> str:
        """A workspace no other page has used (so it opens with no tabs), optionally opening ``path``."""
        tree = f"/tree/{path}" if path else ""
        return f"{self.url}/lab/workspaces/{uuid.uuid4().hex}{tree}?reset&token={self.token}"

    def shutdown_sessions(self) -> None:
        """Ends every notebook session, and with it its kernel and sandbox on the gateway."""
        status, sessions = self.request("GET", "/api/sessions")
        assert status == 200, sessions
        for session in sessions:
            self.request("DELETE", f"/api/sessions/{session['id']}")

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


#: Page-side clocks (performance.now(), ms), set once each: when the status bar first reads "<kernel> | Idle", and
#: when the page first sends an execute_request. Their difference is how fast the test reacted to Idle.
REACTION_CLOCK = """
(() => {
  const send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    if (window.__khExecuteAt === undefined && typeof data === 'string'
        && data.includes('"msg_type":"execute_request"')) {
      window.__khExecuteAt = performance.now();
    }
    return send.call(this, data);
  };
  new MutationObserver(() => {
    if (window.__khIdleAt !== undefined) return;
    for (const item of document.querySelectorAll('.jp-StatusBar-TextItem')) {
      if (item.textContent.endsWith('| Idle')) { window.__khIdleAt = performance.now(); return; }
    }
  }).observe(document, {subtree: true, childList: true, characterData: true});
})();
"""


class Frames:
    """Every frame of a page's kernel websockets (``/api/kernels/{id}/channels``), with its time in seconds since
    the recorder started: the evidence a failure report needs (what was sent, and what came back for it)."""

    def __init__(self, page: Page) -> None:
        self.t0 = time.monotonic()
        self.frames: list[dict[str, Any]] = []
        self.page = page
        page.on("websocket", self._on_websocket)
        page.add_init_script(REACTION_CLOCK)

    def reaction_ms(self) -> float | None:
        """Milliseconds, on the page's clock, from the status bar first showing Idle to the first
        execute_request leaving the page; None if either did not happen."""
        idle, execute = self.page.evaluate("[window.__khIdleAt, window.__khExecuteAt]")
        return round(execute - idle) if idle is not None and execute is not None else None

    def _on_websocket(self, ws: WebSocket) -> None:
        if "/channels" not in ws.url:
            return
        url = ws.url.split("?")[0]
        self._add("open", {"url": url})
        ws.on("framesent", lambda payload: self._add("sent", self._parse(payload)))
        ws.on("framereceived", lambda payload: self._add("recv", self._parse(payload)))
        ws.on("close", lambda _: self._add("close", {"url": url}))
        # JupyterLab first offers v1.kernel.websocket.jupyter.org; Jupyter Server in gateway mode picks no
        # subprotocol, Chromium fails that handshake, and JupyterLab reconnects with the same session id.
        ws.on("socketerror", lambda error: self._add("error", {"url": url, "error": error}))

    def _add(self, event: str, data: dict[str, Any]) -> None:
        self.frames.append({"t": round(time.monotonic() - self.t0, 3), "event": event, **data})

    @staticmethod
    def _parse(payload: str | bytes) -> dict[str, Any]:
        """The fields that tell one message from another: channel, type, ids, execution state, code."""
        try:
            msg = deserialize_binary_message(payload) if isinstance(payload, bytes) else json.loads(payload)
        except Exception:
            return {"unparsed": repr(payload[:200])}
        content = msg.get("content") or {}
        summary = {"channel": msg.get("channel"), "msg_type": msg["header"].get("msg_type"),
                   "msg_id": msg["header"].get("msg_id"), "parent": (msg.get("parent_header") or {}).get("msg_id")}
        for key in ("execution_state", "code", "status", "execution_count", "name", "text"):
            if key in content:
                summary[key] = content[key]
        return summary

    def kernel_ids(self) -> list[str]:
        """The kernels the page opened websockets to, in order."""
        ids = [f["url"].rstrip("/").split("/")[-2] for f in self.frames if f["event"] == "open"]
        return list(dict.fromkeys(ids))

    def sent(self, msg_type: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["event"] == "sent" and f.get("msg_type") == msg_type]

    def requests(self) -> list[dict[str, Any]]:
        """Every request the page sent (kernel_info, history, execute, ...), in order."""
        return [f for f in self.frames if f["event"] == "sent" and str(f.get("msg_type")).endswith("_request")]

    def answers(self, msg_id: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["event"] == "recv" and f.get("parent") == msg_id]

    def timeline(self, limit: int = 60) -> str:
        """One line per frame: time, direction, channel, type, short ids, state."""
        lines = []
        for f in self.frames[-limit:]:
            if f["event"] in ("open", "close", "error"):
                lines.append(f"  {f['t']:8.3f} {f['event']} {f['url']} {f.get('error', '')}".rstrip())
                continue
            short = (f.get("msg_id") or "")[:8]
            parent = (f.get("parent") or "")[:8]
            extra = f.get("execution_state") or f.get("status") or ""
            lines.append(f"  {f['t']:8.3f} {f['event']} {f.get('channel')}/{f.get('msg_type')} {short}"
                         f"{' <- ' + parent if parent else ''} {extra}".rstrip())
        return "\n".join(lines)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.frames, indent=1))
        return path


@pytest.fixture(scope="module")
def lab(gateway: Gateway) -> Iterator[JupyterLab]:
    server = JupyterLab(gateway)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    """One headless Chromium and one context for the module: its pages share the HTTP cache, so JupyterLab's
    bundles load once."""
    driver: Playwright = sync_playwright().start()
    try:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 800})
            context.set_default_timeout(UI_TIMEOUT_MS)
            expect.set_options(timeout=UI_TIMEOUT_MS)
            yield context
        finally:
            chromium.close()
    finally:
        driver.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots and frame logs go (kept by CI; printed at the end of the run)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _on_loopback(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme in ("data", "blob", "about") or parts.hostname in ("127.0.0.1", "localhost", "::1")


@pytest.fixture
def page(browser: BrowserContext, lab: JupyterLab) -> Iterator[Page]:
    """A new page; after the test, it is closed, every notebook session it started is ended (their kernels and
    sandboxes with them), and the test fails if the page asked for anything beyond loopback."""
    new = browser.new_page()
    outside: list[str] = []
    new.on("request", lambda request: outside.append(request.url) if not _on_loopback(request.url) else None)
    try:
        yield new
    finally:
        new.close()
        lab.shutdown_sessions()
    assert not outside, f"the page reached beyond loopback: {outside}"


@pytest.fixture
def frames(page: Page) -> Frames:
    """The page's kernel websocket frames, recorded from before it loads anything."""
    return Frames(page)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if ARTIFACTS.is_dir() and any(ARTIFACTS.iterdir()):
        terminalreporter.write_line(f"browser screenshots and websocket frames: {ARTIFACTS}")
