//! The Redis spend store: counters, reservations and alert claims shared by every host
//! process, each operation one atomic Lua call (feature `redis`).
//!
//! Every key of one meter shares the hash tag `{<prefix>:cost}`, so the scripts stay on one
//! slot of a Redis Cluster. Reservation expiry uses Redis's clock (`TIME`), never a host's.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use redis::{Script, Value};

use super::budget::Budget;
use super::store::{
    Booked, Booking, BudgetCheck, DEDUP_WINDOW, Increment, ReserveOutcome, SpendStore,
};
use crate::error::{Error, Result, excerpt};
use crate::redis::{RedisConnection, script};

/// Books one event. KEYS: the state marker, the request id's dedup key, the reservation's
/// pools, the counters to add to, the watched counters. ARGV: reservation id, dedup seconds,
/// pool count, increment count, group count, (amount, expire-at seconds) per increment, then
/// each group's size. Returns `{counted, held, fresh, sums...}`: `counted` is 0 when the
/// request id was booked already (nothing added); `fresh` means the marker was missing, so
/// Redis lost its state: nothing is added, and the meter rebuilds the counters from the
/// ledger, which already holds the event.
const BOOK_LUA: &str = r#"
local id = ARGV[1]
local pools, incs, groups = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now = 0
if pools > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local fresh = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], '1')
  fresh = 1
end
local held = 0
for p = 1, pools do
  local v = redis.call('HGET', KEYS[2 + p], id)
  if v then
    local exp = tonumber(string.match(v, ':(%d+)$'))
    if exp and exp > now then held = 1 end
    redis.call('HDEL', KEYS[2 + p], id)
  end
end
local counted = 0
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  counted = 1
end
-- After a loss of state the meter raises every counter to the ledger, which has this event.
local add = counted == 1 and fresh == 0
local a = 6
for i = 1, incs do
  if add then
    local key = KEYS[2 + pools + i]
    redis.call('INCRBY', key, ARGV[a])
    redis.call('EXPIREAT', key, ARGV[a + 1])
  end
  a = a + 2
end
local out = {counted, held, fresh}
local k = 3 + pools + incs
for g = 1, groups do
  local total = 0
  for j = 1, tonumber(ARGV[a]) do
    total = total + (tonumber(redis.call('GET', KEYS[k])) or 0)
    k = k + 1
  end
  a = a + 1
  out[3 + g] = total
end
return out
"#;

/// Sums of live reservations in a pool (a hash of id → "amount:expire-at ms"), dropping the
/// expired ones.
macro_rules! reserved_lua {
    () => {
        r#"
local function reserved(pool, now)
  local total = 0
  local entries = redis.call('HGETALL', pool)
  for i = 1, #entries, 2 do
    local amount, exp = string.match(entries[i + 1], '^(%-?%d+):(%d+)$')
    if (not exp) or tonumber(exp) <= now then
      redis.call('HDEL', pool, entries[i])
    else
      total = total + tonumber(amount)
    end
  end
  return total
end
local function sum(first, count)
  local total = 0
  for j = first, first + count - 1 do
    total = total + (tonumber(redis.call('GET', KEYS[j])) or 0)
  end
  return total
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#
    };
}

/// Reserves ARGV[2] micro-dollars under id ARGV[1] for ARGV[3] ms in every pool, if every
/// check fits. KEYS: the state marker, the pools, then each check's counters. ARGV[4]: check
/// count, then (limit, counter count) per check. Returns `{1}`, `{0, check index, spent,
/// reserved}`, or `{-1}` when the marker was missing (Redis lost its state: the meter
/// rebuilds the counters and tries again).
const RESERVE_LUA: &str = concat!(
    reserved_lua!(),
    r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], '1')
  return {-1}
end
local id, amount, ttl, checks = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local k = checks + 2
for c = 1, checks do
  local limit, count = tonumber(ARGV[3 + 2 * c]), tonumber(ARGV[4 + 2 * c])
  local spent = sum(k, count)
  k = k + count
  local held = reserved(KEYS[c + 1], now)
  if spent + held + amount > limit then
    return {0, c - 1, spent, held}
  end
end
local value = ARGV[2] .. ':' .. string.format('%.0f', now + ttl)
for c = 2, checks + 1 do
  redis.call('HSET', KEYS[c], id, value)
  if redis.call('PTTL', KEYS[c]) < ttl then redis.call('PEXPIRE', KEYS[c], ttl) end
end
return {1}
"#
);

