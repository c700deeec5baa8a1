-- Acknowledges finished entries that this consumer still owns, and counts them.
-- KEYS[1] the stream, KEYS[2] the stats hash, KEYS[3..] status keys (one per entry, or none).
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] status TTL in ms (0: no status), ARGV[4] number of
-- entries n, then n triples: entry id, 'p' (processed) or 's' (skipped duplicate), attempt.
-- Then pairs of counter field and increment until the end.
-- Returns the ids acknowledged; an entry another consumer took meanwhile is left alone.
local group, consumer = ARGV[1], ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local acked, processed = {}, 0
for i = 0, n - 1 do
  local id, kind = ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  local p = redis.call('XPENDING', KEYS[1], group, id, id, 1)
  if p[1] and p[1][2] == consumer then
    redis.call('XACK', KEYS[1], group, id)
    acked[#acked + 1] = id
    if kind == 'p' then
      processed = processed + 1
    end
    if kind == 'p' and ttl > 0 and KEYS[3 + i] then
      redis.call('HSET', KEYS[3 + i], 'state', 'done', 'attempt', ARGV[7 + 3 * i], 'error', '')
      redis.call('PEXPIRE', KEYS[3 + i], ttl)
    end
  end
end
if processed > 0 then
  redis.call('HINCRBY', KEYS[2], group .. ':processed', processed)
end
local at = 5 + 3 * n
while ARGV[at] do
  redis.call('HINCRBY', KEYS[2], group .. ':' .. ARGV[at], ARGV[at + 1])
  at = at + 2
end
return acked
