-- A failed entry that may run again: acknowledged and scheduled as a new entry after its
-- backoff, in one step, only if this consumer still owns it.
-- KEYS[1] the stream, KEYS[2] the delayed set, KEYS[3] the stats hash, KEYS[4] status key (opt.).
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] delay ms, ARGV[5] the new entry
-- (JSON object of fields), ARGV[6] status TTL ms (0: none), ARGV[7] attempt (above 1: the run
-- was a retry, counted in `retried`), ARGV[8] error.
-- Returns 1 when scheduled, 0 when another consumer owns the entry, -1 when it is not pending at
-- all (acknowledged already: by an earlier try whose reply was lost, or by another consumer).
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] then
  return -1
end
if p[1][2] ~= ARGV[2] then
  return 0
end
local t = redis.call('TIME')
local due = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[4])
-- Scheduled first: if that fails (a key of another type), nothing is written and the entry
-- stays ours, pending.
redis.call('ZADD', KEYS[2], due, ARGV[5])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.pcall('HINCRBY', KEYS[3], ARGV[1] .. ':failed', 1)
if tonumber(ARGV[7]) > 1 then
  redis.pcall('HINCRBY', KEYS[3], ARGV[1] .. ':retried', 1)
end
local ttl = tonumber(ARGV[6])
if ttl > 0 and KEYS[4] then
  -- Best effort, after the move: a status key of another type must not fail it half-way.
  if type(redis.pcall('HSET', KEYS[4], 'state', 'retrying', 'attempt', ARGV[7], 'error', ARGV[8], 'at', due)) == 'number' then
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
return 1
