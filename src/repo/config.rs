//! [`PgConfig`]: where Postgres is and how the pool behaves, with the report's numbers.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::redact::redact_url;

/// Configuration of a Postgres pool. Plain data: change fields of `Default`, or deserialize
/// it (durations as milliseconds or strings like `"10s"`). `Debug` hides the password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PgConfig {
    /// `postgres://user[:password]@host:port/db`. Default
    /// `postgres://postgres@127.0.0.1:5432/test`, or `PUPKIT_DATABASE_URL` (see
    /// [`PgConfig::from_env`]).
    pub url: String,
    /// A read replica: when set, `query`, `query_one` and `query_opt` read from a second pool
    /// of the same size there, while writes and transactions go to the primary (and a
    /// [`UnitOfWork`](super::UnitOfWork) that has written reads from the primary). Default none.
    pub replica_url: Option<String>,
    /// The `application_name` of every session, shown in `pg_stat_activity`. Default
    /// `"pupkit"`.
    pub application_name: String,
    /// Most connections. Default 50 (the report's).
    pub max_size: u32,
    /// Idle connections kept ready. Default 10 (the report's).
    pub min_idle: u32,
    /// An idle connection above `min_idle` is closed after this long. Default 10 s.
    #[serde(with = "crate::serde_duration")]
    pub idle_timeout: Duration,
    /// How often idle and expired connections are reaped, so the idle timeout means what it
    /// says. Default 2 s.
    #[serde(with = "crate::serde_duration")]
    pub reaper_rate: Duration,
    /// Longest wait for a connection, and for a new connection's whole setup (TCP, auth,
    /// session settings). Default 3 s (the report's).
    #[serde(with = "crate::serde_duration")]
    pub checkout_timeout: Duration,
    /// `statement_timeout` of every session: Postgres cancels longer statements. Default 30 s.
    #[serde(with = "crate::serde_duration")]
    pub statement_timeout: Duration,
    /// A connection idle longer than this is checked with a round trip before it is handed
    /// out; one used more recently only for having closed (a check every checkout would
    /// double the round trips of a busy pool). Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub validate_after_idle: Duration,
    /// Deadline of the check that a connection is alive before it is handed out. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub validation_timeout: Duration,
    /// TCP keepalive: idle time before probes. Default 30 s.
    #[serde(with = "crate::serde_duration")]
    pub keepalive_idle: Duration,
    /// TCP keepalive: time between probes. Default 10 s.
    #[serde(with = "crate::serde_duration")]
    pub keepalive_interval: Duration,
    /// TCP keepalive: unanswered probes before the connection is dropped. Default 3.
    pub keepalive_retries: u32,
    /// Prepared statements kept per connection (least recently used evicted). Default 100.
    pub statement_cache_size: usize,
    /// Queries slower than this are logged (statement text, never parameters) and kept in the
    /// slow-query log. Default 100 ms.
    #[serde(with = "crate::serde_duration")]
    pub slow_query_threshold: Duration,
    /// Entries of the slow-query log. Default 100.
    pub slow_query_log_size: usize,
    /// `status()` reports the pool saturated once callers have waited this long. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub saturation_threshold: Duration,
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            url: "postgres://postgres@127.0.0.1:5432/test".to_owned(),
            replica_url: None,
            application_name: "pupkit".to_owned(),
            max_size: 50,
            min_idle: 10,
            idle_timeout: Duration::from_secs(10),
            reaper_rate: Duration::from_secs(2),
            checkout_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(30),
            validate_after_idle: Duration::from_secs(1),
            validation_timeout: Duration::from_secs(1),
            keepalive_idle: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_retries: 3,
            statement_cache_size: 100,
            slow_query_threshold: Duration::from_millis(100),
            slow_query_log_size: 100,
            saturation_threshold: Duration::from_secs(1),
        }
    }
}

impl PgConfig {
    /// The defaults, at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PgConfig {
            url: url.into(),
            ..PgConfig::default()
        }
    }

    /// The defaults, at `PUPKIT_DATABASE_URL` if it is set.
    pub fn from_env() -> Self {
        match std::env::var("PUPKIT_DATABASE_URL") {
            Ok(url) if !url.is_empty() => PgConfig::new(url),
            _ => PgConfig::default(),
        }
    }

    /// Checks the fields, saying which one is wrong.
    pub fn validate(&self) -> crate::Result<()> {
        use crate::Error;
        if self.max_size == 0 {
            return Err(Error::invalid(
                "max_size",
                "a pool needs at least one connection",
            ));
        }
        if self.min_idle > self.max_size {
            return Err(Error::invalid(
                "min_idle",
                format!("{} is above max_size {}", self.min_idle, self.max_size),
            ));
        }
        if self.checkout_timeout.is_zero()
            || self.validation_timeout.is_zero()
            || self.reaper_rate.is_zero()
        {
            return Err(Error::invalid(
                "timeouts",
                "checkout_timeout, validation_timeout and reaper_rate must be above zero",
            ));
        }
        if self.statement_cache_size == 0 {
            return Err(Error::invalid("statement_cache_size", "must be at least 1"));
        }
        Ok(())
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact_url(&self.url))
            .field("replica_url", &self.replica_url.as_deref().map(redact_url))
            .field("max_size", &self.max_size)
            .field("min_idle", &self.min_idle)
            .field("idle_timeout", &self.idle_timeout)
            .field("checkout_timeout", &self.checkout_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("statement_cache_size", &self.statement_cache_size)
            .field("slow_query_threshold", &self.slow_query_threshold)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_reports_and_passwords_never_show() {
        let config = PgConfig::new("postgres://app:s3cret@db:5432/chat");
        config.validate().unwrap();
        assert_eq!((config.max_size, config.min_idle), (50, 10));
        assert_eq!(config.checkout_timeout, Duration::from_secs(3));
        assert_eq!(config.statement_timeout, Duration::from_secs(30));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn deserializes_and_validates() {
        let config: PgConfig =
            serde_json::from_str(r#"{"max_size": 5, "min_idle": 2, "statement_timeout": "5s"}"#)
                .unwrap();
        assert_eq!(config.statement_timeout, Duration::from_secs(5));
        config.validate().unwrap();
        let bad: PgConfig = serde_json::from_str(r#"{"max_size": 2, "min_idle": 3}"#).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("min_idle"));
    }
}
