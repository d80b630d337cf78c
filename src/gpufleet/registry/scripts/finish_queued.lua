-- KEYS: task, delayed, callbacks.
-- ARGV: prefix, now, expect_attempts, retention_s, error_json, dest, record, mode ('cancel' | 'expire')
-- QUEUED -> CANCELLED (or EXPIRED) at once, out of the retry schedule, the position and deadline indexes, with its
-- failure record. Its message stays in the Celery list (removing it would scan the list: O(n) at 10^6 queued), and
-- is dropped by the worker it is delivered to. Cancel of a RUNNING task sets the cancel flag the worker's lease keeper
-- reads; expiry leaves a running task alone. Returns {outcome, state}.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
local id = task_id(ARGV[1], KEYS[1])
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
  add_callback(KEYS[3], ARGV[6], id, ARGV[7], condition, fn, traceparent(KEYS[1]))
end
move(ARGV[1], fn, id, 'QUEUED', final, redis.call('HGET', KEYS[1], 'seq'))
redis.call('EXPIRE', KEYS[1], ARGV[4])
shard_done(ARGV[1], KEYS[1], final, ARGV[2])
return {string.lower(final), 'QUEUED'}
