//! The multi-tier cache: an in-process L0 (moka, decoded values) in front of shared tiers
//! (Redis hot/warm/cold), read in one round trip, invalidated by tag timestamps.
//!
//! ```
//! use std::time::Duration;
//! use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pupkit::Result<()> {
//! let cache: Tiered<String> = Tiered::builder(TieredConfig::named("profiles"))
//!     .memory_tiers(64 << 20)
//!     .build()?;
//! let options = EntryOptions::new().ttl(Duration::from_secs(600)).tags(["user:42"]);
//! let name = cache
//!     .get_or_load("user:42:name", &options, || async { Ok::<_, std::io::Error>("Ada".to_owned()) })
//!     .await?;
//! assert_eq!(*name, "Ada");
//! cache.invalidate_tags(&["user:42"]).await?;
//! assert!(cache.get("user:42:name").await?.is_none());
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "redis")]
mod backplane;
#[cfg(feature = "redis")]
mod coalesce;
mod config;
mod flight;
mod keys;
pub(crate) use keys::check_name;
mod l0;
mod lock;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod stats;
mod store;
mod tiered;

pub use config::{
    EntryOptions, FailSafeConfig, L0Config, LockConfig, PromotionConfig, TierConfig, TieredConfig,
};
pub use memory::MemoryTiers;
#[cfg(feature = "redis")]
pub use redis::RedisTiers;
pub use stats::{CacheStats, TierStats};
pub use store::{Found, Notice, NoticeHandler, Probe, TierStore, Write};
pub use tiered::{BoxFuture, CacheEntry, Loader, ManyLoader, Tiered, TieredBuilder, TieredCache};
