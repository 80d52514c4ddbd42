//! The settings of a queue, of one enqueue, and of a worker. They compile without any feature,
//! so a host can keep them in its own configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, excerpt};
use crate::resilience::Backoff;

/// The longest dedup key, in bytes.
pub const MAX_DEDUP_KEY_LEN: usize = 256;
/// The longest user id on a job, in bytes.
pub const MAX_USER_LEN: usize = 128;
/// The longest delay a job can be enqueued with: one year.
pub const MAX_DELAY: Duration = Duration::from_secs(366 * 86_400);
/// The most attempts a job can have.
pub const MAX_ATTEMPTS: u32 = 1_000;

/// Which jobs start first when there is a backlog. Within one priority, jobs start in the
/// order they were enqueued.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Before everything else.
    High,
    /// The default.
    #[default]
    Normal,
    /// Only when nothing of higher priority is waiting.
    Low,
}

impl Priority {
    /// The level stored in Redis: 0 is served first.
    pub(crate) fn level(self) -> u8 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub(crate) fn from_level(level: i64) -> Priority {
        match level {
            0 => Priority::High,
            2 => Priority::Low,
            _ => Priority::Normal,
        }
    }
}

/// How many jobs of a queue may start per period, across every process: a GCRA limiter
/// (a token bucket without a refill timer) that the claim script checks on Redis's clock.
///
/// In any span of time `t`, at most `burst + count * t / period` jobs start. A provider that
/// enforces a sliding window of `count` per `period` is respected with `burst` 1; a larger burst
/// lets a quiet queue start a few jobs at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RateLimit {
    /// Jobs per period.
    pub count: u32,
    /// The period.
    #[serde(with = "crate::serde_duration")]
    pub period: Duration,
    /// How many may start at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl RateLimit {
    /// `count` jobs per `period`, with a burst of 1.
    pub fn new(count: u32, period: Duration) -> Self {
        RateLimit {
            count,
            period,
            burst: 1,
        }
    }

    /// `count` jobs per second.
    pub fn per_second(count: u32) -> Self {
        RateLimit::new(count, Duration::from_secs(1))
    }

    /// `count` jobs per minute: the embeddings queue's 100, the summaries queue's 20, the
    /// profiles queue's 50.
    pub fn per_minute(count: u32) -> Self {
        RateLimit::new(count, Duration::from_secs(60))
    }

    /// The same limit with `burst`.
    pub fn burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// The time between two starts, in microseconds.
    pub(crate) fn interval_micros(&self) -> u64 {
        (self.period.as_micros() / u128::from(self.count.max(1))).max(1) as u64
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.count == 0 || self.period.is_zero() || self.burst == 0 {
            return Err(Error::invalid(
                "rate limit",
                format!(
                    "{} per {:?} with burst {}: count, period and burst must all be above zero",
                    self.count, self.period, self.burst
                ),
            ));
        }
        if self.period > Duration::from_secs(86_400) || self.burst > 100_000 {
            return Err(Error::invalid(
                "rate limit",
                format!(
                    "period {:?} and burst {} must be at most one day and 100000",
                    self.period, self.burst
                ),
            ));
        }
        Ok(())
    }
}

/// A queue: its name, its limits across every process, and its retry policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct QueueConfig {
    /// The queue's name: 1 to 64 characters out of `A-Z a-z 0-9 _ - .`.
    pub name: String,
    /// The first part of every Redis key of the queue. Default `pupkit`.
    pub prefix: String,
    /// The service a job's cost is booked to. Default: the queue's name.
    pub service: Option<String>,
    /// Starts per period, across every process. Default none.
    pub rate_limit: Option<RateLimit>,
    /// The most jobs running at once across every process. Default none (each worker's own
    /// concurrency is the only bound).
    pub global_concurrency: Option<u32>,
    /// How long a claimed job is leased to its worker. Workers renew the lease every third of
    /// it; a job whose worker stopped renewing is handed out again when it runs out. Default
    /// 30 s.
    #[serde(with = "crate::serde_duration")]
    pub lease: Duration,
    /// Attempts of a job, the first included, unless its enqueue says otherwise. Default 3.
    pub max_attempts: u32,
    /// The wait before a failed job runs again. Default 1 s doubling up to 5 min, half of it
    /// random.
    pub backoff: Backoff,
    /// How many dead-lettered jobs are kept (the oldest go first). Default 10,000.
    pub keep_dead: u32,
    /// The largest payload, in bytes of JSON. Default 1 MiB.
    pub max_payload_bytes: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: "default".to_owned(),
            prefix: "pupkit".to_owned(),
            service: None,
            rate_limit: None,
            global_concurrency: None,
            lease: Duration::from_secs(30),
            max_attempts: 3,
            backoff: Backoff::default(),
            keep_dead: 10_000,
            max_payload_bytes: 1 << 20,
        }
    }
}

