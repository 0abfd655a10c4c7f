"""(being written)"""

from __future__ import annotations

from typing import Any

default_handlers: list[Any] = []
