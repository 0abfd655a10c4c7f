"""What a sandbox can learn about its host, through a real gateway: no host path (the state directory, the
sandbox's own directory), no loop device name and no host uid in the mount table, the command lines, the
environments and the cgroups of any process inside. What cannot be hidden is listed in the README's table."""

from __future__ import annotations

import json
import re

import pytest

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

# Every process inside: its mount table, command line, environment and cgroups (all readable to the sandbox).
READ_ALL = r"""
import json, os
out = {}
for pid in sorted(os.listdir("/proc")):
    if not pid.isdigit():
        continue
    for name in ("mountinfo", "cmdline", "environ", "cgroup"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                out[f"{pid}/{name}"] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
print(json.dumps(out))
"""


def host_uid(gw: Gateway, sandbox_id: str) -> str:
    status, logs = gw.request("GET", f"/v1/sandboxes/{sandbox_id}/logs?lines=100")
    found = [m.group(1) for line in logs["lines"] for m in [re.search(r"as host uid (\d+)", line)] if m]
    assert found, logs
    return found[0]


def test_no_host_path_uid_or_device_inside(gateway: Gateway, gateway_sandbox: str) -> None:
    sid = gateway_sandbox
    uid = host_uid(gateway, sid)
    for how in ("command", "kernel"):
        if how == "command":
            status, body = gateway.request("POST", f"/v1/sandboxes/{sid}/commands",
                                           {"command": "python3 -", "stdin": READ_ALL})
            assert status == 200 and body["exit_code"] == 0, body
            seen = json.loads(body["stdout"])
        else:
            status, ex = gateway.request("POST", f"/v1/sandboxes/{sid}/execute", {"code": READ_ALL})
            assert status == 200 and ex["status"] == "ok", ex
            seen = json.loads(ex["stdout"])
        assert {"1/cmdline", "1/mountinfo", "2/cmdline", "1/cgroup"} <= set(seen), sorted(seen)
        for where, text in seen.items():
            assert gateway.state_dir not in text and "/sandboxes/" not in text, (where, text)
            assert not re.search(r"/dev/loop|\bloop\d", text), (where, text)
            assert "kernelhub-test" not in text and "/var/lib/kernelhub" not in text, (where, text)
            if not where.endswith("mountinfo"):
                # The uid= option of bwrap's own tmpfs mounts is the kernel's to print (see the README).
                assert not re.search(rf"\b{uid}\b", text), (where, text)
        mounts = seen["1/mountinfo"]
        assert " /workspace " in mounts and " - ext4 workspace " in mounts, mounts
        assert " kernelhub-run " in mounts
        assert re.match(r"\S*bwrap --args \d+ -- ", seen["1/cmdline"]), seen["1/cmdline"]
        assert "--bind" not in seen["1/cmdline"] and "--setenv" not in seen["1/cmdline"]
        assert sorted(seen["1/environ"].split()) == ["LC_ALL=C.UTF-8", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "PWD=/"]
        # The cgroup namespace starts at the sandbox's own cgroup: only "/" for every hierarchy it joined.
        assert all(line.rsplit(":", 1)[1] == "/" for line in seen["1/cgroup"].splitlines()
                   if line.split(":")[1] in ("memory", "pids", "cpu,cpuacct", "")), seen["1/cgroup"]
