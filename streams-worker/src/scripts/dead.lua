-- Moves an entry to the dead-letter stream (bounded), acknowledged in the same step, only if
-- this consumer still owns it.
-- KEYS[1] the stream, KEYS[2] the dead-letter stream, KEYS[3] the stats hash, KEYS[4] status
-- key (optional). ARGV[1] group, ARGV[2] consumer, ARGV[3] entry id, ARGV[4] dead-letter
-- MAXLEN, ARGV[5] status TTL ms (0: none), ARGV[6] the run: '0' none, '1' a first delivery's run
-- that failed (counted in `failed`), '2' a retry's run that failed (in `failed` and `retried`),
-- ARGV[7] reason, then the dead-letter record's field/value pairs.
-- Returns 1 when moved, 0 when another consumer owns the entry, -1 when it is not pending at all
-- (acknowledged already: by an earlier try whose reply was lost, or by another consumer).
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] then
  return -1
end
if p[1][2] ~= ARGV[2] then
  return 0
end
local record = {}
for i = 8, #ARGV do
  record[#record + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '*', unpack(record))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
-- Counters best effort: the move is written, a stats key of another type must not fail it.
redis.pcall('HINCRBY', KEYS[3], ARGV[1] .. ':dead_lettered', 1)
if ARGV[6] ~= '0' then
  redis.pcall('HINCRBY', KEYS[3], ARGV[1] .. ':failed', 1)
end
if ARGV[6] == '2' then
  redis.pcall('HINCRBY', KEYS[3], ARGV[1] .. ':retried', 1)
end
local ttl = tonumber(ARGV[5])
if ttl > 0 and KEYS[4] then
  -- Best effort, after the move: a status key of another type must not fail it half-way.
  if type(redis.pcall('HSET', KEYS[4], 'state', 'dead', 'error', ARGV[7])) == 'number' then
    redis.call('PEXPIRE', KEYS[4], ttl)
  end
end
return 1
