-- Whether a class is full for a student, read-only: the answer that turns a
-- herd away with no PostgreSQL statement. 'FULL' only when committed seats
-- fill the class, the student holds nothing there, and no earlier attempt
-- with this idempotency key was let through (whose recorded answer must be
-- replayed instead); 'ASK' otherwise: the caller takes the full path.
-- KEYS[1] {class:ID}:holds, KEYS[2] {class:ID}:confirmed, KEYS[3] {class:ID}:ready,
-- KEYS[4] {class:ID}:fresh, KEYS[5] {class:ID}:seen
-- ARGV[1] user id, ARGV[2] the class's maximum, ARGV[3] its enrolled count as
-- last read from PostgreSQL, ARGV[4] the redemption id
if redis.call('EXISTS', KEYS[3]) == 0 then
  return 'ASK'
end
if redis.call('SISMEMBER', KEYS[5], ARGV[4]) == 1
    or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 'ASK'
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held_until = redis.call('ZSCORE', KEYS[1], ARGV[1])
if held_until and tonumber(held_until) > now then
  return 'ASK'
end
-- Confirmed seats alone must fill the class: a hold in flight may be
-- released, and an attempt this gate lost track of (a flush between its
-- admission and its record, a bypass) may still take a seat; only when
-- committed seats fill the class can no attempt still get one, so none
-- whose answer is not yet recorded is told otherwise.
local confirmed = redis.call('SCARD', KEYS[2])
if confirmed < tonumber(ARGV[2]) then
  return 'ASK'
end
-- More confirmed seats than PostgreSQL counted: one may have been cancelled
-- behind the gate's back (not right after a rebuild: then the roster is
-- newer than the count); admission decides.
if confirmed > tonumber(ARGV[3]) and redis.call('EXISTS', KEYS[4]) == 0 then
  return 'ASK'
end
return 'FULL'
