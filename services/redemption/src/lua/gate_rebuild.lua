-- Replaces a class's confirmed seats with enrollment's authoritative roster,
-- plus the seats confirmed while the roster was being read, and marks the
-- state trustworthy for a while. Holds in flight are kept, except those of
-- users already seated (their settle was lost). The redemption ids recorded
-- for the class are added to those let through (never replaced: an attempt
-- admitted meanwhile has not recorded yet; one let through before the state
-- was lost that records after the ids were read adds its id when it settles).
-- KEYS[1] {class:ID}:confirmed, KEYS[2] {class:ID}:ready, KEYS[3] {class:ID}:lock,
-- KEYS[4] {class:ID}:recent, KEYS[5] {class:ID}:holds, KEYS[6] {class:ID}:fresh,
-- KEYS[7] {class:ID}:seen
-- ARGV[1] lifetime of the state (ms), ARGV[2] the rebuild lock token,
-- ARGV[3] how long the state counts as fresh (ms: no STALE rebuild meanwhile),
-- ARGV[4] how many user ids follow, ARGV[5..4+n] user ids holding a seat, then the class's redemption ids
if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return 0
end
local last_user = 4 + tonumber(ARGV[4])
redis.call('DEL', KEYS[1])
for i = 5, last_user, 5000 do
  local chunk = { unpack(ARGV, i, math.min(i + 4999, last_user)) }
  redis.call('SADD', KEYS[1], unpack(chunk))
  redis.call('ZREM', KEYS[5], unpack(chunk))
end
for i = last_user + 1, #ARGV, 5000 do
  redis.call('SADD', KEYS[7], unpack(ARGV, i, math.min(i + 4999, #ARGV)))
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('SUNIONSTORE', KEYS[1], KEYS[1], KEYS[4])
  redis.call('DEL', KEYS[4])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
redis.call('PEXPIRE', KEYS[7], ARGV[1])
redis.call('SET', KEYS[6], '1', 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
return 1
