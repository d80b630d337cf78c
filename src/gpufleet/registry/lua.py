"""Lua scripts for the registry: a task's own life (enqueue, claim, renew, finish, retry later, hand back), and the
helpers every script shares. Each runs atomically in Redis, so a transition and its side effects (queue push, lease,
index, callback record) happen together or not at all. The fleet's upkeep (housekeeping, cancel and retry of queued
or finished tasks, lost messages, aging) is in :mod:`gpufleet.registry.lua_upkeep`.

Key layout (prefix ``P``):
- ``P:task:{id}`` hash: the task record;
- ``P:idx:{function}:{state}`` sorted set of task ids by arrival number (``seq``): listing, counts per state;
- ``P:pending:{queue}`` sorted set of QUEUED task ids by arrival order: queue position is a ZRANK, O(log n);
- ``P:seq`` arrival counter (a task's ``seq`` field is its first); ``P:functions`` set of function names seen;
- ``P:leases`` and ``P:delayed`` sorted sets of task ids (lease deadline, retry due time);
- ``P:busy`` hash worker -> running task id; ``P:callbacks`` stream of outgoing records;
- ``P:queues`` set of the Celery queues tasks were pushed to (for the lost-message scan);
- ``P:m:*``: what :mod:`gpufleet.api.metrics` reads. ``P:m:created`` (function -> tasks created) and ``P:m:finished``
  (function US state -> tasks finished) are counters; ``P:m:wait`` and ``P:m:duration`` are histograms (function
  US bucket number, or function US ``sum``); ``P:m:min:{minute}`` counts ``ok``/``failed`` per minute for the
  dashboard's chart (kept two hours). US is the ASCII unit separator, which no name may contain.

The position score of a pending task is its place in the Celery list: a push to the back (``LPUSH``) scores
``+seq``, a push to the head (``RPUSH``) scores ``-seq``. So the pending tasks in score order are the list's own
order, and a pending task ordered before the one at the head of the list has already left the list.
"""

# Upper bounds, in seconds, of the queue-wait and duration histograms' buckets (then +Inf): from a 10 ms task to a
# 24 h one. Fixed, so every script and every reader agree on them.
HISTOGRAM_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600,
                    86400)  # fmt: skip
US = "\x1f"

