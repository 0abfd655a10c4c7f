"""The gateway's end of the agent's control socket (kernelhub.sandbox.agent_channel), against a real
SOCK_SEQPACKET socketpair whose other end the test plays as the agent: replies matched to requests, file
descriptors passed along, untrusted packets dropped, and a deadline on every wait."""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from kernelhub.errors import SandboxError
from kernelhub.sandbox.agent_channel import BURST, MAX_PACKET, MAX_REPLY, RATE_PER_S, SLOW_REPLY_S, AgentChannel


class Agent:
    """The test's side of the socketpair, with what the channel reported through its callbacks."""

    def __init__(self) -> None:
        self.gateway_end, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.exits: list[tuple[int, int]] = []
        self.logged: list[str] = []
        self.closed = 0

    def channel(self) -> AgentChannel:
        return AgentChannel(self.gateway_end, on_exit=lambda req, status: self.exits.append((req, status)),
                            on_closed=self._on_closed, log=self.logged.append)

    def _on_closed(self) -> None:
        self.closed += 1

    def say(self, msg: Any) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else json.dumps(msg).encode())

    async def hear(self) -> tuple[dict[str, Any], list[int]]:
        """The next packet the gateway sent, and the descriptors that came with it (the caller closes them)."""
        fds = array.array("i")
        data, anc, _flags, _addr = await asyncio.to_thread(self.sock.recvmsg, MAX_PACKET,
                                                            socket.CMSG_SPACE(3 * fds.itemsize))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        return json.loads(data), list(fds)


@pytest.fixture
def agent() -> Iterator[Agent]:
    made = Agent()
    yield made
    made.sock.close()
    made.gateway_end.close()


def test_ready_requests_replies_and_passed_descriptors(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        agent.say({"op": "ready", "pid": 1})
        assert (await channel.wait_ready(5))["op"] == "ready"
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            req = channel.next_id()
            reply = asyncio.ensure_future(channel.request({"op": "spawn", "id": req}, [w], timeout=5))
            msg, fds = await agent.hear()
            assert msg == {"op": "spawn", "id": req} and len(fds) == 1
            os.write(fds[0], b"through the socket")  # the very pipe the gateway passed
            os.close(fds[0])
            agent.say({"op": "spawned", "id": req + 1, "pid": 99})  # an id nobody asked for: dropped
            agent.say({"op": "spawned", "id": req, "pid": 42})
            assert await reply == {"op": "spawned", "id": req, "pid": 42}
            assert os.read(r, 100) == b"through the socket"
        finally:
            os.close(r)
            os.close(w)
        assert channel.next_id() == req + 1
        channel.close()

    asyncio.run(main())


def test_untrusted_packets_are_dropped_and_exits_reported(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        req = channel.next_id()
        reply = asyncio.ensure_future(channel.request({"op": "spawn", "id": req}, timeout=5))
        await agent.hear()
        agent.say({"op": "spawned", "id": req, "pid": 42})
        await reply
        for packet in (b"not json", b"[1, 2]", b'"text"', {"op": "unknown"}, {"op": "exit", "id": "7"},
                       b"[" * 100000, b"x" * (MAX_REPLY + 10)):
            agent.say(packet)
        agent.say({"op": "failed", "id": None, "message": "bad message: x" * 100})
        agent.say({"op": "exit", "id": 3, "status": -9})  # never spawned: a forged exit
        agent.say({"op": "exit", "id": True, "status": 0})
        agent.say({"op": "exit", "id": req, "status": "zero"})
        agent.say({"op": "exit", "id": req, "status": 0})  # a second exit of the same process
        agent.say({"op": "ready"})
        await channel.wait_ready(5)  # packets arrive in order: everything before it was handled
        assert agent.exits == [(req, -1)]
        assert channel.dropped == 10
        assert agent.logged[0].startswith("agent: dropped a malformed packet")
        assert any(line.startswith("agent: bad message") and len(line) <= 507 for line in agent.logged)
        assert len(agent.logged) == 2  # drops are logged once per interval, not once each
        assert not channel.closed
        channel.close()

    asyncio.run(main())


def test_a_spawn_nobody_waits_for_any_more_is_killed(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        req = channel.next_id()
        with pytest.raises(SandboxError, match="did not answer"):
            await channel.request({"op": "spawn", "id": req}, timeout=0.05)
        await agent.hear()
        agent.say({"op": "spawned", "id": req, "pid": 77})  # too late: the caller gave up
        msg, _ = await asyncio.wait_for(agent.hear(), 5)
        assert msg == {"op": "signal", "id": req, "signal": 9, "group": True}
        # A reply with no usable pid fails the request, and the process is killed as well.
        req = channel.next_id()
        reply = asyncio.ensure_future(channel.request({"op": "spawn", "id": req}, timeout=5))
        await agent.hear()
        agent.say({"op": "spawned", "id": req, "pid": "1; rm -rf /"})
        assert (await reply)["op"] == "failed"
        assert (await asyncio.wait_for(agent.hear(), 5))[0]["signal"] == 9
        agent.say({"op": "exit", "id": req, "status": 0})
        agent.say({"op": "ready"})
        await channel.wait_ready(5)
        assert agent.exits == []
        channel.close()

    asyncio.run(main())


def test_descriptors_from_the_agent_are_never_accepted(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        before = len(os.listdir("/proc/self/fd"))
        r, w = os.pipe()
        try:
            for _ in range(50):
                agent.sock.sendmsg([json.dumps({"op": "failed", "id": None, "message": "fd"}).encode()],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]))])
        finally:
            os.close(r)
            os.close(w)
        agent.say({"op": "ready"})
        await channel.wait_ready(5)
        assert len(os.listdir("/proc/self/fd")) == before
        channel.close()

    asyncio.run(main())


