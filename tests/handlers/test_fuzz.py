"""Fuzzing every HTTP route the gateway serves (issue 7, item 8): no input gives a 5xx or a traceback.

The routes come from the application itself (:func:`kernelhub.app.make_app`), so a route added anywhere is
fuzzed without a word here; :func:`test_the_routes_are_the_documented_ones` holds them to ``openapi.json`` (for
``/v1``) and to API.md's Jupyter API and MCP (the rest), so a route cannot be served without being documented
either. Each route gets every method, with hypothesis drawing (derandomized, a bounded number of examples) the
ids in its URL (a real object's, or one of the wrong shape, empty, not UTF-8, ...), the query string, the headers
(auth, Content-Type, Accept, chunked bodies, bytes that are not ASCII) and the body (not JSON, not UTF-8, nested
100,000 deep, NaN, huge numbers, lone surrogates, control characters, and JSON objects with the route's fields
given wrong types and out-of-range values). Every answer must be below 500; every error a JSON body
``{"error": <snake_case>, "message": <sentence>}`` (a 405 also names the allowed methods); and the gateway's log
must hold no traceback. The websockets and MCP have fuzz tests of their own (``test_fuzz_sockets.py``,
``test_fuzz_mcp.py``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_from_bytes

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tornado.websocket import WebSocketHandler

import kernelhub
from kernelhub.app import make_app
from kernelhub.handlers.base import MAX_JSON_BODY, GatewayConfig, allowed_methods
from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.hub import Hub

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

OPENAPI = json.loads((Path(kernelhub.__file__).parent / "openapi.json").read_text())
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND", "FOO")
#: Routes outside /v1, documented in API.md rather than openapi.json: the Jupyter API and MCP.
DOCUMENTED_ELSEWHERE = {
    "/api": {"GET"},
    "/api/kernelspecs": {"GET"},
    "/api/kernelspecs/{kernel_name}": {"GET"},
    "/kernelspecs/{kernel_name}/{path}": {"GET", "HEAD"},
    "/api/kernels": {"GET", "POST"},
    "/api/kernels/{kernel_id}": {"GET", "DELETE"},
    "/api/kernels/{kernel_id}/{action}": {"POST"},
    "/api/kernels/{kernel_id}/channels": {"GET"},
    "/mcp": {"POST"},
}
#: Examples per route; with every method swept besides, the whole module runs in well under a minute.
EXAMPLES = 30


# -- the routes ----------------------------------------------------------------------------------------------

#: What a URL group names, from the path segment before it.
_KINDS = {"sandboxes": "sandbox", "executions": "execution", "sessions": "session", "kernels": "kernel",
          "kernelspecs": "kernelspec", "files": "path", "commands": "pid"}
#: ...and for a group that follows another group.
_SECOND_KINDS = {"kernel": "action", "kernelspec": "resource"}


@dataclasses.dataclass(frozen=True)
class Route:
    """One URL rule of the application."""

    pattern: str
    template: str  # the path with one %s per group (tornado's own reversal of the pattern)
    kinds: tuple[str, ...]
    handler: type
    methods: tuple[str, ...]

    def __str__(self) -> str:
        return self.template.replace("%s", "{}")

    @property
    def websocket(self) -> bool:
        return issubclass(self.handler, WebSocketHandler)


#: The E2B surface's prefix (kernelhub.handlers.e2b); its rules speak E2B's protocol, not kernelhub's.
E2B_PREFIX = "/e2b"


def served_routes() -> list[Route]:
    """Every rule of the real application, built over a hub that is never started (its handlers are only
    listed here, never run)."""
    with tempfile.TemporaryDirectory(prefix="kernelhub-fuzz-routes-") as state_dir:
        app = make_app(Hub(SandboxFactory(state_dir=state_dir)), None, GatewayConfig())  # type: ignore[arg-type]
    routes = []
    for rule in app.wildcard_router.rules:
        if rule.matcher.regex.pattern.startswith(E2B_PREFIX):
            # E2B's protocol, with E2B's own error shapes: fuzzed by tests/handlers/test_e2b_protocol.py.
            continue
        template = rule.matcher._path.replace("/?", "")
        kinds: list[str] = []
        segments = template.split("/")
        for i, segment in enumerate(segments):
            if segment == "%s":
                before = segments[i - 1]
                kinds.append(_SECOND_KINDS.get(kinds[-1], "id") if before == "%s" and kinds
                             else _KINDS.get(before, "id"))
        routes.append(Route(rule.matcher.regex.pattern, template, tuple(kinds), rule.target,
                            tuple(m for m in allowed_methods(rule.target) if m != "OPTIONS")))
    return routes


ROUTES = served_routes()


def _matches(route: Route, documented_path: str) -> bool:
    samples = {"{action}": "interrupt", "{pid}": "1"}
    sample = re.sub(r"\{[^}]+\}", lambda m: samples.get(m.group(), "x"), documented_path)
    return re.fullmatch(route.pattern.rstrip("$"), sample) is not None and route.template.count("%s") == \
        documented_path.count("{")


def test_the_routes_are_the_documented_ones() -> None:
    documented = {path: {m.upper() for m in ops if m in ("get", "post", "put", "patch", "delete", "head")}
                  for path, ops in OPENAPI["paths"].items()}
    for path, methods in DOCUMENTED_ELSEWHERE.items():
        assert path not in documented
        documented[path] = methods
    unmatched = dict(documented)
    for route in ROUTES:
        found = [path for path in documented if _matches(route, path)]
        assert len(found) == 1, f"{route} is served but documented {len(found)} times: {found}"
        served = set(route.methods) - {"HEAD"} | ({"HEAD"} & documented[found[0]])
        assert served == documented[found[0]], (str(route), served, documented[found[0]])
        unmatched.pop(found[0])
    assert not unmatched, f"documented but not served: {sorted(unmatched)}"


# -- what to send --------------------------------------------------------------------------------------------

BAD_IDS = ["", "x", "sb" + "0" * 16, "SB00", "%FF", "%00", "%C0%AF", "%ED%A0%80", "..", "%2e%2e", "a%2Fb",
           "x" * 3000, "%E2%80%AE", "\xe9", "%20", "-1", "null", "%0A"]
BAD_PATHS = ["", "/", "x.txt", "dir/y.txt", "..", "../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "a/../b",
             "%00", "a%00b", "%FF%FE", "caf%E9.txt", "x" * 300, "/".join(["d"] * 700), "//abs", "%2Fabs",
             "\\..\\x", "a%3Fb", "%ED%A0%80", ".", "./", "a//b"]
#: Methods never sent with the real objects' ids: they would take the objects the other routes are fuzzed on
#: (pausing is tested by tests/handlers/test_pause.py).
REAL_SAFE = {"SandboxHandler": ("DELETE",), "SessionHandler": ("DELETE",), "KernelHandler": ("DELETE",),
             "SandboxPauseHandler": ("POST",)}

#: Bodies that are not one JSON object, or JSON the gateway must refuse whatever the route.
NASTY_BODIES = [
    b"", b" ", b"null", b"[]", b'"python"', b"0", b"{", b"}", b"{]", b"[" * 100_000, b'{"a":' * 3000,
    b'{"a":' * 70 + b"1" + b"}" * 70, b"\xff\xfe\x00", b"\xef\xbb\xbf{}", b'{"x": NaN}', b'{"x": -Infinity}',
    b'{"x": 1e999}', b'{"x": ' + b"9" * 5000 + b"}", b'{"x": "\\ud800"}', b'{"\\udc80": 1}', b'{"x": "\x00\x1f"}',
    b'{"x": 1} {"y": 2}', b'{"x": 1,}', b"\x00" * 64, b'{"code": "1"' + b" " * 1000, "{\"x\": \"\u2028\"}".encode(),
    b'{"x": 1, "x": 2}', b"\r\n\r\n",
]

#: A plausible value of each field a route takes (harmless when it happens to make a valid request).
PLAUSIBLE: dict[str, Any] = {
    "template": "python", "code": "1", "command": "true", "input": "1", "language": "python", "type": "terminal",
    "timeout_s": 5, "env": {"A": "b"}, "limits": {"memory_mb": 256}, "metadata": {"k": "v"}, "network": "none",
    "cwd": "/workspace", "stdin": "", "session_id": "senope", "name": "kernelhub-python", "path": "",
}
#: Values of the wrong type, out of range or otherwise unusable, for any field.
WRONG = [None, True, False, -1, 0, 2**62, 1.5, -0.0, 1e308, "", " ", "x" * 10_000, "\x00", "\u202e", "\ud800",
         [], [1], {}, {"a": {"b": {}}}, float("nan"), float("inf"), {"memory_mb": "x"}, {"A": 1}, {"": ""},
         {"BAD NAME": "x"}, {"A": "\x00"}, {"cpu": 1e308}, {"pids": 2**62}, "python\x00", "../x"]


def _fields_of(route: Route) -> list[str]:
    """The body fields the route's documented POST/PUT take (openapi.json), or a few for other routes."""
    for path, ops in OPENAPI["paths"].items():
        if _matches(route, path):
            for op in ops.values():
                if not isinstance(op, dict):
                    continue
                schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                if schema:
                    ref = schema.get("$ref", "").rsplit("/", 1)[-1]
                    schema = OPENAPI["components"]["schemas"].get(ref, schema)
                    return sorted(schema.get("properties", {}))
    return {"MainKernelHandler": ["name", "env", "path"]}.get(route.handler.__name__, ["code", "type"])


