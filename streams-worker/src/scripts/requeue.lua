-- Puts dead letters back on the stream as fresh tasks (attempts start again), removing them
-- from the dead-letter stream in the same step.
-- KEYS[1] the dead-letter stream, KEYS[2] the stream, KEYS[3] the stats hash.
-- ARGV[1] a dead-letter id, or '*' for the next ARGV[2] of them after id ARGV[3] ('-': from the
-- start). A record that is not a task (an undecodable entry) stays where it is.
-- Returns {the last dead-letter id looked at (or ''), the ids of the new stream entries...};
-- each requeued task only for the group it died in (field `for_group`).
local records
if ARGV[1] == '*' then
  local from = ARGV[3]
  if from ~= '-' then
    from = '(' .. from
  end
  records = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', tonumber(ARGV[2]))
else
  records = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
end
local last = ''
if #records > 0 then
  last = records[#records][1]
end
local added = {last}
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
    if f['group'] then
      args[#args + 1] = 'for_group'
      args[#args + 1] = f['group']
    end
    added[#added + 1] = redis.call('XADD', KEYS[2], '*', unpack(args))
    redis.call('XDEL', KEYS[1], record[1])
    redis.call('HINCRBY', KEYS[3], 'requeued', 1)
  end
end
return added
