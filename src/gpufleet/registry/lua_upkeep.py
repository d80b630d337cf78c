"""Lua scripts for the registry's upkeep: housekeeping (due retries, lapsed leases), the control plane's changes to
queued and finished tasks (cancel, expire, retry), index trimming, lost messages and priority aging. The key layout and
the helpers they share are in :mod:`gpufleet.registry.lua`."""

from gpufleet.registry.lua import HELPERS

# KEYS: delayed, leases.  ARGV: prefix, now, aging_s, n, then n (id, envelope) pairs of due retries, then (id,
# envelope) pairs of tasks whose lease lapsed. Pushes the due retries (to the back), and re-queues at the head the
# tasks whose worker died with them, at the level they have earned: they had waited their turn already. Each is
# checked again here (compare-and-set). Returns {promoted, reaped}.
HOUSEKEEP = (
    HELPERS
    + """
local prefix, now, aging, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local promoted, reaped = 0, 0
for i = 5, 4 + 2 * n, 2 do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= now then
    redis.call('ZREM', KEYS[1], id)
    local key = prefix .. ':task:' .. id
    if redis.call('HGET', key, 'state') == 'QUEUED' then
      redis.call('HDEL', key, 'retry_at')
      redis.call('HSET', key, 'queued_at', ARGV[2])  -- its queue wait starts now, not when its attempt failed
      push_back(prefix, key, id, ARGV[i + 1])
      promoted = promoted + 1
    end
  end
end
for i = 5 + 2 * n, #ARGV, 2 do
  local id = ARGV[i]
  local key = prefix .. ':task:' .. id
  local lease = tonumber(redis.call('HGET', key, 'lease_until') or '0')
  if redis.call('HGET', key, 'state') == 'RUNNING' and lease <= now then
    redis.call('ZREM', KEYS[2], id)
    local fn = redis.call('HGET', key, 'function')
    unbusy(prefix, key, id)
    redis.call('HSET', key, 'state', 'QUEUED', 'token', '',
      'last_error', '{"errorType":"WorkerLost","errorMessage":"lease expired: the worker stopped renewing it"}')
    move(prefix, fn, id, 'RUNNING', 'QUEUED', redis.call('HGET', key, 'seq'))
    push_head(prefix, key, id, ARGV[i + 1], now, aging)
    redis.call('HSET', key, 'queued_at', ARGV[2])  -- after push_head, which reads when it was first queued
    deadline(prefix, key, id)
    reaped = reaped + 1
  elseif redis.call('HGET', key, 'state') ~= 'RUNNING' then
    redis.call('ZREM', KEYS[2], id)  -- finished or re-queued meanwhile: nothing to reap
  end
end
return {promoted, reaped}
"""
)

