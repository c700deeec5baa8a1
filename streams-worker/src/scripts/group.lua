-- Creates the consumer group (and the stream) if it does not exist; when it creates it, marks
-- the group's takeover token (see claim.lua) in the same step, so that what a worker read of an
-- earlier group of that name is never taken for its own in the new one.
-- KEYS[1] the stream, KEYS[2] the group's takeover token. ARGV[1] group.
-- Returns 1 if it created the group, 0 if it existed.
local made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(made) == 'table' and made.err then
  if string.find(made.err, 'BUSYGROUP', 1, true) then
    return 0
  end
  return made
end
-- A new token: a count (for order) and the server's time (unique even after a restart that
-- lost the last count, or a failover to a replica that never had it).
local t = redis.call('TIME')
local n = (tonumber(string.match(redis.call('GET', KEYS[2]) or '', '^%d+')) or 0) + 1
redis.call('SET', KEYS[2], n .. '-' .. t[1] .. '.' .. t[2])
return 1
