-- Compare-token write for a resource protected by a RedLock fencing token.
-- KEYS[1] the resource, KEYS[2] the highest token seen for it (same hash slot).
-- ARGV[1] the writer's token, ARGV[2] the value.
-- Writes and returns 1 if the token is at least the highest seen; returns 0 (and writes nothing)
-- for an older token, i.e. a holder whose lock has expired meanwhile.
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
local token = tonumber(ARGV[1])
if token < seen then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[2])
return 1
