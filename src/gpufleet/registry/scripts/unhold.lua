-- KEYS: holds (P:holds:<host>).  ARGV: me (a worker), then the indices of its GPUs.
-- Let go of the GPUs ``me`` holds (those another worker took meanwhile stay its). Returns how many it let go.
local n = 0
for i = 2, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], ARGV[i])
    n = n + 1
  end
end
return n
