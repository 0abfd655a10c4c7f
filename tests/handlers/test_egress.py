"""Egress end to end on a real gateway (issue 12): network policies on ``sandbox_create``, in templates and by
``PATCH``, enforced by the gateway's proxy that every sandbox with a policy reaches through its forwarder.

Loopback only. The module's gateway runs with ``--egress-allow-private 127.0.0.1/32`` (the test servers live
there) and with ``--EgressService.hosts``, the proxy's fixed name table, as the resolver the test controls:
``svc.test`` and the other test names are 127.0.0.1, ``loop.test`` is 127.0.0.2 (loopback, outside the listed
range) and ``metadata.test`` is 169.254.169.254. No name the tests use reaches the system resolver. The HTTP and
HTTPS servers (a CA and certificate made by the test) and a package index (a directory with a wheel the test
builds, served like ``python -m http.server``) run in threads of this process.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kernelhub.testing import OTHER_TOKEN, Gateway
from tests.handlers.conftest import NdjsonStream
from tests.handlers.test_rest import validate
from tests.services.conftest import TEST_NAMES, Servers
from tests.services.test_egress_sandbox import FLOOD, HOSTILE

pytestmark = [pytest.mark.timeout(300)]

CA = "/tmp/test-ca.pem"
MAX_CONNECTIONS = 8
HOSTS = {**{name: ["127.0.0.1"] for name in TEST_NAMES}, "loop.test": ["127.0.0.2"],
         "metadata.test": ["169.254.169.254"]}


def build_wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """A pure-Python wheel of one module ``name`` whose ``__init__`` is ``source`` (PEP 427 layout, RECORD
    with sha256 digests), in ``directory/simple/<name>/``: what pip finds under an index URL of
    ``.../simple``, as a directory listing serves it."""
    dist = name.replace("-", "_")
    files = {
        f"{dist}/__init__.py": source.encode(),
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: kernelhub-tests\nRoot-Is-Purelib: true\n"
                                             b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}-{version}.dist-info/RECORD,,")
    files[f"{dist}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    folder = directory / "simple" / name
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return wheel


def build_npm_package(directory: Path, name: str, version: str, source: str, url: str) -> None:
    """An npm package of one ``index.js`` in the layout of a registry's static files: its packument (the
    document npm asks for at ``/<name>``, saved as ``<name>/index.json``) and its tarball at ``/<name>/-/``,
    with the sha512 integrity and sha1 shasum npm checks. ``url`` is the registry's base URL."""
    manifest = {"name": name, "version": version, "main": "index.js"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in (("package/package.json", json.dumps(manifest).encode()),
                           ("package/index.js", source.encode())):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tarball = buffer.getvalue()
    folder = directory / name
    (folder / "-").mkdir(parents=True, exist_ok=True)
    (folder / "-" / f"{name}-{version}.tgz").write_bytes(tarball)
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    dist = {"tarball": f"{url}/{name}/-/{name}-{version}.tgz", "integrity": integrity,
            "shasum": hashlib.sha1(tarball).hexdigest()}
    packument = {"name": name, "dist-tags": {"latest": version}, "versions": {version: {**manifest, "dist": dist}}}
    (folder / "index.json").write_text(json.dumps(packument))


class Index:
    """A package index for pip (``http.server``'s directory listing over a folder of wheels) and an npm
    registry (static packuments and tarballs) on one port, in a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        build_wheel(directory, "kh-probe", "1.0", "ANSWER = 42\n")
        build_wheel(directory, "kh-later", "2.0", "WORD = 'later'\n")
        handler = functools.partial(_QuietFiles, directory=str(directory))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.port = int(self.server.server_address[1])
        self.npm = f"http://pypi.test:{self.port}/npm"
        build_npm_package(directory / "npm", "kh-npm-probe", "1.0.0", "exports.word = 'from npm';\n", self.npm)
        build_npm_package(directory / "npm", "kh-npm-later", "1.0.0", "exports.word = 'later';\n", self.npm)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    """Static files; a request for an npm packument (``/npm/<name>``) gets its ``index.json``."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_head(self) -> Any:
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) == 2 and parts[0] == "npm":
            self.path = f"/npm/{parts[1]}/index.json"
        return super().send_head()


