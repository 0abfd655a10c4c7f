"""The ClientHello reader: real hellos from OpenSSL (checked against OpenSSL's own reading of them), fed whole
or a byte at a time, and hand-made hostile ones."""

from __future__ import annotations

import ssl
import struct

import pytest

from kernelhub.services.egress.tls import MAX_CLIENT_HELLO, ClientHelloBuffer, NotClientHello, parse_client_hello


def openssl_hello(server_name: str | None, *, tls13: bool = True, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real TLS client (Python's ssl, i.e. OpenSSL)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    client = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def openssl_reads(hello: bytes) -> str | None:
    """The server name OpenSSL's server side reads from ``hello`` (through ``sni_callback``)."""
    seen: list[str | None] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def callback(obj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> int:
        seen.append(name)
        return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE

    ctx.sni_callback = callback  # type: ignore[assignment]
    incoming = ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
    incoming.write(hello)
    with pytest.raises(ssl.SSLError):
        server.do_handshake()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("name", ["example.com", "svc.test", "Mixed.Case.Example.", "xn--bcher-kva.de",
                                  "a" * 63 + ".example", "localhost", None])
@pytest.mark.parametrize("tls13", [True, False])
def test_real_hellos_agree_with_openssl(name: str | None, tls13: bool) -> None:
    hello = openssl_hello(name, tls13=tls13, alpn=["h2", "http/1.1"])
    parsed = parse_client_hello(hello)
    assert parsed is not None
    assert parsed.server_name == name == openssl_reads(hello)


def test_a_byte_at_a_time() -> None:
    hello = openssl_hello("svc.test")
    buffer = ClientHelloBuffer()
    answers = [buffer.feed(hello[i:i + 1]) for i in range(len(hello))]
    assert answers[:-1] == [None] * (len(hello) - 1)
    assert answers[-1] is not None and answers[-1].server_name == "svc.test"
    assert bytes(buffer.data) == hello


# -- hand-made hellos -------------------------------------------------------------------------------------------

def ext(kind: int, payload: bytes) -> bytes:
    return struct.pack("!HH", kind, len(payload)) + payload


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def hello(extensions: bytes | None, *, session_id: bytes = b"", suites: bytes = b"\x13\x01",
          compression: bytes = b"\x00", trailing: bytes = b"") -> bytes:
    body = b"\x03\x03" + b"\x11" * 32 + bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites + bytes([len(compression)]) + compression
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return b"\x01" + len(body + trailing).to_bytes(3, "big") + body + trailing


def records(handshake: bytes, size: int = 16384, kind: int = 22, version: bytes = b"\x03\x01") -> bytes:
    out = b""
    for i in range(0, len(handshake), size):
        part = handshake[i:i + size]
        out += bytes([kind]) + version + struct.pack("!H", len(part)) + part
    return out


def test_hand_made_hellos_read() -> None:
    assert parse_client_hello(records(hello(sni(b"svc.test")))).server_name == "svc.test"  # type: ignore[union-attr]
    assert parse_client_hello(records(hello(None))).server_name is None  # type: ignore[union-attr]
    assert parse_client_hello(records(hello(ext(16, b"\x00\x03\x02h2")))).server_name is None  # type: ignore[union-attr]
    # One hello split over many records, and early data after it that is not looked at.
    split = records(hello(ext(16, b"\x00\x03\x02h2") + sni(b"svc.test")), size=7)
    assert parse_client_hello(split + b"\x17\x03\x03\x00\x05hello").server_name == "svc.test"  # type: ignore[union-attr]


@pytest.mark.parametrize("data, message", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "CONNECT carries TLS only"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "CONNECT carries TLS only"),
    (b"\x80\x2e\x01\x00\x02" + b"\x00" * 45, "CONNECT carries TLS only"),               # SSLv2 hello
    (records(hello(sni(b"svc.test")), kind=23), "CONNECT carries TLS only"),          # application data
    (records(hello(sni(b"svc.test")), version=b"\x02\x00"), "CONNECT carries TLS only"),
    (b"\x16\x03\x01\x00\x00", "impossible length"),
    (b"\x16\x03\x01\x50\x00", "impossible length"),
    (records(b"\x02" + hello(sni(b"svc.test"))[1:]), "not a ClientHello"),           # a ServerHello
    (records(hello(sni(b"a.test") + sni(b"b.test"))), "repeats an extension"),
    (records(hello(sni(b"a.test", b"b.test"))), "more than one host name"),
    (records(hello(sni(b"a.test", name_type=1))), "unknown type"),
    (records(hello(sni())), "extension is empty"),
    (records(hello(sni(b""))), "empty or not ASCII"),
    (records(hello(sni("bücher.de".encode()))), "empty or not ASCII"),
    (records(hello(sni(b"\xff" * 8))), "empty or not ASCII"),
    (records(hello(ext(0, b"\x00\x0b\x00\x00\x08svc.test\x00"))), "bytes after its list"),
    (records(hello(sni(b"svc.test"), trailing=b"\x00")), "bytes after its extensions"),
    (records(hello(sni(b"svc.test"), session_id=b"\x00" * 33)), "session id longer than 32"),
    (records(hello(sni(b"svc.test"), suites=b"")), "cipher suite list"),
    (records(hello(sni(b"svc.test"), suites=b"\x13")), "cipher suite list"),
    (records(hello(sni(b"svc.test"), compression=b"")), "no compression method"),
    (records(b"\x01\x00\x00\x28" + b"\x03\x03" + b"\x00" * 32 + b"\x20" + b"\x00" * 5), "truncated"),
    (records(b"\x01" + (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")), "larger than"),
])
def test_hostile_hellos_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(NotClientHello) as info:
        parse_client_hello(data)
    assert message in str(info.value)


def test_a_hello_that_never_ends_is_bounded() -> None:
    buffer = ClientHelloBuffer()
    head = b"\x01" + MAX_CLIENT_HELLO.to_bytes(3, "big")
    assert buffer.feed(records(head + b"\x00" * 100)) is None
    with pytest.raises(NotClientHello, match="larger than"):
        for _ in range(100):
            buffer.feed(b"\x16\x03\x01\x03\xe8" + b"\x00" * 1000)  # 1000-byte records, never whole


def test_partial_input_waits() -> None:
    data = records(hello(sni(b"svc.test")))
    for cut in (0, 1, 4, 5, 9, len(data) - 1):
        assert parse_client_hello(data[:cut]) is None
