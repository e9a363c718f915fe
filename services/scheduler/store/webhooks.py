"""Webhook deliveries: queued by lua.py's finish() when a job or batch ends, sent by
services/scheduler/webhooks.py, listed and redelivered through the public API.

Owns `webhook`, `webhooks_due` and `webhook_log`. A delivery is PENDING in
`webhooks_due`, a LeasedOutbox (leased_outbox.py) like the result outbox's, until
the endpoint answers 2xx (DELIVERED), answers 410 (ENDPOINT_DISABLED), or the retry
window ends (FAILED). Senders lease due ones: a lease pushes the due time lease_ms
ahead, so a sender that dies mid-attempt (SIGKILL) only delays the delivery by its
lease; the next attempt carries the same webhook-id. Its attempts are counted in its
`webhook` hash, and the sender chooses when it is due again (backoff with jitter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from cutout.v1 import webhooks_pb2
from services.common.errors import not_found
from services.scheduler.keys import Keys
from services.scheduler.store.leased_outbox import LeasedOutbox

NAME_PREFIX = "webhookDeliveries/"
PENDING = webhooks_pb2.WEBHOOK_DELIVERY_STATE_PENDING
DELIVERED = webhooks_pb2.WEBHOOK_DELIVERY_STATE_DELIVERED
FAILED = webhooks_pb2.WEBHOOK_DELIVERY_STATE_FAILED
ENDPOINT_DISABLED = webhooks_pb2.WEBHOOK_DELIVERY_STATE_ENDPOINT_DISABLED
LOG_KEPT = 10_000  # per vendor, newest; older deliveries expire with WEBHOOK_KEPT_S anyway

# ARGV: prefix, id, state, status_code, error, next_due_ms (PENDING only), kept_s
# Records one attempt's outcome. A delivery no longer PENDING (redelivered meanwhile is
# still PENDING) is left alone. Returns 1 if recorded.
RECORD = r"""
local id, state = ARGV[2], tonumber(ARGV[3])
local mk = key.webhook(id)
if not state_is(redis.call('HGET', mk, 'state'), WEBHOOK_PENDING) then return 0 end
local now = now_ms()
redis.call('HINCRBY', mk, 'attempts', 1)
redis.call('HSET', mk, 'state', state, 'status', ARGV[4], 'error', ARGV[5], 'attempt_ms', now)
if state == WEBHOOK_PENDING then
  redis.call('HSET', mk, 'next_ms', ARGV[6])
  leased.add(id, tonumber(ARGV[6]))
else
  if state == WEBHOOK_DELIVERED then redis.call('HSET', mk, 'delivered_ms', now) end
  redis.call('HDEL', mk, 'next_ms')
  leased.finish(id)
  redis.call('EXPIRE', mk, tonumber(ARGV[7]))
