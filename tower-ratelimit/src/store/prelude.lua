-- Shared by ratelimit.lua and refund.lua (prepended to each): number formatting, the
-- ':'-separated fields of a token bucket's key and receipt, and the time (ARGV[1] in
-- microseconds, or Redis TIME when it is '').

local function fmt(x) return string.format('%.17g', x) end
-- Up to three ':'-separated fields.
local function fields(raw)
  return string.match(raw, '^([^:]*):?([^:]*):?([^:]*)$')
end

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
