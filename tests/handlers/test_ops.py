"""What operators ask a running gateway: ``GET /healthz`` (no key, cheap, says why it cannot start sandboxes),
``GET /metrics`` (Prometheus text, the operator's keys only) and the INFO log line of each sandbox lifecycle
event (no key, no code in them)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.services.hub import Hub
from kernelhub.services.telemetry import Telemetry
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]


def samples(gw: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The gateway's metrics now: (sample name, labels) -> value."""
    status, body = gw.request("GET", "/metrics")
    assert status == 200, body
    text = body.decode() if isinstance(body, bytes) else str(body)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def wait_for(check: Any, what: str, timeout: float = 60) -> Any:
    """Poll ``check()`` until it answers something true (the reaper runs on its own clock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


# -- /healthz ---------------------------------------------------------------------------------------------

def test_healthz_needs_no_key_and_says_ok(gateway: Gateway) -> None:
    assert gateway.request("GET", "/healthz", token=None) == (200, {"status": "ok"})
    assert gateway.request("HEAD", "/healthz", token=None)[0] == 200
    # A key that is wrong does not matter either (a probe may carry one meant for another service).
    assert gateway.request("GET", "/healthz", token="not-a-key")[0] == 200
    assert gateway.request("POST", "/healthz", {}, token=None)[0] == 405


def test_healthz_says_why_no_sandbox_could_start() -> None:
    """A gateway whose bubblewrap and kernels' runtime are gone (started past the doctor to get that far)
    answers 503 with a sentence for each, and no path."""
    empty = tempfile.mkdtemp(prefix="kh-no-runtime-")
    gw = Gateway(env={"KERNELHUB_RUNTIME_DIR": empty, "KERNELHUB_BWRAP": "/nonexistent/bwrap",
                      "KERNELHUB_SKIP_DOCTOR": "1"})
    try:
        status, body = gw.request("GET", "/healthz", token=None)
        assert status == 503 and body["status"] == "unavailable" and body["error"] == "unavailable"
        assert any("bubblewrap" in r for r in body["reasons"]) and any("runtime" in r for r in body["reasons"])
        assert body["message"].startswith("This gateway cannot start sandboxes now: ")
        assert empty not in str(body) and "/nonexistent" not in str(body)
        assert gw.request("HEAD", "/healthz", token=None)[0] == 503
    finally:
        gw.stop()
        os.rmdir(empty)


@pytest.fixture
def read_only_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="kh-ro-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "kh-ro", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True)
        os.rmdir(path)


def test_factory_health_reads_the_state_disk(read_only_dir: str, tmp_path: Any) -> None:
    """The state directory's checks: writable (a read-only mount is not), and room to spare."""
    runtime = SandboxFactory().runtime_dir
    assert SandboxFactory(state_dir=str(tmp_path / "new"), runtime_dir=runtime).health() == []
    problems = SandboxFactory(state_dir=read_only_dir + "/state", runtime_dir=runtime).health()
    assert problems == ["the state directory is not writable"]
    problems = SandboxFactory(state_dir=str(tmp_path), runtime_dir=runtime, min_host_free_mb=2**40).health()
    assert len(problems) == 1 and "MiB free" in problems[0]


# -- /metrics ---------------------------------------------------------------------------------------------

def test_metrics_are_for_the_operator_only(gateway: Gateway) -> None:
    status, body = gateway.request("GET", "/metrics", token=None)
    assert status == 401
    status, body = gateway.request("GET", "/metrics", token=gateway.other_token)
    assert status == 403 and body["error"] == "forbidden" and "'default'" in body["message"]
    status, body = gateway.request("GET", "/metrics")
    assert status == 200 and b"# TYPE kernelhub_sandboxes gauge" in body


def test_metrics_count_sandboxes_executions_and_errors(gateway: Gateway) -> None:
    before = samples(gateway)
    status, sb = gateway.request("POST", "/v1/sandboxes", {"template": "python"})
    assert status == 201, sb
    try:
        live = samples(gateway)
        assert value(live, "kernelhub_sandboxes", template="python", state="running") >= 1
        assert value(live, "kernelhub_sessions", type="jupyter", language="python") >= 1
        assert value(live, "kernelhub_sandboxes_created_total", template="python") == \
            value(before, "kernelhub_sandboxes_created_total", template="python") + 1
        assert value(live, "kernelhub_sandbox_start_seconds_count", template="python") == \
            value(before, "kernelhub_sandbox_start_seconds_count", template="python") + 1
        runs = [({"code": "1 + 1"}, "ok", ""), ({"code": "1 / 0"}, "error", ""),
                ({"code": "import time; time.sleep(30)", "timeout_s": 0.5}, "timeout", "timeout")]
        for body, status_, _ in runs:
            status, ex = gateway.request("POST", f"/v1/sandboxes/{sb['id']}/execute", body)
            assert status == 200 and ex["status"] == status_, ex
        assert gateway.request("GET", "/v1/sandboxes/sbnothere")[0] == 404
        after = samples(gateway)
        for _, status_, reason in runs:
            assert value(after, "kernelhub_executions_total", status=status_, reason=reason) == \
                value(before, "kernelhub_executions_total", status=status_, reason=reason) + 1, status_
        assert value(after, "kernelhub_execution_seconds_count", status="timeout") == \
            value(before, "kernelhub_execution_seconds_count", status="timeout") + 1
        assert value(after, "kernelhub_execution_seconds_sum", status="timeout") >= \
            value(before, "kernelhub_execution_seconds_sum", status="timeout") + 0.5
        assert value(after, "kernelhub_errors_total", code="not_found") >= \
            value(before, "kernelhub_errors_total", code="not_found") + 1
        assert value(after, "kernelhub_info", version=__import__("kernelhub").__version__) == 1
    finally:
        assert gateway.request("DELETE", f"/v1/sandboxes/{sb['id']}")[0] == 204
    done = samples(gateway)
    assert value(done, "kernelhub_sandboxes_stopped_total", template="python", reason="deleted") == \
        value(before, "kernelhub_sandboxes_stopped_total", template="python", reason="deleted") + 1


