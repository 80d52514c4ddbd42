//! The health report: every component's `stats()` in one JSON document, with a status each.

use std::fmt;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;

use super::monitor::{Monitor, RequestSummary};
use crate::cache::CacheStats;
use crate::cost::CostMeter;
use crate::embed::EmbeddingBatcher;
use crate::resilience::{BreakerState, BreakerStats, CircuitBreaker};

/// How a component (or the host) is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Working as configured.
    Ok,
    /// Working, but slower or with less protection than configured (a breaker open, a pool
    /// saturated, a fallback in use).
    Degraded,
    /// Not answering.
    Down,
}

/// One component's figures and status.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ComponentHealth {
    /// The name it was registered under.
    pub name: String,
    /// What it is: `cache`, `pool`, `breaker`, `batcher`, `queue`, `worker`, `cost`, or a
    /// host's own.
    pub kind: String,
    /// Its status.
    pub status: Status,
    /// Why it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its `stats()` snapshot, as JSON.
    pub stats: Value,
}

impl ComponentHealth {
    /// A component in `status` with its stats.
    pub fn new(
        name: impl Into<String>,
        kind: impl Into<String>,
        status: Status,
        stats: Value,
    ) -> Self {
        ComponentHealth {
            name: name.into(),
            kind: kind.into(),
            status,
            reason: None,
            stats,
        }
    }

    /// The same, with the reason it is not ok.
    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

/// What `GET /api/health` returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The worst status of any component.
    pub status: Status,
    /// When it was gathered.
    pub at: Timestamp,
    /// Requests over the monitor's window, when a monitor is attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<RequestSummary>,
    /// Every component, in the order they were added.
    pub components: Vec<ComponentHealth>,
}

type Check = Box<dyn Fn() -> BoxFuture<'static, ComponentHealth> + Send + Sync>;

/// The components a host registers for its health report.
///
/// ```
/// # async fn run() -> pupkit::Result<()> {
/// use std::sync::Arc;
/// use pupkit::cache::{Tiered, TieredConfig};
/// use pupkit::health::{Health, Status};
///
/// let cache: Arc<Tiered<String>> = Arc::new(
///     Tiered::builder(TieredConfig::named("messages")).memory_tiers(1 << 20).build()?,
/// );
/// let health = Health::new().cache({
///     let cache = cache.clone();
///     move || cache.stats()
/// });
/// let report = health.report().await;
/// assert_eq!(report.status, Status::Ok);
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
pub struct Health {
    checks: Vec<Check>,
    monitor: Option<Arc<Monitor>>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("components", &self.checks.len())
            .finish_non_exhaustive()
    }
}

fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// A breaker's state as a status: open is degraded (calls are skipped), half-open is
/// degraded (being probed).
fn breaker_status(stats: &BreakerStats) -> (Status, Option<String>) {
    match stats.state {
        BreakerState::Closed => (Status::Ok, None),
        BreakerState::Open => (
            Status::Degraded,
            Some(format!("circuit breaker {:?} is open", stats.name)),
        ),
        BreakerState::HalfOpen => (
            Status::Degraded,
            Some(format!("circuit breaker {:?} is probing", stats.name)),
        ),
    }
}

impl Health {
    /// No components yet.
    pub fn new() -> Self {
        Health::default()
    }

    /// Adds a check of the host's own.
    pub fn check<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ComponentHealth> + Send + 'static,
    {
        self.checks.push(Box::new(move || Box::pin(check())));
        self
    }

    /// Adds a cache, by its `stats()`: degraded while its shared tiers fail (reads fall back
    /// to L0 and the loader).
    pub fn cache(self, stats: impl Fn() -> CacheStats + Send + Sync + 'static) -> Self {
        let stats = Arc::new(stats);
        self.check(move || {
            let stats = stats();
            let mut status = Status::Ok;
            let mut reason = None;
            if let Some(breaker) = &stats.breaker {
                (status, reason) = breaker_status(breaker);
            }
            if stats.backend_failing {
                status = Status::Degraded;
                reason = Some(
                    "its shared tiers are failing; reads fall back to L0 and the loader".to_owned(),
                );
            }
            let mut health =
                ComponentHealth::new(stats.name.clone(), "cache", status, to_json(&stats));
            health.reason = reason;
            std::future::ready(health)
        })
    }

    /// Adds a circuit breaker: degraded while open or probing.
    pub fn breaker(self, breaker: Arc<CircuitBreaker>) -> Self {
        self.check(move || {
            let stats = breaker.stats();
            let (status, reason) = breaker_status(&stats);
            let mut health =
                ComponentHealth::new(stats.name.clone(), "breaker", status, to_json(&stats));
            health.reason = reason;
            std::future::ready(health)
        })
    }

