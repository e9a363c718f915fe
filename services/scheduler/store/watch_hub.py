"""One reader for the event streams of every watched job: watching costs O(1) connections.

WatchJob follows a job's event stream (`events` keys, appended by every
script). Done with one `XREAD BLOCK` per watcher, each open stream held one of
the scheduler's pooled connections for up to a second at a time: 300 watch
streams of one vendor made another vendor's submits 100x slower, 1,000 made
them fail with DEADLINE_EXCEEDED and running jobs lose their leases. The hub
instead owns two connections of its own, never the scheduler's pool: on one,
a single task reads the streams of all watched jobs with one XREAD over all
their keys and fans the entries out, in-process, to a bounded buffer per
watcher; the same task recomputes the place in the queue of every queued
watched job in one pipeline per tick, and notices jobs that expired. The
other carries the watchers' own short reads (a new watcher's history, a
place after an event), one at a time, so a thousand watchers arriving at once
queue there instead of taking the pool the other RPCs need. Both connections
are closed while nobody watches.

Each watcher keeps its own stream position, and the reader reads each key
from the oldest position of its watchers; a read's entries go only to the
watchers that were at or past the position it read from (one that joined
behind it waits for the next read, from its own position), so a watcher that
joins while others already follow the same job misses nothing and sees
nothing twice.
A watcher whose buffer overflows (it does not read) is ended with ABORTED
rather than growing memory. A Redis outage is ridden out for `OUTAGE_S`
(positions are kept, so nothing is lost); longer, and every watcher ends
with the error, which the interceptor maps to UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import redis.asyncio as aioredis

from services.common.errors import CutoutError, store_unavailable
from services.common.operations import Lane
from services.scheduler.keys import EVENTS_KEPT, Keys
from services.scheduler.store.model import Fields, FleetCapacity, Place, place_of

log = logging.getLogger(__name__)

StreamId = tuple[int, int]  # (ms, seq) of a stream entry, ordered as Redis orders them
BUFFER = EVENTS_KEPT  # entries one watcher may have unread: a whole job's kept history
OUTAGE_S = 5.0  # how long a lost connection is retried before watchers are ended
READ_COUNT = 256  # entries per key per XREAD


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(entry: StreamId) -> str:
    return f"{entry[0]}-{entry[1]}"


@dataclass
class Update:
    """What a watcher gets: new events in order, a new place while queued, or the end."""

    events: list[Fields] = field(default_factory=list)
    place: Place | None = None
    gone: bool = False  # the job expired (or was deleted) while watched


@dataclass(eq=False)
class Subscription:
    """One watcher of one job, fed by the hub."""

    vendor: str
    job_id: str
    lane: Lane
    last: StreamId  # the newest entry this watcher has been given
    queued: bool = False  # set by the watcher: it wants its place recomputed each tick
    _events: deque[Fields] = field(default_factory=deque)
    _place: Place | None = None  # a new place not yet taken by the watcher
    _offered: Place | None = None  # the last place offered
    _gone: bool = False
    _error: BaseException | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def next(self) -> Update:
        """Wait for something new; raises what ended the watch (overflow, Redis down)."""
        await self._ready.wait()
        self._ready.clear()
        if self._error is not None:
            raise self._error
        update = Update(list(self._events), self._place, self._gone)
        self._events.clear()
        self._place = None
        return update

    def _deliver(self, entries: Iterable[tuple[StreamId, Fields]]) -> bool:
        """Take the entries newer than this watcher's position; False on overflow."""
        for entry_id, data in entries:
            if entry_id > self.last:
                self.last = entry_id
                self._events.append(data)
                self._ready.set()
        return len(self._events) <= BUFFER

    def _offer(self, place: Place) -> None:
        """A place computed at a tick: the watcher wakes only when it differs from the last."""
        if place != self._offered:
            self._offered = self._place = place
            self._ready.set()

    def _end(self, error: BaseException | None = None) -> None:
        self._error = error
        self._gone = error is None
        self._ready.set()


def _too_slow(job_id: str) -> CutoutError:
    return CutoutError(
        f"this watch of job {job_id} fell {BUFFER} events behind and was ended; "
        "watch again (WatchJob replays the history from submission)",
        grpc.StatusCode.ABORTED,
    )


