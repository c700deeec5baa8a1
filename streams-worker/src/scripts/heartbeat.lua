-- Keeps this consumer's entries: resets the idle time of each entry it still owns
-- (XCLAIM ... JUSTID: no delivery is counted) and reports the ones it no longer owns.
-- KEYS[1] the stream, KEYS[2] the group's clock. ARGV[1] group, ARGV[2] consumer, ARGV[3]
-- claim_idle in ms, ARGV[4..] entry ids.
-- Also tells the group's clock that a live worker spoke now (see claim.lua).
-- Returns the ids no longer ours (taken by another consumer, or acknowledged by one).
local group, consumer = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local idle = tonumber(ARGV[3])
-- Whoever first finds the group's clock stale (the server restarted, stalled, or nobody ran)
-- holds taking over for a claim_idle: live workers refresh their entries first.
local seen = tonumber(redis.call('HGET', KEYS[2], 'seen'))
if not seen or now - seen > idle / 2 then
  redis.call('HSET', KEYS[2], 'hold', now + idle)
end
redis.call('HSET', KEYS[2], 'seen', now)
redis.call('PEXPIRE', KEYS[2], idle * 10)
local lost = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
