-- Shared by every script that changes a task's state: the per-state index follows the record, and the state counters
-- count the change in the same atomic step (the wait and duration histograms are the worker's: registry/tally.py).
-- Numbers go to redis.call as strings: Redis formats a Lua number with snprintf("%.17g"), 2,000 instructions each
-- (15 a task were 7 % of a claim and a finish); string.format('%d') is an integer's cheap path.
local function int(n)
  return string.format('%d', n)
end
local function finished(prefix, fn, state, now)
  redis.call('HINCRBY', prefix .. ':m:finished', fn .. '\31' .. state, '1')
  local minute = prefix .. ':m:min:' .. int(tonumber(now) / 60)
  -- A new field is a new minute's first count (or its first failure): its expiry is set then, not at every task.
  if redis.call('HINCRBY', minute, state == 'SUCCEEDED' and 'ok' or 'failed', '1') == 1 then
    redis.call('EXPIRE', minute, '7200')
  end
end
local function move(prefix, fn, id, from, to, score)
  if from then redis.call('ZREM', prefix .. ':idx:' .. fn .. ':' .. from, id) end
  if to then redis.call('ZADD', prefix .. ':idx:' .. fn .. ':' .. to, score, id) end
end
-- A task's id, from its key (P:task:<id>): the record does not repeat it.
local function task_id(prefix, key)
  return string.sub(key, #prefix + 7)
end
-- The string value of the first ``"name":`` in a Celery message, or nil. A plain find, then a match anchored there:
-- an unanchored pattern tries every byte of the message (6 µs for a 600-byte message, twice a claim).
local function json_string(message, name)
  local at = string.find(message, '"' .. name .. '":', 1, true)
  return at and string.match(message, '^%s*"([^"]*)"', at + #name + 3)
end
local function id_of(message)
  return json_string(message, 'id') or ''
end
local function tag_of(envelope)
  return json_string(envelope, 'delivery_tag') or ''
end
-- Priorities: kombu keeps one list per level, and reads level 0 first (our priority 9; see messages.PRIORITY_STEPS).
-- A record's 'priority' is what was asked for; 'prio' is its level now, which aging raises while it waits.
-- Its position score is (9 - prio) * LEVEL + seq, or - seq at the head: in score order, the pending tasks are in the
-- order the worker takes them, across every level (seq stays below 2^48, and every score is an exact double).
local LEVEL = 562949953421312
local function qkey(queue, prio)
  if prio >= 9 then return queue end
  return queue .. '\6\22' .. (9 - prio)
end
local function with_priority(envelope, prio)
  return (string.gsub(envelope, '"priority":%s*%d+', '"priority":' .. (9 - prio), 1))
end
-- Push a task's message to the back of its queue (LPUSH; consumers pop from the right), at the priority it asked
-- for (a re-queued task starts again from there). The position score takes the next arrival number; the record keeps
-- the message's delivery tag, so a stale copy of an older message in the list is told apart from the current one. A
-- ``tag`` comes with a message intake just built (its priority is right); any other is set to the record's. Returns
-- the arrival number.
local function push_back(prefix, key, id, envelope, tag)
  local queue = redis.call('HGET', key, 'queue')
  local prio = tonumber(redis.call('HGET', key, 'priority') or '4')
  local seq = redis.call('INCR', prefix .. ':seq')
  if not tag then envelope = with_priority(envelope, prio) end
  redis.call('ZADD', prefix .. ':pending:' .. queue, int((9 - prio) * LEVEL + seq), id)
  redis.call('SADD', prefix .. ':queues', queue)
  redis.call('HSET', key, 'tag', tag or tag_of(envelope), 'prio', prio)
  redis.call('HDEL', key, 'aged_from')  -- a new turn in the queue: its wait starts over
  redis.call('LPUSH', qkey(queue, prio), envelope)
  return seq
end
-- Back at the head of its queue (RPUSH is "next"), at the level it has earned by waiting since it was first queued
-- in this turn (aged_from, kept across re-queues): while it ran, or its message was lost, it was in no list, and
-- the aging pass lifted the tasks queued with it, not it. Its position score is below every other of that level,
-- so position order stays the lists' order.
local function push_head(prefix, key, id, envelope, now, aging)
  local queue = redis.call('HGET', key, 'queue')
  local base = tonumber(redis.call('HGET', key, 'priority') or '4')
  local since = tonumber(redis.call('HGET', key, 'aged_from') or redis.call('HGET', key, 'queued_at')
    or redis.call('HGET', key, 'created_at') or now)
  local prio = tonumber(redis.call('HGET', key, 'prio') or base)
  prio = math.min(9, math.max(prio, base + math.floor((now - since) / aging)))
  redis.call('HSET', key, 'prio', prio, 'aged_from', since, 'level_at', now)
  envelope = with_priority(envelope, prio)
  redis.call('ZADD', prefix .. ':pending:' .. queue, int((9 - prio) * LEVEL - redis.call('INCR', prefix .. ':seq')), id)
  redis.call('SADD', prefix .. ':queues', queue)
  redis.call('HSET', key, 'tag', tag_of(envelope))
  redis.call('RPUSH', qkey(queue, prio), envelope)
end
-- A task with a max age is indexed by its deadline while it may wait (QUEUED), so it expires even unclaimed.
local function deadline(prefix, key, id)
  local max_age = redis.call('HGET', key, 'max_age')
  if max_age then
    local due = tonumber(redis.call('HGET', key, 'event_ts')) + tonumber(max_age)
    redis.call('ZADD', prefix .. ':deadlines', due, id)
  end
end
local function unpend(prefix, key, id)
  redis.call('ZREM', prefix .. ':pending:' .. redis.call('HGET', key, 'queue'), id)
end
-- The task's W3C traceparent (in its meta), for the headers of its callback records; '' for none.
local function traceparent_of(meta)
  return string.match(meta or '', '"traceparent":"([0-9a-f%-]+)"') or ''
end
local function traceparent(key)
  return traceparent_of(redis.call('HGET', key, 'meta'))
end
-- A record for the dispatcher: an entry of the callback stream, in the format keyspace.CALLBACK_FIELDS names.
local function add_callback(stream, dest, id, value, condition, fn, tp)
  redis.call('XADD', stream, '*', 'dest', dest, 'key', id, 'value', value, 'condition', condition, 'function', fn,
    'traceparent', tp)
end
-- Whether the task runs under this owner: only its owner may finish it or give it back.
local function owned(key, token)
  return redis.call('HGET', key, 'state') == 'RUNNING' and redis.call('HGET', key, 'token') == token
end
-- What a claim reads of a record, in one HMGET (each redis.call costs Lua about as much as the command itself):
-- CLAIM_READS[1..2] decide whether it may be claimed, the rest are its bookkeeping and the worker's reply (its queue
-- says which pool its GPU time is counted in; carry, what it carries from its earlier runs: "<gpu_us> <min_room>",
-- the GPU time they took, which its record adds up, and the room a GPU needs for it after it ran out of memory: one
-- field, absent until a run ends without finishing it, as a missing field costs a scan of the record).
local CLAIM_READS = {'state', 'tag', 'function', 'queue', 'queued_at', 'created_at', 'seq', 'max_age', 'attempts',
  'max_attempts', 'on_success', 'on_failure', 'event_ts', 'cancel', 'token', 'carry'}
-- The task (QUEUED, or RUNNING under an owner that died) runs under ``token`` now, with a lease to ``lease_until``.
-- ``r``: its fields CLAIM_READS, in that order. Returns what the worker needs to finish it without reading it again,
-- and how long it waited in its queue ('' for one taken over), for the worker's wait histogram.
local function claim(prefix, key, id, r, token, now, lease_until, worker, gpu)
  local waited = ''
  if r[1] == 'QUEUED' then
    redis.call('ZREM', prefix .. ':pending:' .. r[4], id)
    if r[8] then redis.call('ZREM', prefix .. ':deadlines', id) end  -- the worker checks the age itself from here on
    waited = string.format('%.6f', tonumber(now) - tonumber(r[5] or r[6] or now))
    move(prefix, r[3], id, 'QUEUED', 'RUNNING', r[7])
  end
  local attempts = int(tonumber(r[9] or '0') + 1)
  redis.call('HSET', key, 'state', 'RUNNING', 'token', token, 'started_at', now, 'lease_until', lease_until,
    'worker', worker, 'gpu', gpu, 'attempts', attempts)
  -- A first attempt has no progress to clear: readers take none for 0 (two fields fewer to append, 2 % of a task).
  if attempts ~= '1' then redis.call('HSET', key, 'progress', '0', 'progress_message', '') end
  redis.call('ZADD', prefix .. ':leases', lease_until, id)
  return {'ok', attempts, r[10], r[11], r[12], r[13], r[14], waited, r[4], r[16]}
end
-- What take_message reads of a record: CLAIM_READS, then the event and meta the worker runs.
local function take_reads()
  local reads = {unpack(CLAIM_READS)}
  reads[#reads + 1], reads[#reads + 2] = 'event', 'meta'
  return reads
end
-- One message a worker popped from a queue's list (``reads``: take_reads(), made once per script): claimed if its
-- task waits for it (QUEUED, and the record names this message: not a stale copy), as {'ok', ..., waited, queue,
-- carry, id, function, event, meta}; {'other', id} for a task that is not waiting but running (another copy of a running one);
-- nil for one no worker should run (finished, expired, stale), which is dropped.
local function take_message(prefix, message, reads, token, now, lease_until, worker, gpu)
  local id = id_of(message)
  local key = prefix .. ':task:' .. id
  local r = redis.call('HMGET', key, unpack(reads))
  if r[1] == 'QUEUED' and (not r[2] or r[2] == tag_of(message)) then
    local out = claim(prefix, key, id, r, token, now, lease_until, worker, gpu)
    out[11], out[12], out[13], out[14] = id, r[3], r[#reads - 1], r[#reads]
    return out
  elseif r[1] == 'RUNNING' then
    return {'other', id}
  end
end
-- Sharded jobs (gpufleet.registry.jobs). A job whose shards are all final has one step left, on a worker of its own
-- queue:
-- merge, or the failure that names its shards. It is queued with the message stored when it split, from attempt 0.
local function job_step(prefix, job, now)
  local fn, from, started = unpack(redis.call('HMGET', job, 'function', 'state', 'started_at'))
  local id = task_id(prefix, job)
  -- The claim of the merge step sets started_at again: the job's own start is kept for its status and record.
  redis.call('HSETNX', job, 'job_started_at', started or now)
  redis.call('HSET', job, 'phase', 'merge', 'state', 'QUEUED', 'attempts', 0, 'token', '', 'queued_at', now)
  move(prefix, fn, id, from, 'QUEUED', redis.call('HGET', job, 'seq'))
  push_back(prefix, job, id, redis.call('HGET', job, 'merge_envelope'))
end
-- A shard reached a final state: its job counts it, and the last one queues the job's step. ``parent``: the record's,
-- when the caller has read it.
local function shard_done(prefix, key, state, now, parent)
  if parent == nil then parent = redis.call('HGET', key, 'parent') end  -- false: read, and it has none
  if not parent then return end
  local job = prefix .. ':task:' .. parent
  if redis.call('HGET', job, 'phase') ~= 'shards' then return end
  redis.call('HINCRBY', job, state == 'SUCCEEDED' and 'shards_ok' or 'shards_bad', 1)
  local ok, bad, n = unpack(redis.call('HMGET', job, 'shards_ok', 'shards_bad', 'shards'))
  local done = tonumber(ok) + tonumber(bad)
  redis.call('HSET', job, 'progress', done / tonumber(n))
  if done >= tonumber(n) then job_step(prefix, job, now) end
end
-- A finished, unsuccessful task runs again from attempt 1, as a new event (RETRY, and a job's shards).
local function rerun(prefix, key, id, state, envelope, now)
  local fn = redis.call('HGET', key, 'function')
  redis.call('PERSIST', key)
  local preempted = tonumber(redis.call('HGET', key, 'preemptions') or '0')  -- each added one to max_attempts
  if preempted > 0 then redis.call('HINCRBY', key, 'max_attempts', -preempted) end
  redis.call('HDEL', key, 'result', 'error', 'condition', 'cancel', 'cancel_requested_at', 'finished_at',
    'started_at', 'job_started_at', 'worker', 'gpu', 'lease_until', 'progress', 'progress_message', 'carry',
    'gpu_retries', 'used', 'checkpoints', 'checkpoint_at', 'preemptions')
  redis.call('DEL', prefix .. ':ckpt:' .. id)  -- a new event: it starts from the beginning
  redis.call('HSET', key, 'state', 'QUEUED', 'attempts', 0, 'token', '', 'queued_at', now, 'event_ts', now)
  redis.call('HINCRBY', key, 'manual_retries', 1)
  deadline(prefix, key, id)
  move(prefix, fn, id, state, 'QUEUED', redis.call('HGET', key, 'seq'))
  push_back(prefix, key, id, envelope)
end
local function retriable(state)
  return state == 'FAILED' or state == 'TIMED_OUT' or state == 'CANCELLED' or state == 'EXPIRED'
end
