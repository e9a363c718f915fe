"""The prelude of every Lua script, rendered from the Python facts it needs.

Scripts never spell a number or a key name that Python also knows. The
prelude gives them:

- `STATE_QUEUED`, `STATE_RUNNING`, ... and `STAGE_DECODING`, ... from the proto
  enums `cutout.v1.jobs_pb2.JobState` and `Stage`;
- every outcome in outcomes.py as CLASS_MEMBER (`RETRIED_DEAD_LETTERED`);
- `key.<family>(...)` for every pattern in keys.PATTERNS, its placeholders as
  parameters in order: `key.job(job_id)`, `key.queue(lane, vendor)`;
- PRIORITY_BAND, MAX_PRIORITY (operations), EVENTS_KEPT, LANES (operations.Lane), and the
  vendor policy's field names POLICY_WEIGHT and POLICY_MAX_QUEUED;
- WEBHOOK_PENDING, ... (the webhook delivery states of store/webhooks.py);
- the helpers below, shared by every concern.

Each script gets the key prefix as ARGV[1]. Every state change appends the
hash fields it changed to the job's event stream, which is what WatchJob replays.
"""

from __future__ import annotations

import re
import string
from collections.abc import Awaitable, Callable, Sequence
from enum import IntEnum
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from cutout.v1 import jobs_pb2, webhooks_pb2
from services.common import vendor_policy
from services.common.operations import LANES, MAX_PRIORITY
from services.scheduler.keys import EVENTS_KEPT, PATTERNS, PRIORITY_BAND, fields_of
from services.scheduler.store.outcomes import OUTCOMES

_LITERAL = re.compile(r"^[A-Za-z0-9_:]*$")


def _number(name: str, value: int) -> str:
    return f"local {name} = {value}"


def constants() -> list[str]:
    """`local NAME = value` for the proto's states and stages, every outcome, and the
    other numbers and names the scripts share with Python."""
    lines = [_number(n.removeprefix("JOB_"), v) for n, v in jobs_pb2.JobState.items()]
    lines += [_number(n, v) for n, v in jobs_pb2.Stage.items()]
    lines += [
        _number(n.replace("WEBHOOK_DELIVERY_STATE_", "WEBHOOK_"), v)
        for n, v in webhooks_pb2.WebhookDeliveryState.items()
    ]
    for enum in OUTCOMES:
        lines += [_outcome(enum, member) for member in enum]
    lines += [_number("PRIORITY_BAND", PRIORITY_BAND), _number("MAX_PRIORITY", MAX_PRIORITY)]
    lines += [_number("EVENTS_KEPT", EVENTS_KEPT)]
    lines += [f"local LANES = {{{', '.join(_string(lane) for lane in LANES)}}}"]
    # The fields of the vendor policy hash (key.vendor_policy), named by its module.
    lines += [f"local POLICY_WEIGHT = {_string(vendor_policy.WEIGHT)}"]
    lines += [f"local POLICY_MAX_QUEUED = {_string(vendor_policy.MAX_QUEUED)}"]
    return lines


def _string(literal: str) -> str:
    if not _LITERAL.match(literal):
        raise ValueError(f"{literal!r}: quote-free literals only")
    return f"'{literal}'"


def _outcome(enum: type[IntEnum], member: IntEnum) -> str:
    return _number(f"{enum.__name__.upper()}_{member.name}", member.value)


def key_builder(family: str, pattern: str) -> str:
    """One pattern as a Lua function of its placeholders: P .. 'literal' .. field ..."""
    parts = ["P"]
    for literal, field, _, _ in string.Formatter().parse(pattern):
        if literal:
            parts.append(_string(literal))
        if field is not None:
            parts.append(field)
    params = ", ".join(fields_of(pattern))
    return f"function key.{family}({params}) return {' .. '.join(parts)} end"


def key_builders() -> list[str]:
    return ["local key = {}", *(key_builder(f, p) for f, p in PATTERNS.items())]


