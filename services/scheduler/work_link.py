"""The scheduler's end of a node's Work stream: one call per node, not one per attempt.

bench/scale.py put the scheduler at ~2 ms of CPU per 50 ms job, most of it
setting up a call per attempt; one long-lived stream per node carries every
attempt instead. The node grants credits (slots, per lane);
`credit` is what may still be sent, and the dispatcher's view of the node's
room (Node.free) never exceeds it, so the node never gets a job it did not
grant a slot for. A job is tagged with its job name and attempt number, and
so is every message about it, so an answer reaches only its own attempt.

When the stream breaks, every attempt on it ends with UNAVAILABLE (the node
crashed or went away), and the link opens a new stream with backoff; credits
start again from the node's new grant.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from services.common.work_batches import BATCHES_METADATA, take_ready
from services.internal.v1 import inference_service_pb2 as pb
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
CODES = {code.value[0]: code for code in grpc.StatusCode}
BACKOFF_S = (0.05, 2.0)  # first and longest wait before opening a broken stream again


def request_bytes(message: pb.WorkRequest) -> int:
    return len(message.job.image)


async def _write(
    call: grpc.aio.StreamStreamCall[pb.WorkRequest, pb.WorkResponse],
    send: asyncio.Queue[pb.WorkRequest],
) -> None:
    """Write what is queued on `send` to the stream until the call ends or this is cancelled."""
    left: list[pb.WorkRequest] = []  # taken, but past the last batch's size
    try:
        while True:
            first = left.pop() if left else await send.get()
            ready, left = take_ready(first, send, request_bytes)
            # Several at once: one write instead of one each.
            await call.write(ready[0] if len(ready) == 1 else pb.WorkRequest(more=ready))
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return  # the call is over: the reading side sees how it ended


class NodeError(Exception):
    """An attempt on a Work stream ended with a status other than OK (WorkResponse.end)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class LinkAttempt:
    """One attempt on a Work stream: its messages in order.

    Iterating yields the node's WorkUpdate messages and ends after the
    attempt's output; a failed attempt raises NodeError. `cancel` stops it on
    the node (unless it already ended).
    """

    def __init__(self, link: WorkLink, key: tuple[str, int], timeout_s: float) -> None:
        self._link = link
        self._key = key
        self._queue: asyncio.Queue[pb.WorkResponse | NodeError] = asyncio.Queue()
        self._ended = False
        self._send = link._send
        loop = asyncio.get_running_loop()
        # A timer, not asyncio.timeout around the iteration: the caller awaits Redis
        # between messages, and a deadline must not cancel that.
        self._deadline = loop.call_later(
            timeout_s,
            self._queue.put_nowait,
            NodeError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {timeout_s:.1f} s"),
        )

    def deliver(self, message: pb.WorkResponse | NodeError) -> None:
        self._queue.put_nowait(message)

    def __aiter__(self) -> LinkAttempt:
        return self

    async def __anext__(self) -> pb.WorkUpdate:
        if self._ended:
            raise StopAsyncIteration
        message = await self._queue.get()
        if isinstance(message, NodeError):
            if message.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.cancel()  # the node stops it too
            else:
                self._finish()
            raise message
        if message.WhichOneof("payload") == "end":
            self._finish()
            code = CODES.get(message.end.code, grpc.StatusCode.UNKNOWN)
            if code != grpc.StatusCode.OK:
                raise NodeError(code, message.end.message)
            raise StopAsyncIteration
        return message.update

    def _finish(self) -> None:
        self._ended = True
        self._deadline.cancel()
        self._link._forget(self._key, self)

    def cancel(self) -> None:
        """Stop the attempt on the node, if it is still running there."""
        if self._ended:
            return
        self._finish()
        if self._send is not None and self._send is self._link._send:
            name, attempt = self._key
            self._send.put_nowait(pb.WorkRequest(cancel=pb.WorkCancel(name=name, attempt=attempt)))


