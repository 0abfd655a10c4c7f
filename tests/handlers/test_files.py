"""The file routes against a real gateway: binary round trips, a streamed 50 MB upload and download, listing
(paged, with cursors), deleting, paths that try to leave /workspace, symlinks planted by sandbox code,
max_file_mb, the disk quota, and a directory of 150,000 files that stalls no other tenant."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernelhub.testing import Gateway

pytestmark = [pytest.mark.root, pytest.mark.bwrap, pytest.mark.cgroups]

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def sandbox(sandboxes: Any) -> dict[str, Any]:
    return sandboxes("python")


@pytest.fixture(scope="module")
def small(sandboxes: Any) -> dict[str, Any]:
    """A sandbox with an 8 MiB workspace and 4 MiB files."""
    return sandboxes("python", limits={"disk_mb": 8, "max_file_mb": 4})


def files(sandbox: dict[str, Any], path: str = "") -> str:
    return f"/v1/sandboxes/{sandbox['id']}/files/{path}"


def command(gateway: Gateway, sandbox: dict[str, Any], script: str) -> dict[str, Any]:
    status, result = gateway.request("POST", f"/v1/sandboxes/{sandbox['id']}/commands", {"command": script})
    assert status == 200, result
    return result


def connection(gateway: Gateway) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)


def names(gateway: Gateway, sandbox: dict[str, Any], directory: str = "") -> list[str]:
    status, body = gateway.request("GET", files(sandbox, directory) + "?list=1")
    assert status == 200, body
    return sorted(e["name"] for e in body["entries"])


def test_binary_round_trip(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    content = bytes(range(256)) * 4
    status, body = gateway.request("PUT", files(sandbox, "bin/all-bytes.dat"), raw=content)
    assert status == 201 and body == {"path": "bin/all-bytes.dat", "size": len(content)}
    status, got = gateway.request("GET", files(sandbox, "bin/all-bytes.dat"))
    assert status == 200 and got == content
    # What the file API wrote is what code in the sandbox reads, and it may rewrite it: the file is its own.
    result = command(gateway, sandbox, "sha256sum bin/all-bytes.dat && test -O bin/all-bytes.dat && echo mine")
    assert result["stdout"].split() == [hashlib.sha256(content).hexdigest(), "bin/all-bytes.dat", "mine"]
    # An empty file and a name that needs URL encoding.
    status, body = gateway.request("PUT", files(sandbox, "bin/empty%20file.txt"), raw=b"")
    assert status == 201 and body == {"path": "bin/empty file.txt", "size": 0}
    assert gateway.request("GET", files(sandbox, "bin/empty%20file.txt")) == (200, b"")


def test_large_streamed_upload_and_download(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    chunk_count, chunk_size = 50, MiB
    digest = hashlib.sha256()
    seed = os.urandom(chunk_size)

    def body() -> Iterator[bytes]:
        for i in range(chunk_count):
            chunk = i.to_bytes(4, "big") + seed[4:]
            digest.update(chunk)
            yield chunk

    conn = connection(gateway)
    try:
        # Chunked transfer encoding: no Content-Length, the gateway streams it to disk as it comes.
        conn.request("PUT", files(sandbox, "big/blob.bin"), body=body(), encode_chunked=True,
                     headers={"Authorization": f"Bearer {gateway.token}"})
        resp = conn.getresponse()
        assert resp.status == 201, resp.read()
        assert json.loads(resp.read()) == {"path": "big/blob.bin", "size": chunk_count * chunk_size}

        conn.request("GET", files(sandbox, "big/blob.bin"), headers={"Authorization": f"Bearer {gateway.token}"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "application/octet-stream"
        assert int(resp.getheader("Content-Length")) == chunk_count * chunk_size
        downloaded = hashlib.sha256()
        size = 0
        while True:
            data = resp.read(256 * 1024)
            if not data:
                break
            downloaded.update(data)
            size += len(data)
        assert size == chunk_count * chunk_size
        assert downloaded.hexdigest() == digest.hexdigest()
    finally:
        conn.close()
    assert gateway.request("DELETE", files(sandbox, "big"))[0] == 204


def test_a_download_the_client_leaves_midway_closes_the_file(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    size = 64 * MiB  # more than the socket buffers hold: the gateway waits on the client mid-file
    assert command(gateway, sandbox, f"head -c {size} /dev/zero > gone.bin")["exit_code"] == 0
    target = os.path.join(gateway.state_dir, "sandboxes", sandbox["id"], "workspace", "gone.bin")

    def gateway_holds_it() -> bool:
        for fd in os.listdir(f"/proc/{gateway.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{gateway.proc.pid}/fd/{fd}") == target:
                    return True
        return False

    client = socket.create_connection(("127.0.0.1", gateway.port), timeout=60)
    try:
        client.sendall(f"GET {files(sandbox, 'gone.bin')} HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {gateway.token}\r\n\r\n".encode())
        received = b""
        while len(received) < MiB:
            data = client.recv(256 * 1024)
            assert data, received[:200]
            received += data
        assert received.startswith(b"HTTP/1.1 200") and f"Content-Length: {size}".encode() in received
        assert gateway_holds_it()
    finally:
        client.close()  # gone, with most of the file unread
    deadline = time.monotonic() + 30
    while gateway_holds_it():
        assert time.monotonic() < deadline, "the gateway still holds the file of a download nobody reads"
        time.sleep(0.01)
    assert gateway.request("GET", files(sandbox, "?list=1"))[0] == 200  # and it carries on


def test_list_and_delete(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    for path in ("tree/a.txt", "tree/sub/b.txt"):
        assert gateway.request("PUT", files(sandbox, path), raw=b"12345")[0] == 201
    assert "tree" in names(gateway, sandbox)
    # The root, with and without the trailing slash and ?list=1.
    for path in (f"/v1/sandboxes/{sandbox['id']}/files?list=1", f"/v1/sandboxes/{sandbox['id']}/files/?list=1",
                 f"/v1/sandboxes/{sandbox['id']}/files"):
        status, body = gateway.request("GET", path)
        assert status == 200 and "tree" in [e["name"] for e in body["entries"]], path
    for path in ("tree?list=1", "tree/?list=1"):
        status, body = gateway.request("GET", files(sandbox, path))
        assert status == 200
        entries = {e["name"]: e for e in body["entries"]}
        assert set(entries) == {"a.txt", "sub"}
        assert entries["a.txt"] == {**entries["a.txt"], "path": "tree/a.txt", "type": "file", "size": 5}
        assert entries["sub"]["type"] == "dir"
        assert entries["a.txt"]["modified"].endswith("Z")
    assert names(gateway, sandbox, "tree/sub") == ["b.txt"]
    # Delete a file, then a whole tree.
    assert gateway.request("DELETE", files(sandbox, "tree/a.txt")) == (204, b"")
    status, body = gateway.request("GET", files(sandbox, "tree/a.txt"))
    assert status == 404 and body["error"] == "not_found"
    assert gateway.request("DELETE", files(sandbox, "tree"))[0] == 204
    assert "tree" not in names(gateway, sandbox)
    status, body = gateway.request("DELETE", files(sandbox, "tree"))
    assert status == 404
    status, body = gateway.request("GET", files(sandbox, "nothing-here?list=1"))
    assert status == 404
    # The workspace itself cannot be deleted.
    status, body = gateway.request("DELETE", files(sandbox, ""))
    assert status == 400 and body["error"] == "invalid_request"


@pytest.mark.parametrize("path", [
    "../etc/passwd",
    "a/../../etc/passwd",
    "%2e%2e/etc/passwd",
    "%2e%2e%2fetc%2fpasswd",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "nul%00byte",
])
def test_paths_that_leave_the_workspace_are_refused(gateway: Gateway, sandbox: dict[str, Any], path: str) -> None:
    for method, raw in (("GET", None), ("PUT", b"owned"), ("DELETE", None)):
        status, body = gateway.request(method, files(sandbox, path), raw=raw)
        assert status in (400, 404), (method, path, status, body)
        assert body["error"] in ("invalid_request", "not_found") and body["message"]
    status, body = gateway.request("GET", files(sandbox, path) + ("&" if "?" in path else "?") + "list=1")
    assert status in (400, 404)
    with open("/etc/passwd", "rb") as f:
        assert b"owned" not in f.read()


def test_symlinks_planted_in_the_workspace_are_not_followed(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    command(gateway, sandbox, "ln -s /etc/passwd /workspace/p && ln -s /etc /workspace/etc-link "
                              "&& mkdir -p real && echo inside > real/f && ln -s real /workspace/inner")
    with open("/etc/passwd", "rb") as f:
        before = f.read()
    for path in ("p", "etc-link/passwd", "inner/f"):
        status, body = gateway.request("GET", files(sandbox, path))
        assert status in (400, 404), (path, status, body)
        assert isinstance(body, dict) and body["error"] in ("invalid_request", "not_found")
        status, body = gateway.request("PUT", files(sandbox, path), raw=b"owned\n")
        assert status in (400, 404), (path, status, body)
    status, body = gateway.request("GET", files(sandbox, "etc-link?list=1"))
    assert status in (400, 404)
    with open("/etc/passwd", "rb") as f:
        assert f.read() == before
    entries = {e["name"]: e["type"] for e in gateway.request("GET", files(sandbox, "?list=1"))[1]["entries"]}
    assert entries["p"] == "symlink" and entries["etc-link"] == "symlink"
    # Deleting the link removes the link, not its target.
    assert gateway.request("DELETE", files(sandbox, "p"))[0] == 204
    with open("/etc/passwd", "rb") as f:
        assert f.read() == before


def test_max_file_mb_is_refused_before_the_body(gateway: Gateway, small: dict[str, Any]) -> None:
    conn = connection(gateway)
    try:
        # Only the headers: the answer comes without the gateway reading (or the client sending) a body.
        conn.putrequest("PUT", files(small, "too-big.bin"))
        conn.putheader("Authorization", f"Bearer {gateway.token}")
        conn.putheader("Content-Length", str(5 * MiB))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        body = json.loads(resp.read())
        assert body["error"] == "payload_too_large" and "max_file_mb" in body["message"]
    finally:
        conn.close()
    # Without a Content-Length (chunked), the cap holds as the bytes arrive.
    conn = connection(gateway)
    try:
        conn.request("PUT", files(small, "too-big.bin"), body=iter([b"x" * MiB] * 5), encode_chunked=True,
                     headers={"Authorization": f"Bearer {gateway.token}"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"] == "payload_too_large"
    finally:
        conn.close()
    assert "too-big.bin" not in names(gateway, small)
    status, body = gateway.request("PUT", files(small, "fits.bin"), raw=b"y" * (4 * MiB))
    assert status == 201 and body["size"] == 4 * MiB
    assert gateway.request("DELETE", files(small, "fits.bin"))[0] == 204


def test_disk_quota_answers_507(gateway: Gateway, small: dict[str, Any]) -> None:
    stored = []
    status, body = 201, {}
    for i in range(4):  # 4 x 3 MiB into an 8 MiB workspace
        status, body = gateway.request("PUT", files(small, f"fill-{i}.bin"), raw=os.urandom(3 * MiB))
        if status != 201:
            break
        stored.append(f"fill-{i}.bin")
    assert status == 507, body
    assert body["error"] == "disk" and body["message"]
    assert len(stored) in (1, 2)
    # The partial file is gone; what fitted is intact; after a delete there is room again.
    assert names(gateway, small) == sorted(stored) or names(gateway, small) == sorted(stored + ["lost+found"])
    assert gateway.request("DELETE", files(small, stored[0]))[0] == 204
    status, body = gateway.request("PUT", files(small, "again.bin"), raw=b"z" * MiB)
    assert status == 201


def list_page(gateway: Gateway, sandbox: dict[str, Any], directory: str = "", token: str | None = "default",
              **query: Any) -> tuple[int, Any]:
    qs = "&".join(f"{k}={v}" for k, v in {"list": 1, **query}.items())
    return gateway.request("GET", files(sandbox, directory) + "?" + qs, token=token)


def test_file_list_pages_with_an_opaque_cursor(gateway: Gateway, sandbox: dict[str, Any],
                                              small: dict[str, Any]) -> None:
    command(gateway, sandbox, "mkdir -p paged/sub && cd paged && touch $(seq -f 'f%04g' 0 2499) "
            "&& touch sub/a && mkdir -p /workspace/other && touch /workspace/other/x")
    status, first = list_page(gateway, sandbox, "paged")
    assert status == 200 and len(first["entries"]) == 1000 and isinstance(first["next"], str)  # the default
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        status, page = list_page(gateway, sandbox, "paged", limit=700, **({"cursor": cursor} if cursor else {}))
        assert status == 200, page
        seen += [e["name"] for e in page["entries"]]
        pages += 1
        if pages == 2:
            # Changes between two pages: what was there throughout is listed exactly once.
            command(gateway, sandbox, "cd /workspace/paged && rm f0001 f2400 && touch f0000a zzz")
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 4 and seen == sorted(seen) and len(seen) == len(set(seen))
    expected = {f"f{i:04d}" for i in range(2500)} | {"sub"}
    assert expected - {"f0001", "f2400"} <= set(seen) and "zzz" in seen
    # The cursor is good for this sandbox and directory only, and cannot be forged.
    token = first["next"]
    for directory, box, cur in (("other", sandbox, token), ("paged", small, token),
                                ("paged", sandbox, token[:-2] + ("AA" if token[-2:] != "AA" else "BB")),
                                ("paged", sandbox, "not-a-cursor")):
        status, body = list_page(gateway, box, directory, cursor=cur)
        assert status == 400 and body["error"] == "invalid_request" and "cursor" in body["message"], body
    status, body = list_page(gateway, sandbox, "paged", token=gateway.other_token, cursor=token)
    assert status == 404, body  # another tenant learns nothing, not even that the sandbox exists
    for bad in ("0", "10001", "abc", "-5", "1.5"):
        status, body = list_page(gateway, sandbox, "paged", limit=bad)
        assert status == 400 and "limit" in body["message"], body
    status, body = list_page(gateway, sandbox, "", limit=1)  # the workspace root pages too
    assert status == 200 and len(body["entries"]) == 1 and body["next"]
    command(gateway, sandbox, "rm -rf /workspace/paged /workspace/other")


def test_file_list_pages_through_names_that_are_not_utf8(gateway: Gateway, sandbox: dict[str, Any]) -> None:
    # Three names shown alike ("caf\ufffd"): the cursor pages on the names' bytes, so each is listed once and
    # none is skipped, one a page.
    command(gateway, sandbox, "mkdir -p /workspace/latin && cd /workspace/latin && "
            "touch \"$(printf 'caf\\350')\" \"$(printf 'caf\\351')\" \"$(printf 'caf\\377')\" cafe")
    seen: list[str] = []
    cursor = None
    while True:
        status, page = list_page(gateway, sandbox, "latin", limit=1, **({"cursor": cursor} if cursor else {}))
        assert status == 200 and len(page["entries"]) == 1, page
        entry = page["entries"][0]
        seen.append(entry.get("url_path", entry["path"]))  # url_path: only for names that are not UTF-8
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ["latin/cafe", "latin/caf%E8", "latin/caf%E9", "latin/caf%FF"], seen
    command(gateway, sandbox, "rm -rf /workspace/latin")


def test_a_huge_directory_stalls_no_other_tenant(gateway: Gateway, sandboxes: Any) -> None:
    big = sandboxes("python", limits={"files": 160_000, "disk_mb": 1024})
    result = command(gateway, big, "python3 -c \"import os\nos.mkdir('huge')\nfor i in range(150000): "
                                   "open(f'huge/{i:06d}', 'w').close()\"")
    assert result["exit_code"] == 0, result
    latencies: list[float] = []

    def other_tenant_meanwhile(action: Any) -> Any:
        done = threading.Event()
        answer: list[Any] = []

        def run() -> None:
            answer.append(action())
            done.set()

        worker = threading.Thread(target=run)
        worker.start()
        while not done.is_set():
            started = time.monotonic()
            status, _ = gateway.request("GET", "/v1/sandboxes", token=gateway.other_token, timeout=30)
            assert status == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)
        worker.join()
        return answer[0]

    status, page = other_tenant_meanwhile(lambda: list_page(gateway, big, "huge", limit=10000))
    assert status == 200 and len(page["entries"]) == 10000 and page["entries"][-1]["name"] == "009999"
    status, page = other_tenant_meanwhile(lambda: list_page(gateway, big, "huge", limit=5, cursor=page["next"]))
    assert [e["name"] for e in page["entries"]] == [f"{i:06d}" for i in range(10000, 10005)]
    status, _ = other_tenant_meanwhile(lambda: gateway.request("DELETE", files(big, "huge"), timeout=300))
    assert status == 204
    assert latencies and max(latencies) < 1.0, sorted(latencies)[-5:]
