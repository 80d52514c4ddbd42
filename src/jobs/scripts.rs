//! The queue's Lua scripts. Each state change is one atomic script; every time is Redis's
//! (`TIME`), never a host's; every key a script touches is passed in `KEYS`, and all of them
//! share the queue's hash tag, so the scripts run on one Redis Cluster slot.
//!
//! Every script gets the same keys, in this order:
//!
//! | # | key | type | holds |
//! |---|---|---|---|
//! | 1 | `pending` | ZSET | id → `level * 2^40 + seq`: waiting jobs, by priority then age |
//! | 2 | `delayed` | ZSET | id → run-at ms: delayed jobs and retries waiting out their backoff |
//! | 3 | `active` | ZSET | id → lease deadline ms: running jobs |
//! | 4 | `job` | HASH | id → payload (JSON) |
//! | 5 | `info` | HASH | id → `attempts\|max\|level\|token\|enqueued_ms\|dedup key`; the token is `seq.now_ms` |
//! | 6 | `error` | HASH | id → the last error |
//! | 7 | `meta` | HASH | `paused`, `limited_until`: state set at run time |
//! | 8 | `rate` | STRING | the limiter's theoretical arrival time, µs |
//! | 9 | `seq` | STRING | the counter for ids, order and fencing tokens |
//! | 10 | `dead` | ZSET | id → ms it was dead-lettered |
//! | 11 | `marker` | LIST | one element while there is work: idle workers block on it |
//! | 12 | `stats` | HASH | counters shared by every process |
//! | 13 | `dedup` | HASH | dedup key → `id\|expires_ms` |

use std::sync::LazyLock;

use redis::Script;

use crate::redis::script;

/// The key names, in the order of the table above.
pub(crate) const KEY_NAMES: [&str; 13] = [
    "pending", "delayed", "active", "job", "info", "error", "meta", "rate", "seq", "dead",
    "marker", "stats", "dedup",
];

/// Helpers every script starts with.
const COMMON: &str = r#"
local SHIFT = 1099511627776
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(x) return string.format('%d', x) end
local keep_dead = 10000
local function read_info(id)
  local v = redis.call('HGET', KEYS[5], id)
  if not v then return nil end
  local a, m, l, tk, e, d = string.match(v, '^(%d+)|(%d+)|(%d+)|([%d%.]+)|(%d+)|(.*)$')
  if not a then return nil end
  return {attempts = tonumber(a), max = tonumber(m), level = tonumber(l), token = tk,
          enqueued = tonumber(e), dedup = d}
end
local function write_info(id, i)
  redis.call('HSET', KEYS[5], id, int(i.attempts) .. '|' .. int(i.max) .. '|' .. int(i.level)
    .. '|' .. i.token .. '|' .. int(i.enqueued) .. '|' .. i.dedup)
end
local function wake()
  if redis.call('LLEN', KEYS[11]) == 0 then redis.call('LPUSH', KEYS[11], '1') end
end
local function release_dedup(id, i)
  if i.dedup ~= '' then
    local v = redis.call('HGET', KEYS[13], i.dedup)
    if v and string.match(v, '^(%d+)|') == id then redis.call('HDEL', KEYS[13], i.dedup) end
  end
end
local function forget(id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id)
end
local function bury(id, i, err)
  redis.call('ZADD', KEYS[10], now, id)
  if err then redis.call('HSET', KEYS[6], id, err) end
  redis.call('HINCRBY', KEYS[12], 'dead', 1)
  release_dedup(id, i)
  local over = redis.call('ZCARD', KEYS[10]) - keep_dead
  if over > 0 then
    for _, old in ipairs(redis.call('ZRANGE', KEYS[10], 0, math.min(over, 100) - 1)) do
      redis.call('ZREM', KEYS[10], old)
      forget(old)
    end
  end
end
local function holds(id, token)
  local i = read_info(id)
  if i and i.token == token and redis.call('ZSCORE', KEYS[3], id) then return i end
  return nil
end
"#;