class World:
    """The module's gateway, its test servers and index, and helpers to act inside sandboxes."""

    def __init__(self, gateway: Gateway, servers: Servers, index: Index) -> None:
        self.gw = gateway
        self.servers = servers
        self.index = index
        self.made: list[str] = []

    def create(self, template: str = "python", **fields: Any) -> dict[str, Any]:
        status, body = self.gw.request("POST", "/v1/sandboxes", {"template": template, **fields})
        assert status == 201, body
        self.made.append(body["id"])
        return body

    def sh(self, sid: str, command: str, **fields: Any) -> dict[str, Any]:
        status, result = self.gw.request("POST", f"/v1/sandboxes/{sid}/commands", {"command": command, **fields})
        assert status == 200, result
        return result  # type: ignore[no-any-return]

    def curl(self, sid: str, url: str, *options: str) -> tuple[int, str]:
        """``curl`` inside the sandbox (the CA given, the answer's status and body): (exit code, output)."""
        result = self.sh(sid, f"curl -sS --max-time 30 --cacert {CA} -w '\\n%{{http_code}}' {' '.join(options)} "
                              f"'{url}'")
        body, _, code = result["stdout"].rpartition("\n")
        return result["exit_code"], f"{(body + result['stderr']).strip()} [{code}]"

    def execute(self, sid: str, code: str, **fields: Any) -> dict[str, Any]:
        status, body = self.gw.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": code, **fields})
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def value(self, sid: str, code: str, **fields: Any) -> str:
        """The ``text/plain`` of the main result of ``code`` run in the sandbox's kernel."""
        ex = self.execute(sid, code, **fields)
        assert ex["status"] == "ok", ex.get("error")
        return next(r["data"]["text/plain"] for r in ex["results"] if r.get("is_main_result"))  # type: ignore[no-any-return]

    def logs(self, sid: str) -> list[str]:
        status, body = self.gw.request("GET", f"/v1/sandboxes/{sid}/logs?lines=500")
        assert status == 200, body
        return body["lines"]  # type: ignore[no-any-return]

    def patch(self, sid: str, network: Any, token: str | None = "default") -> tuple[int, Any]:
        return self.gw.request("PATCH", f"/v1/sandboxes/{sid}", {"network": network}, token=token)

    def http(self, host: str = "svc.test") -> str:
        return f"http://{host}:{self.servers.http_port}/hello"

    def https(self, host: str = "svc.test") -> str:
        return f"https://{host}:{self.servers.https_port}/hello"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="kh-egress-gw-"))
    servers = Servers(directory)
    index = Index(directory / "index")
    templates = {
        "pkgs": {"language": "python", "network": {"allow": [f"pypi.test:{index.port}"]},
                 "env": {"PIP_INDEX_URL": f"http://pypi.test:{index.port}/simple", "PIP_TRUSTED_HOST": "pypi.test",
                         "npm_config_registry": index.npm},
                 "packages": {"pip": ["kh-probe"], "npm": ["kh-npm-probe"]}},
    }
    gateway = Gateway(extra_args=[
        "--egress-allow-private", "127.0.0.1/32", f"--EgressService.hosts={json.dumps(HOSTS)}",
        f"--EgressService.max_connections={MAX_CONNECTIONS}", f"--Hub.extra_templates={json.dumps(templates)}",
        '--Pool.sizes={"bash": 1}'])
    world = World(gateway, servers, index)
    try:
        yield world
    finally:
        for sid in world.made:
            gateway.request("DELETE", f"/v1/sandboxes/{sid}")
        gateway.stop()
        servers.close()
        index.close()
        shutil.rmtree(directory, ignore_errors=True)


def upload_ca(world: World, sid: str) -> None:
    status, _ = world.gw.request("PUT", f"/v1/sandboxes/{sid}/files/ca.pem", raw=world.servers.ca.read_bytes())
    assert status in (200, 201)
    assert world.sh(sid, f"cp /workspace/ca.pem {CA}")["exit_code"] == 0


@pytest.fixture(scope="module")
def listed(world: World) -> str:
    """A python sandbox allowed svc.test (any port), *.svc.test on the HTTPS port only, bad.svc.test denied."""
    sb = world.create(network={"allow": ["svc.test", f"*.svc.test:{world.servers.https_port}"],
                               "deny": ["bad.svc.test"]})
    upload_ca(world, sb["id"])
    return str(sb["id"])