# Shared by every script that changes a task's state: the per-state index follows the record, and the metrics count
# the change in the same atomic step.
HELPERS = (
    "local BOUNDS = {"
    + ", ".join(map(str, HISTOGRAM_BOUNDS))
    + "}"
    + """
local function observe(prefix, name, fn, value)
  if value < 0 then value = 0 end
  local key, i = prefix .. ':m:' .. name, #BOUNDS + 1
  for b = 1, #BOUNDS do
    if value <= BOUNDS[b] then i = b break end
  end
  redis.call('HINCRBY', key, fn .. '\\31' .. i, 1)
  redis.call('HINCRBYFLOAT', key, fn .. '\\31sum', value)
end
local function finished(prefix, fn, state, now)
  redis.call('HINCRBY', prefix .. ':m:finished', fn .. '\\31' .. state, 1)
  local minute = prefix .. ':m:min:' .. math.floor(tonumber(now) / 60)
  redis.call('HINCRBY', minute, state == 'SUCCEEDED' and 'ok' or 'failed', 1)
  redis.call('EXPIRE', minute, 7200)
end
local function move(prefix, fn, id, from, to, score)
  if from then redis.call('ZREM', prefix .. ':idx:' .. fn .. ':' .. from, id) end
  if to then redis.call('ZADD', prefix .. ':idx:' .. fn .. ':' .. to, score, id) end
end
local function tag_of(envelope)
  return string.match(envelope, '"delivery_tag":%s*"([^"]*)"') or ''
end
-- Priorities: kombu keeps one list per level, and reads level 0 first (our priority 9; see messages.PRIORITY_STEPS).
-- A record's 'priority' is what was asked for; 'prio' is its level now, which aging raises while it waits.
-- Its position score is (9 - prio) * LEVEL + seq, or - seq at the head: in score order, the pending tasks are in the
-- order the worker takes them, across every level (seq stays below 2^48, and every score is an exact double).
local LEVEL = 562949953421312
local function qkey(queue, prio)
  if prio >= 9 then return queue end
  return queue .. '\\6\\22' .. (9 - prio)
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
  redis.call('ZADD', prefix .. ':pending:' .. queue, (9 - prio) * LEVEL + seq, id)
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
  local since = tonumber(redis.call('HGET', key, 'aged_from') or redis.call('HGET', key, 'queued_at') or now)
  local prio = tonumber(redis.call('HGET', key, 'prio') or base)
  prio = math.min(9, math.max(prio, base + math.floor((now - since) / aging)))
  redis.call('HSET', key, 'prio', prio, 'aged_from', since, 'level_at', now)
  envelope = with_priority(envelope, prio)
  redis.call('ZADD', prefix .. ':pending:' .. queue, (9 - prio) * LEVEL - redis.call('INCR', prefix .. ':seq'), id)
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
local function traceparent(key)
  return string.match(redis.call('HGET', key, 'meta') or '', '"traceparent":"([0-9a-f%-]+)"') or ''
end
-- Whether the task runs under this owner: only its owner may finish it or give it back.
local function owned(key, token)
  return redis.call('HGET', key, 'state') == 'RUNNING' and redis.call('HGET', key, 'token') == token
end
local function unbusy(prefix, key, id)
  local worker = redis.call('HGET', key, 'worker')
  if worker and redis.call('HGET', prefix .. ':busy', worker) == id then
    redis.call('HDEL', prefix .. ':busy', worker)
  end
end
-- The task (QUEUED, or RUNNING under an owner that died) runs under ``token`` now, with a lease to ``lease_until``.
-- Returns what the worker needs to finish it without reading it again.
local function claim(prefix, key, state, token, now, lease_until, worker, gpu)
  local fn = redis.call('HGET', key, 'function')
  local id = redis.call('HGET', key, 'id')
  if state == 'QUEUED' then
    unpend(prefix, key, id)
    redis.call('ZREM', prefix .. ':deadlines', id)  -- the worker checks the age itself from here on
    observe(prefix, 'wait', fn, tonumber(now) - tonumber(redis.call('HGET', key, 'queued_at') or now))
    move(prefix, fn, id, 'QUEUED', 'RUNNING', redis.call('HGET', key, 'seq'))
  else
    unbusy(prefix, key, id)
  end
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'state', 'RUNNING', 'token', token, 'started_at', now, 'lease_until', lease_until,
    'worker', worker, 'gpu', gpu, 'progress', 0, 'progress_message', '')
  redis.call('ZADD', prefix .. ':leases', lease_until, id)
  redis.call('HSET', prefix .. ':busy', worker, id)
  return {'ok', tostring(attempts),
    unpack(redis.call('HMGET', key, 'max_attempts', 'on_success', 'on_failure', 'event_ts', 'cancel'))}
end
-- Sharded jobs (gpufleet.registry.jobs). A job whose shards are all final has one step left, on a worker of its own
queue:
-- merge, or the failure that names its shards. It is queued with the message stored when it split, from attempt 0.
local function job_step(prefix, job, now)
  local id, fn, from, started = unpack(redis.call('HMGET', job, 'id', 'function', 'state', 'started_at'))
  -- The claim of the merge step sets started_at again: the job's own start is kept for its status and record.
  redis.call('HSETNX', job, 'job_started_at', started or now)
  redis.call('HSET', job, 'phase', 'merge', 'state', 'QUEUED', 'attempts', 0, 'token', '', 'queued_at', now)
  move(prefix, fn, id, from, 'QUEUED', redis.call('HGET', job, 'seq'))
  push_back(prefix, job, id, redis.call('HGET', job, 'merge_envelope'))
end
-- A shard reached a final state: its job counts it, and the last one queues the job's step.
local function shard_done(prefix, key, state, now)
  local parent = redis.call('HGET', key, 'parent')
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
  redis.call('HDEL', key, 'result', 'error', 'condition', 'cancel', 'cancel_requested_at', 'finished_at',
    'started_at', 'job_started_at', 'worker', 'gpu', 'lease_until', 'progress', 'progress_message')
  redis.call('HSET', key, 'state', 'QUEUED', 'attempts', 0, 'token', '', 'queued_at', now, 'event_ts', now)
  redis.call('HINCRBY', key, 'manual_retries', 1)
  deadline(prefix, key, id)
  move(prefix, fn, id, state, 'QUEUED', redis.call('HGET', key, 'seq'))
  push_back(prefix, key, id, envelope)
end
local function retriable(state)
  return state == 'FAILED' or state == 'TIMED_OUT' or state == 'CANCELLED' or state == 'EXPIRED'
end
"""
)

