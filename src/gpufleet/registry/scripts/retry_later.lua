-- KEYS: task, leases, delayed.  ARGV: prefix, token, due, error_json, now, gpu_us
-- Back to QUEUED; the housekeeper pushes the message again once ``due`` has passed. gpu_us: the GPU time its runs took
-- so far, this one's included, which it carries (see CLAIM_READS).
if not owned(KEYS[1], ARGV[2]) then return 0 end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = task_id(ARGV[1], KEYS[1])
local room = string.match(redis.call('HGET', KEYS[1], 'carry') or '', ' (%d+)$') or ''  -- kept across a retry
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'token', '', 'last_error', ARGV[4], 'queued_at', ARGV[5],
  'retry_at', ARGV[3], 'carry', ARGV[6] .. ' ' .. room)
redis.call('ZREM', KEYS[2], id)
redis.call('ZADD', KEYS[3], ARGV[3], id)
deadline(ARGV[1], KEYS[1], id)
move(ARGV[1], fn, id, 'RUNNING', 'QUEUED', redis.call('HGET', KEYS[1], 'seq'))
return 1