class WorkLink:
    """One node's Work stream, opened again whenever it breaks."""

    def __init__(
        self,
        address: str,
        stub: pb_grpc.InferenceServiceAsyncStub,
        metadata: tuple[tuple[str, str], ...],
        on_credit: Callable[[], None],
    ) -> None:
        self.address = address
        self._stub = stub
        self._metadata = metadata
        self._on_credit = on_credit
        self.credit = {False: 0, True: 0}  # light? -> jobs we may still send
        self._send: asyncio.Queue[pb.WorkRequest] | None = None  # None while down
        self._attempts: dict[tuple[str, int], LinkAttempt] = {}
        self._task: asyncio.Task[None] | None = None
        self._generation = 0  # one more each time a stream is lost: its credits with it

    @property
    def up(self) -> bool:
        return self._send is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def room(self, light: bool) -> int:
        return self.credit[light] if self.up else 0

    def reserve(self, light: bool) -> int | None:
        """Take a credit for a job just claimed; the ticket names the stream it is on.

        Taken as the job is claimed, not as its attempt task starts: the claim
        loop may claim again before that task runs, and must see the credit gone.
        """
        if self._send is None or self.credit[light] <= 0:
            return None
        self.credit[light] -= 1
        return self._generation

    def unreserve(self, light: bool, ticket: int | None) -> None:
        """Give back a credit reserve() took for a job that was never sent."""
        if ticket is not None and ticket == self._generation and self._send is not None:
            self.credit[light] += 1
            self._on_credit()

    def start_attempt(
        self, request: pb.WorkJob, ticket: int | None, timeout_s: float
    ) -> LinkAttempt:
        """Send the job on the credit `ticket` reserved; raises NodeError(RESOURCE_EXHAUSTED)
        when it has none on the stream now open."""
        if self._send is None or ticket is None or ticket != self._generation:
            # No credit, or the stream broke (and perhaps reopened with a fresh grant)
            # since the claim: nothing reached the node, so the job goes back free.
            raise NodeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no credit on the work stream")
        key = (request.name, request.attempt)
        attempt = LinkAttempt(self, key, timeout_s)
        self._attempts[key] = attempt
        self._send.put_nowait(pb.WorkRequest(job=request))
        return attempt

    def _forget(self, key: tuple[str, int], attempt: LinkAttempt) -> None:
        if self._attempts.get(key) is attempt:
            del self._attempts[key]

    async def _run(self) -> None:
        wait = BACKOFF_S[0]
        while True:
            send: asyncio.Queue[pb.WorkRequest] = asyncio.Queue()
            try:
                if await self._session(send):
                    wait = BACKOFF_S[0]
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # A node of another version: it gets no job until it serves Work.
                    log.warning("node does not serve Work; no jobs go to it",
                                extra={"node": self.address})  # fmt: skip
                log.debug("work stream broke", extra={"node": self.address, "error": str(exc)})
            finally:
                self._lost()
            await asyncio.sleep(wait)
            wait = min(BACKOFF_S[1], wait * 2)

    async def _session(self, send: asyncio.Queue[pb.WorkRequest]) -> bool:
        """Run one stream until it ends; True when the node granted credit on it."""
        # Batches both ways: jobs claimed together go out in one write (WorkRequest.more),
        # and the node's replies come likewise.
        metadata = (*self._metadata, BATCHES_METADATA)
        # Written by a task of our own, not from a request iterator: grpc consumes an
        # iterator in a task of its own that nothing ends when the call fails (a node
        # killed, a node not there yet), so it waited on `send` for good, and the garbage
        # collector destroyed it pending ("Task was destroyed but it is pending!",
        # "aclose(): asynchronous generator is already running", at ERROR) on every loss.
        call = self._stub.Work(None, metadata=metadata)
        writer = asyncio.get_running_loop().create_task(_write(call, send))
        writer.add_done_callback(lambda _: call.cancel())  # a writer that failed ends it
        try:
            async for batch in call:
                self._received(batch, send)
                for message in batch.more:
                    self._received(message, send)
        finally:
            writer.cancel()
            call.cancel()
            await asyncio.wait([writer])  # over before the stream's queue is dropped
            if not writer.cancelled() and (failed := writer.exception()) is not None:
                raise failed  # not the call ending (the writer returns then): a fault of ours
        return self._send is send

    def _received(self, message: pb.WorkResponse, send: asyncio.Queue[pb.WorkRequest]) -> None:
        kind = message.WhichOneof("payload")
        if kind == "credit":
            if self._send is None:
                self._send = send
                log.info("work stream open", extra={"node": self.address})
            self.credit[False] += message.credit.jobs
            self.credit[True] += message.credit.light_jobs
            self._on_credit()
        elif (
            kind is not None
            and (attempt := self._attempts.get((message.name, message.attempt))) is not None
        ):
            attempt.deliver(message)
        # else: an empty head of a batch, or the answer of an attempt that ended
        # here already (cancelled, timed out)

    def _lost(self) -> None:
        """Every attempt on the broken stream is over: the node will not answer it."""
        was_up = self._send is not None
        self._send = None
        self._generation += 1
        self.credit = {False: 0, True: 0}
        lost, self._attempts = self._attempts, {}
        for attempt in lost.values():
            attempt.deliver(
                NodeError(grpc.StatusCode.UNAVAILABLE, f"work stream to {self.address} broke")
            )
        if was_up:
            log.warning(
                "work stream broke", extra={"node": self.address, "attempts_lost": len(lost)}
            )