# The body of ENQUEUE_MANY, shared with a job's split (gpufleet.registry.jobs): the batch's tasks, whose envelope, event
# and meta are ARGV[base + 1..3] for the first, then the next three for the next. A shard's entry adds its job's id and
# its index (15th and 16th). Returns per task 1, 0 or -1, as ENQUEUE_MANY.
CREATE = """
local function create_tasks(prefix, now, tasks, base)
  local out, created, queues, overflows = {}, {}, {}, {}
  local first = redis.call('INCRBY', prefix .. ':seq', #tasks) - #tasks  -- one call for the chunk's sequence numbers
  for n, t in ipairs(tasks) do
    local key = prefix .. ':task:' .. t[1]
    local have = redis.call('HMGET', key, 'function', 'origin')
    if have[1] then
      if have[1] == t[2] and (not have[2] or have[2] == t[12]) then out[n] = 0 else out[n] = -1 end
    else
      -- push_back, unrolled: the fields it would read are at hand, and the record is written in one HSET.
      local prio, seq, a = tonumber(t[13]), first + n, base + 3 * (n - 1)
      redis.call('HSET', key, 'id', t[1], 'function', t[2], 'state', 'QUEUED', 'attempts', 0, 'queue', t[3],
        'event', ARGV[a + 2], 'meta', ARGV[a + 3], 'on_success', t[4], 'on_failure', t[5], 'max_attempts', t[6],
        'source', t[7], 'created_at', t[8], 'queued_at', now, 'event_ts', t[9], 'origin', t[12], 'priority', prio,
        'prio', prio, 'seq', seq, 'tag', t[11])
      redis.call('ZADD', prefix .. ':pending:' .. t[3], (9 - prio) * LEVEL + seq, t[1])
      redis.call('LPUSH', qkey(t[3], prio), ARGV[a + 1])
      redis.call('ZADD', prefix .. ':idx:' .. t[2] .. ':QUEUED', seq, t[1])
      if t[10] ~= '' then
        redis.call('HSET', key, 'max_age', t[10])
        redis.call('ZADD', prefix .. ':deadlines', tonumber(t[9]) + tonumber(t[10]), t[1])
      end
      if t[15] then redis.call('HSET', key, 'parent', t[15], 'index', t[16]) end
      created[t[2]] = (created[t[2]] or 0) + 1
      queues[t[3]] = true
      if t[14] ~= '' then
        local pair = t[2] .. '\\31' .. t[14]
        overflows[pair] = (overflows[pair] or 0) + 1
      end
      out[n] = 1
    end
  end
  -- Once per chunk, not per task: the sets and counters every task of a function or queue shares.
  for fn, count in pairs(created) do
    redis.call('SADD', prefix .. ':functions', fn)
    redis.call('HINCRBY', prefix .. ':m:created', fn, count)
  end
  for queue in pairs(queues) do redis.call('SADD', prefix .. ':queues', queue) end
  for key, count in pairs(overflows) do redis.call('HINCRBY', prefix .. ':m:overflow', key, count) end
  return out
end
"""