/// Reads sums and live reservations. KEYS: every group's counters, then the pools. ARGV[1]:
/// group count, then each group's size. Returns the sums, then the reservations.
const READ_LUA: &str = concat!(
    reserved_lua!(),
    r#"
local groups = tonumber(ARGV[1])
local out = {}
local k = 1
for g = 1, groups do
  local count = tonumber(ARGV[1 + g])
  out[g] = sum(k, count)
  k = k + count
end
for p = k, #KEYS do
  out[#out + 1] = reserved(KEYS[p], now)
end
return out
"#
);

/// Drops reservation ARGV[1] from the pools KEYS; returns 1 when it was still held.
const RELEASE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = 0
for p = 1, #KEYS do
  local v = redis.call('HGET', KEYS[p], ARGV[1])
  if v then
    local exp = tonumber(string.match(v, ':(%d+)$'))
    if exp and exp > now then held = 1 end
    redis.call('HDEL', KEYS[p], ARGV[1])
  end
end
return held
"#;

/// Raises each counter KEYS[i] to at least ARGV[2i-1], expiring at ARGV[2i] (seconds).
const RAISE_LUA: &str = r#"
for i = 1, #KEYS do
  local amount = tonumber(ARGV[2 * i - 1])
  if amount > (tonumber(redis.call('GET', KEYS[i])) or 0) then
    redis.call('SET', KEYS[i], ARGV[2 * i - 1])
    redis.call('EXPIREAT', KEYS[i], ARGV[2 * i])
  end
end
return #KEYS
"#;

static BOOK: LazyLock<Script> = LazyLock::new(|| script(BOOK_LUA));
static RELEASE: LazyLock<Script> = LazyLock::new(|| script(RELEASE_LUA));
static RESERVE: LazyLock<Script> = LazyLock::new(|| script(RESERVE_LUA));
static READ: LazyLock<Script> = LazyLock::new(|| script(READ_LUA));
static RAISE: LazyLock<Script> = LazyLock::new(|| script(RAISE_LUA));

/// The longest key prefix.
const MAX_PREFIX: usize = 64;

/// Spend counters, reservations, alert claims and budgets in Redis, shared by every process
/// of a host. Each [`SpendStore`] call is one round trip.
///
/// ```no_run
/// # async fn run() -> pupkit::Result<()> {
/// use std::sync::Arc;
/// use pupkit::cost::{Meter, RedisSpendStore};
/// use pupkit::redis::{RedisConfig, RedisConnection};
///
/// let redis = RedisConnection::connect(&RedisConfig::from_env()).await?;
/// let meter = Meter::builder()
///     .spend_store(Arc::new(RedisSpendStore::new(redis, "myapp")?))
///     .build()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RedisSpendStore {
    connection: RedisConnection,
    /// `{<prefix>:cost}:`, the start of every key.
    keyspace: String,
}

impl RedisSpendStore {
    /// A store on `connection` whose keys start with `{<prefix>:cost}:`. The prefix is at most
    /// 64 bytes of `[A-Za-z0-9._:-]`.
    pub fn new(connection: RedisConnection, prefix: &str) -> Result<Self> {
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if !valid {
            return Err(Error::invalid(
                "key prefix",
                format!(
                    "{:?} must be 1 to {MAX_PREFIX} bytes of [A-Za-z0-9._:-]",
                    excerpt(prefix)
                ),
            ));
        }
        Ok(RedisSpendStore {
            connection,
            keyspace: format!("{{{prefix}:cost}}:"),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.keyspace)
    }

    /// The key that remembers a booked request id (escaped, so a caller's id cannot forge
    /// another key or a hash tag).
    fn dedup_key(&self, request_id: &str) -> String {
        self.key(&format!("req|{}", super::budget::escape_key(request_id)))
    }
}

fn budget_json(key: &str, budget: &Budget) -> Result<String> {
    serde_json::to_string(budget).map_err(|e| Error::Codec {
        action: "encode",
        key: key.to_owned(),
        source: Box::new(e),
    })
}

fn unexpected(operation: &'static str, reply: &impl std::fmt::Debug) -> Error {
    Error::Backend {
        backend: "redis",
        operation,
        source: format!("unexpected reply {reply:?}").into(),
    }
}

#[async_trait]
impl SpendStore for RedisSpendStore {
    async fn book(&self, booking: &Booking<'_>) -> Result<Booked> {
        let (id, pools) = booking.reservation.unwrap_or(("", &[]));
        let mut invocation = BOOK.prepare_invoke();
        invocation.key(self.key("epoch"));
        invocation.key(self.dedup_key(booking.request_id));
        for pool in pools {
            invocation.key(self.key(pool));
        }
        for increment in booking.increments {
            invocation.key(self.key(&increment.key));
        }
        for key in booking.watch.iter().flatten() {
            invocation.key(self.key(key));
        }
        invocation
            .arg(id)
            .arg(DEDUP_WINDOW.as_secs())
            .arg(pools.len())
            .arg(booking.increments.len())
            .arg(booking.watch.len());
        for increment in booking.increments {
            invocation
                .arg(increment.amount)
                .arg(increment.expires.as_second());
        }
        for group in booking.watch {
            invocation.arg(group.len());
        }
        let reply: Vec<i64> = self.connection.run_script("cost book", &invocation).await?;
        match reply.as_slice() {
            [counted, held, fresh, sums @ ..] if sums.len() == booking.watch.len() => Ok(Booked {
                counted: *counted == 1,
                held: *held == 1,
                sums: sums.to_vec(),
                fresh: *fresh == 1,
            }),
            _ => Err(unexpected("cost book", &reply)),
        }
    }

