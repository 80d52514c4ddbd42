//! [`RedisTiers`]: the shared tiers in Redis. Each operation is one round trip: a Lua script
//! or a pipeline. Key layout: see `keys::KeyLayout`.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use ::redis::{Script, Value};
use async_trait::async_trait;

use super::backplane;
use super::coalesce::{self, Admission, ProbeQueue, Turn};
use super::config::TieredConfig;
use super::keys::{KeyHasher, KeyLayout};
use super::memory::wall_us;
use super::store::{Found, Notice, NoticeHandler, Probe, TierStore, Write};
use crate::codec;
use crate::error::{Error, Result};
use crate::redis::{RedisConnection, reply_int, script};

/// Most keys one probe handles; larger batches take one probe per chunk, so a huge
/// `get_many` cannot block Redis for long.
const PROBE_CHUNK: usize = 1000;

/// How many keys' tags and last tier this instance remembers, to probe them without a script.
const SEEN_CAPACITY: usize = 100_000;

/// Redis's clock in µs (`TIME` inside a script).
macro_rules! now_lua {
    () => {
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"#
    };
}

/// Counts a read of an entry from a lower tier in a small hash beside it (`:#`: reads in the
/// window, window start, promoted flag) and copies the entry to the hottest tier once it has
/// been read `promote_reads` times in the window. Returns `{promoted, demoted}`, where demoted
/// means the entry had been promoted and its hot copy has expired since. Timestamps are
/// written with `%.0f`: Lua's default number format would round µs values.
macro_rules! count_read_lua {
    () => {
        r#"
local function count_read(base, tier_key, hot_key, now, promote_reads, window_ms, hot_ttl)
  -- A pipelined count may find that the read was served by a hot copy after all.
  if redis.call('EXISTS', hot_key) == 1 then return {0, 0} end
  local pttl = redis.call('PTTL', tier_key)
  if pttl <= 0 then return {0, 0} end
  local meta = base .. ':#'
  local m = redis.call('HMGET', meta, 'n', 's', 'p')
  local reads, start = tonumber(m[1]) or 0, tonumber(m[2]) or now
  local demoted = 0
  if m[3] then demoted = 1 end
  if now - start >= window_ms * 1000 then reads, start = 0, now end
  reads = reads + 1
  if reads >= promote_reads then
    redis.call('SET', hot_key, redis.call('GET', tier_key), 'PX', math.min(hot_ttl, pttl))
    redis.call('HSET', meta, 'n', 0, 's', string.format('%.0f', now), 'p', 1)
    redis.call('PEXPIRE', meta, pttl)
    return {1, demoted}
  end
  redis.call('HSET', meta, 'n', reads, 's', string.format('%.0f', start))
  if m[3] then redis.call('HDEL', meta, 'p') end
  redis.call('PEXPIRE', meta, window_ms)
  return {0, demoted}
end
"#
    };
}

