"""A fixed-service-time inference node: a load generator for benchmarks, never a real node.

    CUTOUT_INTERNAL_TOKEN=... CUTOUT_NODE_CAPACITY=4 CUTOUT_FIXED_SERVICE_MS=50 \\
        python -m bench.fixed_node

It serves the internal InferenceService (cutout.internal.v1) exactly as far as
the scheduler uses it (Work and GetLoad), and nothing of the model: every job
holds one of its slots for CUTOUT_FIXED_SERVICE_MS (an asyncio.sleep, no CPU)
and returns the same 1x1 PNG. GetLoad advertises CUTOUT_NODE_CAPACITY slots
and the jobs in them, as a real node does, so the scheduler dispatches to it
unchanged; a job offered to a full node is refused with RESOURCE_EXHAUSTED,
as a real node refuses it. It takes no light jobs (light capacity 0).

What it is for: measuring the scheduler's own ceiling with many nodes on a
box without GPUs (bench/scale.py), where real nodes would spend the CPU the
scheduler needs. It lives in bench/ and nothing in services/ starts it.

Settings, read like a real node's: CUTOUT_NODE_LISTEN (host:port, port 0 picks
one), CUTOUT_READY_FILE, CUTOUT_INTERNAL_TOKEN, CUTOUT_NODE_CAPACITY,
CUTOUT_NODE_ID, CUTOUT_NODE_PREFETCH, CUTOUT_MODELS (the model names it claims to serve);
CUTOUT_FIXED_SERVICE_MS (default 50), CUTOUT_FIXED_WORK (default 1; 0: do
not serve Work, answering UNIMPLEMENTED like a node from before it) are its
own. On SIGTERM it writes its counters (jobs, most slots ever in use, jobs a
Work stream sent beyond its credit, which must be 0, messages and writes each
way) as JSON to CUTOUT_FIXED_STATS when set.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "clients" / "python")) if p not in sys.path]

from services.common import serving  # noqa: E402
from services.common.errors import CutoutError  # noqa: E402
from services.common.interceptors import ErrorMapping  # noqa: E402
from services.common.internal_auth import InternalAuth, InternalToken  # noqa: E402
from services.common.operations import Lane  # noqa: E402
from services.inference.slots import Full, Slots  # noqa: E402
from services.inference.work_stream import Slot, WorkSession  # noqa: E402
from services.internal.v1 import inference_service_pb2 as pb  # noqa: E402
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = "cutout.internal.v1.InferenceService"
Context = grpc.aio.ServicerContext[object, object]


def tiny_png() -> bytes:
    """A valid 1x1 transparent PNG: every job's result."""
    buf = io.BytesIO()
    Image.new("RGBA", (1, 1)).save(buf, "PNG")
    return buf.getvalue()