    async fn reserve(
        &self,
        id: &str,
        amount: i64,
        ttl: Duration,
        checks: &[BudgetCheck],
    ) -> Result<ReserveOutcome> {
        let mut invocation = RESERVE.prepare_invoke();
        invocation.key(self.key("epoch"));
        for check in checks {
            invocation.key(self.key(&check.pool));
        }
        for key in checks.iter().flat_map(|c| &c.counters) {
            invocation.key(self.key(key));
        }
        invocation
            .arg(id)
            .arg(amount)
            .arg(ttl.as_millis().clamp(1, i64::MAX as u128) as i64)
            .arg(checks.len());
        for check in checks {
            invocation.arg(check.limit).arg(check.counters.len());
        }
        let reply: Vec<i64> = self
            .connection
            .run_script("cost reserve", &invocation)
            .await?;
        match reply.as_slice() {
            [1] => Ok(ReserveOutcome::Granted),
            [-1] => Ok(ReserveOutcome::Rebuild),
            [0, check, spent, reserved] => Ok(ReserveOutcome::Denied {
                check: usize::try_from(*check).unwrap_or(0),
                spent: *spent,
                reserved: *reserved,
            }),
            _ => Err(unexpected("cost reserve", &reply)),
        }
    }

    async fn release(&self, id: &str, pools: &[String]) -> Result<bool> {
        let mut invocation = RELEASE.prepare_invoke();
        for pool in pools {
            invocation.key(self.key(pool));
        }
        invocation.arg(id);
        let held: i64 = self
            .connection
            .run_script("cost release", &invocation)
            .await?;
        Ok(held == 1)
    }

    async fn read(&self, groups: &[Vec<String>], pools: &[String]) -> Result<(Vec<i64>, Vec<i64>)> {
        let mut invocation = READ.prepare_invoke();
        for key in groups.iter().flatten() {
            invocation.key(self.key(key));
        }
        for pool in pools {
            invocation.key(self.key(pool));
        }
        invocation.arg(groups.len());
        for group in groups {
            invocation.arg(group.len());
        }
        let mut reply: Vec<i64> = self.connection.run_script("cost read", &invocation).await?;
        if reply.len() != groups.len() + pools.len() {
            return Err(unexpected("cost read", &reply));
        }
        let reserved = reply.split_off(groups.len());
        Ok((reply, reserved))
    }

    async fn raise(&self, values: &[Increment]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut invocation = RAISE.prepare_invoke();
        for value in values {
            invocation.key(self.key(&value.key));
            invocation.arg(value.amount).arg(value.expires.as_second());
        }
        let _: i64 = self
            .connection
            .run_script("cost raise", &invocation)
            .await?;
        Ok(())
    }

    async fn claim_alert(&self, key: &str, ttl: Duration) -> Result<bool> {
        let reply: Value = self
            .connection
            .query(
                "cost claim alert",
                redis::cmd("SET")
                    .arg(self.key(key))
                    .arg(Timestamp::now().as_second())
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().clamp(1, i64::MAX as u128) as i64),
            )
            .await?;
        Ok(matches!(reply, Value::Okay | Value::SimpleString(_)))
    }

    async fn save_budget(&self, key: &str, budget: &Budget) -> Result<()> {
        let json = budget_json(key, budget)?;
        let _: i64 = self
            .connection
            .query(
                "cost save budget",
                redis::cmd("HSET")
                    .arg(self.key("budgets"))
                    .arg(key)
                    .arg(json),
            )
            .await?;
        Ok(())
    }

    async fn restore_budget(&self, key: &str, budget: &Budget) -> Result<()> {
        let json = budget_json(key, budget)?;
        let _: i64 = self
            .connection
            .query(
                "cost restore budget",
                redis::cmd("HSETNX")
                    .arg(self.key("budgets"))
                    .arg(key)
                    .arg(json),
            )
            .await?;
        Ok(())
    }

    async fn budgets(&self) -> Result<Vec<Budget>> {
        let stored: Vec<(String, String)> = self
            .connection
            .query(
                "cost read budgets",
                redis::cmd("HGETALL").arg(self.key("budgets")),
            )
            .await?;
        Ok(stored
            .into_iter()
            .filter_map(|(key, json)| match serde_json::from_str(&json) {
                Ok(budget) => Some(budget),
                Err(error) => {
                    tracing::warn!(%error, key = %excerpt(&key), "skipping a stored budget that does not parse");
                    None
                }
            })
            .collect())
    }
}
