//! Pooled Postgres access: a bb8 pool of tokio-postgres connections with the report's settings,
//! a bounded per-connection statement cache, query timing with a slow-query log, and a
//! `status()` for health endpoints.
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # async fn run() -> pupkit::Result<()> {
//! use pupkit::repo::{PgConfig, PgPool};
//!
//! let pool = PgPool::connect(&PgConfig::from_env()).await?;
//! let row = pool.query_one("SELECT $1::int4 + 1", &[&41i32]).await?;
//! assert_eq!(row.get::<_, i32>(0), 42);
//! println!("{:?}", pool.status());
//! # Ok(())
//! # }
//! ```

mod config;
#[cfg(feature = "postgres")]
mod pooled;
#[cfg(feature = "postgres")]
mod postgres;
mod status;

pub use config::PgConfig;
#[cfg(feature = "postgres")]
pub use pooled::{CachedRepo, PooledRepo, TxWork};
#[cfg(feature = "postgres")]
pub use postgres::{Isolation, PgConnectionGuard, PgPool, Tx, TxOptions, UnitOfWork};
pub use status::{PoolStatus, SlowQuery};