def test_the_policy_is_parsed_once_and_shown(world: World) -> None:
    sb = world.create(network={"allow": ["SVC.test.", "svc.test", "10.1.2.3/8:443"], "deny": []})
    assert sb["network"] == {"allow": ["svc.test", "10.0.0.0/8:443"], "deny": []}
    validate(sb, "Sandbox")
    status, info = world.gw.request("GET", f"/v1/sandboxes/{sb['id']}")
    assert status == 200 and info["network"] == sb["network"]
    status, info = world.gw.request("POST", "/v1/sandboxes", {"network": {"allow": ["*"]}})
    assert status == 400 and info["error"] == "invalid_request"
    assert info["message"] == 'network.allow[0] is not a valid entry: "*" is not an entry; use the policy "open" ' \
                              "for any public address."
    for bad, said in ((42, 'network must be "none", "open" or an object'), ("closed", "network must be"),
                      ({"allow": "svc.test"}, "network.allow must be a list of strings."),
                      ({"permit": []}, "network has unknown keys permit")):
        status, info = world.gw.request("POST", "/v1/sandboxes", {"network": bad})
        assert status == 400 and info["message"].startswith(said), (bad, info)
    status, templates = world.gw.request("GET", "/v1/templates")
    by_name = {t["name"]: t for t in templates["templates"]}
    assert by_name["python"]["network"] == "none"
    assert by_name["pkgs"]["network"] == {"allow": [f"pypi.test:{world.index.port}"], "deny": []}
    assert by_name["pkgs"]["packages"] == {"pip": ["kh-probe"], "npm": ["kh-npm-probe"]}
    validate(by_name["pkgs"], "Template")


def test_none_has_no_socket_and_no_variables(world: World) -> None:
    sb = world.create()
    assert sb["network"] == "none"
    result = world.sh(sb["id"], "env | grep -ci proxy; ls /run/kernelhub/egress.sock")
    assert result["stdout"] == "0\n" and "No such file" in result["stderr"]
    out = world.value(sb["id"], "import os\nsorted(k for k in os.environ if 'proxy' in k.lower())")
    assert out == "[]"
    status, metrics = world.gw.request("GET", f"/v1/sandboxes/{sb['id']}/metrics")
    assert status == 200 and (metrics["net_rx_bytes"], metrics["net_tx_bytes"]) == (0, 0)


def test_allowed_and_denied_by_domain_port_and_deny_over_allow(world: World, listed: str) -> None:
    s = world.servers
    assert world.curl(listed, world.http()) == (0, f"hello from http as svc.test:{s.http_port} [200]")
    assert world.curl(listed, world.https()) == (0, f"hello from https as svc.test:{s.https_port} [200]")
    assert world.curl(listed, world.https("api.svc.test")) == \
        (0, f"hello from https as api.svc.test:{s.https_port} [200]")
    # By domain, by port (the wildcard entry names the HTTPS port only), deny over allow.
    assert world.curl(listed, world.http("other.test")) == (0, f"egress denied: other.test:{s.http_port} matches "
                                                               "no allow entry of the sandbox's network policy. [403]")
    assert world.curl(listed, world.http("api.svc.test")) == \
        (0, f"egress denied: api.svc.test:{s.http_port} matches no allow entry of the sandbox's network policy. [403]")
    code, out = world.curl(listed, world.https("bad.svc.test"))
    assert code != 0 and "403" in out
    assert world.curl(listed, world.http("bad.svc.test")) == \
        (0, f'egress denied: bad.svc.test:{s.http_port} matches the deny entry "bad.svc.test". [403]')
    lines = world.logs(listed)
    assert any(f"egress denied: CONNECT bad.svc.test:{s.https_port}: " in line for line in lines), lines[-20:]
    assert any(f"egress denied: GET http://other.test:{s.http_port}/hello: " in line for line in lines)
    status, metrics = world.gw.request("GET", f"/v1/sandboxes/{listed}/metrics")
    assert status == 200 and metrics["net_rx_bytes"] > 0 and metrics["net_tx_bytes"] > 0
    validate(metrics, "Metrics")
    # The gateway's own metrics: every sandbox's egress together.
    status, text = world.gw.request("GET", "/metrics")
    samples = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if line.startswith("kernelhub_egress"))
    assert float(samples['kernelhub_egress_bytes_total{direction="in"}']) >= metrics["net_rx_bytes"]
    assert float(samples['kernelhub_egress_bytes_total{direction="out"}']) >= metrics["net_tx_bytes"]
    assert float(samples["kernelhub_egress_denied_total"]) >= 4 and float(samples["kernelhub_egress_proxies"]) >= 1


