-- KEYS: callbacks stream, flows hash, then each entry's flow stream.  ARGV: group, then per entry: id, flow id, URL.
-- An entry is moved only by the router whose XACK took it, so a batch routed twice (a router frozen past its lease,
-- then thawed) is moved once. Its fields go as they are, with ``at``: when the worker wrote it (ms).
local moved = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('XACK', KEYS[1], ARGV[1], id) == 1 then
    local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
    if entry then
      local fields = entry[2]
      fields[#fields + 1] = 'at'
      fields[#fields + 1] = string.match(id, '^(%d+)')
      redis.call('XADD', KEYS[2 + (i + 1) / 3], '*', unpack(fields))
      redis.call('HSET', KEYS[2], ARGV[i + 1], ARGV[i + 2])
      moved = moved + 1
    end
    redis.call('XDEL', KEYS[1], id)
  end
end
return moved
