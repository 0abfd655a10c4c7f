"""The gateway's kernel manager: jupyter_client's, with every socket to the kernel guarded and no thread of its own.

:class:`GuardedKernelManager` is ``AsyncKernelManager`` with two changes, both about what one kernel costs the
gateway:

- every socket it opens to the kernel (``connect_shell``, ``connect_iopub``, ..., and its own control socket for
  interrupt and shutdown requests) is a :class:`~kernelhub.sandbox.channel_guard.GuardedSocket` that reads
  through the kernel's :class:`~kernelhub.sandbox.channel_guard.ChannelGuard`, so what the kernel sends is bounded
  per message and per socket before the gateway allocates it;
- all kernels share one ZeroMQ context (:func:`shared_context`): jupyter_client makes a context per manager and
  per client, each with an I/O thread and a reaper thread, which was six threads per kernel in the gateway.

The sandbox comes, as for any manager, through ``start_kernel(sandbox=...)`` and the provisioner
(:mod:`kernelhub.sandbox.provisioner`); the guard's directory is the sandbox's own, outside what the sandbox
sees. Created by :class:`~kernelhub.services.sessions.JupyterSession`, which also decides what a violation means.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.connect import channel_socket_types
from jupyter_client.manager import AsyncKernelManager

from .channel_guard import ChannelBounds, ChannelGuard

__all__ = ["GuardedKernelManager", "shared_context"]


def shared_context() -> zmq.asyncio.Context:
    """The gateway's one ZeroMQ context (pyzmq's process-wide instance): one I/O thread for every kernel."""
    return zmq.asyncio.Context.instance()


class GuardedKernelManager(AsyncKernelManager):  # type: ignore[misc]
    """``AsyncKernelManager`` whose sockets to the kernel are guarded by ``bounds``; ``on_violation(channel,
    reason)`` is called when the kernel sent something out of bounds (its connection was cut already)."""

    def __init__(self, *, bounds: ChannelBounds, on_violation: Callable[[str, str], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(context=shared_context(), **kwargs)
        self.bounds = bounds
        self.on_violation = on_violation
        self.guard: ChannelGuard | None = None

    def _guard(self) -> ChannelGuard:
        if self.guard is None:
            sandbox = getattr(self.provisioner, "sandbox", None)
            if sandbox is None:
                raise RuntimeError("a guarded kernel's sockets are opened only once its sandbox is known")
            directory = Path(sandbox.dir) / "guard" / (self.kernel_id or "kernel").replace("-", "")[:12]
            self.guard = ChannelGuard(directory, self.bounds, self._violated)
        return self.guard

    def _violated(self, channel: str, reason: str) -> None:
        if self.on_violation is not None:
            self.on_violation(channel, reason)

    def _create_connected_socket(self, channel: str, identity: bytes | None = None) -> Any:
        """Called by jupyter_client's ``connect_<channel>`` (and for its own control socket)."""
        return self._guard().socket(self.context, channel_socket_types[channel], channel, self._make_url(channel),
                                    identity)

    async def _async_cleanup_resources(self, restart: bool = False) -> None:
        """Called by jupyter_client after the kernel ended; the links go with the kernel unless it restarts
        (the gateway's sockets then reconnect through them to the new kernel's sockets, at the same paths)."""
        await super()._async_cleanup_resources(restart=restart)
        if not restart and self.guard is not None:
            self.guard.close()
            self.guard = None
