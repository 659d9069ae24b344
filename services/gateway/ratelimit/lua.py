"""The Lua scripts the Redis limiter runs (EVALSHA; SCRIPT LOAD when Redis answers NOSCRIPT).

Kept as Python strings rather than package data so nothing has to be configured to ship them.
Every script reads Redis's own clock (`TIME`) so all gateway hosts share one notion of "now";
Redis 5+ replicates a script's effects, not the script, which is what makes `TIME` before a
write legal.

Counters are hashes `{w: window start (ms), n: count}`: a hash whose `w` is not the current
window is stale and counts as 0, so nobody has to reset it at the boundary. Leases are a sorted
set per key: member = lease id, score = expiry (ms).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str


def script(source: str) -> Script:
    return Script(source, hashlib.sha1(source.encode()).hexdigest())


ACQUIRE = script("""
-- KEYS: one per check, in plan order.
-- ARGV: lease id, lease ttl (ms), window grace (ms), and the checks as one string,
--       "kind limit window amount" per check, space-separated: kind 'r' requests, 't' tokens,
--       'c' concurrency, 'm' money (a budget); limit -1 for none; window in ms (0 for
--       concurrency; for money the period's end, Unix ms, which names the period: the
--       gateway computes it, since months are not a fixed length).
--       One string rather than 4 arguments a check: encoding arguments is most of the
--       client's cost per call.
--       ARGV[5] (optional): the least nano-dollars the request can run with. The budgets
--       share one amount (the worst case); when it does not fit but this does, what is left
--       of the tightest budget is granted instead (the gateway lowers the request's output
--       limit to it), so the last requests of a period still run.
-- Reply: {allowed (1/0), now (ms), nano-dollars granted at every budget, usage of each check
-- before this request}; allowed is -1 when a budget's counter does not hold its period yet
-- (its first request of the period, or Redis lost it): the caller seeds it from billing's
-- records (SEED) and asks again.
-- All or nothing: nothing is written unless every check passes, but for one piece of
-- housekeeping first: a budgeted request's lease that expired unsettled (its gateway died)
-- gives its money back to the budgets it names that this request checks too.
-- A budgeted lease's member is "lease id|grant|counter@period end|...|" (see limits.py
-- `lease_member`): what it holds, so that whoever finds it expired can give it back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local kinds, limits, windows, amounts, names = {}, {}, {}, {}, {}
local used, fresh = {}, {}
local allowed = 1
local unseeded = false
local least = tonumber(ARGV[5] or '0')
local want, room = nil, nil
local lease_at, money = nil, false
local i = 0
for kind, limit, window, amount in string.gmatch(ARGV[4], '(%a) (%-?%d+) (%d+) (%d+)') do
  i = i + 1
  kinds[i], limits[i], windows[i], amounts[i] = kind, tonumber(limit), tonumber(window), amount
  if kind == 'c' then
    lease_at = i
  elseif kind == 'm' then
    money = true
    -- As text for lease members: Lua writes numbers of 15 digits and more as 1e+15.
    names[i] = '|' .. KEYS[i] .. '@' .. window .. '|'
  end
end
if i ~= n then
  return redis.error_reply('ratelimit: ' .. n .. ' keys but ' .. i .. ' checks')
end
if money and lease_at then
  local expired = redis.call('ZRANGEBYSCORE', KEYS[lease_at], '-inf', now)
  for _, member in ipairs(expired) do
    local grant = tonumber(string.match(member, '^[^|]*|(%d+)|'))
    if grant and grant > 0 then
      for j = 1, n do
        if kinds[j] == 'm' and string.find(member, names[j], 1, true)
            and tonumber(redis.call('HGET', KEYS[j], 'w')) == windows[j] then
          if redis.call('HINCRBY', KEYS[j], 'n', -grant) < 0 then
            redis.call('HSET', KEYS[j], 'n', 0)
          end
        end
      end
    end
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[lease_at], '-inf', now)
  end
end
for i = 1, n do
  local kind, limit, amount = kinds[i], limits[i], amounts[i]
  local u = 0
  if kind == 'c' then
    u = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
  else
    local cur = redis.call('HMGET', KEYS[i], 'w', 'n')
    local wid = windows[i]
    if kind ~= 'm' then
      wid = now - (now % windows[i])
    end
    if cur[1] and tonumber(cur[1]) == wid then
      u = tonumber(cur[2]) or 0
      fresh[i] = true
    elseif kind == 'm' then
      unseeded = true
    end
  end
  used[i] = u
  if kind == 'm' then
    want = tonumber(amount)
    if limit >= 0 and (room == nil or limit - u < room) then
      room = limit - u
    end
  elseif limit >= 0 and u + math.max(tonumber(amount), 1) > limit then
    allowed = 0
  end
