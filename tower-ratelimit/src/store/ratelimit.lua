-- Rampart rate limit: one atomic decision over every quota of a policy.
-- A port of tower-ratelimit's algorithm module, in microseconds (Redis TIME, or ARGV[1]).
--
-- ARGV: now_us|'' , min, max, n, then per quota: kind, a, b, c, d, e, f
--   kind 'g' (GCRA token bucket): a = interval_us, b = tau_us, c = burst
--   kind 'h' (GCRA with warm-up): as 'g', and d = ramp_us, e = cold factor, f = idle_us;
--                                 the key holds 'tat:ramp_start'
--   A token bucket's key ('g' or 'h') also holds, once a refund gave time back in its life,
--   the running total of the time refunds gave back (refund.lua): 'tat:refunded' ('g'),
--   'tat:ramp_start:refunded' ('h'). While it does, the key's TTL never shrinks: it outlives
--   every receipt's TAT, so a receipt of an expired key's life can give nothing back.
--   (Versions before the total read such a value as no state: while both run, a key that saw
--   a refund looks fresh to the older ones.)
--   kind 'w' (rolling window):    a = width_us,    b = slots (S+1), c = limit
--   kind 'l' (sliding log):       a = window_us,   b = limit,       c = unused
--   (d, e, f are 0 for the kinds without warm-up)
-- KEYS: one per quota, two for a sliding log (its zset, then its meta hash).
-- min == max: a check of `min` units, all quotas or none.
-- min <  max: a lease, taking as many units as available up to max, if at least min.
-- Returns { {taken, then per quota: allowed, limit, remaining, reset_after_us, retry_after_us},
--           {per quota: its receipt, '' when nothing was taken} }.
-- A receipt says exactly what the consume took, for refund.lua: a token bucket's TAT right
-- after it, the bucket's refunded total then and the instant ('tat:refunded:now'), a window's
-- sub-window index, a log's member.

local EPS = 1e-9
local function ceil_ms(us) return math.max(1, math.ceil(us / 1000)) end

local min_units = tonumber(ARGV[2])
local max_units = tonumber(ARGV[3])
local n = tonumber(ARGV[4])

