"""The templates config (``--Hub.templates_json``): parsed into templates, bad text refused with a sentence."""

from __future__ import annotations

import pytest

from kernelhub.errors import InvalidRequest
from kernelhub.services.templates import Template, parse_templates


def test_parse_templates_reads_every_field() -> None:
    text = ('{"data": {"language": "python", "limits": {"memory_mb": 256}, "env": {"MODE": "x"}, '
            '"description": "Data work"}, "shell": {"language": "bash"}}')
    parsed = parse_templates(text)
    assert parsed["data"] == Template("data", "python", {"memory_mb": 256}, "none", {"MODE": "x"}, "Data work")
    assert parsed["shell"] == Template("shell", "bash")
    assert parsed["data"].to_dict() == {"name": "data", "language": "python", "limits": {"memory_mb": 256},
                                        "network": "none", "description": "Data work"}


@pytest.mark.parametrize(("text", "words"), [
    ("{not json", "not valid JSON"),
    ('{"x": {"language": "cobol"}}', "unknown language 'cobol'"),
])
def test_parse_templates_refuses_bad_text(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_templates(text)
    assert words in info.value.message

