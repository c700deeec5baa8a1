-- Acknowledges finished entries that this consumer still owns, and counts them (each with its
-- own acknowledgement: a batch tried again after a lost reply counts nothing twice).
-- KEYS[1] the stream, KEYS[2] the stats hash, KEYS[3] the group's takeover token, KEYS[4..]
-- status keys (one per entry, or none).
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] status TTL in ms (0: no status), ARGV[4] number of
-- entries n, ARGV[5] and ARGV[6] the lowest and highest of their ids (or '-' and '+'), ARGV[7]
-- one letter per entry: 'p' (processed), 'r' (processed on a retry delivery: counted in
-- `retried` too) or 's' (skipped duplicate), ARGV[8] the epoch (see epoch.lua) read before each
-- of the entries was delivered ('-' if they differ or are unknown), then the n entry ids, then
-- (with a status TTL only) the n attempts.
-- Returns the positions (1-based, in the listing) of the entries not acknowledged: another
-- consumer took them meanwhile, or they were listed before; negated for those not pending at
-- all (acknowledged already). Usually none: the reply stays short.
-- Or, from the fast path below only when some of its entries were no longer pending at all (the
-- group was made again, or changed by hand): {0, processed ones not acknowledged, skipped
-- ones not acknowledged}.
local group, consumer = ARGV[1], ARGV[2]
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local kinds = ARGV[7]
local P, R = string.byte('p'), string.byte('r')
local ID = 8
-- Counters after the acknowledgements, best effort: a stats key of another type must not fail
-- the script once its XACKs are written (they would then read as lost).
local function count(processed, retried)
  if processed > 0 then
    redis.pcall('HINCRBY', KEYS[2], group .. ':processed', processed)
  end
  if retried > 0 then
    redis.pcall('HINCRBY', KEYS[2], group .. ':retried', retried)
  end
end
-- Best effort: a status key of another type must not fail the acknowledgements (and is not ours
-- to expire).
local function done(i)
  if ttl > 0 and KEYS[3 + i] then
    if type(redis.pcall('HSET', KEYS[3 + i], 'state', 'done', 'attempt', ARGV[ID + n + i], 'error', '')) == 'number' then
      redis.call('PEXPIRE', KEYS[3 + i], ttl)
    end
  end
end
local function ack(ids)
  local acked = 0
  for i = 1, #ids, 512 do
    acked = acked + redis.call('XACK', KEYS[1], group, unpack(ids, i, math.min(i + 511, #ids)))
  end
  return acked
end
-- The fast path. Entries change hands only through the claim script, which sets a new token
-- each time it moves any, and the group script sets one when it makes the group; tokens are
-- never set twice (a count and the server's time). A restart (which may lose deliveries: from a
-- snapshot, or AOF everysec) or a failover gives another run id. If both are the ones read
-- before these entries were delivered here, every one of them is still ours if it is pending
-- at all (the worker lists each once). Not covered: a group changed by hand (XGROUP SETID back,
-- or made again) while workers run, and workers of earlier releases in the same group (README).
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or '?'
if ARGV[8] == run .. '/' .. (redis.call('GET', KEYS[3]) or '0') then
  if ttl == 0 and not string.find(kinds, '[rs]') then
    -- All processed on a first delivery, no statuses (the usual batch): the ids straight from
    -- the arguments.
    local p = 0
    for i = ID + 1, ID + n, 512 do
      p = p + redis.call('XACK', KEYS[1], group, unpack(ARGV, i, math.min(i + 511, ID + n)))
    end
    count(p, 0)
    if p == n then
      return {}
    end
    return {0, n - p, 0}
  end
  local first, retries, skipped = {}, {}, {}
  for i = 1, n do
    local kind = string.byte(kinds, i)
    if kind == P or kind == R then
      local list = kind == P and first or retries
      list[#list + 1] = ARGV[ID + i]
      done(i)
    else
      skipped[#skipped + 1] = ARGV[ID + i]
    end
  end
  local f, r, s = ack(first), ack(retries), ack(skipped)
  count(f + r, r)
  if f == #first and r == #retries and s == #skipped then
    return {}
  end
  return {0, #first + #retries - f - r, #skipped - s}
end
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
local acked, missed, processed, retried = {}, {}, 0, 0
for i = 1, n do
  local id = ARGV[ID + i]
  if ours[id] then
    -- Once: an id listed twice is acknowledged (and counted) for its first listing only.
    ours[id] = nil
    acked[#acked + 1] = id
    local kind = string.byte(kinds, i)
    if kind == P or kind == R then
      processed = processed + 1
      done(i)
    end
    if kind == R then
      retried = retried + 1
    end
  elseif redis.call('XPENDING', KEYS[1], group, id, id, 1)[1] then
    missed[#missed + 1] = i
  else
    missed[#missed + 1] = -i
  end
end
ack(acked)
count(processed, retried)
return missed