local quotas = {}
local k = 1
for i = 1, n do
  local base = 4 + (i - 1) * 7
  local q = { kind = ARGV[base + 1], a = tonumber(ARGV[base + 2]), b = tonumber(ARGV[base + 3]),
              c = tonumber(ARGV[base + 4]), d = tonumber(ARGV[base + 5]), e = tonumber(ARGV[base + 6]),
              f = tonumber(ARGV[base + 7]), key = KEYS[k] }
  k = k + 1
  q.r = 0
  if q.kind == 'g' then
    local raw = redis.call('GET', q.key)
    local tat = 0
    if raw then
      local t, r = fields(raw)
      tat, q.r = tonumber(t) or 0, tonumber(r) or 0
    end
    q.tat = math.max(tat, now)
  elseif q.kind == 'h' then
    -- Warm-up (TokenBucket::evaluate_warm): a ramp restarts when the bucket is new or sat full
    -- for f; while it runs, interval and burst follow phi, and the TAT is kept relative to now.
    local raw = redis.call('GET', q.key)
    local tat, start = 0, nil
    if raw then
      local t, s, r = fields(raw)
      tat, start, q.r = tonumber(t) or 0, tonumber(s), tonumber(r) or 0
    end
    if start == nil or tat + q.f <= now then start = now end
    local cold = 1 / q.e
    local phi = math.min(1, cold + (1 - cold) * (now - start) / q.d)
    if phi < 1 then
      q.a = q.a / phi
      q.c = math.max(1, math.floor(q.c * phi + EPS))
      q.b = q.c * q.a
    end
    -- From here on a plain token bucket with these parameters; only its write differs, and
    -- comparisons allow a thousandth of a token (fractional microseconds stored absolute lose
    -- precision; the in-process store uses the same allowance).
    q.kind, q.warm, q.start, q.tol = 'g', true, start, 1e-3
    q.tat = math.max(tat, now)
  elseif q.kind == 'w' then
    local slots = q.b
    local fields = { 'h' }
    for s = 0, slots - 1 do fields[#fields + 1] = tostring(s) end
    local vals = redis.call('HMGET', q.key, unpack(fields))
    local head = tonumber(vals[1] or '0') or 0
    local counts = {}
    for s = 0, slots - 1 do counts[s] = tonumber(vals[s + 2] or '0') or 0 end
    local index = math.floor(now / q.a)
    -- A newest sub-window over a whole ring ahead of now cannot come from this clock (another
    -- width, a clock far ahead): start afresh (SlidingWindow::advance).
    if head > index + slots then
      head = 0
      for s = 0, slots - 1 do counts[s] = 0 end
    end
    local cur = math.max(index, head)
    local gap = cur - head
    if gap >= slots then
      for s = 0, slots - 1 do counts[s] = 0 end
    else
      for j = 1, gap do counts[(head + j) % slots] = 0 end
    end
    q.cur, q.counts = cur, counts
    local total = 0
    for s = 0, slots - 1 do total = total + counts[s] end
    q.count = total
  else
    q.meta = KEYS[k]
    k = k + 1
    local cutoff = now - q.a
    local expired = redis.call('ZRANGEBYSCORE', q.key, '-inf', fmt(cutoff))
    local freed = 0
    for _, m in ipairs(expired) do freed = freed + tonumber(string.match(m, ':(%d+)$')) end
    if #expired > 0 then
      redis.call('ZREMRANGEBYSCORE', q.key, '-inf', fmt(cutoff))
      redis.call('HINCRBY', q.meta, 'total', -freed)
    end
    q.total = tonumber(redis.call('HGET', q.meta, 'total') or '0') or 0
  end
  quotas[i] = q
end

local function available(q)
  if q.kind == 'g' then return math.floor((q.b - (q.tat - now)) / q.a + (q.tol or EPS))
  elseif q.kind == 'w' then return q.c - q.count
  else return q.b - q.total end
end

-- The fourth decision field, reset_after: the time until the quota holds more units than it
-- has left (0 when it is full), as tower-ratelimit's Decision::reset_after.

local function evaluate(q, cost)
  if q.kind == 'g' then
    -- Relative to now: small numbers, exact where the absolute times are not.
    local tol = q.tol or EPS
    local ahead = q.tat - now
    local new_ahead = ahead + cost * q.a
    -- TokenBucket::next_unit: the TAT falls to where one more token fits.
    local function next_unit(a, remaining)
      if remaining >= q.c or a <= 0 then return 0 end
      return math.max(0, a + (remaining + 1) * q.a - q.b)
    end
    if new_ahead <= q.b + tol * q.a then
      local remaining = math.max(0, math.floor((q.b - new_ahead) / q.a + tol))
      return { 1, q.c, remaining, next_unit(new_ahead, remaining), 0 }
    end
    local remaining = math.max(0, math.floor((q.b - ahead) / q.a + tol))
    return { 0, q.c, remaining, next_unit(ahead, remaining), new_ahead - q.b }
  elseif q.kind == 'w' then
    local slots, limit = q.b, q.c
    -- Sub-window cur - S + j + 1 leaves the count when sub-window cur + j + 1 starts; `extra`
    -- units are (about to be) added to the current one.
    local function leaving(j, extra)
      local slot = (q.cur + j + 1) % slots
      local c = q.counts[slot]
      if slot == q.cur % slots then c = c + extra end
      return c
    end
    local function starts(index) return math.max(0, index * q.a - now) end
    local function next_growth(extra)
      for j = 0, slots - 1 do
        if leaving(j, extra) > 0 then return starts(q.cur + j + 1) end
      end
      return 0
    end
    if q.count + cost <= limit then
      return { 1, limit, limit - q.count - cost, next_growth(cost), 0 }
    end
    local need = q.count + cost - limit
    local freed = 0
    local retry = starts(q.cur + slots)
    for j = 0, slots - 1 do
      freed = freed + leaving(j, 0)
      if freed >= need then retry = starts(q.cur + j + 1) break end
    end
    return { 0, limit, math.max(0, limit - q.count), next_growth(0), retry }
  else
    local limit = q.b
    -- More units come back when the oldest entry (or the one about to be added) expires.
    local oldest = nil
    if q.total > 0 then
      local first = redis.call('ZRANGE', q.key, 0, 0, 'WITHSCORES')
      if first[2] then oldest = tonumber(first[2]) end
    end
    if q.total + cost <= limit then
      if oldest == nil and cost > 0 then oldest = now end
      local reset = 0
      if oldest then reset = math.max(0, oldest + q.a - now) end
      return { 1, limit, limit - q.total - cost, reset, 0 }
    end
    -- A denial reads the oldest entries until `need` units are freed (at most `need` entries:
    -- each holds a unit or more), never the whole log.
    local need = q.total + cost - limit
    local retry_at = now
    local freed, from = 0, 0
    while freed < need do
      local chunk = math.min(need - freed, 128)
      local entries = redis.call('ZRANGE', q.key, from, from + chunk - 1, 'WITHSCORES')
      if #entries == 0 then break end
      for e = 1, #entries, 2 do
        freed = freed + tonumber(string.match(entries[e], ':(%d+)$'))
        if freed >= need then retry_at = tonumber(entries[e + 1]) + q.a break end
      end
      from = from + chunk
    end
    local reset = 0
    if oldest then reset = math.max(0, oldest + q.a - now) end
    return { 0, limit, math.max(0, limit - q.total), reset, math.max(0, retry_at - now) }
  end
end

-- Writes a token bucket's TAT (with its ramp start and refunded total), to live until
-- `extra` past it; once refunds gave time back, never for less than the key has left.
local function set_bucket(q, tat, extra)
  local value = fmt(tat)
  if q.warm then value = value .. ':' .. fmt(q.start) end
  local ttl = ceil_ms(tat - now + extra)
  if q.r ~= 0 then
    value = value .. ':' .. fmt(q.r)
    ttl = math.max(ttl, redis.call('PTTL', q.key))
  end
  redis.call('SET', q.key, value, 'PX', ttl)
end

-- Consumes `cost` units; returns the receipt.
local function consume(q, cost)
  if cost <= 0 then return '' end
  if q.kind == 'g' then
    local new_tat = q.tat + cost * q.a
    set_bucket(q, new_tat, q.warm and q.f or 0)
    return fmt(new_tat) .. ':' .. fmt(q.r) .. ':' .. fmt(now)
  elseif q.kind == 'w' then
    local slots = q.b
    q.counts[q.cur % slots] = q.counts[q.cur % slots] + cost
    local args = { 'h', fmt(q.cur) }
    for s = 0, slots - 1 do
      args[#args + 1] = tostring(s)
      args[#args + 1] = fmt(q.counts[s])
    end
    redis.call('HSET', q.key, unpack(args))
    redis.call('PEXPIRE', q.key, ceil_ms((q.cur + slots) * q.a - now))
    return fmt(q.cur)
  else
    local seq = redis.call('HINCRBY', q.meta, 'seq', 1)
    local member = seq .. ':' .. cost
    redis.call('ZADD', q.key, fmt(now), member)
    redis.call('HINCRBY', q.meta, 'total', cost)
    redis.call('PEXPIRE', q.key, ceil_ms(q.a))
    redis.call('PEXPIRE', q.meta, ceil_ms(q.a))
    return member
  end
end

local take = min_units
if max_units > min_units then
  local avail = nil
  for i = 1, n do
    local a = available(quotas[i])
    if avail == nil or a < avail then avail = a end
  end
  take = math.min(avail or 0, max_units)
  if take < min_units or take <= 0 then take = math.max(min_units, 1) end
end

local decisions = {}
local all = true
for i = 1, n do
  decisions[i] = evaluate(quotas[i], take)
  if decisions[i][1] == 0 then all = false end
end
if not all and n > 1 then
  -- Nothing is consumed: the quotas that would have allowed it report what they hold now.
  for i = 1, n do
    if decisions[i][1] == 1 then decisions[i] = evaluate(quotas[i], 0) end
  end
end
local taken = 0
local receipts = {}
for i = 1, n do receipts[i] = '' end
if all then
  for i = 1, n do receipts[i] = consume(quotas[i], take) end
  taken = take
else
  -- Quota::touch: a warm-up ramp starts with the first request, admitted or not.
  for i = 1, n do
    local q = quotas[i]
    if q.warm then set_bucket(q, q.tat, q.f) end
  end
end

local out = { taken }
for i = 1, n do
  local d = decisions[i]
  out[#out + 1] = d[1]
  out[#out + 1] = d[2]
  out[#out + 1] = d[3]
  out[#out + 1] = math.ceil(d[4])
  out[#out + 1] = math.ceil(d[5])
end
return { out, receipts }
