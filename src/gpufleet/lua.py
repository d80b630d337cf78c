"""Lua scripts for the registry. Each runs atomically in Redis, so a transition and its side effects (queue push,
lease, callback record) happen together or not at all.

Key layout (prefix ``P``): ``P:task:{id}`` hash, ``P:leases`` and ``P:delayed`` sorted sets of task ids,
``P:counts:{function}`` hash of state -> count, ``P:callbacks`` stream of outgoing records.
"""

# ARGV: prefix, now, batch: a JSON array with one array of strings per task:
#   [id, function, queue_key, envelope, on_success, on_failure, max_attempts, source, created_at, event_ts]
# One JSON argument, not ten per task: redis-py packs arguments in Python, which cost more than the script.
# Returns a list of 1 (enqueued) / 0 (duplicate: a record with that id exists) per task.
ENQUEUE_MANY = """
local prefix, now = ARGV[1], ARGV[2]
local out = {}
for n, t in ipairs(cjson.decode(ARGV[3])) do
  local key = prefix .. ':task:' .. t[1]
  if redis.call('EXISTS', key) == 1 then
    out[n] = 0
  else
    redis.call('HSET', key, 'id', t[1], 'function', t[2], 'state', 'QUEUED', 'attempts', 0, 'queue', t[3],
      'message', t[4], 'on_success', t[5], 'on_failure', t[6], 'max_attempts', t[7], 'source', t[8],
      'created_at', t[9], 'queued_at', now, 'event_ts', t[10])
    redis.call('LPUSH', t[3], t[4])
    redis.call('HINCRBY', prefix .. ':counts:' .. t[2], 'QUEUED', 1)
    out[n] = 1
  end
end
return out
"""

# KEYS: task, leases.  ARGV: prefix, expect_state, expect_token, token, now, lease_until, worker, gpu
# Compare-and-set: only the delivery that saw the current state and owner may take the task.
CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
local token = redis.call('HGET', KEYS[1], 'token') or ''
if state ~= ARGV[2] or token ~= ARGV[3] then return {'conflict', state or ''} end
local fn = redis.call('HGET', KEYS[1], 'function')
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'token', ARGV[4], 'started_at', ARGV[5], 'lease_until', ARGV[6],
  'worker', ARGV[7], 'gpu', ARGV[8], 'progress', 0, 'progress_message', '')
redis.call('ZADD', KEYS[2], ARGV[6], redis.call('HGET', KEYS[1], 'id'))
if state ~= 'RUNNING' then
  redis.call('HINCRBY', ARGV[1] .. ':counts:' .. fn, state, -1)
  redis.call('HINCRBY', ARGV[1] .. ':counts:' .. fn, 'RUNNING', 1)
end
return {'ok', tostring(attempts), unpack(redis.call('HMGET', KEYS[1], 'max_attempts', 'on_success', 'on_failure'))}
"""

# KEYS: task, leases.  ARGV: token, lease_until.  Returns 0: lost, 1: renewed, 2: renewed but cancel requested.
RENEW = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: task, leases, callbacks.  ARGV: prefix, token, state, now, retention_s, n_fields, field/value pairs...,
#   then callback stream entries as (dest, value, condition) triples.
# A token of '*' finishes whatever owner holds the task (used by the worker parent after a hard kill).
FINISH = """
local cur = redis.call('HGET', KEYS[1], 'state')
if cur ~= 'RUNNING' then return 0 end
if ARGV[2] ~= '*' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then return 0 end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[4], 'token', '')
local nf = tonumber(ARGV[6])
local i = 7
for _ = 1, nf do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1])
  i = i + 2
end
while i <= #ARGV do
  redis.call('XADD', KEYS[3], '*', 'dest', ARGV[i], 'key', id, 'value', ARGV[i+1], 'condition', ARGV[i+2],
    'function', fn)
  i = i + 3
end
redis.call('ZREM', KEYS[2], id)
redis.call('HINCRBY', ARGV[1] .. ':counts:' .. fn, 'RUNNING', -1)
redis.call('HINCRBY', ARGV[1] .. ':counts:' .. fn, ARGV[3], 1)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: task, leases, delayed.  ARGV: prefix, token, due, error_json, now
# Back to QUEUED; the housekeeper pushes the stored message again once ``due`` has passed.
RETRY_LATER = """
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' or redis.call('HGET', KEYS[1], 'token') ~= ARGV[2] then
  return 0
end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'token', '', 'last_error', ARGV[4], 'queued_at', ARGV[5])
redis.call('ZREM', KEYS[2], id)
redis.call('ZADD', KEYS[3], ARGV[3], id)
redis.call('HINCRBY', ARGV[1] .. ':counts:' .. fn, 'RUNNING', -1)
redis.call('HINCRBY', ARGV[1] .. ':counts:' .. fn, 'QUEUED', 1)
return 1
"""

# KEYS: delayed, leases.  ARGV: prefix, now, limit
# Pushes due retries, and re-queues tasks whose lease lapsed (their worker died with them). Returns counts.
HOUSEKEEP = """
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local promoted, reaped = 0, 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', KEYS[1], id)
  local key = prefix .. ':task:' .. id
  if redis.call('HGET', key, 'state') == 'QUEUED' then
    redis.call('LPUSH', redis.call('HGET', key, 'queue'), redis.call('HGET', key, 'message'))
    promoted = promoted + 1
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)) do
  redis.call('ZREM', KEYS[2], id)
  local key = prefix .. ':task:' .. id
  local lease = tonumber(redis.call('HGET', key, 'lease_until') or '0')
  if redis.call('HGET', key, 'state') == 'RUNNING' and lease <= now then
    local fn = redis.call('HGET', key, 'function')
    redis.call('HSET', key, 'state', 'QUEUED', 'token', '', 'queued_at', ARGV[2],
      'last_error', '{"errorType":"WorkerLost","errorMessage":"lease expired: the worker stopped renewing it"}')
    redis.call('HINCRBY', prefix .. ':counts:' .. fn, 'RUNNING', -1)
    redis.call('HINCRBY', prefix .. ':counts:' .. fn, 'QUEUED', 1)
    redis.call('LPUSH', redis.call('HGET', key, 'queue'), redis.call('HGET', key, 'message'))
    reaped = reaped + 1
  end
end
return {promoted, reaped}
"""