def test_refusals_are_in_the_audit_log(world: World) -> None:
    """Issue 12: a refusal appears in sandbox_logs and "in the audit log where there is one" (this gateway
    keeps one): an entry of the sandbox's tenant, action ``egress``, the request and the rule in ``ids``; none
    that another tenant can read."""
    sid = world.create("bash", network={"allow": ["svc.test"], "deny": []})["id"]
    assert world.curl(sid, world.http("other.test"))[1].endswith("[403]")
    assert world.curl(sid, f"https://metadata.test:{world.servers.https_port}/")[0] != 0
    found = [e for e in audit_entries(world) if e["action"] == "egress" and e.get("sandbox_id") == sid]
    assert [(e["status"], e["error"], e["ids"]["method"], e["ids"]["target"]) for e in found] == [
        (403, "egress_denied", "GET", f"http://other.test:{world.servers.http_port}/hello"),
        (403, "egress_denied", "CONNECT", f"metadata.test:{world.servers.https_port}")], found
    assert found[0]["ids"]["reason"] == f"other.test:{world.servers.http_port} matches no allow entry of the " \
                                        "sandbox's network policy."
    assert "key_id" not in found[0] and found[0]["tenant"] == "default"
    assert not [e for e in audit_entries(world, OTHER_TOKEN) if e["action"] == "egress"]
    # Refused in a loop: every refusal in the sandbox's log, the audit log's share bounded (50 at once, then
    # one a second).
    loop = ("import socket\nfor _ in range(90):\n    s = socket.create_connection(('127.0.0.1', 3128))\n"
            "    s.sendall(b'GET http://other.test/ HTTP/1.1\\r\\nHost: other.test\\r\\n\\r\\n')\n"
            "    assert b' 403 ' in s.recv(100)\n    s.close()\n")
    status, _ = world.gw.request("PUT", f"/v1/sandboxes/{sid}/files/loop.py", raw=loop.encode())
    assert status in (200, 201)
    started = time.monotonic()
    assert world.sh(sid, "python3 loop.py")["exit_code"] == 0
    took = time.monotonic() - started
    lines = [line for line in world.logs(sid) if "egress denied: GET http://other.test/: " in line]
    assert len(lines) == 90
    kept = [e for e in audit_entries(world) if e["action"] == "egress" and e.get("sandbox_id") == sid]
    assert 50 <= len(kept) <= 50 + int(took) + 1, (len(kept), took)


def audit_entries(world: World, token: str = "default") -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    cursor = ""
    while True:
        status, page = world.gw.request("GET", f"/v1/audit?limit=1000{'&cursor=' + cursor if cursor else ''}",
                                        token=token)
        assert status == 200, page
        got += page["entries"]
        if page["next"] is None:
            return got
        cursor = page["next"]


def test_every_kind_of_process_gets_the_proxy(world: World, listed: str) -> None:
    """Kernels (python and bash), commands and terminals of a sandbox with a policy all go through it."""
    url = world.http()
    out = world.value(listed, f"import urllib.request\nurllib.request.urlopen({url!r}).read().decode()")
    assert out == repr(f"hello from http as svc.test:{world.servers.http_port}")
    out = world.execute(listed, f"curl -sS {url}", language="bash")
    assert out["stdout"] == f"hello from http as svc.test:{world.servers.http_port}\n"
    status, session = world.gw.request("POST", f"/v1/sandboxes/{listed}/sessions", {"type": "terminal"})
    assert status == 201, session
    status, answer = world.gw.request("POST", f"/v1/sessions/{session['id']}/execute",
                                      {"input": "echo $HTTPS_PROXY,$https_proxy,$NO_PROXY\n", "timeout_s": 10})
    assert status == 200 and "http://127.0.0.1:3128,http://127.0.0.1:3128,localhost,127.0.0.1" in answer["output"]
    world.gw.request("DELETE", f"/v1/sessions/{session['id']}")


