-- Ends a user's hold on one class: confirmed (enrollment committed) or released.
-- KEYS[1] {class:ID}:holds, KEYS[2] {class:ID}:confirmed
-- ARGV[1] user id, ARGV[2] '1' to confirm the seat, '0' to release the hold
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
end
return 1
