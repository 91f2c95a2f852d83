"""Lua scripts of the Redis limiter, one module constant per script.

Every script works on the three keys of ONE (actor, feature) bucket, which
share the hash tag ``{<feature>:<actorId>}`` so a call touches one Redis
Cluster slot:

    KEYS[1]  rate_limit:{<feature>:<actorId>}:bucket    hash v=level, t=time (ms)
    KEYS[2]  rate_limit:{<feature>:<actorId>}:tokens    hash v=level, t=time (ms)
    KEYS[3]  rate_limit:concurrent:{<feature>:<actorId>} zset lease id -> expiry (ms)

Time is the server's ``TIME``, so every gateway process agrees on it. Levels
are stored as ``%.17g`` strings (exact round trip of a Lua double); a
missing bucket key reads as a full bucket, so a bucket that refills to full
is deleted and every stored bucket expires when it would be full again.
Lua numbers are truncated to integers on the way out, so durations are
returned in milliseconds (rounded up) and levels rounded down.

Every numeric argument is clamped on the way in (``arg``): counts to
0..MAX_UNITS, durations to MAX_TTL_MS, a missing or NaN value to the bottom of
its range; stored levels never go below -MAX_UNITS and every duration set
(PEXPIRE) or returned is at most MAX_TTL_MS. Whatever a caller sends, a
script never fails on a number (no PEXPIRE out of range, no integer
overflow): the Python API clamps first (limiter/base.py), this is the backstop.
"""

from __future__ import annotations

from limiter.base import MAX_UNITS

# The longest key or lease expiry a script sets, and the largest duration it
# returns (ms): 2^40 ms, about 34 years. See _HELPERS' clamp_ms.
MAX_TTL_MS = 1 << 40

# Shared helpers, prepended to each script (after its header comment).
_HELPERS = (
    f"""
local MAX_UNITS = {MAX_UNITS}
local MAX_TTL_MS = {MAX_TTL_MS}
"""
    + """
-- Redis < 5 replicates scripts verbatim and refuses writes after TIME unless
-- told to replicate effects; Redis >= 5 always does and ignores this.
if redis.replicate_commands then
  redis.replicate_commands()
end

-- A numeric argument within lo..hi; missing or NaN reads as lo.
local function arg(value, lo, hi)
  local x = tonumber(value)
  if x == nil or x ~= x or x < lo then
    return lo
  end
  if x > hi then
    return hi
  end
  return x
end

-- A duration in ms, rounded up, within 0..MAX_TTL_MS (NaN reads as 0).
local function clamp_ms(x)
  if x ~= x or x <= 0 then
    return 0
  end
  if x >= MAX_TTL_MS then
    return MAX_TTL_MS
  end
  return math.ceil(x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- The level of a bucket refilled up to `now`; a missing key is a full bucket.
local function refilled(key, capacity, rate, now)
  local state = redis.call('HMGET', key, 'v', 't')
  local level = tonumber(state[1])
  local at = tonumber(state[2])
  if level == nil or at == nil then
    return capacity
  end
  local elapsed = now - at
  if elapsed < 0 then
    elapsed = 0
  end
  level = level + elapsed * rate
  if level > capacity then
    level = capacity
  end
  return level
end

-- Persist a level. A full bucket needs no key; any other expires once it
-- would have refilled to full (plus a second of slack for clock rounding).
-- A debt (settling above the reservation) is bounded at -MAX_UNITS.
local function store(key, level, capacity, rate, now)
  if level >= capacity then
    redis.call('DEL', key)
    return
  end
  if level < -MAX_UNITS then
    level = -MAX_UNITS
  end
  redis.call('HSET', key, 'v', string.format('%.17g', level), 't', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.max(1, math.min(clamp_ms((capacity - level) / rate) + 1000, MAX_TTL_MS)))
end

local function floor0(x)
  if x < 0 then
    return 0
  end
  return math.floor(x)
end
"""
)

