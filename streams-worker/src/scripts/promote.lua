-- Moves due tasks from the delayed set into the stream, atomically: a task is added once, by
-- whichever worker runs this first.
-- KEYS[1] the delayed set, KEYS[2] the stream. ARGV[1] most tasks to move.
-- Each member is a JSON object of the new entry's fields.
-- Returns {moved, ms until the next task is due (-1: none)}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local fields = cjson.decode(member)
  local args = {}
  for _, name in ipairs({'id', 'type', 'payload', 'enqueued_at', 'attempt', 'for_group'}) do
    if fields[name] ~= nil then
      args[#args + 1] = name
      args[#args + 1] = tostring(fields[name])
    end
  end
  redis.call('XADD', KEYS[2], '*', unpack(args))
  redis.call('ZREM', KEYS[1], member)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = -1
if next[2] then
  wait = math.max(0, tonumber(next[2]) - now)
end
return {#due, wait}
