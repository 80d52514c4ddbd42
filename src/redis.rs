//! The shared Redis connection: one multiplexed connection that reconnects by itself, with a
//! deadline on every operation. Every Redis-backed component takes a [`RedisConnection`], so a
//! host can share one between its caches.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Cmd, FromRedisValue, Script, ScriptInvocation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::redact::redact_url;
use crate::resilience::{BreakerConfig, BreakerStats, CircuitBreaker};

/// Where Redis is and how long to wait for it. `Debug` hides the password in the URL.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`. Default `redis://127.0.0.1:6379`, or
    /// `PUPKIT_REDIS_URL` when set (see [`RedisConfig::from_env`]).
    pub url: String,
    /// Deadline of every operation, including a reconnect it waits on. Default 100 ms: a
    /// healthy Redis answers in well under 1 ms, and a cache read must never wait long for a
    /// Redis that does not answer.
    #[serde(with = "crate::serde_duration")]
    pub op_timeout: Duration,
    /// Deadline of one connection attempt. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub connect_timeout: Duration,
    /// The circuit breaker in front of this connection: while Redis keeps failing, operations
    /// fail at once instead of waiting for their deadline.
    pub breaker: BreakerConfig,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            op_timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
        }
    }
}

impl RedisConfig {
    /// The defaults, at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }

