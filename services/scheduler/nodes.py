"""The inference nodes a scheduler knows: their health, load, and who gets the next job."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.internal_auth import InternalToken
from services.internal.v1 import inference_service_pb2 as inference_pb2
from services.internal.v1 import inference_service_pb2_grpc as inference_grpc
from services.scheduler.work_link import WorkLink

log = logging.getLogger(__name__)
INFERENCE_SERVICE = "cutout.internal.v1.InferenceService"
# A node whose Work stream is open is polled at most this often: its credits already
# say when it has room, so the poll only refreshes health, draining and other
# schedulers' load (two unary calls per node per poll were 6 % of a scheduler's CPU
# at 8 nodes polled every 0.2 s). Still well inside CUTOUT_NODE_SILENT_S's default 5 s.
STREAMING_POLL_S = 1.0


@dataclass
class Node:
    address: str
    channel: grpc.aio.Channel
    stub: inference_grpc.InferenceServiceAsyncStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    draining: bool = False
    capacity: int = 0
    # The node's own count at its last GetLoad, and ours when that answer came: the
    # difference is what other schedulers run there. Our own attempts count from
    # local_in_flight as they start and end, so a slot we free is free at once, not
    # at the next poll (a report taken while we filled the node once kept it "full"
    # for a whole poll interval: half of a fixed-time fleet's slots sat idle).
    reported_in_flight: int = 0
    local_at_report: int = 0
    local_in_flight: int = 0
    # Light jobs (transforms, ID/square crops) have their own slots on each node.
    light_capacity: int = 0
    reported_light_in_flight: int = 0
    local_light_at_report: int = 0
    local_light_in_flight: int = 0
    # Jobs per lane the node lets a Work stream have waiting there for a slot (GetLoad's
    # prefetch): sent ahead, so a freed slot starts the next job without a round trip here.
    prefetch: int = 0
    models: dict[str, str] = field(default_factory=dict)  # name -> execution provider
    # name -> (runtime, device, precision), as the node reported in GetLoad.
    runtimes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    # Since when (time.monotonic()) every poll of the node has gone unanswered; None
    # while it answers, whatever it answers (a draining node still does; a frozen or
    # partitioned one does not). Counted from polls that were made, so a scheduler that
    # was itself too busy to poll never takes its nodes for silent.
    failing_since: float | None = None
    # The node's Work stream, opened after its first answered poll: every attempt goes
    # over it, and its credit bounds the room we see (none until it is open).
    work: WorkLink | None = None
    next_poll: float = 0.0  # time.monotonic() of the next health/load poll

    @property
    def poll_every_s(self) -> float | None:
        """STREAMING_POLL_S while the Work stream is up; None: every round."""
        return STREAMING_POLL_S if self.work is not None and self.work.up else None

    @property
    def silent_s(self) -> float:
        """For how long every poll of the node has gone unanswered (0 while it answers)."""
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    @property
    def in_flight(self) -> int:
        # Ours as they are now, plus other schedulers' as of the last report.
        others = max(0, self.reported_in_flight - self.local_at_report)
        return self.local_in_flight + others

    @property
    def light_in_flight(self) -> int:
        others = max(0, self.reported_light_in_flight - self.local_light_at_report)
        return self.local_light_in_flight + others

    def idle_slots(self, light: bool) -> int:
        """Slots with no job of ours or another scheduler's (running or waiting) on them."""
        if light:
            return max(0, self.light_capacity - self.light_in_flight)
        return max(0, self.capacity - self.in_flight)

    def room(self, light: bool) -> int:
        """Jobs we may send now: free slots and the node's waiting room, never beyond the
        Work stream's credit (none while the stream is down)."""
        if not self.healthy or self.draining or self.work is None:
            return 0
        if light:
            room = self.light_capacity - self.light_in_flight
        else:
            room = self.capacity - self.in_flight
        return max(0, min(room + self.prefetch, self.work.room(light)))

    @property
    def free(self) -> int:
        return self.room(False)

    @property
    def light_free(self) -> int:
        return self.room(True)

    def claimable(self, light: bool) -> bool:
        """Worth a claim now: a slot would sit idle otherwise, or half of the node's
        waiting room is free. A waiting room refilled one job per freed slot cost a claim
        and a stream write per job (bench/scale.py: +50 % scheduler CPU per job); in
        halves, the jobs still waiting there cover the refill's round trip."""
        room = self.room(light)
        return room > 0 and (self.idle_slots(light) > 0 or room >= (self.prefetch + 1) // 2)

    @property
    def load(self) -> float:
        return self.in_flight / self.capacity if self.capacity else 1.0

    def started(self, light: bool) -> None:
        if light:
            self.local_light_in_flight += 1
        else:
            self.local_in_flight += 1

    def finished(self, light: bool) -> None:
        if light:
            self.local_light_in_flight -= 1
        else:
            self.local_in_flight -= 1

    def refused(self, light: bool) -> None:
        """It said it was full: treat it as full until the next poll."""
        full = self.prefetch
        if light:
            self.reported_light_in_flight = self.light_capacity + full
            self.local_light_at_report = 0
        else:
            self.reported_in_flight, self.local_at_report = self.capacity + full, 0


def most_light_room(nodes: list[Node], rng: random.Random) -> Node | None:
    """For a light job: any node with a free light slot, the roomiest of two random picks."""
    candidates = [n for n in nodes if n.claimable(True)]
    if not candidates:
        return None
    pair = rng.sample(candidates, min(2, len(candidates)))
    return max(pair, key=lambda n: n.light_free)


def least_loaded(nodes: list[Node], rng: random.Random) -> Node | None:
    """The node with the lowest in-flight/capacity ratio that has a free slot.

    Ties go to the better of two random picks (power of two choices), which
    spreads schedulers that see the same loads across nodes instead of all
    piling onto the first.
    """
    candidates = [n for n in nodes if n.claimable(False)]
    if not candidates:
        return None
    best = min(n.load for n in candidates)
    tied = [n for n in candidates if n.load == best]
    if len(tied) == 1:
        return tied[0]
    a, b = rng.sample(tied, 2)
    return a if a.free >= b.free else b


Resolve = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> addresses


async def resolve_all(host: str, port: int) -> list[str]:
    """Every A and AAAA record of host, as gRPC target strings."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    found: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        target = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if target not in found:
            found.append(target)
    return found


def split_entries(entries: list[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """CUTOUT_NODES entries -> (static addresses, (name, port) to look up in DNS)."""
    static: list[str] = []
    names: list[tuple[str, int]] = []
    for entry in entries:
        if entry.startswith("dns:///"):
            host, sep, port = entry.removeprefix("dns:///").rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"node entry {entry!r} is not dns:///name:port")
            names.append((host, int(port)))
        else:
            static.append(entry)
    return static, names


class NodePool:
    """The nodes to dispatch to: a static list and/or every DNS record of a name.

    Each is polled with grpc.health.v1 and GetLoad. A node that leaves DNS
    (its pod is gone or being replaced) takes no new job; its channel closes
    once the attempts running on it are over.
    """

    def __init__(
        self,
        entries: list[str],
        poll_interval_s: float,
        max_message_bytes: int,
        token: InternalToken,
        dns_interval_s: float = 5.0,
        resolve: Resolve = resolve_all,
    ) -> None:
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        # Sent with every call to a node (Work, GetLoad): nodes refuse calls without it.
        self.metadata = token.metadata()
        self.static, self.dns_names = split_entries(entries)
        self.nodes: list[Node] = [self._connect(a) for a in self.static]
        self._retired: list[Node] = []
        self.poll_interval_s = poll_interval_s
        self.dns_interval_s = dns_interval_s
        self._resolve = resolve
        self._next_lookup = 0.0
        # Called when a node may have more room (a poll, credit on its Work stream).
        self.on_change: Callable[[], None] = lambda: None
        self._rng = random.Random()

    def _connect(self, address: str) -> Node:
        channel = grpc.aio.insecure_channel(address, options=self._options)
        return Node(
            address=address,
            channel=channel,
            stub=inference_grpc.InferenceServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )

    async def refresh_dns(self) -> None:
        """Look the DNS names up again; add new records, retire vanished ones.

        A failed lookup keeps the nodes known so far (a DNS hiccup must not
        empty the fleet).
        """
        if not self.dns_names:
            return
        wanted = list(self.static)
        for host, port in self.dns_names:
            try:
                found = await self._resolve(host, port)
            except OSError as exc:
                log.warning("node DNS lookup failed", extra={"dns_name": host, "error": str(exc)})
                return
            wanted += [a for a in found if a not in wanted]
        known = {n.address: n for n in self.nodes}
        added = [a for a in wanted if a not in known]
        gone = [n for n in self.nodes if n.address not in wanted]
        if added or gone:
            log.info(
                "node set changed", extra={"added": added, "removed": [n.address for n in gone]}
            )
        for node in gone:
            node.healthy = False  # no new work
            self._retired.append(node)
        self.nodes = [n for n in self.nodes if n.address in wanted] + [
            self._connect(a) for a in added
        ]
        still: list[Node] = []
        for node in self._retired:
            if node.local_in_flight > 0 or node.local_light_in_flight > 0:
                still.append(node)
            else:
                if node.work is not None:
                    await node.work.close()
                await node.channel.close(None)
        self._retired = still

    def pick(self, light: bool = False) -> Node | None:
        if light:
            return most_light_room(self.nodes, self._rng)
        return least_loaded(self.nodes, self._rng)

    def mark_failed(self, node: Node) -> None:
        """A call to the node failed at the transport: stop using it until it answers a poll."""
        if node.healthy:
            log.warning("node marked unhealthy", extra={"node": node.address})
        node.healthy = False

    def _changed(self) -> None:
        self.on_change()  # looked up each time: the dispatcher sets it after the pool exists

    async def poll_once(self) -> None:
        """Poll every node that is due (all of them, but those with an open Work stream
        only every STREAMING_POLL_S)."""
        now = time.monotonic()
        due = [n for n in self.nodes if n.next_poll <= now]
        for node in due:
            every = node.poll_every_s
            node.next_poll = (
                now + every if every is not None and every > self.poll_interval_s else 0.0
            )
        await asyncio.gather(*(self._poll(node) for node in due))

    async def _poll(self, node: Node) -> None:
        was_free = node.free + node.light_free
        asked = time.monotonic()
        try:
            health = await node.health.Check(
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=2.0
            )
            load = await node.stub.GetLoad(
                inference_pb2.GetLoadRequest(), timeout=2.0, metadata=self.metadata
            )
        except grpc.aio.AioRpcError:
            if node.healthy:
                log.warning("node stopped answering", extra={"node": node.address})
            node.healthy = False
            node.failing_since = node.failing_since or asked
            return
        node.failing_since = None
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        if serving and not node.healthy:
            log.info("node is up", extra={"node": node.address, "capacity": load.capacity})
        node.healthy = serving
        node.draining = load.draining
        node.capacity = load.capacity
        # Waiting jobs are ours or other schedulers' as running ones are.
        node.reported_in_flight = load.in_flight + load.waiting
        node.local_at_report = node.local_in_flight
        node.light_capacity = load.light_capacity
        node.reported_light_in_flight = load.light_in_flight + load.light_waiting
        node.prefetch = load.prefetch
        node.local_light_at_report = node.local_light_in_flight
        node.models = {m.name: m.execution_provider for m in load.models}
        node.runtimes = {m.name: (m.runtime, m.device, m.precision) for m in load.models}
        if node.work is None:
            node.work = WorkLink(node.address, node.stub, self.metadata, self._changed)
            node.work.start()
        if node.free + node.light_free > was_free:
            self.on_change()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= self._next_lookup:
                self._next_lookup = loop.time() + self.dns_interval_s
                await self.refresh_dns()
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    def capacity(self, light: bool = False) -> int:
        """Slots of the healthy nodes: inference, or light when light is set."""
        up = [n for n in self.nodes if n.healthy]
        return sum(n.light_capacity if light else n.capacity for n in up)

    def totals(self) -> tuple[int, int, int]:
        """(healthy nodes, their capacity, their in-flight jobs)."""
        up = [n for n in self.nodes if n.healthy]
        return len(up), sum(n.capacity for n in up), sum(n.in_flight for n in up)

    def runtimes(self) -> dict[tuple[str, str, str, str], int]:
        """(model, runtime, device, precision) -> healthy nodes running the model that way."""
        counts: dict[tuple[str, str, str, str], int] = {}
        for node in self.nodes:
            if node.healthy:
                for model, how in node.runtimes.items():
                    counts[(model, *how)] = counts.get((model, *how), 0) + 1
        return counts

    async def close(self) -> None:
        links = [n.work for n in self.nodes + self._retired if n.work is not None]
        await asyncio.gather(*(link.close() for link in links))
        await asyncio.gather(*(n.channel.close(None) for n in self.nodes + self._retired))
