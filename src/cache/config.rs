//! Configuration of a [`Tiered`](super::Tiered) cache and of single entries.

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::keys::check_name;
use crate::codec::{EncodeOptions, Format, MAX_TAG_LEN, MAX_TAGS};
use crate::error::{Error, Result};

/// Configuration of one named tiered cache. Plain data: build one with `Default` and change
/// fields, or deserialize it (durations as milliseconds or strings like `"5m"`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TieredConfig {
    /// Name of the cache; part of every Redis key. Default `"default"`.
    pub name: String,
    /// First segment of every Redis key, including the key-schema version. Default
    /// `"pupkit1"`. Tests give each run its own prefix.
    pub key_prefix: String,
    /// The in-process L0 tier.
    pub l0: L0Config,
    /// The shared tiers behind L0, hottest first. Default hot 5 min, warm 1 h, cold 24 h.
    pub tiers: Vec<TierConfig>,
    /// Home tier of entries whose options name none. Default `"warm"`.
    pub default_tier: String,
    /// When a frequently read entry is copied to the hottest tier.
    pub promotion: PromotionConfig,
    /// The cross-instance load lock of `get_or_load`.
    pub lock: LockConfig,
    /// Serving a stale value when the loader fails or is slow.
    pub fail_safe: FailSafeConfig,
    /// Eager refresh: a `get_or_load` that finds a value past this fraction of its TTL serves
    /// it and refreshes it in the background, once per key across instances (the load lock,
    /// without waiting). From 0 (off, the default) to below 1; 0.8 is a common choice.
    pub eager_refresh: f64,
    /// Whether instances tell each other, over a Redis pub/sub channel of this cache's own,
    /// which keys and tags they changed, so that other instances drop them from L0. Default
    /// true.
    pub backplane: bool,
    /// How long an instance trusts the tag and clear timestamps it has fetched from the shared
    /// tiers before fetching them again (its own invalidations it knows at once). Another
    /// instance's `invalidate_tags` or `clear` may go unseen on this instance's shared-tier
    /// reads for up to this long; zero fetches them on every read. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub stamp_ttl: Duration,
    /// Most probes of the Redis tiers this cache has out at once. Reads beyond wait for one to
    /// come back and then go out together as one probe of up to 1,000 keys (one `MGET` when
    /// every key was read before). A read made while fewer than the current limit are out
    /// goes at once. The limit starts here; when 16 or more reads queue behind one batch,
    /// reads come faster than round trips return, and the cache lowers it to two, or keeps
    /// this maximum if lower (Redis answers one batch while this process handles the other's
    /// reply, and the next forms); each smaller batch doubles it back towards this maximum. A waiting read can take longer than one `op_timeout`: its wait for a
    /// turn, then its batch's. 0 sends every read at once, never batching. Default 32.
    pub max_probes_in_flight: usize,
    /// Longest TTL an entry may ask for; tag and clear timestamps are kept this long so that
    /// they outlive every entry they invalidate. Default 7 days.
    #[serde(with = "crate::serde_duration")]
    pub max_ttl: Duration,
    /// Longest key, in bytes. Default 512.
    pub max_key_bytes: usize,
    /// Longest tag, in bytes (at most 255). Default 128.
    pub max_tag_bytes: usize,
    /// Most tags per entry or per `invalidate_tags` call (at most 255). Default 16.
    pub max_tags: usize,
    /// Largest encoded value, in bytes; larger values are refused. Default 4 MiB.
    pub max_value_bytes: usize,
    /// Payloads of at least this many bytes are lz4-compressed when that shrinks them.
    /// Default 1024 (the report's 1 KB).
    pub compress_threshold: usize,
    /// Serde format of payloads. Default postcard, the fastest and smallest measured (see
    /// [`Format`] for what that asks of `V`).
    pub format: Format,
}