/// Enqueues jobs. ARGV: count, then per job: payload, level, delay ms, max attempts, dedup
/// key (empty for none), dedup ttl ms. Returns `{id, duplicate (0|1)}` per job.
const ENQUEUE: &str = r#"
local n = tonumber(ARGV[1])
local out = {}
local added = 0
for j = 0, n - 1 do
  local b = 2 + j * 6
  local payload, level, delay = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local max, dkey, dttl = tonumber(ARGV[b + 3]), ARGV[b + 4], tonumber(ARGV[b + 5])
  local existing = nil
  if dkey ~= '' then
    local v = redis.call('HGET', KEYS[13], dkey)
    if v then
      local id, exp = string.match(v, '^(%d+)|(%d+)$')
      if id and tonumber(exp) > now and redis.call('HEXISTS', KEYS[5], id) == 1
         and not redis.call('ZSCORE', KEYS[10], id) then
        existing = id
      end
    end
  end
  if existing then
    out[#out + 1] = existing
    out[#out + 1] = 1
    redis.call('HINCRBY', KEYS[12], 'deduplicated', 1)
  else
    local id = int(redis.call('INCR', KEYS[9]))
    redis.call('HSET', KEYS[4], id, payload)
    write_info(id, {attempts = 0, max = max, level = level, token = '0', enqueued = now, dedup = dkey})
    if delay > 0 then
      redis.call('ZADD', KEYS[2], now + delay, id)
    else
      redis.call('ZADD', KEYS[1], level * SHIFT + tonumber(id), id)
    end
    if dkey ~= '' then redis.call('HSET', KEYS[13], dkey, id .. '|' .. int(now + dttl)) end
    out[#out + 1] = id
    out[#out + 1] = 0
    added = added + 1
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[12], 'enqueued', added)
  wake()
end
return out
"#;

/// Claims up to ARGV[1] jobs with a lease of ARGV[2] ms, under the queue's limits: ARGV[3]
/// jobs running at once across every process (0: none), one start per ARGV[4] µs with a
/// burst of ARGV[5] (0: no rate limit), ARGV[6] dead letters kept. The limits come from the
/// caller's config, so a Redis that lost its data still enforces them. First it promotes due
/// delayed jobs
/// and takes back jobs whose lease ran out (dead-lettering those on their last attempt);
/// then it respects pause, the manual limit, the global concurrency and the rate limit, and
/// pops by priority. Returns `{now, wait_ms, wait_kind, pending}` and then, per job,
/// `{id, token, attempts, max, level, enqueued_ms, payload}`. `wait_kind`: 0 claim again at
/// once, 1 sleep `wait_ms` (limited), 2 block on the marker for at most `wait_ms` (-1: no
/// deadline).
const CLAIM: &str = r#"
local want, lease, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval, burst = tonumber(ARGV[4]), tonumber(ARGV[5])
keep_dead = tonumber(ARGV[6])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[2], id)
  local i = read_info(id)
  if i then
    redis.call('ZADD', KEYS[1], i.level * SHIFT + redis.call('INCR', KEYS[9]), id)
  else
    forget(id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)) do
  redis.call('ZREM', KEYS[3], id)
  redis.call('HINCRBY', KEYS[12], 'stalled', 1)
  local i = read_info(id)
  if not i then
    forget(id)
  elseif i.attempts >= i.max then
    bury(id, i, 'the lease ran out on the last attempt (its worker stopped or lost Redis)')
  else
    redis.call('ZADD', KEYS[1], i.level * SHIFT + tonumber(id), id)
  end
end
local function next_delayed()
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if first[2] then return math.max(0, tonumber(first[2]) - now) end
  return -1
end
local pending = redis.call('ZCARD', KEYS[1])
local meta = redis.call('HMGET', KEYS[7], 'paused', 'limited_until')
if meta[1] == '1' then return {now, -1, 2, pending} end
local limited = tonumber(meta[2] or '0') or 0
if limited > now then return {now, limited - now, 1, pending} end
if pending == 0 then return {now, next_delayed(), 2, 0} end
local slots = want
if cap > 0 then
  slots = math.min(slots, cap - redis.call('ZCARD', KEYS[3]))
  if slots <= 0 then return {now, -1, 2, pending} end
end
local tat = now_us
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[8]) or '0') or 0, now_us)
  local allowed = math.floor((now_us + burst * interval - tat) / interval)
  if allowed <= 0 then
    return {now, math.max(1, math.ceil((tat + interval - burst * interval - now_us) / 1000)), 1, pending}
  end
  slots = math.min(slots, allowed)
end
local out = {now, 0, 0, 0}
local claimed = 0
local popped = redis.call('ZPOPMIN', KEYS[1], slots)
for k = 1, #popped, 2 do
  local id = popped[k]
  local i = read_info(id)
  local payload = redis.call('HGET', KEYS[4], id)
  if i and payload then
    i.attempts = i.attempts + 1
    -- The clock part keeps tokens unique after Redis lost its data and `seq` started over.
    i.token = int(redis.call('INCR', KEYS[9])) .. '.' .. int(now)
    write_info(id, i)
    redis.call('ZADD', KEYS[3], now + lease, id)
    local n = #out
    out[n + 1] = id
    out[n + 2] = i.token
    out[n + 3] = i.attempts
    out[n + 4] = i.max
    out[n + 5] = i.level
    out[n + 6] = i.enqueued
    out[n + 7] = payload
    claimed = claimed + 1
  else
    forget(id)
  end
end
if interval > 0 and claimed > 0 then
  tat = tat + claimed * interval
  redis.call('SET', KEYS[8], int(tat), 'PX', math.ceil((tat - now_us) / 1000) + 1000)