def test_open_reaches_a_private_range_only_when_listed(world: World) -> None:
    sb = world.create("bash", network="open")  # the bash template is pooled: the policy comes at hand-out
    assert sb["network"] == "open"
    s = world.servers
    assert world.curl(sb["id"], world.http())[1] == f"hello from http as svc.test:{s.http_port} [200]"
    out = world.execute(sb["id"], f"curl -sS {world.http('other.test')}")
    assert out["stdout"] == f"hello from http as other.test:{s.http_port}\n"
    assert world.curl(sb["id"], world.http("loop.test"))[1] == \
        "egress denied: loop.test resolves to 127.0.0.2, a loopback address, which no network policy opens. [403]"
    assert world.curl(sb["id"], "http://metadata.test/latest/meta-data")[1] == \
        "egress denied: metadata.test resolves to 169.254.169.254, the cloud metadata address, which no network " \
        "policy opens. [403]"
    assert world.curl(sb["id"], f"http://127.0.0.3:{s.http_port}/hello")[1] == \
        "egress denied: 127.0.0.3 is a loopback address, which no network policy opens. [403]"


def test_patch_changes_the_policy_at_once(world: World) -> None:
    sb = world.create()  # "none": no proxy until the PATCH
    sid = sb["id"]
    world.execute(sid, "x = 1")  # a kernel running before the sandbox has egress
    status, body = world.patch(sid, {"allow": ["svc.test"]})
    assert status == 200 and body["network"] == {"allow": ["svc.test"], "deny": []}
    validate(body, "Sandbox")
    upload_ca(world, sid)
    assert world.curl(sid, world.https())[0] == 0
    url = world.http()
    out = world.value(sid, f"import urllib.request\nurllib.request.urlopen({url!r}).read().decode()")
    assert out == repr(f"hello from http as svc.test:{world.servers.http_port}")
    status, body = world.patch(sid, {"allow": ["other.test"]})
    assert status == 200
    assert world.curl(sid, world.http())[1].endswith("matches no allow entry of the sandbox's network policy. [403]")
    assert world.curl(sid, world.http("other.test"))[1].endswith(" [200]")
    status, body = world.patch(sid, "none")
    assert status == 200 and body["network"] == "none"
    assert world.curl(sid, world.http("other.test"))[1].endswith('network policy is "none" (no egress). [403]')
    status, body = world.patch(sid, {"allow": ["x" * 400]})
    assert status == 400 and body["message"] == "network.allow[0] is not a valid entry: an entry is longer than " \
                                                "300 characters."
    status, body = world.gw.request("PATCH", f"/v1/sandboxes/{sid}", {"network": "open", "limits": {}})
    assert status == 400 and "Unknown field 'limits'" in body["message"]
    status, body = world.gw.request("PATCH", f"/v1/sandboxes/{sid}", {})
    assert status == 400 and body["message"] == "The field 'network' is required."
    status, body = world.patch(sid, "open", token=OTHER_TOKEN)
    assert status == 404 and body["error"] == "not_found"
    status, info = world.gw.request("GET", f"/v1/sandboxes/{sid}")
    assert info["network"] == "none"


def test_concurrent_patches_leave_the_policy_shown_the_policy_enforced(world: World) -> None:
    """Two PATCHes of a sandbox that had no egress: the first starts its proxy and forwarder (it waits on the
    sandbox), the second arrives meanwhile. Whichever order they take effect in, the policy the sandbox shows
    must be the one its proxy enforces (the first used to write its own policy last, over the second's, while
    the proxy kept the second)."""
    sid = world.create("bash")["id"]
    answers: dict[str, tuple[int, Any]] = {}

    def patch(name: str, network: Any) -> None:
        answers[name] = world.patch(sid, network)

    first = threading.Thread(target=patch, args=("first", {"allow": ["svc.test"]}))
    second = threading.Thread(target=patch, args=("second", "open"))
    first.start()
    second.start()
    first.join()
    second.join()
    assert answers["first"][0] == 200 and answers["second"][0] == 200, answers
    status, info = world.gw.request("GET", f"/v1/sandboxes/{sid}")
    assert status == 200
    reached = world.curl(sid, world.http("other.test"))[1]
    if info["network"] == "open":
        assert reached.endswith("[200]"), reached
    else:
        assert info["network"] == {"allow": ["svc.test"], "deny": []}
        assert reached.endswith("matches no allow entry of the sandbox's network policy. [403]"), (info, reached)


