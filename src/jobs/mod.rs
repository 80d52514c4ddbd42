//! Background jobs on Redis: named queues of typed jobs with priorities, delays, dedup,
//! retries with backoff and dead letters; a rate limit and a concurrency cap shared by every
//! process; leases with fencing tokens; and workers that claim in batches, scale on the
//! backlog and shut down without losing a job.
//!
//! Every state change is one atomic Lua script on Redis's clock (see the `scripts` table in
//! ARCHITECTURE.md). Delivery is at least once: a job whose worker crashed runs again after its
//! lease, so handlers should be idempotent (an embedding upserted by document and content
//! hash, a summary keyed by document and version). Fencing tokens make sure that a worker that
//! lost its lease cannot complete, fail or release the job.
//!
//! | piece | what it does |
//! |---|---|
//! | [`Queue`] | enqueue (one or many per round trip), pause, resume, `limit_for` a provider's 429, stats, dead letters (feature `redis`) |
//! | [`Worker`] | a handler per queue: batch claims, per-job tasks with a timeout, one heartbeat call per beat, batched settles, scaling, graceful shutdown (feature `redis`) |
//! | [`QueueConfig`], [`WorkerConfig`], [`EnqueueOptions`] | settings; they compile without features |
//!
//! ```no_run
//! # #[cfg(feature = "redis")]
//! # async fn run() -> pupkit::Result<()> {
//! use std::time::Duration;
//! use pupkit::jobs::{EnqueueOptions, Job, JobError, Queue, QueueConfig, RateLimit, Worker, WorkerConfig};
//! use pupkit::redis::{RedisConfig, RedisConnection};
//!
//! let redis = RedisConnection::connect(&RedisConfig::from_env()).await?;
//! let config = QueueConfig::named("summaries").rate_limit(RateLimit::per_minute(20));
//! let queue: Queue<u64> = Queue::open(redis, config).await?;
//! queue
//!     .enqueue(&42, &EnqueueOptions::new().dedup("summary:42", Duration::from_secs(600)))
//!     .await?;
//! let worker = Worker::new(queue, WorkerConfig::concurrency(5)).start(|job: Job<u64>| async move {
//!     println!("summarising conversation {}", job.data());
//!     Ok::<(), JobError>(())
//! })?;
//! worker.shutdown(Duration::from_secs(25)).await;
//! # Ok(())
//! # }
//! ```

// Without `redis`, the parts only the queue uses are unused.
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
mod config;
#[cfg(feature = "redis")]
mod queue;
#[cfg(feature = "redis")]
mod scripts;
mod stats;
#[cfg(feature = "redis")]
mod worker;

pub use config::{
    EnqueueOptions, MAX_ATTEMPTS, MAX_DEDUP_KEY_LEN, MAX_DELAY, MAX_USER_LEN, Priority,
    QueueConfig, RateLimit, Scaling, WorkerConfig,
};
#[cfg(feature = "redis")]
pub use queue::{DeadJob, ENQUEUE_CHUNK, ENQUEUE_CHUNK_BYTES, Enqueued, MAX_LIMIT, Queue};
pub use stats::{QueueStats, WorkerStats};
#[cfg(feature = "redis")]
pub use worker::{
    Handler, Job, JobError, JobEvent, JobOutcome, SYSTEM_USER, ShutdownReport, Worker,
    WorkerHandle, WorkerWatch,
};
