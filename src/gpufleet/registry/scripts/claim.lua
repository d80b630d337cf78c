-- KEYS: task, leases.  ARGV: prefix, expect_state, expect_token, token, now, lease_until, worker, gpu
-- Compare-and-set: only the delivery that saw the current state and owner may take the task.
local r = redis.call('HMGET', KEYS[1], unpack(CLAIM_READS))
if r[1] ~= ARGV[2] or (r[15] or '') ~= ARGV[3] then return {'conflict', r[1] or ''} end
local id = task_id(ARGV[1], KEYS[1])
return claim(ARGV[1], KEYS[1], id, r, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
