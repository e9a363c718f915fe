"""Lua scripts: every multi-step change to a job is one atomic script.

Each script gets the key prefix as ARGV[1]. States are the JobState numbers
(1 queued, 2 running, 3 succeeded, 4 failed, 5 cancelled); stages are the
Stage numbers. Every state change appends the hash fields it changed to the
job's event stream, which is what WatchJob replays.

Scripts that act for a running attempt take that attempt's number and do
nothing (return 0) when the job has moved on: a lease that expired, a
cancellation, or another dispatch. That fencing is what makes a late or
duplicate node answer harmless.
"""

from __future__ import annotations

PRELUDE = r"""
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function event(id, ...)
  redis.call('XADD', P .. 'events:' .. id, 'MAXLEN', '~', 256, '*', ...)
end
-- Queues come in lanes: '' for inference work, 'light:' for light jobs. Each
-- lane has its own queues, ring and deficits, so light jobs never wait behind
-- inference; the job hash remembers its lane.
local function lane_of(id)
  return P .. (redis.call('HGET', P .. 'job:' .. id, 'lane') or '')
end
local function enqueue_ready(id, vendor, score)
  local L = lane_of(id)
  redis.call('ZADD', L .. 'queue:' .. vendor, score, id)
  if redis.call('SADD', L .. 'ring:members', vendor) == 1 then
    redis.call('RPUSH', L .. 'ring', vendor)
  end
  redis.call('PUBLISH', P .. 'wake', vendor)
end
local function leave_running(id, vendor)
  redis.call('ZREM', P .. 'leases', id)
  redis.call('SREM', P .. 'running:' .. vendor, id)
end
-- Terminal transition: state 3/4/5 with an outcome field ('result' or 'error').
-- Everything about the job expires after `retention` seconds.
local function finish(id, vendor, state, stage, progress, field, value, retention)
  local now = now_ms()
  local jk = P .. 'job:' .. id
  redis.call('HSET', jk, 'state', state, 'stage', stage, 'progress', progress,
    field, value, 'update_ms', now, 'end_ms', now, 'retry_ms', 0)
  event(id, 'state', state, 'stage', stage, 'progress', progress, field, value,
    'retry_ms', 0, 'update_ms', now)
  redis.call('EXPIRE', jk, retention)
  redis.call('EXPIRE', P .. 'events:' .. id, retention)
end
local function finish_and_free(id, vendor, state, stage, progress, field, value, retention)
  finish(id, vendor, state, stage, progress, field, value, retention)
  redis.call('DEL', P .. 'input:' .. id)
end
-- A failed or lost attempt (the attempt-th). Within max_retries it waits
-- base_ms * 2^(attempt-1) * jitter, then goes back to its old place in the
-- queue (see PROMOTE); after that it FAILS into the dead-letter queue, input kept.
-- Per-vendor counters (monotonic, for stats and metrics): attempts, lease_lost,
-- retried, dead_lettered, succeeded, failed.
local function count(vendor, field, n)
  redis.call('HINCRBY', P .. 'counters:' .. vendor, field, n or 1)
end

local function retry_or_dead_letter(id, vendor, attempt, max_retries, base_ms, jitter, err, retention)
  leave_running(id, vendor)
  local jk = P .. 'job:' .. id
  if attempt > max_retries then
    local progress = tonumber(redis.call('HGET', jk, 'progress'))
    redis.call('HSET', jk, 'dead_lettered', 1)
    finish(id, vendor, 4, 7, progress, 'error', err, retention)
    event(id, 'dead_lettered', 1)
    redis.call('EXPIRE', P .. 'input:' .. id, retention)
    redis.call('ZADD', P .. 'dlq:' .. vendor, now_ms(), id)
    count(vendor, 'dead_lettered')
    return 2
  end
  count(vendor, 'retried')
  local now = now_ms()
  local due = now + math.floor(base_ms * 2 ^ (attempt - 1) * jitter)
  redis.call('HSET', jk, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'last_error', err,
    'retry_ms', due, 'update_ms', now)
  event(id, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'retry_ms', due, 'update_ms', now)
  redis.call('ZADD', P .. 'delayed', due, id)
  return 1
end
-- Straight back to the queue, attempt not counted (the node refused before starting).
local function requeue_now(id, vendor)
  leave_running(id, vendor)
  local jk = P .. 'job:' .. id
  local now = now_ms()
  redis.call('HINCRBY', jk, 'attempt', -1)
  count(vendor, 'attempts', -1)
  redis.call('HSET', jk, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'update_ms', now)
  event(id, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'update_ms', now)
  enqueue_ready(id, vendor, tonumber(redis.call('HGET', jk, 'score')))
end
-- Fence: the job is RUNNING and on this attempt. Returns the vendor or nil.
local function fenced(id, attempt)
  local st = redis.call('HMGET', P .. 'job:' .. id, 'state', 'attempt', 'vendor')
  if st[1] ~= '2' or st[2] ~= attempt then return nil end
  return st[3]
end
"""