    /// The defaults, at `PUPKIT_REDIS_URL` if it is set.
    pub fn from_env() -> Self {
        match std::env::var("PUPKIT_REDIS_URL") {
            Ok(url) if !url.is_empty() => RedisConfig::new(url),
            _ => RedisConfig::default(),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("op_timeout", &self.op_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// One multiplexed Redis connection, shared by clones, that reconnects by itself. Every
/// operation has a deadline ([`RedisConfig::op_timeout`]) and goes through a circuit breaker:
/// after repeated connection failures or timeouts, operations fail at once
/// ([`Error::Unavailable`]) until a probe after the cool-down succeeds.
#[derive(Clone)]
pub struct RedisConnection {
    manager: ConnectionManager,
    client: ::redis::Client,
    op_timeout: Duration,
    connect_timeout: Duration,
    url: Arc<str>,
    breaker: Arc<CircuitBreaker>,
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("url", &self.url)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

impl RedisConnection {
    /// A connection that is opened on first use and reopened whenever it breaks. Does no I/O,
    /// so a host starts even while Redis is down. Must be called inside a Tokio runtime.
    pub fn lazy(config: &RedisConfig) -> Result<Self> {
        let redacted = redact_url(&config.url);
        let client = ::redis::Client::open(config.url.as_str()).map_err(|_| {
            Error::invalid(
                "redis url",
                format!("{redacted:?} is not a valid Redis URL"),
            )
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            // Each operation's deadline is ours (it also covers waiting on a reconnect); a
            // second timer per request inside redis-rs would only cost time.
            .set_response_timeout(None)
            // Reconnect attempts are short and few; the next operation starts another round.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(|e| Error::Backend {
                backend: "redis",
                operation: "connect",
                source: Box::new(e),
            })?;
        Ok(RedisConnection {
            manager,
            client,
            op_timeout: config.op_timeout,
            connect_timeout: config.connect_timeout,
            url: redacted.into(),
            breaker: Arc::new(CircuitBreaker::new("redis", config.breaker.clone())),
        })
    }

    /// Like [`lazy`](Self::lazy), then waits for a `PING` so that a wrong URL fails here.
    pub async fn connect(config: &RedisConfig) -> Result<Self> {
        let connection = Self::lazy(config)?;
        let _: String = connection.query("ping", &::redis::cmd("PING")).await?;
        Ok(connection)
    }

    /// The deadline of each operation.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// A new dedicated pub/sub connection (never the shared multiplexed one), within the
    /// deadline.
    pub(crate) async fn pubsub(&self) -> Result<::redis::aio::PubSub> {
        let client = self.client.clone();
        self.deadline("subscribe", async move { client.get_async_pubsub().await })
            .await
    }

    /// A new dedicated connection for blocking commands (`BLPOP`), never the shared
    /// multiplexed one: a blocked command there would hold up every other. It is opened within
    /// the connect deadline, and its commands have no deadline of their own (the caller bounds
    /// them).
    pub(crate) async fn dedicated(&self) -> Result<::redis::aio::MultiplexedConnection> {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(None);
        let client = self.client.clone();
        match tokio::time::timeout(
            self.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(Error::Backend {
                backend: "redis",
                operation: "connect",
                source: Box::new(error),
            }),
            Err(_) => Err(Error::Timeout {
                backend: "redis",
                operation: "connect",
                after: self.connect_timeout,
            }),
        }
    }

    /// The circuit breaker's state and counters.
    pub fn breaker(&self) -> BreakerStats {
        self.breaker.stats()
    }

    /// Runs one command (or a pipeline packed as one) within the deadline.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        operation: &'static str,
        cmd: &Cmd,
    ) -> Result<T> {
        let mut manager = self.manager.clone();
        self.deadline(
            operation,
            async move { cmd.query_async(&mut manager).await },
        )
        .await
    }

    /// Runs a Lua script (EVALSHA, loading it on NOSCRIPT) within the deadline.
    pub(crate) async fn run_script<T: FromRedisValue>(
        &self,
        operation: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut manager = self.manager.clone();
        self.deadline(operation, async move {
            invocation.invoke_async(&mut manager).await
        })
        .await
    }

    /// Runs a pipeline within the deadline.
    pub(crate) async fn pipeline<T: FromRedisValue>(
        &self,
        operation: &'static str,
        pipeline: &::redis::Pipeline,
    ) -> Result<T> {
        let mut manager = self.manager.clone();
        self.deadline(operation, async move {
            pipeline.query_async(&mut manager).await
        })
        .await
    }

    /// Runs a pipeline that calls `scripts` by EVALSHA within the deadline, loading them and
    /// running it again if Redis has forgotten them (after a restart or SCRIPT FLUSH).
    pub(crate) async fn pipeline_with_scripts<T: FromRedisValue>(
        &self,
        operation: &'static str,
        pipeline: &::redis::Pipeline,
        scripts: &[&Script],
    ) -> Result<T> {
        let mut manager = self.manager.clone();
        self.deadline(operation, async move {
            match pipeline.query_async(&mut manager).await {
                Err(error)
                    if error.kind()
                        == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
                {
                    for script in scripts {
                        script.load_async(&mut manager).await?;
                    }
                    pipeline.query_async(&mut manager).await
                }
                other => other,
            }
        })
        .await
    }

    async fn deadline<T>(
        &self,
        operation: &'static str,
        work: impl Future<Output = ::redis::RedisResult<T>>,
    ) -> Result<T> {
        let Some(admission) = self.breaker.allow() else {
            return Err(Error::Unavailable {
                backend: "redis",
                operation,
                retry_in: self.breaker.retry_in(),
            });
        };
        match tokio::time::timeout(self.op_timeout, work).await {
            Ok(Ok(value)) => {
                self.breaker.record(admission, true);
                Ok(value)
            }
            Ok(Err(error)) => {
                // An error reply means Redis is up; only a failing connection trips the breaker.
                let connection_failed = error.is_io_error()
                    || error.is_connection_dropped()
                    || error.is_connection_refusal()
                    || error.is_timeout();
                self.breaker.record(admission, !connection_failed);
                Err(Error::Backend {
                    backend: "redis",
                    operation,
                    source: Box::new(error),
                })
            }
            Err(_) => {
                self.breaker.record(admission, false);
                Err(Error::Timeout {
                    backend: "redis",
                    operation,
                    after: self.op_timeout,
                })
            }
        }
    }
}

/// A script reply's integer: an integer, or a bulk string of digits.
pub(crate) fn reply_int(value: &::redis::Value) -> Option<i64> {
    match value {
        ::redis::Value::Int(n) => Some(*n),
        ::redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

/// A Lua script, hashed once.
pub(crate) fn script(source: &str) -> Script {
    Script::new(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://:s3cret@host:6379/0"),
            "redis://:***@host:6379/0"
        );
        assert_eq!(
            redact_url("rediss://app:s3cret@host/2"),
            "rediss://app:***@host/2"
        );
        assert_eq!(redact_url("redis://token@host"), "redis://***@host");
        let config = RedisConfig::new("redis://app:s3cret@host:6379");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn a_bad_url_is_refused_without_echoing_the_password() {
        let err = RedisConnection::lazy(&RedisConfig::new("http://u:s3cret@host")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("redis url"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
