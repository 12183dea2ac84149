-- Admission to one class, atomically.
-- KEYS[1] {class:ID}:holds      ZSET user -> hold expiry (ms, Redis clock)
-- KEYS[2] {class:ID}:confirmed  SET of users whose enrollment committed
-- KEYS[3] {class:ID}:ready      present while the state above is trustworthy
-- KEYS[4] {class:ID}:fresh      present for a moment after a rebuild
-- KEYS[5] {class:ID}:seen       SET of redemption ids ever let through here
-- ARGV[1] user id, ARGV[2] hold length (ms), ARGV[3] the class's current maximum,
-- ARGV[4] the class's enrolled count as PostgreSQL last told the caller (-1: skip),
-- ARGV[5] the redemption id, ARGV[6] lifetime of the state (ms)
-- Returns: 'MISSING' (rebuild first), 'STALE' (rebuild first: a seat was freed
-- behind the gate's back), 'CONFIRMED', 'HELD', 'FULL' or 'ADMITTED'.
-- Every answer but FULL lets the redemption on to its record, so its id is
-- remembered first: gate_peek turns a student away without the idempotency
-- look-up only when their redemption id was never let through.
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 'MISSING'
end
local function seen()
  redis.call('SADD', KEYS[5], ARGV[5])
  redis.call('PEXPIRE', KEYS[5], ARGV[6])
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  seen()
  return 'CONFIRMED'
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  seen()
  return 'HELD'
end
local confirmed = redis.call('SCARD', KEYS[2])
local held = redis.call('ZCARD', KEYS[1])
if confirmed + held >= tonumber(ARGV[3]) then
  -- Nothing in flight, yet more confirmed seats than PostgreSQL counted:
  -- a seat was cancelled since the gate last looked. (Right after a rebuild
  -- the caller's count may just be older than the roster: not then.)
  local enrolled = tonumber(ARGV[4] or '-1')
  if enrolled >= 0 and held == 0 and confirmed > enrolled
      and redis.call('EXISTS', KEYS[4]) == 0 then
    return 'STALE'
  end
  return 'FULL'
end
seen()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 'ADMITTED'
