"""Untrusted JSON in: the one parser every surface uses for what clients send, and the check for decoded values
that reach the services some other way (MCP arguments, parsed by the SDK).

:func:`loads` turns bytes or text from a client into a Python value or an :class:`~kernelhub.errors.InvalidRequest`
with a sentence, never another exception. Besides text that is not JSON (or not UTF-8), it refuses what
Python's :func:`json.loads` would accept but the rest of the gateway cannot carry:

- ``NaN``, ``Infinity`` and numbers that overflow a double (``1e999`` becomes ``inf``): not JSON (RFC 8259
  section 6), and an answer echoing them would not be JSON either;
- strings holding a lone UTF-16 surrogate (``"\\ud800"``): JSON's syntax allows the escape, but the string is not
  Unicode text, cannot be encoded as UTF-8 and so cannot be written to a kernel, a file name or an answer;
- nesting deeper than :data:`MAX_DEPTH`: ``json.loads`` of 100,000 ``[`` raises ``RecursionError``, and a value
  only a little less deep parses but cannot be serialized again from inside a handler's deeper stack;
- integers beyond a signed 64-bit range (:data:`MAX_INTEGER`): no field means such a number, a float of one
  overflows, and one of more than 4300 digits could not even be printed again (Python's ``int_max_str_digits``).

:func:`check_value` applies the same rules (depth, surrogates, finite numbers) to a value that is already decoded.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import InvalidRequest

#: Largest magnitude of an integer accepted (a signed 64-bit integer's).
MAX_INTEGER = 2**63 - 1
#: Deepest nesting of arrays and objects accepted (a sandbox's metadata is the deepest value any route keeps).
MAX_DEPTH = 64

# A \uD800-\uDFFF escape somewhere in the raw text: only then can a decoded string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:32]} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise ValueError(f"the integer {text[:24]}... is out of range")
    value = int(text)
    if abs(value) > MAX_INTEGER:
        raise ValueError(f"the integer {text} is out of range")
    return value


def loads(data: bytes | bytearray | str, what: str = "The body") -> Any:
    """Parse untrusted JSON (UTF-8 bytes, or text). ``what`` names it in the error, e.g. ``"A message"``.

    Raises :class:`~kernelhub.errors.InvalidRequest` for anything that is not one JSON value within the rules of
    the module docstring; never any other exception."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid UTF-8 (byte {exc.start}).") from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply; JSON values may nest at most {MAX_DEPTH} "
                             "levels.") from None
    except ValueError as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else "it cannot be parsed"
        raise InvalidRequest(f"{what} is not valid JSON: {reason}.") from None
    # Cheap tests on the raw text decide whether the decoded value needs walking at all.
    deep = raw.count(b"[") + raw.count(b"{") > MAX_DEPTH
    if deep or _SURROGATE_ESCAPE.search(raw):
        check_value(value, what)
    return value


def check_value(value: Any, what: str = "The value", *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse (``InvalidRequest``) a decoded JSON value nested deeper than ``max_depth``, holding a lone
    surrogate in a string or key, a float that is not finite or an integer beyond :data:`MAX_INTEGER`.
    Iterative: a value of any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise InvalidRequest(f"{what} holds a string with a lone UTF-16 surrogate (\\ud800-\\udfff), which "
                                     "is not Unicode text.")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidRequest(f"{what} holds a number that is not finite; NaN and Infinity are not JSON.")
        elif isinstance(item, int) and not isinstance(item, bool):
            if abs(item) > MAX_INTEGER:
                raise InvalidRequest(f"{what} holds an integer beyond the 64-bit range (at most {MAX_INTEGER}).")
        elif isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise InvalidRequest(f"{what} is nested too deeply; JSON values may nest at most {max_depth} "
                                     "levels.")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
