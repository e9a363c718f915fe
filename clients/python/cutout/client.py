"""Python client for the Cutout API, blocking (`Client`) and asyncio (`AsyncClient`).

    from cutout import Client
    with Client("127.0.0.1:50051", api_key="ck_...") as c:
        job = c.submit("photo.jpg")
        for event in c.watch(job.name):
            print(event.job.progress_percent)
        c.save_result(job.name, "photo.png")

Retries of UNAVAILABLE live in the channel's service config, not in loops;
submissions always carry a client_key (a random one if you give none), so a
retried submit returns the same job instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

from cutout.errors import CutoutError
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from cutout.v1 import jobs_pb2, webhooks_pb2

DEFAULT_ADDR = "127.0.0.1:50051"
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

    async def submit_submission(self, submission: jobs_pb2.JobSubmission) -> pb.SubmitJobResponse:
        """Submit; when rate limited, wait as the server says (up to rate_limit_wait_s)."""
        waited = 0.0
        while True:
            try:
                return await self._stub.SubmitJob(
                    pb.SubmitJobRequest(submission=submission),
                    metadata=self._md,
                    timeout=self.timeout_s,
                )
            except grpc.RpcError as exc:
                err = CutoutError.from_rpc_error(exc)
                delay = _rate_limit_delay(err, waited, self.rate_limit_wait_s)
                if delay is None:
                    raise err from None
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
        try:
            return await self._stub.SubmitBatch(
                pb.SubmitBatchRequest(submissions=submissions, webhook_url=webhook_url),
                metadata=self._md,
                timeout=self.timeout_s,
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    async def get(self, name: str) -> jobs_pb2.Job:
        try:
            reply = await self._stub.GetJob(
                pb.GetJobRequest(name=name), metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.job

    async def watch(self, name: str) -> AsyncIterator[jobs_pb2.JobEvent]:
        """Every change to the job until it is done; the first event is its state now."""
        call = self._stub.WatchJob(pb.WatchJobRequest(name=name), metadata=self._md)
        try:
            async for reply in call:
                yield reply.event
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def list_jobs(
        self, state: int = jobs_pb2.JOB_STATE_UNSPECIFIED, page_size: int = 50, page_token: str = ""
    ) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(state=state, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
        try:
            return await self._stub.ListJobs(request, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    async def watch_batch(self, name: str) -> AsyncIterator[jobs_pb2.BatchProgress]:
        """The batch's counts and mean progress, on every change, until all its jobs finish."""
        call = self._stub.WatchBatch(pb.WatchBatchRequest(name=name), metadata=self._md)
        try:
            async for reply in call:
                yield reply.batch
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def cancel_batch(self, name: str) -> pb.CancelBatchResponse:
        """Cancel every unfinished job of the batch; says how many it cancelled."""
        try:
            reply: pb.CancelBatchResponse = await self._stub.CancelBatch(
                pb.CancelBatchRequest(name=name), metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply

    async def cancel(self, name: str) -> jobs_pb2.Job:
        try:
            reply = await self._stub.CancelJob(
                pb.CancelJobRequest(name=name), metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.job

    async def result(self, name: str) -> tuple[jobs_pb2.Result, bytes]:
        """The output of a SUCCEEDED job and its description."""
        result = jobs_pb2.Result()
        chunks: list[bytes] = []
        call = self._stub.GetResult(
            pb.GetResultRequest(name=name), metadata=self._md, timeout=self.timeout_s
        )
        try:
            async for reply in call:
                if reply.HasField("result"):
                    result.CopyFrom(reply.result)
                chunks.append(reply.chunk)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return result, b"".join(chunks)

    async def save_result(self, name: str, path: str | os.PathLike[str]) -> jobs_pb2.Result:
        result, data = await self.result(name)
        Path(path).write_bytes(data)
        return result

    async def stats(self) -> jobs_pb2.QueueStats:
        try:
            reply = await self._stub.GetQueueStats(
                pb.GetQueueStatsRequest(), metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.stats

    async def dead_letters(
        self, page_size: int = 50, page_token: str = ""
    ) -> pb.ListDeadLettersResponse:
        """Jobs that failed after all their retries, most recent first."""
        request = pb.ListDeadLettersRequest(page_size=page_size, page_token=page_token)
        try:
            return await self._stub.ListDeadLetters(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    async def requeue_dead_letter(self, name: str) -> jobs_pb2.Job:
        request = pb.RequeueDeadLetterRequest(name=name)
        try:
            reply = await self._stub.RequeueDeadLetter(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.job

    async def purge_dead_letters(self, names: list[str] | None = None) -> int:
        """Purge the named dead letters, or every one of yours when names is None."""
        request = pb.PurgeDeadLettersRequest(names=names or [], all=names is None)
        try:
            reply = await self._stub.PurgeDeadLetters(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.purged_count

    async def webhook_deliveries(
        self, page_size: int = 50, page_token: str = ""
    ) -> pb.ListWebhookDeliveriesResponse:
        """Webhook deliveries of your jobs and batches, newest first."""
        request = pb.ListWebhookDeliveriesRequest(page_size=page_size, page_token=page_token)
        try:
            return await self._stub.ListWebhookDeliveries(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    async def webhook_delivery(self, name: str) -> webhooks_pb2.WebhookDelivery:
        request = pb.GetWebhookDeliveryRequest(name=name)
        try:
            reply = await self._stub.GetWebhookDelivery(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.delivery

    async def redeliver_webhook(self, name: str) -> webhooks_pb2.WebhookDelivery:
        """Send a delivery again now, with the same webhook-id."""
        request = pb.RedeliverWebhookRequest(name=name)
        try:
            reply = await self._stub.RedeliverWebhook(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply.delivery


class Client:
    """Blocking client; use as `with Client(...) as c:`."""

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
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(self.address, creds, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.CutoutServiceStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def submit_submission(self, submission: jobs_pb2.JobSubmission) -> pb.SubmitJobResponse:
        """Submit; when rate limited, wait as the server says (up to rate_limit_wait_s)."""
        request = pb.SubmitJobRequest(submission=submission)
        waited = 0.0
        while True:
            try:
                return self._stub.SubmitJob(request, metadata=self._md, timeout=self.timeout_s)
            except grpc.RpcError as exc:
                err = CutoutError.from_rpc_error(exc)
                delay = _rate_limit_delay(err, waited, self.rate_limit_wait_s)
                if delay is None:
                    raise err from None
            time.sleep(delay)
            waited += delay

    def submit(self, image: bytes | str | os.PathLike[str], **options: Any) -> jobs_pb2.Job:
        """Submit one image; options as in build_submission. Returns the queued job."""
        return self.submit_submission(build_submission(image, **options)).job

    def submit_batch(
        self, submissions: list[jobs_pb2.JobSubmission], webhook_url: str = ""
    ) -> pb.SubmitBatchResponse:
        request = pb.SubmitBatchRequest(submissions=submissions, webhook_url=webhook_url)
        try:
            return self._stub.SubmitBatch(request, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def list_jobs(
        self, state: int = jobs_pb2.JOB_STATE_UNSPECIFIED, page_size: int = 50, page_token: str = ""
    ) -> pb.ListJobsResponse:
        request = pb.ListJobsRequest(state=state, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
        try:
            return self._stub.ListJobs(request, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def get(self, name: str) -> jobs_pb2.Job:
        try:
            return self._stub.GetJob(
                pb.GetJobRequest(name=name), metadata=self._md, timeout=self.timeout_s
            ).job
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def watch(self, name: str) -> Iterator[jobs_pb2.JobEvent]:
        call = self._stub.WatchJob(pb.WatchJobRequest(name=name), metadata=self._md)
        try:
            for reply in call:
                yield reply.event
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    def watch_batch(self, name: str) -> Iterator[jobs_pb2.BatchProgress]:
        call = self._stub.WatchBatch(pb.WatchBatchRequest(name=name), metadata=self._md)
        try:
            for reply in call:
                yield reply.batch
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # type: ignore[no-untyped-call]

    def cancel_batch(self, name: str) -> pb.CancelBatchResponse:
        try:
            reply: pb.CancelBatchResponse = self._stub.CancelBatch(
                pb.CancelBatchRequest(name=name), metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return reply

    def cancel(self, name: str) -> jobs_pb2.Job:
        try:
            return self._stub.CancelJob(
                pb.CancelJobRequest(name=name), metadata=self._md, timeout=self.timeout_s
            ).job
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def result(self, name: str) -> tuple[jobs_pb2.Result, bytes]:
        result = jobs_pb2.Result()
        chunks: list[bytes] = []
        try:
            for reply in self._stub.GetResult(
                pb.GetResultRequest(name=name), metadata=self._md, timeout=self.timeout_s
            ):
                if reply.HasField("result"):
                    result.CopyFrom(reply.result)
                chunks.append(reply.chunk)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
        return result, b"".join(chunks)

    def save_result(self, name: str, path: str | os.PathLike[str]) -> jobs_pb2.Result:
        result, data = self.result(name)
        Path(path).write_bytes(data)
        return result

    def stats(self) -> jobs_pb2.QueueStats:
        try:
            return self._stub.GetQueueStats(
                pb.GetQueueStatsRequest(), metadata=self._md, timeout=self.timeout_s
            ).stats
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def dead_letters(self, page_size: int = 50, page_token: str = "") -> pb.ListDeadLettersResponse:
        request = pb.ListDeadLettersRequest(page_size=page_size, page_token=page_token)
        try:
            return self._stub.ListDeadLetters(request, metadata=self._md, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def requeue_dead_letter(self, name: str) -> jobs_pb2.Job:
        request = pb.RequeueDeadLetterRequest(name=name)
        try:
            return self._stub.RequeueDeadLetter(
                request, metadata=self._md, timeout=self.timeout_s
            ).job
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def purge_dead_letters(self, names: list[str] | None = None) -> int:
        request = pb.PurgeDeadLettersRequest(names=names or [], all=names is None)
        try:
            return self._stub.PurgeDeadLetters(
                request, metadata=self._md, timeout=self.timeout_s
            ).purged_count
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def webhook_deliveries(
        self, page_size: int = 50, page_token: str = ""
    ) -> pb.ListWebhookDeliveriesResponse:
        request = pb.ListWebhookDeliveriesRequest(page_size=page_size, page_token=page_token)
        try:
            return self._stub.ListWebhookDeliveries(
                request, metadata=self._md, timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def webhook_delivery(self, name: str) -> webhooks_pb2.WebhookDelivery:
        request = pb.GetWebhookDeliveryRequest(name=name)
        try:
            return self._stub.GetWebhookDelivery(
                request, metadata=self._md, timeout=self.timeout_s
            ).delivery
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None

    def redeliver_webhook(self, name: str) -> webhooks_pb2.WebhookDelivery:
        request = pb.RedeliverWebhookRequest(name=name)
        try:
            return self._stub.RedeliverWebhook(
                request, metadata=self._md, timeout=self.timeout_s
            ).delivery
        except grpc.RpcError as exc:
            raise CutoutError.from_rpc_error(exc) from None