impl QueueConfig {
    /// The defaults, for the queue `name`.
    pub fn named(name: impl Into<String>) -> Self {
        QueueConfig {
            name: name.into(),
            ..QueueConfig::default()
        }
    }

    /// The same config with a key prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same config with a rate limit across every process.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// The same config with a cap on running jobs across every process.
    pub fn global_concurrency(mut self, jobs: u32) -> Self {
        self.global_concurrency = Some(jobs);
        self
    }

    /// The same config with another lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The same config with another default for attempts.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// The same config with another retry backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The same config, booking costs to `service`.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// The service costs are booked to.
    pub fn service_name(&self) -> &str {
        self.service.as_deref().unwrap_or(&self.name)
    }

    /// Checks every field, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        crate::cache::check_name("queue name", &self.name)?;
        crate::cache::check_name("queue prefix", &self.prefix)?;
        if let Some(limit) = &self.rate_limit {
            limit.validate()?;
        }
        if self.global_concurrency == Some(0) {
            return Err(Error::invalid(
                "global concurrency",
                "0 would never start a job; leave it unset for no cap",
            ));
        }
        if self.lease < Duration::from_millis(100) || self.lease > Duration::from_secs(86_400) {
            return Err(Error::invalid(
                "lease",
                format!("{:?} must be between 100 ms and one day", self.lease),
            ));
        }
        check_attempts(self.max_attempts)?;
        if self.max_payload_bytes == 0 {
            return Err(Error::invalid(
                "max payload bytes",
                "0 would refuse every job",
            ));
        }
        Ok(())
    }
}

fn check_attempts(attempts: u32) -> Result<()> {
    if attempts == 0 || attempts > MAX_ATTEMPTS {
        return Err(Error::invalid(
            "max attempts",
            format!("{attempts} must be between 1 and {MAX_ATTEMPTS}"),
        ));
    }
    Ok(())
}

/// How one job is enqueued: priority, delay, attempts, dedup and the user it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnqueueOptions {
    /// Which jobs start first. Default normal.
    pub priority: Priority,
    /// How long to wait before the job may start, on Redis's clock. Default none.
    pub delay: Duration,
    /// Attempts, the first included. Default: the queue's.
    pub max_attempts: Option<u32>,
    /// A key and a time to live: while a job enqueued with the same key is waiting or running
    /// (and the time has not run out), enqueueing again returns that job's id instead of
    /// adding a job.
    pub dedup: Option<(String, Duration)>,
    /// The user the job runs for; its cost is booked to them.
    pub user: Option<String>,
}

impl EnqueueOptions {
    /// The defaults.
    pub fn new() -> Self {
        EnqueueOptions::default()
    }

    /// With a priority.
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// With a delay.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// With a number of attempts.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// With a dedup key that holds for `ttl` at most.
    pub fn dedup(mut self, key: impl Into<String>, ttl: Duration) -> Self {
        self.dedup = Some((key.into(), ttl));
        self
    }

    /// For a user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Checks the options, naming what is wrong and with what value.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.delay > MAX_DELAY {
            return Err(Error::invalid(
                "delay",
                format!("{:?} is over the limit of one year", self.delay),
            ));
        }
        if let Some(attempts) = self.max_attempts {
            check_attempts(attempts)?;
        }
        if let Some((key, ttl)) = &self.dedup {
            check_text("dedup key", key, MAX_DEDUP_KEY_LEN)?;
            if ttl.is_zero() || *ttl > MAX_DELAY {
                return Err(Error::invalid(
                    "dedup ttl",
                    format!("{ttl:?} must be above zero and at most one year"),
                ));
            }
        }
        if let Some(user) = &self.user {
            check_text("user", user, MAX_USER_LEN)?;
        }
        Ok(())
    }
}

fn check_text(what: &'static str, text: &str, max: usize) -> Result<()> {
    if text.is_empty() {
        return Err(Error::invalid(what, "it is empty"));
    }
    if text.len() > max {
        return Err(Error::invalid(
            what,
            format!(
                "{:?} is {} bytes, over the limit of {max}",
                excerpt(text),
                text.len()
            ),
        ));
    }
    Ok(())
}

/// How many jobs a worker runs at once, and how it scales between `min` and `max`.
///
/// Every `interval` the worker reads the queue's backlog. It scales up at once when every slot
/// is busy and jobs are waiting (to running + backlog, at most `max`), and down by half of its
/// idle slots only after `down_after` intervals in a row with no backlog, never below `min`:
/// fast up, slow down, so a bursty queue does not flap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Scaling {
    /// The fewest slots.
    pub min: u32,
    /// The most slots.
    pub max: u32,
    /// How often the backlog is read. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub interval: Duration,
    /// Quiet intervals before scaling down. Default 5.
    pub down_after: u32,
}