# ARGV: prefix, now, batch, then each task's envelope, event and meta. batch: a JSON array with one array of strings
#   per task: [id, function, queue_key, on_success, on_failure, max_attempts, source, created_at, event_ts, max_age,
#   delivery_tag, origin, priority, overflow ('' or first pool US pool: counted in P:m:overflow once created)]
# The record keeps the event and meta (JSON), not the envelope: a fraction of its size. Whoever pushes the task again
# builds the envelope from them.
# A task with a max age ('' for none) is also indexed by its deadline, so it expires even if no worker takes it.
# One JSON argument for the small fields, not ten per task: each argument costs the caller's Python more than the
# script's Lua. The envelope, event and meta come as arguments of their own: inside the JSON they were escaped, then
# unescaped here again.
# Returns per task 1 (enqueued), 0 (duplicate: a record with that id exists, for the same function and origin) or
# -1 (conflict: the id exists for another function or origin; never silently taken as the same task). A record
# written before origins were kept is compared on its function only.
ENQUEUE_MANY = HELPERS + CREATE + "return create_tasks(ARGV[1], ARGV[2], cjson.decode(ARGV[3]), 3)"

# KEYS: task, leases.  ARGV: prefix, expect_state, expect_token, token, now, lease_until, worker, gpu
# Compare-and-set: only the delivery that saw the current state and owner may take the task.
CLAIM = (
    HELPERS
    + """
local state = redis.call('HGET', KEYS[1], 'state')
local token = redis.call('HGET', KEYS[1], 'token') or ''
if state ~= ARGV[2] or token ~= ARGV[3] then return {'conflict', state or ''} end
return claim(ARGV[1], KEYS[1], state, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
"""
)

# ARGV: prefix, token, now, lease_until, worker, gpu, n, then the worker's queues in the order to read them.
# A worker that has just finished a task takes the next one here, without going back to Celery (or the next ``n``, to
# fill a batch): the first messages of the highest priority level across its queues (as Celery's own consumer would pop
# them), each claimed in the same step, so a message is never out of the lists unclaimed. Messages no worker should run
# are dropped on the way: a finished or expired task's, a stale copy (the record names another message). Returns one
# entry per task, none when every queue is empty: {'ok', attempts, max_attempts, on_success, on_failure, event_ts,
# cancel, id, function, event, meta} for a claim, or {'other', id} for a task that is not waiting (another copy of a
# running one), after which it stops: the caller decides as for any delivery (see Runtime._take_over).
POP_CLAIM = (
    HELPERS
    + """
local prefix, n, taken = ARGV[1], tonumber(ARGV[7]), {}
for prio = 9, 0, -1 do
  for q = 8, #ARGV do
    local list = qkey(ARGV[q], prio)
    while #taken < n do
      local message = redis.call('RPOP', list)
      if not message then break end
      local id = string.match(message, '"id":%s*"([^"]+)"') or ''
      local key = prefix .. ':task:' .. id
      local state, tag = unpack(redis.call('HMGET', key, 'state', 'tag'))
      if state == 'QUEUED' and (not tag or tag == tag_of(message)) then
        local out = claim(prefix, key, state, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
        for _, v in ipairs(redis.call('HMGET', key, 'id', 'function', 'event', 'meta')) do out[#out + 1] = v end
        taken[#taken + 1] = out
      elseif state == 'RUNNING' then
        taken[#taken + 1] = {'other', id}
        return taken
      end
    end
    if #taken >= n then return taken end
  end
end
return taken
"""
)

# KEYS: task, leases.  ARGV: token.  The owner is known dead: its lease ends now (see Registry.lapse).
LAPSE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'RUNNING' or redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', 0)
redis.call('ZADD', KEYS[2], 0, redis.call('HGET', KEYS[1], 'id'))
return 1
"""

# KEYS: task, leases.  ARGV: token, lease_until.  Returns 0: lost, 1: renewed, 2: renewed but cancel requested.
RENEW = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], redis.call('HGET', KEYS[1], 'id'))
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 2 end
return 1
"""

