//! Snapshots of a queue (shared by every process, read from Redis) and of one worker.

use serde::{Deserialize, Serialize};

/// A queue's state and its counters since it was first used, across every process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct QueueStats {
    /// Waiting to start.
    pub pending: u64,
    /// Waiting out a delay or a retry backoff.
    pub delayed: u64,
    /// Running (leased to a worker).
    pub active: u64,
    /// Dead-lettered (kept up to the queue's `keep_dead`).
    pub dead: u64,
    /// Whether claims are paused.
    pub paused: bool,
    /// Jobs added (duplicates not counted).
    pub enqueued: u64,
    /// Enqueues that returned an existing job's id.
    pub deduplicated: u64,
    /// Jobs completed.
    pub completed: u64,
    /// Failed attempts (retried or dead-lettered).
    pub failed: u64,
    /// Failed attempts scheduled to run again.
    pub retried: u64,
    /// Jobs dead-lettered.
    pub dead_lettered: u64,
    /// Leases that ran out (the worker crashed, hung or lost Redis) and were taken back.
    pub stalled: u64,
    /// Jobs given back without spending an attempt (shutdown, provider rate limit).
    pub released: u64,
}

/// One worker's counters since it started, and its current concurrency.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The queue it works.
    pub queue: String,
    /// Slots it may fill now (moves between min and max when it scales).
    pub concurrency: u32,
    /// Jobs running now.
    pub running: u32,
    /// Jobs claimed.
    pub claimed: u64,
    /// Jobs completed.
    pub completed: u64,
    /// Attempts that failed and will run again.
    pub retried: u64,
    /// Jobs dead-lettered (last attempt failed, or a permanent failure).
    pub dead: u64,
    /// Handlers that panicked (each also counted as a failure).
    pub panicked: u64,
    /// Handlers cancelled by the job timeout (each also counted as a failure).
    pub timed_out: u64,
    /// Jobs whose lease was lost while running: cancelled, settled by whoever holds it now.
    pub lease_lost: u64,
    /// Jobs given back without spending an attempt.
    pub released: u64,
    /// Claim script calls.
    pub claim_calls: u64,
    /// Settle script calls (each settles a batch of finished jobs).
    pub settle_calls: u64,
    /// Heartbeat script calls (each renews every running job's lease).
    pub heartbeat_calls: u64,
    /// Redis operations that failed (each retried).
    pub redis_errors: u64,
    /// Mean time from enqueue to the start of an attempt (delays and retry backoffs
    /// included), in ms.
    pub mean_wait_ms: f64,
    /// Mean handler run time, in ms.
    pub mean_run_ms: f64,
    /// Longest handler run time, in ms.
    pub max_run_ms: f64,
}