# ARGV: prefix, id, vendor, priority, operation, record, client_key, batch,
#       input_pixels, image, idempotency_ttl_s, cost, max_queued_vendor,
#       max_queued_total, lane ('' or 'light:'), batch_ttl_s
# Returns {1, id, ...} for a new job, {0, existing_id, ...} for an idempotent repeat
# (see reply() below), {-1, cap} or {-2, ''} when an admission cap refuses it.
ENQUEUE = (
    PRELUDE
    + r"""
local id, vendor, prio, ck = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[7]
-- The reply carries what the API's Job needs, so the caller makes no second
-- round trip: {code, id, job hash (flat), rank in its queue or false,
-- vendors waiting in its lane, the lane's average run time or false}.
local function reply(code, jid)
  local f = redis.call('HGETALL', P .. 'job:' .. jid)
  local h = {}
  for i = 1, #f, 2 do h[f[i]] = f[i + 1] end
  local rank, active, run = false, 0, false
  if h['state'] == '1' then
    local L = P .. (h['lane'] or '')
    rank = redis.call('ZRANK', L .. 'queue:' .. vendor, jid)
    active = redis.call('SCARD', L .. 'ring:members')
    run = redis.call('HGET', P .. 'eta', (h['lane'] or '') .. 'run_ms')
  end
  return {code, jid, f, rank, active, run}
end
if ck ~= '' then
  local existing = redis.call('GET', P .. 'idem:' .. vendor .. ':' .. ck)
  if existing and redis.call('EXISTS', P .. 'job:' .. existing) == 1 then
    return reply(0, existing)
  end
end
-- Admission control: shed load before Redis memory fills (-1 vendor cap, -2 global cap).
-- Both lanes count: the caps protect Redis memory, which they share.
local LANES = {P, P .. 'light:'}
local mine, waiting = 0, 0
for _, L in ipairs(LANES) do
  mine = mine + redis.call('ZCARD', L .. 'queue:' .. vendor)
  for _, v in ipairs(redis.call('SMEMBERS', L .. 'ring:members')) do
    waiting = waiting + redis.call('ZCARD', L .. 'queue:' .. v)
  end
end
-- A vendor's own cap from the registry (cutout vendors ... --max-queued) beats the default.
local cap = tonumber(redis.call('HGET', P .. 'vendor:' .. vendor, 'max_queued') or '0') or 0
if cap <= 0 then cap = tonumber(ARGV[13]) end
if mine >= cap then return {-1, tostring(cap)} end
if waiting >= tonumber(ARGV[14]) then return {-2, ''} end
local now = now_ms()
local seq = redis.call('INCR', P .. 'seq')
local score = (9 - prio) * 1099511627776 + seq
redis.call('HSET', P .. 'job:' .. id, 'vendor', vendor, 'state', 1, 'stage', 1,
  'progress', 0, 'priority', prio, 'attempt', 0, 'node', '', 'client_key', ck,
  'batch', ARGV[8], 'input_pixels', ARGV[9], 'operation', ARGV[5], 'record', ARGV[6],
  'seq', seq, 'score', score, 'cost', tonumber(ARGV[12]), 'create_ms', now, 'update_ms', now,
  'lane', ARGV[15])
redis.call('SET', P .. 'input:' .. id, ARGV[10])
if ARGV[8] ~= '' then
  -- The batch's members, for WatchBatch and CancelBatch; kept as long as its jobs.
  local bk = P .. 'batch:' .. vendor .. ':' .. ARGV[8]
  redis.call('SADD', bk, id)
  redis.call('EXPIRE', bk, tonumber(ARGV[16]))
end
redis.call('ZADD', P .. 'jobs:' .. vendor, seq, id)
redis.call('SADD', P .. 'vendors', vendor)
if ck ~= '' then
  redis.call('SET', P .. 'idem:' .. vendor .. ':' .. ck, id, 'EX', tonumber(ARGV[11]))
end
event(id, 'state', 1, 'stage', 1, 'progress', 0, 'update_ms', now)
enqueue_ready(id, vendor, score)
return reply(1, id)
"""
)

