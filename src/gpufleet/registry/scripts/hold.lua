-- KEYS: holds (P:holds:<host>).  ARGV: now, me (a worker), reserve_after_s, stale_s, tickets, waiting, then the indices
-- of its GPUs.
-- A worker whose GPUs some multi-GPU worker shares takes all of them before it runs a task, or none: no worker ever
-- holds part of what it needs while it waits for the rest, so two of them never wait on each other. A GPU is ``me``'s
-- to take while no other worker holds it and no other multi-GPU worker has reserved it (field r<index>:
-- "<worker> <since> <seen>") for longer than reserve_after_s, and still asks (seen within stale_s). Until then, other
-- workers backfill it. Returns 1 (all held), or 0: then a multi-GPU worker reserves each of its GPUs that is not
-- reserved already, or renews its own reservations, if it holds one of the tickets (a sorted set, by when each was
-- last asked for, across hosts) of its queue: as many workers reserve GPUs as there are tasks ``waiting`` there, so
-- one waiting task does not stop the one-GPU work of every host (and when fewer wait, the first to ask gives its back).
local now, me, after, stale = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local tickets, waiting = ARGV[5], tonumber(ARGV[6])
local function reservation(gpu)
  local r = redis.call('HGET', KEYS[1], 'r' .. gpu)
  if not r then return nil end
  local who, since, seen = string.match(r, '^(%S+) (%S+) (%S+)$')
  if now - tonumber(seen) >= stale then return nil end
  return who, tonumber(since)
end
local free = true
for i = 7, #ARGV do
  local holder = redis.call('HGET', KEYS[1], ARGV[i])
  local who, since = reservation(ARGV[i])
  if (holder and holder ~= me) or (who and who ~= me and now - since >= after) then free = false end
end
if free then
  for i = 7, #ARGV do
    redis.call('HSET', KEYS[1], ARGV[i], me)
    if reservation(ARGV[i]) == me then redis.call('HDEL', KEYS[1], 'r' .. ARGV[i]) end
  end
  if tickets ~= '' then redis.call('ZREM', tickets, me) end
  return 1
end
if tickets ~= '' then
  redis.call('ZREMRANGEBYSCORE', tickets, '-inf', now - stale)
  local mine, held = redis.call('ZSCORE', tickets, me), redis.call('ZCARD', tickets)
  if mine and held > waiting then
    -- Fewer tasks wait than workers hold tickets (one ran, or was cancelled): the first to ask gives its ticket back,
    -- and its reservations, so one-GPU tasks backfill those GPUs again.
    redis.call('ZREM', tickets, me)
    for i = 7, #ARGV do
      if reservation(ARGV[i]) == me then redis.call('HDEL', KEYS[1], 'r' .. ARGV[i]) end
    end
    return 0
  end
  if not mine and held >= waiting then return 0 end
  redis.call('ZADD', tickets, now, me)
  redis.call('EXPIRE', tickets, math.ceil(stale) + 1)
  for i = 7, #ARGV do
    local who, since = reservation(ARGV[i])
    if not who or who == me then
      redis.call('HSET', KEYS[1], 'r' .. ARGV[i], me .. ' ' .. (since or now) .. ' ' .. now)
    end
  end
end
return 0