class StubPool:
    """Stands for a warm pool that has sandboxes ready and starting (the pool of a hub that was never started
    has none): what the metrics need of it is ``state()``."""

    def state(self) -> dict[str, Any]:
        return {"python": {"ready": 2, "starting": 1, "size": 3}, "bash": {"ready": 0, "starting": 0, "size": 1}}


def test_a_hub_with_a_pool_shows_its_state_and_hubs_keep_registries_apart(tmp_path: Any) -> None:
    hubs = [Hub(SandboxFactory(state_dir=str(tmp_path / str(i)))) for i in range(2)]
    hubs[0].pool = StubPool()  # type: ignore[attr-defined]
    text = generate_latest(hubs[0].telemetry.registry).decode()
    assert 'kernelhub_pool_ready{template="python"} 2.0' in text
    assert 'kernelhub_pool_starting{template="python"} 1.0' in text
    assert 'kernelhub_pool_size{template="bash"} 1.0' in text
    hubs[0].telemetry.error("not_found")
    other = generate_latest(hubs[1].telemetry.registry).decode()
    # The other hub shows its own (unstarted, empty) pool, and none of the first hub's figures.
    assert 'kernelhub_pool_ready{template="python"} 0.0' in other
    assert 'kernelhub_pool_ready{template="python"} 2.0' not in other
    assert 'kernelhub_errors_total{code="not_found"}' not in other
    # A pool that reports per template with attributes rather than keys reads the same.
    attrs = type("Entry", (), {"ready": 4, "starting": 0, "size": 4})()
    solo = Telemetry(lambda: [], lambda: {"node": attrs})
    assert 'kernelhub_pool_ready{template="node"} 4.0' in generate_latest(solo.registry).decode()


# -- lifecycle log lines ----------------------------------------------------------------------------------

def test_each_lifecycle_event_is_an_info_line_without_keys_or_code() -> None:
    gw = Gateway(extra_args=["--log-level", "INFO"])
    secret = "print('the-code-of-a-user-1b7e')"
    try:
        status, sb = gw.request("POST", "/v1/sandboxes", {"template": "python", "limits": {"idle_timeout_s": 1}})
        assert status == 201, sb
        assert gw.request("POST", f"/v1/sandboxes/{sb['id']}/execute", {"code": secret})[0] == 200
        wait_for(lambda: gw.request("GET", f"/v1/sandboxes/{sb['id']}")[1].get("reason") == "idle", "the idle reap")
        # A deadline that E2B's timeout set: the line gives that lifetime, not max_lifetime_s (86400 s).
        status, e2b = gw.request("POST", "/e2b/v2/sandboxes", {"templateID": "base", "timeout": 2}, token=None,
                                 headers={"X-API-Key": gw.token})
        assert status == 201, e2b
        wait_for(lambda: gw.request("GET", f"/v1/sandboxes/{e2b['sandboxID']}")[1].get("reason") == "lifetime",
                 "the lifetime reap")
        status, other = gw.request("POST", "/v1/sandboxes", {"template": "bash"}, token=gw.other_token)
        assert status == 201, other
        assert gw.request("DELETE", f"/v1/sandboxes/{other['id']}", token=gw.other_token)[0] == 204
        with open(gw.log_path, errors="replace") as f:  # all of it: gw.log() keeps the last 5000 characters
            log = f.read()
    finally:
        gw.stop()
    lines = [line for line in log.splitlines() if "kernelhub.services]" in line]
    assert all(line.startswith("[I ") for line in lines), lines

    def said(*words: str) -> bool:
        return any(all(w in line for w in words) for line in lines)

    assert said(sb["id"], "created for tenant default", "template python", "memory 512 MiB")
    assert said(sb["id"], "ready in")
    assert said(sb["id"], "reaped: idle for")
    assert said(sb["id"], "stopped (idle)")
    # 2 s from when the deadline was set, which is a little after the record's creation.
    reaped = [line for line in lines if e2b["sandboxID"] in line and "reaped: its lifetime of " in line]
    assert len(reaped) == 1 and 2 <= int(reaped[0].split("lifetime of ")[1].split(" s")[0]) <= 10, reaped
    assert said(other["id"], "created for tenant bob", "template bash")
    assert said(other["id"], "deleted by tenant bob")
    assert said(other["id"], "stopped (deleted)")
    assert gw.token not in log and gw.other_token not in log and "the-code-of-a-user" not in log


def test_a_sandbox_that_cannot_start_is_a_failed_line() -> None:
    """A kernel that cannot start inside its limits: the create fails, and the log says so at INFO."""
    gw = Gateway(extra_args=["--log-level", "INFO"], env={"KERNELHUB_START_TIMEOUT": "20"})
    try:
        status, body = gw.request("POST", "/v1/sandboxes", {"template": "python", "limits": {"pids": 8}})
        assert status >= 400, body
        log = gw.log()
    finally:
        gw.stop()
    assert [line for line in log.splitlines() if "kernelhub.services]" in line and " failed: " in line], log
