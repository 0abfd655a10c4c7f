"""The warm pool (kernelhub.services.pool) through a real gateway: pooled sandboxes are what cold ones would be,
hold nothing of anyone, refill, and never outlive their gateway into the next one.

Which sandboxes came from the pool is read from ``GET /v1/templates`` (``handed_out`` counts up for a pooled
create; the sandbox itself shows no trace of it), and a cold twin of the same request is forced with another
``disk_mb``, which the pool cannot serve.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from kernelhub.sandbox.factory import SandboxFactory
from kernelhub.sandbox.sandbox import can_raise_rlimits
from kernelhub.services.hub import Hub
from kernelhub.services.pool import STARTUP_ONLY_ENV
from kernelhub.settings import ConfigError
from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups, pytest.mark.slow]

SIZES = {"python": 2, "node": 1, "bash": 1}
# What the user sees of a sandbox from inside it, as a python kernel's first execution.
PY_PROBE = r"""
import json, os, resource, socket, sys
def tree(path):
    return sorted(os.listdir(path))
print(json.dumps({
    "count": len(In), "out": len(Out), "names": sorted(k for k in globals() if not k.startswith("_")),
    "env": {k: v for k, v in os.environ.items() if k not in ("HOSTNAME",)},
    "hostname": socket.gethostname(), "env_hostname": os.environ["HOSTNAME"],
    "uid": os.getuid(), "rlimits": [resource.getrlimit(r) for r in (resource.RLIMIT_NPROC, resource.RLIMIT_FSIZE,
                                                                   resource.RLIMIT_NOFILE, resource.RLIMIT_CORE)],
    "tmpfs": [os.statvfs(p).f_blocks * os.statvfs(p).f_frsize for p in ("/tmp", "/dev/shm")],
    "tmp": tree("/tmp"), "shm": tree("/dev/shm"), "home": tree(os.path.expanduser("~")),
    "workspace": tree("/workspace"), "cwd": os.getcwd(), "argv": sys.argv[1:2],
}))
"""
# The home is the workspace (an ext4 image sized by disk_mb), not a tmpfs: only /tmp and /dev/shm follow memory.
SHELL_PROBE = ("echo $FOO; hostname; ulimit -u -f -n; df --output=size -B1 /tmp /dev/shm | tail -n +2; "
               "ls -A /tmp /home/user /workspace; id -u")


@pytest.mark.parametrize("name", ["PYTHONPATH", "PYTHONHASHSEED", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TZ",
                                  "TMPDIR", "MALLOC_ARENA_MAX", "NODE_OPTIONS", "NODE_PATH", "BASH_ENV",
                                  "JUPYTER_PATH", "IPYTHONDIR"])
def test_variables_read_only_at_start_are_known(name: str) -> None:
    assert STARTUP_ONLY_ENV.match(name)


@pytest.mark.parametrize("name", ["FOO", "PATH", "MPLBACKEND", "OPENAI_API_KEY", "MY_PYTHONPATH", "LANGUAGE_MODEL",
                                  "HOMEPAGE", "MY_TZ", "NODE"])
def test_other_variables_are_handed_to_a_running_kernel(name: str) -> None:
    assert not STARTUP_ONLY_ENV.match(name)


@pytest.mark.parametrize(("config", "message"), [
    ({"sizes": {"nope": 1}}, "Pool.sizes names unknown template 'nope'"),
    ({"cpu_weight": 0}, "Pool.cpu_weight: a CPU weight is a whole number from 1 to 10000"),
])
def test_a_pool_configured_wrong_is_refused_by_name(config: dict[str, Any], message: str,
                                                    tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        Hub(SandboxFactory(state_dir=str(tmp_path)), config=Config({"Pool": config}))


@pytest.fixture(scope="module")
def pooled_gateway() -> Iterator[Gateway]:
    gw = Gateway(extra_args=["--pool-size", "2", f"--Pool.sizes={json.dumps(SIZES)}"])
    try:
        yield gw
    finally:
        gw.stop()
    # Every sandbox stopped with the gateway, the pooled ones included (it removes the state directory only
    # when nothing is mounted there any more).
    assert not os.path.exists(gw.state_dir), os.listdir(os.path.join(gw.state_dir, "sandboxes"))


def pool_state(gw: Gateway) -> dict[str, dict[str, int]]:
    status, body = gw.request("GET", "/v1/templates")
    assert status == 200, body
    return {t["name"]: t["pool"] for t in body["templates"]}


def wait_ready(gw: Gateway, template: str = "python", timeout: float = 180) -> dict[str, int]:
    """Wait until the template's pool is full again (the refill loop's work is the event waited on)."""
    deadline = time.monotonic() + timeout
    while True:
        state = pool_state(gw)[template]
        if state["ready"] == state["size"]:
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the {template} pool did not fill: {state}\n{gw.log()}")
        time.sleep(0.05)


def create(gw: Gateway, body: dict[str, Any], token: str | None = "default") -> dict[str, Any]:
    status, sandbox = gw.request("POST", "/v1/sandboxes", body, token=token)
    assert status == 201, sandbox
    return sandbox


def create_pooled(gw: Gateway, body: dict[str, Any], token: str | None = "default") -> dict[str, Any]:
    template = body.get("template", "python")
    before = wait_ready(gw, template)
    sandbox = create(gw, body, token)
    assert pool_state(gw)[template]["handed_out"] == before["handed_out"] + 1, "not served by the pool"
    return sandbox


def create_cold(gw: Gateway, body: dict[str, Any], token: str | None = "default") -> dict[str, Any]:
    template = body.get("template", "python")
    before = pool_state(gw)[template]["handed_out"]
    sandbox = create(gw, body, token)
    assert pool_state(gw)[template]["handed_out"] == before, "served by the pool"
    return sandbox


def execute(gw: Gateway, sandbox_id: str, code: str, token: str | None = "default") -> dict[str, Any]:
    status, ex = gw.request("POST", f"/v1/sandboxes/{sandbox_id}/execute", {"code": code}, token=token)
    assert status == 200 and ex["status"] == "ok", ex
    return dict(ex)


def command(gw: Gateway, sandbox_id: str, cmd: str, token: str | None = "default") -> str:
    status, out = gw.request("POST", f"/v1/sandboxes/{sandbox_id}/commands", {"command": cmd}, token=token)
    assert status == 200 and out["exit_code"] == 0, out
    return str(out["stdout"])


def host_uid(gw: Gateway, sandbox_id: str) -> int:
    with open(os.path.join(gw.state_dir, "sandboxes", sandbox_id, "uid")) as f:
        return int(f.read())


def cpu_shares(sandbox_id: str) -> str:
    with open(f"/sys/fs/cgroup/cpu/kernelhub/{sandbox_id}/cpu.shares") as f:
        return f.read().strip()


def delete(gw: Gateway, *sandbox_ids: str, token: str | None = "default") -> None:
    for sandbox_id in sandbox_ids:
        status, _ = gw.request("DELETE", f"/v1/sandboxes/{sandbox_id}", token=token)
        assert status == 204


def test_templates_show_each_pool(pooled_gateway: Gateway) -> None:
    for template, size in SIZES.items():
        state = wait_ready(pooled_gateway, template)
        assert state == {"ready": size, "starting": 0, "size": size, "handed_out": state["handed_out"]}
    status, body = pooled_gateway.request("GET", "/v1/templates")
    assert [t["name"] for t in body["templates"]] == ["python", "node", "bash"]
    assert set(body["templates"][0]) == {"name", "language", "limits", "network", "description", "pool"}


def test_pooled_and_cold_python_sandboxes_are_indistinguishable(pooled_gateway: Gateway) -> None:
    gw = pooled_gateway
    request = {"template": "python", "limits": {"memory_mb": 256, "cpu": 0.5, "pids": 64, "max_file_mb": 5},
               "env": {"FOO": "bar", "PATH": "/usr/bin:/bin"}, "metadata": {"who": "me"}}
    started = time.time()
    pooled = create_pooled(gw, request)
    cold = create_cold(gw, {**request, "limits": {**request["limits"], "disk_mb": 512}})
    try:
        # The API shows the same sandbox (no trace of the pool: created now, the request's limits, one session).
        for sandbox in (pooled, cold):
            assert sandbox["state"] == "running" and sandbox["metadata"] == {"who": "me"}
            assert sandbox["created_at"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
            assert [s["type"] for s in sandbox["sessions"]] == ["jupyter"]
        assert set(pooled) == set(cold)
        assert pooled["limits"] == {**cold["limits"], "disk_mb": 1024}
        assert gw.request("GET", f"/v1/sandboxes/{pooled['id']}")[1]["created_at"] == pooled["created_at"]

        seen = {}
        for sandbox in (pooled, cold):
            ex = execute(gw, sandbox["id"], PY_PROBE)
            assert ex["execution_count"] == 1  # nothing ran in the kernel but the readiness handshake
            seen[sandbox["id"]] = json.loads(ex["stdout"])
        p, c = seen[pooled["id"]], seen[cold["id"]]
        assert p["hostname"] == p["env_hostname"] == f"sandbox-{pooled['id']}"
        assert c["hostname"] == f"sandbox-{cold['id']}"
        for key in ("hostname", "env_hostname"):
            p.pop(key), c.pop(key)
        assert p == c
        assert p["count"] == 2 and p["out"] == 0
        assert set(p["names"]) - {"json", "os", "resource", "socket", "sys", "tree"} == {
            "In", "Out", "exit", "get_ipython", "open", "quit"}, p["names"]
        assert p["env"]["FOO"] == "bar" and p["env"]["PATH"] == "/usr/bin:/bin"
        assert p["rlimits"] == [[64, 64], [5 * 2**20, 5 * 2**20], [4096, 4096], [0, 0]]
        assert p["tmpfs"] == [64 * 2**20, 32 * 2**20]
        # /tmp holds the kernel's IPython directory (IPYTHONDIR), as a cold one's does; nothing else anywhere.
        assert p["tmp"] == c["tmp"] and p["shm"] == p["workspace"] == [] and p["home"] == c["home"]

        out_p = command(gw, pooled["id"], SHELL_PROBE).replace(pooled["id"], "ID")
        out_c = command(gw, cold["id"], SHELL_PROBE).replace(cold["id"], "ID")
        assert out_p == out_c and out_p.startswith("bar\nsandbox-ID\n"), (out_p, out_c)

        metrics = [gw.request("GET", f"/v1/sandboxes/{s['id']}/metrics")[1] for s in (pooled, cold)]
        assert [m["memory_limit_bytes"] for m in metrics] == [256 * 2**20] * 2
        assert [m["pids_limit"] for m in metrics] == [64, 64]
        # Live again: the low CPU weight it waited in the pool with is gone.
        assert cpu_shares(pooled["id"]) == cpu_shares(cold["id"]) == "1024"
        assert host_uid(gw, pooled["id"]) != host_uid(gw, cold["id"])
    finally:
        delete(gw, pooled["id"], cold["id"])


@pytest.mark.parametrize(("template", "count_code", "show", "env_pooled"), [
    # tslab counts even silent requests, so env that its kernel lacks takes the cold path.
    ("node", "1", "console.log(process.env.FOO)", False),
    ("bash", "true", "echo $FOO", True),
])
def test_pooled_node_and_bash_sandboxes_start_their_count_at_one(pooled_gateway: Gateway, template: str,
                                                                  count_code: str, show: str,
                                                                  env_pooled: bool) -> None:
    gw = pooled_gateway
    request = {"template": template, "env": {"FOO": f"for {template}"}}
    with_env = create_pooled(gw, request) if env_pooled else create_cold(gw, request)
    pooled = create_pooled(gw, {"template": template})
    cold = create_cold(gw, {"template": template, "limits": {"disk_mb": 512}})
    try:
        for sandbox in (with_env, pooled, cold):
            assert execute(gw, sandbox["id"], count_code)["execution_count"] == 1
        assert execute(gw, with_env["id"], show)["stdout"].strip() == f"for {template}"
        assert command(gw, with_env["id"], "echo $FOO").strip() == f"for {template}"
        out_p = command(gw, pooled["id"], SHELL_PROBE).replace(pooled["id"], "ID")
        out_c = command(gw, cold["id"], SHELL_PROBE).replace(cold["id"], "ID")
        assert out_p == out_c, (out_p, out_c)
    finally:
        delete(gw, with_env["id"], pooled["id"], cold["id"])


def test_env_reaches_every_later_process_of_a_pooled_sandbox(pooled_gateway: Gateway) -> None:
    gw = pooled_gateway
    pooled = create_pooled(gw, {"env": {"FOO": "everywhere"}})
    try:
        code = ("import subprocess, os\nprint(os.environ['FOO'])\n"
                "print(subprocess.run(['sh', '-c', 'echo $FOO'], capture_output=True, text=True).stdout.strip())")
        assert execute(gw, pooled["id"], code)["stdout"].split() == ["everywhere", "everywhere"]
        status, session = gw.request("POST", f"/v1/sandboxes/{pooled['id']}/sessions",
                                     {"type": "jupyter", "language": "bash"})
        assert status == 201, session
        status, ex = gw.request("POST", f"/v1/sessions/{session['id']}/execute", {"input": "echo $FOO"})
        assert status == 200 and ex["stdout"].strip() == "everywhere", ex
    finally:
        delete(gw, pooled["id"])


def test_what_the_pool_cannot_serve_takes_the_cold_path(pooled_gateway: Gateway) -> None:
    gw = pooled_gateway
    wait_ready(gw)
    made = [
        # Read by the interpreter only while it starts: only a kernel started with it has it on sys.path.
        create_cold(gw, {"env": {"PYTHONPATH": "/opt/elsewhere"}}),
        create_cold(gw, {"limits": {"files": 5000}}),
        create_cold(gw, {"env": {"LC_ALL": "C"}}),
    ]
    # More pids than the template's: its nproc rlimit could only be raised with CAP_SYS_RESOURCE.
    made.append((create_pooled if can_raise_rlimits() else create_cold)(gw, {"limits": {"pids": 256}}))
    try:
        out = execute(gw, made[0]["id"], "import sys; print('/opt/elsewhere' in sys.path)")["stdout"]
        assert out.strip() == "True"
        assert execute(gw, made[2]["id"], "import locale; print(locale.setlocale(locale.LC_ALL))")["stdout"] == "C\n"
        assert command(gw, made[3]["id"], "ulimit -u").strip() == "256"
    finally:
        delete(gw, *(s["id"] for s in made))
    # The Jupyter API's TypeScript runs on the node template, whose pooled kernel is JavaScript.
    wait_ready(gw, "node")
    status, kernel = gw.request("POST", "/api/kernels", {"name": "kernelhub-typescript"})
    assert status == 201, kernel
    try:
        assert pool_state(gw)["node"]["ready"] == 1
    finally:
        assert gw.request("DELETE", f"/api/kernels/{kernel['id']}")[0] == 204


def test_a_pooled_sandbox_for_bob_holds_nothing_of_alice(pooled_gateway: Gateway) -> None:
    gw = pooled_gateway
    alice = create_pooled(gw, {"env": {"SECRET": "alice's"}})
    execute(gw, alice["id"], "secret = 42\nopen('/workspace/a.txt', 'w').write('a')\n"
                             "open('/tmp/a.txt', 'w').write('a')\nimport os\n"
                             "open(os.path.expanduser('~/a.txt'), 'w').write('a')")
    alice_uid = host_uid(gw, alice["id"])
    delete(gw, alice["id"])
    bob = create_pooled(gw, {}, token=gw.other_token)
    try:
        assert bob["id"] != alice["id"]
        assert gw.request("GET", f"/v1/sandboxes/{bob['id']}")[0] == 404  # alice's key
        status, listing = gw.request("GET", "/v1/sandboxes", token=gw.other_token)
        assert [s["id"] for s in listing["sandboxes"]] == [bob["id"]]
        # /tmp holds only bob's own kernel's IPython directory (IPYTHONDIR); the home is the workspace.
        code = ("import os\nprint('secret' in globals(), os.environ.get('SECRET'), os.listdir('/workspace'), "
                "os.listdir('/tmp'), 'a.txt' in os.listdir(os.path.expanduser('~')))")
        out = execute(gw, bob["id"], code, token=gw.other_token)["stdout"]
        assert out.strip() == "False None [] ['.ipython'] False"
        assert host_uid(gw, bob["id"]) != alice_uid
    finally:
        delete(gw, bob["id"], token=gw.other_token)


def test_the_pool_refills_after_a_burst(pooled_gateway: Gateway) -> None:
    gw = pooled_gateway
    before = wait_ready(gw)
    taken = [create(gw, {}) for _ in range(3)]
    try:
        state = pool_state(gw)["python"]
        assert state["handed_out"] == before["handed_out"] + 2  # two were ready; the third was made cold
        after = wait_ready(gw)
        assert after["ready"] == 2 and after["starting"] == 0
        # Three sandboxes of their own, and two more waiting: none handed out twice.
        assert len({s["id"] for s in taken}) == 3
        waiting = set(os.listdir(os.path.join(gw.state_dir, "sandboxes"))) - {s["id"] for s in taken}
        assert len(waiting) >= 2
    finally:
        delete(gw, *(s["id"] for s in taken))


def pooled_ids(gw: Gateway) -> set[str]:
    """Sandboxes of the gateway that belong to no tenant: the pool's."""
    owned = {s["id"] for token in (gw.token, gw.other_token)
             for s in gw.request("GET", "/v1/sandboxes", token=token)[1]["sandboxes"]}
    return set(os.listdir(os.path.join(gw.state_dir, "sandboxes"))) - owned