end
local grant = 0
if want ~= nil then
  grant = want
  if room ~= nil and room < math.max(want, 1) then
    if least > 0 and room >= least then
      grant = room
    else
      allowed = 0
    end
  end
end
if unseeded then
  allowed = -1
end
if allowed == 1 then
  local ttl = tonumber(ARGV[2])
  local grace = tonumber(ARGV[3])
  local member = ARGV[1]
  if grant > 0 then
    member = member .. '|' .. string.format('%d', grant)
    for j = 1, n do
      if kinds[j] == 'm' then
        member = member .. names[j]:sub(1, -2)
      end
    end
    member = member .. '|'
  end
  for j = 1, n do
    local key = KEYS[j]
    if kinds[j] == 'c' then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      redis.call('ZADD', key, now + ttl, member)
      -- A lease holding money outlives its expiry by 15 minutes, for the reconciler's sweep
      -- (every BUDGET_RECONCILE_SECONDS) to find it if its gateway died.
      local keep = ttl
      if grant > 0 then
        keep = ttl + 900000
      end
      if redis.call('PTTL', key) < keep then
        redis.call('PEXPIRE', key, keep)
      end
    elseif kinds[j] == 'm' then
      if fresh[j] then
        redis.call('HINCRBY', key, 'n', grant)
      else
        redis.call('HSET', key, 'w', windows[j], 'n', grant)
        redis.call('PEXPIREAT', key, windows[j] + grace)
      end
    elseif fresh[j] then
      redis.call('HINCRBY', key, 'n', amounts[j])
    else
      local start = now - (now % windows[j])
      redis.call('HSET', key, 'w', start, 'n', amounts[j])
      redis.call('PEXPIREAT', key, start + windows[j] + grace)
    end
  end
end
local reply = {allowed, now, grant}
for j = 1, n do
  reply[j + 3] = used[j]
