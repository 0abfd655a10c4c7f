"""The server name (SNI) that a TLS ClientHello asks for, read from the first bytes of a CONNECT tunnel.

The proxy reads the client's first flight before it forwards a byte, and lets the tunnel through only when
the ClientHello names the host the ``CONNECT`` asked for: a sandbox allowed ``pypi.org`` cannot open a tunnel
there and then ask a shared front end for another site (domain fronting), and a tunnel carries TLS only.

Why a parser of our own, not a library: no well-kept Python package reads a ClientHello without a TLS stack.
The standard library's ``ssl`` can be driven as a server over a ``MemoryBIO`` with an ``sni_callback``, which
works, but it refuses TLS 1.0/1.1 hellos before the callback, and a non-ASCII name makes CPython print an
"unraisable" traceback from C for every such connection. The format is small and fixed (RFC 8446 4.1.2 and
RFC 6066 3); this reader is strict (every length checked, a duplicate extension or a second host name
refused) and the tests check it against OpenSSL's reading of real hellos.
"""

from __future__ import annotations

import dataclasses
import struct

#: The most the proxy buffers while waiting for a whole ClientHello (real ones are well under 4 KiB; post-
#: quantum key shares add about 1.2 KiB each).
MAX_CLIENT_HELLO = 64 * 1024
_HANDSHAKE = 22
_CLIENT_HELLO = 1
_SERVER_NAME = 0
_HOST_NAME = 0


class NotClientHello(ValueError):
    """The bytes are not (the start of) a well-formed TLS ClientHello. The message is a sentence."""


@dataclasses.dataclass(frozen=True)
class ClientHello:
    """What the proxy needs from a ClientHello: the SNI host name as sent (ASCII), or ``None`` without one."""

    server_name: str | None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise NotClientHello("The TLS ClientHello is truncated or its lengths do not add up.")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack("!H", self.take(2))[0]
        return value

    def vector(self, length_bytes: int) -> bytes:
        n = self.u8() if length_bytes == 1 else self.u16()
        return self.take(n)

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


class ClientHelloBuffer:
    """The tunnel's first bytes, fed as they arrive, until they hold a whole ClientHello.

    Incremental, so a client that sends one byte at a time costs work in proportion to what it sent. ``data``
    is everything fed so far, which the proxy forwards once the hello passes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._pos = 0  # the first record not yet read
        self._handshake = bytearray()

    def feed(self, chunk: bytes) -> ClientHello | None:
        """Add ``chunk``; return the :class:`ClientHello` once it is whole, ``None`` while more is needed.
        Raises :class:`NotClientHello` (a sentence) for anything else: another protocol, SSLv2, a malformed
        hello, a duplicate extension, several or empty host names, a name that is not ASCII, or more than
        :data:`MAX_CLIENT_HELLO` bytes. Records after the hello (early data) are not looked at."""
        self.data += chunk
        handshake = self._handshake
        while True:
            if len(handshake) >= 4:
                if handshake[0] != _CLIENT_HELLO:
                    raise NotClientHello("The first TLS handshake message is not a ClientHello.")
                length = int.from_bytes(handshake[1:4], "big")
                if length > MAX_CLIENT_HELLO:
                    raise NotClientHello(f"The TLS ClientHello is larger than {MAX_CLIENT_HELLO} bytes.")
                if len(handshake) >= 4 + length:
                    return _parse_body(bytes(handshake[4:4 + length]))
            if len(self.data) > MAX_CLIENT_HELLO + 5:
                raise NotClientHello(f"The TLS ClientHello is larger than {MAX_CLIENT_HELLO} bytes.")
            pos = self._pos
            if len(self.data) - pos < 5:
                return None
            kind, major, minor = self.data[pos], self.data[pos + 1], self.data[pos + 2]
            length = struct.unpack("!H", self.data[pos + 3:pos + 5])[0]
            if kind != _HANDSHAKE or major != 3 or minor > 4:
                raise NotClientHello("The tunnel did not start with a TLS handshake; CONNECT carries TLS only.")
            if length == 0 or length > 16384:
                raise NotClientHello("A TLS record at the start of the tunnel has an impossible length.")
            if len(self.data) - pos - 5 < length:
                return None
            handshake += self.data[pos + 5:pos + 5 + length]
            self._pos = pos + 5 + length


def parse_client_hello(data: bytes) -> ClientHello | None:
    """:meth:`ClientHelloBuffer.feed` on all of ``data`` at once (the same answers and errors)."""
    return ClientHelloBuffer().feed(data)


def _parse_body(message: bytes) -> ClientHello:
    body = _Reader(message)
    body.take(2 + 32)  # legacy_version, random
    if len(body.vector(1)) > 32:
        raise NotClientHello("The TLS ClientHello has a session id longer than 32 bytes.")
    suites = body.vector(2)
    if not suites or len(suites) % 2:
        raise NotClientHello("The TLS ClientHello has a malformed cipher suite list.")
    if not body.vector(1):
        raise NotClientHello("The TLS ClientHello offers no compression method.")
    if body.left == 0:
        return ClientHello(None)
    extensions = _Reader(body.vector(2))
    if body.left:
        raise NotClientHello("The TLS ClientHello has bytes after its extensions.")
    seen: set[int] = set()
    name: str | None = None
    while extensions.left:
        kind = extensions.u16()
        payload = extensions.vector(2)
        if kind in seen:
            raise NotClientHello("The TLS ClientHello repeats an extension.")
        seen.add(kind)
        if kind == _SERVER_NAME:
            name = _server_name(payload)
    return ClientHello(name)


def _server_name(payload: bytes) -> str:
    outer = _Reader(payload)
    names = _Reader(outer.vector(2))
    if outer.left:
        raise NotClientHello("The TLS server_name extension has bytes after its list.")
    found: str | None = None
    while names.left:
        kind = names.u8()
        raw = names.vector(2)
        if kind != _HOST_NAME:
            raise NotClientHello("The TLS server_name extension holds a name of an unknown type.")
        if found is not None:
            raise NotClientHello("The TLS server_name extension holds more than one host name.")
        if not raw or not raw.isascii():
            raise NotClientHello("The TLS server name is empty or not ASCII.")
        found = raw.decode("ascii")
    if found is None:
        raise NotClientHello("The TLS server_name extension is empty.")
    return found
