-- KEYS: task, leases, callbacks.  ARGV: prefix, token, state, now, retention_s, n_fields, field/value pairs...,
--   then callback stream entries as (dest, value, condition) triples.
-- Only the owner finishes: the worker's parent, after its watchdog killed a pool process, uses that process's token.
if not owned(KEYS[1], ARGV[2]) then return 0 end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = redis.call('HGET', KEYS[1], 'id')
local nf = tonumber(ARGV[6])
local i = 7
for _ = 1, nf do  -- first: started_at may be among them (a task claimed ahead started after its claim)
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1])
  i = i + 2
end
observe(ARGV[1], 'duration', fn, tonumber(ARGV[4]) - tonumber(redis.call('HGET', KEYS[1], 'started_at') or ARGV[4]))
finished(ARGV[1], fn, ARGV[3], ARGV[4])
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[4], 'token', '')
local tp = traceparent(KEYS[1])
while i <= #ARGV do
  redis.call('XADD', KEYS[3], '*', 'dest', ARGV[i], 'key', id, 'value', ARGV[i+1], 'condition', ARGV[i+2],
    'function', fn, 'traceparent', tp)
  i = i + 3
end
redis.call('ZREM', KEYS[2], id)
unbusy(ARGV[1], KEYS[1], id)
move(ARGV[1], fn, id, 'RUNNING', ARGV[3], redis.call('HGET', KEYS[1], 'seq'))
redis.call('EXPIRE', KEYS[1], ARGV[5])
shard_done(ARGV[1], KEYS[1], ARGV[3], ARGV[4])
return 1
