-- On shutdown: this consumer's entries that it will not finish become claimable by others at
-- once (their idle time set past claim_idle; no delivery counted); a consumer left with nothing
-- pending is removed from the group.
-- KEYS[1] the stream. ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms to set.
-- Returns how many entries were handed over.
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
for _, p in ipairs(pending) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, p[1], 'IDLE', ARGV[3], 'JUSTID')
end
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return #pending
