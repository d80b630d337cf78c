-- KEYS: task, leases.  ARGV: token, prefix.  The owner is known dead: its lease ends now (see Registry.lapse).
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', 0)
redis.call('ZADD', KEYS[2], 0, string.sub(KEYS[1], #ARGV[2] + 7))  -- P:task:<id>
return 1
