"""The scripts of slices (share.py, slot_share.py): a gateway borrows part of a counter's
window ahead and hands back what it did not use, so the counter is written per slice, not per
request. `BORROW_MANY` borrows for one counter (the platform-wide one: global_lease.py) or
several of a tenant at once, request and token counters and a key's concurrency slots
(counter_leases.py); `GIVE_BACK_MANY` hands back request and token counters;
`RENEW_SLOTS`/`GIVE_BACK_SLOTS` keep and hand back the slots a gateway holds.
"""

from __future__ import annotations

from services.gateway.ratelimit.lua import script

BORROW_MANY = script("""
-- Slices of one tenant's counters for one gateway (counter_leases.py), all or nothing.
-- KEYS: the counters: request and token counters {w: window start, n: granted in it}, or a
-- key's lease set (one member per slot taken, score = its expiry).
-- ARGV[1]: window grace (ms); then 6 per counter: kind ('w' a window counter, 's' slots),
-- limit, window (ms; for slots the lease ttl), amount wanted, amount needed (what the request
-- waiting for it lacks), and for slots the prefix of the members to add ('' otherwise).
-- Reply: {1 granted or 0 (some counter has less left than needed: nothing granted), now (ms),
-- then per counter: its window start (0 for slots), granted, left ungranted after this,
-- taken before}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local grace = tonumber(ARGV[1])
local starts, before, fresh = {}, {}, {}
local ok = 1
for i = 1, #KEYS do
  local a = 6 * i - 4
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local u = 0
  if ARGV[a] == 's' then
    starts[i] = 0
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    u = redis.call('ZCARD', KEYS[i])
  else
    local s = now - (now % window)
    starts[i] = s
    local cur = redis.call('HMGET', KEYS[i], 'w', 'n')
    if cur[1] and tonumber(cur[1]) == s then
      u = tonumber(cur[2]) or 0
      fresh[i] = true
    end
  end
  before[i] = u
  if limit - u < tonumber(ARGV[a + 4]) then
    ok = 0
  end
end
local reply = {ok, now}
for i = 1, #KEYS do
  local a = 6 * i - 4
  local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local grant = 0
  if ok == 1 then
    grant = math.max(0, math.min(tonumber(ARGV[a + 3]), limit - before[i]))
    if grant > 0 and ARGV[a] == 's' then
      for j = 1, grant do
        redis.call('ZADD', KEYS[i], now + window, ARGV[a + 5] .. j)
      end
      if redis.call('PTTL', KEYS[i]) < window then
        redis.call('PEXPIRE', KEYS[i], window)
      end
    elseif grant > 0 then
      if fresh[i] then
        redis.call('HINCRBY', KEYS[i], 'n', grant)
      else
        redis.call('HSET', KEYS[i], 'w', starts[i], 'n', grant)
        redis.call('PEXPIREAT', KEYS[i], starts[i] + window + grace)
      end
    end
  end
  local j = 4 * i - 1
  reply[j], reply[j + 1] = starts[i], grant
  reply[j + 2], reply[j + 3] = math.max(0, limit - before[i] - grant), before[i]
end
return reply
""")


GIVE_BACK_MANY = script("""
-- What a gateway holds of counters' slices (BORROW_MANY) and did not use, handed back while
-- their windows are on; a negative amount is a debt (its requests used more than they had
-- reserved), recorded whatever the limit, as a settle in Redis would.
-- KEYS: the counters (one tenant's); ARGV: per counter the window start it was granted in and
-- the amount. Reply: the amount handed back, debts taken off.
local back = 0
for i = 1, #KEYS do
  local cur = redis.call('HMGET', KEYS[i], 'w', 'n')
  if cur[1] and tonumber(cur[1]) == tonumber(ARGV[2 * i - 1]) then
    local amount = tonumber(ARGV[2 * i])
    if amount > 0 then
      amount = math.min(amount, tonumber(cur[2]) or 0)
    end
    if amount ~= 0 then
      redis.call('HINCRBY', KEYS[i], 'n', -amount)
      back = back + amount
    end
  end
end
return back
""")


RENEW_SLOTS = script("""
-- The slots a gateway holds in a key's lease set (BORROW_MANY), renewed for another ttl: the
-- ones still there and unexpired (a lapsed slot may be someone else's: never revived).
-- KEYS[1]: the lease set; ARGV[1]: ttl (ms), then the members. Reply: the members renewed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  local expiry = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
    renewed = renewed + 1
  end
end
if renewed > 0 and redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return renewed
""")


GIVE_BACK_SLOTS = script("""
-- Slots a gateway holds in a key's lease set and no longer needs. KEYS[1]: the lease set;
-- ARGV: the members. Reply: how many were still there.
return redis.call('ZREM', KEYS[1], unpack(ARGV))
""")
