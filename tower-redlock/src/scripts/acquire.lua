-- RedLock acquisition on one node, with its fencing counter.
-- KEYS[1] lock key, KEYS[2] fencing counter (same hash slot). ARGV[1] token, ARGV[2] ttl ms.
-- Granted: {1, counter after INCR}. Held by someone else: {0, remaining ttl ms}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
