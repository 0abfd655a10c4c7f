"""How the MCP tools' answers become tool results: a :class:`ToolOutput` (the REST shape as structured content,
readable text for people and models, images as image content), the texts of executions, sandboxes and commands,
and :func:`error_output` for failures. :mod:`kernelhub.mcp.server` turns a ToolOutput into the SDK's result."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from ..errors import KernelHubError

#: How much of stdout/stderr/text the readable text of a result shows; structured content has all of it.
MAX_TEXT_CHARS = 40_000
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclasses.dataclass
class ToolOutput:
    """A tool's answer: ``structured`` (the REST shape), ``text`` for people and models, ``images`` as
    ``(mime type, base64)``, and ``is_error``."""

    structured: dict[str, Any]
    text: str
    images: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    is_error: bool = False


def _clip(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters in the structured result)"


def _json(data: Any) -> str:
    return _clip(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def execution_text(ex: dict[str, Any]) -> str:
    """An execution as a model reads it best: status, then outputs, then the error."""
    status = ex.get("status")
    head = f"Execution {ex.get('id')} in sandbox {ex.get('sandbox_id')}: {status}"
    if ex.get("reason"):
        head += f" (reason: {ex['reason']})"
    if ex.get("duration_ms") is not None:
        head += f", {ex['duration_ms']} ms"
    parts = [head]
    if status in ("queued", "running"):
        parts.append("Still running: call execution_status with this execution_id to read it again.")
    if ex.get("stdout"):
        parts.append("stdout:\n" + _clip(ex["stdout"].rstrip("\n")))
    if ex.get("stderr"):
        parts.append("stderr:\n" + _clip(_plain(ex["stderr"]).rstrip("\n")))
    for result in ex.get("results") or []:
        data = result.get("data") or {}
        label = "result" if result.get("is_main_result") else "display"
        images = [m for m in data if m in IMAGE_TYPES]
        if images:
            caption = f" ({data['text/plain']})" if "text/plain" in data else ""
            parts.append(f"{label}: {', '.join(images)} image, attached{_clip(caption, 200)}")
        elif "text/markdown" in data:
            parts.append(f"{label} (markdown):\n" + _clip(str(data["text/markdown"])))
        elif "text/plain" in data:
            parts.append(f"{label}:\n" + _clip(str(data["text/plain"])))
        elif "text/html" in data:
            parts.append(f"{label} (html):\n" + _clip(str(data["text/html"]), 4000))
        elif data:
            parts.append(f"{label}: {', '.join(data)} (in the structured result)")
    error = ex.get("error")
    if error:
        trace = _plain("\n".join(error.get("traceback") or [])) or f"{error.get('name')}: {error.get('value')}"
        parts.append(f"error: {error.get('name')}: {error.get('value')}\n" + _clip(trace, 8000))
    if ex.get("truncated"):
        parts.append("Output reached the sandbox's output_mb limit: the execution was stopped there and the rest "
                     "of its output dropped.")
    return "\n\n".join(parts)


def image_note(number: int, encoded: str) -> str:
    """What the structured result holds in place of an image that travels as image content ``number``."""
    return f"(an image, attached to this result as image content {number}; {len(encoded)} characters of base64)"


def detach_images(ex: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The execution with each image's base64 replaced by :func:`image_note`, and the images ``(mime type,
    base64)`` in order: a result carries each image once, as image content, which a model sees as an image
    (the REST answer and ``execution_status`` over REST keep the base64 in place)."""
    images: list[tuple[str, str]] = []
    results = []
    for result in ex.get("results") or []:
        data = dict(result.get("data") or {})
        for mime, value in data.items():
            if mime in IMAGE_TYPES and isinstance(value, str):
                images.append((mime, value.replace("\n", "")))
                data[mime] = image_note(len(images), images[-1][1])
        results.append({**result, "data": data})
    return ({**ex, "results": results} if images else ex), images


#: Execution statuses a running tool reports as a tool error (the structured result still has everything).
FAILED = ("error", "timeout", "killed")


def _execution_output(ex: dict[str, Any], *, failures_are_errors: bool = True) -> ToolOutput:
    """An execution as a tool result. The code raising, a timeout or a kill is a tool error (``isError``) for
    the tools that ran it, so a model sees at once that it has something to correct."""
    if "output" in ex and "status" not in ex:  # a terminal session's answer
        return ToolOutput(ex, "Terminal output:\n" + _clip(_plain(str(ex.get("output") or ""))))
    failed = failures_are_errors and ex.get("status") in FAILED
    structured, images = detach_images(ex)
    return ToolOutput(structured, execution_text(ex), images, is_error=failed)


def _sandbox_text(sb: dict[str, Any]) -> str:
    sessions = ", ".join(f"{s.get('id')} ({s.get('type')}{'/' + s['language'] if s.get('language') else ''}, "
                         f"{s.get('state')})" for s in sb.get("sessions") or []) or "none"
    text = (f"Sandbox {sb.get('id')}: template {sb.get('template')}, state {sb.get('state')}"
            f"{' (reason: ' + sb['reason'] + ')' if sb.get('reason') else ''}, expires {sb.get('expires_at')}.\n"
            f"Sessions: {sessions}.")
    return text + "\n\n" + _json(sb)


def _command_text(c: dict[str, Any]) -> str:
    state = (f"running for {c.get('duration_ms')} ms" if c.get("status") == "running"
             else f"exited with code {c.get('exit_code')}" + (f" (reason: {c['reason']})" if c.get("reason") else ""))
    parts = [f"Command {c.get('pid')} in sandbox {c.get('sandbox_id')}: {state}. {c.get('command') or ''}".rstrip()]
    if c.get("dropped_bytes"):
        parts.append(f"(the first {c['dropped_bytes']} bytes of its output are no longer kept)")
    for name in ("stdout", "stderr"):
        if c.get(name):
            parts.append(f"{name}:\n" + _clip(_plain(c[name]).rstrip("\n")))
    return "\n".join(parts)


def error_output(exc: KernelHubError) -> ToolOutput:
    """A failure as a tool error: the REST error body (``exc.to_dict()``, the code from :mod:`kernelhub.errors`'
    registry) as structured content, and ``code: message`` as text. The same for the hub's errors and, under
    :class:`~kernelhub.mcp.backends.RemoteBackend`, the client's, which are the same classes."""
    return ToolOutput(exc.to_dict(), f"{exc.error}: {exc.message}", is_error=True)
