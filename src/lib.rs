//! # pupkit
//!
//! The performance layer of an AI-backed service, as a library: components a host wires into
//! its own server, each measured against the raw crates it is built on.
//!
//! | module | what it gives |
//! |---|---|
//! | [`cache`] | [`TieredCache`](cache::TieredCache): an in-process L0 (moka) in front of Redis hot/warm/cold tiers, one round trip per read, tag invalidation by timestamp, lz4 compression, promotion of hot entries |
//! | [`compression`] | HTTP compression for the host's server: Accept-Encoding negotiation (RFC 9110), content-type and size policy, brotli/gzip encoders for bodies and streams, bounded request decompression; `CompressionLayer` for tower/axum (feature `axum`) |
//! | [`codec`] | the versioned envelope every cached value is stored in |
//! | [`embed`] | [`Batcher`](embed::Batcher): single-text embedding calls from many callers merged into API calls (size, window, token budget), deduplicated three ways, cached, each caller's share of the cost recorded; [`Embedder`](embed::Embedder) with a local deterministic embedder and `OpenAiEmbedder` (feature `openai`) |
//! | [`health`] | [`Health`](health::Health): every component's stats in one report for `GET /api/health`; [`Monitor`](health::Monitor): per-second request, cache and cost figures, the report's alert rules, a live dashboard (routes and request layer with feature `axum`) |
//! | [`jobs`] | background jobs on Redis: priorities, delays, dedup, retries and dead letters, a rate limit and a concurrency cap across every process, leases with fencing tokens, workers that scale on the backlog and shut down without losing a job (feature `redis`) |
//! | [`cost`] | [`Meter`](cost::Meter): usage priced from a dated price table into an idempotent ledger, budgets per user, service and globally with hard enforcement by reservation, alerts, anomalies, projections, reports, CSV, HTTP routes |
//! | `redis` | [`RedisConnection`](crate::redis::RedisConnection): one shared multiplexed connection with a deadline on every operation and a circuit breaker (feature `redis`) |
//! | [`repo`] | [`PgPool`](repo::PgPool): pooled Postgres (bb8 + tokio-postgres) with a statement cache, slow-query log, transactions with retries, a read replica; [`CachedRepo`](repo::CachedRepo) over the tiered cache (feature `postgres`) |
//! | [`resilience`] | [`CircuitBreaker`](resilience::CircuitBreaker), shared by every backend |
//!
//! ## Quick start
//!
//! ```
//! use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pupkit::Result<()> {
//! // L0 plus in-process hot/warm/cold tiers: no services needed.
//! let cache: Tiered<Vec<f32>> = Tiered::builder(TieredConfig::named("embeddings"))
//!     .memory_tiers(64 << 20)
//!     .build()?;
//! let vector = cache
//!     .get_or_load("hello world", &EntryOptions::new().tier("cold"), || async {
//!         Ok::<_, std::io::Error>(vec![0.1, 0.2, 0.3])
//!     })
//!     .await?;
//! assert_eq!(vector.len(), 3);
//! # Ok(())
//! # }
//! ```
//!
//! With the `redis` feature, the same cache runs on Redis:
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> pupkit::Result<()> {
//! use pupkit::cache::{Tiered, TieredConfig};
//! use pupkit::redis::{RedisConfig, RedisConnection};
//!
//! let redis = RedisConnection::lazy(&RedisConfig::from_env())?;
//! let cache: Tiered<String> = Tiered::builder(TieredConfig::named("messages")).redis(redis).build()?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Features
//!
//! | feature | enables |
//! |---|---|
//! | `redis` | Redis shared tiers ([`cache::RedisTiers`]), [`redis::RedisConnection`], `cost::RedisSpendStore`, `jobs::Queue` and `jobs::Worker` |
//! | `postgres` | [`repo::PgPool`], [`repo::PooledRepo`], [`repo::CachedRepo`], `cost::PgLedger` |
//! | `axum` | `cost::CostRoutes`: the cost endpoints as an axum `Router`; `compression::CompressionLayer` |
//! | `openai` | `embed::OpenAiEmbedder`: the OpenAI embeddings API or a compatible server (reqwest with rustls) |
//! | `webhook` | `cost::WebhookSink`: HMAC-signed alert webhooks (reqwest with rustls) |
//! | `full` | every backend |
//!
//! Traits and configuration types compile without any feature. The MSRV is 1.88.
//!
//! ## Observability
//!
//! Counters go through the [`metrics`](https://docs.rs/metrics) facade (install your recorder
//! before building components: handles are registered at build time) and log events through
//! [`tracing`](https://docs.rs/tracing). Every component also has a `stats()` snapshot.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cache;
pub mod codec;
pub mod compression;
pub mod cost;
pub mod embed;
mod error;
pub mod health;
mod hex;
pub mod jobs;
mod random;
#[cfg_attr(
    not(any(
        feature = "redis",
        feature = "postgres",
        feature = "webhook",
        feature = "openai"
    )),
    allow(dead_code)
)]
mod redact;
#[cfg(feature = "redis")]
pub mod redis;
pub mod repo;
pub mod resilience;
mod serde_duration;
mod tally;

pub use error::{BoxError, Error, Result};

#[cfg(test)]
mod assertions {
    use std::sync::Arc;

    use crate::cache::{TierStore, Tiered, TieredCache};

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_sync_and_traits_dyn_compatible() {
        assert_send_sync::<Tiered<String>>();
        assert_send_sync::<crate::Error>();
        let _: Option<Arc<dyn TieredCache<String>>> = None;
        let _: Option<Arc<dyn TierStore>> = None;
    }
}
