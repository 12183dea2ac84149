-- Counts one failed attempt. The first failure opens a window; each failure
-- past the limit doubles the lock-out (back-off), up to a cap.
-- KEYS[1]: the counter; ARGV[1] limit, ARGV[2] window (ms), ARGV[3] longest lock-out (ms)
local n = redis.call('INCR', KEYS[1])
local limit = tonumber(ARGV[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif n >= limit then
  local ttl = tonumber(ARGV[2]) * (2 ^ math.min(n - limit, 20))
  redis.call('PEXPIRE', KEYS[1], math.min(ttl, tonumber(ARGV[3])))
end
return n
