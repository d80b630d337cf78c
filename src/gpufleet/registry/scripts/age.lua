-- ARGV: prefix, now, aging_s, limit.  Aging, so that no priority starves: the message at the head of a level (its
-- oldest) that has waited ``aging_s`` there moves to the back of the next level up, its position score with it. A
-- task of priority p is therefore at the top level after (9 - p) * aging_s, behind only what was there before it.
-- Stale copies at a head (their task finished, or re-pushed since) are dropped: a worker would drop them anyway.
-- Returns how many moved.
local prefix, now, aging, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local moved = 0
for _, queue in ipairs(redis.call('SMEMBERS', prefix .. ':queues')) do
  local pending = prefix .. ':pending:' .. queue
  for prio = 8, 0, -1 do
    local list = qkey(queue, prio)
    while moved < limit do
      local head = redis.call('LINDEX', list, -1)
      if not head then break end
      local id = id_of(head)
      local key = prefix .. ':task:' .. id
      local state, tag = unpack(redis.call('HMGET', key, 'state', 'tag'))
      local finished = not state or (state ~= 'QUEUED' and state ~= 'RUNNING')
      if finished or (state == 'QUEUED' and tag and tag ~= tag_of(head)) then
        redis.call('RPOP', list)
      elseif state == 'RUNNING' then
        break  -- another copy of a running task: its worker decides; it blocks aging of this level meanwhile
      else
        local queued, created, level_at = unpack(redis.call('HMGET', key, 'queued_at', 'created_at', 'level_at'))
        local since = math.max(tonumber(queued or created or '0'), tonumber(level_at or '0'))
        if now - since < aging then break end
        redis.call('RPOP', list)
        local up = prio + 1
        redis.call('HSET', key, 'prio', up, 'level_at', ARGV[2])
        redis.call('ZADD', pending, int((9 - up) * LEVEL + redis.call('INCR', prefix .. ':seq')), id)
        redis.call('LPUSH', qkey(queue, up), with_priority(head, up))
        moved = moved + 1
      end
    end
  end
end
return moved
