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
local function enqueue_ready(id, vendor, score)
  redis.call('ZADD', P .. 'queue:' .. vendor, score, id)
  if redis.call('SADD', P .. 'ring:members', vendor) == 1 then
    redis.call('RPUSH', P .. 'ring', vendor)
  end
  redis.call('PUBLISH', P .. 'wake', vendor)
end
local function leave_running(id, vendor)
  redis.call('ZREM', P .. 'leases', id)
  redis.call('SREM', P .. 'running:' .. vendor, id)
end
-- Terminal transition: state 3/4/5 with an outcome field ('result' or 'error').
local function finish(id, vendor, state, stage, progress, field, value, retention)
  local now = now_ms()
  local jk = P .. 'job:' .. id
  redis.call('HSET', jk, 'state', state, 'stage', stage, 'progress', progress,
    field, value, 'update_ms', now, 'end_ms', now)
  redis.call('DEL', P .. 'input:' .. id)
  event(id, 'state', state, 'stage', stage, 'progress', progress, field, value, 'update_ms', now)
  redis.call('EXPIRE', jk, retention)
  redis.call('EXPIRE', P .. 'events:' .. id, retention)
end
-- A failed or lost attempt: back to the queue in its old place, or FAILED
-- once max_attempts attempts have been made.
local function retry_or_fail(id, vendor, attempt, max_attempts, err, retention)
  leave_running(id, vendor)
  if attempt >= max_attempts then
    finish(id, vendor, 4, 7, tonumber(redis.call('HGET', P .. 'job:' .. id, 'progress')), 'error', err, retention)
    return 2
  end
  local now = now_ms()
  local jk = P .. 'job:' .. id
  redis.call('HSET', jk, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'last_error', err, 'update_ms', now)
  event(id, 'state', 1, 'stage', 1, 'progress', 0, 'node', '', 'update_ms', now)
  enqueue_ready(id, vendor, tonumber(redis.call('HGET', jk, 'score')))
  return 1
end
-- Fence: the job is RUNNING and on this attempt. Returns the vendor or nil.
local function fenced(id, attempt)
  local st = redis.call('HMGET', P .. 'job:' .. id, 'state', 'attempt', 'vendor')
  if st[1] ~= '2' or st[2] ~= attempt then return nil end
  return st[3]
end
"""

# ARGV: prefix, id, vendor, priority, operation, record, client_key, batch,
#       input_pixels, image, idempotency_ttl_s
# Returns {1, id} for a new job, {0, existing_id} for an idempotent repeat.
ENQUEUE = (
    PRELUDE
    + r"""
local id, vendor, prio, ck = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[7]
if ck ~= '' then
  local existing = redis.call('GET', P .. 'idem:' .. vendor .. ':' .. ck)
  if existing and redis.call('EXISTS', P .. 'job:' .. existing) == 1 then
    return {0, existing}
  end
end
local now = now_ms()
local seq = redis.call('INCR', P .. 'seq')
local score = (9 - prio) * 1099511627776 + seq
redis.call('HSET', P .. 'job:' .. id, 'vendor', vendor, 'state', 1, 'stage', 1,
  'progress', 0, 'priority', prio, 'attempt', 0, 'node', '', 'client_key', ck,
  'batch', ARGV[8], 'input_pixels', ARGV[9], 'operation', ARGV[5], 'record', ARGV[6],
  'seq', seq, 'score', score, 'create_ms', now, 'update_ms', now)
redis.call('SET', P .. 'input:' .. id, ARGV[10])
redis.call('ZADD', P .. 'jobs:' .. vendor, seq, id)
redis.call('SADD', P .. 'vendors', vendor)
if ck ~= '' then
  redis.call('SET', P .. 'idem:' .. vendor .. ':' .. ck, id, 'EX', tonumber(ARGV[11]))
end
event(id, 'state', 1, 'stage', 1, 'progress', 0, 'update_ms', now)
enqueue_ready(id, vendor, score)
return {1, id}
"""
)

# ARGV: prefix, node, lease_ms
# Serves vendors round robin: the vendor at the head of the ring gives its
# best job and moves to the tail. Returns {id, attempt, vendor} or nil.
CLAIM = (
    PRELUDE
    + r"""
