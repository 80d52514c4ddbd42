//! What a pool reports about itself, for health endpoints.

use std::time::Duration;

use serde::Serialize;

/// A snapshot of a pool.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct PoolStatus {
    /// Open connections.
    pub size: u32,
    /// Idle connections.
    pub idle: u32,
    /// Connections handed out.
    pub in_use: u32,
    /// The configured maximum.
    pub max_size: u32,
    /// Callers waiting for a connection now.
    pub waiters: u64,
    /// Checkouts that gave up after the checkout timeout.
    pub checkout_timeouts: u64,
    /// Connections dropped because they were broken or failed validation.
    pub broken_connections: u64,
    /// Queries slower than the slow-query threshold so far.
    pub slow_queries: u64,
    /// Transactions run again after a serialization failure or deadlock.
    pub transaction_retries: u64,
    /// Open connections to the read replica, if there is one.
    pub replica_size: Option<u32>,
    /// Callers have been waiting for longer than the saturation threshold.
    pub saturated: bool,
}

/// One entry of the slow-query log. Parameters are never kept.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SlowQuery {
    /// The statement text.
    pub statement: String,
    /// How long it took.
    pub elapsed: Duration,
    /// When it finished, in ms since the Unix epoch.
    pub at_ms: u64,
}
