-- Compare-and-delete: only the holder's token releases the lock.
-- 1: deleted; 0: no such key; -1: held by another token.
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
if held then
  return -1
end
return 0
