-- Set a GPU stage bucket's refill rate and burst (see docs/gpu-tokens.md).
-- KEYS[1]  bucket hash  sair:gpu:<pipeline>:<stage>
-- ARGV[1]  rate   tokens per second (>= 0): rho x the stage's calibrated full-speed launch rate
-- ARGV[2]  burst  bucket capacity in tokens (>= 1)
-- ARGV[3]  rho    optional: each replica's share of a GPU (0 < rho <= 1), stored so workers can
--                 report it (the rate is replicas x rho x full speed, so rho is not derivable
--                 from it alone); absent = the field is removed (rho unknown)
-- Returns  the whole tokens in the bucket after the change.
-- Tokens accrued at the old rate up to now are credited first, so a change takes effect from
-- this instant; a new bucket starts full.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
if rate == nil or rate < 0 or rate ~= rate or rate == math.huge then
  return redis.error_reply('rate must be a finite number >= 0, got ' .. tostring(ARGV[1]))
end
if burst == nil or burst < 1 or burst ~= burst or burst == math.huge then
  return redis.error_reply('burst must be a finite number >= 1, got ' .. tostring(ARGV[2]))
end
local rho = nil
if ARGV[3] ~= nil then
  rho = tonumber(ARGV[3])
  if rho == nil or rho ~= rho or rho <= 0 or rho > 1 then
    return redis.error_reply('rho must be a number in (0, 1], got ' .. tostring(ARGV[3]))
  end
end
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'rate', 'burst', 'tokens', 'ts_us')
local tokens = burst
if state[1] ~= false then
  local old_rate = tonumber(state[1])
  local old_burst = tonumber(state[2])
  tokens = tonumber(state[3])
  local elapsed_us = now_us - tonumber(state[4])
  if elapsed_us > 0 then
    tokens = math.min(old_burst, tokens + old_rate * elapsed_us / 1000000)
  end
  tokens = math.min(tokens, burst)
end
redis.call('HSET', KEYS[1], 'rate', tostring(rate), 'burst', tostring(burst),
  'tokens', tostring(tokens), 'ts_us', string.format('%d', now_us))
if rho ~= nil then
  redis.call('HSET', KEYS[1], 'rho', tostring(rho))
else
  redis.call('HDEL', KEYS[1], 'rho')
end
return math.floor(tokens)
