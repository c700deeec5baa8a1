-- What an entry delivered next to this consumer is read under (see `Owned::epoch` in ctx.rs):
-- the server's run id (a new one at every start, so a restart or failover that lost deliveries
-- never looks like the same server) and the group's takeover token (claim.lua, group.lua).
-- KEYS[1] the group's takeover token. Returns '<run id>/<token>' ('0' for no token yet), or '-'
-- (never current: no fast acknowledgement) from a server that does not say its run id.
local run = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
if not run then
  return '-'
end
return run .. '/' .. (redis.call('GET', KEYS[1]) or '0')
