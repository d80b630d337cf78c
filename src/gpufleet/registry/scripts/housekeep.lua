-- KEYS: delayed, leases.  ARGV: prefix, now, aging_s, n, then n (id, envelope) pairs of due retries, then (id,
-- envelope) pairs of tasks whose lease lapsed. Pushes the due retries (to the back), and re-queues at the head the
-- tasks whose worker died with them, at the level they have earned: they had waited their turn already. Each is
-- checked again here (compare-and-set). Returns {promoted, reaped}.
local prefix, now, aging, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local promoted, reaped = 0, 0
for i = 5, 4 + 2 * n, 2 do
  local id = ARGV[i]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= now then
    redis.call('ZREM', KEYS[1], id)
    local key = prefix .. ':task:' .. id
    if redis.call('HGET', key, 'state') == 'QUEUED' then
      redis.call('HDEL', key, 'retry_at')
      redis.call('HSET', key, 'queued_at', ARGV[2])  -- its queue wait starts now, not when its attempt failed
      push_back(prefix, key, id, ARGV[i + 1])
      promoted = promoted + 1
    end
  end
end
for i = 5 + 2 * n, #ARGV, 2 do
  local id = ARGV[i]
  local key = prefix .. ':task:' .. id
  local lease = tonumber(redis.call('HGET', key, 'lease_until') or '0')
  if redis.call('HGET', key, 'state') == 'RUNNING' and lease <= now then
    redis.call('ZREM', KEYS[2], id)
    local fn = redis.call('HGET', key, 'function')
    redis.call('HSET', key, 'state', 'QUEUED', 'token', '',
      'last_error', '{"errorType":"WorkerLost","errorMessage":"lease expired: the worker stopped renewing it"}')
    move(prefix, fn, id, 'RUNNING', 'QUEUED', redis.call('HGET', key, 'seq'))
    push_head(prefix, key, id, ARGV[i + 1], now, aging)
    redis.call('HSET', key, 'queued_at', ARGV[2])  -- after push_head, which reads when it was first queued
    deadline(prefix, key, id)
    reaped = reaped + 1
  elseif redis.call('HGET', key, 'state') ~= 'RUNNING' then
    redis.call('ZREM', KEYS[2], id)  -- finished or re-queued meanwhile: nothing to reap
  end
end
return {promoted, reaped}