# ARGV: prefix, node, lease_ms, quantum, default_weight, lane ('' or 'light:')
# Weighted deficit round robin over vendors, cost in milli-megapixels: the
# vendor at the head of the ring starts its turn with quantum * weight more
# credit, takes its best jobs while the credit covers their cost, then moves to
# the tail. Credit left over carries to its next turn; an emptied queue forfeits
# it. Work-conserving: if no vendor can afford its next job within a bounded
# scan, the first vendor scanned gets it anyway. Returns {id, attempt, vendor} or nil.
CLAIM = (
    PRELUDE
    + r"""
local node, lease_ms = ARGV[2], tonumber(ARGV[3])
local quantum, default_weight = tonumber(ARGV[4]), tonumber(ARGV[5])
local L = P .. ARGV[6]
local ring = L .. 'ring'
local function drop_vendor(vendor)
  redis.call('LREM', ring, 0, vendor)
  redis.call('SREM', L .. 'ring:members', vendor)
  redis.call('HDEL', L .. 'deficit', vendor)
  redis.call('HDEL', L .. 'turn', vendor)
end
local chosen, fallback = nil, nil
for _ = 1, 64 * math.max(1, redis.call('LLEN', ring)) do
  local vendor = redis.call('LINDEX', ring, 0)
  if not vendor then break end
  local head = redis.call('ZRANGE', L .. 'queue:' .. vendor, 0, 0)
  if #head == 0 then
    drop_vendor(vendor)
  else
    local id = head[1]
    fallback = fallback or {vendor, id}
    local cost = tonumber(redis.call('HGET', P .. 'job:' .. id, 'cost') or '1000')
    local credit = tonumber(redis.call('HGET', L .. 'deficit', vendor) or '0')
    if redis.call('HGET', L .. 'turn', vendor) ~= '1' then
      -- Weight: the registry's (cutout vendors ... --weight), else configured, else default.
      local weight = tonumber(redis.call('HGET', P .. 'vendor:' .. vendor, 'weight')
        or redis.call('HGET', P .. 'weights', vendor) or default_weight)
      credit = credit + quantum * weight
      redis.call('HSET', L .. 'turn', vendor, 1)
    end
    if credit >= cost then
      redis.call('HSET', L .. 'deficit', vendor, credit - cost)
      chosen = {vendor, id}
      break
    end
    -- Turn over: keep the credit, go to the back.
    redis.call('HSET', L .. 'deficit', vendor, credit)
    redis.call('HDEL', L .. 'turn', vendor)
    redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  end
end
chosen = chosen or fallback
if not chosen then return nil end
local vendor, id = chosen[1], chosen[2]
local qk = L .. 'queue:' .. vendor
redis.call('ZREM', qk, id)
if redis.call('ZCARD', qk) == 0 then drop_vendor(vendor) end
local jk = P .. 'job:' .. id
local now = now_ms()
local attempt = redis.call('HINCRBY', jk, 'attempt', 1)
count(vendor, 'attempts')
redis.call('HSET', jk, 'state', 2, 'stage', 2, 'progress', 0, 'node', node,
  'update_ms', now, 'start_ms', now, 'retry_ms', 0)
redis.call('ZADD', P .. 'leases', now + lease_ms, id)
redis.call('SADD', P .. 'running:' .. vendor, id)
event(id, 'state', 2, 'stage', 2, 'progress', 0, 'node', node, 'attempt', attempt,
  'retry_ms', 0, 'update_ms', now)
-- The attempt needs the input and the operation: hand them over in the same round trip.
return {id, attempt, vendor, redis.call('HGET', jk, 'operation') or '',
  redis.call('GET', P .. 'input:' .. id) or false, redis.call('HGET', jk, 'record') or '',
  redis.call('HGET', jk, 'create_ms') or '0'}
"""
)

