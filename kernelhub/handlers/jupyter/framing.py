"""The Jupyter websocket's two framings, as pure functions (copied from
``jupyter_server.services.kernels.connection.base``, which the runtime does not depend on; the formats are
Jupyter's, not ours, and ``tests/handlers/test_jupyter.py`` checks them byte for byte against Jupyter Server's):

- the legacy one: a JSON text message per Jupyter message with a ``"channel"`` key, or, when the message has
  buffers, a binary frame (:func:`serialize_binary_message`): a count of parts, their offsets, the JSON message,
  then its buffers;
- ``v1.kernel.websocket.jupyter.org`` (:func:`serialize_msg_to_ws_v1`): 8-byte little-endian offsets, the channel
  name, then the message's parts as the kernel sent them.

A client's frame is untrusted: a count or an offset it makes up must not make the gateway allocate or loop on its
say-so, so the readers check them and raise :class:`ValueError` for a frame that is not one.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from jupyter_client.jsonutil import extract_dates, json_default

__all__ = ["WS_V1", "deserialize_binary_message", "deserialize_msg_from_ws_v1", "serialize_binary_message",
           "serialize_msg_to_ws_v1"]

WS_V1 = "v1.kernel.websocket.jupyter.org"


def serialize_binary_message(msg: dict[str, Any]) -> bytes:
    """Legacy binary framing: a count of parts, their offsets, the JSON message, then its buffers."""
    msg = msg.copy()
    buffers = list(msg.pop("buffers"))
    bmsg = json.dumps(msg, default=json_default).encode("utf8")
    buffers.insert(0, bmsg)
    nbufs = len(buffers)
    offsets = [4 * (nbufs + 1)]
    for buf in buffers[:-1]:
        offsets.append(offsets[-1] + len(buf))
    offsets_buf = struct.pack("!" + "I" * (nbufs + 1), nbufs, *offsets)
    buffers.insert(0, offsets_buf)
    return b"".join(buffers)


def _check_offsets(offsets: list[int], start: int, size: int) -> None:
    """The offsets of a binary frame must be ascending and within it."""
    if any(b < a for a, b in zip([start, *offsets], offsets, strict=False)) or (offsets and offsets[-1] > size):
        raise ValueError("the frame's offsets are not ascending within the frame")


def deserialize_binary_message(bmsg: bytes) -> dict[str, Any]:
    """Inverse of :func:`serialize_binary_message`; ValueError for a frame that is not one."""
    if len(bmsg) < 8:
        raise ValueError("a binary message has at least a count and one offset")
    nbufs = struct.unpack("!I", bmsg[:4])[0]
    if not 1 <= nbufs <= len(bmsg) // 4 - 1:
        raise ValueError(f"a binary message cannot hold {nbufs} parts")
    offsets: list[Any] = list(struct.unpack("!" + "I" * nbufs, bmsg[4: 4 * (nbufs + 1)]))
    _check_offsets(offsets, 4 * (nbufs + 1), len(bmsg))
    offsets.append(None)
    bufs = [bmsg[start:stop] for start, stop in zip(offsets[:-1], offsets[1:], strict=False)]
    msg = json.loads(bufs[0].decode("utf8"))
    if not isinstance(msg, dict) or not isinstance(msg.get("header"), dict):
        raise ValueError("a message is a JSON object with a header")
    msg["header"] = extract_dates(msg["header"])
    msg["parent_header"] = extract_dates(msg.get("parent_header") or {})
    msg["buffers"] = bufs[1:]
    return msg


def serialize_msg_to_ws_v1(msg_list: list[bytes], channel: str) -> bytes:
    """v1 framing: 8-byte little-endian offset count and offsets, the channel name, then the message's parts
    (header, parent_header, metadata, content, buffers...) as the kernel sent them."""
    channel_b = channel.encode("utf-8")
    offsets = [8 * (1 + 1 + len(msg_list) + 1)]
    offsets.append(len(channel_b) + offsets[-1])
    for part in msg_list:
        offsets.append(len(part) + offsets[-1])
    head = len(offsets).to_bytes(8, byteorder="little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return b"".join([head, channel_b, *msg_list])


def deserialize_msg_from_ws_v1(ws_msg: bytes) -> tuple[str, list[bytes]]:
    """Inverse of :func:`serialize_msg_to_ws_v1`: the channel and the message's parts; ValueError for a frame
    that is not one."""
    offset_number = int.from_bytes(ws_msg[:8], "little")
    if not 2 <= offset_number <= len(ws_msg) // 8 - 1:
        raise ValueError(f"a v1 message cannot hold {offset_number} offsets")
    offsets = [int.from_bytes(ws_msg[8 * (i + 1): 8 * (i + 2)], "little") for i in range(offset_number)]
    _check_offsets(offsets, 8 * (offset_number + 1), len(ws_msg))
    channel = ws_msg[offsets[0]: offsets[1]].decode("utf-8")
    msg_list = [ws_msg[offsets[i]: offsets[i + 1]] for i in range(1, offset_number - 1)]
    return channel, msg_list