@st.composite
def bodies(draw: st.DrawFn, route: Route) -> bytes | None:
    kind = draw(st.sampled_from(["none", "nasty", "object", "object", "object", "binary"]))
    if kind == "none":
        return None
    if kind == "nasty":
        return draw(st.sampled_from(NASTY_BODIES))
    if kind == "binary":
        return draw(st.binary(max_size=64))
    obj: dict[str, Any] = {}
    for field in _fields_of(route):
        choice = draw(st.sampled_from(["plausible", "wrong", "wrong", "absent"]))
        if choice == "plausible" and field in PLAUSIBLE:
            obj[field] = PLAUSIBLE[field]
        elif choice == "wrong":
            obj[field] = draw(st.sampled_from(WRONG))
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["limit", "surprise", "", "\ud800", "x" * 300]))] = draw(st.sampled_from(WRONG))
    # Written as ASCII, a lone surrogate is the escape \ud800; written as UTF-8, bytes that are not UTF-8.
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()), allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def segment(kind: str, real: dict[str, str], method: str, route: Route) -> st.SearchStrategy[str]:
    """What to put in a URL group of ``kind``: a real object's id, or something of the wrong shape."""
    choices: list[st.SearchStrategy[str]] = [st.sampled_from(BAD_IDS),
                                             st.binary(max_size=12).map(lambda b: quote_from_bytes(b, safe=""))]
    if kind == "path":
        choices = [st.sampled_from(BAD_PATHS), st.binary(max_size=12).map(lambda b: quote_from_bytes(b, safe="/"))]
    elif kind == "action":
        choices = [st.sampled_from(["interrupt", "interrupt", "restart"])]
    elif kind == "pid":  # a command's pid inside the sandbox: digits, or the shapes of BAD_IDS (a 404)
        choices.append(st.sampled_from(["1", "0", "2", "99999999999999999999", "007"]))
    elif kind == "resource":
        choices.append(st.sampled_from(["logo-64x64.png", "kernel.json", "..", ".hidden", "%2e%2e%2fkernel.json"]))
    if kind in real and method not in REAL_SAFE.get(route.handler.__name__, ()):
        choices += [st.just(real[kind])] * 3
        if kind == "session":
            choices.append(st.just(real["jupyter_session"]))
    return st.one_of(*choices)