impl Default for TieredConfig {
    fn default() -> Self {
        TieredConfig {
            name: "default".to_owned(),
            key_prefix: "pupkit1".to_owned(),
            l0: L0Config::default(),
            tiers: vec![
                TierConfig::new("hot", Duration::from_secs(5 * 60)),
                TierConfig::new("warm", Duration::from_secs(60 * 60)),
                TierConfig::new("cold", Duration::from_secs(24 * 60 * 60)),
            ],
            default_tier: "warm".to_owned(),
            promotion: PromotionConfig::default(),
            lock: LockConfig::default(),
            fail_safe: FailSafeConfig::default(),
            eager_refresh: 0.0,
            backplane: true,
            stamp_ttl: Duration::from_secs(1),
            max_probes_in_flight: 32,
            max_ttl: Duration::from_secs(7 * 24 * 60 * 60),
            max_key_bytes: 512,
            max_tag_bytes: 128,
            max_tags: 16,
            max_value_bytes: 4 << 20,
            compress_threshold: 1024,
            format: Format::Postcard,
        }
    }
}

impl TieredConfig {
    /// The default configuration under another cache name.
    pub fn named(name: impl Into<String>) -> Self {
        TieredConfig {
            name: name.into(),
            ..TieredConfig::default()
        }
    }

    /// Checks every field, saying which one is wrong and why.
    pub fn validate(&self) -> Result<()> {
        check_name("cache name", &self.name)?;
        check_name("key prefix", &self.key_prefix)?;
        if self.tiers.is_empty() {
            return Err(Error::invalid(
                "tiers",
                "at least one shared tier is needed",
            ));
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            check_name("tier name", &tier.name)?;
            if self.tiers[..i].iter().any(|t| t.name == tier.name) {
                return Err(Error::invalid(
                    "tiers",
                    format!("tier {:?} is listed twice", tier.name),
                ));
            }
            if tier.ttl.is_zero() || tier.ttl > self.max_ttl {
                return Err(Error::invalid(
                    "tier ttl",
                    format!(
                        "tier {:?} has ttl {:?}; it must be above zero and at most max_ttl {:?}",
                        tier.name, tier.ttl, self.max_ttl
                    ),
                ));
            }
        }
        self.tier_index(&self.default_tier)?;
        if self.l0.enabled && (self.l0.ttl.is_zero() || self.l0.max_bytes == 0) {
            return Err(Error::invalid(
                "l0",
                "an enabled L0 needs a ttl and max_bytes above zero",
            ));
        }
        if self.max_tag_bytes == 0 || self.max_tag_bytes > MAX_TAG_LEN {
            return Err(Error::invalid(
                "max_tag_bytes",
                format!("{} is outside 1..={MAX_TAG_LEN}", self.max_tag_bytes),
            ));
        }
        if self.max_tags > MAX_TAGS {
            return Err(Error::invalid(
                "max_tags",
                format!(
                    "{} is over the envelope's limit of {MAX_TAGS}",
                    self.max_tags
                ),
            ));
        }
        if self.max_key_bytes == 0 || self.max_value_bytes == 0 || self.max_ttl.is_zero() {
            return Err(Error::invalid(
                "limits",
                "max_key_bytes, max_value_bytes and max_ttl must be above zero",
            ));
        }
        if !(0.0..1.0).contains(&self.eager_refresh) {
            return Err(Error::invalid(
                "eager_refresh",
                format!("{} is outside 0 (off) to below 1", self.eager_refresh),
            ));
        }
        if !self.fail_safe.grace.is_zero() && self.fail_safe.retry_after.is_zero() {
            return Err(Error::invalid(
                "fail_safe",
                "retry_after must be above zero when grace is",
            ));
        }
        if self.lock.enabled && (self.lock.lease.is_zero() || self.lock.poll_min.is_zero()) {
            return Err(Error::invalid(
                "lock",
                "an enabled lock needs a lease and poll_min above zero",
            ));
        }
        if self.promotion.reads > 0 && self.promotion.window.is_zero() {
            return Err(Error::invalid(
                "promotion",
                "a promotion window must be above zero",
            ));
        }
        Ok(())
    }

