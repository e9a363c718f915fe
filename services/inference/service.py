"""InferenceService: runs attempts in executors and streams their progress.

Inference work (background removal, passport crops) and light work
(transforms, ID/square crops, which need no model) have separate executors
and separate capacities, so a light job never waits behind inference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from cutout.v1 import jobs_pb2
from cutout.v1.jobs_pb2 import Stage
from services.common import operations
from services.common.errors import CutoutError, ResourceExhausted
from services.common.operations import Lane
from services.inference import metrics, pipeline
from services.inference.models import ModelCatalog
from services.inference.progress_relay import ProgressRelay
from services.inference.recycling import RecyclePolicy, give_memory_back, rss_bytes
from services.inference.slots import Slots
from services.inference.work_stream import Slot, WorkSession
from services.internal.v1 import inference_service_pb2 as pb
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[object, object]
CHUNK = 1024 * 1024


def _count(work: asyncio.Future[Any], operation: str, started: float) -> None:
    metrics.PROCESS_SECONDS.labels(operation).observe(time.perf_counter() - started)
    if work.cancelled():
        outcome = "cancelled"
    elif (exc := work.exception()) is None:
        outcome = "succeeded"
    elif isinstance(exc, CutoutError) and not exc.retryable:
        outcome = "invalid"  # pipeline.InvalidImage or Unsupported: the job fails
    else:
        outcome = "error"
    metrics.NODE_JOBS.labels(operation, outcome).inc()


def _progress(stage: int, percent: int) -> pb.WorkProgress:
    return pb.WorkProgress(stage=cast("Stage.ValueType", stage), progress_percent=percent)


@dataclass
class LaneRunner:
    """One lane's executor, its slots and the jobs waiting for one."""

    lane: Lane
    slots: Slots
    executor: ThreadPoolExecutor
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def in_flight(self) -> int:
        return self.slots.in_flight


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        catalog: ModelCatalog,
        node_id: str,
        capacity: int,
        max_pixels: int,
        light_capacity: int = 2,
        prefetch: int = 0,
        recycle: RecyclePolicy | None = None,
        reload: Callable[[], ModelCatalog] | None = None,
        progress_hold_s: float = 0.05,
    ) -> None:
        self.catalog = catalog
        self.progress_hold_s = progress_hold_s
        self.node_id = node_id
        self.max_pixels = max_pixels
        self.draining = False
        # Onnxruntime, OpenCV and Pillow release the GIL for the heavy parts.
        self.prefetch = prefetch
        self.heavy = LaneRunner(
            Lane.HEAVY,
            Slots(capacity, prefetch, Lane.HEAVY.label),
            ThreadPoolExecutor(capacity, "job"),
        )
        self.light = LaneRunner(
            Lane.LIGHT,
            Slots(light_capacity, prefetch, Lane.LIGHT.label),
            ThreadPoolExecutor(light_capacity, "light"),
        )
        self.lanes = {Lane.HEAVY: self.heavy, Lane.LIGHT: self.light}
        self.recycle = recycle or RecyclePolicy(0)
        self.reload = reload
        self.recycling: asyncio.Task[None] | None = None

    # --- capacity and memory -----------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.heavy.capacity

    @property
    def in_flight(self) -> int:
        return self.heavy.in_flight

    async def wait_idle(self) -> None:
        await self.heavy.idle.wait()
        await self.light.idle.wait()

    def shutdown(self) -> None:
        for lane in (self.heavy, self.light):
            lane.executor.shutdown(wait=False, cancel_futures=True)

    def _release(self, lane: LaneRunner) -> None:
        # Called when the work itself ends, not when the stream does: a
        # cancelled call keeps its slot until its thread is really free.
        # Reading RSS costs a /proc read: only when recycling is on and not already under way.
        if self.reload and self.recycle.limit_bytes and self.recycling is None:
            if self.recycle.due(rss_bytes()):
                self.heavy.slots.paused = True  # no waiting job takes the slot meanwhile
                self.recycling = asyncio.get_running_loop().create_task(self._recycle())
        lane.slots.give_back()  # to the first job waiting for it, if any
        if lane is self.heavy:
            metrics.IN_FLIGHT.set(lane.in_flight)
        if lane.in_flight == 0:
            lane.idle.set()

    async def _recycle(self) -> None:
        """Take no inference work, wait for the running jobs, rebuild the sessions."""
        assert self.reload is not None
        try:
            await self.heavy.idle.wait()
            before = rss_bytes()
            old, self.catalog = self.catalog, await asyncio.to_thread(self.reload)
            del old
            await asyncio.to_thread(give_memory_back)
            self.recycle.recycled(before, rss_bytes())
            metrics.RECYCLES.inc()
        except Exception:
            log.exception("recycling the model sessions failed; keeping the old ones")
        finally:
            self.recycling = None
            self.heavy.slots.paused = False
            self.heavy.slots.hand_out()  # jobs that waited through it start now
            if self.heavy.in_flight:
                self.heavy.idle.clear()

    # --- Work --------------------------------------------------------------------

    async def _admit(self, lane: LaneRunner) -> None:
        """Take a slot of the lane, waiting for one if fewer than `prefetch` jobs wait
        already (a lane paused while the node recycles its sessions hands none out).

        A refusal is a ResourceExhausted (slots.Full when slots and waiting room are
        taken): nothing was done, so the job goes back to its queue, not counted."""
        if self.draining:
            raise ResourceExhausted("node is draining")
        await lane.slots.take()
        lane.idle.clear()

    async def Work(
        self, request_iterator: AsyncIterator[pb.WorkRequest], context: Context
    ) -> AsyncIterator[pb.WorkResponse]:
        session = WorkSession(
            self._process,
            self.heavy.capacity + self.prefetch,
            self.light.capacity + self.prefetch,
        )
        async for response in session.serve(request_iterator, context):
            yield response

    async def _process(self, request: pb.WorkJob, slot: Slot) -> AsyncIterator[pb.WorkUpdate]:
        """One attempt's messages on a Work stream; raises CutoutError.

        The slot (the stream's credit) is given back when the work ends.
        """
        lane = self.lanes[Lane.of(request.operation)]
        await self._admit(lane)
        extra = {
            "job_id": request.name.removeprefix("jobs/"),
            "vendor": request.vendor_id,
            "node": self.node_id,
            "attempt": request.attempt,
        }
        loop = asyncio.get_running_loop()
        relay = ProgressRelay(loop, self.progress_hold_s)
        if lane is self.heavy:
            metrics.IN_FLIGHT.set(lane.in_flight)
        operation = operations.name(request.operation)
        started = time.perf_counter()
        work = loop.run_in_executor(
            lane.executor,
            pipeline.run,
            request.operation,
            request.image,
            self.catalog,
            self.max_pixels,
            relay.report,
        )
        work.add_done_callback(lambda _: self._release(lane))
        work.add_done_callback(lambda f: _count(f, operation, started))
        slot.hold()
        work.add_done_callback(lambda _: slot.release())
        # Scheduled after the worker's last report, so every report comes first.
        work.add_done_callback(lambda _: relay.finish())
        log.info("processing", extra=extra)
        async for batch in relay.batches():
            for stage, percent in batch:
                yield pb.WorkUpdate(progress=_progress(stage, percent))
        try:
            output = work.result()
        except CutoutError as exc:  # InvalidImage, Unsupported: the error carries its status
            log.info("job refused", extra={**extra, "error": str(exc)})
            raise
        header = pb.WorkOutput(
            content_type=output.content_type,
            size_bytes=len(output.data),
            width_px=output.width,
            height_px=output.height,
            sha256=output.sha256,
            stages=[_progress(stage, percent) for stage, percent in relay.held],
        )
        if output.subject is not None:
            x, y, w, h = output.subject
            header.subject_box.CopyFrom(
                jobs_pb2.BoundingBox(x_px=x, y_px=y, width_px=w, height_px=h)
            )
        if len(output.data) <= CHUNK:
            header.data = output.data  # one message for the whole result
            yield pb.WorkUpdate(output=header)
        else:
            yield pb.WorkUpdate(output=header)
            for start in range(0, len(output.data), CHUNK):
                yield pb.WorkUpdate(chunk=output.data[start : start + CHUNK])
        log.info("processed", extra={**extra, "bytes": len(output.data)})

    async def GetLoad(self, request: pb.GetLoadRequest, context: Context) -> pb.GetLoadResponse:
        return pb.GetLoadResponse(
            node_id=self.node_id,
            # A node rebuilding its sessions takes no inference work meanwhile.
            capacity=0 if self.recycling is not None else self.heavy.capacity,
            in_flight=self.heavy.in_flight,
            light_capacity=self.light.capacity,
            light_in_flight=self.light.in_flight,
            draining=self.draining,
            rss_bytes=rss_bytes(),
            recycles=self.recycle.recycles,
            work_stream=True,
            work_batches=True,
            prefetch=self.prefetch,
            waiting=self.heavy.slots.waiting,
            light_waiting=self.light.slots.waiting,
            models=[
                pb.ModelInfo(
                    name=m.name,
                    execution_provider=m.execution_provider,
                    requested_providers=m.requested_providers,
                    runtime=m.runtime.runtime,
                    device=m.runtime.device,
                    precision=m.runtime.precision,
                    threads=m.runtime.threads,
                )
                for m in self.catalog.models.values()
            ],
        )
