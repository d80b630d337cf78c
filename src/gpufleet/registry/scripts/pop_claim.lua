-- ARGV: prefix, token, now, lease_until, worker, gpu, n, then the worker's queues in the order to read them.
-- A worker that has just finished a task takes the next one here, without going back to Celery (or the next ``n``, to
-- fill a batch): the first messages of the highest priority level across its queues (as Celery's own consumer would pop
-- them), each claimed in the same step, so a message is never out of the lists unclaimed. Messages no worker should run
-- are dropped on the way: a finished or expired task's, a stale copy (the record names another message). Returns one
-- entry per task, none when every queue is empty: {'ok', attempts, max_attempts, on_success, on_failure, event_ts,
-- cancel, id, function, event, meta} for a claim, or {'other', id} for a task that is not waiting (another copy of a
-- running one), after which it stops: the caller decides as for any delivery (see Runtime._take_over).
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