ACQUIRE = (
    """-- ACQUIRE: admit one request, all or nothing.
-- KEYS[1] bucket hash, KEYS[2] token-quota hash, KEYS[3] lease zset (see module doc)
-- ARGV[1] limit            bucket capacity (> 0)
-- ARGV[2] interval_ms      the bucket refills `limit` per `interval_ms`
-- ARGV[3] cost             units taken from the bucket
-- ARGV[4] concurrency      max leases in flight; 0 = no lease is taken
-- ARGV[5] lease_ttl_ms     a lease not released expires after this
-- ARGV[6] lease_id         id of the lease to take (unused when concurrency = 0)
-- ARGV[7] tokens_limit     token-quota capacity per interval; -1 = no token quota
-- ARGV[8] token_reserve    tokens reserved from the quota (at least 1 must be left)
-- Returns {allowed 1|0, cause ''|'concurrency'|'quota'|'tokens', limit, remaining,
--          retry_after_ms, reset_ms}; limit/remaining/reset describe the constraint
--          that decided (the feature bucket when allowed).
"""
    + _HELPERS
    + """
local limit = arg(ARGV[1], 0, MAX_UNITS)
local interval_ms = arg(ARGV[2], 0, MAX_TTL_MS)
local cost = arg(ARGV[3], 0, MAX_UNITS)
local concurrency = arg(ARGV[4], 0, MAX_UNITS)
local lease_ttl_ms = arg(ARGV[5], 1, MAX_TTL_MS)
local lease_id = ARGV[6]
local tokens_limit = arg(ARGV[7], -1, MAX_UNITS)
local token_reserve = arg(ARGV[8], 0, MAX_UNITS)
if limit <= 0 or interval_ms <= 0 then
  return {0, 'quota', limit, 0, clamp_ms(interval_ms), clamp_ms(interval_ms)}
end
local now = now_ms()

if concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= concurrency then
    local soonest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    -- Requests in flight usually end soon: suggest a retry in one second.
    return {0, 'concurrency', concurrency, 0, 1000, clamp_ms(tonumber(soonest[2]) - now)}
  end
end

local rate = limit / interval_ms
local level = refilled(KEYS[1], limit, rate, now)
if level < cost then
  return {0, 'quota', limit, floor0(level), clamp_ms((cost - level) / rate),
          clamp_ms((limit - level) / rate)}
end

local token_level = nil
local token_rate = 0
if tokens_limit >= 0 then
  if tokens_limit == 0 then
    return {0, 'tokens', 0, 0, clamp_ms(interval_ms), clamp_ms(interval_ms)}
  end
  token_rate = tokens_limit / interval_ms
  token_level = refilled(KEYS[2], tokens_limit, token_rate, now)
  local needed = math.max(1, token_reserve)
  if token_level < needed then
    return {0, 'tokens', tokens_limit, floor0(token_level),
            clamp_ms((needed - token_level) / token_rate),
            clamp_ms((tokens_limit - token_level) / token_rate)}
  end
end

level = level - cost
store(KEYS[1], level, limit, rate, now)
if token_level ~= nil then
  store(KEYS[2], token_level - token_reserve, tokens_limit, token_rate, now)
end
if concurrency > 0 then
  redis.call('ZADD', KEYS[3], now + lease_ttl_ms, lease_id)
  if redis.call('PTTL', KEYS[3]) < lease_ttl_ms then
    redis.call('PEXPIRE', KEYS[3], math.ceil(lease_ttl_ms))
  end
end
return {1, '', limit, floor0(level), 0, clamp_ms((limit - level) / rate)}
"""
)

