-- KEYS: task, checkpoint.  ARGV: token, state, ttl_s, now
-- A running task's handler saves its state: only under the owner the caller names, so an attempt that lost the task
-- (its worker frozen past its lease, say) never overwrites what the attempt that took over saved. The record counts
-- the checkpoints and says when the last was made. Returns 1, or 0 for an owner that is not the task's any more.
if not owned(KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'checkpoints', 1)
redis.call('HSET', KEYS[1], 'checkpoint_at', ARGV[4])
return 1
