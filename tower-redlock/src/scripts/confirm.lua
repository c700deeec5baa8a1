-- Raises the fencing counter to the acquisition's token, only where the lock is still ours.
-- KEYS[1] the lock key, KEYS[2] the node's fencing counter.
-- ARGV[1] this acquisition's random token, ARGV[2] its fencing token.
-- 1: the counter is now at least the fencing token while this node holds our key; 0: not ours.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
