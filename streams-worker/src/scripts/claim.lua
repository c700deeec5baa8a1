-- Takes entries over, with their delivery counts, in one atomic step.
-- KEYS[1] the stream, KEYS[2] the group's clock (when a live worker last spoke: every heartbeat
-- sets it), KEYS[3] the entries released by workers that shut down (taken first, hold or not),
-- KEYS[4] the group's takeover token (a new one whenever entries change hands here; see
-- ack.lua).
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] mode:
--   'idle': entries idle at least ARGV[5] ms in any consumer (a dead one), from cursor ARGV[6]
--           (XAUTOCLAIM); 'own': this consumer's own pending entries (a restart under one name).
-- Returns {next cursor, {{id, {field, value, ...}, deliveries}, ...}, epoch} (the epoch as
-- epoch.lua gives it, read after any takeover here); an entry
-- whose stream record was deleted (trimmed) is dropped from the group by XAUTOCLAIM and not
-- returned.
local stream, group, consumer, count = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local entries, cursor = {}, '0-0'
local released = {}
-- Whether any entry changed hands (or left the group) here.
local moved = false
if ARGV[4] == 'idle' then
  -- Released entries were set idle past claim_idle; one that another worker took meanwhile is
  -- fresh again and not taken from it.
  local ids = redis.call('SPOP', KEYS[3], count)
  if #ids > 0 then
    released = redis.call('XCLAIM', stream, group, consumer, ARGV[5], unpack(ids))
    count = count - #released
    moved = moved or #released > 0
  end
end
if ARGV[4] == 'idle' and count <= 0 then
  entries = released
  cursor = ARGV[6]
elseif ARGV[4] == 'idle' then
  -- Idle times only mean "its worker died" if the server itself kept running. After a restart
  -- or a stall (no heartbeat reached it for half of claim_idle), every entry looks idle for the
  -- outage's length: take nothing until live workers had a whole claim_idle to refresh theirs.
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  local idle = tonumber(ARGV[5])
  local clock = redis.call('HMGET', KEYS[2], 'seen', 'hold')
  local seen, hold = tonumber(clock[1]), tonumber(clock[2])
  if not seen or now - seen > idle / 2 then
    redis.call('HSET', KEYS[2], 'seen', now, 'hold', now + idle)
    redis.call('PEXPIRE', KEYS[2], idle * 10)
    count = 0
  end
  if hold and now < hold then
    count = 0
  end
  cursor = ARGV[6]
  if count > 0 then
    local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[5], ARGV[6], 'COUNT', count)
    cursor = reply[1]
    entries = reply[2]
    moved = moved or #entries > 0 or (reply[3] ~= nil and #reply[3] > 0)
  end
  for _, e in ipairs(released) do
    entries[#entries + 1] = e
  end
else
  local pending = redis.call('XPENDING', stream, group, '-', '+', count, consumer)
  local ids = {}
  for i, p in ipairs(pending) do
    ids[i] = p[1]
  end
  if #ids > 0 then
    entries = redis.call('XCLAIM', stream, group, consumer, 0, unpack(ids))
    moved = true
  end
end
local out = {}
for _, e in ipairs(entries) do
  if e[2] then
    local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
    local deliveries = 1
    if p[1] then
      deliveries = p[1][4]
    end
    out[#out + 1] = {e[1], e[2], deliveries}
  end
end
if moved then
  -- A new token: a count (for order) and the server's time (unique even after a restart that
  -- lost the last count, or a failover to a replica that never had it).
  local t = redis.call('TIME')
  local n = (tonumber(string.match(redis.call('GET', KEYS[4]) or '', '^%d+')) or 0) + 1
  redis.call('SET', KEYS[4], n .. '-' .. t[1] .. '.' .. t[2])
end
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
return {cursor, out, run and (run .. '/' .. (redis.call('GET', KEYS[4]) or '0')) or '-'}
