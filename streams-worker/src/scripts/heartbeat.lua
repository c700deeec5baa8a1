-- Keeps this consumer's entries: resets the idle time of each entry it still owns
-- (XCLAIM ... JUSTID: no delivery is counted) and reports the ones it no longer owns.
-- KEYS[1] the stream. ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids.
-- Returns the ids no longer ours (taken by another consumer, or acknowledged by one).
local group, consumer = ARGV[1], ARGV[2]
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, id, 'JUSTID')
  else
    lost[#lost + 1] = id
  end
end
return lost