end
pending = redis.call('ZCARD', KEYS[1])
out[4] = pending
if claimed < want then
  if pending == 0 then
    out[2] = next_delayed()
    out[3] = 2
  elseif interval > 0 then
    out[2] = math.max(1, math.ceil((tat + interval - burst * interval - now_us) / 1000))
    out[3] = 1
  elseif cap > 0 then
    out[2] = -1
    out[3] = 2
  end
elseif pending > 0 then
  wake()
end
return out
"#;

/// Renews leases. ARGV: lease ms, then `id, token` pairs. Returns the tokens whose lease is
/// no longer this worker's.
const HEARTBEAT: &str = r#"
local lease = tonumber(ARGV[1])
local lost = {}
for k = 2, #ARGV, 2 do
  local id, token = ARGV[k], ARGV[k + 1]
  if holds(id, token) then
    redis.call('ZADD', KEYS[3], 'XX', now + lease, id)
  else
    lost[#lost + 1] = token
  end
end
return lost
"#;

/// Settles finished jobs. ARGV: dead letters kept, count, then per job: op, id, token, delay
/// ms, error.
/// op `c` completes; `f` fails (retried after the delay, or dead-lettered on its last
/// attempt); `d` dead-letters at once; `r` releases the job without spending an attempt
/// (back to pending, or delayed when the delay is above zero). Each is checked against the
/// fencing token: a worker that lost its lease settles nothing. Returns per job 0 (lease
/// lost), 1 (done as asked), 2 (dead-lettered on its last attempt).
const SETTLE: &str = r#"
keep_dead = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local out = {}
local delayed = false
for j = 0, n - 1 do
  local b = 3 + j * 5
  local op, id, token, delay, err = ARGV[b], ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3]), ARGV[b + 4]
  local i = holds(id, token)
  local status = 0
  if i then
    redis.call('ZREM', KEYS[3], id)
    status = 1
    if op == 'c' then
      release_dedup(id, i)
      forget(id)
      redis.call('HINCRBY', KEYS[12], 'completed', 1)
    elseif op == 'r' then
      i.attempts = math.max(0, i.attempts - 1)
      i.token = '0'
      write_info(id, i)
      if delay > 0 then
        redis.call('ZADD', KEYS[2], now + delay, id)
        delayed = true
      else
        redis.call('ZADD', KEYS[1], i.level * SHIFT + tonumber(id), id)
      end
      redis.call('HINCRBY', KEYS[12], 'released', 1)
    else
      redis.call('HINCRBY', KEYS[12], 'failed', 1)
      if op == 'd' or i.attempts >= i.max then
        bury(id, i, err)
        if op == 'f' then status = 2 end
      else
        redis.call('HSET', KEYS[6], id, err)
        redis.call('ZADD', KEYS[2], now + delay, id)
        delayed = true
        redis.call('HINCRBY', KEYS[12], 'retried', 1)
      end
    end
  end
  out[#out + 1] = status
end
-- Workers blocked on a full concurrency cap (or on a released job) can claim again, and
-- idle workers learn of a retry's run-at time.
if delayed or redis.call('ZCARD', KEYS[1]) > 0 then wake() end
return out
"#;

/// Holds every claim until ARGV[1] ms from now (a provider's 429), keeping a later limit.
const LIMIT: &str = r#"
local until_ms = now + tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[7], 'limited_until') or '0') or 0
if until_ms > current then redis.call('HSET', KEYS[7], 'limited_until', int(until_ms)) end
return math.max(until_ms, current) - now
"#;

/// Puts dead-lettered job ARGV[1] back in line with fresh attempts. Returns 1, or 0 when it
/// is not dead-lettered.
const REVIVE: &str = r#"
local id = ARGV[1]
if redis.call('ZREM', KEYS[10], id) == 0 then return 0 end
local i = read_info(id)
if not i or redis.call('HEXISTS', KEYS[4], id) == 0 then forget(id) return 0 end
i.attempts = 0
i.token = '0'
write_info(id, i)
redis.call('HDEL', KEYS[6], id)
redis.call('ZADD', KEYS[1], i.level * SHIFT + redis.call('INCR', KEYS[9]), id)
wake()
return 1
"#;

fn with_common(body: &str) -> Script {
    script(&format!("{COMMON}{body}"))
}

pub(crate) static ENQUEUE_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_common(ENQUEUE));
pub(crate) static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_common(CLAIM));
pub(crate) static HEARTBEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_common(HEARTBEAT));
pub(crate) static SETTLE_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_common(SETTLE));
pub(crate) static LIMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_common(LIMIT));
pub(crate) static REVIVE_SCRIPT: LazyLock<Script> = LazyLock::new(|| with_common(REVIVE));
