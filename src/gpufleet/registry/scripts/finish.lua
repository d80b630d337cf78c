-- KEYS: task, leases, callbacks.  ARGV: prefix, token, state, now, retention_s, n_fields, field/value pairs...,
--   then callback stream entries as (dest, value, condition) triples.
-- Only the owner finishes: the worker's parent, after its watchdog killed a pool process, uses that process's token.
local state, token, fn, meta, seq, parent = unpack(redis.call('HMGET', KEYS[1], 'state', 'token', 'function', 'meta',
  'seq', 'parent'))
if state ~= 'RUNNING' or token ~= ARGV[2] then return 0 end
local prefix, id = ARGV[1], task_id(ARGV[1], KEYS[1])
local fields, i = {}, 7
for n = 1, tonumber(ARGV[6]) do
  fields[2 * n - 1] = ARGV[i]
  fields[2 * n] = ARGV[i + 1]
  i = i + 2
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[4], 'token', '', unpack(fields))
finished(prefix, fn, ARGV[3], ARGV[4])
local tp = traceparent_of(meta)
while i <= #ARGV do
  add_callback(KEYS[3], ARGV[i], id, ARGV[i + 1], ARGV[i + 2], fn, tp)
  i = i + 3
end
redis.call('ZREM', KEYS[2], id)
move(prefix, fn, id, 'RUNNING', ARGV[3], seq)
redis.call('EXPIRE', KEYS[1], ARGV[5])
shard_done(prefix, KEYS[1], ARGV[3], ARGV[4], parent)
return 1
