-- On shutdown: this consumer's entries that it will not finish become claimable by others at
-- once (their idle time set past claim_idle; no delivery counted); a consumer left with nothing
-- pending is removed from the group.
-- KEYS[1] the stream, KEYS[2] the group's set of released entries (claimed first by the next
-- worker, even while taking over is on hold). ARGV[1] group, ARGV[2] consumer, ARGV[3] idle ms
-- to set, ARGV[4..] the entries this consumer started a handler for. An entry it never started
-- (delivered by a read cut short) gives its delivery back: the next worker's claim counts it
-- again.
-- Returns how many entries were handed over.
local started = {}
for i = 4, #ARGV do
  started[ARGV[i]] = true
end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
for _, p in ipairs(pending) do
  local count = p[4]
  if not started[p[1]] and count > 0 then
    count = count - 1
  end
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, p[1], 'IDLE', ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
  redis.call('SADD', KEYS[2], p[1])
end
if #pending > 0 then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) * 10)
end
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return #pending
