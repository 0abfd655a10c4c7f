"""The warm pool: ready sandboxes per template, started in the background and each handed out once.

A pooled sandbox is a whole sandbox of the template's default limits and environment whose first kernel has
started, answered its first ``kernel_info_reply`` and shown that iopub is joined (what
:meth:`JupyterSession.start <kernelhub.services.sessions.JupyterSession.start>` waits for), and in which
nothing else has run. :meth:`Pool.take` is called by
:meth:`Sandboxes._provision <kernelhub.services.sandboxes.Sandboxes._provision>`, the one place a sandbox
comes from: it takes a ready one out of the pool for good and makes it exactly what a cold create of that
request would have made (:meth:`Sandbox.retune <kernelhub.sandbox.sandbox.Sandbox.retune>` for limits and the
sandbox's environment, :meth:`JupyterSession.hand_over <kernelhub.services.sessions.JupyterSession.hand_over>`
for the running kernel's environment), or answers None and the create takes the cold path.

What the pool serves, and what takes the cold path instead:

- served: the template's own language; any ``memory_mb``, ``cpu`` and ``pids`` (written into the live
  cgroup; the tmpfs sizes and rlimits that follow from them are changed too), ``max_file_mb`` (an rlimit),
  the gateway-side limits (timeouts, lifetime, output), tenant, metadata, and ``env`` whose variables a running
  kernel can take (set in the kernel before any of the user's code runs, and in every later process);
- cold: another ``disk_mb`` or ``files`` (the workspace's ext4 image is made with them), a higher ``pids`` or
  ``max_file_mb`` than the template's where root lacks ``CAP_SYS_RESOURCE`` (as here: their rlimits could only
  be lowered, see :meth:`Sandbox.can_retune <kernelhub.sandbox.sandbox.Sandbox.can_retune>`), another kernel
  language (the Jupyter API's TypeScript on the node template), ``env`` naming a variable that a kernel
  reads only while it starts (:data:`STARTUP_ONLY_ENV`: ``PYTHON*``, ``LANG``, ``LC_*``, ``HOME``, ``TZ``,
  ``NODE_*``, …), which no later assignment could make true, and any ``env`` for a kernel that would count
  the request that sets it (node: :data:`SILENT_ENV_LANGUAGES`); a network policy other than ``"none"`` adds
  the proxy variables to ``env``, so a node sandbox with one takes the cold path.

Refilling runs in the background, :attr:`Pool.refill_delay` after a hand-out (the new owner's first requests
come first), at most :attr:`Pool.max_starting` sandboxes at a time, each at a CPU weight
of :attr:`Pool.cpu_weight` (a tenth of a live sandbox's by default) until it is handed out, so that a burst of
refills yields the CPUs to running sandboxes; it pauses while the memory new sandboxes may take
(:meth:`SandboxFactory.memory_headroom <kernelhub.sandbox.factory.SandboxFactory.memory_headroom>`: the host's
``MemAvailable``, or less under a limit on kernelhub's parent cgroup) is below :attr:`Pool.min_free_mb`.
Pooled sandboxes belong to no tenant, count against no cap, are listed nowhere, and are never persisted; their
ids are the ones their owners will get, shown to no one before. They live in the state directory like any
sandbox, so a gateway that died with a pool is reaped at the next start
(:meth:`SandboxFactory.reap_stale <kernelhub.sandbox.factory.SandboxFactory.reap_stale>`), never handed out.

Built and configured by :class:`~kernelhub.services.hub.Hub` (``--pool-size``, ``--Pool.sizes``, the
``KERNELHUB_POOL_*`` variables), started and stopped by :class:`~kernelhub.services.sandboxes.Sandboxes`.
:meth:`Pool.state` is what ``GET /v1/templates`` and the gateway's metrics show.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from traitlets import Dict, Float, Integer
from traitlets.config import LoggingConfigurable

from ..sandbox.cgroups import check_cpu_weight
from ..sandbox.factory import SandboxFactory
from ..sandbox.limits import Limits
from ..sandbox.sandbox import Sandbox, SandboxProcess
from ..settings import ConfigError
from .sessions import JupyterSession
from .templates import Template

#: Variables that a kernel (or its interpreter) reads only while it starts: the interpreter's own switches,
#: the locale, the home (IPython's profile), the time zone, the temporary directory (cached on first use),
#: the allocator's tunables, Node's options and module paths, bash's start-up file. A request that sets one
#: to another value than the pooled kernel started with takes the cold path.
STARTUP_ONLY_ENV = re.compile(
    r"^(PYTHON\w*|IPYTHON\w*|JUPYTER\w*|JPY_\w*|LANG|LANGUAGE|LC_\w+|HOME|TZ|TMPDIR|MALLOC_\w+|GLIBC_TUNABLES"
    r"|NODE_\w+|TS_NODE_\w+|BASH_ENV|ENV)$"
)
#: Languages whose kernels leave no trace of a silent request (ipykernel and bash_kernel count only requests
#: that are not silent): the environment a request adds is set in their pooled kernel that way. tslab counts
#: silent requests too, so a node request that adds variables takes the cold path.
SILENT_ENV_LANGUAGES = frozenset({"python", "bash"})
#: Seconds between the refill loop's looks at the pool when nothing woke it (a hand-out or a finished start
#: wakes it at once; this catches memory coming back and retry times passing).
CHECK_INTERVAL_S = 1.0
#: The longest wait before another try after starts kept failing (doubling from 1 s).
MAX_RETRY_S = 60.0


@dataclasses.dataclass(eq=False)
class Pooled:
    """A ready sandbox and its first kernel's session, as :meth:`Pool.take` hands them out."""

    sandbox: Sandbox
    session: JupyterSession
    #: What the pool appended to ``sandbox.on_exit``, and the task that waits for the kernel to exit while the
    #: sandbox waits in the pool (both undone at hand-out).
    on_exit: Callable[[Sandbox], None] | None = None
    watcher: asyncio.Task[None] | None = None

    def release(self) -> None:
        """Stop the pool's watching: called when the sandbox leaves the pool, handed out or discarded."""
        if self.on_exit is not None:
            with contextlib.suppress(ValueError):
                self.sandbox.on_exit.remove(self.on_exit)
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()


