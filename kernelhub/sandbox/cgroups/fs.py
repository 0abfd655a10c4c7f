"""Reading and writing cgroupfs files: one ``write(2)`` per value, absent files read as "not there"."""

from __future__ import annotations

import os

from .parsing import UNLIMITED, parse_keyed, parse_limit

__all__ = ["read", "read_int", "read_keyed", "read_limit", "write"]


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_int(path: str, default: int = 0) -> int:
    """An integer file, or ``default`` when the kernel lacks it (older kernel, controller not enabled)."""
    try:
        return int(read(path).strip())
    except FileNotFoundError:
        return default


def read_keyed(path: str, key: str) -> int:
    try:
        return parse_keyed(read(path)).get(key, 0)
    except FileNotFoundError:
        return 0


def read_limit(path: str) -> int:
    try:
        return parse_limit(read(path))
    except FileNotFoundError:
        return UNLIMITED


def write(path: str, value: str) -> None:
    # One write(2) per value: cgroupfs parses each write on its own, and an error (EINVAL, EBUSY) surfaces
    # here rather than at a buffered close.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)

