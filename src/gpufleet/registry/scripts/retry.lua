-- KEYS: task.  ARGV: prefix, now, envelope.  A finished, unsuccessful task runs again from attempt 1, as a new event.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', ''} end
if not retriable(state) then return {'conflict', state} end
rerun(ARGV[1], KEYS[1], task_id(ARGV[1], KEYS[1]), state, ARGV[3], ARGV[2])
return {'queued', state}
