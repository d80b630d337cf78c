-- KEYS: task, leases.  ARGV: prefix, expect_state, expect_token, token, now, lease_until, worker, gpu
-- Compare-and-set: only the delivery that saw the current state and owner may take the task.
local state = redis.call('HGET', KEYS[1], 'state')
local token = redis.call('HGET', KEYS[1], 'token') or ''
if state ~= ARGV[2] or token ~= ARGV[3] then return {'conflict', state or ''} end
return claim(ARGV[1], KEYS[1], state, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
