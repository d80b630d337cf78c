-- KEYS: task.  ARGV: prefix, from_queue, to_queue, envelope (built for to_queue), from_pool, to_pool, now, aging_s.
-- A pool with no live worker hands a QUEUED task over to another pool's queue: its record names the new queue and the
-- new message, so the old message, still in the old list, is a stale copy that POP_CLAIM drops; and a worker that
-- took the old one anyway can only claim the task once (CLAIM compares the state), so it never runs twice. At the head
-- of the new queue: it waited its turn already. Returns 1 if it moved, 0 if it was no longer QUEUED there.
if redis.call('HGET', KEYS[1], 'state') ~= 'QUEUED' or redis.call('HGET', KEYS[1], 'queue') ~= ARGV[2] then
  return 0
end
local id, fn = task_id(ARGV[1], KEYS[1]), redis.call('HGET', KEYS[1], 'function')
redis.call('ZREM', ARGV[1] .. ':pending:' .. ARGV[2], id)
redis.call('HSET', KEYS[1], 'queue', ARGV[3])
push_head(ARGV[1], KEYS[1], id, ARGV[4], tonumber(ARGV[7]), tonumber(ARGV[8]))
redis.call('HINCRBY', ARGV[1] .. ':m:overflow', fn .. '\31' .. ARGV[5] .. '\31' .. ARGV[6], 1)
return 1