def test_patch_to_none_cuts_a_download_in_progress(world: World) -> None:
    """A plain HTTP request waiting on its server when the policy becomes "none": its connection is cut at
    once (the server never answered), and the cut is in the sandbox's log."""
    sid = world.create("bash", network={"allow": ["svc.test"]})["id"]
    world.servers.hold.reset()
    result: dict[str, Any] = {}

    def download() -> None:
        result.update(world.sh(sid, f"curl -sS --max-time 50 http://svc.test:{world.servers.http_port}/hold"))

    thread = threading.Thread(target=download)
    thread.start()
    try:
        world.servers.hold.wait_for(1)
        status, body = world.patch(sid, "none")
        assert status == 200 and body["network"] == "none"
        thread.join(20)
        assert not thread.is_alive(), "the download was not cut"
    finally:
        world.servers.hold.release()
        thread.join()
    assert result["exit_code"] == 52 and "Empty reply from server" in result["stderr"], result
    assert any("cut by a policy change" in line for line in world.logs(sid))


def test_a_patch_starts_a_forwarder_the_sandbox_killed_again(world: World) -> None:
    """The forwarder is a process of the sandbox's: its code may kill it (``pkill python`` does), which leaves it
    no way out. A PATCH (the same policy will do) starts it again."""
    sid = world.create("bash", network={"allow": ["svc.test"]})["id"]
    assert world.curl(sid, world.http())[1].endswith(" [200]")
    kill = ("for p in /proc/[0-9]*; do if tr '\\000' ' ' < $p/cmdline 2>/dev/null | grep -q 'egress_forwarder[.]py';"
            " then pid=${p#/proc/}; kill $pid; while kill -0 $pid 2>/dev/null; do sleep 0.05; done; echo killed; fi;"
            " done")
    assert world.sh(sid, kill)["stdout"] == "killed\n"
    code, out = world.curl(sid, world.http())
    assert code == 7 and "Failed to connect" in out, out
    status, body = world.patch(sid, {"allow": ["svc.test"]})
    assert status == 200, body
    assert world.curl(sid, world.http())[1].endswith(" [200]")
    assert any("egress forwarder: it had ended" in line for line in world.logs(sid))


def proxies_open(world: World) -> float:
    status, text = world.gw.request("GET", "/metrics")
    assert status == 200
    line = next(line for line in text.decode().splitlines() if line.startswith("kernelhub_egress_proxies "))
    return float(line.split()[1])


