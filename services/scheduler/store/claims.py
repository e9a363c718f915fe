"""Fair claiming: which vendor's job a free node slot gets (weighted deficit round robin).

Owns the round robin of each lane (`ring`, `ring_members`, `deficit`, `turn`) and
the configured `weights`; reads the vendor policy's weight. A claimed job is an
attempt from then on (attempts.py).
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis

from services.common.operations import Lane
from services.scheduler.keys import Keys
from services.scheduler.store import lua
from services.scheduler.store.model import Claim, Fairness

# ARGV: prefix, node, lease_ms, quantum, default_weight, lane ('' or 'light:'), count
# Weighted deficit round robin over vendors, cost in milli-megapixels: the
# vendor at the head of the ring starts its turn with quantum * weight more
# credit, takes its best jobs while the credit covers their cost, then moves to
# the tail. Credit left over carries to its next turn; an emptied queue forfeits
# it. Work-conserving: if no vendor can afford its next job within a bounded
# scan, the first vendor scanned gets it anyway. The job becomes RUNNING on the
# next attempt, leased to node for lease_ms.
# Up to `count` jobs are claimed in one call, each chosen as if claimed alone.
# Returns a list (empty when no job waits) of {id, attempt, vendor, operation
# (serialised), input bytes or false when gone, record (serialised, '' for none),
# create_ms, the lane's average run time in ms (attempts.COMPLETE keeps it) or false}.
CLAIM = r"""
local node, lease_ms = ARGV[2], tonumber(ARGV[3])
local quantum, default_weight = tonumber(ARGV[4]), tonumber(ARGV[5])
local lane = ARGV[6]
local ring, deficit, turn = key.ring(lane), key.deficit(lane), key.turn(lane)
local run_ms = redis.call('HGET', key.eta(), lane .. 'run_ms')

local function claim_one()
local chosen, fallback = nil, nil
for _ = 1, 64 * math.max(1, redis.call('LLEN', ring)) do
  local vendor = redis.call('LINDEX', ring, 0)
  if not vendor then break end
  local head = redis.call('ZRANGE', key.queue(lane, vendor), 0, 0)
  if #head == 0 then
    leave_ring(lane, vendor)
  else
    local id = head[1]
    fallback = fallback or {vendor, id}
    local cost = tonumber(redis.call('HGET', key.job(id), 'cost') or '1000')
    local credit = tonumber(redis.call('HGET', deficit, vendor) or '0')
    if redis.call('HGET', turn, vendor) ~= '1' then
      -- Weight: vendor policy (`cutout-admin vendors set --weight`), else configured, else default.
      local weight = tonumber(redis.call('HGET', key.vendor_policy(vendor), POLICY_WEIGHT)
        or redis.call('HGET', key.weights(), vendor) or default_weight)
      credit = credit + quantum * weight
      redis.call('HSET', turn, vendor, 1)
    end
    if credit >= cost then
      redis.call('HSET', deficit, vendor, credit - cost)
      chosen = {vendor, id}
      break
    end
    -- Turn over: keep the credit, go to the back.
    redis.call('HSET', deficit, vendor, credit)
    redis.call('HDEL', turn, vendor)
    redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  end
end
chosen = chosen or fallback
if not chosen then return nil end
local vendor, id = chosen[1], chosen[2]
local qk = key.queue(lane, vendor)
redis.call('ZREM', qk, id)
if redis.call('ZCARD', qk) == 0 then leave_ring(lane, vendor) end
local jk = key.job(id)
local now = now_ms()
local attempt = redis.call('HINCRBY', jk, 'attempt', 1)
count(vendor, 'attempts')
redis.call('HSET', jk, 'state', STATE_RUNNING, 'stage', STAGE_DECODING, 'progress', 0,
  'node', node, 'update_ms', now, 'start_ms', now, 'retry_ms', 0)
redis.call('ZADD', key.leases(), now + lease_ms, id)
redis.call('SADD', key.running(vendor), id)
event(id, 'state', STATE_RUNNING, 'stage', STAGE_DECODING, 'progress', 0, 'node', node,
  'attempt', attempt, 'retry_ms', 0, 'update_ms', now)
-- The attempt needs the input and the operation: hand them over in the same round trip.
return {id, attempt, vendor, redis.call('HGET', jk, 'operation') or '',
  redis.call('GET', key.input(id)) or false, redis.call('HGET', jk, 'record') or '',
  redis.call('HGET', jk, 'create_ms') or '0', run_ms}
end

local claimed = {}
for _ = 1, math.max(1, tonumber(ARGV[7]) or 1) do
  local one = claim_one()
  if not one then break end
  claimed[#claimed + 1] = one
end
return claimed
"""


class Claims:
    def __init__(self, redis: aioredis.Redis, keys: Keys, fairness: Fairness) -> None:
        self.redis = redis
        self.keys = keys
        self.fairness = fairness
        self._claim = lua.load(redis, CLAIM)

    async def claim(self, node: str, lease_ms: int, lane: Lane = Lane.HEAVY) -> Claim | None:
        """Lease the next job of the lane to node."""
        got = await self.claim_many(node, lease_ms, lane, 1)
        return got[0] if got else None

    async def claim_many(self, node: str, lease_ms: int, lane: Lane, count: int) -> list[Claim]:
        """Lease up to `count` jobs of the lane to node in one round trip, each chosen
        fairly as if claimed alone; fewer (or none) when fewer wait.

        A node with several free slots used to cost one round trip per slot, and its
        jobs then reached its Work stream one write at a time.
        """
        got = await self._claim(
            args=[
                self.keys.prefix,
                node,
                lease_ms,
                self.fairness.quantum_milli,
                self.fairness.default_weight,
                lane,
                count,
            ]
        )
        return [
            Claim(
                job_id=one[0].decode(),
                attempt=int(one[1]),
                vendor=one[2].decode(),
                operation=one[3],
                image=one[4],
                record=one[5],
                created_ms=int(one[6]),
                lane_run_ms=float(one[7]) if len(one) > 7 and one[7] is not None else None,
            )
            for one in got or []
        ]

    async def publish_weights(self) -> None:
        """Store the configured vendor weights where the claim script reads them."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.weights)
            if self.fairness.weights:
                pipe.hset(self.keys.weights, mapping=cast(Any, dict(self.fairness.weights)))
            await pipe.execute()
