-- Acquisition on one node: the lock and its fencing count in one atomic step.
-- KEYS[1] the lock key, KEYS[2] the node's fencing counter.
-- ARGV[1] this acquisition's random token, ARGV[2] the TTL in ms.
-- Granted: {1, counter after INCR}; the counter is only ever raised by an acquisition that holds
-- the key at that moment. Held by another token: {0, its PTTL}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
