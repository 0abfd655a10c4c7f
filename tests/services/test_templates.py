"""The templates config (``--Hub.extra_templates``): parsed into templates, bad entries refused with a sentence."""

from __future__ import annotations

from typing import Any

import pytest

from kernelhub.errors import InvalidRequest
from kernelhub.services.egress.policy import NONE, parse_policy
from kernelhub.services.templates import Template, parse_templates


def test_parse_templates_reads_every_field() -> None:
    parsed = parse_templates({"data": {"language": "python", "limits": {"memory_mb": 256}, "env": {"MODE": "x"},
                                       "description": "Data work"}, "shell": {"language": "bash"},
                              "web": {"network": {"allow": ["PyPI.org", "*.pythonhosted.org:443"]},
                                      "packages": {"pip": ["requests==2.32.3 "], "npm": []}}})
    assert parsed["data"] == Template("data", "python", {"memory_mb": 256}, NONE, {"MODE": "x"}, "Data work")
    assert parsed["shell"] == Template("shell", "bash")
    assert parsed["data"].to_dict() == {"name": "data", "language": "python", "limits": {"memory_mb": 256},
                                        "network": "none", "description": "Data work"}
    web = parsed["web"]
    assert web.network == parse_policy({"allow": ["pypi.org", "*.pythonhosted.org:443"]})
    assert web.packages == {"pip": ("requests==2.32.3",)}
    assert web.to_dict()["network"] == {"allow": ["pypi.org", "*.pythonhosted.org:443"], "deny": []}
    assert web.to_dict()["packages"] == {"pip": ["requests==2.32.3"]}


@pytest.mark.parametrize(("data", "words"), [
    ({"x": [1, 2]}, "template 'x': expected an object"),
    ({"x": {"language": "cobol"}}, "unknown language 'cobol'"),
    ({"x": {"network": "everything"}}, "template 'x': network must be \"none\", \"open\" or an object"),
    ({"x": {"network": {"allow": ["*"]}}}, "template 'x': network.allow[0] is not a valid entry"),
    ({"x": {"packages": ["requests"]}}, "template 'x': packages must be an object"),
    ({"x": {"packages": {"apt": ["curl"]}}}, "template 'x': packages must be an object"),
    ({"x": {"packages": {"pip": ["--index-url=http://evil.test/"]}}}, "template 'x': packages.pip must be a list"),
    ({"x": {"packages": {"npm": [""]}}}, "template 'x': packages.npm must be a list"),
])
def test_parse_templates_refuses_bad_entries(data: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_templates(data)
    assert words in info.value.message

