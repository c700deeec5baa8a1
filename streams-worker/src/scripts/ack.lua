-- Acknowledges finished entries that this consumer still owns, and counts them.
-- KEYS[1] the stream, KEYS[2] the stats hash, KEYS[3..] status keys (one per entry, or none).
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] status TTL in ms (0: no status), ARGV[4] number of
-- entries n, ARGV[5] and ARGV[6] the lowest and highest of their ids (or '-' and '+'), ARGV[7]
-- one letter per entry: 'p' (processed) or 's' (skipped duplicate), then the n entry ids, then
-- (with a status TTL only) the n attempts. Then pairs of counter field and increment until the
-- end.
-- Returns the positions (1-based, in the listing) of the entries not acknowledged: another
-- consumer took them meanwhile, or they were listed before. Usually none: the reply stays short.
local group, consumer = ARGV[1], ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local kinds = ARGV[7]
-- What this consumer still owns in the batch's id range: XPENDING with a consumer reads only
-- that consumer's own pending list, a page at a time.
local ours = {}
local from, to = ARGV[5], ARGV[6]
while n > 0 do
  local page = redis.call('XPENDING', KEYS[1], group, from, to, 512, consumer)
  for _, p in ipairs(page) do
    ours[p[1]] = true
  end
  local last = page[#page] and page[#page][1]
  -- Done with a short page, or at the range's end (past the largest id there is no next one).
  if #page < 512 or last == to or last == '18446744073709551615-18446744073709551615' then
    break
  end
  from = '(' .. last
end
local acked, missed, processed = {}, {}, 0
local P = string.byte('p')
for i = 1, n do
  local id = ARGV[7 + i]
  if ours[id] then
    -- Once: an id listed twice is acknowledged (and counted) for its first listing only.
    ours[id] = nil
    acked[#acked + 1] = id
    local kind = string.byte(kinds, i)
    if kind == P then
      processed = processed + 1
    end
    if kind == P and ttl > 0 and KEYS[2 + i] then
      -- Best effort: a status key of another type must not fail the acknowledgements (and is
      -- not ours to expire).
      if type(redis.pcall('HSET', KEYS[2 + i], 'state', 'done', 'attempt', ARGV[7 + n + i], 'error', '')) == 'number' then
        redis.call('PEXPIRE', KEYS[2 + i], ttl)
      end
    end
  else
    missed[#missed + 1] = i
  end
end
for i = 1, #acked, 512 do
  redis.call('XACK', KEYS[1], group, unpack(acked, i, math.min(i + 511, #acked)))
end
-- Counters after the acknowledgements, best effort: a stats key of another type must not fail
-- the script once its XACKs are written (they would then read as lost).
if processed > 0 then
  redis.pcall('HINCRBY', KEYS[2], group .. ':processed', processed)
end
local at = 8 + n
if ttl > 0 then
  at = at + n
end
while ARGV[at] do
  redis.pcall('HINCRBY', KEYS[2], group .. ':' .. ARGV[at], ARGV[at + 1])
  at = at + 2
end
return missed