# KEYS: task, delayed, callbacks.
# ARGV: prefix, now, expect_attempts, retention_s, error_json, dest, record, mode ('cancel' | 'expire')
# QUEUED -> CANCELLED (or EXPIRED) at once, out of the retry schedule, the position and deadline indexes, with its
# failure record. Its message stays in the Celery list (removing it would scan the list: O(n) at 10^6 queued), and
# is dropped by the worker it is delivered to. Cancel of a RUNNING task sets the cancel flag the worker's lease keeper
# reads; expiry leaves a running task alone. Returns {outcome, state}.
FINISH_QUEUED = (
    HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
local id = redis.call('HGET', KEYS[1], 'id')
local expire = ARGV[8] == 'expire'
if state ~= 'QUEUED' then redis.call('ZREM', ARGV[1] .. ':deadlines', id) end
if state == 'RUNNING' and not expire then
  if redis.call('HGET', KEYS[1], 'cancel') == '1' then return {'already', state} end
  redis.call('HSET', KEYS[1], 'cancel', '1', 'cancel_requested_at', ARGV[2])
  return {'signalled', state}
end
if state ~= 'QUEUED' then return {'noop', state} end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then return {'conflict', state} end
local fn = redis.call('HGET', KEYS[1], 'function')
local final, condition = 'CANCELLED', 'Cancelled'
if expire then final, condition = 'EXPIRED', 'EventAgeExceeded' end
unpend(ARGV[1], KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', ARGV[1] .. ':deadlines', id)
finished(ARGV[1], fn, final, ARGV[2])
redis.call('HSET', KEYS[1], 'state', final, 'finished_at', ARGV[2], 'condition', condition, 'error', ARGV[5])
if not expire then redis.call('HSET', KEYS[1], 'cancel', '1', 'cancel_requested_at', ARGV[2]) end
redis.call('HDEL', KEYS[1], 'retry_at')
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'dest', ARGV[6], 'key', id, 'value', ARGV[7], 'condition', condition,
    'function', fn, 'traceparent', traceparent(KEYS[1]))
end
move(ARGV[1], fn, id, 'QUEUED', final, redis.call('HGET', KEYS[1], 'seq'))
redis.call('EXPIRE', KEYS[1], ARGV[4])
shard_done(ARGV[1], KEYS[1], final, ARGV[2])
return {string.lower(final), 'QUEUED'}
"""
)

# KEYS: task.  ARGV: prefix, now, envelope.  A finished, unsuccessful task runs again from attempt 1, as a new event.
RETRY = (
    HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if not retriable(state) then return {'conflict', state} end
rerun(ARGV[1], KEYS[1], redis.call('HGET', KEYS[1], 'id'), state, ARGV[3], ARGV[2])
return {'queued', state}
"""
)

# ARGV: prefix, limit.  Drops index entries whose record expired (retention passed), oldest first, stopping at
# the first live one: records expire roughly in creation order, and readers skip any stragglers.
TRIM_INDEX = """
local prefix, removed = ARGV[1], 0
for _, fn in ipairs(redis.call('SMEMBERS', prefix .. ':functions')) do
  for _, st in ipairs({'SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT', 'EXPIRED'}) do
    local idx = prefix .. ':idx:' .. fn .. ':' .. st
    for _, id in ipairs(redis.call('ZRANGE', idx, 0, tonumber(ARGV[2]) - 1)) do
      if redis.call('EXISTS', prefix .. ':task:' .. id) == 1 then break end
      redis.call('ZREM', idx, id)
      removed = removed + 1
    end
  end
end
return removed
"""

# ARGV: prefix, queue, head_n, limit.  The pending tasks that have left the Celery lists without being claimed:
# those ordered before the first pending task among the ``head_n`` messages at the head (the right end, where
# consumers pop) of the first level that has messages, or every pending task when every level is empty. A message is
# in flight for milliseconds between a pop and its claim; one that stays out longer was lost with its consumer (killed
# or frozen between Redis handing it out and kombu recording it as unacked) or sits in a dead consumer's unacked hash.
# Returns id, score pairs.
SCAN_LOST = (
    HELPERS
    + """
local prefix, queue = ARGV[1], ARGV[2]
local pending = prefix .. ':pending:' .. queue
for prio = 9, 0, -1 do  -- the levels in the order they are read: the first message in sight marks the place
  local messages = redis.call('LRANGE', qkey(queue, prio), -tonumber(ARGV[3]), -1)
  for i = #messages, 1, -1 do
    -- Only a task's current message marks its place: an older copy left in the list (a cancelled task retried, a
    -- re-pushed one) carries another delivery tag.
    local id = string.match(messages[i], '"id":%s*"([^"]+)"')
    local current = id and redis.call('HGET', prefix .. ':task:' .. id, 'tag') == tag_of(messages[i])
    local score = current and redis.call('ZSCORE', pending, id)
    if score then
      return redis.call('ZRANGEBYSCORE', pending, '-inf', '(' .. score, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
    end
  end
  if #messages > 0 then return {} end  -- only stale copies in sight: no verdict this time
end
return redis.call('ZRANGE', pending, 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
"""
)

