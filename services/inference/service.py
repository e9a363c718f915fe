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
from services.common.errors import CutoutError, abort
from services.inference import metrics, pipeline
from services.inference.models import ModelCatalog
from services.inference.progress_relay import ProgressRelay
from services.inference.recycling import RecyclePolicy, give_memory_back, rss_bytes
from services.inference.slots import Full, Slots
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
    elif isinstance(work.exception(), pipeline.InvalidImage | pipeline.Unsupported):
        outcome = "invalid"
    elif work.exception() is not None:
        outcome = "error"
    else:
        outcome = "succeeded"
    metrics.NODE_JOBS.labels(operation, outcome).inc()


def _progress(stage: int, percent: int) -> pb.ProcessProgress:
    return pb.ProcessProgress(stage=cast("Stage.ValueType", stage), progress_percent=percent)


@dataclass
class Lane:
    """One executor, its slots and the jobs waiting for one."""

    name: str
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
        self.heavy = Lane("heavy", Slots(capacity, prefetch), ThreadPoolExecutor(capacity, "job"))
        self.light = Lane(
            "light", Slots(light_capacity, prefetch), ThreadPoolExecutor(light_capacity, "light")
        )
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

    def _release(self, lane: Lane) -> None:
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

    # --- Process -----------------------------------------------------------------

    async def _admit(self, lane: Lane, wait: bool) -> None:
        """Take a slot of the lane: a Process call only if one is free now; a job on a
        Work stream may wait for one, if fewer than `prefetch` jobs wait already."""
        if self.draining:
            raise CutoutError("node is draining", grpc.StatusCode.RESOURCE_EXHAUSTED)
        if lane is self.heavy and self.recycling is not None and not wait:
            raise CutoutError(
                "node is recycling its model sessions", grpc.StatusCode.RESOURCE_EXHAUSTED
            )
        try:
            if wait:
                await lane.slots.take()
            else:
                lane.slots.take_now()
        except Full:
            raise CutoutError(
                f"node is full ({lane.capacity} {lane.name} jobs"
                + (f", {lane.slots.waiting} waiting)" if wait else ")"),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ) from None
        lane.idle.clear()

    async def Process(
        self, request: pb.ProcessRequest, context: Context
    ) -> AsyncIterator[pb.ProcessResponse]:
        try:
            async for response in self._process(request, None):
                yield response
        except CutoutError as exc:
            await abort(context, exc)

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

    async def _process(
        self, request: pb.ProcessRequest, slot: Slot | None
    ) -> AsyncIterator[pb.ProcessResponse]:
        """One attempt's messages, for Process or a Work stream; raises CutoutError.

        A Work stream's slot (its credit) is given back when the work ends.
        """
        lane = self.light if operations.is_light(request.operation) else self.heavy
        await self._admit(lane, wait=slot is not None)
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
        if slot is not None:
            slot.hold()
            work.add_done_callback(lambda _: slot.release())
        # Scheduled after the worker's last report, so every report comes first.
        work.add_done_callback(lambda _: relay.finish())
        log.info("processing", extra=extra)
        async for batch in relay.batches():
            for stage, percent in batch:
                yield pb.ProcessResponse(progress=_progress(stage, percent))
        try:
            output = work.result()
        except (pipeline.InvalidImage, pipeline.Unsupported) as exc:
            log.info("job refused", extra={**extra, "error": str(exc)})
            code = grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, pipeline.Unsupported):
                code = grpc.StatusCode.FAILED_PRECONDITION
            raise CutoutError(str(exc), code) from exc
        header = pb.ProcessOutput(
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
            yield pb.ProcessResponse(output=header)
        else:
            yield pb.ProcessResponse(output=header)
            for start in range(0, len(output.data), CHUNK):
                yield pb.ProcessResponse(chunk=output.data[start : start + CHUNK])
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
