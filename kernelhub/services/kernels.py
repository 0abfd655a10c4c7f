"""The Jupyter API's kernels (``/api/kernels``, a drop-in for the Jupyter Kernel Gateway): one sandbox per kernel.

:class:`Kernels` starts a kernel as a new sandbox of the matching template whose first session runs the
kernelspec asked for, lists the tenant's kernels, interrupts and restarts them in place, and stops the whole
sandbox when the kernel is shut down. A sandbox made here is marked ``jupyter_api``; sandboxes made by
``sandbox_create`` are not kernels here. Built by :class:`~kernelhub.services.hub.Hub` on
:class:`~kernelhub.services.sandboxes.Sandboxes`; :mod:`kernelhub.handlers.jupyter` calls it through the hub.
"""

from __future__ import annotations

from ..errors import InvalidRequest, NotFound
from .sandboxes import Sandboxes, SandboxRecord
from .sessions import KERNELSPECS, JupyterSession
from .templates import Template
from .tenants import Tenant
from .validation import check_env


class Kernels:
    """Jupyter kernels, each the first session of a sandbox of its own in
    :class:`~kernelhub.services.sandboxes.Sandboxes`."""

    def __init__(self, sandboxes: Sandboxes, templates: dict[str, Template]) -> None:
        self.sandboxes = sandboxes
        self.templates = templates

    def template_for_kernelspec(self, name: object) -> str:
        """The language whose kernelspec is ``name`` (``kernelhub-python`` → ``python``); raises
        :class:`~kernelhub.errors.NotFound` for any other name."""
        for language, spec in KERNELSPECS.items():
            if spec == name and language != "javascript":
                return language
        raise NotFound(f"No kernelspec {str(name)[:64]!r}.")

    async def start_kernel(self, tenant: Tenant, kernel_name: object,
                           env: object = None) -> tuple[SandboxRecord, JupyterSession]:
        """``POST /api/kernels``: a new sandbox whose first session runs that kernelspec. Of ``env``, only
        ``KERNEL_*`` variables reach the kernel, as with the Jupyter Kernel Gateway (Jupyter Server in gateway
        mode sends its own environment's ``KERNEL_*`` variables, e.g. ``KERNEL_USERNAME``)."""
        if env is not None and not isinstance(env, dict):
            raise InvalidRequest("env must be a JSON object of strings.")
        kernel_env = check_env({k: v for k, v in (env or {}).items()
                                if isinstance(k, str) and k.startswith("KERNEL_")})
        language = self.template_for_kernelspec(kernel_name or "kernelhub-python")
        template = language if language in self.templates else "python"
        if language == "typescript":
            template = "node"
        record = await self.sandboxes.create_sandbox(tenant, template, env=kernel_env, kernel_language=language)
        record.jupyter_api = True
        session = next(s for s in record.sessions.values() if s.type == "jupyter")
        return record, session

    def kernels(self, tenant: Tenant) -> list[tuple[SandboxRecord, JupyterSession]]:
        """``GET /api/kernels``: the tenant's running kernels and their sandboxes' records."""
        out = []
        for record in self.sandboxes.list_sandboxes(tenant):
            if record.jupyter_api and record.state == "running":
                for s in record.sessions.values():
                    if s.type == "jupyter":
                        out.append((record, s))
        return out

    def get_kernel(self, tenant: Tenant, kernel_id: object) -> tuple[SandboxRecord, JupyterSession]:
        """The tenant's running kernel ``kernel_id``; counts as activity. Raises
        :class:`~kernelhub.errors.NotFound` otherwise."""
        for record, session in self.kernels(tenant):
            if session.kernel_id == kernel_id:
                record.touch()
                return record, session
        raise NotFound(f"No kernel {str(kernel_id)[:64]!r}.")

    async def interrupt_kernel(self, tenant: Tenant, kernel_id: object) -> None:
        """``POST /api/kernels/{id}/interrupt``: SIGINT to the kernel; it keeps its state."""
        _, session = self.get_kernel(tenant, kernel_id)
        await session.interrupt()

    async def restart_kernel(self, tenant: Tenant, kernel_id: object) -> tuple[SandboxRecord, JupyterSession]:
        """``POST /api/kernels/{id}/restart``: a fresh kernel process in the same sandbox, same id and sockets."""
        record, session = self.get_kernel(tenant, kernel_id)
        await self.sandboxes.restart_session(tenant, session.id)
        return record, session

    async def shutdown_kernel(self, tenant: Tenant, kernel_id: object) -> None:
        """``DELETE /api/kernels/{id}``: the kernel's sandbox goes with it (one sandbox per kernel)."""
        record, _ = self.get_kernel(tenant, kernel_id)
        await self.sandboxes.delete_sandbox(tenant, record.id)
