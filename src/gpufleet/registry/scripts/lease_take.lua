-- KEYS: lease.  ARGV: token, ttl ms, the token seen dead ('' if none).  Takes a free lease, renews our own, or takes
-- over one whose holder we found dead (if it still holds it). 1 if we hold it now.
local holder = redis.call('GET', KEYS[1])
if not holder or holder == ARGV[1] or (ARGV[3] ~= '' and holder == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
