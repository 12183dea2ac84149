-- Reserves one attempt of a user, atomically: the failures counted so far
-- plus the attempts in flight may not reach the limit, so a burst of
-- concurrent guesses for one user cannot all be looked up before any is
-- counted. The same attempt (its idempotency key) reserves once.
-- KEYS[1]: the user's failure counter; KEYS[2]: its attempts in flight (a
-- sorted set: attempt -> when, in ms)
-- ARGV[1] limit, ARGV[2] attempt, ARGV[3] longest an attempt stays in flight (ms)
-- Returns 1 (reserved), 2 (the same attempt is already in flight: joined),
-- 0 (the limit is taken by attempts in flight: retry shortly), or -ms
-- (locked out for that long).
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[1])
if failures >= limit then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 1 then ttl = 1000 end
  return -ttl
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return 2
end
if failures + redis.call('ZCARD', KEYS[2]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
