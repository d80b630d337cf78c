-- ARGV: prefix, queue, head_n, limit.  The pending tasks that have left the Celery lists without being claimed:
-- those ordered before the first pending task among the ``head_n`` messages at the head (the right end, where
-- consumers pop) of the first level that has messages, or every pending task when every level is empty. A message is
-- in flight for milliseconds between a pop and its claim; one that stays out longer was lost with its consumer (killed
-- or frozen between Redis handing it out and kombu recording it as unacked) or sits in a dead consumer's unacked hash.
-- Returns id, score pairs.
local prefix, queue = ARGV[1], ARGV[2]
local pending = prefix .. ':pending:' .. queue
for prio = 9, 0, -1 do  -- the levels in the order they are read: the first message in sight marks the place
  local messages = redis.call('LRANGE', qkey(queue, prio), -tonumber(ARGV[3]), -1)
  for i = #messages, 1, -1 do
    -- Only a task's current message marks its place: an older copy left in the list (a cancelled task retried, a
    -- re-pushed one) carries another delivery tag.
    local id = json_string(messages[i], 'id')
    local current = id and redis.call('HGET', prefix .. ':task:' .. id, 'tag') == tag_of(messages[i])
    local score = current and redis.call('ZSCORE', pending, id)
    if score then
      return redis.call('ZRANGEBYSCORE', pending, '-inf', '(' .. score, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[4]))
    end
  end
  if #messages > 0 then return {} end  -- only stale copies in sight: no verdict this time
end
return redis.call('ZRANGE', pending, 0, tonumber(ARGV[4]) - 1, 'WITHSCORES')
