-- KEYS: job, leases.  ARGV: prefix, now, batch (the last part's shards, as SPLIT_PART's), owner token, the job's
--   message for its merge step, the number of shards, then each shard's envelope, event and meta.
-- The split is done: the shards become tasks and the job waits for them, on no worker. Only the owner that ran the
-- split may do this, and not once the job was cancelled. Shards that already exist (from an earlier part, or an earlier
-- life of the job) count as they stand: a finished one is not run again (one that finished before this counts here; a
-- later one, in shard_done). Returns 'ok', 'cancelled' or 'lost'.
local job, prefix, now, n = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[6])
if not owned(job, ARGV[4]) then return 'lost' end
if redis.call('HGET', job, 'cancel') == '1' then return 'cancelled' end
create_tasks(prefix, now, cjson.decode(ARGV[3]), 6)
local id = task_id(prefix, job)
local ok, bad = 0, 0
for i = 0, n - 1 do
  local state = redis.call('HGET', prefix .. ':task:' .. id .. '~' .. i, 'state')
  if state == 'SUCCEEDED' then ok = ok + 1 elseif retriable(state) then bad = bad + 1 end
end
redis.call('ZREM', KEYS[2], id)
redis.call('HDEL', job, 'lease_until')
redis.call('HSET', job, 'phase', 'shards', 'shards', n, 'shards_ok', ok, 'shards_bad', bad, 'token', 'job:waiting-for-shards', 'merge_envelope', ARGV[5], 'progress', (ok + bad) / n, 'progress_message', '')
if ok + bad >= n then job_step(prefix, job, now) end
return 'ok'
