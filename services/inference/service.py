"""InferenceService: runs attempts in a thread pool and streams their progress."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc

from cutout.v1 import inference_service_pb2 as pb
from cutout.v1 import inference_service_pb2_grpc as pb_grpc
from cutout.v1.jobs_pb2 import Stage
from services.common.errors import CutoutError, abort
from services.inference import metrics, pipeline
from services.inference.models import ModelCatalog

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


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, catalog: ModelCatalog, node_id: str, capacity: int, max_pixels: int) -> None:
        self.catalog = catalog
        self.node_id = node_id
        self.capacity = capacity
        self.max_pixels = max_pixels
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()
        # Onnxruntime and Pillow release the GIL for the heavy parts.
        self.executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="job")

    def _release(self, _: object) -> None:
        # Called when the work itself ends, not when the stream does: a
        # cancelled call keeps its slot until its thread is really free.
        self.in_flight -= 1
        metrics.IN_FLIGHT.set(self.in_flight)
        if self.in_flight == 0:
            self.idle.set()

    async def Process(
        self, request: pb.ProcessRequest, context: Context
    ) -> AsyncIterator[pb.ProcessResponse]:
        if self.draining:
            await abort(
                context, CutoutError("node is draining", grpc.StatusCode.RESOURCE_EXHAUSTED)
            )
        if self.in_flight >= self.capacity:
            await abort(
                context,
                CutoutError(
                    f"node is full ({self.capacity} jobs)", grpc.StatusCode.RESOURCE_EXHAUSTED
                ),
            )
        extra = {
            "job_id": request.name.removeprefix("jobs/"),
            "vendor": request.vendor_id,
            "node": self.node_id,
            "attempt": request.attempt,
        }
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def report(stage: int, percent: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (stage, percent))

        self.in_flight += 1
        metrics.IN_FLIGHT.set(self.in_flight)
        self.idle.clear()
        operation = request.operation.WhichOneof("kind") or "none"
        started = time.perf_counter()
        work = loop.run_in_executor(
            self.executor,
            pipeline.run,
            request.operation,
            request.image,
            self.catalog,
            self.max_pixels,
            report,
        )
        work.add_done_callback(self._release)
        work.add_done_callback(lambda f: _count(f, operation, started))
        log.info("processing", extra=extra)
        while not work.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            waiting: list[asyncio.Future[Any]] = [getter, work]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                stage, percent = getter.result()
                progress = pb.ProcessProgress(
                    stage=cast("Stage.ValueType", stage), progress_percent=percent
                )
                yield pb.ProcessResponse(progress=progress)
            else:
                getter.cancel()
        try:
            output = work.result()
        except (pipeline.InvalidImage, pipeline.Unsupported) as exc:
            log.info("job refused", extra={**extra, "error": str(exc)})
            code = grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, pipeline.Unsupported):
                code = grpc.StatusCode.FAILED_PRECONDITION
            await abort(context, CutoutError(str(exc), code))
        yield pb.ProcessResponse(
            output=pb.ProcessOutput(
                content_type=output.content_type,
                size_bytes=len(output.data),
                width_px=output.width,
                height_px=output.height,
                sha256=output.sha256,
            )
        )
        for start in range(0, len(output.data), CHUNK):
            yield pb.ProcessResponse(chunk=output.data[start : start + CHUNK])
        log.info("processed", extra={**extra, "bytes": len(output.data)})

    async def GetLoad(self, request: pb.GetLoadRequest, context: Context) -> pb.GetLoadResponse:
        return pb.GetLoadResponse(
            node_id=self.node_id,
            capacity=self.capacity,
            in_flight=self.in_flight,
            draining=self.draining,
            models=[
                pb.ModelInfo(
                    name=m.name,
                    execution_provider=m.execution_provider,
                    requested_providers=m.requested_providers,
                )
                for m in self.catalog.models.values()
            ],
        )