impl Scaling {
    /// Between `min` and `max` slots.
    pub fn between(min: u32, max: u32) -> Self {
        Scaling {
            min,
            max,
            interval: Duration::from_secs(1),
            down_after: 5,
        }
    }
}

/// A worker's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// Jobs running at once in this worker. The report's queues use 20 (embeddings),
    /// 5 (summaries) and 10 (profiles). Default 10.
    pub concurrency: u32,
    /// Scale between a min and a max instead of a fixed concurrency. Default none.
    pub scaling: Option<Scaling>,
    /// The most jobs taken in one claim. Default 32.
    pub claim_batch: u32,
    /// How long a handler may run before it is cancelled and its attempt fails. Default 5 min.
    #[serde(with = "crate::serde_duration")]
    pub job_timeout: Duration,
    /// The longest a worker waits for a wake-up before it claims again. Default 5 s.
    #[serde(with = "crate::serde_duration")]
    pub idle_wait: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            concurrency: 10,
            scaling: None,
            claim_batch: 32,
            job_timeout: Duration::from_secs(300),
            idle_wait: Duration::from_secs(5),
        }
    }
}

impl WorkerConfig {
    /// A fixed `concurrency`.
    pub fn concurrency(concurrency: u32) -> Self {
        WorkerConfig {
            concurrency,
            ..WorkerConfig::default()
        }
    }

    /// Scaling between `min` and `max` slots.
    pub fn scaling(mut self, scaling: Scaling) -> Self {
        self.scaling = Some(scaling);
        self
    }

    /// With a job timeout.
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// With a claim batch.
    pub fn claim_batch(mut self, jobs: u32) -> Self {
        self.claim_batch = jobs;
        self
    }

    /// The slots a worker starts with, and its bounds.
    pub(crate) fn bounds(&self) -> (u32, u32, u32) {
        match self.scaling {
            Some(s) => (s.min.max(1), s.min, s.max),
            None => (self.concurrency, self.concurrency, self.concurrency),
        }
    }

    /// Checks every field, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        let (_, min, max) = self.bounds();
        if min == 0 || max < min || max > 10_000 {
            return Err(Error::invalid(
                "worker concurrency",
                format!("{min}..={max} must be at least 1, ordered, and at most 10000"),
            ));
        }
        if let Some(s) = self.scaling
            && (s.interval < Duration::from_millis(10) || s.down_after == 0)
        {
            return Err(Error::invalid(
                "scaling",
                format!(
                    "interval {:?} must be at least 10 ms and down_after {} at least 1",
                    s.interval, s.down_after
                ),
            ));
        }
        if self.claim_batch == 0 || self.claim_batch > 1_000 {
            return Err(Error::invalid(
                "claim batch",
                format!("{} must be between 1 and 1000", self.claim_batch),
            ));
        }
        if self.job_timeout.is_zero() {
            return Err(Error::invalid("job timeout", "0 would cancel every job"));
        }
        if self.idle_wait < Duration::from_millis(10) || self.idle_wait > Duration::from_secs(60) {
            return Err(Error::invalid(
                "idle wait",
                format!("{:?} must be between 10 ms and 60 s", self.idle_wait),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_with_the_value() {
        let err = QueueConfig::named("bad name!").validate().unwrap_err();
        assert!(err.to_string().contains("bad name!"), "{err}");
        let err = QueueConfig::named("q")
            .rate_limit(RateLimit::per_second(0))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("0 per"), "{err}");
        let err = QueueConfig::named("q")
            .max_attempts(0)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("max attempts"), "{err}");
        let err = WorkerConfig::concurrency(0).validate().unwrap_err();
        assert!(err.to_string().contains("concurrency"), "{err}");
        let err = WorkerConfig::default()
            .scaling(Scaling::between(5, 2))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("5..=2"), "{err}");
        assert!(
            WorkerConfig::default()
                .scaling(Scaling::between(0, 4))
                .validate()
                .is_err()
        );
        let long = "k".repeat(MAX_DEDUP_KEY_LEN + 1);
        let err = EnqueueOptions::new()
            .dedup(long, Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("257 bytes"), "{err}");
        assert!(EnqueueOptions::new().user("").validate().is_err());
        assert!(QueueConfig::named("embeddings").validate().is_ok());
    }

    #[test]
    fn the_rate_limit_interval_is_in_microseconds() {
        assert_eq!(RateLimit::per_minute(100).interval_micros(), 600_000);
        assert_eq!(RateLimit::per_second(3).interval_micros(), 333_333);
        assert_eq!(
            Priority::from_level(i64::from(Priority::Low.level())),
            Priority::Low
        );
    }
}
