-- The body of ENQUEUE_MANY, shared with a job's split (gpufleet.registry.jobs): the batch's tasks, whose envelope, event
-- and meta are ARGV[base + 1..3] for the first, then the next three for the next. A shard's entry adds its job's id and
-- its index (15th and 16th). Returns per task 1, 0 or -1, as ENQUEUE_MANY.
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
      local prio, a = tonumber(t[13]), base + 3 * (n - 1)
      local seq = int(first + n)
      -- Only what a queued task needs: its id is its key's, and until it is queued again its queued_at is its
      -- created_at and its level (prio) the priority it asked for; readers fall back to those.
      redis.call('HSET', key, 'function', t[2], 'state', 'QUEUED', 'attempts', '0', 'queue', t[3],
        'event', ARGV[a + 2], 'meta', ARGV[a + 3], 'on_success', t[4], 'on_failure', t[5], 'max_attempts', t[6],
        'source', t[7], 'created_at', t[8], 'event_ts', t[9], 'origin', t[12], 'priority', t[13], 'seq', seq,
        'tag', t[11])
      redis.call('ZADD', prefix .. ':pending:' .. t[3], int((9 - prio) * LEVEL + first + n), t[1])
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
        local pair = t[2] .. '\31' .. t[14]
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