# KEYS: task.  ARGV: prefix, from_queue, to_queue, envelope (built for to_queue), from_pool, to_pool, now, aging_s.
# A pool with no live worker hands a QUEUED task over to another pool's queue: its record names the new queue and the
# new message, so the old message, still in the old list, is a stale copy that POP_CLAIM drops; and a worker that
# took the old one anyway can only claim the task once (CLAIM compares the state), so it never runs twice. At the head
# of the new queue: it waited its turn already. Returns 1 if it moved, 0 if it was no longer QUEUED there.
MOVE_QUEUED = (
    HELPERS
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'QUEUED' or redis.call('HGET', KEYS[1], 'queue') ~= ARGV[2] then
  return 0
end
local id, fn = redis.call('HGET', KEYS[1], 'id'), redis.call('HGET', KEYS[1], 'function')
redis.call('ZREM', ARGV[1] .. ':pending:' .. ARGV[2], id)
redis.call('HSET', KEYS[1], 'queue', ARGV[3])
push_head(ARGV[1], KEYS[1], id, ARGV[4], tonumber(ARGV[7]), tonumber(ARGV[8]))
redis.call('HINCRBY', ARGV[1] .. ':m:overflow', fn .. '\\31' .. ARGV[5] .. '\\31' .. ARGV[6], 1)
return 1
"""
)

# KEYS: task.  ARGV: prefix, score, envelope, queue, now, aging_s.  Push a lost task's message again, at the head of
# its queue, if it is still QUEUED with the position score the scan saw (unchanged: nobody pushed or claimed it
# since). A pending entry whose record expired is dropped. Returns 1 (pushed) or 0.
REQUEUE_LOST = (
    HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('ZREM', ARGV[1] .. ':pending:' .. ARGV[4], string.sub(KEYS[1], #ARGV[1] + 7))
  return 0
end
if state ~= 'QUEUED' then return 0 end
local id = redis.call('HGET', KEYS[1], 'id')
if redis.call('ZSCORE', ARGV[1] .. ':pending:' .. redis.call('HGET', KEYS[1], 'queue'), id) ~= ARGV[2] then
  return 0
end
push_head(ARGV[1], KEYS[1], id, ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
return 1
"""
)

# ARGV: prefix, now, aging_s, limit.  Aging, so that no priority starves: the message at the head of a level (its
# oldest) that has waited ``aging_s`` there moves to the back of the next level up, its position score with it. A
# task of priority p is therefore at the top level after (9 - p) * aging_s, behind only what was there before it.
# Stale copies at a head (their task finished, or re-pushed since) are dropped: a worker would drop them anyway.
# Returns how many moved.
AGE = (
    HELPERS
    + """
local prefix, now, aging, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local moved = 0
for _, queue in ipairs(redis.call('SMEMBERS', prefix .. ':queues')) do
  local pending = prefix .. ':pending:' .. queue
  for prio = 8, 0, -1 do
    local list = qkey(queue, prio)
    while moved < limit do
      local head = redis.call('LINDEX', list, -1)
      if not head then break end
      local id = string.match(head, '"id":%s*"([^"]+)"') or ''
      local key = prefix .. ':task:' .. id
      local state, tag = unpack(redis.call('HMGET', key, 'state', 'tag'))
      local finished = not state or (state ~= 'QUEUED' and state ~= 'RUNNING')
      if finished or (state == 'QUEUED' and tag and tag ~= tag_of(head)) then
        redis.call('RPOP', list)
      elseif state == 'RUNNING' then
        break  -- another copy of a running task: its worker decides; it blocks aging of this level meanwhile
      else
        local since = math.max(tonumber(redis.call('HGET', key, 'queued_at') or '0'),
                               tonumber(redis.call('HGET', key, 'level_at') or '0'))
        if now - since < aging then break end
        redis.call('RPOP', list)
        local up = prio + 1
        redis.call('HSET', key, 'prio', up, 'level_at', ARGV[2])
        redis.call('ZADD', pending, (9 - up) * LEVEL + redis.call('INCR', prefix .. ':seq'), id)
        redis.call('LPUSH', qkey(queue, up), with_priority(head, up))
        moved = moved + 1
      end
    end
  end
end
return moved
"""
)
