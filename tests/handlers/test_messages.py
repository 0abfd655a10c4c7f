"""The sentences a new user meets when a request is slightly wrong: a key sent without ``Bearer``, an id
segment left empty by an unset variable, a method the route lacks. Each on every surface that can meet it."""

from __future__ import annotations

import pytest

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

#: One route of each surface: REST, NDJSON/REST streaming, the /stream and terminal websockets (answered
#: before any upgrade), the Jupyter API, MCP over HTTP, the metrics.
ROUTES = [("GET", "/v1/sandboxes"), ("POST", "/v1/sandboxes/sbx/execute"), ("GET", "/v1/sandboxes/sbx/stream"),
          ("GET", "/v1/sessions/sex/terminal"), ("GET", "/api/kernels"), ("POST", "/mcp"), ("GET", "/metrics")]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("header", ["{key}", "Basic {key}", "Key {key}"])
def test_a_key_without_bearer_says_how_to_send_it(gateway: Gateway, method: str, path: str,
                                                  header: str) -> None:
    status, body = gateway.request(method, path, {} if method == "POST" else None, token=None,
                                   headers={"Authorization": header.format(key=gateway.token)})
    assert status == 401 and body["error"] == "unauthorized", body
    assert "'Authorization: Bearer <key>'" in body["message"] and "holds" in body["message"], body
    assert gateway.token not in body["message"]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_no_key_and_a_wrong_key_are_told_apart(gateway: Gateway, method: str, path: str) -> None:
    data = {} if method == "POST" else None
    status, body = gateway.request(method, path, data, token=None)
    assert status == 401 and body["message"] == "An API key is required: send 'Authorization: Bearer <key>'."
    status, body = gateway.request(method, path, data, token="wrong")
    assert status == 401 and body["message"] == "The API key is not valid."
    # "token <key>" (Jupyter's scheme) and ?token= are as good as Bearer.
    assert gateway.request("GET", "/v1/sandboxes", token=None,
                           headers={"Authorization": f"token {gateway.token}"})[0] == 200
    assert gateway.request("GET", f"/v1/sandboxes?token={gateway.token}", token=None)[0] == 200


@pytest.mark.parametrize(("method", "path", "what"), [
    ("POST", "/v1/sandboxes//execute", "sandbox"),
    ("GET", "/v1/sandboxes//files/data.csv", "sandbox"),
    ("PUT", "/v1/sandboxes//files/data.csv", "sandbox"),
    ("GET", "/v1/sandboxes//stream", "sandbox"),
    ("GET", "/v1/executions//interrupt", "execution"),
    ("POST", "/v1/sessions//execute", "session"),
    ("GET", "/v1/sessions//terminal", "session"),
    ("POST", "/api/kernels//interrupt", "kernel"),
])
def test_an_empty_id_segment_says_the_id_is_missing(gateway: Gateway, method: str, path: str,
                                                    what: str) -> None:
    status, body = gateway.request(method, path, {} if method in ("POST", "PUT") else None)
    assert status == 404 and body["error"] == "not_found", body
    assert body["message"].startswith(f"The {what} id is missing in {path}: it goes between "), body


def test_an_unknown_route_is_still_named(gateway: Gateway) -> None:
    status, body = gateway.request("GET", "/v1/nothing/here")
    assert (status, body["message"]) == (404, "No such route: /v1/nothing/here.")


def test_a_wrong_method_names_the_allowed_ones(gateway: Gateway) -> None:
    status, body = gateway.request("PUT", "/v1/sandboxes", {})
    assert status == 405 and body["message"] == "PUT is not allowed on /v1/sandboxes; this route allows GET and POST."


def test_a_wrong_method_on_the_e2b_surface_names_the_allowed_ones(gateway: Gateway) -> None:  # noqa: F811
    """E2B's routes answered a bare "Method Not Allowed"; the sentence and the Allow header are /v1's, in E2B's
    error shape, on the control plane and the sandbox plane alike."""
    key = {"X-API-Key": gateway.token}
    status, created = gateway.request("POST", "/e2b/v2/sandboxes", {"templateID": "base"}, token=None, headers=key)
    assert status == 201, created
    sid = created["sandboxID"]
    envd = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": created["envdAccessToken"]}
    interpreter = {**envd, "E2b-Sandbox-Port": "49999"}
    try:
        for method, path, headers, allowed in (
                ("PUT", "/e2b/v2/sandboxes", key, "GET and POST"),
                ("PATCH", f"/e2b/sandboxes/{sid}/timeout", key, "POST"),
                ("PUT", "/e2b/files", envd, "GET and POST"),
                ("GET", "/e2b/execute", interpreter, "POST")):
            status, body = gateway.request(method, path, {} if method != "GET" else None, token=None,
                                           headers=headers)
            message = f"{method} is not allowed on {path}; this route allows {allowed}."
            assert (status, body) == (405, {"code": 405, "message": message}), path
    finally:
        gateway.request("DELETE", f"/v1/sandboxes/{sid}")