end
return 1
"""

# ARGV: prefix, id, vendor
# Due again now, PENDING, with a fresh retry window. Returns 0 when not the vendor's.
REDELIVER = r"""
local id, vendor = ARGV[2], ARGV[3]
local mk = key.webhook(id)
if redis.call('HGET', mk, 'vendor') ~= vendor then return 0 end
local now = now_ms()
redis.call('PERSIST', mk)
redis.call('HSET', mk, 'state', WEBHOOK_PENDING, 'window_ms', now, 'next_ms', now)
leased.add(id, now)
return 1
"""


@dataclass(frozen=True)
class Message:
    """A pending delivery as its sender needs it."""

    id: str
    vendor: str
    event_type: str
    subject: str  # jobs/ID or batches/ID
    url: str
    attempts: int
    window_start_ms: int  # retries stop retry_window after this
    after: str  # the subject's previous delivery, to be sent first


def _timestamp(ms: bytes | None) -> Timestamp | None:
    if not ms or not int(ms):
        return None
    ts = Timestamp()
    ts.FromMilliseconds(int(ms))
    return ts


def delivery_from_fields(message_id: str, f: dict[bytes, bytes]) -> webhooks_pb2.WebhookDelivery:
    def text(name: str) -> str:
        return f.get(name.encode(), b"").decode()

    out = webhooks_pb2.WebhookDelivery(
        name=NAME_PREFIX + message_id,
        event_type=text("event"),
        subject=text("subject"),
        url=text("url"),
        state=cast(webhooks_pb2.WebhookDeliveryState.ValueType, int(text("state") or 0)),
        attempts=int(text("attempts") or 0),
        last_status_code=int(text("status") or 0),
        last_error=text("error"),
    )
    for field, raw in (
        ("create_time", f.get(b"create_ms")),
        ("last_attempt_time", f.get(b"attempt_ms")),
        ("delivered_time", f.get(b"delivered_ms")),
    ):
        ts = _timestamp(raw)
        if ts is not None:
            getattr(out, field).CopyFrom(ts)
    if out.state == PENDING:
        ts = _timestamp(f.get(b"next_ms") or f.get(b"create_ms"))
        if ts is not None:
            out.next_attempt_time.CopyFrom(ts)
    return out


def message_id_from_name(name: str) -> str:
    message_id = name.removeprefix(NAME_PREFIX)
    if not message_id or "/" in message_id or len(message_id) > 200:
        raise not_found(f"webhook delivery {name!r}")
    return message_id


class Webhooks:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, lease_ms: int = 30_000, kept_s: int = 7 * 86400
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.due = LeasedOutbox(redis, keys, "webhooks_due", lease_ms=lease_ms)
        self.kept_s = kept_s
        self._record = self.due.script(RECORD)
        self._redeliver = self.due.script(REDELIVER)

    @property
    def lease_ms(self) -> int:
        return self.due.lease_ms

    @lease_ms.setter
    def lease_ms(self, value: int) -> None:
        self.due.lease_ms = value

    async def claim(self, limit: int) -> list[Message]:
        """Lease up to limit due deliveries; ones whose record is gone are dropped."""
        ids = await self.due.claim(limit)
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id in ids:
                pipe.hgetall(self.keys.webhook(message_id))
            rows = cast(list[dict[bytes, bytes]], await pipe.execute())
        out: list[Message] = []
        stale: list[str] = []
        for message_id, f in zip(ids, rows, strict=True):
            if not f or int(f.get(b"state", b"0")) != PENDING:
                stale.append(message_id)
                continue
            out.append(
                Message(
                    id=message_id,
                    vendor=f[b"vendor"].decode(),
                    event_type=f[b"event"].decode(),
                    subject=f[b"subject"].decode(),
                    url=f[b"url"].decode(),
                    attempts=int(f.get(b"attempts", b"0")),
                    window_start_ms=int(f.get(b"window_ms") or f.get(b"create_ms") or 0),
                    after=f.get(b"after", b"").decode(),
                )
            )
        await self.due.done(stale)
        return out

    async def state_of(self, message_id: str) -> int:
        """The delivery's state; UNSPECIFIED (0) once it has expired."""
        raw = await self.redis.hget(self.keys.webhook(message_id), "state")
        return int(raw or 0)

    async def record(
        self, message_id: str, state: int, status: int = 0, error: str = "", next_ms: int = 0
    ) -> bool:
        """One attempt's outcome; next_ms is when a still PENDING one is due again."""
        args: list[str | int] = [self.keys.prefix, message_id, state, status, error[:500]]
        return bool(await self._record(args=[*args, next_ms, self.kept_s]))

    async def postpone(self, message_id: str, due_ms: int) -> None:
        """Due again at due_ms without counting an attempt (it waits for another)."""
        await self.due.postpone(message_id, due_ms)

    async def drop(self, message_id: str) -> None:
        """Forget a delivery that must not be sent (a batch that was not done after all)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.due.finish_in(pipe, [message_id])
            pipe.delete(self.keys.webhook(message_id))
            await pipe.execute()

    async def get(self, vendor: str, message_id: str) -> webhooks_pb2.WebhookDelivery:
        f = cast(dict[bytes, bytes], await self.redis.hgetall(self.keys.webhook(message_id)))
        if not f or f.get(b"vendor", b"").decode() != vendor:
            raise not_found(f"webhook delivery {NAME_PREFIX}{message_id}")
        return delivery_from_fields(message_id, f)

    async def page(
        self, vendor: str, page_size: int, page_token: str
    ) -> tuple[list[webhooks_pb2.WebhookDelivery], str]:
        """Newest first; the token is the offset."""
        start = int(page_token or 0)
        log = self.keys.webhook_log(vendor)
        await self.redis.zremrangebyrank(log, 0, -LOG_KEPT - 1)
        ids = cast(list[bytes], await self.redis.zrevrange(log, start, start + page_size - 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.hgetall(self.keys.webhook(member.decode()))
            rows = cast(list[dict[bytes, bytes]], await pipe.execute())
        out = []
        for member, f in zip(ids, rows, strict=True):
            if f:
                out.append(delivery_from_fields(member.decode(), f))
            else:
                await self.redis.zrem(log, member)  # expired
        more = len(ids) == page_size and await self.redis.zcard(log) > start + page_size
        return out, str(start + page_size) if more else ""

    async def redeliver(self, vendor: str, message_id: str) -> webhooks_pb2.WebhookDelivery:
        if not await self._redeliver(args=[self.keys.prefix, message_id, vendor]):
            raise not_found(f"webhook delivery {NAME_PREFIX}{message_id}")
        return await self.get(vendor, message_id)

    async def pending(self) -> int:
        return await self.due.pending()