end
return reply
""")


SETTLE = script("""
-- KEYS[1]: the key's lease set; KEYS[2..]: the counters the reservation added to, its token
-- counters first, then its budget counters.
-- ARGV[1]: lease id, ARGV[2]: tokens to add (negative gives back), ARGV[3]: nano-dollars to
-- add, ARGV[4]: how many of the counters are token counters, ARGV[5..]: the window each
-- counter was reserved in (its start; a budget's period end).
-- Reply: 1 settled, 0 nothing to settle (already settled), -1 the lease had expired.
-- The lease is the reservation's record: removing it is what makes a second settle a no-op.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
if tonumber(expiry) <= now then
  return -1
end
local ntokens = tonumber(ARGV[4])
for i = 2, #KEYS do
  local delta = ARGV[3]
  if i - 1 <= ntokens then
    delta = ARGV[2]
  end
  if tonumber(delta) ~= 0 then
    local w = redis.call('HGET', KEYS[i], 'w')
    if w and tonumber(w) == tonumber(ARGV[i + 3]) then
      if redis.call('HINCRBY', KEYS[i], 'n', delta) < 0 then
        redis.call('HSET', KEYS[i], 'n', 0)
      end
    end
  end
end
return 1
""")


SETTLE_MANY = script("""
-- SETTLE for several reservations in one call: the gateway gathers the settles of requests
-- that finish in the same turn of its event loop (one script run, one reply, instead of one
-- each). KEYS: for each reservation its lease set, then its counters (tokens, then budgets).
-- ARGV[1]: the number of reservations; then for each: the number of its keys, lease id,
-- tokens to add, nano-dollars to add, how many counters are token counters, and the window
-- of each of its counters.
-- Reply: the number of reservations settled now (not already settled, lease not expired).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k, a, settled = 1, 2, 0
for _ = 1, tonumber(ARGV[1]) do
  local nkeys, lease = tonumber(ARGV[a]), ARGV[a + 1]
  local tokens, money, ntokens = ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  a = a + 5
  local expiry = redis.call('ZSCORE', KEYS[k], lease)
  if expiry then
    redis.call('ZREM', KEYS[k], lease)
    if tonumber(expiry) > now then
      settled = settled + 1
      for i = 1, nkeys - 1 do
        local delta = money
        if i <= ntokens then
          delta = tokens
        end
        if tonumber(delta) ~= 0 then
          local w = redis.call('HGET', KEYS[k + i], 'w')
          if w and tonumber(w) == tonumber(ARGV[a + i - 1]) then
            if redis.call('HINCRBY', KEYS[k + i], 'n', delta) < 0 then
              redis.call('HSET', KEYS[k + i], 'n', 0)
            end
          end
        end
      end
    end
  end
  a = a + nkeys - 1
  k = k + nkeys
end
return settled
""")


SEED = script("""
-- Budget counters from billing's records: KEYS: the counters; ARGV[1]: window grace (ms),
-- then per counter its period's end (ms) and the nano-dollars billing recorded in the period.
-- A counter of that period is raised to the recorded spend, never lowered (it also holds the
-- reservations of requests in flight, which billing has not seen); any other is replaced.
-- Reply: the nano-dollars added (the drift found).
local grace = tonumber(ARGV[1])
local added = 0
for i = 1, #KEYS do
  local wid, spent = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local cur = redis.call('HMGET', KEYS[i], 'w', 'n')
  if cur[1] and tonumber(cur[1]) == wid then
    local n = tonumber(cur[2]) or 0
    if spent > n then
      redis.call('HSET', KEYS[i], 'n', spent)
      added = added + spent - n
    end
  else
    redis.call('HSET', KEYS[i], 'w', wid, 'n', spent)
    redis.call('PEXPIREAT', KEYS[i], wid + grace)
    added = added + spent
  end
end
return added
""")


RECONCILE = script("""
-- Budget counters against billing's records, for the periodic reconciler: KEYS: the
-- counters; ARGV: per counter its period's end (ms) and the nano-dollars billing recorded in
-- the period. A counter of that period below the records is raised to them (never lowered:
-- it also holds the reservations of requests in flight); a counter of another period, or
-- none, is left for its next request to seed (SEED).
-- Reply: per counter the nano-dollars added (the drift found).
local out = {}
for i = 1, #KEYS do
  local wid, spent = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local cur = redis.call('HMGET', KEYS[i], 'w', 'n')
  local added = 0
  if cur[1] and tonumber(cur[1]) == wid then
    local n = tonumber(cur[2]) or 0
    if spent > n then
      redis.call('HSET', KEYS[i], 'n', spent)
      added = spent - n
    end
  end
  out[i] = added
end
return out
""")


SWEEP = script("""
-- Give back what budgeted leases that expired unsettled held (their gateway died), for the
-- periodic reconciler: ACQUIRE does it for the key it admits, this for keys nobody asks with
-- any more, whose reservations may hold their environment's or tenant's budget.
-- KEYS[1]: a key's lease set; KEYS[2..]: the budget counters its expired leases name.
-- ARGV: the expired members found (re-checked here: settled or renewed since, they stay).
-- Reply: the nano-dollars given back, summed over the counters.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local back = 0
for _, member in ipairs(ARGV) do
  local expiry = redis.call('ZSCORE', KEYS[1], member)
  if expiry and tonumber(expiry) <= now then
    redis.call('ZREM', KEYS[1], member)
    local grant = tonumber(string.match(member, '^[^|]*|(%d+)|'))
    if grant and grant > 0 then
      for j = 2, #KEYS do
        local w = redis.call('HGET', KEYS[j], 'w')
        if w and string.find(member, '|' .. KEYS[j] .. '@' .. w .. '|', 1, true) then
          local n = redis.call('HINCRBY', KEYS[j], 'n', -grant)
          if n < 0 then
            redis.call('HSET', KEYS[j], 'n', 0)
          end
          back = back + grant
        end
      end
    end
  end
end
return back
""")


RENEW = script("""
-- KEYS[1]: the key's lease set. ARGV[1]: lease id, ARGV[2]: ttl (ms).
-- Reply: 1 renewed, 0 the lease is gone or expired (a lapsed lease is never revived: its slot
-- may already be someone else's).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
""")


AUTH_LOOKUP = script("""
-- The authenticator's read for a key not known to be good in its process, in one round trip:
-- the key's cache entry, and its client network's failures with the window's time left.
-- KEYS[1]: the network's failure counter; KEYS[2]: the key's cache entry (api_key:{hash}).
-- Reply: {entry (nil when there is none), failures in the window, ms left in it (PTTL)}.
-- Whether the key is looked up is the caller's decision (auth_failures.judge_lookup): a key
-- cached as a principal passes even when the network is over its limit.
local failures = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
return {redis.call('GET', KEYS[2]), failures, redis.call('PTTL', KEYS[1])}
""")
