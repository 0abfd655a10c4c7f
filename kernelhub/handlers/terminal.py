from typing import Any

default_handlers: list[Any] = []
