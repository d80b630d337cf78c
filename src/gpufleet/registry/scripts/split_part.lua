-- KEYS: job.  ARGV: prefix, now, batch (as ENQUEUE_MANY's, each entry with the job id and shard index), owner token,
--   then each shard's envelope, event and meta.
-- A big split is written in parts, each a script of its own, so Redis serves others between them: this one writes some
-- shards (they may start at once) and notes how many are written (split_written, for a cancel that comes meanwhile).
-- Returns 'ok', 'cancelled' or 'lost', as SPLIT.
local job, prefix, now = KEYS[1], ARGV[1], ARGV[2]
if not owned(job, ARGV[4]) then return 'lost' end
if redis.call('HGET', job, 'cancel') == '1' then return 'cancelled' end
local tasks = cjson.decode(ARGV[3])
create_tasks(prefix, now, tasks, 4)
local written = tonumber(tasks[#tasks][16]) + 1
if written > tonumber(redis.call('HGET', job, 'split_written') or '0') then
  redis.call('HSET', job, 'split_written', written)
end
return 'ok'
