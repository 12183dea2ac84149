-- Admission to one class, atomically.
-- KEYS[1] {class:ID}:holds      ZSET user -> hold expiry (ms, Redis clock)
-- KEYS[2] {class:ID}:confirmed  SET of users whose enrollment committed
-- KEYS[3] {class:ID}:ready      present while the state above is trustworthy
-- ARGV[1] user id, ARGV[2] hold length (ms), ARGV[3] the class's current maximum
-- Returns: 'MISSING' (rebuild first), 'CONFIRMED', 'HELD', 'FULL' or 'ADMITTED'.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 'MISSING'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 'CONFIRMED'
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 'HELD'
end
if redis.call('SCARD', KEYS[2]) + redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 'FULL'
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 'ADMITTED'
