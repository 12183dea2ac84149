-- Is this attempt counter over its limit?
-- KEYS[1]: the counter; ARGV[1]: the limit of failed attempts.
-- Returns the remaining lock-out in ms, or 0 when allowed.
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then return ttl end
end
return 0
