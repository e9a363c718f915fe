"""An attempt's output: checked as it arrived, stored, and described for its completion."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from cutout.v1 import jobs_pb2
from services.internal.v1 import inference_service_pb2 as inference_pb2
from services.scheduler import metrics
from services.scheduler.progress import ProgressThrottle
from services.scheduler.storage import ResultStores, StorageError
from services.scheduler.store import Claim, Completion

if TYPE_CHECKING:
    from services.scheduler.attempt import AttemptContext

log = logging.getLogger(__name__)
EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}


class ProtocolError(Exception):
    """The node's stream did not have the shape the API promises."""


async def store_output(
    ctx: AttemptContext,
    claim: Claim,
    output: inference_pb2.WorkOutput | None,
    data: bytes,
    progress: ProgressThrottle,
) -> Completion:
    """Check the output, store it (the vendor's remote store, else locally), and return the
    completion that records it: the stages not written yet, the result, SUCCEEDED."""
    if output is None or output.content_type not in EXTENSIONS:
        raise ProtocolError("node ended the stream without a usable output header")
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != output.size_bytes or digest != output.sha256:
        raise ProtocolError(
            f"output arrived damaged: {len(data)} of {output.size_bytes} bytes, "
            f"sha256 {digest[:12]}"
        )
    remote = ctx.results.remote_for(claim.vendor) is not None
    if remote:
        await progress.report(jobs_pb2.STAGE_STORING, 95)  # an upload takes a while
    else:
        progress.add(jobs_pb2.STAGE_STORING, 95)  # a local write: over at once
    key = f"{claim.vendor}/{claim.job_id}.{EXTENSIONS[output.content_type]}"
    record = jobs_pb2.RecordRef.FromString(claim.record) if claim.record else None
    uri = await put(ctx.results, claim, key, data, output.content_type, record)
    # Still to do after SUCCEEDED: an upload that failed inline, a record update.
    pending_upload = remote and uri.startswith("local:")
    result = jobs_pb2.Result(
        content_type=output.content_type,
        size_bytes=output.size_bytes,
        width_px=output.width_px,
        height_px=output.height_px,
        uri=uri,
        sha256=digest,
    )
    if output.HasField("subject_box"):
        result.subject_box.CopyFrom(output.subject_box)
    deliver = pending_upload or record is not None
    return Completion(claim, result, deliver, progress.take(), ctx.policy.lease_ms)


async def put(
    results: ResultStores,
    claim: Claim,
    key: str,
    data: bytes,
    content_type: str,
    record: jobs_pb2.RecordRef | None,
) -> str:
    """Store in the vendor's remote store; if that fails, keep it locally for later."""
    remote = results.remote_for(claim.vendor)
    if remote is not None:
        try:
            return await remote.put(
                key, data, content_type, folder=record.project_id if record else ""
            )
        except StorageError as exc:
            metrics.STORAGE_ERRORS.labels(results.backend_of(claim.vendor), "put").inc()
            log.warning(
                "upload failed; output kept locally and uploaded later",
                extra={"job_id": claim.job_id, "vendor": claim.vendor, "error": str(exc)},
            )
    return await results.local.put(key, data, content_type)
