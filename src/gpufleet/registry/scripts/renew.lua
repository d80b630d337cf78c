-- KEYS: task, leases.  ARGV: token, lease_until, prefix.  Returns 0: lost, 1: renewed, 2: renewed but cancel requested.
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], string.sub(KEYS[1], #ARGV[3] + 7))  -- P:task:<id>
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
return 1
