"""The inference nodes a scheduler knows: their health, load, and who gets the next job."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cutout.v1 import inference_service_pb2 as inference_pb2
from cutout.v1 import inference_service_pb2_grpc as inference_grpc

log = logging.getLogger(__name__)
INFERENCE_SERVICE = "cutout.v1.InferenceService"


@dataclass
class Node:
    address: str
    channel: grpc.aio.Channel
    stub: inference_grpc.InferenceServiceAsyncStub
    health: health_pb2_grpc.HealthStub
    healthy: bool = False
    draining: bool = False
    capacity: int = 0
    reported_in_flight: int = 0
    local_in_flight: int = 0
    models: dict[str, str] = field(default_factory=dict)  # name -> execution provider

    @property
    def in_flight(self) -> int:
        # Other schedulers' jobs show up only in the node's own report.
        return max(self.local_in_flight, self.reported_in_flight)

    @property
    def free(self) -> int:
        if not self.healthy or self.draining:
            return 0
        return max(0, self.capacity - self.in_flight)

    @property
    def load(self) -> float:
        return self.in_flight / self.capacity if self.capacity else 1.0


def least_loaded(nodes: list[Node], rng: random.Random) -> Node | None:
    """The node with the lowest in-flight/capacity ratio that has a free slot.

    Ties go to the better of two random picks (power of two choices), which
    spreads schedulers that see the same loads across nodes instead of all
    piling onto the first.
    """
    candidates = [n for n in nodes if n.free > 0]
    if not candidates:
        return None
    best = min(n.load for n in candidates)
    tied = [n for n in candidates if n.load == best]
    if len(tied) == 1:
        return tied[0]
    a, b = rng.sample(tied, 2)
    return a if a.free >= b.free else b


class NodePool:
    """Polls a static list of nodes with grpc.health.v1 and GetLoad."""

    def __init__(
        self, addresses: list[str], poll_interval_s: float, max_message_bytes: int
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.nodes: list[Node] = []
        for address in addresses:
            channel = grpc.aio.insecure_channel(address, options=options)
            self.nodes.append(
                Node(
                    address=address,
                    channel=channel,
                    stub=inference_grpc.InferenceServiceStub(channel),
                    health=health_pb2_grpc.HealthStub(channel),
                )
            )
        self.poll_interval_s = poll_interval_s
        self.changed = asyncio.Event()
        self._rng = random.Random()

    def pick(self) -> Node | None:
        return least_loaded(self.nodes, self._rng)

    def mark_failed(self, node: Node) -> None:
        """A call to the node failed at the transport: stop using it until it answers a poll."""
        if node.healthy:
            log.warning("node marked unhealthy", extra={"node": node.address})
        node.healthy = False

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(node) for node in self.nodes))

    async def _poll(self, node: Node) -> None:
        was_free = node.free
        try:
            health = await node.health.Check(
                health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE), timeout=2.0
            )
            load = await node.stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=2.0)
        except grpc.aio.AioRpcError:
            if node.healthy:
                log.warning("node stopped answering", extra={"node": node.address})
            node.healthy = False
            return
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        if serving and not node.healthy:
            log.info("node is up", extra={"node": node.address, "capacity": load.capacity})
        node.healthy = serving
        node.draining = load.draining
        node.capacity = load.capacity
        node.reported_in_flight = load.in_flight
        node.models = {m.name: m.execution_provider for m in load.models}
        if node.free > was_free:
            self.changed.set()

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.poll_interval_s)

    def totals(self) -> tuple[int, int, int]:
        """(healthy nodes, their capacity, their in-flight jobs)."""
        up = [n for n in self.nodes if n.healthy]
        return len(up), sum(n.capacity for n in up), sum(n.in_flight for n in up)

    async def close(self) -> None:
        await asyncio.gather(*(n.channel.close(None) for n in self.nodes))