RELEASE = (
    """-- RELEASE: end a request admitted by ACQUIRE.
-- KEYS[1] bucket hash, KEYS[2] token-quota hash, KEYS[3] lease zset (see module doc)
-- ARGV[1] limit            bucket capacity
-- ARGV[2] interval_ms      refill interval
-- ARGV[3] lease_id         lease to free; '' = none was taken
-- ARGV[4] mode             'refund' (give the reservation back) or 'settle'
-- ARGV[5] cost             units reserved at admission
-- ARGV[6] actual_cost      units really used; '' = keep the reservation
-- ARGV[7] tokens_limit     token-quota capacity; -1 = no token quota
-- ARGV[8] token_reserve    tokens reserved at admission
-- ARGV[9] actual_tokens    tokens really used; '' = keep the reservation
-- ARGV[10] only_if_leased  '1' = account only if the lease was still held (a replay
--                          that must not count twice)
-- Returns {lease_removed 1|0, accounted 1|0}. Settling may take a level below zero:
-- an under-estimate is paid for by waiting longer, never forgiven.
"""
    + _HELPERS
    + """
local limit = arg(ARGV[1], 0, MAX_UNITS)
local interval_ms = arg(ARGV[2], 0, MAX_TTL_MS)
local lease_id = ARGV[3]
local refund = ARGV[4] == 'refund'
local cost = arg(ARGV[5], 0, MAX_UNITS)
local tokens_limit = arg(ARGV[7], -1, MAX_UNITS)
local token_reserve = arg(ARGV[8], 0, MAX_UNITS)

local removed = 0
if lease_id ~= '' then
  removed = redis.call('ZREM', KEYS[3], lease_id)
end
if ARGV[10] == '1' and removed == 0 then
  return {0, 0}
end
if limit <= 0 or interval_ms <= 0 then
  return {removed, 0}
end

local delta = 0
local token_delta = 0
if refund then
  delta = cost
  token_delta = token_reserve
else
  if ARGV[6] ~= '' then
    delta = cost - arg(ARGV[6], 0, MAX_UNITS)
  end
  if ARGV[9] ~= '' then
    token_delta = token_reserve - arg(ARGV[9], 0, MAX_UNITS)
  end
end

local now = now_ms()
if delta ~= 0 then
  local rate = limit / interval_ms
  local level = refilled(KEYS[1], limit, rate, now) + delta
  if level > limit then
    level = limit
  end
  store(KEYS[1], level, limit, rate, now)
end
if tokens_limit > 0 and token_delta ~= 0 then
  local token_rate = tokens_limit / interval_ms
  local token_level = refilled(KEYS[2], tokens_limit, token_rate, now) + token_delta
  if token_level > tokens_limit then
    token_level = tokens_limit
  end
  store(KEYS[2], token_level, tokens_limit, token_rate, now)
end
return {removed, 1}
"""
)

STATUS = (
    """-- STATUS: read a bucket without writing anything.
-- KEYS[1] bucket hash, KEYS[2] token-quota hash, KEYS[3] lease zset (see module doc)
-- ARGV[1] limit            bucket capacity
-- ARGV[2] interval_ms      refill interval
-- ARGV[3] tokens_limit     token-quota capacity; -1 = no token quota
-- Returns {remaining, used, reset_ms, in_flight, tokens_remaining (-1 = no quota)}.
"""
    + _HELPERS
    + """
local limit = arg(ARGV[1], 0, MAX_UNITS)
local interval_ms = arg(ARGV[2], 0, MAX_TTL_MS)
local tokens_limit = arg(ARGV[3], -1, MAX_UNITS)
if limit <= 0 or interval_ms <= 0 then
  return {0, 0, 0, 0, tokens_limit < 0 and -1 or 0}
end
local now = now_ms()

local rate = limit / interval_ms
local level = refilled(KEYS[1], limit, rate, now)
local in_flight = redis.call('ZCOUNT', KEYS[3], '(' .. string.format('%.17g', now), '+inf')
local tokens_remaining = -1
if tokens_limit > 0 then
  tokens_remaining = floor0(refilled(KEYS[2], tokens_limit, tokens_limit / interval_ms, now))
elseif tokens_limit == 0 then
  tokens_remaining = 0
end
return {floor0(level), math.max(0, math.ceil(limit - level)), clamp_ms((limit - level) / rate),
        in_flight, tokens_remaining}
"""
)

RENEW = (
    """-- RENEW: keep a running request's lease.
-- KEYS[1] bucket hash, KEYS[2] token-quota hash (both unused), KEYS[3] lease zset (see module doc)
-- ARGV[1] lease_id         the lease to extend
-- ARGV[2] ttl_ms           the lease must not expire sooner than this from now
-- Returns 1 when the lease is held until at least now + ttl_ms (never shortened), 0 when
-- it is gone (released, or expired: an expired lease is never brought back).
"""
    + _HELPERS
    + """
local now = now_ms()
local expiry = tonumber(redis.call('ZSCORE', KEYS[3], ARGV[1]))
if expiry == nil or expiry <= now then
  return 0
end
local ttl_ms = arg(ARGV[2], 1, MAX_TTL_MS)
if expiry < now + ttl_ms then
  redis.call('ZADD', KEYS[3], now + ttl_ms, ARGV[1])
end
if redis.call('PTTL', KEYS[3]) < ttl_ms then
  redis.call('PEXPIRE', KEYS[3], math.ceil(ttl_ms))
end
return 1
"""
)
