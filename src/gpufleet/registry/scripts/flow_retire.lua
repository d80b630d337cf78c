-- KEYS: lease, flow stream, flows hash.  ARGV: token, flow id.  An empty flow we hold is forgotten.
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('XLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
