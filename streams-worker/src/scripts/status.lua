-- Writes a task's status hash and its TTL, best effort: a key of another type under that name
-- is left alone (not overwritten, not expired).
-- KEYS[1] the status key. ARGV[1] TTL in ms, then field/value pairs.
if type(redis.pcall('HSET', KEYS[1], unpack(ARGV, 2))) == 'number' then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 0