local node, lease_ms = ARGV[2], tonumber(ARGV[3])
local n = redis.call('LLEN', P .. 'ring')
for _ = 1, n do
  local vendor = redis.call('LMOVE', P .. 'ring', P .. 'ring', 'LEFT', 'RIGHT')
  if not vendor then return nil end
  local qk = P .. 'queue:' .. vendor
  local popped = redis.call('ZPOPMIN', qk)
  if redis.call('ZCARD', qk) == 0 then
    redis.call('LREM', P .. 'ring', 0, vendor)
    redis.call('SREM', P .. 'ring:members', vendor)
  end
  if #popped > 0 then
    local id = popped[1]
    local jk = P .. 'job:' .. id
    local now = now_ms()
    local attempt = redis.call('HINCRBY', jk, 'attempt', 1)
    redis.call('HSET', jk, 'state', 2, 'stage', 2, 'progress', 0, 'node', node,
      'update_ms', now, 'start_ms', now)
    redis.call('ZADD', P .. 'leases', now + lease_ms, id)
    redis.call('SADD', P .. 'running:' .. vendor, id)
    event(id, 'state', 2, 'stage', 2, 'progress', 0, 'node', node, 'attempt', attempt,
      'update_ms', now)
    return {id, attempt, vendor}
  end
end
return nil
"""
)

# ARGV: prefix, id, attempt, stage, progress, lease_ms
# Records progress (never decreasing) and renews the lease. stage 0 = renew only.
PROGRESS = (
    PRELUDE
    + r"""
local id, attempt = ARGV[2], ARGV[3]
if not fenced(id, attempt) then return 0 end
local now = now_ms()
redis.call('ZADD', P .. 'leases', 'XX', now + tonumber(ARGV[6]), id)
local stage = tonumber(ARGV[4])
if stage == 0 then return 1 end
local jk = P .. 'job:' .. id
local progress = math.max(tonumber(redis.call('HGET', jk, 'progress')), tonumber(ARGV[5]))
redis.call('HSET', jk, 'stage', stage, 'progress', progress, 'update_ms', now)
event(id, 'stage', stage, 'progress', progress, 'update_ms', now)
return 1
"""
)

# ARGV: prefix, id, attempt, result, retention_s
COMPLETE = (
    PRELUDE
    + r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return 0 end
leave_running(id, vendor)
finish(id, vendor, 3, 7, 100, 'result', ARGV[4], tonumber(ARGV[5]))
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
finish(id, vendor, 4, 7, progress, 'error', ARGV[4], tonumber(ARGV[5]))
return 1
"""
)

# ARGV: prefix, id, attempt, max_attempts, error, retention_s, refund
# refund=1: the node refused before doing any work (full or draining), so the
# attempt is not counted. Returns 1 requeued, 2 failed for good, 0 fenced off.
RETRY = (
    PRELUDE
    + r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return 0 end
local attempt = tonumber(ARGV[3])
if ARGV[7] == '1' then
  attempt = redis.call('HINCRBY', P .. 'job:' .. id, 'attempt', -1)
end
return retry_or_fail(id, vendor, attempt, tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]))
"""
)

# ARGV: prefix, max_attempts, error, retention_s, limit
# Leases past their deadline: the node or the scheduler running the job is
# gone. Returns the ids put back or failed.
REAP = (
    PRELUDE
    + r"""
local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(expired) do
  local st = redis.call('HMGET', P .. 'job:' .. id, 'state', 'attempt', 'vendor')
  if st[1] == '2' then
    retry_or_fail(id, st[3], tonumber(st[2]), tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
  else
    redis.call('ZREM', P .. 'leases', id)
  end
end
return expired
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
  local qk = P .. 'queue:' .. vendor
  redis.call('ZREM', qk, id)
  if redis.call('ZCARD', qk) == 0 then
    redis.call('LREM', P .. 'ring', 0, vendor)
    redis.call('SREM', P .. 'ring:members', vendor)
  end
else
  leave_running(id, vendor)
  redis.call('PUBLISH', P .. 'cancel', id)
end
finish(id, vendor, 5, 7, tonumber(st[3]), 'error', ARGV[4], tonumber(ARGV[5]))
return 1
"""
)
