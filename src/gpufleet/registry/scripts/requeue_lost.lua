-- KEYS: task.  ARGV: prefix, score, envelope, queue, now, aging_s.  Push a lost task's message again, at the head of
-- its queue, if it is still QUEUED with the position score the scan saw (unchanged: nobody pushed or claimed it
-- since). A pending entry whose record expired is dropped. Returns 1 (pushed) or 0.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('ZREM', ARGV[1] .. ':pending:' .. ARGV[4], task_id(ARGV[1], KEYS[1]))
  return 0
end
if state ~= 'QUEUED' then return 0 end
local id = task_id(ARGV[1], KEYS[1])
if redis.call('ZSCORE', ARGV[1] .. ':pending:' .. redis.call('HGET', KEYS[1], 'queue'), id) ~= ARGV[2] then
  return 0
end
push_head(ARGV[1], KEYS[1], id, ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6]))
return 1
