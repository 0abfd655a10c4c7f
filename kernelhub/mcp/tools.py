"""The MCP tools (API.md's seventeen, then the command tools): names, descriptions, and the coroutines that call
the services.

A tool is a :class:`ToolSpec`: its schema (built from :mod:`.schemas`) and description for ``tools/list`` and a
coroutine that parses the arguments (:mod:`kernelhub.models`), calls one :class:`~kernelhub.mcp.backends.Backend`
operation and shapes the REST-shaped answer into a :class:`~kernelhub.mcp.rendering.ToolOutput` (structured
content, readable text, images; :mod:`.rendering`). :func:`call_tool` turns every
:class:`~kernelhub.errors.KernelHubError` into a tool error carrying the gateway's message, so a failing tool
never takes the server down.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import InvalidRequest, KernelHubError
from ..models import (
    parse_command_run,
    parse_command_stdin,
    parse_execute,
    parse_file_write,
    parse_sandbox_create,
    parse_session_create,
    parse_session_input,
)
from .backends import Backend, EventSink
from .rendering import (
    ToolOutput,
    _clip,
    _command_text,
    _execution_output,
    _json,
    _sandbox_text,
    error_output,
    image_note,
)
from .schemas import (
    _CODE_ARGS,
    ENV,
    LIMITS,
    NETWORK,
    PATH,
    PID,
    SANDBOX_ID,
    SESSION_ID,
    TIMEOUT,
    _schema,
    check_arguments,
)

log = logging.getLogger("kernelhub.mcp")

#: Largest file file_download hands back over MCP (the content travels inside a JSON-RPC message).
MAX_DOWNLOAD_BYTES = 16 * 1024 * 1024
#: Largest decoded upload file_upload accepts over MCP.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


Progress = EventSink


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """One tool: what ``tools/list`` shows and the coroutine ``tools/call`` runs."""

    name: str
    title: str
    description: str
    schema: dict[str, Any]
    run: Callable[[Backend, dict[str, Any], Progress | None], Awaitable[ToolOutput]]
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    streams: bool = False

    def annotations(self) -> dict[str, Any]:
        return {"title": self.title, "readOnlyHint": self.read_only, "destructiveHint": self.destructive,
                "idempotentHint": self.idempotent, "openWorldHint": False}


# -- the tools ----------------------------------------------------------------------------------------------

async def _sandbox_create(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_sandbox_create(a)
    sb = await b.sandbox_create(req.template, req.limits, req.env, req.metadata, req.network)
    text = (f"Created sandbox {sb.get('id')} (template {sb.get('template')}, {sb.get('state')}). Run code in it "
            f"with code_execute(sandbox_id={sb.get('id')!r}, code=...); delete it with sandbox_delete when done.\n\n"
            + _json(sb))
    return ToolOutput(sb, text)


async def _sandbox_update(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    sb = await b.sandbox_update(a["sandbox_id"], a["network"])
    return ToolOutput(sb, f"Sandbox {sb.get('id')} now has the network policy {_json(sb.get('network'))}; new "
                          "connections follow it.\n\n" + _json(sb))


async def _sandbox_list(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    answer = await b.sandbox_list()
    rows = [f"- {s.get('id')}: {s.get('template')}, {s.get('state')}, created {s.get('created_at')}"
            for s in answer.get("sandboxes", [])]
    text = (f"{len(rows)} sandbox(es):\n" + "\n".join(rows)) if rows else "No sandboxes."
    return ToolOutput(answer, text)


async def _sandbox_info(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    sb = await b.sandbox_info(a["sandbox_id"])
    return ToolOutput(sb, _sandbox_text(sb))


async def _sandbox_delete(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    await b.sandbox_delete(a["sandbox_id"])
    return ToolOutput({"sandbox_id": a["sandbox_id"], "deleted": True},
                      f"Deleted sandbox {a['sandbox_id']}: its processes, kernels and workspace are gone.")


async def _sandbox_pause(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    sb = await b.sandbox_pause(a["sandbox_id"])
    return ToolOutput(sb, f"Paused sandbox {sb.get('id')}: its processes stopped and its memory was freed; its "
                      "/workspace files are kept. Resume it with sandbox_resume (kernels start fresh).")


async def _sandbox_resume(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    sb = await b.sandbox_resume(a["sandbox_id"])
    return ToolOutput(sb, "Resumed: kernel memory was lost (variables, imports); the files are as they were.\n"
                      + _sandbox_text(sb))


async def _code_execute(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_execute(a, extra=("sandbox_id",))
    ex = await b.code_execute(a["sandbox_id"], req.code, req.language, req.session_id, req.timeout_s, req.env, p)
    return _execution_output(ex)


async def _code_execute_async(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_execute(a, extra=("sandbox_id",))
    answer = await b.code_execute_async(a["sandbox_id"], req.code, req.language, req.session_id, req.timeout_s,
                                        req.env)
    return ToolOutput(answer, f"Started execution {answer.get('id')} ({answer.get('status')}). Read its "
                              f"progress and outputs with execution_status(execution_id={answer.get('id')!r}).")


async def _execution_status(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    # Reading a status succeeded even when the run failed: not a tool error.
    return _execution_output(await b.execution_status(a["execution_id"]), failures_are_errors=False)


async def _command_execute(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    r = await b.command_execute(a["sandbox_id"], **parse_command_run(a, extra=("sandbox_id",)).run_args())
    head = f"exit code {r.get('exit_code')}"
    # A non-zero exit is an ordinary answer (grep finding nothing); a limit ending the command is a failure.
    stopped = bool(r.get("reason")) and r.get("reason") != "output_truncated"
    if r.get("reason"):
        head += f" (reason: {r['reason']})"
    if r.get("duration_ms") is not None:
        head += f", {r['duration_ms']} ms"
    parts = [head]
    if r.get("stdout"):
        parts.append("stdout:\n" + _clip(r["stdout"].rstrip("\n")))
    if r.get("stderr"):
        parts.append("stderr:\n" + _clip(r["stderr"].rstrip("\n")))
    return ToolOutput(r, "\n\n".join(parts), is_error=stopped)


async def _file_upload(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_file_write(a, max_bytes=MAX_UPLOAD_BYTES, extra=("sandbox_id",))
    answer = await b.file_upload(a["sandbox_id"], req.path, req.data)
    return ToolOutput(answer, f"Wrote {answer.get('size')} bytes to /workspace/{answer.get('path')}.")


_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))


async def _file_download(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    path, fmt = a["path"], a.get("format", "auto")
    data = await b.file_download(a["sandbox_id"], path, MAX_DOWNLOAD_BYTES)
    text: str | None = None
    if fmt != "base64":
        try:
            text = data.decode()
        except UnicodeDecodeError:
            if fmt == "text":
                raise InvalidRequest(f"{path} is not UTF-8 text; ask for format 'base64'.") from None
    out: dict[str, Any] = {"path": path, "size": len(data)}
    images: list[tuple[str, str]] = []
    if text is not None:
        out["content"] = text
        return ToolOutput(out, f"{path} ({len(data)} bytes):\n" + _clip(text))
    encoded = base64.b64encode(data).decode()
    mime = next((m for magic, m in _IMAGE_MAGIC if data.startswith(magic)), None) if fmt == "auto" else None
    if mime:
        # Once, as image content (format "base64" gives the base64 in the structured result instead).
        images.append((mime, encoded))
        out.update(mime_type=mime, attached=image_note(1, encoded))
        return ToolOutput(out, f"{path} is an image ({mime}, {len(data)} bytes), attached as image content; ask "
                               "for format 'base64' to get its bytes in the structured result.", images)
    out["content_base64"] = encoded
    return ToolOutput(out, f"{path} is binary ({len(data)} bytes); content_base64 in the structured result "
                           "holds it.")


async def _file_list(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    path = a.get("path", "")
    answer = await b.file_list(a["sandbox_id"], path, a.get("limit"), a.get("cursor"))
    rows = [f"- {e.get('path')}{'/' if e.get('type') == 'dir' else ''} ({e.get('type')}, {e.get('size')} bytes)"
            for e in answer.get("entries", [])]
    where = f"/workspace/{path.strip('/')}".rstrip("/")
    text = f"{where}: " + (f"{len(rows)} entries\n" + "\n".join(rows) if rows else "empty")
    if answer.get("next"):
        text += f"\n(more entries follow: call file_list again with cursor={answer['next']!r})"
    return ToolOutput(answer, text)


async def _file_delete(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    await b.file_delete(a["sandbox_id"], a["path"])
    return ToolOutput({"path": a["path"], "deleted": True}, f"Deleted /workspace/{a['path'].strip('/')}.")


async def _session_create(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_session_create(a, extra=("sandbox_id",))
    s = await b.session_create(a["sandbox_id"], req.type, req.language)
    use = ("session_execute(session_id=..., input='<code>')" if s.get("type") == "jupyter"
           else "session_execute(session_id=..., input='<keystrokes, e.g. ls\\n>')")
    return ToolOutput(s, f"Started {s.get('type')} session {s.get('id')}"
                         f"{' (' + s['language'] + ')' if s.get('language') else ''} in sandbox "
                         f"{s.get('sandbox_id')}. Use {use}.\n\n" + _json(s))


async def _session_execute(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_session_input(a, extra=("session_id",))
    answer = await b.session_execute(a["session_id"], req.input, req.timeout_s, p)
    return _execution_output(answer)


async def _session_close(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    await b.session_close(a["session_id"])
    return ToolOutput({"session_id": a["session_id"], "closed": True}, f"Closed session {a['session_id']}.")


async def _sandbox_logs(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    answer = await b.sandbox_logs(a["sandbox_id"], a.get("lines", 100))
    lines = answer.get("lines", [])
    return ToolOutput(answer, _clip("\n".join(lines)) if lines else "The log is empty.")


async def _sandbox_metrics(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    m = await b.sandbox_metrics(a["sandbox_id"])
    mib = 1024 * 1024

    def part(used: str, limit: str, scale: int = 1, unit: str = "") -> str:
        u, lim = m.get(used), m.get(limit)
        if not isinstance(u, (int, float)):
            return "?"
        text = f"{u / scale:.1f}{unit}" if scale > 1 else f"{u}{unit}"
        if isinstance(lim, (int, float)) and lim:
            text += f" of {lim / scale:.0f}{unit}" if scale > 1 else f" of {lim}{unit}"
        return text

    text = (f"cpu {m.get('cpu_seconds')} s ({m.get('cpu_percent')}%), "
            f"memory {part('memory_bytes', 'memory_limit_bytes', mib, ' MiB')} "
            f"(peak {(m.get('memory_peak_bytes') or 0) / mib:.1f} MiB), pids {part('pids', 'pids_limit')}, "
            f"disk {part('disk_bytes', 'disk_limit_bytes', mib, ' MiB')}, oom kills {m.get('oom_kills')}.")
    return ToolOutput(m, text)


TOOLS: list[ToolSpec] = [
    ToolSpec(
        "sandbox_create", "Create a sandbox",
        "Create an isolated sandbox (its own processes, network reached only through a filtering proxy under its "
        "network policy, memory/cpu limits and a persistent /workspace) with one running kernel. Use this first, "
        "before running any code; "
        "reuse the same sandbox for related steps, as variables, files and installed state persist in it. "
        "Templates: 'python' (numpy, pandas, matplotlib), 'node' (JavaScript/TypeScript), 'bash'. Returns the "
        "sandbox: {id, template, state, created_at, expires_at, limits, sessions, metadata, network}. Delete it with "
        "sandbox_delete when done.",
        _schema({
            "template": {"type": "string", "default": "python",
                         "description": "Template name: python (default), node or bash, or one the gateway "
                                        "configures."},
            "limits": LIMITS,
            "env": {**ENV, "description": "Environment variables for everything that runs in the sandbox."},
            "metadata": {"type": "object", "description": "Free-form labels kept with the sandbox (max 16 KiB)."},
            "network": NETWORK,
        }),
        _sandbox_create),
    ToolSpec(
        "sandbox_list", "List sandboxes",
        "List the sandboxes of this account, with their state (running, stopped with a reason such as idle or "
        "oom). Use it to find a sandbox created earlier instead of making a new one. Returns {sandboxes: "
        "[sandbox…]}.",
        _schema({}), _sandbox_list, read_only=True, idempotent=True),
    ToolSpec(
        "sandbox_info", "Describe a sandbox",
        "Describe one sandbox: its state (and the reason it stopped, if it did), limits, expiry and sessions "
        "(kernels and terminals with their ids). Returns the sandbox object.",
        _schema({"sandbox_id": SANDBOX_ID}, ("sandbox_id",)), _sandbox_info, read_only=True, idempotent=True),
    ToolSpec(
        "sandbox_delete", "Delete a sandbox",
        "Delete a sandbox: stops every kernel, command and terminal in it and removes its /workspace for good. "
        "Use it when the work is finished. Returns {sandbox_id, deleted: true}.",
        _schema({"sandbox_id": SANDBOX_ID}, ("sandbox_id",)), _sandbox_delete, destructive=True,
        idempotent=True),
    ToolSpec(
        "sandbox_pause", "Pause a sandbox",
        "Pause a running sandbox: its kernels, commands and terminals stop and its memory is freed, but its "
        "/workspace files and session ids are kept, without counting toward the live sandbox limit. Code running "
        "in it ends (killed, reason paused). Returns the sandbox (state paused).",
        _schema({"sandbox_id": SANDBOX_ID}, ("sandbox_id",)), _sandbox_pause, destructive=True),
    ToolSpec(
        "sandbox_resume", "Resume a paused sandbox",
        "Start a paused sandbox again on its kept /workspace, with fresh kernels under the same session ids "
        "(variables and imports from before the pause are gone). Returns the sandbox (state running).",
        _schema({"sandbox_id": SANDBOX_ID}, ("sandbox_id",)), _sandbox_resume),
    ToolSpec(
        "code_execute", "Run code",
        "Run code in a sandbox's kernel and wait until it ends. State persists between calls (variables, "
        "imports, files), like notebook cells. Use it for computation, data analysis and plots (matplotlib "
        "figures come back as images). Long runs report progress (stdout as it is printed). Returns the "
        "execution: {id, status: ok|error|timeout|killed, stdout, stderr, results: [{is_main_result, data: "
        "{mime: value}, display_id?}], error: {name, value, traceback} | null, reason, duration_ms}; when the "
        "code raises, times out or is killed the result is flagged as an error and still carries all of this. "
        "Output past the sandbox's output_mb stops the code (reason output_truncated). For runs longer than a "
        "few minutes use code_execute_async.",
        _schema(_CODE_ARGS, ("sandbox_id", "code")), _code_execute, streams=True),
    ToolSpec(
        "code_execute_async", "Start code without waiting",
        "Start code in a sandbox's kernel and return at once, without waiting for it to end. Use it for long "
        "jobs (training, downloads within the sandbox, big computations); poll execution_status with the "
        "returned id to read its output so far and whether it ended. Returns {id, status}.",
        _schema(_CODE_ARGS, ("sandbox_id", "code")), _code_execute_async),
    ToolSpec(
        "execution_status", "Read an execution",
        "Read an execution by id, running or ended: its status, stdout and stderr so far, results and error. "
        "Use it to follow code_execute_async runs. Returns the execution object, as code_execute does.",
        _schema({"execution_id": {"type": "string", "minLength": 1,
                                  "description": "The execution's id (starts with 'ex')."}}, ("execution_id",)),
        _execution_status, read_only=True, idempotent=True),
    ToolSpec(
        "command_execute", "Run a shell command",
        "Run a bash command line in the sandbox (in /workspace unless cwd says otherwise) and wait until it "
        "exits. Use it for shell work: listing or moving files, running scripts and CLIs, inspecting the "
        "system. Returns {exit_code, stdout, stderr, duration_ms, reason?} (reason is 'timeout' or "
        "'output_truncated' when a limit ended it).",
        _schema({
            "sandbox_id": SANDBOX_ID,
            "command": {"type": "string", "description": "A bash command line, e.g. 'ls -la && wc -l *.csv'."},
            "cwd": {"type": "string", "description": "Working directory, default /workspace."},
            "env": ENV,
            "timeout_s": TIMEOUT,
            "stdin": {"type": "string", "description": "Text fed to the command's standard input."},
        }, ("sandbox_id", "command")), _command_execute),
    ToolSpec(
        "file_upload", "Write a file",
        "Write a file into the sandbox's /workspace (parent directories are made; an existing file is "
        "replaced). Give text as content, or binary data as content_base64. Use it to provide data or "
        "scripts to the code. Returns {path, size}.",
        _schema({
            "sandbox_id": SANDBOX_ID,
            "path": PATH,
            "content": {"type": "string", "description": "The file's text (written as UTF-8)."},
            "content_base64": {"type": "string", "description": "The file's bytes, base64-encoded (for binary "
                                                                "files such as images)."},
        }, ("sandbox_id", "path")), _file_upload, idempotent=True),
    ToolSpec(
        "file_download", "Read a file",
        "Read a file from the sandbox's /workspace, e.g. a result the code wrote. Returns {path, size, content} "
        "for UTF-8 text, {path, size, content_base64} for binary files, and for PNG, JPEG and GIF images (format "
        "auto) {path, size, mime_type, attached} with the image as image content. At most "
        f"{MAX_DOWNLOAD_BYTES // (1024 * 1024)} MiB.",
        _schema({
            "sandbox_id": SANDBOX_ID,
            "path": PATH,
            "format": {"type": "string", "enum": ["auto", "text", "base64"], "default": "auto",
                       "description": "auto (text if the file is UTF-8, else base64), text, or base64."},
        }, ("sandbox_id", "path")), _file_download, read_only=True, idempotent=True),
    ToolSpec(
        "file_list", "List a directory",
        "List a directory of the sandbox's /workspace (the workspace itself when path is empty), sorted by name, "
        "a page at a time. Returns {entries: [{name, path, type: file|dir|symlink, size, modified}], next}; when "
        "next is not null, call again with cursor=next for the following page.",
        _schema({"sandbox_id": SANDBOX_ID,
                 "path": {"type": "string", "default": "",
                          "description": "Directory relative to /workspace; empty for the workspace itself."},
                 "limit": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000,
                           "description": "Entries per page."},
                 "cursor": {"type": "string",
                            "description": "The next of the page before; omit for the first page."}},
                ("sandbox_id",)),
        _file_list, read_only=True, idempotent=True),
    ToolSpec(
        "file_delete", "Delete a file",
        "Delete a file or a directory (with its contents) from the sandbox's /workspace. Returns {path, "
        "deleted: true}.",
        _schema({"sandbox_id": SANDBOX_ID, "path": PATH}, ("sandbox_id", "path")), _file_delete,
        destructive=True, idempotent=True),
    ToolSpec(
        "session_create", "Start a kernel or terminal",
        "Start another long-lived session in a sandbox: a jupyter kernel (language python, node, typescript or "
        "bash) with state of its own, or a terminal (a bash shell on a PTY, for interactive programs). "
        "Returns the session {id, sandbox_id, type, language?, state}; use its id with session_execute.",
        _schema({
            "sandbox_id": SANDBOX_ID,
            "type": {"type": "string", "enum": ["jupyter", "terminal"], "default": "jupyter",
                     "description": "jupyter (a kernel) or terminal (a shell)."},
            "language": {"type": "string", "enum": ["python", "node", "typescript", "bash"],
                         "description": "For jupyter sessions: the kernel's language (default: the template's)."},
        }, ("sandbox_id",)), _session_create),
    ToolSpec(
        "session_execute", "Run in a session",
        "Send input to a session: code for a jupyter session (answers an execution, as code_execute does, "
        "with progress while it runs) or keystrokes for a terminal (end commands with a newline; answers "
        "{output}, what the terminal printed within timeout_s, default 1 s).",
        _schema({
            "session_id": SESSION_ID,
            "input": {"type": "string", "description": "Code (jupyter) or keystrokes (terminal)."},
            "timeout_s": TIMEOUT,
        }, ("session_id", "input")), _session_execute, streams=True),
    ToolSpec(
        "session_close", "Close a session",
        "Close a session: stops its kernel or terminal (the sandbox and its files stay). Returns {session_id, "
        "closed: true}.",
        _schema({"session_id": SESSION_ID}, ("session_id",)), _session_close, destructive=True,
        idempotent=True),
    ToolSpec(
        "sandbox_logs", "Read a sandbox's log",
        "Read the last lines of a sandbox's log (kernel stderr and launcher messages). Use it when a kernel "
        "died or a sandbox stopped unexpectedly. Returns {lines: [str]}.",
        _schema({"sandbox_id": SANDBOX_ID,
                 "lines": {"type": "integer", "minimum": 0, "maximum": 10000, "default": 100,
                           "description": "How many of the last lines (default 100)."}}, ("sandbox_id",)),
        _sandbox_logs, read_only=True, idempotent=True),
    ToolSpec(
        "sandbox_metrics", "Read a sandbox's usage",
        "Read a sandbox's resource usage against its limits: CPU, memory (and peak), processes, disk and OOM "
        "kills. Use it to see why code is slow or was killed. Returns {cpu_seconds, cpu_percent, memory_bytes, "
        "memory_peak_bytes, memory_limit_bytes, pids, pids_limit, disk_bytes, disk_limit_bytes, oom_kills}.",
        _schema({"sandbox_id": SANDBOX_ID}, ("sandbox_id",)), _sandbox_metrics, read_only=True,
        idempotent=True),
]

# -- commands by pid (background commands; the README's command routes) --------------------------------------

async def _command_start(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_command_run(a, extra=("sandbox_id",))
    c = await b.command_start(a["sandbox_id"], req.command, req.cwd, req.env, req.timeout_s, req.stdin,
                              req.stdin_open)
    return ToolOutput(c, _command_text(c) + "\nRead its output with command_status(sandbox_id, pid).")


async def _command_list(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    answer = await b.command_list(a["sandbox_id"])
    commands = answer.get("commands", [])
    return ToolOutput(answer, "\n".join(_command_text(c) for c in commands) or "No commands.")


async def _command_status(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    c = await b.command_status(a["sandbox_id"], a["pid"])
    return ToolOutput(c, _command_text(c))


async def _command_send_stdin(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    req = parse_command_stdin(a, extra=("sandbox_id", "pid"))
    c = await b.command_stdin(a["sandbox_id"], a["pid"], req.data, req.eof)
    return ToolOutput(c, _command_text(c))


async def _command_signal(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    answer = await b.command_signal(a["sandbox_id"], a["pid"], a.get("signal", "SIGTERM"))
    return ToolOutput(answer, f"Sent {a.get('signal', 'SIGTERM')} to {answer.get('signalled')} process(es) of "
                              f"command {a['pid']}.")


async def _command_kill(b: Backend, a: dict[str, Any], p: Progress | None) -> ToolOutput:
    c = await b.command_kill(a["sandbox_id"], a["pid"])
    return ToolOutput(c, _command_text(c))


TOOLS.extend([
    ToolSpec(
        "command_start", "Start a background command",
        "Start a bash command line in the sandbox and return at once with its pid, without waiting for it: for "
        "servers, watchers and long jobs. It keeps running after this call (until it exits, its timeout_s if "
        "given, or the sandbox ends). Read its output with command_status, write to it with command_send_stdin "
        "(stdin_open), stop it with command_kill. Returns the command {pid, status, ...}.",
        _schema({
            "sandbox_id": SANDBOX_ID,
            "command": {"type": "string", "description": "A bash command line, e.g. 'python -m http.server 8000'."},
            "cwd": {"type": "string", "description": "Working directory, default /workspace."},
            "env": ENV,
            "timeout_s": {"type": "number", "exclusiveMinimum": 0,
                          "description": "Seconds after which its whole process tree is stopped; default none."},
            "stdin": {"type": "string", "description": "Text fed to its standard input first."},
            "stdin_open": {"type": "boolean", "description": "Keep its standard input open for command_send_stdin."},
        }, ("sandbox_id", "command")), _command_start),
    ToolSpec(
        "command_list", "List commands",
        "List a sandbox's commands, running and recently ended, with their pids and exit codes. Returns "
        "{commands: [...]}.",
        _schema({"sandbox_id": SANDBOX_ID}, ("sandbox_id",)), _command_list, read_only=True, idempotent=True),
    ToolSpec(
        "command_status", "Read a command",
        "Read a command by pid: running or ended, its exit code, and its stdout and stderr so far (the last MiB "
        "of them). Returns the command with stdout and stderr.",
        _schema({"sandbox_id": SANDBOX_ID, "pid": PID}, ("sandbox_id", "pid")), _command_status, read_only=True,
        idempotent=True),
    ToolSpec(
        "command_send_stdin", "Write to a command",
        "Write text to a running command's standard input (it must have been started with stdin_open), and close "
        "it with eof. Returns the command.",
        _schema({"sandbox_id": SANDBOX_ID, "pid": PID,
                 "data": {"type": "string", "description": "Text to write; end lines with a newline."},
                 "eof": {"type": "boolean", "description": "Close its standard input afterwards."}},
                ("sandbox_id", "pid")), _command_send_stdin),
    ToolSpec(
        "command_signal", "Signal a command",
        "Send a signal to every process of a running command (SIGTERM to ask it to stop, SIGINT, SIGHUP, ...). "
        "Returns {pid, signalled}.",
        _schema({"sandbox_id": SANDBOX_ID, "pid": PID,
                 "signal": {"type": "string", "default": "SIGTERM",
                            "enum": ["SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGSTOP",
                                     "SIGCONT", "SIGKILL"]}},
                ("sandbox_id", "pid")), _command_signal),
    ToolSpec(
        "command_kill", "Kill a command",
        "Kill a running command and every process it started, at once. Returns the ended command.",
        _schema({"sandbox_id": SANDBOX_ID, "pid": PID}, ("sandbox_id", "pid")), _command_kill, destructive=True),
])

TOOLS.append(ToolSpec(
    "sandbox_update", "Change a sandbox's network policy",
    "Give a running sandbox another network policy, e.g. allow pypi.org and files.pythonhosted.org before a pip "
    "install. New connections follow it at once; open ones it refuses are cut. Returns the sandbox.",
    _schema({"sandbox_id": SANDBOX_ID, "network": NETWORK}, ("sandbox_id", "network")), _sandbox_update,
    idempotent=True))

TOOLS_BY_NAME = {tool.name: tool for tool in TOOLS}



async def call_tool(backend: Backend, name: str, arguments: dict[str, Any] | None,
                    progress: Progress | None = None) -> ToolOutput:
    """Run one tool; every failure is a tool error with the gateway's message, never an exception."""
    spec = TOOLS_BY_NAME.get(name)
    if spec is None:
        return error_output(InvalidRequest(f"No tool {name!r}; the tools are {', '.join(TOOLS_BY_NAME)}."))
    log.debug("tool %s called", name)
    try:
        args = check_arguments(spec, arguments)
        out = await spec.run(backend, args, progress if spec.streams else None)
        log.debug("tool %s answered%s", name, " an error" if out.is_error else "")
        return out
    except KernelHubError as exc:
        log.debug("tool %s failed: %s", name, exc.message)
        return error_output(exc)
    except Exception:
        log.exception("tool %s failed", name)
        return error_output(KernelHubError("The tool hit an internal error; the sandbox and its data are "
                                           "unaffected. The server's log has the details."))
