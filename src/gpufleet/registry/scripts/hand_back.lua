-- KEYS: task, leases.  ARGV: prefix, token, now, envelope, error_json, aging_s, budget, min_room, gpu_us, stay, preempted
-- A worker stopped past its shutdown grace: the supervisor killed it, and hands its task back. The attempt does not
-- count (the task did nothing wrong), and it goes to the head of its queue, where another worker takes it at once.
-- Only the owner the caller saw (and checked dead) is replaced. Returns 1, or 0 if the task finished or moved on.
-- With no error_json it is a task a worker claimed ahead and gives back unstarted: its record keeps its last error and
-- when it was queued.
-- With a budget, it is a task whose GPU ran out of memory (or broke): it goes back only while its GPU retries are
-- within the budget (returns -1 past it, and changes nothing else: the caller fails it), and with min_room, only a GPU
-- with that much room takes it. With stay ('1'), it runs again where it is, still its owner's: only the retry and its
-- error are recorded. With preempted ('1'), its host's GPUs were reclaimed: the budget is its preemptions', and the
-- attempt stays counted (its number goes on) while its max_attempts grows by one, so it spends none of them.
if not owned(KEYS[1], ARGV[2]) then return 0 end
local budgeted = ARGV[11] == '1' and 'preemptions' or 'gpu_retries'
if ARGV[7] ~= '' then
  if tonumber(redis.call('HGET', KEYS[1], budgeted) or '0') >= tonumber(ARGV[7]) then return -1 end
  redis.call('HINCRBY', KEYS[1], budgeted, 1)
  -- What it carries (see CLAIM_READS): the GPU time its runs took so far, this one's included, and the room it needs.
  redis.call('HSET', KEYS[1], 'carry', ARGV[9] .. ' ' .. ARGV[8])
  if ARGV[10] == '1' then
    redis.call('HSET', KEYS[1], 'last_error', ARGV[5])
    return 1
  end
end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = task_id(ARGV[1], KEYS[1])
redis.call('ZREM', KEYS[2], id)
redis.call('HINCRBY', KEYS[1], ARGV[11] == '1' and 'max_attempts' or 'attempts', ARGV[11] == '1' and 1 or -1)
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'token', '', 'progress', 0, 'progress_message', '')
redis.call('HDEL', KEYS[1], 'lease_until')
move(ARGV[1], fn, id, 'RUNNING', 'QUEUED', redis.call('HGET', KEYS[1], 'seq'))
push_head(ARGV[1], KEYS[1], id, ARGV[4], tonumber(ARGV[3]), tonumber(ARGV[6]))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'queued_at', ARGV[3], 'last_error', ARGV[5]) end
deadline(ARGV[1], KEYS[1], id)
return 1