    /// The index of the tier called `name`.
    pub(crate) fn tier_index(&self, name: &str) -> Result<usize> {
        self.tiers
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.tiers.iter().map(|t| t.name.as_str()).collect();
                Error::invalid(
                    "tier",
                    format!(
                        "{:?} is not one of this cache's tiers {names:?}",
                        crate::error::excerpt(name)
                    ),
                )
            })
    }

    pub(crate) fn encode_options(&self) -> EncodeOptions {
        EncodeOptions {
            format: self.format,
            compress_threshold: self.compress_threshold,
            max_value_bytes: self.max_value_bytes,
        }
    }
}

/// The in-process L0 tier (moka), holding decoded values.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct L0Config {
    /// Whether L0 is used at all. Default true.
    pub enabled: bool,
    /// Longest time an entry stays in L0; never longer than the entry's remaining TTL in the
    /// tier it came from. Default 5 min (the report's).
    #[serde(with = "crate::serde_duration")]
    pub ttl: Duration,
    /// Bound on L0's size: the sum of the entries' encoded sizes plus their keys. Default 64 MiB.
    pub max_bytes: u64,
}

impl Default for L0Config {
    fn default() -> Self {
        L0Config {
            enabled: true,
            ttl: Duration::from_secs(5 * 60),
            max_bytes: 64 << 20,
        }
    }
}

/// One shared tier: a name (part of its Redis keys) and the default TTL of entries whose home
/// it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TierConfig {
    /// Name, such as `"hot"`.
    pub name: String,
    /// Default TTL of entries written to this tier, and the longest a promoted copy lives here.
    #[serde(with = "crate::serde_duration")]
    pub ttl: Duration,
}

impl TierConfig {
    /// A tier called `name` with default TTL `ttl`.
    pub fn new(name: impl Into<String>, ttl: Duration) -> Self {
        TierConfig {
            name: name.into(),
            ttl,
        }
    }
}

/// Promotion: an entry read from a lower shared tier at least `reads` times within `window`
/// (counted in the store, across all instances) is copied to the hottest tier, for at most that
/// tier's TTL and never past its own expiry.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PromotionConfig {
    /// Reads within the window that promote an entry; 0 turns promotion off. Default 3.
    pub reads: u32,
    /// The counting window. Default 60 s.
    #[serde(with = "crate::serde_duration")]
    pub window: Duration,
}

impl Default for PromotionConfig {
    fn default() -> Self {
        PromotionConfig {
            reads: 3,
            window: Duration::from_secs(60),
        }
    }
}

/// The cross-instance load lock: when several instances miss the same key, one loads and the
/// others wait for the shared tiers to fill. It saves loader calls; it is not a guarantee
/// (a lease can run out under a slow loader), so loaders must stay safe to run twice.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct LockConfig {
    /// Whether `get_or_load` takes the lock (each call can opt out). Default true.
    pub enabled: bool,
    /// The lock's lease; the holder extends it every third of it while its loader runs.
    /// Default 10 s.
    #[serde(with = "crate::serde_duration")]
    pub lease: Duration,
    /// Longest a caller waits for another instance's load before loading itself. Default 5 s.
    #[serde(with = "crate::serde_duration")]
    pub wait: Duration,
    /// First pause between a waiter's polls of the shared tiers; it doubles up to
    /// `poll_max`. Default 5 ms.
    #[serde(with = "crate::serde_duration")]
    pub poll_min: Duration,
    /// Longest pause between polls. Default 100 ms.
    #[serde(with = "crate::serde_duration")]
    pub poll_max: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            enabled: true,
            lease: Duration::from_secs(10),
            wait: Duration::from_secs(5),
            poll_min: Duration::from_millis(5),
            poll_max: Duration::from_millis(100),
        }
    }
}

