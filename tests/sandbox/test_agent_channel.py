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
from kernelhub.sandbox.agent_channel import MAX_PACKET, AgentChannel


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
        for packet in (b"not json", b"[1, 2]", b'"text"', {"op": "unknown"}, {"op": "exit", "id": "7"}):
            agent.say(packet)
        agent.say({"op": "failed", "id": None, "message": "bad message: x" * 100})
        agent.say({"op": "exit", "id": 3, "status": -9})
        agent.say({"op": "exit", "id": 4, "status": "zero"})
        agent.say({"op": "ready"})
        await channel.wait_ready(5)  # packets arrive in order: everything before it was handled
        assert agent.exits == [(3, -9), (4, -1)]
        assert len(agent.logged) == 1 and agent.logged[0].startswith("agent: bad message") \
            and len(agent.logged[0]) <= 507
        assert not channel.closed
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
