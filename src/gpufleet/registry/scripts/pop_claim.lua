-- ARGV: prefix, token, now, lease_until, worker, gpu, n, then the worker's queues in the order to read them.
-- A worker that has just finished a task takes the next one here, without going back to Celery (or the next ``n``, to
-- fill a batch): the first messages of the highest priority level across its queues (as Celery's own consumer would pop
-- them), each claimed in the same step, so a message is never out of the lists unclaimed. Messages no worker should run
-- are dropped on the way: a finished or expired task's, a stale copy (the record names another message). Returns one
-- entry per task, none when every queue is empty: {'ok', attempts, max_attempts, on_success, on_failure, event_ts,
-- cancel, waited, queue, carry, id, function, event, meta} for a claim, or {'other', id} for a task that is not waiting (another
-- copy of a running one), after which it stops: the caller decides as for any delivery (see Runtime._take_over).
--
-- Which list to read: the head of each queue's pending tasks (P:pending:<queue>, in the order its lists are read)
-- names the level of its next message, one ZRANGE per queue. Probing every level's list instead cost 20 empty RPOPs a
-- task at the default priority. A head whose message is not in its level's list (in a consumer's hands, or lost until
-- the lost-message scan restores it) only sends the queue's reading one level down, as far as the last.
local prefix, n, taken, below = ARGV[1], tonumber(ARGV[7]), {}, {}
local reads = take_reads()
while #taken < n do
  local best, level
  for q = 8, #ARGV do
    local head = redis.call('ZRANGE', prefix .. ':pending:' .. ARGV[q], '0', '0', 'WITHSCORES')
    if head[2] then
      -- The score is (9 - prio) * LEVEL + seq (or - seq at the head), with seq below LEVEL / 2: round to the level.
      local at = math.max(math.floor(tonumber(head[2]) / LEVEL + 0.5), below[q] or 0)
      if at <= 9 and (not level or at < level) then best, level = q, at end
    end
  end
  if not best then break end
  local list, claimed = qkey(ARGV[best], 9 - level), false
  while #taken < n do
    local message = redis.call('RPOP', list)
    if not message then break end
    local out = take_message(prefix, message, reads, ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
    if out then
      taken[#taken + 1] = out
      if out[1] == 'other' then return taken end
      claimed = true
    end
  end
  if not claimed then below[best] = level + 1 end
end
return taken
