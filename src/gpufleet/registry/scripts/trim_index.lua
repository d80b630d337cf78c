-- ARGV: prefix, limit.  Drops index entries whose record expired (retention passed), oldest first, stopping at
-- the first live one: records expire roughly in creation order, and readers skip any stragglers.
local prefix, removed = ARGV[1], 0
for _, fn in ipairs(redis.call('SMEMBERS', prefix .. ':functions')) do
  for _, st in ipairs({'SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT', 'EXPIRED'}) do
    local idx = prefix .. ':idx:' .. fn .. ':' .. st
    for _, id in ipairs(redis.call('ZRANGE', idx, 0, tonumber(ARGV[2]) - 1)) do
      if redis.call('EXISTS', prefix .. ':task:' .. id) == 1 then break end
      redis.call('ZREM', idx, id)
      removed = removed + 1
    end
  end
end
return removed
