"""Floods at the gateway API (SECURITY.md, "the gateway API: floods"): bursts of requests and websocket
messages are answered or refused one by one, and the gateway and the sandboxes in it carry on.

A real gateway on loopback; every loop here is bounded in count and time.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from websockets.sync.client import connect

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


@pytest.fixture(scope="module")
def sid(gateway: Gateway) -> Any:
    status, body = gateway.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, body
    yield body["id"]
    gateway.request("DELETE", f"/v1/sandboxes/{body['id']}")


def test_a_burst_of_mixed_requests_is_answered_one_by_one(gateway: Gateway, sid: str) -> None:
    calls: list[tuple[str, str, Any, dict[str, Any]]] = [
        ("GET", "/v1/sandboxes", None, {"token": None}),  # no key
        ("GET", "/v1/sandboxes", None, {"token": "wrong"}),  # a bad key
        ("POST", f"/v1/sandboxes/{sid}/execute", None, {"raw": b"{not json"}),
        ("GET", f"/v1/sandboxes/{sid}/files/..%2F..%2Fetc%2Fpasswd", None, {}),
        ("GET", "/v1/sandboxes/sbnope", None, {}),
        ("GET", "/v1/sandboxes", None, {}),
        ("GET", f"/v1/sandboxes/{sid}/metrics", None, {}),
    ]
    expected = [401, 401, 400, 400, 404, 200, 200]

    def one(i: int) -> int:
        method, path, body, kwargs = calls[i % len(calls)]
        status, _ = gateway.request(method, path, body, timeout=60, **kwargs)
        return status

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(one, range(350)))
    assert statuses == [expected[i % len(expected)] for i in range(350)]
    assert time.monotonic() - started < 60
    # The sandbox in the middle of it all still runs code.
    status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": "print('after the burst')"})
    assert status == 200 and ex["stdout"] == "after the burst\n"


def test_a_websocket_message_flood_is_rejected_message_by_message(gateway: Gateway, sid: str) -> None:
    url = gateway.url.replace("http", "ws") + f"/v1/sandboxes/{sid}/stream"
    with connect(url, additional_headers={"Authorization": f"Bearer {gateway.token}"}, open_timeout=30) as ws:
        for i in range(500):
            ws.send(json.dumps({"type": "bogus", "request_id": f"r{i}"}) if i % 2 else "not json")
        rejected = 0
        deadline = time.monotonic() + 60
        while rejected < 500 and time.monotonic() < deadline:
            event = json.loads(ws.recv(timeout=30))
            assert event["type"] == "rejected", event
            rejected += 1
        assert rejected == 500
        # The same connection still executes code.
        ws.send(json.dumps({"type": "execute", "code": "print(6 * 7)", "request_id": "real"}))
        while True:
            event = json.loads(ws.recv(timeout=60))
            if event["type"] == "end" and event.get("request_id") == "real":
                assert event["execution"]["stdout"] == "42\n"
                break


def test_many_queued_executions_run_in_order(gateway: Gateway, sid: str) -> None:
    # 100 executions queued at once on one kernel: each ends, in order, none lost (the kernel takes one at a
    # time; KERNELS.md: pipelined requests lose replies on tslab).
    ids = []
    for i in range(100):
        status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/executions", {"code": f"print({i})"})
        assert status == 202, body
        ids.append(body["id"])
    deadline = time.monotonic() + 120
    results: list[dict[str, Any]] = []
    for ex_id in ids:
        while True:
            status, ex = gateway.request("GET", f"/v1/executions/{ex_id}")
            assert status == 200
            if ex["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, "the queue stalled"
            time.sleep(0.05)
        results.append(ex)
    assert [ex["stdout"] for ex in results] == [f"{i}\n" for i in range(100)]
    counts = [ex["execution_count"] for ex in results]
    assert counts == sorted(counts)
