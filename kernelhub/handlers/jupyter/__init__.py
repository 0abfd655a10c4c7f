"""The Jupyter API: kernelhub as a drop-in for the Jupyter Kernel Gateway.

Routes and shapes are Jupyter Server's, so ``jupyter lab --gateway-url=... --GatewayClient.auth_token=...``,
Jupyter Server's ``GatewayKernelManager`` and any Kernel Gateway client work unchanged. One module per concern:

- :mod:`.framing`: the websocket's two framings (legacy JSON/binary and ``v1.kernel.websocket.jupyter.org``), pure;
- :mod:`.kernelspecs`: ``/api/kernelspecs`` and the kernelspecs' resource files;
- :mod:`.kernels`: ``/api`` and ``/api/kernels`` over REST;
- :mod:`.channels`: the websocket relay ``/api/kernels/{id}/channels`` and :class:`KernelConnections`, the registry
  of who is connected to which kernel.

The policy (which kernel is whose, restarting a kernel that died, limits) is the service layer's
(:class:`~kernelhub.services.kernels.Kernels`). The app makes one :class:`KernelConnections` per application
(:func:`kernelhub.app.make_app`) and mounts :func:`handlers` with it.
"""

from __future__ import annotations

from typing import Any

from .channels import KernelChannelsHandler, KernelConnections
from .framing import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)
from .kernels import ApiVersionHandler, KernelActionHandler, KernelHandler, MainKernelHandler
from .kernelspecs import KernelSpecHandler, KernelSpecResourceHandler, MainKernelSpecHandler

__all__ = ["KernelConnections", "handlers", "deserialize_binary_message", "deserialize_msg_from_ws_v1",
           "serialize_binary_message", "serialize_msg_to_ws_v1"]

_KERNEL_ID = r"(?P<kernel_id>[\w-]+)"
_KERNEL_NAME = r"(?P<kernel_name>[\w.\-%]+)"

def handlers(connections: KernelConnections) -> list[tuple[str, type, dict[str, Any]]]:
    """The Jupyter API's routes as ``(pattern, handler, kwargs)``; the kernel routes get ``connections``, the
    registry of this application (the app adds the dependencies every handler takes)."""
    connected = {"connections": connections}
    return [
        (r"/api/?", ApiVersionHandler, {}),
        (r"/api/kernelspecs/?", MainKernelSpecHandler, {}),
        (rf"/api/kernelspecs/{_KERNEL_NAME}/?", KernelSpecHandler, {}),
        (rf"/kernelspecs/{_KERNEL_NAME}/(?P<path>.*)", KernelSpecResourceHandler, {}),
        (r"/api/kernels/?", MainKernelHandler, connected),
        (rf"/api/kernels/{_KERNEL_ID}/?", KernelHandler, connected),
        (rf"/api/kernels/{_KERNEL_ID}/(?P<action>restart|interrupt)/?", KernelActionHandler, connected),
        (rf"/api/kernels/{_KERNEL_ID}/channels", KernelChannelsHandler, connected),
    ]
