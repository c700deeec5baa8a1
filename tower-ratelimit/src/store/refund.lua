-- Rampart rate limit refund: gives back what one allowed check of a key took, from every quota
-- (an all-or-nothing check over several limits undoing its part), as the receipts ratelimit.lua
-- returned for it say, and only what of it still counts now (Quota::refund):
--   * a token bucket's TAT moves back by min(units x interval, end - now), with
--     end = max(receipt_tat - since, receipt_now + units x interval), where `since` is the time
--     refunds gave back since the consume (the key's running total, less the total the receipt
--     recorded): the part of the consume that has not come back by itself, counted
--     conservatively (every refund since is taken to have moved the consume's units earlier,
--     but none before the consume's instant; nothing once that end has passed:
--     TokenBucket::refund). What it gives back is added to the total;
--   * a window loses the units from the sub-window the check counted them in, if it is still in
--     the counted range (else they have left already);
--   * a log loses the check's own member, unless it expired (then it is gone already).
--
-- ARGV: now_us|'', units, n, then per quota: kind, a, b, receipt (as ratelimit.lua: a =
-- interval_us for 'g'/'h' (the full-rate one), width_us for 'w'; b = slots for 'w')
-- KEYS: as ratelimit.lua (two for a sliding log: its zset, then its meta hash).

local units = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local k = 1
for i = 1, n do
  local base = 3 + (i - 1) * 4
  local kind, a, b, receipt = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]), ARGV[base + 4]
  local key = KEYS[k]
  k = k + 1
  if kind == 'g' or kind == 'h' then
    -- The receipt: 'tat:refunded:now' (ratelimit.lua). The key: 'tat[:ramp_start][:refunded]'.
    local taken_to, then_r, at = fields(receipt)
    taken_to, then_r, at = tonumber(taken_to), tonumber(then_r) or 0, tonumber(at) or 0
    local raw = redis.call('GET', key)
    if taken_to and raw then
      local t, x, y = fields(raw)
      local tat, start, r = tonumber(t), nil, tonumber(x)
      if kind == 'h' then start, r = x, tonumber(y) end
      r = r or 0
      -- The key's total restarts with its life; a receipt of an earlier life has passed its TAT
      -- (the key outlived it), so any `since` gives nothing then.
      local since = math.max(0, r - then_r)
      local span = units * a
      local back = math.min(span, math.max(taken_to - since, math.min(at + span, taken_to)) - now)
      if tat and back > 0 then
        r = r + back
        local value = fmt(math.max(0, tat - back))
        if kind == 'h' then value = value .. ':' .. start end
        redis.call('SET', key, value .. ':' .. fmt(r), 'KEEPTTL')
      end
    end
  elseif kind == 'w' then
    local index = tonumber(receipt)
    local head = tonumber(redis.call('HGET', key, 'h') or '')
    if index and head then
      local now_index = math.floor(now / a)
      -- An impossible head (ratelimit.lua resets it on the next check) holds nothing of ours.
      if head <= now_index + b then
        local cur = math.max(now_index, head)
        if index <= head and cur - index < b then
          local slot = tostring(index % b)
          local count = tonumber(redis.call('HGET', key, slot) or '0') or 0
          local take = math.min(count, units)
          if take > 0 then redis.call('HSET', key, slot, fmt(count - take)) end
        end
      end
    end
  else
    local meta = KEYS[k]
    k = k + 1
    -- The member is this check's own (`seq:units`): gone if it expired (and was counted out).
    if receipt ~= '' and redis.call('ZREM', key, receipt) == 1 then
      local held = tonumber(string.match(receipt, ':(%d+)$')) or 0
      redis.call('HINCRBY', meta, 'total', -held)
    end
  end
end
return 1