def test_a_pooled_sandbox_whose_kernel_died_is_never_handed_out(pooled_gateway: Gateway) -> None:
    gw = pooled_gateway
    for template in SIZES:
        wait_ready(gw, template)
    killed = 0
    before_ids = set()
    for sandbox_id in pooled_ids(gw):
        with open(f"/sys/fs/cgroup/pids/kernelhub/{sandbox_id}/cgroup.procs") as f:
            pids = f.read().split()
        for pid in pids:
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ipykernel_launch.py" in f.read():
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
                    before_ids.add(sandbox_id)
    assert killed == SIZES["python"]
    # The pool sees its kernels die, drops those sandboxes and starts others.
    deadline = time.monotonic() + 60
    while pooled_ids(gw) & before_ids:
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)
    sandbox = create(gw, {})
    try:
        assert sandbox["id"] not in before_ids
        assert execute(gw, sandbox["id"], "print(6 * 7)")["stdout"] == "42\n"
        assert "restarted" not in " ".join(gw.request("GET", f"/v1/sandboxes/{sandbox['id']}/logs")[1]["lines"])
    finally:
        delete(gw, sandbox["id"])


def test_pool_size_zero_and_memory_pressure_keep_the_pool_empty() -> None:
    # KERNELHUB_POOL_SIZE=0 turns python's pool off; bash's would be 1 but the memory floor is never reached.
    gw = Gateway(extra_args=['--Pool.sizes={"bash": 1}', "--Pool.min_free_mb=100000000"],
                 env={"KERNELHUB_POOL_SIZE": "0"})
    try:
        deadline = time.monotonic() + 60
        while "pool refilling paused" not in gw.log():
            assert time.monotonic() < deadline, gw.log()
            time.sleep(0.05)
        state = pool_state(gw)
        assert state["python"] == {"ready": 0, "starting": 0, "size": 0, "handed_out": 0}
        assert state["bash"] == {"ready": 0, "starting": 0, "size": 1, "handed_out": 0}
        sandbox = create(gw, {})
        assert execute(gw, sandbox["id"], "print(1)")["stdout"] == "1\n"
        assert pool_state(gw)["python"]["handed_out"] == 0
        assert sorted(os.listdir(os.path.join(gw.state_dir, "sandboxes"))) == [sandbox["id"]]
    finally:
        gw.stop()


def test_a_restarted_gateway_never_hands_out_the_pool_of_the_one_before() -> None:
    first = Gateway(extra_args=["--pool-size", "2"])
    state_dir = first.state_dir
    try:
        wait_ready(first)
        pooled_before = set(os.listdir(os.path.join(state_dir, "sandboxes")))
        assert len(pooled_before) == 2
    finally:
        first.crash()
    second = Gateway(extra_args=["--pool-size", "2"], state_dir=state_dir)
    try:
        assert "removed 2 sandboxes left by a process that died" in second.log()
        sandbox = create_pooled(second, {})
        assert sandbox["id"] not in pooled_before
        left = set(os.listdir(os.path.join(state_dir, "sandboxes")))
        assert not left & pooled_before
        assert not any(os.path.exists(f"/sys/fs/cgroup/memory/kernelhub/{old}") for old in pooled_before)
        delete(second, sandbox["id"])
    finally:
        second.stop()