@dataclasses.dataclass(eq=False)
class _Slot:
    """The pool of one template."""

    template: Template
    size: int
    limits: Limits
    ready: collections.deque[Pooled] = dataclasses.field(default_factory=collections.deque)
    starting: int = 0
    #: Sandboxes handed out since the gateway started (a counter for the metrics).
    handed_out: int = 0
    failures: int = 0
    retry_at: float = 0.0

    @property
    def missing(self) -> int:
        return self.size - len(self.ready) - self.starting


class Pool(LoggingConfigurable):
    """Ready sandboxes per template, refilled in the background. Created by the hub (its traitlets are the
    ``--pool-size`` option, ``--Pool.*`` and the ``KERNELHUB_POOL_*`` variables); started and stopped by
    :class:`~kernelhub.services.sandboxes.Sandboxes`, which calls :meth:`take` on every create."""

    # Each option's KERNELHUB_* variable is its ``env`` tag, read by kernelhub.settings.
    size = Integer(2, min=0, help="Ready python sandboxes kept waiting for sandbox_create; 0 turns the pool "
                   "off. Each costs about 33 MiB of memory (PSS) and a uid while it waits; 2 fits a small "
                   "machine and serves bursts of two creates at once.", config=True).tag(
        env="KERNELHUB_POOL_SIZE")
    sizes = Dict(value_trait=Integer(min=0), help='Ready sandboxes per template, e.g. {"python": 4, "node": 1}; '
                 "a template named here ignores --pool-size, one not named has none (python has --pool-size).",
                 config=True).tag(env="KERNELHUB_POOL_SIZES")
    max_starting = Integer(1, min=1, help="Pooled sandboxes started at once while refilling. One leaves the other "
                           "CPUs of a small machine to live sandboxes and the gateway (a start is about 0.5 s of "
                           "CPU); more refill a large pool faster.", config=True).tag(
        env="KERNELHUB_POOL_MAX_STARTING")
    min_free_mb = Integer(1024, min=0, help="Refilling pauses while the memory new sandboxes may take (the "
                          "host's MemAvailable, or less under a memory limit on kernelhub's parent cgroup) is "
                          "below this many MiB.", config=True).tag(env="KERNELHUB_POOL_MIN_FREE_MB")
    cpu_weight = Integer(10, help="CPU weight of a sandbox while it starts and waits in the pool (cgroup v2 "
                         "cpu.weight units, 1 to 10000; a live sandbox has 100, so refills yield the CPUs to "
                         "live sandboxes).", config=True).tag(env="KERNELHUB_POOL_CPU_WEIGHT")
    refill_delay = Float(0.25, min=0.0, help="Seconds a template's pool waits after a hand-out before it "
                         "starts a replacement, so that the new owner's first requests do not compete with the "
                         "start for the gateway and the CPUs.", config=True).tag(env="KERNELHUB_POOL_REFILL_DELAY")
    check_interval = Float(CHECK_INTERVAL_S, help="Seconds between the refill loop's looks at memory and "
                           "retries when nothing else wakes it.", config=True).tag(
        env="KERNELHUB_POOL_CHECK_INTERVAL")

    def __init__(self, factory: SandboxFactory, kernel_spec_manager: KernelSpecManager,
                 templates: Mapping[str, Template], limits: Mapping[str, Limits], **kwargs: Any) -> None:
        """``templates`` by name and the ``limits`` a sandbox of each gets when the request names none (a
        pooled sandbox starts with them, so that a request that names none changes nothing at hand-out).
        Raises :class:`~kernelhub.settings.ConfigError` for ``sizes`` that name an unknown template or a CPU
        weight out of range."""
        super().__init__(**kwargs)
        try:
            check_cpu_weight(self.cpu_weight)
        except ValueError as exc:
            raise ConfigError(f"Pool.cpu_weight: {exc}.") from None
        unknown = sorted(set(self.sizes) - set(templates))
        if unknown:
            raise ConfigError(f"Pool.sizes names unknown template {unknown[0]!r}; known templates are "
                              f"{', '.join(sorted(templates))}.")
        self.factory = factory
        self.kernel_spec_manager = kernel_spec_manager
        self.templates = dict(templates)
        self._slots: dict[str, _Slot] = {}
        for name, template in templates.items():
            size = self.sizes.get(name, self.size if name == "python" else 0)
            self._slots[name] = _Slot(template, int(size), limits[name])
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        #: Starts in flight (cancelled at shutdown) and stops of discarded sandboxes (awaited at shutdown).
        self._fills: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._short_of_memory = False

    # -- state ------------------------------------------------------------------------------------------

    def state(self) -> dict[str, dict[str, int]]:
        """``{template: {"ready": n, "starting": m, "size": k, "handed_out": total}}`` for every template
        (size 0 where it has no pool): sandboxes ready now, starting now, the configured size, and how many
        were handed out since the gateway started. Read by ``GET /v1/templates`` and the gateway's metrics."""
        return {name: {"ready": len(slot.ready), "starting": slot.starting, "size": slot.size,
                       "handed_out": slot.handed_out}
                for name, slot in self._slots.items()}

    def list_templates(self) -> list[dict[str, Any]]:
        """``GET /v1/templates``: every template as :meth:`Template.to_dict` with its ``pool`` state."""
        state = self.state()
        return [{**template.to_dict(), "pool": state[name]} for name, template in self.templates.items()]

    # -- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start refilling. Called by :meth:`Sandboxes.start` once the factory reaped what a previous process
        left (its pooled sandboxes included)."""
        if self._loop_task is None and any(slot.size for slot in self._slots.values()):
            self._loop_task = asyncio.ensure_future(self._refill_loop())

    async def shutdown(self) -> None:
        """Stop refilling and stop every pooled sandbox, ready or starting. Called by
        :meth:`Sandboxes.shutdown` before the live sandboxes stop."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._fills):
            task.cancel()
        await asyncio.gather(*self._fills, return_exceptions=True)
        pooled = [p for slot in self._slots.values() for p in slot.ready]
        for slot in self._slots.values():
            slot.ready.clear()
        for p in pooled:
            p.release()
        await asyncio.gather(*self._tasks, *(self._discard(p.sandbox, p.session, "shutdown") for p in pooled),
                             return_exceptions=True)

    # -- hand-out ---------------------------------------------------------------------------------------

    async def take(self, template: Template, language: str, limits: Limits,
                   env: Mapping[str, str]) -> Pooled | None:
        """A ready sandbox of ``template`` made into what a cold create of ``language``, ``limits`` and
        ``env`` (the template's and the request's, merged) would be, taken out of the pool for good; or None
        when the pool has none ready or cannot serve the request (see the module), and the caller creates one
        cold. Never raises for a pooled sandbox that cannot be handed out: that one is stopped and None
        answered."""
        slot = self._slots.get(template.name)
        if slot is None or not slot.ready or language != template.language:
            return None
        if not slot.ready[0].sandbox.can_retune(limits):
            return None  # another workspace, or rlimits this host cannot raise (all of a slot start alike)
        # What the pooled kernel was started without (a request adds to the template's env, never removes).
        missing = {k: v for k, v in env.items() if template.env.get(k) != v}
        if missing and (language not in SILENT_ENV_LANGUAGES or any(STARTUP_ONLY_ENV.match(k) for k in missing)):
            return None
        while slot.ready:
            pooled = slot.ready.popleft()
            pooled.release()
            if pooled.sandbox.state != "running" or not await pooled.session.km.is_alive():
                self._spawn(self._discard(pooled.sandbox, pooled.session, "failed"))
                self._wake.set()
                continue
            # The replacement waits a moment: the new owner's first requests come now.
            slot.retry_at = max(slot.retry_at, time.monotonic() + self.refill_delay)
            asyncio.get_running_loop().call_later(self.refill_delay, self._wake.set)
            try:
                await pooled.sandbox.retune(limits, env)
                await pooled.session.hand_over(missing)
            except BaseException as exc:
                # Half made into the request's: it can never be handed out, nor put back.
                self._spawn(self._discard(pooled.sandbox, pooled.session, "failed"))
                self._wake.set()
                if not isinstance(exc, Exception):
                    raise  # the create was cancelled
                self.log.warning("pooled sandbox %s could not be handed out (%s); creating one instead",
                                 pooled.sandbox.id, exc)
                return None
            slot.handed_out += 1
            return pooled
        return None

    # -- refilling --------------------------------------------------------------------------------------

    async def _refill_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._refill()
            except OSError as exc:  # out of descriptors (EMFILE) or /proc unreadable: one line, try again later
                self.log.warning("refilling the pool failed (%s); next try in %g s", exc.strerror or exc,
                                 self.check_interval)
            except Exception:  # a broken /proc/meminfo read must not end refilling for good
                self.log.exception("refilling the pool failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.check_interval)

    def _refill(self) -> None:
        if self._closing:
            return
        now = time.monotonic()
        starting = sum(slot.starting for slot in self._slots.values())
        for slot in self._slots.values():
            while slot.missing > 0 and starting < self.max_starting and now >= slot.retry_at:
                if not self._memory_allows():
                    return
                slot.starting += 1
                starting += 1
                self._spawn(self._fill(slot), fill=True)

    def _memory_allows(self) -> bool:
        headroom = self.factory.memory_headroom()
        short = headroom < self.min_free_mb * 1024 * 1024
        if short != self._short_of_memory:
            self._short_of_memory = short
            if short:
                self.log.warning("pool refilling paused: %d MiB of memory left, below --Pool.min_free_mb=%d",
                                 headroom // (1024 * 1024), self.min_free_mb)
            else:
                self.log.info("pool refilling resumed: %d MiB of memory left", headroom // (1024 * 1024))
        return not short

    async def _fill(self, slot: _Slot) -> None:
        """Start one sandbox of ``slot``'s template and its kernel, at the pool's CPU weight, and add it to
        the ready ones. ``slot.starting`` was counted up by the caller."""
        template = slot.template
        sandbox: Sandbox | None = None
        session: JupyterSession | None = None
        try:
            sandbox = await self.factory.create(limits=slot.limits, env=template.env, cpu_weight=self.cpu_weight)
            session = JupyterSession(sandbox, template.language, self.kernel_spec_manager)
            await session.start()
        except BaseException as exc:
            slot.starting -= 1
            if sandbox is not None:
                await self._discard(sandbox, session, "failed")
            if isinstance(exc, Exception):
                slot.failures += 1
                delay = min(MAX_RETRY_S, 2.0 ** (slot.failures - 1))
                slot.retry_at = time.monotonic() + delay
                self.log.warning("a pooled %s sandbox failed to start (%s); next try in %.0f s", template.name,
                                 exc, delay)
                self._wake.set()
                return
            raise
        slot.starting -= 1
        slot.failures = 0
        pooled = Pooled(sandbox, session)
        if self._closing:
            await self._discard(sandbox, session, "shutdown")
            return

        def exited(_: Sandbox | None = None) -> None:
            """The sandbox or its kernel died while it waited: never hand it out; start another."""
            if pooled not in slot.ready:
                return  # already handed out or discarded
            slot.ready.remove(pooled)
            pooled.release()
            self._spawn(self._discard(sandbox, session, "failed"))
            self._wake.set()

        async def watch(process: SandboxProcess) -> None:
            await process.wait()
            exited()

        pooled.on_exit = exited
        sandbox.on_exit.append(exited)
        process = getattr(session.km.provisioner, "process", None)
        if process is not None:
            pooled.watcher = self._spawn(watch(process))
        slot.ready.append(pooled)
        self._wake.set()

    async def _discard(self, sandbox: Sandbox, session: JupyterSession | None, reason: str) -> None:
        """Stop a pooled sandbox that will never be handed out (its kernel first)."""
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
        with contextlib.suppress(Exception):
            await sandbox.stop(reason)

    def _spawn(self, coro: Coroutine[Any, Any, None], *, fill: bool = False) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks = self._fills if fill else self._tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task