def test_a_flood_is_read_at_a_bounded_rate_and_honest_replies_still_arrive(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        loop = asyncio.get_running_loop()
        req = channel.next_id()
        reply = asyncio.ensure_future(channel.request({"op": "spawn", "id": req}, timeout=30))
        await agent.hear()
        flood = BURST + int(RATE_PER_S)  # about one second of budget past the burst
        agent.sock.setblocking(False)
        sent = 0
        started = loop.time()

        def pump() -> None:  # the flooding agent writes as fast as the socket takes it
            nonlocal sent
            try:
                while sent < flood:
                    agent.sock.send(b'{"op": "exit", "id": 999999, "status": 0}')
                    sent += 1
                agent.sock.send(json.dumps({"op": "spawned", "id": req, "pid": 5}).encode())
                loop.remove_writer(agent.sock.fileno())
            except BlockingIOError:
                pass

        loop.add_writer(agent.sock.fileno(), pump)
        assert (await asyncio.wait_for(reply, 20))["pid"] == 5  # the honest reply queued behind the flood
        elapsed = loop.time() - started
        # Never faster than the budget allows: BURST at once, then RATE_PER_S a second.
        assert elapsed >= (flood - BURST) / RATE_PER_S * 0.9
        assert channel.dropped == flood
        channel.close()

    asyncio.run(main())


def test_a_late_reply_calls_on_slow_until_it_comes(agent: Agent) -> None:
    """A process the agent just started may stop the agent (same uid) before the agent says ``spawned``: the
    waiter's ``on_slow`` (the sandbox: SIGCONT the agent from the host) runs each second the reply is late, and
    the reply that then comes is answered; without one, the deadline still holds."""

    async def main() -> None:
        channel = agent.channel()
        woken: list[float] = []
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_slow() -> None:
            woken.append(loop.time())
            wake.set()

        req = channel.next_id()
        reply = asyncio.ensure_future(channel.request({"op": "spawn", "id": req}, timeout=30, on_slow=on_slow))
        await agent.hear()
        await wake.wait()  # the agent "stopped": no reply until the waiter has woken it
        agent.say({"op": "spawned", "id": req, "pid": 7})
        assert (await reply)["pid"] == 7 and len(woken) == 1
        woken.clear()
        with pytest.raises(SandboxError, match="did not answer within"):
            await channel.request({"op": "spawn", "id": channel.next_id()}, timeout=SLOW_REPLY_S * 2.5,
                                  on_slow=lambda: woken.append(loop.time()))
        assert len(woken) == 2
        channel.close()

    asyncio.run(main())


def test_every_wait_has_a_deadline(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        with pytest.raises(SandboxError, match="not ready within"):
            await channel.wait_ready(0.05)
        # An agent that takes the request and never answers.
        with pytest.raises(SandboxError, match="did not answer within"):
            await channel.request({"op": "spawn", "id": channel.next_id()}, timeout=0.05)
        # An agent that reads nothing: once the socket is full, a send waits for room until its deadline.
        loop = asyncio.get_running_loop()
        sent = 0
        with pytest.raises(SandboxError, match="does not answer"):
            while True:
                await channel.send({"op": "signal", "id": 0, "pad": "x" * 4096}, timeout=0.05)
                sent += 1
        assert sent > 0
        started = loop.time()
        with pytest.raises(SandboxError, match="does not answer"):
            await channel.request({"op": "spawn", "id": channel.next_id()}, timeout=0.2)
        assert 0.15 < loop.time() - started < 5
        channel.close()

    asyncio.run(main())


def test_a_full_socket_sends_as_soon_as_the_agent_reads(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        sent = 0
        with pytest.raises(SandboxError, match="does not answer"):
            while True:  # fill the socket
                await channel.send({"op": "signal", "id": 0, "pad": "x" * 4096}, timeout=0.05)
                sent += 1
        # Two senders wait for room at once; reading makes room, and both get through.
        waiting = [asyncio.ensure_future(channel.send({"op": "signal", "id": n})) for n in (1, 2)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting)
        for _ in range(sent):
            await agent.hear()
        await asyncio.wait_for(asyncio.gather(*waiting), 5)
        heard = [(await agent.hear())[0]["id"] for _ in range(2)]
        assert sorted(heard) == [1, 2]
        channel.close()

    asyncio.run(main())


def test_the_agent_going_away_fails_what_waits_and_closes_the_channel(agent: Agent) -> None:
    async def main() -> None:
        channel = agent.channel()
        ready = asyncio.ensure_future(channel.wait_ready(30))
        reply = asyncio.ensure_future(channel.request({"op": "spawn", "id": channel.next_id()}, timeout=30))
        await agent.hear()
        agent.sock.close()  # the agent died
        with pytest.raises(SandboxError, match="stopped"):
            await reply
        with pytest.raises(SandboxError, match="closed its channel"):
            await ready
        assert channel.closed and agent.closed == 1
        with pytest.raises(SandboxError) as info:
            await channel.send({"op": "signal", "id": 1})
        assert info.value.status == 409
        channel.close()  # idempotent
        assert agent.closed == 1

    asyncio.run(main())