class WatchHub:
    """Every watcher of this process, served by one task on two connections of its own."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, fleet_capacity: FleetCapacity, tick_s: float = 1.0
    ) -> None:
        self.redis = redis  # the shared pool: its connections' settings, never its connections
        self.keys = keys
        self.fleet_capacity = fleet_capacity
        self.tick_s = tick_s
        self._sessions = 0  # watches under way, from their history on
        self._reads: aioredis.Redis | None = None
        self._subs: dict[str, set[Subscription]] = {}  # job id -> its watchers
        self._reading: dict[str, StreamId] = {}  # job id -> where the read under way began
        self._task: asyncio.Task[None] | None = None
        self._reader_id: int | None = None
        self._blocked = False  # the reader is inside XREAD BLOCK
        self._waking = False  # a CLIENT UNBLOCK is on its way

    @property
    def watchers(self) -> int:
        return sum(len(s) for s in self._subs.values())

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[aioredis.Redis]:
        """One watch, from its history to its end: the client its own reads go over."""
        if self._reads is None:
            self._reads = self._connect(blocking=True)
        reads = self._reads
        self._sessions += 1
        try:
            yield reads
        finally:
            self._sessions -= 1
            if not self._sessions and self._reads is reads:
                self._reads = None
                await reads.aclose(close_connection_pool=True)

    @contextlib.asynccontextmanager
    async def subscribe(
        self, vendor: str, job_id: str, lane: Lane, after: bytes
    ) -> AsyncIterator[Subscription]:
        """Follow the job's events newer than entry `after` (b"0-0": all of them)."""
        sub = Subscription(vendor, job_id, lane, parse_id(after))
        self._subs.setdefault(job_id, set()).add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read())
        elif job_id not in self._reading or sub.last < self._reading[job_id]:
            await self._wake()  # the read under way does not cover this watcher
        try:
            yield sub
        finally:
            await self._leave(sub)

    async def _leave(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]
        if not self._subs and self._task is not None:
            # Nobody left to serve: stop, and hand the connection back to Redis.
            task, self._task = self._task, None
            task.cancel()
            await asyncio.wait([task])

    async def _wake(self) -> None:
        """Make a blocked XREAD return now, so it is reissued with the new key.

        One wake-up at a time: watchers arriving meanwhile ride on it. Without
        CLIENT UNBLOCK (a managed Redis may refuse it) the key joins at the
        next tick instead.
        """
        if not self._blocked or self._waking or self._reader_id is None or self._reads is None:
            return
        self._waking = True
        with contextlib.suppress(aioredis.RedisError):
            await self._reads.client_unblock(self._reader_id)

    def _connect(self, blocking: bool = False) -> aioredis.Redis:
        """A client of its own, on a pool of one connection built like the shared pool's
        (named `<their name>-watch` when the shared one's connections have a name);
        `blocking`: callers wait their turn for the connection (up to 20 s)."""
        shared = self.redis.connection_pool
        kwargs = dict(shared.connection_kwargs)
        if kwargs.get("client_name"):
            kwargs["client_name"] = f"{kwargs['client_name']}-watch"
        pool = (
            aioredis.BlockingConnectionPool(
                connection_class=shared.connection_class, max_connections=1, timeout=20, **kwargs
            )
            if blocking
            else aioredis.ConnectionPool(
                connection_class=shared.connection_class, max_connections=1, **kwargs
            )
        )
        return aioredis.Redis(connection_pool=pool)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        own = self._connect()
        down_since: float | None = None
        next_tick = loop.time() + self.tick_s
        try:
            while self._subs:
                try:
                    if self._reader_id is None:
                        self._reader_id = int(await own.client_id())
                    await self._read_once(own, max(1, int((next_tick - loop.time()) * 1000)))
                    if loop.time() >= next_tick:
                        await self._tick(own)
                        next_tick = loop.time() + self.tick_s
                    down_since = None
                except aioredis.RedisError as exc:
                    self._reader_id = None  # a new connection gets a new id
                    down_since = down_since or loop.time()
                    if not store_unavailable(exc) or loop.time() - down_since > OUTAGE_S:
                        raise
                    log.warning("watch reader lost redis; retrying", extra={"error": str(exc)})
                    await asyncio.sleep(0.25)
        except Exception as exc:
            for subs in self._subs.values():
                for sub in subs:
                    sub._end(exc)
            self._subs.clear()
        finally:
            if self._task is me:
                self._reader_id = None
            await own.aclose(close_connection_pool=True)

    async def _read_once(self, own: aioredis.Redis, block_ms: int) -> None:
        by_key = {self.keys.events(job_id).encode(): job_id for job_id in self._subs}
        self._reading = {job_id: min(s.last for s in subs) for job_id, subs in self._subs.items()}
        streams = {self.keys.events(j): format_id(start) for j, start in self._reading.items()}
        self._blocked, self._waking = True, False
        try:
            got = cast(
                "list[Any] | None",
                await own.xread(streams, count=READ_COUNT, block=block_ms),  # type: ignore[arg-type]
            )
        finally:
            self._blocked = False
        for key, entries in got or []:
            job_id = by_key.get(key, "")
            start = self._reading.get(job_id)
            parsed = [(parse_id(entry_id), data) for entry_id, data in entries]
            for sub in list(self._subs.get(job_id, ())):
                if start is None or sub.last < start:
                    continue  # joined behind this read: the next one starts from it
                if not sub._deliver(parsed):
                    sub._end(_too_slow(sub.job_id))
                    self._forget(sub)

    def _forget(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]

    async def _tick(self, own: aioredis.Redis) -> None:
        """Once per tick, in one pipeline: which watched jobs still exist, and where each
        queued one stands (jobs ahead of it may have left without an event of its own).
        One EXISTS and one ZRANK per job, however many watch it."""
        job_ids = list(self._subs)
        queued = sorted(
            {(s.job_id, s.vendor, s.lane) for subs in self._subs.values() for s in subs if s.queued}
        )
        lanes = sorted({lane for _, _, lane in queued})
        async with own.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self.keys.job(job_id))
            for job_id, vendor, lane in queued:
                pipe.zrank(self.keys.queue(vendor, lane), job_id)
            for lane in lanes:
                pipe.scard(self.keys.ring_members(lane))
                pipe.hget(self.keys.eta, f"{lane}run_ms")
            replies = await pipe.execute()
        exists = dict(zip(job_ids, replies[: len(job_ids)], strict=True))
        ranks = replies[len(job_ids) : len(job_ids) + len(queued)]
        rest = replies[len(job_ids) + len(queued) :]
        per_lane = {lane: (rest[2 * i], rest[2 * i + 1]) for i, lane in enumerate(lanes)}
        for (job_id, _, lane), rank in zip(queued, ranks, strict=True):
            active, run_ms = per_lane[lane]
            place = place_of(rank, int(active), run_ms, self.fleet_capacity(lane))
            for sub in self._subs.get(job_id, ()):
                if sub.queued:
                    sub._offer(place)
        for job_id, found in exists.items():
            if not found:
                for sub in self._subs.pop(job_id, set()):
                    sub._end()