_HELPERS = r"""
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function event(id, ...)
  redis.call('XADD', key.events(id), 'MAXLEN', '~', EVENTS_KEPT, '*', ...)
end
local function state_is(value, state) return tonumber(value) == state end
-- The job's lane: '' for inference work, 'light:' for light jobs.
local function lane_of(id)
  return redis.call('HGET', key.job(id), 'lane') or ''
end
local function enqueue_ready(id, vendor, score)
  local lane = lane_of(id)
  redis.call('ZADD', key.queue(lane, vendor), score, id)
  if redis.call('SADD', key.ring_members(lane), vendor) == 1 then
    redis.call('RPUSH', key.ring(lane), vendor)
  end
  redis.call('PUBLISH', key.wake_channel(), vendor)
end
-- A vendor with nothing left to wait in the lane leaves its round robin; its
-- credit is forfeited, so an idle vendor cannot hoard.
local function leave_ring(lane, vendor)
  redis.call('LREM', key.ring(lane), 0, vendor)
  redis.call('SREM', key.ring_members(lane), vendor)
  redis.call('HDEL', key.deficit(lane), vendor)
  redis.call('HDEL', key.turn(lane), vendor)
end
local function leave_running(id, vendor)
  redis.call('ZREM', key.leases(), id)
  redis.call('SREM', key.running(vendor), id)
end
-- Per-vendor counters (monotonic, for stats and metrics): attempts, lease_lost,
-- retried, free_retries, dead_lettered, succeeded, failed.
local function count(vendor, field, n)
  redis.call('HINCRBY', key.counters(vendor), field, n or 1)
end
-- Terminal transition: SUCCEEDED, FAILED or CANCELLED with its outcome field
-- ('result' or 'error'). Everything about the job expires after `retention` seconds.
-- A webhook delivery of `event` about `subject` (jobs/ID, batches/ID) to url, or to
-- the vendor's endpoint when url is ''; nothing when neither is set or the endpoint
-- is disabled. `after`: the subject's previous delivery, sent first (order per job).
local function queue_webhook(vendor, event_type, subject, url, after, now)
  if url == '' then
    local ep = redis.call('HMGET', key.webhook_endpoint(vendor), 'url', 'status')
    if not ep[1] or ep[2] ~= 'active' then return false end
    url = ep[1]
  end
  local mid = 'msg_' .. string.gsub(subject, '/', '_') .. '_' .. now
  local mk = key.webhook(mid)
  if redis.call('EXISTS', mk) == 1 then return mid end
  redis.call('HSET', mk, 'vendor', vendor, 'event', event_type, 'subject', subject,
    'url', url, 'state', WEBHOOK_PENDING, 'attempts', 0, 'create_ms', now, 'after', after or '')
  redis.call('ZADD', key.webhooks_due(), now, mid)
  redis.call('ZADD', key.webhook_log(vendor), now, mid)
  return mid
end
local EVENT_OF = {[STATE_SUCCEEDED] = 'job.succeeded', [STATE_FAILED] = 'job.failed',
  [STATE_CANCELLED] = 'job.cancelled'}
-- Terminal transition: SUCCEEDED, FAILED or CANCELLED with its outcome field
-- ('result' or 'error'). Everything about the job expires after `retention` seconds.
-- Queues the job's webhook, and its batch's when it was the batch's last open job.
local function finish(id, state, progress, field, value, retention)
  local now = now_ms()
  local jk = key.job(id)
  redis.call('HSET', jk, 'state', state, 'stage', STAGE_DONE, 'progress', progress,
    field, value, 'update_ms', now, 'end_ms', now, 'retry_ms', 0)
  event(id, 'state', state, 'stage', STAGE_DONE, 'progress', progress, field, value,
    'retry_ms', 0, 'update_ms', now)
  redis.call('EXPIRE', jk, retention)
  redis.call('EXPIRE', key.events(id), retention)
  local j = redis.call('HMGET', jk, 'vendor', 'webhook', 'batch', 'webhook_last')
  local vendor, url, batch = j[1], j[2] or '', j[3] or ''
  local mid = queue_webhook(vendor, EVENT_OF[tonumber(state)], 'jobs/' .. id, url, j[4], now)
  if mid then redis.call('HSET', jk, 'webhook_last', mid) end
  if batch ~= '' then
    local open = redis.call('HINCRBY', key.batch_open(), vendor .. '/' .. batch, -1)
    if open <= 0 then
      redis.call('HDEL', key.batch_open(), vendor .. '/' .. batch)
      queue_webhook(vendor, 'batch.completed', batch, url, false, now)
    end
  end
end
local function finish_and_free(id, state, progress, field, value, retention)
  finish(id, state, progress, field, value, retention)
  redis.call('DEL', key.input(id))
end
"""

PRELUDE = "\n".join(["local P = ARGV[1]", *constants(), *key_builders(), _HELPERS])


def load(redis: aioredis.Redis, *body: str) -> AsyncScript:
    """A script of the prelude followed by body (helper fragments, then the script's own)."""
    return redis.register_script("\n".join([PRELUDE, *body]))


async def execute_loaded(
    redis: aioredis.Redis,
    build: Callable[[Pipeline], Awaitable[None]],
    scripts: Sequence[AsyncScript],
) -> list[Any]:
    """Run the pipeline `build` fills (transaction=False) without redis-py's SCRIPT EXISTS
    round trip, which it pays before every pipeline that holds a script (a second round
    trip per group of completions). The scripts are taken as loaded; when Redis lacks
    some (a fresh Redis, or one that restarted), they are loaded and only the commands
    it refused with NOSCRIPT are sent again, in their order. The others have run: in a
    pipeline without a transaction each command takes effect alone, and running one a
    second time would do its work twice (a progress update recorded twice is its
    stages twice in the job's events, which watchers see as progress going back).
    Raises the first error of any command, as Pipeline.execute does."""
    async with redis.pipeline(transaction=False) as pipe:
        await build(pipe)
        pipe.scripts.clear()  # evalsha as they are: no SCRIPT EXISTS first
        commands = list(pipe.command_stack)
        replies = await pipe.execute(raise_on_error=False)
        refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if refused:
            for script in scripts:
                # The same text hashes to the same sha: the refused commands stand as built.
                script.sha = await redis.script_load(script.script)
            async with redis.pipeline(transaction=False) as again:
                again.command_stack.extend(commands[i] for i in refused)
                retried = await again.execute(raise_on_error=False)
            for i, reply in zip(refused, retried, strict=True):
                replies[i] = reply
        pipe.raise_first_error(commands, replies)
    return list(replies)