def test_a_patch_racing_a_delete_does_not_answer_for_a_stopped_sandbox(world: World) -> None:
    """A sandbox's first policy starts its proxy and forwarder, which waits on the sandbox; a DELETE meanwhile
    stops it. The PATCH used to carry on and answer 200 with the stopped sandbox (and write its row back into
    the store the DELETE had removed it from): it answers 409 now, and no proxy outlives the sandbox."""
    before = proxies_open(world)
    for _ in range(2):
        sid = world.create("bash")["id"]
        answers: dict[str, tuple[int, Any]] = {}

        def patch(sid: str = sid, answers: dict[str, tuple[int, Any]] = answers) -> None:
            answers["patch"] = world.patch(sid, "open")

        def delete(sid: str = sid, answers: dict[str, tuple[int, Any]] = answers) -> None:
            answers["delete"] = world.gw.request("DELETE", f"/v1/sandboxes/{sid}")

        threads = [threading.Thread(target=patch), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers["delete"][0] == 204, answers
        status, body = answers["patch"]
        assert (status == 200 and body["state"] == "running") or \
            (status in (404, 409) and body["error"] in ("not_found", "sandbox_not_running")), answers
        assert world.gw.request("GET", f"/v1/sandboxes/{sid}")[0] == 404
    assert proxies_open(world) == before


def test_patch_through_the_client(world: World) -> None:
    from kernelhub.client import Sandbox

    sb = world.create(network={"allow": ["other.test"]})
    with Sandbox.connect(sb["id"], url=world.gw.url, token=world.gw.token) as client:
        assert client.set_network({"allow": ["svc.test"], "deny": []})["network"] == \
            {"allow": ["svc.test"], "deny": []}
        assert client.commands.run(f"curl -sS {world.http()}").stdout == \
            f"hello from http as svc.test:{world.servers.http_port}"




def test_hostile_code_inside_the_sandbox(world: World, listed: str) -> None:
    s = world.servers
    status, _ = world.gw.request("PUT", f"/v1/sandboxes/{listed}/files/hostile.py", raw=HOSTILE.encode())
    assert status in (200, 201)
    targets = [["ipv6", f"[::1]:{s.http_port}"], ["decimal", f"2130706433:{s.http_port}"],
               ["octal", f"0177.0.0.1:{s.http_port}"], ["mapped", "[::ffff:a9fe:a9fe]:80"],
               ["loop", f"loop.test:{s.http_port}"], ["metadata", "metadata.test:80"],
               ["other", f"other.test:{s.https_port}"]]
    result = world.sh(listed, f"python hostile.py {s.http_port} {s.https_port} {CA} '{json.dumps(targets)}'")
    assert result["exit_code"] == 0, result
    got = json.loads(result["stdout"])
    no_allow = "matches no allow entry of the sandbox's network policy."
    assert (got["raw"], got["dns"], got["routes"]) == ("ConnectionRefusedError", "gaierror", [])
    assert got["ipv6"] == "HTTP/1.1 403 Forbidden | egress denied: ::1 is a loopback address, which no network " \
                          "policy opens."
    assert got["decimal"] == f"HTTP/1.1 403 Forbidden | egress denied: 127.0.0.1:{s.http_port} {no_allow}"
    assert got["octal"] == got["decimal"]
    assert got["mapped"] == "HTTP/1.1 403 Forbidden | egress denied: 169.254.169.254 is the cloud metadata " \
                            "address, which no network policy opens."
    assert got["loop"] == f"HTTP/1.1 403 Forbidden | egress denied: loop.test:{s.http_port} {no_allow}"
    assert got["metadata"] == f"HTTP/1.1 403 Forbidden | egress denied: metadata.test:80 {no_allow}"
    assert got["other"] == f"HTTP/1.1 403 Forbidden | egress denied: other.test:{s.https_port} {no_allow}"
    assert got["fronted"] == "HTTP/1.1 200 Connection established then closed"
    assert any("names other.test, not svc.test" in line for line in world.logs(listed))


def test_names_resolving_to_forbidden_addresses_are_refused_even_when_allowed(world: World) -> None:
    sb = world.create("bash", network={"allow": ["loop.test", "metadata.test", "*.test"]})
    assert world.curl(sb["id"], world.http("loop.test"))[1] == \
        "egress denied: loop.test resolves to 127.0.0.2, a loopback address, which no network policy opens. [403]"
    assert world.curl(sb["id"], "http://metadata.test/")[1] == \
        "egress denied: metadata.test resolves to 169.254.169.254, the cloud metadata address, which no network " \
        "policy opens. [403]"




def test_a_flood_of_connections_is_bounded_per_sandbox(world: World, listed: str) -> None:
    s = world.servers
    status, _ = world.gw.request("PUT", f"/v1/sandboxes/{listed}/files/flood.py", raw=FLOOD.encode())
    assert status in (200, 201)
    s.hold.reset()
    # Streamed as NDJSON: the script's first line says the others were turned away while these 8 are held.
    stream = NdjsonStream(world.gw, "POST", f"/v1/sandboxes/{listed}/commands",
                          {"command": f"python flood.py {s.http_port} 30 {MAX_CONNECTIONS}"}, None, 120)
    try:
        events = stream.events()
        turned = 30 - MAX_CONNECTIONS
        first = ""
        while not first.endswith("\n"):  # stdout comes in chunks as the pipe gives them
            first += next(e for e in events if e["type"] == "stdout")["text"]
        assert first == f"turned away: {sorted(['503'] * turned)}\n"
        s.hold.wait_for(MAX_CONNECTIONS)
        assert s.hold.held == MAX_CONNECTIONS
        s.hold.release()
        rest = list(events)
    finally:
        s.hold.release()
        stream.close()
    assert "".join(e["text"] for e in rest if e["type"] == "stdout") == \
        f"all: {sorted(['200'] * MAX_CONNECTIONS + ['503'] * turned)}\n"
    assert rest[-1]["type"] == "end" and rest[-1]["command"]["exit_code"] == 0, rest[-1]
    reports = [line for line in world.logs(listed) if "egress connections open, its limit" in line]
    assert 1 <= len(reports) < turned  # reported, but not once per connection


def test_template_packages_and_pip_user_through_the_proxy(world: World) -> None:
    sb = world.create("pkgs")
    assert sb["network"] == {"allow": [f"pypi.test:{world.index.port}"], "deny": []}
    lines = world.logs(sb["id"])
    assert any("pip: Successfully installed kh-probe-1.0" in line for line in lines), "\n".join(lines[-30:])
    assert any("packages: pip install done" in line for line in lines)
    assert world.value(sb["id"], "import kh_probe\nkh_probe.ANSWER") == "42"
    # By hand, with the kernel running: pip install --user, then the import in that kernel.
    result = world.sh(sb["id"], "pip install --user --no-input kh-later")
    assert result["exit_code"] == 0 and "Successfully installed kh-later-2.0" in result["stdout"], result
    out = world.value(sb["id"], "import kh_later\nkh_later.WORD + ' ' + kh_later.__file__")
    assert out == "'later /home/user/.local/lib/python3.11/site-packages/kh_later/__init__.py'"
    assert any("npm: added 1 package" in line for line in lines), "\n".join(lines[-30:])
    assert any("packages: npm install done" in line for line in lines)
    result = world.sh(sb["id"], "npm install kh-npm-later && node -e \"console.log(require('kh-npm-probe').word + "
                                "', ' + require('kh-npm-later').word)\"")
    assert result["exit_code"] == 0 and result["stdout"].endswith("from npm, later\n"), result
    # The managers' caches are the sandbox's (its /tmp), never the host's.
    result = world.sh(sb["id"], "pip cache dir; npm config get cache")
    assert result["stdout"] == "/tmp/.cache/pip\n/tmp/.npm\n", result


def test_pip_after_a_patch_imports_in_a_kernel_that_started_without_egress(world: World) -> None:
    """The kernel started before the user site existed and before the sandbox had egress: what pip installs
    later still imports in it (the user site's finder looks again when the directory appears)."""
    sb = world.create()
    assert world.value(sb["id"], "import json\n1") == "1"
    status, _ = world.patch(sb["id"], {"allow": [f"pypi.test:{world.index.port}"]})
    assert status == 200
    index = f"http://pypi.test:{world.index.port}/simple"
    result = world.sh(sb["id"], f"pip install --no-input --index-url {index} --trusted-host pypi.test kh-later")
    assert result["exit_code"] == 0 and "Successfully installed kh-later-2.0" in result["stdout"], result
    assert world.value(sb["id"], "import kh_later\nkh_later.WORD") == "'later'"


def test_patch_while_the_kernel_runs_code_answers_at_once(world: World) -> None:
    """The kernel is busy when the sandbox first gets egress: the PATCH does not wait for it, and the proxy
    variables reach the kernel after that execution, before the next."""
    sid = world.create()["id"]
    code = "import os, time\nwhile not os.path.exists('/tmp/go'):\n    time.sleep(0.02)\nos.environ.get('HTTP_PROXY')"
    status, started = world.gw.request("POST", f"/v1/sandboxes/{sid}/executions", {"code": code})
    assert status == 202, started
    status, body = world.patch(sid, "open")
    assert status == 200 and body["network"] == "open"
    status, running = world.gw.request("GET", f"/v1/executions/{started['id']}")
    assert running["status"] in ("queued", "running"), running
    assert world.sh(sid, "touch /tmp/go")["exit_code"] == 0
    after = world.value(sid, "os.environ.get('HTTP_PROXY'), os.environ.get('no_proxy')")
    assert after == "('http://127.0.0.1:3128', 'localhost,127.0.0.1')"
    status, ended = world.gw.request("GET", f"/v1/executions/{started['id']}")
    assert ended["status"] == "ok" and ended["results"] == []  # its last value was None: it ran before
