"""Python client for the Cutout API, asyncio (`AsyncClient`) and blocking (`Client`).

    from cutout import Client
    with Client("127.0.0.1:50051", api_key="ck_...") as c:
        job = c.submit("photo.jpg")
        for event in c.watch(job.name):
            print(event.job.progress_percent)
        c.save_result(job.name, "photo.png")

Retries of UNAVAILABLE live in the channel's service config, not in loops;
submissions always carry a client_key (a random one if you give none), so a
retried submit returns the same job instead of creating a second one.

Every call is written once, in `AsyncClient`. `Client` runs an `AsyncClient` on an
event loop of its own, in a background thread, and waits for each call: a new RPC
is one method here and one line in `Client`, and one `Client` may be used from
many threads at once (calls from threads run concurrently on its loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from cutout.errors import CutoutError
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from cutout.v1 import jobs_pb2, webhooks_pb2

DEFAULT_ADDR = "127.0.0.1:50051"
_Reply = TypeVar("_Reply")
MAX_MESSAGE = 64 * 1024 * 1024
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "cutout.v1.CutoutService"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "3s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]
FORMATS = {
    "png": jobs_pb2.OUTPUT_FORMAT_PNG,
    "webp": jobs_pb2.OUTPUT_FORMAT_WEBP,
    "jpeg": jobs_pb2.OUTPUT_FORMAT_JPEG,
}
FACE_MODES = {
    "passport": jobs_pb2.FACE_CROP_MODE_PASSPORT,
    "id-card": jobs_pb2.FACE_CROP_MODE_ID_CARD,
    "square": jobs_pb2.FACE_CROP_MODE_SQUARE,
}

RESIZE_MODES = {
    "": jobs_pb2.RESIZE_MODE_UNSPECIFIED,
    "fit": jobs_pb2.RESIZE_MODE_FIT,
    "fill": jobs_pb2.RESIZE_MODE_FILL,
}


def parse_color(text: str) -> jobs_pb2.Color:
    """ "RRGGBB" or "RRGGBBAA" (a leading # is fine) -> Color."""
    raw = text.removeprefix("#")
    if len(raw) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in raw):
        raise ValueError(f"colour {text!r} is not RRGGBB or RRGGBBAA hex")
    parts = [int(raw[i : i + 2], 16) for i in range(0, len(raw), 2)]
    return jobs_pb2.Color(
        red=parts[0], green=parts[1], blue=parts[2], alpha=parts[3] if len(parts) == 4 else 255
    )


def image_source(image: bytes | str | os.PathLike[str]) -> jobs_pb2.ImageSource:
    """Bytes are sent as they are; an https:// string is a URL; anything else is a file path."""
    if isinstance(image, bytes):
        return jobs_pb2.ImageSource(content=image)
    if isinstance(image, str) and image.startswith(("https://", "http://")):
        return jobs_pb2.ImageSource(uri=image)
    return jobs_pb2.ImageSource(content=Path(image).read_bytes())


def build_submission(
    image: bytes | str | os.PathLike[str],
    *,
    op: str = "remove-bg",
    model: str = "",
    output_format: str = "png",
    mask_only: bool = False,
    background: str | None = None,
    mode: str = "passport",
    crop_to_subject: bool = False,
    margin: int = 0,
    alpha_matting: bool = False,
    resize: str = "",
    width: int = 0,
    height: int = 0,
    quality: int = 0,
    priority: int = 0,
    client_key: str = "",
    record: tuple[str, str] | None = None,
    webhook_url: str = "",
) -> jobs_pb2.JobSubmission:
    """One JobSubmission from plain arguments (what the CLI flags map to).

    op is "remove-bg" (model, output_format, mask_only, background,
    crop_to_subject, margin, alpha_matting), "crop-face" (mode: passport,
    id-card or square) or "transform" (resize "fit"/"fill"/"", width,
    height, output_format, quality): a light job that never waits behind
    background removals. webhook_url, when given, is notified when the job finishes
    instead of your registered webhook endpoint.
    """
    fmt = FORMATS.get(output_format)
    if fmt is None:
        raise ValueError(f"output format {output_format!r}: use one of {sorted(FORMATS)}")
    operation = jobs_pb2.Operation()
    if op == "remove-bg":
        operation.remove_background.model = model
        operation.remove_background.format = fmt
        operation.remove_background.mask_only = mask_only
        if background:
            operation.remove_background.background_color.CopyFrom(parse_color(background))
        operation.remove_background.crop_to_subject = crop_to_subject
        operation.remove_background.crop_margin_px = margin
        operation.remove_background.alpha_matting = alpha_matting
    elif op == "transform":
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize {resize!r}: use one of {sorted(RESIZE_MODES)}")
        operation.transform.resize = RESIZE_MODES[resize]
        operation.transform.width_px = width
        operation.transform.height_px = height
        operation.transform.format = fmt
        operation.transform.quality = quality
    elif op == "crop-face":
        if mode not in FACE_MODES:
            raise ValueError(f"face crop mode {mode!r}: use one of {sorted(FACE_MODES)}")
        operation.crop_face.mode = FACE_MODES[mode]
        operation.crop_face.format = fmt
    else:
        raise ValueError(f"operation {op!r}: use remove-bg, crop-face or transform")
    sub = jobs_pb2.JobSubmission(
        image=image_source(image),
        operation=operation,
        priority=priority,
        client_key=client_key or uuid.uuid4().hex,
        webhook_url=webhook_url,
    )
    if record is not None:
        sub.record.project_id, sub.record.record_id = record
    return sub


