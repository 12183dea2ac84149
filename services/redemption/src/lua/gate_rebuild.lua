-- Replaces a class's confirmed seats with enrollment's authoritative roster,
-- plus the seats confirmed while the roster was being read, and marks the
-- state trustworthy for a while. Holds in flight are kept, except those of
-- users already seated (their settle was lost).
-- KEYS[1] {class:ID}:confirmed, KEYS[2] {class:ID}:ready, KEYS[3] {class:ID}:lock,
-- KEYS[4] {class:ID}:recent, KEYS[5] {class:ID}:holds, KEYS[6] {class:ID}:fresh
-- ARGV[1] lifetime of the state (ms), ARGV[2] the rebuild lock token,
-- ARGV[3] how long the state counts as fresh (ms: no STALE rebuild meanwhile),
-- ARGV[4..] user ids holding a seat
if redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 4, #ARGV, 5000 do
  local chunk = { unpack(ARGV, i, math.min(i + 4999, #ARGV)) }
  redis.call('SADD', KEYS[1], unpack(chunk))
  redis.call('ZREM', KEYS[5], unpack(chunk))
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('SUNIONSTORE', KEYS[1], KEYS[1], KEYS[4])
  redis.call('DEL', KEYS[4])
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
redis.call('SET', KEYS[6], '1', 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
return 1
