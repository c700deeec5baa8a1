-- Rampart rate limit refund: gives back `cost` units an allowed check of a key took, from every
-- quota (an all-or-nothing check over several limits undoing its part). Never gives back more
-- than there is: a token bucket's TAT moves back by `cost` intervals, a window or a log loses
-- `cost` units from its newest sub-windows or entries.
--
-- ARGV: cost, n, then per quota: kind, a, b (as ratelimit.lua: a = interval_us for 'g'/'h',
-- width_us for 'w'; b = slots for 'w')
-- KEYS: as ratelimit.lua (two for a sliding log: its zset, then its meta hash).

local function fmt(x) return string.format('%.17g', x) end

local cost = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local k = 1
for i = 1, n do
  local base = 2 + (i - 1) * 3
  local kind, a, b = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local key = KEYS[k]
  k = k + 1
  if kind == 'g' then
    local tat = tonumber(redis.call('GET', key) or '')
    if tat then redis.call('SET', key, fmt(math.max(0, tat - cost * a)), 'KEEPTTL') end
  elseif kind == 'h' then
    local raw = redis.call('GET', key)
    if raw then
      local t, s = string.match(raw, '^([^:]+):(.+)$')
      t = tonumber(t)
      if t then redis.call('SET', key, fmt(math.max(0, t - cost * a)) .. ':' .. s, 'KEEPTTL') end
    end
  elseif kind == 'w' then
    local head = tonumber(redis.call('HGET', key, 'h') or '')
    if head then
      local left = cost
      for j = 0, b - 1 do
        if left <= 0 or j > head then break end
        local slot = tostring((head - j) % b)
        local count = tonumber(redis.call('HGET', key, slot) or '0') or 0
        local take = math.min(count, left)
        if take > 0 then
          redis.call('HSET', key, slot, fmt(count - take))
          left = left - take
        end
      end
    end
  else
    local meta = KEYS[k]
    k = k + 1
    local left = cost
    while left > 0 do
      local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      if not newest[1] then break end
      local seq, units = string.match(newest[1], '^(%d+):(%d+)$')
      units = tonumber(units) or 0
      local take = math.min(units, left)
      redis.call('ZREM', key, newest[1])
      if units > take then redis.call('ZADD', key, newest[2], seq .. ':' .. (units - take)) end
      redis.call('HINCRBY', meta, 'total', -take)
      left = left - take
    end
  end
end
return 1
