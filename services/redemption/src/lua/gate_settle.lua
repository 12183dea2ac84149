-- Ends a user's hold on one class: confirmed (enrollment committed) or released.
-- KEYS[1] {class:ID}:holds, KEYS[2] {class:ID}:confirmed,
-- KEYS[3] {class:ID}:lock, KEYS[4] {class:ID}:recent, KEYS[5] {class:ID}:ready,
-- KEYS[6] {class:ID}:seen
-- ARGV[1] user id, ARGV[2] '1' to confirm the seat, '0' to release the hold,
-- ARGV[3] the redemption id, ARGV[4] lifetime of the state (ms)
-- Returns 1, or 0 when the class's state is not trustworthy (flushed, expired,
-- restarted): the caller has it rebuilt, so the gate heals before the next herd.
redis.call('ZREM', KEYS[1], ARGV[1])
-- The redemption is recorded by now: remembered as let through even if the
-- state was lost and rebuilt between its admission and its record.
redis.call('SADD', KEYS[6], ARGV[3])
redis.call('PEXPIRE', KEYS[6], ARGV[4])
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
  -- A rebuild is reading the roster: a seat confirmed now may be missing
  -- from what it read, so it is kept aside for the rebuild to add back.
  if redis.call('EXISTS', KEYS[3]) == 1 then
    redis.call('SADD', KEYS[4], ARGV[1])
    redis.call('PEXPIRE', KEYS[4], redis.call('PTTL', KEYS[3]) + 1000)
  end
end
return redis.call('EXISTS', KEYS[5])