# KEYS: task, leases, callbacks.  ARGV: prefix, token, state, now, retention_s, n_fields, field/value pairs...,
#   then callback stream entries as (dest, value, condition) triples.
# Only the owner finishes: the worker's parent, after its watchdog killed a pool process, uses that process's token.
FINISH = (
    HELPERS
    + """
if not owned(KEYS[1], ARGV[2]) then return 0 end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = redis.call('HGET', KEYS[1], 'id')
local nf = tonumber(ARGV[6])
local i = 7
for _ = 1, nf do  -- first: started_at may be among them (a task claimed ahead started after its claim)
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1])
  i = i + 2
end
observe(ARGV[1], 'duration', fn, tonumber(ARGV[4]) - tonumber(redis.call('HGET', KEYS[1], 'started_at') or ARGV[4]))
finished(ARGV[1], fn, ARGV[3], ARGV[4])
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[4], 'token', '')
local tp = traceparent(KEYS[1])
while i <= #ARGV do
  redis.call('XADD', KEYS[3], '*', 'dest', ARGV[i], 'key', id, 'value', ARGV[i+1], 'condition', ARGV[i+2],
    'function', fn, 'traceparent', tp)
  i = i + 3
end
redis.call('ZREM', KEYS[2], id)
unbusy(ARGV[1], KEYS[1], id)
move(ARGV[1], fn, id, 'RUNNING', ARGV[3], redis.call('HGET', KEYS[1], 'seq'))
redis.call('EXPIRE', KEYS[1], ARGV[5])
shard_done(ARGV[1], KEYS[1], ARGV[3], ARGV[4])
return 1
"""
)

# KEYS: task, leases, delayed.  ARGV: prefix, token, due, error_json, now
# Back to QUEUED; the housekeeper pushes the message again once ``due`` has passed.
RETRY_LATER = (
    HELPERS
    + """
if not owned(KEYS[1], ARGV[2]) then return 0 end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = redis.call('HGET', KEYS[1], 'id')
unbusy(ARGV[1], KEYS[1], id)
observe(ARGV[1], 'duration', fn, tonumber(ARGV[5]) - tonumber(redis.call('HGET', KEYS[1], 'started_at') or ARGV[5]))
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'token', '', 'last_error', ARGV[4], 'queued_at', ARGV[5],
  'retry_at', ARGV[3])
redis.call('ZREM', KEYS[2], id)
redis.call('ZADD', KEYS[3], ARGV[3], id)
deadline(ARGV[1], KEYS[1], id)
move(ARGV[1], fn, id, 'RUNNING', 'QUEUED', redis.call('HGET', KEYS[1], 'seq'))
return 1
"""
)

# KEYS: task, leases.  ARGV: prefix, token, now, envelope, error_json, aging_s
# A worker stopped past its shutdown grace: the supervisor killed it, and hands its task back. The attempt does not
# count (the task did nothing wrong), and it goes to the head of its queue, where another worker takes it at once.
# Only the owner the caller saw (and checked dead) is replaced. Returns 1, or 0 if the task finished or moved on.
# With no error_json it is a task a worker claimed ahead and gives back unstarted: its record keeps its last error and
# when it was queued.
HAND_BACK = (
    HELPERS
    + """
if not owned(KEYS[1], ARGV[2]) then return 0 end
local fn = redis.call('HGET', KEYS[1], 'function')
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[2], id)
unbusy(ARGV[1], KEYS[1], id)
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'token', '', 'progress', 0, 'progress_message', '')
redis.call('HDEL', KEYS[1], 'lease_until')
move(ARGV[1], fn, id, 'RUNNING', 'QUEUED', redis.call('HGET', KEYS[1], 'seq'))
push_head(ARGV[1], KEYS[1], id, ARGV[4], tonumber(ARGV[3]), tonumber(ARGV[6]))
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'queued_at', ARGV[3], 'last_error', ARGV[5]) end
deadline(ARGV[1], KEYS[1], id)
return 1
"""
)