QUERIES = [b"", b"?list=1", b"?list=%FF", b"?lines=abc", b"?lines=" + b"9" * 5000, b"?lines=-1", b"?lines=3",
           b"?token=%FF", b"?session_id=%FF", b"?session_id=" + b"s" * 300, b"?%FF=1", b"?a=1&a=2",
           b"?limit=-1&cursor=%00", b"?list=1&list=0", b"?" + b"&" * 1000]
AUTHS = ["good"] * 8 + ["none", b"Bearer", b"Basic eHg=", b"token \xff\xfe", b"Bearer \x80" + b"k" * 20,
         b"Bearer " + b"k" * 5000]
CONTENT_TYPES = [None, b"application/json", b"text/plain", b"application/x-www-form-urlencoded",
                 b"multipart/form-data; boundary=x", b"multipart/form-data", b"application/json; charset=\xff", b""]
ACCEPTS = [None, b"application/x-ndjson", b"application/json, text/event-stream", b"\xff", b"*/*"]


#: Any byte to one a header value may hold.
_HEADER_BYTES = bytes(32 + i % 95 if i < 128 else i for i in range(256))


@dataclasses.dataclass
class Request:
    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    chunked: bool


@st.composite
def requests(draw: st.DrawFn, route: Route, real: dict[str, str], token: str) -> Request:
    method = draw(st.sampled_from(route.methods * 3 + METHODS))
    values = tuple(draw(segment(kind, real, method, route)) for kind in route.kinds)
    path = route.template % values if values else route.template
    if "/?" in route.pattern and draw(st.booleans()):
        path += "/"
    target = path.encode("latin-1", "replace") + draw(st.sampled_from(QUERIES))
    headers: list[tuple[bytes, bytes]] = []
    auth = draw(st.sampled_from(AUTHS))
    if auth == "good":
        headers.append((b"Authorization", b"Bearer " + token.encode()))
    elif isinstance(auth, bytes):
        headers.append((b"Authorization", auth))
    content_type = draw(st.sampled_from(CONTENT_TYPES))
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    accept = draw(st.sampled_from(ACCEPTS))
    if accept is not None:
        headers.append((b"Accept", accept))
    if route.websocket and draw(st.booleans()):
        # A handshake, whole or in part: a whole one reaches the route's lookups (ids, query) before the upgrade.
        headers += [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
        if draw(st.booleans()):
            headers.append((b"Sec-WebSocket-Version", draw(st.sampled_from([b"13", b"13", b"99", b""]))))
            if draw(st.integers(0, 3)):
                headers.append((b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="))
    if draw(st.booleans()):
        # Mostly bytes a header may hold (latin-1 beyond ASCII included); now and then any byte, which tornado
        # refuses before a handler (answered by the gateway's HTTP server as JSON too).
        value = draw(st.binary(max_size=24))
        value = value if draw(st.integers(0, 9)) == 0 else value.translate(_HEADER_BYTES)
        headers.append((draw(st.sampled_from([b"X-Fuzz", b"Origin", b"Cookie", b"Range", b"If-None-Match"])),
                        value))
    return Request(method, target, headers, draw(bodies(route)), draw(st.booleans()))


# -- the checks ----------------------------------------------------------------------------------------------

def check_answer(route: Route, request: Request, answer: Any, assert_error_body: Any) -> None:
    where = f"{request.method} {request.target[:200]!r} body {(request.body or b'')[:200]!r}"
    assert answer.status < 500, (where, answer.status, answer.body[:2000])
    assert b"Traceback" not in answer.body, (where, answer.body[:2000])
    if answer.status == 405:
        assert answer.headers.get("allow"), (where, answer.headers)
    if answer.status < 400 or request.method == "HEAD":
        return
    body = answer.json()
    if route.template.startswith("/mcp") and isinstance(body, dict) and "jsonrpc" in body:
        # The MCP transport's own refusals are JSON-RPC errors (the MCP fuzz test looks closer).
        assert isinstance(body["error"]["code"], int) and body["error"]["message"], (where, body)
        return
    assert_error_body(body, where)


def clean_up(fuzz: Any, request: Request, answer: Any) -> None:
    """A request that happened to be valid and made something: remove it, so that the fuzzing does not fill
    the tenant's quota (its 429s would hide other answers)."""
    if answer.status != 201 or request.method != "POST":
        return
    made = answer.json()
    path = request.target.split(b"?")[0]
    if path.rstrip(b"/") == b"/v1/sandboxes":
        fuzz.gw.request("DELETE", f"/v1/sandboxes/{made['id']}")
    elif path.rstrip(b"/") == b"/api/kernels":
        fuzz.gw.request("DELETE", f"/api/kernels/{made['id']}")
    elif path.endswith(b"/sessions"):
        fuzz.gw.request("DELETE", f"/v1/sessions/{made['id']}")


def real_ids(fuzz: Any) -> dict[str, str]:
    return {"sandbox": fuzz.sandbox, "session": fuzz.terminal, "jupyter_session": fuzz.jupyter_session,
            "execution": fuzz.execution, "kernel": fuzz.kernel, "kernelspec": "kernelhub-python",
            "action": "interrupt", "resource": "logo-64x64.png", "pid": "1"}


# -- the tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_every_method_on_every_route(fuzz: Any, assert_error_body: Any, route: Route) -> None:
    """Each method with the real objects' ids and a body that is not JSON, and the route's own methods with ids
    that are not UTF-8 too: a 405 names the allowed methods; nothing is a 5xx."""
    since = len(fuzz.log())
    real = real_ids(fuzz)
    headers = [(b"Authorization", f"Bearer {fuzz.token}".encode())]
    for method in METHODS:
        safe = method not in REAL_SAFE.get(route.handler.__name__, ())
        variants = [tuple(real.get(kind, "x") if safe else "%FF" for kind in route.kinds)]
        if route.kinds and method in route.methods:
            variants.append(("%FF",) * len(route.kinds))
        for values in variants:
            target = (route.template % values if values else route.template).encode()
            request = Request(method, target, headers, b"{not json", False)
            answer = fuzz.raw(method.encode(), target, headers, request.body)
            check_answer(route, request, answer, assert_error_body)
            if method not in route.methods and method != "OPTIONS":
                assert answer.status in (404, 405), (method, target, answer.status, answer.body)
                if answer.status == 405 and method != "HEAD":
                    message = answer.json()["message"]
                    assert all(m in message for m in route.methods if m != "HEAD"), message
    fuzz.assert_log_clean(since)


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_fuzz_route(fuzz: Any, assert_error_body: Any, route: Route) -> None:
    since = len(fuzz.log())
    real = real_ids(fuzz)

    @settings(derandomize=True, max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink])
    @given(request=requests(route, real, fuzz.token))
    def run(request: Request) -> None:
        answer = fuzz.raw(request.method.encode(), request.target, request.headers, request.body,
                          chunked=request.chunked)
        check_answer(route, request, answer, assert_error_body)
        clean_up(fuzz, request, answer)

    run()
    fuzz.assert_log_clean(since)
    fuzz.assert_serving()


def _takes_json(route: Route) -> bool:
    return "POST" in route.methods and not route.template.startswith("/mcp") and \
        _fields_of(route) != ["code", "type"]


@pytest.mark.parametrize("route", [r for r in ROUTES if _takes_json(r)], ids=str)
def test_oversized_and_chunked_bodies(fuzz: Any, assert_error_body: Any, route: Route) -> None:
    """A JSON body over the limit is a 413 whether its size is announced or it comes chunked."""
    since = len(fuzz.log())
    real = real_ids(fuzz)
    target = (route.template % tuple(real.get(k, "x") for k in route.kinds)).encode()
    headers = [(b"Authorization", f"Bearer {fuzz.token}".encode()), (b"Content-Type", b"application/json")]
    big = b'{"code": "' + b"x" * (MAX_JSON_BODY + 10) + b'"}'
    for chunked in (False, True):
        answer = fuzz.raw(b"POST", target, headers, big, chunked=chunked)
        assert answer.status == 413, (route, chunked, answer.status, answer.body[:500])
        assert_error_body(answer.json())
    fuzz.assert_log_clean(since)


def test_file_names_that_are_not_utf8(fuzz: Any, assert_error_body: Any) -> None:
    """A name the sandbox made that is not UTF-8 is listed (U+FFFD in name and path, the bytes percent-encoded
    in url_path), and can be downloaded and deleted through url_path; the REST list, MCP's file_list and a
    listing of the directory named that way all answer."""
    sid = fuzz.sandbox
    status, ran = fuzz.gw.request("POST", f"/v1/sandboxes/{sid}/commands", {
        "command": "mkdir -p bytes && cd bytes && printf abc > $'caf\\xe9.txt' && mkdir $'d\\xff' && "
                   "printf x > $'d\\xff/in' && printf ok > plain.txt"})
    assert status == 200 and ran["exit_code"] == 0, ran
    status, listing = fuzz.gw.request("GET", f"/v1/sandboxes/{sid}/files/bytes?list=1")
    assert status == 200, listing
    by_url = {e.get("url_path", quote(e["path"])): e for e in listing["entries"]}
    assert set(by_url) == {"bytes/caf%E9.txt", "bytes/d%FF", "bytes/plain.txt"}, listing
    assert by_url["bytes/caf%E9.txt"]["name"] == "caf\ufffd.txt" and by_url["bytes/caf%E9.txt"]["size"] == 3
    assert by_url["bytes/d%FF"]["type"] == "dir" and "url_path" not in by_url["bytes/plain.txt"]
    # The directory itself, reached by its url_path.
    status, inner = fuzz.gw.request("GET", f"/v1/sandboxes/{sid}/files/bytes/d%FF?list=1")
    assert status == 200 and [(e["name"], e["path"], e["url_path"]) for e in inner["entries"]] == [
        ("in", "bytes/d\ufffd/in", "bytes/d%FF/in")], inner
    # Download and delete by url_path.
    status, data = fuzz.gw.request("GET", f"/v1/sandboxes/{sid}/files/bytes/caf%E9.txt")
    assert (status, data) == (200, b"abc")
    assert fuzz.gw.request("DELETE", f"/v1/sandboxes/{sid}/files/bytes/d%FF")[0] == 204
    assert fuzz.gw.request("DELETE", f"/v1/sandboxes/{sid}/files/bytes/caf%E9.txt")[0] == 204
    status, listing = fuzz.gw.request("GET", f"/v1/sandboxes/{sid}/files/bytes?list=1")
    assert [e["name"] for e in listing["entries"]] == ["plain.txt"], listing
    # Uploads may name such files too (any bytes but "/" and NUL make a Linux name); a NUL is refused.
    status, up = fuzz.gw.request("PUT", f"/v1/sandboxes/{sid}/files/bytes/new%FE", raw=b"1")
    assert (status, up) == (201, {"path": "bytes/new\ufffd", "url_path": "bytes/new%FE", "size": 1})
    status, up = fuzz.gw.request("PUT", f"/v1/sandboxes/{sid}/files/bytes/%ED%A0%80", raw=b"2")
    assert (status, up) == (201, {"path": "bytes/\ufffd\ufffd\ufffd", "url_path": "bytes/%ED%A0%80", "size": 1})
    assert fuzz.gw.request("GET", f"/v1/sandboxes/{sid}/files/bytes/%ED%A0%80")[1] == b"2"
    status, err = fuzz.gw.request("PUT", f"/v1/sandboxes/{sid}/files/bytes/a%00b", raw=b"1")
    assert status == 400, err
    assert_error_body(err)
    assert fuzz.gw.request("DELETE", f"/v1/sandboxes/{sid}/files/bytes")[0] == 204
