-- Takes entries over, with their delivery counts, in one atomic step.
-- KEYS[1] the stream. ARGV[1] group, ARGV[2] consumer, ARGV[3] count, ARGV[4] mode:
--   'idle': entries idle at least ARGV[5] ms in any consumer (a dead one), from cursor ARGV[6]
--           (XAUTOCLAIM); 'own': this consumer's own pending entries (a restart under one name).
-- Returns {next cursor, {{id, {field, value, ...}, deliveries}, ...}}; an entry whose stream
-- record was deleted (trimmed) is dropped from the group by XAUTOCLAIM and not returned.
local stream, group, consumer, count = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local entries, cursor = {}, '0-0'
if ARGV[4] == 'idle' then
  local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[5], ARGV[6], 'COUNT', count)
  cursor = reply[1]
  entries = reply[2]
else
  local pending = redis.call('XPENDING', stream, group, '-', '+', count, consumer)
  local ids = {}
  for i, p in ipairs(pending) do
    ids[i] = p[1]
  end
  if #ids > 0 then
    entries = redis.call('XCLAIM', stream, group, consumer, 0, unpack(ids))
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
return {cursor, out}