/// The probe for keys whose tags this instance does not know yet. Reads every tier of each
/// entry (one MGET per tier across the entries still missing), then one MGET for the clear
/// stamp and every distinct tag of the found entries, and counts reads from lower tiers.
/// ARGV: tier count, tier names, tag key prefix, clear key, promote reads, window ms, hot TTL
/// ms. Returns `{now, clear, e1, e2, ...}` where `e` is 0 for a miss or
/// `{tier (0-based), envelope, promoted, demoted, stamp...}`, stamps in the envelope's tag order.
const PROBE_LUA: &str = concat!(
    now_lua!(),
    count_read_lua!(),
    r#"
local ntiers = tonumber(ARGV[1])
local tag_prefix = ARGV[ntiers + 2]
local clear_key = ARGV[ntiers + 3]
local promote_reads = tonumber(ARGV[ntiers + 4])
local window_ms = tonumber(ARGV[ntiers + 5])
local hot_ttl = tonumber(ARGV[ntiers + 6])

local function mget(names)
  local out = {}
  for from = 1, #names, 1000 do
    local part = redis.call('MGET', unpack(names, from, math.min(from + 999, #names)))
    for i = 1, #part do out[#out + 1] = part[i] end
  end
  return out
end

local n = #KEYS
local hit_tier, hit_value, pending = {}, {}, {}
for i = 1, n do pending[i] = i end
for j = 1, ntiers do
  if #pending == 0 then break end
  local names = {}
  for p = 1, #pending do names[p] = KEYS[pending[p]] .. ':' .. ARGV[j + 1] end
  local values = mget(names)
  local still = {}
  for p = 1, #pending do
    if values[p] then
      hit_tier[pending[p]] = j
      hit_value[pending[p]] = values[p]
    else
      still[#still + 1] = pending[p]
    end
  end
  pending = still
end

local stamp_keys, slot_of, entry_slots = {clear_key}, {}, {}
for i = 1, n do
  local v = hit_value[i]
  if v and string.byte(v, 1) == 158 and string.byte(v, 2) == 1 and #v >= 20 then
    local at, slots = 21, {}
    for k = 1, string.byte(v, 4) do
      local len = string.byte(v, at) or 0
      local tag = string.sub(v, at + 1, at + len)
      at = at + 1 + len
      local s = slot_of[tag]
      if not s then
        stamp_keys[#stamp_keys + 1] = tag_prefix .. tag
        s = #stamp_keys
        slot_of[tag] = s
      end
      slots[k] = s
    end
    entry_slots[i] = slots
  end
end
local stamps = mget(stamp_keys)

local out = {now, tonumber(stamps[1]) or 0}
for i = 1, n do
  local j = hit_tier[i]
  if not j then
    out[i + 2] = 0
  else
    local e = {j - 1, hit_value[i], 0, 0}
    local slots = entry_slots[i]
    if slots then
      for k = 1, #slots do e[4 + k] = tonumber(stamps[slots[k]]) or 0 end
    end
    if j > 1 and promote_reads > 0 then
      local r = count_read(KEYS[i], KEYS[i] .. ':' .. ARGV[j + 1], KEYS[i] .. ':' .. ARGV[2], now,
        promote_reads, window_ms, hot_ttl)
      e[3], e[4] = r[1], r[2]
    end
    out[i + 2] = e
  end
end
return out
"#
);

/// Counts one read of KEYS[1] from tier ARGV[1] and promotes it to tier ARGV[2]. ARGV[3..5]:
/// promote reads, window ms, hot TTL ms. Pipelined after the MGET of a known key that was
/// last read from a lower tier.
const COUNT_LUA: &str = concat!(
    now_lua!(),
    count_read_lua!(),
    r#"
return count_read(KEYS[1], KEYS[1] .. ':' .. ARGV[1], KEYS[1] .. ':' .. ARGV[2], now,
  tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]))
"#
);

/// Writes each entry to its home tier with created-at and expiry stamped from Redis's clock,
/// deletes its other tiers' copies and its read counter, and publishes the backplane message.
/// ARGV: tier count, tier names, channel ('' for none), message, then (home tier 0-based,
/// ttl ms, grace ms, created-at µs or 0 for now, envelope) per key: the envelope expires after
/// the TTL, the key after TTL plus grace. Returns Redis's clock.
const WRITE_LUA: &str = concat!(
    now_lua!(),
    r#"
local ntiers = tonumber(ARGV[1])
local channel, message = ARGV[ntiers + 2], ARGV[ntiers + 3]
local function be64(x)
  local b = {}
  for i = 8, 1, -1 do
    b[i] = x % 256
    x = math.floor(x / 256)
  end
  return string.char(unpack(b))
end
local a = ntiers + 4
for i = 1, #KEYS do
  local home, ttl, grace = tonumber(ARGV[a]) + 1, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local created, v = tonumber(ARGV[a + 3]), ARGV[a + 4]
  a = a + 5
  if created == 0 or created > now then created = now end
  local stamped = string.sub(v, 1, 4) .. be64(created) .. be64(now + ttl * 1000) .. string.sub(v, 21)
  for j = 1, ntiers do
    local key = KEYS[i] .. ':' .. ARGV[j + 1]
    if j == home then
      redis.call('SET', key, stamped, 'PX', ttl + grace)
    else
      redis.call('DEL', key)
    end
  end
  redis.call('DEL', KEYS[i] .. ':#')
end
if channel ~= '' then redis.call('PUBLISH', channel, message) end
return now
"#
);

/// Deletes KEYS[1] only if it still holds ARGV[1].
const REMOVE_IF_UNCHANGED_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Extends KEYS[1] to ARGV[2] ms if it still holds ARGV[1]. Returns 1 if extended.
const EXTEND_LOCK_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Sets each key to Redis's clock for ARGV[1] ms and publishes ARGV[3] on channel ARGV[2]
/// (unless empty). Returns the clock.
const STAMP_LUA: &str = concat!(
    now_lua!(),
    r#"
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', now), 'PX', ARGV[1])
end
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return now
"#
);

static PROBE: LazyLock<Script> = LazyLock::new(|| script(PROBE_LUA));
static COUNT: LazyLock<Script> = LazyLock::new(|| script(COUNT_LUA));
static WRITE: LazyLock<Script> = LazyLock::new(|| script(WRITE_LUA));
static REMOVE_IF_UNCHANGED: LazyLock<Script> = LazyLock::new(|| script(REMOVE_IF_UNCHANGED_LUA));
static STAMP: LazyLock<Script> = LazyLock::new(|| script(STAMP_LUA));
static EXTEND_LOCK: LazyLock<Script> = LazyLock::new(|| script(EXTEND_LOCK_LUA));

/// What this instance last saw of a key: the tags of its entry and the tier it came from.
#[derive(Clone)]
struct Seen {
    /// `None` for an untagged entry, the common case: copying it then costs nothing.
    tags: Option<Arc<[String]>>,
    tier: usize,
}

impl Seen {
    fn new(tags: &[String], tier: usize) -> Self {
        Seen {
            tags: (!tags.is_empty()).then(|| tags.into()),
            tier,
        }
    }

    fn tags(&self) -> &[String] {
        self.tags.as_deref().unwrap_or_default()
    }
}

/// A bounded map from keys to small values, sharded by key hash, each shard behind its own
/// `RwLock` so that concurrent readers do not contend. A full shard is emptied: what it
/// forgets costs one script probe per key.
struct Sharded<V> {
    shards: Box<[RwLock<HashMap<String, V, KeyHasher>>]>,
    per_shard: usize,
    hasher: KeyHasher,
}

const SHARDS: usize = 32;

impl<V: Clone> Sharded<V> {
    fn new(capacity: usize) -> Self {
        Sharded {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            hasher: KeyHasher::default(),
        }
    }

    fn shard(&self, key: &str) -> &RwLock<HashMap<String, V, KeyHasher>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    fn get(&self, key: &str) -> Option<V> {
        let shard = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        shard.get(key).cloned()
    }

    fn update(&self, key: &str, update: impl FnOnce(Option<&V>) -> V) {
        let mut shard = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        let value = update(shard.get(key));
        if shard.len() >= self.per_shard && !shard.contains_key(key) {
            shard.clear();
        }
        shard.insert(key.to_owned(), value);
    }
}

/// Tag and clear stamps this instance fetched or wrote, trusted for `ttl` after they were
/// learnt. The clear stamp sits in atomics: every read needs it.
struct RecentStamps {
    ttl_us: u64,
    clear: AtomicU64,
    clear_learnt_us: AtomicU64,
    tags: Sharded<(u64, u64)>,
}

impl RecentStamps {
    fn new(ttl: Duration) -> Self {
        RecentStamps {
            ttl_us: ttl.as_micros() as u64,
            clear: AtomicU64::new(0),
            clear_learnt_us: AtomicU64::new(0),
            tags: Sharded::new(SEEN_CAPACITY),
        }
    }

    fn fresh(&self, learnt_us: u64) -> bool {
        self.ttl_us > 0 && learnt_us > 0 && wall_us().saturating_sub(learnt_us) < self.ttl_us
    }

    fn clear(&self) -> Option<u64> {
        self.fresh(self.clear_learnt_us.load(Ordering::Acquire))
            .then(|| self.clear.load(Ordering::Acquire))
    }

    fn put_clear(&self, stamp: u64) {
        self.clear.fetch_max(stamp, Ordering::AcqRel);
        self.clear_learnt_us.store(wall_us(), Ordering::Release);
    }

    fn tag(&self, tag: &str) -> Option<u64> {
        self.tags
            .get(tag)
            .and_then(|(stamp, learnt)| self.fresh(learnt).then_some(stamp))
    }

    /// Forgets everything learnt: notices may have been missed.
    fn forget(&self) {
        self.clear_learnt_us.store(0, Ordering::Release);
        for shard in self.tags.shards.iter() {
            shard.write().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    fn put_tag(&self, tag: &str, stamp: u64) {
        if self.ttl_us > 0 {
            let now = wall_us();
            self.tags.update(tag, |old| {
                (old.map_or(stamp, |(s, _)| (*s).max(stamp)), now)
            });
        }
    }
}

/// The shared tiers of one named cache in Redis.
///
/// A probe is one round trip:
/// - for a key this instance has read or written before, a `GET` (an `MGET` for several keys)
///   of the tier it was last found in, plus the tag and clear stamps it has not fetched within
///   `stamp_ttl`; and, for an entry last read from a lower tier, a small script that counts
///   the read for promotion. A hot-tier hit runs no script, so it costs Redis what a GET does.
/// - for a key not seen before, a script that reads every tier, parses the envelopes' tags and
///   fetches their stamps in place.
///
/// If the remembered tier no longer holds the entry, or its tags have changed, the key is
/// probed again by the script.
pub struct RedisTiers {
    connection: RedisConnection,
    layout: KeyLayout,
    tier_names: Vec<String>,
    tag_prefix: String,
    clear_key: String,
    promote_reads: u32,
    promote_window_ms: u64,
    hot_ttl_ms: u64,
    /// How long tag and clear stamps are kept: the longest TTL an entry can have.
    stamp_retention_ms: u64,
    seen: Sharded<Seen>,
    recent: Arc<RecentStamps>,
    /// Bounds the probes out at once; the reads beyond go out together.
    queue: ProbeQueue,
    /// Redis's clock minus this process's, in µs, from the last script reply.
    clock_offset_us: Arc<AtomicI64>,
    /// The backplane channel ("" when the backplane is off).
    channel: String,
    /// This instance's id on the backplane.
    source: u64,
    /// Dropped with the store, which stops the backplane subscriber.
    _stop: watch::Sender<()>,
    stop: watch::Receiver<()>,
}

impl std::fmt::Debug for RedisTiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTiers")
            .field("connection", &self.connection)
            .field("layout", &self.layout)
            .field("tiers", &self.tier_names)
            .finish()
    }
}

impl RedisTiers {
    /// The tiers `config` describes, over `connection`. The config is assumed validated (the
    /// [`Tiered`](super::Tiered) builder does it).
    pub fn new(connection: RedisConnection, config: &TieredConfig) -> Self {
        let layout = KeyLayout::new(&config.key_prefix, &config.name);
        let (stop_sender, stop) = watch::channel(());
        RedisTiers {
            connection,
            tag_prefix: layout.tag_prefix(),
            clear_key: layout.clear_key(),
            layout,
            tier_names: config.tiers.iter().map(|t| t.name.clone()).collect(),
            promote_reads: config.promotion.reads,
            promote_window_ms: config.promotion.window.as_millis() as u64,
            hot_ttl_ms: config.tiers[0].ttl.as_millis() as u64,
            stamp_retention_ms: config.max_ttl.as_millis() as u64,
            seen: Sharded::new(SEEN_CAPACITY),
            recent: Arc::new(RecentStamps::new(config.stamp_ttl)),
            queue: ProbeQueue::new(config.max_probes_in_flight),
            clock_offset_us: Arc::new(AtomicI64::new(0)),
            channel: if config.backplane {
                backplane::channel(&config.key_prefix, &config.name)
            } else {
                String::new()
            },
            source: (crate::random::random_u128() as u64),
            _stop: stop_sender,
            stop,
        }
    }

    /// The backplane message for `notice`, or nothing when the backplane is off.
    fn announce(&self, notice: &Notice) -> Vec<u8> {
        if self.channel.is_empty() {
            Vec::new()
        } else {
            backplane::encode(self.source, notice)
        }
    }

    /// Notes Redis's clock from a script's reply.
    fn sync_clock(&self, redis_now_us: u64) {
        let offset = redis_now_us as i64 - wall_us() as i64;
        self.clock_offset_us.store(offset, Ordering::Relaxed);
    }

    /// Redis's clock, estimated from the last script reply.
    fn redis_now_us(&self) -> u64 {
        redis_now_us(&self.clock_offset_us)
    }

    /// Remembers where `key` was found and with which tags; a promoted entry is next read
    /// from the hottest tier.
    fn remember(&self, key: &str, found: &Found, tags: &[String], before: Option<&Seen>) {
        let tier = if found.promoted { 0 } else { found.tier };
        if before.is_some_and(|s| s.tier == tier && s.tags() == tags) {
            return;
        }
        let seen = Seen::new(tags, tier);
        self.seen.update(key, |_| seen);
    }

    /// The script probe, for keys not seen before.
    async fn probe_by_script(&self, keys: &[&str], probe: &mut Probe) -> Result<()> {
        let mut invocation = PROBE.prepare_invoke();
        for key in keys {
            invocation.key(self.layout.entry(key));
        }
        invocation.arg(self.tier_names.len());
        for name in &self.tier_names {
            invocation.arg(name);
        }
        invocation
            .arg(&self.tag_prefix)
            .arg(&self.clear_key)
            .arg(self.promote_reads)
            .arg(self.promote_window_ms)
            .arg(self.hot_ttl_ms);
        let reply: Value = self.connection.run_script("probe", &invocation).await?;
        let first = probe.found.len();
        parse_probe(reply, keys.len(), self.tier_names.len(), probe)?;
        self.sync_clock(probe.now_us);
        self.recent.put_clear(probe.clear_us);
        for (key, found) in keys.iter().zip(&probe.found[first..]) {
            let Some(found) = found else { continue };
            let Ok(header) = codec::header(&found.envelope) else {
                continue;
            };
            for (tag, &stamp) in header.tags.iter().zip(&found.tag_stamps) {
                self.recent.put_tag(tag, stamp);
            }
            self.remember(key, found, &header.tags, None);
        }
        Ok(())
    }

    /// Adds a count of one read of `entry` from `tier` to `pipeline`.
    fn push_count(&self, pipeline: &mut ::redis::Pipeline, entry: &str, tier: usize) {
        pipeline
            .cmd("EVALSHA")
            .arg(COUNT.get_hash())
            .arg(1)
            .arg(entry)
            .arg(&self.tier_names[tier])
            .arg(&self.tier_names[0])
            .arg(self.promote_reads)
            .arg(self.promote_window_ms)
            .arg(self.hot_ttl_ms);
    }

    /// The probe of keys seen before: their remembered tier's copy and the stamps not learnt
    /// recently, in one command (plus count scripts for lower-tier entries, pipelined).
    async fn probe_seen(&self, keys: &[&str], seen: &[Seen], probe: &mut Probe) -> Result<()> {
        // Stamps known from recent fetches; the rest are fetched in this read.
        let mut clear = self.recent.clear();
        let mut tag_stamps: Vec<(&str, Option<u64>)> = Vec::new();
        for tag in seen.iter().flat_map(Seen::tags) {
            if !tag_stamps.iter().any(|(t, _)| t == tag) {
                tag_stamps.push((tag, self.recent.tag(tag)));
            }
        }
        let fetches =
            usize::from(clear.is_none()) + tag_stamps.iter().filter(|(_, s)| s.is_none()).count();
        let command = if keys.len() + fetches == 1 {
            "GET"
        } else {
            "MGET"
        };
        let mut read = ::redis::cmd(command);
        let mut name = String::new();
        for (key, seen) in keys.iter().zip(seen) {
            self.layout
                .write_entry_tier(&mut name, key, &self.tier_names[seen.tier]);
            read.arg(name.as_str());
        }
        if clear.is_none() {
            read.arg(&self.clear_key);
        }
        for (tag, _) in tag_stamps.iter().filter(|(_, s)| s.is_none()) {
            read.arg(format!("{}{tag}", self.tag_prefix));
        }
        let counted: Vec<usize> = if self.promote_reads > 0 {
            (0..keys.len()).filter(|&i| seen[i].tier > 0).collect()
        } else {
            Vec::new()
        };
        let (reply, counts) = if counted.is_empty() {
            let reply: Value = self.connection.query("probe", &read).await?;
            (reply, Vec::new())
        } else {
            let mut pipeline = ::redis::pipe();
            pipeline.add_command(read);
            for &i in &counted {
                self.push_count(&mut pipeline, &self.layout.entry(keys[i]), seen[i].tier);
            }
            let replies: Vec<Value> = Box::pin(self.connection.pipeline_with_scripts(
                "probe",
                &pipeline,
                &[&COUNT],
            ))
            .await?;
            let mut replies = replies.into_iter();
            let reply = replies
                .next()
                .ok_or_else(|| malformed("empty pipeline reply"))?;
            (reply, replies.map(count_flags).collect())
        };
        let (mut many, mut one);
        let values: &mut [Value] = match reply {
            Value::Array(values) if command == "MGET" => {
                many = values;
                &mut many
            }
            single => {
                one = [single];
                &mut one
            }
        };
        if values.len() != keys.len() + fetches {
            return Err(malformed("the read answered the wrong number of values"));
        }
        let mut fetched = values[keys.len()..].iter().map(stamp);
        if clear.is_none() {
            let stamp = fetched.next().unwrap_or(0);
            self.recent.put_clear(stamp);
            clear = Some(stamp);
        }
        for (tag, known) in tag_stamps.iter_mut().filter(|(_, s)| s.is_none()) {
            let stamp = fetched.next().unwrap_or(0);
            self.recent.put_tag(tag, stamp);
            *known = Some(stamp);
        }
        let counts: HashMap<usize, (bool, bool)> = counted.into_iter().zip(counts).collect();
        probe.now_us = self.redis_now_us();
        probe.clear_us = probe.clear_us.max(clear.unwrap_or(0));
        let first = probe.found.len();
        let mut again = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let Value::BulkString(envelope) = std::mem::take(&mut values[i]) else {
                // Gone from the remembered tier: moved, expired or removed.
                again.push(i);
                probe.found.push(None);
                continue;
            };
            // An untagged entry seen untagged needs no header parse (byte 3 is the tag count).
            let tags = if seen[i].tags.is_none() && envelope.get(3) == Some(&0) {
                Vec::new()
            } else {
                codec::header(&envelope).map(|h| h.tags).unwrap_or_default()
            };
            let stamps: Option<Vec<u64>> = tags
                .iter()
                .map(|tag| {
                    tag_stamps
                        .iter()
                        .find(|(t, _)| t == tag)
                        .and_then(|(_, s)| *s)
                })
                .collect();
            let Some(stamps) = stamps else {
                // The entry's tags changed since it was seen: their stamps were not fetched.
                again.push(i);
                probe.found.push(None);
                continue;
            };
            let mut found = Found::new(seen[i].tier, envelope, stamps);
            if let Some(&(promoted, demoted)) = counts.get(&i) {
                found.promoted = promoted;
                found.demoted = demoted;
            }
            self.remember(key, &found, &tags, Some(&seen[i]));
            probe.found.push(Some(found));
        }
        if !again.is_empty() {
            let keys_again: Vec<&str> = again.iter().map(|&i| keys[i]).collect();
            let mut second = Probe::default();
            // Boxed: this rare path would otherwise enlarge every probe's future.
            Box::pin(self.probe_by_script(&keys_again, &mut second)).await?;
            probe.clear_us = probe.clear_us.max(second.clear_us);
            for (i, found) in again.into_iter().zip(second.found) {
                probe.found[first + i] = found;
            }
        }
        Ok(())
    }
}

/// Redis's clock, estimated from this process's and the offset last seen.
fn redis_now_us(offset: &AtomicI64) -> u64 {
    wall_us().saturating_add_signed(offset.load(Ordering::Relaxed))
}

/// The `{promoted, demoted}` reply of the count script.
fn count_flags(reply: Value) -> (bool, bool) {
    match reply {
        Value::Array(flags) => {
            let flag = |n: usize| flags.get(n).and_then(reply_int) == Some(1);
            (flag(0), flag(1))
        }
        _ => (false, false),
    }
}

/// A stamp key's value as µs; 0 when absent or unreadable.
fn stamp(value: &Value) -> u64 {
    match value {
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        Value::Int(i) => (*i).max(0) as u64,
        _ => 0,
    }
}

fn malformed(what: &str) -> Error {
    Error::Backend {
        backend: "redis",
        operation: "probe",
        source: format!("unexpected reply from the probe script: {what}").into(),
    }
}

/// Turns the probe script's reply into [`Found`]s, appending to `probe`.
fn parse_probe(reply: Value, keys: usize, tiers: usize, probe: &mut Probe) -> Result<()> {
    let Value::Array(items) = reply else {
        return Err(malformed("not an array"));
    };
    if items.len() != keys + 2 {
        return Err(malformed("wrong number of entries"));
    }
    let mut items = items.into_iter();
    let now = items
        .next()
        .as_ref()
        .and_then(reply_int)
        .ok_or_else(|| malformed("no clock"))?;
    let clear = items
        .next()
        .as_ref()
        .and_then(reply_int)
        .ok_or_else(|| malformed("no clear stamp"))?;
    probe.now_us = now.max(0) as u64;
    probe.clear_us = probe.clear_us.max(clear.max(0) as u64);
    for item in items {
        let Value::Array(fields) = item else {
            probe.found.push(None);
            continue;
        };
        let mut fields = fields.into_iter();
        let tier = fields
            .next()
            .as_ref()
            .and_then(reply_int)
            .ok_or_else(|| malformed("no tier"))?;
        let tier = usize::try_from(tier)
            .ok()
            .filter(|&t| t < tiers)
            .ok_or_else(|| malformed("tier out of range"))?;
        let envelope = match fields.next() {
            Some(Value::BulkString(bytes)) => bytes,
            _ => return Err(malformed("no envelope")),
        };
        let promoted = fields.next().as_ref().and_then(reply_int) == Some(1);
        let demoted = fields.next().as_ref().and_then(reply_int) == Some(1);
        let tag_stamps = fields
            .map(|v| reply_int(&v).unwrap_or(0).max(0) as u64)
            .collect();
        let mut found = Found::new(tier, envelope, tag_stamps);
        found.promoted = promoted;
        found.demoted = demoted;
        probe.found.push(Some(found));
    }
    Ok(())
}

impl RedisTiers {
    /// Probes `keys` now, in chunks of [`PROBE_CHUNK`]. In a chunk that mixes keys seen before
    /// with new ones (a batch of several reads), each kind is probed its own way, together.
    async fn probe_now(&self, keys: &[&str]) -> Result<Probe> {
        let mut probe = Probe {
            found: Vec::with_capacity(keys.len()),
            ..Probe::default()
        };
        for chunk in keys.chunks(PROBE_CHUNK) {
            // The common case, every key known, stops at the first unknown one.
            let all_seen: Option<Vec<Seen>> = chunk.iter().map(|key| self.seen.get(key)).collect();
            if let Some(seen) = all_seen {
                self.probe_seen(chunk, &seen, &mut probe).await?;
                continue;
            }
            let seen: Vec<Option<Seen>> = chunk.iter().map(|key| self.seen.get(key)).collect();
            if seen.iter().all(Option::is_none) {
                Box::pin(self.probe_by_script(chunk, &mut probe)).await?;
            } else {
                Box::pin(self.probe_mixed(chunk, seen, &mut probe)).await?;
            }
        }
        Ok(probe)
    }

    /// Probes the keys of `chunk` seen before and the new ones side by side, then merges the
    /// answers back into `chunk`'s order.
    async fn probe_mixed(
        &self,
        chunk: &[&str],
        seen: Vec<Option<Seen>>,
        probe: &mut Probe,
    ) -> Result<()> {
        let (mut known_keys, mut known_seen, mut new_keys) = (Vec::new(), Vec::new(), Vec::new());
        for (key, seen) in chunk.iter().zip(&seen) {
            match seen {
                Some(seen) => {
                    known_keys.push(*key);
                    known_seen.push(seen.clone());
                }
                None => new_keys.push(*key),
            }
        }
        let (mut known, mut new) = (Probe::default(), Probe::default());
        let (known_result, new_result) = tokio::join!(
            self.probe_seen(&known_keys, &known_seen, &mut known),
            self.probe_by_script(&new_keys, &mut new),
        );
        known_result?;
        new_result?;
        probe.now_us = probe.now_us.max(known.now_us).max(new.now_us);
        probe.clear_us = probe.clear_us.max(known.clear_us).max(new.clear_us);
        let (mut known, mut new) = (known.found.into_iter(), new.found.into_iter());
        for seen in &seen {
            let found = if seen.is_some() {
                known.next()
            } else {
                new.next()
            };
            probe.found.push(found.flatten());
        }
        Ok(())
    }

    /// Probes `keys` together with the reads waiting for a turn, and answers each of them.
    async fn probe_for_waiters(&self, keys: &[&str]) -> Result<Probe> {
        let waiters = self.queue.take_waiting(keys.len());
        let mut all: Vec<&str> = keys.to_vec();
        let mut lengths = vec![keys.len()];
        for waiter in &waiters {
            all.extend(waiter.keys());
            lengths.push(waiter.len());
        }
        match self.probe_now(&all).await {
            Ok(probe) => {
                let mut probes = coalesce::split(probe, &lengths).into_iter();
                let mine = probes.next().unwrap_or_default();
                for (waiter, probe) in waiters.into_iter().zip(probes) {
                    waiter.answer(Ok(probe));
                }
                Ok(mine)
            }
            Err(error) => {
                let error = Arc::new(error);
                for waiter in waiters {
                    waiter.answer(Err(crate::error::share(&error, "redis", "probe")));
                }
                Err(crate::error::share(&error, "redis", "probe"))
            }
        }
    }
}

#[async_trait]
impl TierStore for RedisTiers {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn breaker(&self) -> Option<crate::resilience::BreakerStats> {
        Some(self.connection.breaker())
    }

    fn watch(&self, handler: NoticeHandler) {
        if self.channel.is_empty() {
            return;
        }
        // What the notices say about stamps is learnt here first, so reads trust it at once.
        let (recent, offset) = (self.recent.clone(), self.clock_offset_us.clone());
        let learn: NoticeHandler = Arc::new(move |notice| {
            let now = redis_now_us(&offset);
            match &notice {
                Notice::TagsInvalidated(tags) => tags.iter().for_each(|t| recent.put_tag(t, now)),
                Notice::Cleared => recent.put_clear(now),
                Notice::Resubscribed => recent.forget(),
                _ => {}
            }
            handler(notice)
        });
        backplane::spawn_subscriber(
            self.connection.clone(),
            self.channel.clone(),
            self.source,
            learn,
            self.stop.clone(),
        );
    }

    async fn probe(&self, keys: &[&str]) -> Result<Probe> {
        let mut admission = self.queue.admit(keys);
        loop {
            let waiting = match admission {
                Admission::Now(_slot) => return self.probe_now(keys).await,
                Admission::Later(waiting) => waiting,
            };
            match waiting.await {
                Ok(Turn::Done(result)) => return result,
                // Boxed: once per batch, and it keeps every read's future small.
                Ok(Turn::Lead(_slot)) => return Box::pin(self.probe_for_waiters(keys)).await,
                // The leader that carried these keys was cancelled: queue again.
                Err(_) => admission = self.queue.admit_again(keys),
            }
        }
    }

    async fn write(&self, writes: Vec<Write<'_>>) -> Result<u64> {
        let mut invocation = WRITE.prepare_invoke();
        invocation.arg(self.tier_names.len());
        for name in &self.tier_names {
            invocation.arg(name);
        }
        let keys = writes.iter().map(|w| w.key.to_owned()).collect();
        invocation
            .arg(&self.channel)
            .arg(self.announce(&Notice::Written(keys)));
        for write in &writes {
            if let Ok(header) = codec::header(&write.envelope) {
                let seen = Seen::new(&header.tags, write.tier);
                self.seen.update(write.key, |_| seen);
            }
            invocation
                .key(self.layout.entry(write.key))
                .arg(write.tier)
                .arg(write.ttl.as_millis() as u64)
                .arg(write.grace.as_millis() as u64)
                .arg(write.created_us.unwrap_or(0))
                .arg(&write.envelope[..]);
        }
        let now = self.connection.run_script("write", &invocation).await?;
        self.sync_clock(now);
        Ok(now)
    }

    async fn remove(&self, keys: &[&str]) -> Result<()> {
        let mut pipeline = ::redis::pipe();
        for key in keys {
            let entry = self.layout.entry(key);
            let mut names: Vec<String> = self
                .tier_names
                .iter()
                .map(|t| KeyLayout::tier_key(&entry, t))
                .collect();
            names.push(KeyLayout::tier_key(&entry, "#"));
            pipeline.del(names).ignore();
        }
        if !self.channel.is_empty() {
            let keys = keys.iter().map(|k| (*k).to_owned()).collect();
            pipeline
                .cmd("PUBLISH")
                .arg(&self.channel)
                .arg(self.announce(&Notice::Removed(keys)))
                .ignore();
        }
        self.connection.pipeline("remove", &pipeline).await
    }

    async fn remove_if_unchanged(&self, key: &str, tier: usize, envelope: &[u8]) -> Result<()> {
        let Some(tier) = self.tier_names.get(tier) else {
            return Ok(());
        };
        let mut invocation = REMOVE_IF_UNCHANGED.prepare_invoke();
        invocation
            .key(KeyLayout::tier_key(&self.layout.entry(key), tier))
            .arg(envelope);
        let _: i64 = self
            .connection
            .run_script("remove corrupt entry", &invocation)
            .await?;
        Ok(())
    }

    async fn stamp_tags(&self, tags: &[&str]) -> Result<u64> {
        let mut invocation = STAMP.prepare_invoke();
        for tag in tags {
            invocation.key(format!("{}{tag}", self.tag_prefix));
        }
        let tag_list = tags.iter().map(|t| (*t).to_owned()).collect();
        invocation
            .arg(self.stamp_retention_ms)
            .arg(&self.channel)
            .arg(self.announce(&Notice::TagsInvalidated(tag_list)));
        let now = self
            .connection
            .run_script("invalidate tags", &invocation)
            .await?;
        self.sync_clock(now);
        for tag in tags {
            self.recent.put_tag(tag, now);
        }
        Ok(now)
    }

    async fn try_lock(&self, key: &str, token: u128, lease: Duration) -> Result<bool> {
        let mut set = ::redis::cmd("SET");
        set.arg(KeyLayout::tier_key(&self.layout.entry(key), "#lock"))
            .arg(format!("{token:032x}"))
            .arg("NX")
            .arg("PX")
            .arg(lease.as_millis().max(1) as u64);
        let reply: Value = self.connection.query("lock", &set).await?;
        Ok(matches!(reply, Value::Okay) || matches!(&reply, Value::SimpleString(s) if s == "OK"))
    }

    async fn extend_lock(&self, key: &str, token: u128, lease: Duration) -> Result<bool> {
        let mut invocation = EXTEND_LOCK.prepare_invoke();
        invocation
            .key(KeyLayout::tier_key(&self.layout.entry(key), "#lock"))
            .arg(format!("{token:032x}"))
            .arg(lease.as_millis().max(1) as u64);
        let extended: i64 = self
            .connection
            .run_script("extend lock", &invocation)
            .await?;
        Ok(extended == 1)
    }

    async fn unlock(&self, key: &str, token: u128) -> Result<()> {
        let mut invocation = REMOVE_IF_UNCHANGED.prepare_invoke();
        invocation
            .key(KeyLayout::tier_key(&self.layout.entry(key), "#lock"))
            .arg(format!("{token:032x}"));
        let _: i64 = self.connection.run_script("unlock", &invocation).await?;
        Ok(())
    }

    async fn clear(&self) -> Result<u64> {
        let mut invocation = STAMP.prepare_invoke();
        invocation
            .key(&self.clear_key)
            .arg(self.stamp_retention_ms)
            .arg(&self.channel)
            .arg(self.announce(&Notice::Cleared));
        let now = self.connection.run_script("clear", &invocation).await?;
        self.sync_clock(now);
        self.recent.put_clear(now);
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every read boxes its probe future (see ARCHITECTURE.md): at most 1,032 bytes, glibc
    /// serves it from a per-thread cache instead of its locked arenas.
    #[cfg(target_pointer_width = "64")]
    #[tokio::test]
    async fn a_probe_future_fits_the_glibc_thread_cache() {
        // Lazy: nothing connects, and the future is never polled.
        let config = crate::redis::RedisConfig::new("redis://127.0.0.1:1");
        let connection = RedisConnection::lazy(&config).unwrap();
        let tiers = RedisTiers::new(connection, &TieredConfig::named("size"));
        let probe = tiers.probe(&["k"]);
        let size = std::mem::size_of_val(&*probe);
        assert!(size <= 1032, "a probe future is {size} bytes");
    }

    #[test]
    fn parses_hits_misses_and_stamps() {
        let reply = Value::Array(vec![
            Value::Int(1_000),
            Value::Int(5),
            Value::Int(0),
            Value::Array(vec![
                Value::Int(2),
                Value::BulkString(b"env".to_vec()),
                Value::Int(1),
                Value::Int(0),
                Value::Int(900),
                Value::Int(0),
            ]),
        ]);
        let mut probe = Probe::default();
        parse_probe(reply, 2, 3, &mut probe).unwrap();
        assert_eq!((probe.now_us, probe.clear_us), (1_000, 5));
        assert_eq!(probe.found[0], None);
        let found = probe.found[1].as_ref().unwrap();
        assert_eq!(
            (found.tier, found.promoted, found.demoted),
            (2, true, false)
        );
        assert_eq!(found.tag_stamps, [900, 0]);
    }

    #[test]
    fn refuses_replies_of_the_wrong_shape() {
        let mut probe = Probe::default();
        assert!(parse_probe(Value::Nil, 1, 3, &mut probe).is_err());
        let short = Value::Array(vec![Value::Int(1)]);
        assert!(parse_probe(short, 1, 3, &mut probe).is_err());
        let bad_tier = Value::Array(vec![
            Value::Int(1),
            Value::Int(0),
            Value::Array(vec![Value::Int(7), Value::BulkString(vec![])]),
        ]);
        assert!(parse_probe(bad_tier, 1, 3, &mut probe).is_err());
    }
}
