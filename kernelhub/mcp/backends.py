"""Where the MCP tools' work is done: the in-process service layer, or a running gateway's REST API.

Both backends answer the REST shapes of API.md, so the tool layer (:mod:`kernelhub.mcp.tools`) shapes one kind
of answer whichever runs underneath, and both raise the same :class:`kernelhub.errors.KernelHubError` classes
for everything a caller may see (the client builds the gateway's answers back into them).

- :class:`HubBackend` calls one :class:`~kernelhub.services.hub.Hub` method per tool, as a tenant. Used by
  ``kernelhub mcp`` (embedded, tenant ``default``) and by the gateway's ``/mcp`` route (the caller's tenant).
- :class:`RemoteBackend` calls the REST API with :class:`~kernelhub.client.AsyncApiClient` (``kernelhub mcp
  --url URL --token KEY``); executions stream as NDJSON (:meth:`AsyncApiClient.stream`) so they can report
  progress.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..client import _api
from ..client._async import AsyncApiClient
from ..errors import PayloadTooLarge

if TYPE_CHECKING:
    from ..services.hub import Hub
    from ..services.tenants import Tenant

#: Pages of a directory the remote file_download reads to find a file's size before it downloads it.
_MAX_PAGES = 10

#: Receives an execution's events (API.md "Streaming" shapes) as they happen; must not block.
EventSink = Callable[[dict[str, Any]], None]


class Backend(Protocol):
    """The operations behind the tools (API.md's seventeen, then the command ones), answering REST shapes."""

    async def sandbox_create(self, template: str | None, limits: dict[str, Any] | None,
                             env: dict[str, str] | None, metadata: dict[str, Any] | None,
                             network: str | dict[str, Any] | None) -> dict[str, Any]: ...
    async def sandbox_update(self, sandbox_id: str, network: str | dict[str, Any]) -> dict[str, Any]: ...
    async def sandbox_list(self) -> dict[str, Any]: ...
    async def sandbox_info(self, sandbox_id: str) -> dict[str, Any]: ...
    async def sandbox_delete(self, sandbox_id: str) -> None: ...
    async def sandbox_pause(self, sandbox_id: str) -> dict[str, Any]: ...
    async def sandbox_resume(self, sandbox_id: str) -> dict[str, Any]: ...
    async def code_execute(self, sandbox_id: str, code: str, language: str | None, session_id: str | None,
                           timeout_s: float | None, env: dict[str, str] | None,
                           on_event: EventSink | None) -> dict[str, Any]: ...
    async def code_execute_async(self, sandbox_id: str, code: str, language: str | None,
                                 session_id: str | None, timeout_s: float | None,
                                 env: dict[str, str] | None) -> dict[str, Any]: ...
    async def execution_status(self, execution_id: str) -> dict[str, Any]: ...
    async def command_execute(self, sandbox_id: str, command: str, cwd: str | None, env: dict[str, str] | None,
                              timeout_s: float | None, stdin: str | None) -> dict[str, Any]: ...
    async def file_upload(self, sandbox_id: str, path: str, data: bytes) -> dict[str, Any]: ...
    async def file_download(self, sandbox_id: str, path: str, max_bytes: int) -> bytes: ...
    async def file_list(self, sandbox_id: str, path: str, limit: int | None = None,
                        cursor: str | None = None) -> dict[str, Any]: ...
    async def file_delete(self, sandbox_id: str, path: str) -> None: ...
    async def session_create(self, sandbox_id: str, type: str, language: str | None) -> dict[str, Any]: ...
    async def session_execute(self, session_id: str, input: str, timeout_s: float | None,
                              on_event: EventSink | None) -> dict[str, Any]: ...
    async def session_close(self, session_id: str) -> None: ...
    async def sandbox_logs(self, sandbox_id: str, lines: int) -> dict[str, Any]: ...
    async def sandbox_metrics(self, sandbox_id: str) -> dict[str, Any]: ...
    # Commands by pid (the command routes of the README).
    async def command_start(self, sandbox_id: str, command: str, cwd: str | None, env: dict[str, str] | None,
                            timeout_s: float | None, stdin: str | None, stdin_open: bool) -> dict[str, Any]: ...
    async def command_list(self, sandbox_id: str) -> dict[str, Any]: ...
    async def command_status(self, sandbox_id: str, pid: int) -> dict[str, Any]: ...
    async def command_stdin(self, sandbox_id: str, pid: int, data: str | bytes | None, eof: bool) -> dict[str, Any]: ...
    async def command_signal(self, sandbox_id: str, pid: int, signal: str) -> dict[str, Any]: ...
    async def command_kill(self, sandbox_id: str, pid: int) -> dict[str, Any]: ...


def _too_large(path: str, size: int, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{path} is {size} bytes; file_download answers at most {max_bytes} bytes over MCP. Read part of it "
        "with command_execute (head, tail, split) or fetch it from the REST API.")


class HubBackend:
    """The tools run on an in-process :class:`~kernelhub.services.hub.Hub` as ``tenant``."""

    def __init__(self, hub: Hub, tenant: Tenant, key: str | None = None) -> None:
        self.hub = hub
        self.tenant = tenant
        #: The API key of the call (for its audit fingerprint only), None in-process (``kernelhub mcp``).
        self.key = key

    async def sandbox_create(self, template: str | None, limits: dict[str, Any] | None,
                             env: dict[str, str] | None, metadata: dict[str, Any] | None,
                             network: str | dict[str, Any] | None) -> dict[str, Any]:
        record = await self.hub.create_sandbox(self.tenant, template, limits, env, metadata, network)
        return record.to_dict()

    async def sandbox_update(self, sandbox_id: str, network: str | dict[str, Any]) -> dict[str, Any]:
        return (await self.hub.update_sandbox(self.tenant, sandbox_id, network)).to_dict()

    async def sandbox_list(self) -> dict[str, Any]:
        return {"sandboxes": [r.to_dict() for r in self.hub.list_sandboxes(self.tenant)]}

    async def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        return self.hub.get_sandbox(self.tenant, sandbox_id).to_dict()

    async def sandbox_delete(self, sandbox_id: str) -> None:
        await self.hub.delete_sandbox(self.tenant, sandbox_id)

    async def sandbox_pause(self, sandbox_id: str) -> dict[str, Any]:
        return (await self.hub.pause_sandbox(self.tenant, sandbox_id)).to_dict()

    async def sandbox_resume(self, sandbox_id: str) -> dict[str, Any]:
        return (await self.hub.resume_sandbox(self.tenant, sandbox_id)).to_dict()

    async def code_execute(self, sandbox_id: str, code: str, language: str | None, session_id: str | None,
                           timeout_s: float | None, env: dict[str, str] | None,
                           on_event: EventSink | None) -> dict[str, Any]:
        ex = await self.hub.execute(self.tenant, sandbox_id, code, language=language, session_id=session_id,
                                    timeout_s=timeout_s, env=env, listener=on_event, wait=True)
        return ex.to_dict()

    async def code_execute_async(self, sandbox_id: str, code: str, language: str | None,
                                 session_id: str | None, timeout_s: float | None,
                                 env: dict[str, str] | None) -> dict[str, Any]:
        ex = await self.hub.execute(self.tenant, sandbox_id, code, language=language, session_id=session_id,
                                    timeout_s=timeout_s, env=env, wait=False)
        return {"id": ex.id, "status": ex.status}

    async def execution_status(self, execution_id: str) -> dict[str, Any]:
        return await self.hub.execution_status(self.tenant, execution_id)

    async def command_execute(self, sandbox_id: str, command: str, cwd: str | None, env: dict[str, str] | None,
                              timeout_s: float | None, stdin: str | None) -> dict[str, Any]:
        return await self.hub.run_command(self.tenant, sandbox_id, command, cwd=cwd, env=env, timeout_s=timeout_s,
                                          stdin=stdin)

    async def file_upload(self, sandbox_id: str, path: str, data: bytes) -> dict[str, Any]:
        writer = self.hub.open_upload(self.tenant, sandbox_id, path)
        try:
            # In a thread, as the REST route does: a write may block on the disk.
            await asyncio.to_thread(writer.write, data)
            size = await asyncio.to_thread(writer.finish)
        except BaseException:
            writer.abort()
            raise
        return {"path": writer.path, "size": size}

    async def file_download(self, sandbox_id: str, path: str, max_bytes: int) -> bytes:
        async with self.hub.open_download(self.tenant, sandbox_id, path) as download:
            if download.size > max_bytes:
                raise _too_large(path, download.size, max_bytes)
            return b"".join([chunk async for chunk in download])

    async def file_list(self, sandbox_id: str, path: str, limit: int | None = None,
                        cursor: str | None = None) -> dict[str, Any]:
        return await self.hub.list_files(self.tenant, sandbox_id, path, limit=limit, cursor=cursor)

    async def file_delete(self, sandbox_id: str, path: str) -> None:
        await self.hub.delete_file(self.tenant, sandbox_id, path)

    async def session_create(self, sandbox_id: str, type: str, language: str | None) -> dict[str, Any]:
        session = await self.hub.create_session(self.tenant, sandbox_id, type, language)
        return session.to_dict()

    async def session_execute(self, session_id: str, input: str, timeout_s: float | None,
                              on_event: EventSink | None) -> dict[str, Any]:
        result = await self.hub.session_execute(self.tenant, session_id, input, timeout_s=timeout_s,
                                                listener=on_event)
        if hasattr(result, "to_dict"):
            return result.to_dict()
        return result if isinstance(result, dict) else {"output": result}

    async def session_close(self, session_id: str) -> None:
        await self.hub.close_session(self.tenant, session_id)

    async def sandbox_logs(self, sandbox_id: str, lines: int) -> dict[str, Any]:
        return {"lines": self.hub.sandbox_logs(self.tenant, sandbox_id, lines)}

    async def sandbox_metrics(self, sandbox_id: str) -> dict[str, Any]:
        return self.hub.sandbox_metrics(self.tenant, sandbox_id)

    async def command_start(self, sandbox_id: str, command: str, cwd: str | None, env: dict[str, str] | None,
                            timeout_s: float | None, stdin: str | None, stdin_open: bool) -> dict[str, Any]:
        cmd = await self.hub.start_command(self.tenant, sandbox_id, command, cwd=cwd, env=env, timeout_s=timeout_s,
                                           stdin=stdin, stdin_open=stdin_open, background=True)
        return cmd.to_dict()

    async def command_list(self, sandbox_id: str) -> dict[str, Any]:
        return {"commands": [c.to_dict() for c in self.hub.list_commands(self.tenant, sandbox_id)]}

    async def command_status(self, sandbox_id: str, pid: int) -> dict[str, Any]:
        cmd = self.hub.get_command(self.tenant, sandbox_id, pid)
        return {**cmd.to_dict(), **cmd.kept_output()}

    async def command_stdin(self, sandbox_id: str, pid: int, data: str | bytes | None, eof: bool) -> dict[str, Any]:
        return (await self.hub.command_stdin(self.tenant, sandbox_id, pid, data, eof=eof)).to_dict()

    async def command_signal(self, sandbox_id: str, pid: int, signal: str) -> dict[str, Any]:
        return {"pid": pid, "signalled": await self.hub.signal_command(self.tenant, sandbox_id, pid, signal)}

    async def command_kill(self, sandbox_id: str, pid: int) -> dict[str, Any]:
        return (await self.hub.kill_command(self.tenant, sandbox_id, pid)).to_dict()




class RemoteBackend:
    """The tools run on a gateway over its REST API (``kernelhub mcp --url URL --token KEY``)."""

    def __init__(self, api: AsyncApiClient) -> None:
        self.api = api

    async def _stream(self, call: _api.Call, on_event: EventSink | None) -> dict[str, Any]:
        """The execution (or a terminal's ``{output}``) an NDJSON stream ends with; its events before go to
        ``on_event``. An error the gateway answers, before or in the stream, is raised typed by the client."""
        end = await self.api.stream(call, on_event)
        if isinstance(end.get("execution"), dict):
            return end["execution"]  # type: ignore[no-any-return]
        output = end.get("output")
        return output if isinstance(output, dict) else {"output": output}

    async def sandbox_create(self, template: str | None, limits: dict[str, Any] | None,
                             env: dict[str, str] | None, metadata: dict[str, Any] | None,
                             network: str | dict[str, Any] | None) -> dict[str, Any]:
        return await self.api.call(_api.create_sandbox(template, limits, env, metadata, network))  # type: ignore[no-any-return]

    async def sandbox_update(self, sandbox_id: str, network: str | dict[str, Any]) -> dict[str, Any]:
        return await self.api.call(_api.update_sandbox(sandbox_id, network))  # type: ignore[no-any-return]

    async def sandbox_list(self) -> dict[str, Any]:
        return await self.api.call(_api.list_sandboxes())  # type: ignore[no-any-return]

    async def sandbox_info(self, sandbox_id: str) -> dict[str, Any]:
        return await self.api.call(_api.get_sandbox(sandbox_id))  # type: ignore[no-any-return]

    async def sandbox_delete(self, sandbox_id: str) -> None:
        await self.api.call(_api.delete_sandbox(sandbox_id))

    async def sandbox_pause(self, sandbox_id: str) -> dict[str, Any]:
        return await self.api.call(_api.pause_sandbox(sandbox_id))  # type: ignore[no-any-return]

    async def sandbox_resume(self, sandbox_id: str) -> dict[str, Any]:
        return await self.api.call(_api.resume_sandbox(sandbox_id))  # type: ignore[no-any-return]

    async def code_execute(self, sandbox_id: str, code: str, language: str | None, session_id: str | None,
                           timeout_s: float | None, env: dict[str, str] | None,
                           on_event: EventSink | None) -> dict[str, Any]:
        call = _api.execute(sandbox_id, code, language=language, session_id=session_id, timeout_s=timeout_s,
                            env=env)
        return await self._stream(call, on_event)

    async def code_execute_async(self, sandbox_id: str, code: str, language: str | None,
                                 session_id: str | None, timeout_s: float | None,
                                 env: dict[str, str] | None) -> dict[str, Any]:
        call = _api.execute(sandbox_id, code, language=language, session_id=session_id, timeout_s=timeout_s,
                            env=env, wait=False)
        return await self.api.call(call)  # type: ignore[no-any-return]

    async def execution_status(self, execution_id: str) -> dict[str, Any]:
        return await self.api.call(_api.get_execution(execution_id))  # type: ignore[no-any-return]

    async def command_execute(self, sandbox_id: str, command: str, cwd: str | None, env: dict[str, str] | None,
                              timeout_s: float | None, stdin: str | None) -> dict[str, Any]:
        call = _api.run_command(sandbox_id, command, cwd=cwd, env=env, timeout_s=timeout_s, stdin=stdin)
        return await self.api.call(call)  # type: ignore[no-any-return]

    async def file_upload(self, sandbox_id: str, path: str, data: bytes) -> dict[str, Any]:
        return await self.api.call(_api.write_file(sandbox_id, path, data, len(data)))  # type: ignore[no-any-return]

    async def file_download(self, sandbox_id: str, path: str, max_bytes: int) -> bytes:
        parent, _, name = path.strip("/").rpartition("/")
        entry, cursor = None, None
        for _ in range(_MAX_PAGES):  # the entry's page; a huge directory is not read to its end
            listing = await self.api.call(_api.list_files(sandbox_id, parent, cursor=cursor))
            entry = next((e for e in listing.get("entries", []) if e.get("name") == name), None)
            cursor = listing.get("next")
            if entry is not None or not cursor:
                break
        if entry is not None and isinstance(entry.get("size"), int) and entry["size"] > max_bytes:
            raise _too_large(path, entry["size"], max_bytes)
        data = await self.api.call(_api.read_file(sandbox_id, path))
        if len(data) > max_bytes:
            raise _too_large(path, len(data), max_bytes)
        return data  # type: ignore[no-any-return]

    async def file_list(self, sandbox_id: str, path: str, limit: int | None = None,
                        cursor: str | None = None) -> dict[str, Any]:
        return await self.api.call(_api.list_files(sandbox_id, path, limit=limit, cursor=cursor))  # type: ignore[no-any-return]

    async def file_delete(self, sandbox_id: str, path: str) -> None:
        await self.api.call(_api.delete_file(sandbox_id, path))

    async def session_create(self, sandbox_id: str, type: str, language: str | None) -> dict[str, Any]:
        return await self.api.call(_api.create_session(sandbox_id, type, language))  # type: ignore[no-any-return]

    async def session_execute(self, session_id: str, input: str, timeout_s: float | None,
                              on_event: EventSink | None) -> dict[str, Any]:
        return await self._stream(_api.session_execute(session_id, input, timeout_s), on_event)

    async def session_close(self, session_id: str) -> None:
        await self.api.call(_api.close_session(session_id))

    async def sandbox_logs(self, sandbox_id: str, lines: int) -> dict[str, Any]:
        return await self.api.call(_api.sandbox_logs(sandbox_id, lines))  # type: ignore[no-any-return]

    async def sandbox_metrics(self, sandbox_id: str) -> dict[str, Any]:
        return await self.api.call(_api.sandbox_metrics(sandbox_id))  # type: ignore[no-any-return]

    async def command_start(self, sandbox_id: str, command: str, cwd: str | None, env: dict[str, str] | None,
                            timeout_s: float | None, stdin: str | None, stdin_open: bool) -> dict[str, Any]:
        call = _api.start_command(sandbox_id, command, cwd=cwd, env=env, timeout_s=timeout_s, stdin=stdin,
                                  stdin_open=stdin_open or None)
        return await self.api.call(call)  # type: ignore[no-any-return]

    async def command_list(self, sandbox_id: str) -> dict[str, Any]:
        return await self.api.call(_api.list_commands(sandbox_id))  # type: ignore[no-any-return]

    async def command_status(self, sandbox_id: str, pid: int) -> dict[str, Any]:
        return await self.api.call(_api.get_command(sandbox_id, pid, output=True))  # type: ignore[no-any-return]

    async def command_stdin(self, sandbox_id: str, pid: int, data: str | bytes | None, eof: bool) -> dict[str, Any]:
        return await self.api.call(_api.command_stdin(sandbox_id, pid, data, eof))  # type: ignore[no-any-return]

    async def command_signal(self, sandbox_id: str, pid: int, signal: str) -> dict[str, Any]:
        return await self.api.call(_api.signal_command(sandbox_id, pid, signal))  # type: ignore[no-any-return]

    async def command_kill(self, sandbox_id: str, pid: int) -> dict[str, Any]:
        return await self.api.call(_api.kill_command(sandbox_id, pid))  # type: ignore[no-any-return]
