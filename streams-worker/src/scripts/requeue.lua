-- Puts dead letters back on the stream as fresh tasks (attempts start again), removing them
-- from the dead-letter stream in the same step.
-- KEYS[1] the dead-letter stream, KEYS[2] the stream, KEYS[3] the stats hash.
-- ARGV[1] a dead-letter id, or '*' for the oldest ARGV[2] of them.
-- Returns the ids of the new stream entries.
local records
if ARGV[1] == '*' then
  records = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', tonumber(ARGV[2]))
else
  records = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
end
local added = {}
for _, record in ipairs(records) do
  local f = {}
  for i = 1, #record[2], 2 do
    f[record[2][i]] = record[2][i + 1]
  end
  local args = {}
  for _, name in ipairs({'id', 'type', 'payload', 'enqueued_at'}) do
    if f['orig_' .. name] then
      args[#args + 1] = name
      args[#args + 1] = f['orig_' .. name]
    end
  end
  if #args > 0 then
    added[#added + 1] = redis.call('XADD', KEYS[2], '*', unpack(args))
    redis.call('XDEL', KEYS[1], record[1])
    redis.call('HINCRBY', KEYS[3], 'requeued', 1)
  end
end
return added