# ARGV: prefix, id, attempt, lease_ms, then any number of (stage, progress) pairs
# Renews the lease and records each pair in order (progress never decreasing),
# one event per pair, so watchers see every stage even when a fast attempt's
# stages arrive together. No pairs = renew only.
PROGRESS = (
    PRELUDE
    + r"""
local id, attempt = ARGV[2], ARGV[3]
if not fenced(id, attempt) then return 0 end
local now = now_ms()
redis.call('ZADD', P .. 'leases', 'XX', now + tonumber(ARGV[4]), id)
local jk = P .. 'job:' .. id
local progress = tonumber(redis.call('HGET', jk, 'progress'))
for i = 5, #ARGV - 1, 2 do
  local stage = tonumber(ARGV[i])
  progress = math.max(progress, tonumber(ARGV[i + 1]))
  redis.call('HSET', jk, 'stage', stage, 'progress', progress, 'update_ms', now)
  event(id, 'stage', stage, 'progress', progress, 'update_ms', now)
end
return 1
"""
)

# ARGV: prefix, id, attempt, result, retention_s, deliver
# (JobStore.complete registers the output for retention in the same round trip,
# before this runs, so an attempt that loses the fence cannot leak it.)
# deliver=1: the job still has a delivery to make (a pending upload, a record
# update); only the attempt that wins the fence queues it, so it is made once.
COMPLETE = (
    PRELUDE
    + r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return 0 end
leave_running(id, vendor)
-- Moving average of attempt run time per lane ('run_ms', 'light:run_ms'): what queue
-- ETAs are estimated from. Light jobs must not make inference ETAs look short.
local timing = redis.call('HMGET', P .. 'job:' .. id, 'start_ms', 'lane')
local started = tonumber(timing[1] or '0')
if started > 0 then
  local run = now_ms() - started
  local field = (timing[2] or '') .. 'run_ms'
  local avg = tonumber(redis.call('HGET', P .. 'eta', field) or run)
  redis.call('HSET', P .. 'eta', field, avg + (run - avg) * 0.1)
end
count(vendor, 'succeeded')
if ARGV[6] == '1' then redis.call('ZADD', P .. 'deliveries', now_ms(), id) end
finish_and_free(id, vendor, 3, 7, 100, 'result', ARGV[4], tonumber(ARGV[5]))
return 1
"""
)

# ARGV: prefix, id, attempt, error, retention_s
FAIL = (
    PRELUDE
    + r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return 0 end
leave_running(id, vendor)
local progress = tonumber(redis.call('HGET', P .. 'job:' .. id, 'progress'))
count(vendor, 'failed')
finish_and_free(id, vendor, 4, 7, progress, 'error', ARGV[4], tonumber(ARGV[5]))
return 1
"""
)

# ARGV: prefix, id, attempt, max_retries, base_delay_ms, jitter, error, retention_s, refund
# refund=1: the node refused before doing any work (full or draining): straight
# back to the queue, attempt not counted. Returns 1 retrying, 2 dead-lettered,
# 3 requeued (refund), 0 fenced off.
RETRY = (
    PRELUDE
    + r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return 0 end
if ARGV[9] == '1' then
  requeue_now(id, vendor)
  return 3
end
return retry_or_dead_letter(id, vendor, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]))
"""
)

# ARGV: prefix, max_retries, base_delay_ms, jitter, error, retention_s, limit
# Leases past their deadline: the node or the scheduler running the job is
# gone. Each such job is retried or dead-lettered. Returns the ids.
REAP = (
    PRELUDE
    + r"""