    /// Adds the shared Redis connection (its breaker).
    #[cfg(feature = "redis")]
    pub fn redis(self, connection: crate::redis::RedisConnection) -> Self {
        self.check(move || {
            let stats = connection.breaker();
            let (status, reason) = breaker_status(&stats);
            let mut health = ComponentHealth::new("redis", "breaker", status, to_json(&stats));
            health.reason = reason;
            std::future::ready(health)
        })
    }

    /// Adds a Postgres pool: degraded while callers wait for a connection (saturated).
    #[cfg(feature = "postgres")]
    pub fn pool(self, name: impl Into<String>, pool: crate::repo::PgPool) -> Self {
        let name = name.into();
        self.check(move || {
            let status = pool.status();
            let mut health =
                ComponentHealth::new(name.clone(), "pool", Status::Ok, to_json(&status));
            if status.waiters > 0 {
                health.status = Status::Degraded;
                health.reason = Some(format!(
                    "saturated: {} of {} connections in use and {} callers waiting",
                    status.in_use, status.max_size, status.waiters
                ));
            } else if status.size == 0 && status.max_size > 0 && status.broken_connections > 0 {
                health.status = Status::Down;
                health.reason = Some("no open connection, and connections have broken".to_owned());
            }
            std::future::ready(health)
        })
    }

    /// Adds an embedding batcher.
    pub fn batcher(self, name: impl Into<String>, batcher: Arc<dyn EmbeddingBatcher>) -> Self {
        let name = name.into();
        self.check(move || {
            let stats = batcher.stats();
            std::future::ready(ComponentHealth::new(
                name.clone(),
                "batcher",
                Status::Ok,
                to_json(&stats),
            ))
        })
    }

    /// Adds a job queue: down when its stats cannot be read from Redis.
    #[cfg(feature = "redis")]
    pub fn queue<T>(self, queue: crate::jobs::Queue<T>) -> Self
    where
        T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        self.check(move || {
            let queue = queue.clone();
            async move {
                let name = queue.name().to_owned();
                match queue.stats().await {
                    Ok(stats) => {
                        let mut health =
                            ComponentHealth::new(name, "queue", Status::Ok, to_json(&stats));
                        if stats.paused {
                            health.status = Status::Degraded;
                            health.reason = Some("paused".to_owned());
                        }
                        health
                    }
                    Err(error) => ComponentHealth::new(name, "queue", Status::Down, Value::Null)
                        .reason(error.to_string()),
                }
            }
        })
    }

    /// Adds a job worker (see `WorkerHandle::watch`).
    #[cfg(feature = "redis")]
    pub fn worker(self, worker: crate::jobs::WorkerWatch) -> Self {
        self.check(move || {
            let stats = worker.stats();
            std::future::ready(ComponentHealth::new(
                format!("{} worker", stats.queue),
                "worker",
                Status::Ok,
                to_json(&stats),
            ))
        })
    }

    /// Adds the cost meter, by its realtime figures: degraded when they cannot be read.
    pub fn cost(self, meter: Arc<dyn CostMeter>) -> Self {
        self.check(move || {
            let meter = meter.clone();
            async move {
                match meter.realtime().await {
                    Ok(realtime) => {
                        ComponentHealth::new("cost", "cost", Status::Ok, to_json(&realtime))
                    }
                    Err(error) => {
                        ComponentHealth::new("cost", "cost", Status::Degraded, Value::Null)
                            .reason(error.to_string())
                    }
                }
            }
        })
    }

    /// Puts the monitor's request figures (over its window) in the report.
    pub fn monitor(mut self, monitor: Arc<Monitor>) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// Gathers every component's figures, concurrently.
    pub async fn report(&self) -> HealthReport {
        let components =
            futures_util::future::join_all(self.checks.iter().map(|check| check())).await;
        let status = components
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok);
        HealthReport {
            status,
            at: Timestamp::now(),
            requests: self
                .monitor
                .as_ref()
                .map(|m| m.requests_over(m.config().window)),
            components,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::BreakerConfig;

    #[tokio::test]
    async fn the_worst_component_sets_the_status() {
        let breaker = Arc::new(CircuitBreaker::new(
            "embedding-api",
            BreakerConfig::default(),
        ));
        let health = Health::new()
            .breaker(breaker.clone())
            .check(|| async { ComponentHealth::new("disk", "custom", Status::Ok, Value::Null) });
        let report = health.report().await;
        assert_eq!(report.status, Status::Ok);
        assert_eq!(report.components.len(), 2);
        assert_eq!(report.components[0].kind, "breaker");
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.contains(r#""status":"ok""#), "{text}");

        let health = health.check(|| async {
            ComponentHealth::new("queue", "queue", Status::Down, Value::Null).reason("redis down")
        });
        let report = health.report().await;
        assert_eq!(report.status, Status::Down);
        assert_eq!(report.components[2].reason.as_deref(), Some("redis down"));
    }
}
