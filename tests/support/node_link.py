"""Jobs sent straight to one inference node, the way the scheduler sends them.

A node's one job API is its Work stream; tests and benchmarks that drive a
node without a scheduler use the scheduler's own end of it (WorkLink and
LinkAttempt, services/scheduler/work_link.py), so they exercise the code path
the cluster runs. NodeLink adds only what the dispatcher does around it: wait
for the node's credit before sending a job.

    async with NodeLink(address, token.metadata()) as node:
        updates = await node.run(pb.WorkJob(name="jobs/x", attempt=1, ...))

A job the node refuses raises NodeError (work_link.py) with its status (INVALID_ARGUMENT for
an image no attempt can process, ...). BlockingNodeLink does the same for
threads (bench/node.py's callers), on an event loop of its own.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import grpc

from services.common.operations import Lane
from services.internal.v1 import inference_service_pb2 as pb
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc
from services.scheduler.work_link import LinkAttempt, WorkLink

T = TypeVar("T")
MAX_MESSAGE = 64 << 20  # as large as any output a test or benchmark asks for


class NodeLink:
    """One node's Work stream, opened on entering (once the node granted credit)."""

    def __init__(
        self, address: str, metadata: tuple[tuple[str, str], ...], open_timeout_s: float = 30
    ) -> None:
        self.address = address
        self._metadata = metadata
        self._open_timeout_s = open_timeout_s
        self._credit = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self.link: WorkLink | None = None

    async def __aenter__(self) -> NodeLink:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
        self._channel = grpc.aio.insecure_channel(self.address, options=options)
        stub = pb_grpc.InferenceServiceStub(self._channel)
        self.link = WorkLink(self.address, stub, self._metadata, self._credit.set)
        self.link.start()
        try:
            await asyncio.wait_for(self._credit.wait(), self._open_timeout_s)
        except TimeoutError:
            await self.close()
            raise TimeoutError(
                f"no Work stream to {self.address} within {self._open_timeout_s} s"
            ) from None
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        if self._channel is not None:
            await self._channel.close(None)

    async def send(self, job: pb.WorkJob, timeout_s: float = 60) -> LinkAttempt:
        """Send the job once the node has a slot (a credit) for its lane; its messages follow."""
        assert self.link is not None, "use NodeLink in `async with`"
        light = Lane.of(job.operation).light
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout_s
        while (ticket := self.link.reserve(light)) is None:
            self._credit.clear()
            await asyncio.wait_for(self._credit.wait(), max(0.0, give_up - loop.time()))
        return self.link.start_attempt(job, ticket, timeout_s)

    async def run(self, job: pb.WorkJob, timeout_s: float = 60) -> list[pb.WorkUpdate]:
        """The job's messages (progress, output header, chunks); NodeError when it fails."""
        attempt = await self.send(job, timeout_s)
        try:
            return [update async for update in attempt]
        finally:
            attempt.cancel()  # nothing once it ended; stops it on the node otherwise


def output_of(updates: list[pb.WorkUpdate]) -> tuple[pb.WorkOutput, bytes]:
    """The output header and the whole output, inline or from its chunks."""
    headers = [u.output for u in updates if u.WhichOneof("payload") == "output"]
    assert len(headers) == 1, f"{len(headers)} output headers"
    data = headers[0].data or b"".join(u.chunk for u in updates)
    return headers[0], data


class BlockingNodeLink:
    """NodeLink for threads: its stream runs on an event loop in a thread of its own."""

    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._node = NodeLink(address, metadata)
        try:
            self._call(self._node.__aenter__())
        except BaseException:
            self._stop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def run(self, job: pb.WorkJob, timeout_s: float = 60) -> list[pb.WorkUpdate]:
        """NodeLink.run from any thread; several threads may run jobs at once."""
        return self._call(self._node.run(job, timeout_s))

    def close(self) -> None:
        try:
            self._call(self._node.close())
            self._call(_settle())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _settle() -> None:
    """End what grpc left running on the loop (a closed call's status handler), so the
    loop stops with no task pending."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