def tls_credentials(tls: bool | str | None) -> grpc.ChannelCredentials | None:
    """Channel credentials for `tls` (see AsyncClient); None means plaintext."""
    if tls is None:
        tls = os.environ.get("CUTOUT_TLS_CA") or os.environ.get("CUTOUT_TLS", "") == "1"
    if tls is False or tls == "":
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    try:
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).read_bytes())
    except OSError as exc:
        raise CutoutError(
            grpc.StatusCode.INVALID_ARGUMENT, f"cannot read the TLS CA bundle {tls}: {exc}"
        ) from exc


def _metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),)


def _key(api_key: str | None) -> str:
    key = api_key or os.environ.get("CUTOUT_API_KEY", "")
    if not key:
        raise CutoutError(
            grpc.StatusCode.UNAUTHENTICATED, "no API key: pass api_key= or set CUTOUT_API_KEY"
        )
    return key


def _rate_limit_delay(err: CutoutError, waited: float, budget: float) -> float | None:
    """How long to wait before retrying a rate-limited call, or None to give up.

    The submission carries its client_key, so a retry can never create a
    second job."""
    if not err.rate_limited or err.retry_after_s is None:
        return None
    if waited + err.retry_after_s > budget:
        return None
    return err.retry_after_s


class AsyncClient:
    """asyncio client; use as `async with AsyncClient(...) as c:`."""

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        rate_limit_wait_s: float = 300.0,
        tls: bool | str | None = None,
    ) -> None:
        """rate_limit_wait_s: how long a submit may wait in total for the server's
        rate limit (it says when to retry); 0 raises the RESOURCE_EXHAUSTED at once.
        tls: True for TLS with the system's roots, a path for a PEM CA bundle, False
        for plaintext; None reads CUTOUT_TLS_CA (a path) or CUTOUT_TLS=1."""
        self.address = address or os.environ.get("CUTOUT_ADDR", DEFAULT_ADDR)
        self._md = _metadata(_key(api_key))
        self.timeout_s = timeout_s
        self.rate_limit_wait_s = rate_limit_wait_s
        creds = tls_credentials(tls)
        if creds is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CutoutServiceStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(self, method: Callable[..., Awaitable[_Reply]], request: object) -> _Reply:
        """One unary call with this client's key and deadline; errors as CutoutError."""
        try:
            return await method(request, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    async def _stream(self, call: Any) -> AsyncIterator[Any]:
        """The replies of a server-streaming call; errors as CutoutError; cancelled when
        the caller stops early."""
        try:
            async for reply in call:
                yield reply
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def submit_submission(self, submission: jobs_pb2.JobSubmission) -> pb.SubmitJobResponse:
        """Submit; when rate limited, wait as the server says (up to rate_limit_wait_s)."""
        request = pb.SubmitJobRequest(submission=submission)
        waited = 0.0
        while True:
            try:
                reply: pb.SubmitJobResponse = await self._call(self._stub.SubmitJob, request)
                return reply
            except CutoutError as err:
                delay = _rate_limit_delay(err, waited, self.rate_limit_wait_s)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            waited += delay

    async def submit(self, image: bytes | str | os.PathLike[str], **options: Any) -> jobs_pb2.Job:
        """Submit one image; options as in build_submission. Returns the queued job."""
        return (await self.submit_submission(build_submission(image, **options))).job

    async def submit_batch(
        self, submissions: list[jobs_pb2.JobSubmission], webhook_url: str = ""
    ) -> pb.SubmitBatchResponse:
        """webhook_url: notified when the batch completes, and when each item without a
        webhook_url of its own finishes (instead of your registered endpoint)."""
        request = pb.SubmitBatchRequest(submissions=submissions, webhook_url=webhook_url)
        reply: pb.SubmitBatchResponse = await self._call(self._stub.SubmitBatch, request)
        return reply

    async def get(self, name: str) -> jobs_pb2.Job:
        reply: pb.GetJobResponse = await self._call(self._stub.GetJob, pb.GetJobRequest(name=name))
        return reply.job

    async def watch(self, name: str) -> AsyncIterator[jobs_pb2.JobEvent]:
        """Every change to the job until it is done; the first event is its state now."""
        call = self._stub.WatchJob(pb.WatchJobRequest(name=name), metadata=self._md)
        async for reply in self._stream(call):
            yield reply.event

    async def list_jobs(
        self, state: int = jobs_pb2.JOB_STATE_UNSPECIFIED, page_size: int = 50, page_token: str = ""
    ) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(state=state, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
        reply: pb.ListJobsResponse = await self._call(self._stub.ListJobs, request)
        return reply

    async def watch_batch(self, name: str) -> AsyncIterator[jobs_pb2.BatchProgress]:
        """The batch's counts and mean progress, on every change, until all its jobs finish."""
        call = self._stub.WatchBatch(pb.WatchBatchRequest(name=name), metadata=self._md)
        async for reply in self._stream(call):
            yield reply.batch

    async def cancel_batch(self, name: str) -> pb.CancelBatchResponse:
        """Cancel every unfinished job of the batch; says how many it cancelled."""
        request = pb.CancelBatchRequest(name=name)
        reply: pb.CancelBatchResponse = await self._call(self._stub.CancelBatch, request)
        return reply

    async def cancel(self, name: str) -> jobs_pb2.Job:
        request = pb.CancelJobRequest(name=name)
        reply: pb.CancelJobResponse = await self._call(self._stub.CancelJob, request)
        return reply.job

    async def result(self, name: str) -> tuple[jobs_pb2.Result, bytes]:
        """The output of a SUCCEEDED job and its description."""
        result = jobs_pb2.Result()
        chunks: list[bytes] = []
        call = self._stub.GetResult(
            pb.GetResultRequest(name=name), metadata=self._md, timeout=self.timeout_s
        )
        async for reply in self._stream(call):
            if reply.HasField("result"):
                result.CopyFrom(reply.result)
            chunks.append(reply.chunk)
        return result, b"".join(chunks)

    async def save_result(self, name: str, path: str | os.PathLike[str]) -> jobs_pb2.Result:
        result, data = await self.result(name)
        Path(path).write_bytes(data)
        return result

    async def stats(self) -> jobs_pb2.QueueStats:
        request = pb.GetQueueStatsRequest()
        reply: pb.GetQueueStatsResponse = await self._call(self._stub.GetQueueStats, request)
        return reply.stats

    async def dead_letters(
        self, page_size: int = 50, page_token: str = ""
    ) -> pb.ListDeadLettersResponse:
        """Jobs that failed after all their retries, most recent first."""
        request = pb.ListDeadLettersRequest(page_size=page_size, page_token=page_token)
        reply: pb.ListDeadLettersResponse = await self._call(self._stub.ListDeadLetters, request)
        return reply

    async def requeue_dead_letter(self, name: str) -> jobs_pb2.Job:
        request = pb.RequeueDeadLetterRequest(name=name)
        reply: pb.RequeueDeadLetterResponse = await self._call(
            self._stub.RequeueDeadLetter, request
        )
        return reply.job

    async def purge_dead_letters(self, names: list[str] | None = None) -> int:
        """Purge the named dead letters, or every one of yours when names is None."""
        request = pb.PurgeDeadLettersRequest(names=names or [], all=names is None)
        reply: pb.PurgeDeadLettersResponse = await self._call(self._stub.PurgeDeadLetters, request)
        return reply.purged_count

    async def webhook_deliveries(
        self, page_size: int = 50, page_token: str = ""
    ) -> pb.ListWebhookDeliveriesResponse:
        """Webhook deliveries of your jobs and batches, newest first."""
        request = pb.ListWebhookDeliveriesRequest(page_size=page_size, page_token=page_token)
        reply: pb.ListWebhookDeliveriesResponse = await self._call(
            self._stub.ListWebhookDeliveries, request
        )
        return reply

    async def webhook_delivery(self, name: str) -> webhooks_pb2.WebhookDelivery:
        request = pb.GetWebhookDeliveryRequest(name=name)
        reply: pb.GetWebhookDeliveryResponse = await self._call(
            self._stub.GetWebhookDelivery, request
        )
        return reply.delivery

    async def redeliver_webhook(self, name: str) -> webhooks_pb2.WebhookDelivery:
        """Send a delivery again now, with the same webhook-id."""
        request = pb.RedeliverWebhookRequest(name=name)
        reply: pb.RedeliverWebhookResponse = await self._call(self._stub.RedeliverWebhook, request)
        return reply.delivery


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _blocking(
    method: Callable[Concatenate[AsyncClient, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[Client, _P], _T]:
    """AsyncClient's method as a blocking method of Client."""

    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._wait(method(self._async, *args, **kwargs))

    call.__name__, call.__qualname__ = method.__name__, f"Client.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


def _blocking_iter(
    method: Callable[Concatenate[AsyncClient, _P], AsyncIterator[_T]],
) -> Callable[Concatenate[Client, _P], Iterator[_T]]:
    """AsyncClient's streaming method as a blocking iterator of Client: each item is
    fetched on the client's loop; leaving the loop early (break, an exception) closes
    the stream, which cancels the call."""

    def call(self: Client, /, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[_T]:
        stream = method(self._async, *args, **kwargs)

        async def next_item() -> _T:
            return await anext(stream)

        async def close() -> None:
            await stream.aclose()  # type: ignore[attr-defined]

        try:
            while True:
                try:
                    yield self._wait(next_item())
                except StopAsyncIteration:
                    return
        finally:
            self._wait(close())

    call.__name__, call.__qualname__ = method.__name__, f"Client.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class Client:
    """Blocking client; use as `with Client(...) as c:`. The same methods as AsyncClient
    (same arguments, same errors), each waiting for its answer; safe to share between
    threads."""

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        rate_limit_wait_s: float = 300.0,
        tls: bool | str | None = None,
    ) -> None:
        """Arguments as AsyncClient's."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="cutout-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncClient:
            return AsyncClient(
                address, api_key, timeout_s=timeout_s, rate_limit_wait_s=rate_limit_wait_s,
                tls=tls,
            )  # fmt: skip

        try:
            self._async = self._wait(make())
        except BaseException:
            self._stop_loop()
            raise
        self.address = self._async.address

    def _wait(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run coro on the client's loop and wait for it (cancelled if this thread is
        interrupted while it waits)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                concurrent.futures.wait([future], timeout=5)
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._wait(self._async.close())
        finally:
            self._stop_loop()

    submit_submission = _blocking(AsyncClient.submit_submission)

    def submit(self, image: bytes | str | os.PathLike[str], **options: Any) -> jobs_pb2.Job:
        """Submit one image; options as in build_submission. Returns the queued job."""
        return self._wait(self._async.submit(image, **options))

    submit_batch = _blocking(AsyncClient.submit_batch)
    get = _blocking(AsyncClient.get)
    watch = _blocking_iter(AsyncClient.watch)
    list_jobs = _blocking(AsyncClient.list_jobs)
    watch_batch = _blocking_iter(AsyncClient.watch_batch)
    cancel_batch = _blocking(AsyncClient.cancel_batch)
    cancel = _blocking(AsyncClient.cancel)
    result = _blocking(AsyncClient.result)
    save_result = _blocking(AsyncClient.save_result)
    stats = _blocking(AsyncClient.stats)
    dead_letters = _blocking(AsyncClient.dead_letters)
    requeue_dead_letter = _blocking(AsyncClient.requeue_dead_letter)
    purge_dead_letters = _blocking(AsyncClient.purge_dead_letters)
    webhook_deliveries = _blocking(AsyncClient.webhook_deliveries)
    webhook_delivery = _blocking(AsyncClient.webhook_delivery)
    redeliver_webhook = _blocking(AsyncClient.redeliver_webhook)