/// Fail-safe: an entry is kept for `grace` past its TTL (its logical expiry). When its loader
/// then fails, times out (`hard_timeout`) or is slow (`soft_timeout`), `get_or_load` serves
/// the stale value, flagged as such, instead of an error or a wait. Off while `grace` is zero.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct FailSafeConfig {
    /// How long past its TTL an entry is kept as a fallback. Default zero (fail-safe off).
    #[serde(with = "crate::serde_duration")]
    pub grace: Duration,
    /// After a failed load served a stale value, the value counts as fresh again for this long,
    /// so the loader is retried then, not on every call. Default 30 s.
    #[serde(with = "crate::serde_duration")]
    pub retry_after: Duration,
    /// A caller that holds a stale value waits this long for a load, then gets the stale
    /// value while the load goes on in the background. Default none (wait for the load).
    #[serde(default, with = "crate::serde_duration::option")]
    pub soft_timeout: Option<Duration>,
    /// A load that takes longer than this is abandoned: a stale value is served if there is
    /// one, else the call fails. Default none.
    #[serde(default, with = "crate::serde_duration::option")]
    pub hard_timeout: Option<Duration>,
}

impl Default for FailSafeConfig {
    fn default() -> Self {
        FailSafeConfig {
            grace: Duration::ZERO,
            retry_after: Duration::from_secs(30),
            soft_timeout: None,
            hard_timeout: None,
        }
    }
}

/// Options of one write: TTL, home tier and tags. Unset fields take the cache's defaults.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct EntryOptions {
    /// Time to live; default the home tier's TTL. At most the cache's `max_ttl`.
    pub ttl: Option<Duration>,
    /// Home tier by name; default the cache's `default_tier`.
    pub tier: Option<Cow<'static, str>>,
    /// Tags, for [`invalidate_tags`](super::TieredCache::invalidate_tags).
    pub tags: Vec<String>,
    /// `get_or_load` skips the cross-instance load lock. Default false.
    pub skip_lock: bool,
}

impl EntryOptions {
    /// Options that take every default.
    pub fn new() -> Self {
        EntryOptions::default()
    }

    /// Sets the time to live.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the home tier by name (`"hot"`, `"warm"`, `"cold"` by default).
    pub fn tier(mut self, tier: impl Into<Cow<'static, str>>) -> Self {
        self.tier = Some(tier.into());
        self
    }

    /// Skips the cross-instance load lock for this call.
    pub fn without_lock(mut self) -> Self {
        self.skip_lock = true;
        self
    }

    /// Adds tags.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reports_numbers_and_valid() {
        let c = TieredConfig::default();
        c.validate().unwrap();
        assert_eq!(c.l0.ttl, Duration::from_secs(300));
        let ttls: Vec<u64> = c.tiers.iter().map(|t| t.ttl.as_secs()).collect();
        assert_eq!(ttls, [300, 3600, 86_400]);
        assert_eq!(c.compress_threshold, 1024);
    }

    #[test]
    fn deserializes_with_durations_as_strings_or_milliseconds() {
        let c: TieredConfig = serde_json::from_str(
            r#"{"name":"profiles","l0":{"ttl":"30s"},"tiers":[{"name":"hot","ttl":60000},{"name":"cold","ttl":"1d"}],"default_tier":"cold"}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.l0.ttl, Duration::from_secs(30));
        assert!(c.l0.enabled);
        assert_eq!(c.tiers[0].ttl, Duration::from_secs(60));
        assert_eq!(c.tiers[1].ttl, Duration::from_secs(86_400));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut c = TieredConfig::named("bad name");
        assert!(c.validate().unwrap_err().to_string().contains("cache name"));
        c = TieredConfig::default();
        c.default_tier = "lukewarm".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.contains("\"lukewarm\" is not one of this cache's tiers"),
            "{err}"
        );
        c = TieredConfig::default();
        c.tiers.push(TierConfig::new("hot", Duration::from_secs(1)));
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
        c = TieredConfig::default();
        c.max_tag_bytes = 300;
        assert!(c.validate().is_err());
    }
}
