"""Sends webhook deliveries: signed HTTPS POSTs of finished jobs and batches.

Each scheduler replica leases due deliveries (store/webhooks.py) and keeps up to
`concurrency` attempts going, claiming more as each ends (a slow endpoint holds one
slot for its timeout, not the sender). An attempt:

1. waits (without counting) while the subject's previous delivery is still pending
   (order per job) or a succeeded job's upload is still due (so the webhook carries
   the final result URI);
2. builds the body from the job or batch as it is now, in the public API's JSON
   mapping (protojson: the TS and Python stubs parse it):
       {"type": "job.succeeded", "timestamp": "...Z", "data": {"job": {...}}}
       {"type": "batch.completed", "timestamp": "...Z", "data": {"batch": {...}}}
3. checks the URL like an image URL (resolved once, pinned, public addresses only
   unless allow-listed, https, no redirects) and POSTs it, signed with every valid
   secret of the vendor (services/common/webhook_signing.py), within timeout_s,
   reading at most RESPONSE_CAP bytes of the answer.

2xx: DELIVERED. 410: the endpoint is disabled (the vendor's registered one; a
per-job URL is just not retried) and the delivery ENDPOINT_DISABLED. Anything else,
a timeout or a refused address: due again after retry_base_s * 2^(attempts-1)
(capped at an hour, +/-20% jitter) until retry_window_s after it was queued, then
FAILED. A sender killed mid-attempt leaves the delivery leased; it is due again when
the lease ends, with the same webhook-id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from datetime import UTC, datetime

import aiohttp
import redis.asyncio as aioredis
from google.protobuf import json_format

from services.common import webhook_registry, webhook_signing
from services.common.errors import CutoutError
from services.common.fetch import Pinned
from services.common.webhook_policy import WebhookPolicy
from services.scheduler import metrics
from services.scheduler.store import Store
from services.scheduler.store.webhooks import (
    DELIVERED,
    ENDPOINT_DISABLED,
    FAILED,
    PENDING,
    Message,
)

log = logging.getLogger(__name__)

RESPONSE_CAP = 16 * 1024  # bytes of an endpoint's answer read (and ignored)
MAX_BACKOFF_S = 3600.0
WAIT_S = 1.0  # how long a delivery that waits for another is put off


def _now_ms() -> int:
    return int(time.time() * 1000)


def backoff_s(policy: WebhookPolicy, attempts: int) -> float:
    """Delay after the attempts-th failed attempt: doubling, capped, +/-20% jitter."""
    base = min(MAX_BACKOFF_S, policy.retry_base_s * 2 ** max(0, attempts - 1))
    return float(base * random.uniform(0.8, 1.2))


# The least time between two looks for due deliveries after one that found none.
WAKE_GAP_S = 0.02


class NotReady(Exception):
    """The delivery must wait (for another delivery or an upload), not count an attempt."""


class Dropped(Exception):
    """The delivery must not be sent at all."""


class WebhookSender:
    def __init__(self, store: Store, policy: WebhookPolicy, batch: int = 64) -> None:
        self.store = store
        self.redis: aioredis.Redis = store.redis
        self.prefix = store.keys.prefix
        self.policy = policy
        self.batch = batch
        self.ssl = policy.ssl_context()
        self._running: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        # A lease outlives one attempt (and its connect), so only a sender that died
        # mid-attempt leaves a delivery to wait for it; then it waits no longer.
        store.webhooks.lease_ms = int((2 * policy.timeout_s + 5) * 1000)

    async def run_forever(self, idle_s: float = 0.25) -> None:
        """Keep up to `concurrency` attempts going: claim as slots free up, so one slow
        endpoint holds one slot for its timeout, never the others' deliveries. Between
        claims, sleep until woken (a job ended on this replica's dispatcher, a slot freed)
        or idle_s (a cancel, another replica's job, a retry falling due)."""
        loop = asyncio.get_running_loop()
        while True:
            self.wake.clear()
            try:
                if await self.fill():
                    continue
            except aioredis.RedisError as exc:
                log.warning("webhook sender cannot reach redis", extra={"error": str(exc)})
            found_none = loop.time()
            try:
                await asyncio.wait_for(self.wake.wait(), idle_s)
            except TimeoutError:
                pass
            # Every job that ends wakes the sender, most without a webhook: after a look
            # that found nothing, the next waits WAKE_GAP_S (a busy scheduler looked
            # once per finished job: two Redis calls each).
            gap = found_none + WAKE_GAP_S - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)

    async def fill(self) -> int:
        """Lease due deliveries for the free slots and start an attempt on each; how many."""
        free = self.policy.concurrency - len(self._running)
        if free <= 0:
            return 0
        due = await self.store.webhooks.claim(min(free, self.batch))
        for message in due:
            task = asyncio.create_task(self._attempt(message))
            self._running.add(task)
            task.add_done_callback(self._finished)
        metrics.WEBHOOKS_PENDING.set(await self.store.webhooks.pending())
        return len(due)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook attempt crashed", exc_info=task.exception())
        self.wake.set()  # a slot is free

    async def _attempt(self, message: Message) -> None:
        try:
            body = await self._body(message)
        except NotReady:
            await self.store.webhooks.postpone(message.id, _now_ms() + int(WAIT_S * 1000))
            return
        except Dropped:
            await self.store.webhooks.drop(message.id)
            return
        status, error = await self._post(message, body)
        await self._record(message, status, error)

    async def _body(self, message: Message) -> bytes:
        webhooks = self.store.webhooks
        if message.after and await webhooks.state_of(message.after) == PENDING:
            raise NotReady
        kind, _, subject_id = message.subject.partition("/")
        data: dict[str, object]
        if kind == "jobs":
            if await self.redis.zscore(self.store.keys.deliveries, subject_id) is not None:
                raise NotReady  # its upload is still due: wait for the final result URI
            try:
                job = await self.store.jobs.get(message.vendor, subject_id)
            except CutoutError:
                data = {"job": {"name": message.subject}, "expired": True}
            else:
                data = {"job": json_format.MessageToDict(job)}
        else:
            try:
                batch = await self.store.batches.progress(message.vendor, message.subject)
            except CutoutError:
                data = {"batch": {"name": message.subject}, "expired": True}
            else:
                if not batch.done:
                    # Counted down to 0 before the batch's last items were enqueued (or a
                    # dead letter of it was requeued): its own end queues it again.
                    raise Dropped
                data = {"batch": json_format.MessageToDict(batch)}
        payload = {
            "type": message.event_type,
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": data,
        }
        return json.dumps(payload, separators=(",", ":")).encode()

    async def _post(self, message: Message, body: bytes) -> tuple[int, str]:
        """(HTTP status, error); status 0 when there was no HTTP answer."""
        endpoint = await webhook_registry.read(self.redis, self.prefix, message.vendor)
        if not endpoint.secrets:
            return 0, "the vendor has no webhook signing secret (cutout-admin vendors set)"
        try:
            host, _port, addresses = await self.policy.check(message.url)
        except CutoutError as exc:
            return 0, exc.message
        headers = webhook_signing.headers(endpoint.secrets, message.id, int(time.time()), body)
        headers["user-agent"] = "Cutout-Webhooks/1"
        connector = aiohttp.TCPConnector(
            resolver=Pinned(host, addresses), use_dns_cache=False, force_close=True, ssl=self.ssl
        )
        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, trust_env=False, timeout=timeout
                ) as session,
                session.post(
                    message.url, data=body, headers=headers, allow_redirects=False
                ) as response,
            ):
                await response.content.read(RESPONSE_CAP)
                if 200 <= response.status < 300:
                    return response.status, ""
                return response.status, f"the endpoint answered HTTP {response.status}"
        except TimeoutError:
            return 0, f"no answer within {self.policy.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return 0, f"connection failed ({exc})"

    async def _record(self, message: Message, status: int, error: str) -> None:
        webhooks = self.store.webhooks
        extra = {"webhook_id": message.id, "vendor": message.vendor, "status": status}
        if 200 <= status < 300:
            await webhooks.record(message.id, DELIVERED, status)
            metrics.WEBHOOK_ATTEMPTS.labels(message.vendor, "delivered").inc()
            log.info("webhook delivered", extra=extra)
            return
        if status == 410:
            reason = f"HTTP 410 from the endpoint for {message.id}"
            if await webhook_registry.disable(
                self.redis, self.prefix, message.vendor, message.url, reason
            ):
                log.warning("webhook endpoint disabled: it answered 410", extra=extra)
            await webhooks.record(message.id, ENDPOINT_DISABLED, status, error)
            metrics.WEBHOOK_ATTEMPTS.labels(message.vendor, "disabled").inc()
            return
        attempts = message.attempts + 1
        next_ms = _now_ms() + int(backoff_s(self.policy, attempts) * 1000)
        if next_ms > message.window_start_ms + self.policy.retry_window_s * 1000:
            await webhooks.record(message.id, FAILED, status, error)
            metrics.WEBHOOK_ATTEMPTS.labels(message.vendor, "failed").inc()
            log.error("webhook failed for the whole retry window", extra={**extra, "error": error})
            return
        await webhooks.record(message.id, PENDING, status, error, next_ms)
        metrics.WEBHOOK_ATTEMPTS.labels(message.vendor, "retry").inc()
        log.warning("webhook attempt failed; will retry", extra={**extra, "error": error})
