-- Take up to ARGV[1] GPU launch tokens from a stage-wide bucket (see docs/gpu-tokens.md).
-- KEYS[1]  bucket hash  sair:gpu:<pipeline>:<stage>
-- ARGV[1]  requested tokens (integer >= 1)
-- Returns  {granted, rate_milli}: granted tokens (0..requested), the current refill rate in
--          thousandths of a token per second; {-1, 0} when the bucket has not been configured.
-- The bucket refills lazily from elapsed Redis TIME, so Redis needs no background job.
local requested = tonumber(ARGV[1])
if requested == nil or requested ~= requested or requested == math.huge
    or requested < 1 or requested ~= math.floor(requested) then
  return redis.error_reply('requested must be an integer >= 1, got ' .. tostring(ARGV[1]))
end
local state = redis.call('HMGET', KEYS[1], 'rate', 'burst', 'tokens', 'ts_us')
if state[1] == false then
  return {-1, 0}
end
local rate = tonumber(state[1])
local burst = tonumber(state[2])
local tokens = tonumber(state[3])
local ts_us = tonumber(state[4])
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local elapsed_us = now_us - ts_us
if elapsed_us > 0 then
  tokens = math.min(burst, tokens + rate * elapsed_us / 1000000)
end
local granted = math.min(requested, math.floor(tokens))
if granted < 0 then granted = 0 end
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts_us', string.format('%d', now_us))
return {granted, math.floor(rate * 1000)}
