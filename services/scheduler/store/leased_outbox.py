"""A leased outbox: items due at a time, leased to one worker at a time.

The shape both outboxes share (outbox.py: succeeded jobs still to deliver;
webhooks.py: webhook deliveries). Items live in one ZSET, id -> when it is next
due (ms since the epoch). A worker claims due ones in a batch: each claim pushes
the item's due time lease_ms ahead, so no other worker takes it meanwhile and a
worker that dies only delays it by the lease. The worker then finishes an item
(it leaves the outbox), or makes it due again later: after its own backoff
(base, 2*base, 4*base, ... capped, counted in an optional HASH id -> tries), or
at a time the owner chooses. Finishing, backing off and postponing never revive
an item that another worker finished meanwhile.

The owner keeps its payload and what else it records about an item. Its own
scripts change the outbox in the same step as their own keys through the Lua
fragment `lua` (`script(body)` loads a script with it): a table `leased` with

    leased.due, leased.tries     the key names (tries: false without a tries hash)
    leased.add(id, due_ms)       in the outbox, due at due_ms (a lease or a retry too)
    leased.has(id)               still in the outbox (due or leased)
    leased.claim(limit, lease_ms)  lease up to limit due ids; returns them
    leased.back_off(id, now, base_ms, max_ms)  one more try, due after its backoff
    leased.finish(id)            out of the outbox, its tries forgotten
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from services.scheduler.keys import PATTERNS, Keys, fields_of
from services.scheduler.store import lua

# The functions over one outbox's keys; rendered with its families (see _fragment).
_FUNCTIONS = r"""
function leased.add(id, due_ms) redis.call('ZADD', leased.due, due_ms, id) end
function leased.has(id) return redis.call('ZSCORE', leased.due, id) ~= false end
function leased.claim(limit, lease_ms)
  local now = now_ms()
  local due = redis.call('ZRANGEBYSCORE', leased.due, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do leased.add(id, now + lease_ms) end
  return due
end
function leased.back_off(id, now, base, cap)
  local tries = redis.call('HINCRBY', leased.tries, id, 1)
  leased.add(id, now + math.min(cap, base * 2 ^ (tries - 1)))
end
function leased.finish(id)
  redis.call('ZREM', leased.due, id)
  if leased.tries then redis.call('HDEL', leased.tries, id) end
end
"""

# ARGV: prefix, limit, lease_ms
# Leases up to `limit` due items. Returns their ids.
CLAIM = "return leased.claim(tonumber(ARGV[2]), tonumber(ARGV[3]))"

# ARGV: prefix, base_ms, max_ms, id...
# Each item still in the outbox is due again after base, 2*base, 4*base, ... (its
# own tries) capped at max_ms; one another worker finished meanwhile stays
# finished. Returns nothing.
LATER = r"""
local now, base, cap = now_ms(), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV do
  if leased.has(ARGV[i]) then leased.back_off(ARGV[i], now, base, cap) end
end
"""


def _key(family: str) -> str:
    """The Lua expression for a family's key: one name per prefix, no placeholders."""
    if fields_of(PATTERNS[family]):
        raise ValueError(f"{family}: an outbox key has no placeholders")
    return f"key.{family}()"


def _fragment(due: str, tries: str | None) -> str:
    fields = f"due = {_key(due)}, tries = {_key(tries) if tries else 'false'}"
    return f"local leased = {{{fields}}}\n{_FUNCTIONS}"


class LeasedOutbox:
    """The outbox of the key families `due` (ZSET) and, for backoff by tries, `tries`
    (HASH) with its cap max_backoff_ms. Every change to an item is atomic; see the
    module's docstring."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        due: str,
        tries: str | None = None,
        lease_ms: int = 60_000,
        max_backoff_ms: int = 5 * 60 * 1000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.due_key = keys.of(due)
        self.tries_key = keys.of(tries) if tries else None
        self.lease_ms = lease_ms
        self.max_backoff_ms = max_backoff_ms
        self.lua = _fragment(due, tries)
        self._claim = self.script(CLAIM)
        self._later = self.script(LATER) if tries else None

    def script(self, body: str) -> AsyncScript:
        """A script of the prelude, this outbox's fragment, then body."""
        return lua.load(self.redis, self.lua, body)

    async def claim(self, limit: int) -> list[str]:
        """Lease up to limit due items for lease_ms; their ids."""
        got = await self._claim(args=[self.keys.prefix, limit, self.lease_ms])
        return [g.decode() for g in cast(list[bytes], got)]

    def finish_in(self, pipe: Pipeline, ids: list[str]) -> None:
        """Queue on pipe what takes ids out of the outbox (in the owner's transaction)."""
        pipe.zrem(self.due_key, *ids)
        if self.tries_key:
            pipe.hdel(self.tries_key, *ids)

    async def done(self, ids: list[str]) -> None:
        """Out of the outbox, their tries forgotten."""
        if ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                self.finish_in(pipe, ids)
                await pipe.execute()

    async def later(self, ids: list[str], base_ms: int) -> None:
        """Each one try more and due after its own backoff (base_ms doubling per try,
        capped at max_backoff_ms), in one script call."""
        if self._later is None:
            raise TypeError("backoff by tries needs an outbox with a tries hash")
        if ids:
            await self._later(args=[self.keys.prefix, base_ms, self.max_backoff_ms, *ids])

    async def postpone(self, item_id: str, due_ms: int) -> None:
        """Due at due_ms, counting no try, unless it has left the outbox: a retry that
        waits for something else, or a worker extending its lease."""
        await self.redis.zadd(self.due_key, {item_id: due_ms}, xx=True)

    async def pending(self) -> int:
        """Items not finished yet (due or leased)."""
        return int(await self.redis.zcard(self.due_key))