class FixedServiceNode(pb_grpc.InferenceServiceServicer):
    """Holds a slot for `service_s` per job; counts what it did."""

    def __init__(
        self,
        slots: int,
        service_s: float,
        node_id: str,
        models: list[str],
        work: bool = True,
        prefetch: int = 0,
    ) -> None:
        self.slots = slots
        # Jobs a Work stream may have waiting here for a slot, as a real node's
        # CUTOUT_NODE_PREFETCH (services/inference/slots.py).
        self.prefetch = prefetch
        self._slots = Slots(slots, prefetch)
        self.work = work  # False: GetLoad does not offer Work, as a node from before it
        # False: GetLoad does not offer batched Work messages, as a node from before them
        self.service_s = service_s
        self.node_id = node_id
        self.models = models
        self.max_in_flight = 0  # the most slots ever in use at once: never above `slots`
        self.completed = 0
        self.refused = 0
        self.sessions: list[WorkSession] = []  # every Work stream opened here
        self.png = tiny_png()
        self.sha256 = hashlib.sha256(self.png).hexdigest()

    async def Work(
        self, request_iterator: AsyncIterator[pb.WorkRequest], context: Context
    ) -> AsyncIterator[pb.WorkResponse]:
        if not self.work:  # as a node from before Work answers
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        session = WorkSession(self._process, self.slots + self.prefetch, 0)
        self.sessions.append(session)
        async for response in session.serve(request_iterator, context):
            yield response

    async def _process(self, request: pb.WorkJob, slot: Slot) -> AsyncIterator[pb.WorkUpdate]:
        try:
            await self._slots.take()  # may wait for a slot (prefetch)
        except Full:
            self.refused += 1
            raise CutoutError(
                f"node is full ({self.slots} heavy jobs)", grpc.StatusCode.RESOURCE_EXHAUSTED
            ) from None
        slot.hold()  # given back below, when the slot time is over
        self.max_in_flight = max(self.max_in_flight, self._slots.in_flight)
        try:
            await asyncio.sleep(self.service_s)
        finally:
            # Released when the work ends, before the output is sent, as a real node does.
            self._slots.give_back()
            slot.release()
        self.completed += 1
        yield pb.WorkUpdate(
            output=pb.WorkOutput(
                content_type="image/png",
                size_bytes=len(self.png),
                width_px=1,
                height_px=1,
                sha256=self.sha256,
                data=self.png,
            )
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: Context) -> pb.GetLoadResponse:
        return pb.GetLoadResponse(
            node_id=self.node_id,
            capacity=self.slots,
            in_flight=self._slots.in_flight,
            prefetch=self.prefetch,
            waiting=self._slots.waiting,
            light_capacity=0,
            work_stream=self.work,
            work_batches=self.work,
            models=[
                pb.ModelInfo(name=m, runtime="fixed", device="none", precision="none")
                for m in self.models
            ],
        )

    def stats(self) -> dict[str, int]:
        return {
            "slots": self.slots,
            "completed": self.completed,
            "refused": self.refused,
            "max_in_flight": self.max_in_flight,
            "work_streams": len(self.sessions),
            "overdrawn": sum(s.overdrawn for s in self.sessions),
            "most_outstanding": max(
                (s.most_outstanding[Lane.HEAVY] for s in self.sessions), default=0
            ),
            "work_reads": sum(s.reads for s in self.sessions),
            "work_jobs_read": sum(s.jobs_read for s in self.sessions),
            "work_writes": sum(s.writes for s in self.sessions),
            "work_messages_written": sum(s.messages_written for s in self.sessions),
        }


async def create_server(
    node: FixedServiceNode, listen: str, token: InternalToken
) -> tuple[grpc.aio.Server, int]:
    """The node's gRPC server (internal token checked, health served), started; its port."""
    server = grpc.aio.server(
        options=serving.server_options(32 * serving.MiB),
        interceptors=[ErrorMapping(), InternalAuth(token)],
    )
    health = serving.add_health_and_reflection(server, [SERVICE_NAME])
    pb_grpc.add_InferenceServiceServicer_to_server(node, server)
    port = serving.bind(server, listen)
    await server.start()
    await serving.set_serving(health, [SERVICE_NAME], True)
    return server, port


async def serve() -> None:
    env = os.environ
    node = FixedServiceNode(
        slots=int(env.get("CUTOUT_NODE_CAPACITY", "4")),
        service_s=float(env.get("CUTOUT_FIXED_SERVICE_MS", "50")) / 1000,
        node_id=env.get("CUTOUT_NODE_ID", f"fixed-{os.getpid()}"),
        models=[m for m in env.get("CUTOUT_MODELS", "tiny").split(",") if m],
        work=env.get("CUTOUT_FIXED_WORK", "1") == "1",
        prefetch=int(env.get("CUTOUT_NODE_PREFETCH", env.get("CUTOUT_NODE_CAPACITY", "4"))),
    )
    server: grpc.aio.Server | None = None

    async def start() -> None:
        nonlocal server
        server, port = await create_server(
            node, env.get("CUTOUT_NODE_LISTEN", "127.0.0.1:0"), InternalToken.from_env()
        )
        serving.write_ready_file(env.get("CUTOUT_READY_FILE", ""), port)

    async def stop() -> None:
        if server is not None:
            await server.stop(grace=2.0)
        if env.get("CUTOUT_FIXED_STATS"):
            Path(env["CUTOUT_FIXED_STATS"]).write_text(json.dumps(node.stats()))

    await serving.run_until_signalled(start, stop)


if __name__ == "__main__":
    asyncio.run(serve())
