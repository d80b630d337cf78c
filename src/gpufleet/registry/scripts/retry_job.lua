-- KEYS: job.  ARGV: prefix, now, then (shard id, envelope) pairs: the message of each shard that may run again.
-- A FAILED, TIMED_OUT, CANCELLED or EXPIRED job that had split runs again from where it stopped: its shards that did
-- not succeed run again from attempt 1 (their results, and those of the others, are kept), and it merges once they are
-- done; with every shard SUCCEEDED, it merges at once. Returns {outcome, state}: 'queued' (state: the job's before),
-- 'missing', 'conflict' (the job is not retriable: its state), or 'expired' (a shard's record is gone: its id).
local job, prefix, now = KEYS[1], ARGV[1], ARGV[2]
local state, n = unpack(redis.call('HMGET', job, 'state', 'shards'))
local id = task_id(prefix, job)
if not state then return {'missing', ''} end
if not retriable(state) then return {'conflict', state} end
local envelopes = {}
for i = 3, #ARGV, 2 do envelopes[ARGV[i]] = ARGV[i + 1] end
local ok, again = 0, {}
for i = 0, tonumber(n) - 1 do
  local sid = id .. '~' .. i
  local s = redis.call('HGET', prefix .. ':task:' .. sid, 'state')
  if s == 'SUCCEEDED' then
    ok = ok + 1
  elseif not s or not envelopes[sid] then
    return {'expired', sid}
  else
    again[#again + 1] = {sid, s}
  end
end
redis.call('PERSIST', job)
redis.call('HDEL', job, 'result', 'error', 'condition', 'cancel', 'cancel_requested_at', 'finished_at', 'worker',
  'gpu')
redis.call('HINCRBY', job, 'manual_retries', 1)
redis.call('HSET', job, 'state', 'RUNNING', 'phase', 'shards', 'shards_ok', ok, 'shards_bad', 0, 'attempts', 0,
  'token', 'job:waiting-for-shards', 'progress', ok / tonumber(n), 'started_at', now, 'job_started_at', now)
move(prefix, redis.call('HGET', job, 'function'), id, state, 'RUNNING', redis.call('HGET', job, 'seq'))
for _, sid in ipairs(again) do
  rerun(prefix, prefix .. ':task:' .. sid[1], sid[1], sid[2], envelopes[sid[1]], now)
end
if #again == 0 then job_step(prefix, job, now) end
return {'queued', state}
