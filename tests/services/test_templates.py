"""The templates config (``--Hub.extra_templates``): parsed into templates, bad entries refused with a sentence."""

from __future__ import annotations

from typing import Any

import pytest

from kernelhub.errors import InvalidRequest
from kernelhub.services.templates import Template, parse_templates


def test_parse_templates_reads_every_field() -> None:
    parsed = parse_templates({"data": {"language": "python", "limits": {"memory_mb": 256}, "env": {"MODE": "x"},
                                       "description": "Data work"}, "shell": {"language": "bash"}})
    assert parsed["data"] == Template("data", "python", {"memory_mb": 256}, "none", {"MODE": "x"}, "Data work")
    assert parsed["shell"] == Template("shell", "bash")
    assert parsed["data"].to_dict() == {"name": "data", "language": "python", "limits": {"memory_mb": 256},
                                        "network": "none", "description": "Data work"}


@pytest.mark.parametrize(("data", "words"), [
    ({"x": [1, 2]}, "template 'x': expected an object"),
    ({"x": {"language": "cobol"}}, "unknown language 'cobol'"),
])
def test_parse_templates_refuses_bad_entries(data: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_templates(data)
    assert words in info.value.message

