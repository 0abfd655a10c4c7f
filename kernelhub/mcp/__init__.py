"""kernelhub's MCP server: the tools of API.md (and the command tools) on the official ``mcp`` SDK.

- :mod:`.tools`: the tools' names and descriptions, and the coroutines that call the backend;
- :mod:`.schemas`: the tools' input schemas and the check of ``tools/call`` arguments against them;
- :mod:`.rendering`: how answers (and errors) become tool results: structured content, text, images;
- :mod:`.backends`: where the work is done, the in-process hub or a gateway's REST API;
- :mod:`.server`: the SDK server and ``kernelhub mcp`` (stdio);
- :mod:`.http`: streamable HTTP at ``/mcp`` on the gateway.
"""

from __future__ import annotations

from .tools import TOOLS

__all__ = ["TOOLS"]
