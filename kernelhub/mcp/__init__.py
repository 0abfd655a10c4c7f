"""kernelhub's MCP server: the tools of API.md (and the command tools) on the official ``mcp`` SDK.

- :mod:`.tools`: the tools' names, JSON schemas and descriptions, and how answers become tool results;
- :mod:`.backends`: where the work is done, the in-process hub or a gateway's REST API;
- :mod:`.server`: the SDK server and ``kernelhub mcp`` (stdio);
- :mod:`.http`: streamable HTTP at ``/mcp`` on the gateway.
"""

from __future__ import annotations

from .tools import TOOLS

__all__ = ["TOOLS"]