local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[7]))
for _, id in ipairs(expired) do
  local st = redis.call('HMGET', P .. 'job:' .. id, 'state', 'attempt', 'vendor')
  if st[1] == '2' then
    count(st[3], 'lease_lost')
    retry_or_dead_letter(id, st[3], tonumber(st[2]), tonumber(ARGV[2]), tonumber(ARGV[3]),
      tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]))
  else
    redis.call('ZREM', P .. 'leases', id)
  end
end
return expired
"""
)

# ARGV: prefix, limit
# Retries whose backoff is over go back to their old place in their queue.
PROMOTE = (
    PRELUDE
    + r"""
local due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', P .. 'delayed', id)
  local st = redis.call('HMGET', P .. 'job:' .. id, 'state', 'vendor', 'score')
  if st[1] == '1' then
    enqueue_ready(id, st[2], tonumber(st[3]))
  end
end
return #due
"""
)

# ARGV: prefix, id, vendor
# Returns -1 not the vendor's dead letter, -2 its input is gone, 1 requeued.
REQUEUE_DEAD = (
    PRELUDE
    + r"""
local id, vendor = ARGV[2], ARGV[3]
local jk = P .. 'job:' .. id
local st = redis.call('HMGET', jk, 'vendor', 'dead_lettered', 'score')
if st[1] ~= vendor or st[2] ~= '1' then return -1 end
if redis.call('EXISTS', P .. 'input:' .. id) == 0 then return -2 end
redis.call('ZREM', P .. 'dlq:' .. vendor, id)
redis.call('PERSIST', jk)
redis.call('PERSIST', P .. 'events:' .. id)
redis.call('PERSIST', P .. 'input:' .. id)
redis.call('HDEL', jk, 'error', 'end_ms')
local now = now_ms()
redis.call('HSET', jk, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'attempt', 0,
  'dead_lettered', 0, 'update_ms', now)
event(id, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'attempt', 0, 'dead_lettered', 0,
  'error', '', 'update_ms', now)
enqueue_ready(id, vendor, tonumber(st[3]))
return 1
"""
)

# ARGV: prefix, vendor, id...
# Drops the named dead letters of the vendor: input deleted, job stays FAILED.
PURGE_DEAD = (
    PRELUDE
    + r"""
local vendor = ARGV[2]
local purged = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', P .. 'dlq:' .. vendor, id) == 1 then
    redis.call('DEL', P .. 'input:' .. id)
    redis.call('HSET', P .. 'job:' .. id, 'dead_lettered', 0)
    event(id, 'dead_lettered', 0)
    purged = purged + 1
  end
end
return purged
"""
)

# ARGV: prefix, id, vendor, error, retention_s
# Returns -1 not found (or another vendor's), 0 already done, 1 cancelled.
CANCEL = (
    PRELUDE
    + r"""
local id, vendor = ARGV[2], ARGV[3]
local jk = P .. 'job:' .. id
local st = redis.call('HMGET', jk, 'state', 'vendor', 'progress')
if not st[1] or st[2] ~= vendor then return -1 end
if st[1] ~= '1' and st[1] ~= '2' then return 0 end
if st[1] == '1' then
  local L = lane_of(id)
  local qk = L .. 'queue:' .. vendor
  redis.call('ZREM', qk, id)
  redis.call('ZREM', P .. 'delayed', id)
  if redis.call('ZCARD', qk) == 0 then
    redis.call('LREM', L .. 'ring', 0, vendor)
    redis.call('SREM', L .. 'ring:members', vendor)
    redis.call('HDEL', L .. 'deficit', vendor)
    redis.call('HDEL', L .. 'turn', vendor)
  end
else
  leave_running(id, vendor)
  redis.call('PUBLISH', P .. 'cancel', id)
end
finish_and_free(id, vendor, 5, 7, tonumber(st[3]), 'error', ARGV[4], tonumber(ARGV[5]))
return 1
"""
)

# ARGV: prefix, limit, lease_ms
# Leases up to `limit` due deliveries: each is pushed lease_ms into the future,
# so another scheduler does not take it while this one works; a crash only
# delays it by the lease.
CLAIM_DELIVERIES = (
    PRELUDE
    + r"""
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', P .. 'deliveries', '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZADD', P .. 'deliveries', now + tonumber(ARGV[3]), id)
end
return due
"""
)
