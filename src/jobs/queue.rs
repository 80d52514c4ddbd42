//! A named queue on Redis: enqueue, pause, limit, stats and dead letters; the claim,
//! heartbeat and settle calls its workers make.

use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use redis::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::config::{EnqueueOptions, Priority, QueueConfig};
use super::scripts::{
    CLAIM_SCRIPT, ENQUEUE_SCRIPT, HEARTBEAT_SCRIPT, KEY_NAMES, LIMIT_SCRIPT, REVIVE_SCRIPT,
    SETTLE_SCRIPT,
};
use super::stats::QueueStats;
use crate::error::{Error, Result, excerpt};
use crate::redis::{RedisConnection, reply_int};

/// What an enqueue did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Enqueued {
    /// The job's id.
    pub id: String,
    /// True when a job with the same dedup key was waiting or running, so no job was added
    /// and `id` is that job's.
    pub duplicate: bool,
}

/// A dead-lettered job, as [`Queue::dead_letters`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadJob {
    /// The job's id.
    pub id: String,
    /// The stored payload (JSON), as enqueued.
    pub payload: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub error: Option<String>,
    /// When it was dead-lettered (Redis's clock).
    pub dead_at: Timestamp,
}

impl DeadJob {
    /// The payload, decoded.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        decode_payload::<T>(self.payload.as_bytes()).map(|(data, _)| data)
    }
}

/// The stored form of a job: the payload and the user it runs for.
#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    data: &'a T,
}

#[derive(Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    user: Option<String>,
    data: T,
}

/// Decodes a stored payload into the job's data and user.
pub(crate) fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<(T, Option<String>)> {
    serde_json::from_slice::<Envelope<T>>(payload)
        .map(|envelope| (envelope.data, envelope.user))
        .map_err(|e| {
            Error::corrupt(format_args!(
                "job payload {:?} is not a {}: {e}",
                excerpt(&String::from_utf8_lossy(payload)),
                std::any::type_name::<T>()
            ))
        })
}

/// A job as the claim script hands it out, payload not yet decoded.
#[derive(Clone, Debug)]
pub(crate) struct ClaimedJob {
    pub(crate) id: String,
    pub(crate) token: String,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) priority: Priority,
    pub(crate) enqueued_ms: i64,
    /// The stored payload; decoded by the worker (a payload that does not decode fails its
    /// job alone).
    pub(crate) payload: Vec<u8>,
}

/// What a worker should do after a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Claim again at once (the batch was filled).
    Again,
    /// The queue is rate-limited: sleep this long.
    Sleep(Duration),
    /// Nothing to start now: block on the wake-up marker, at most this long (`None`: no
    /// deadline of the queue's own).
    Block(Option<Duration>),
}

/// The reply of one claim.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) now_ms: i64,
    pub(crate) next: Next,
    pub(crate) jobs: Vec<ClaimedJob>,
}

/// How a worker settles one job.
#[derive(Clone, Debug)]
pub(crate) enum Settle {
    Complete,
    /// Failed: retried after the delay, or dead-lettered on its last attempt.
    Fail {
        delay: Duration,
        error: String,
    },
    /// Failed for good: dead-lettered now.
    Bury {
        error: String,
    },
    /// Given back without spending an attempt.
    Release {
        delay: Duration,
    },
}

/// The result of settling one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Its lease was no longer this worker's: nothing was changed.
    LeaseLost,
    /// Done as asked.
    Done,
    /// A failure on the last attempt: dead-lettered.
    Dead,
}

/// The most jobs [`Queue::enqueue_many`] sends in one script call.
pub const ENQUEUE_CHUNK: usize = 1_000;
/// The most payload bytes [`Queue::enqueue_many`] sends in one script call (a single larger
/// job goes alone).
pub const ENQUEUE_CHUNK_BYTES: usize = 16 << 20;
/// The longest [`Queue::limit_for`] holds claims.
pub const MAX_LIMIT: Duration = Duration::from_secs(3_600);

/// The longest error text stored with a job.
const MAX_ERROR_LEN: usize = 2_048;

/// A named queue of jobs of type `T` (serde, stored as JSON) on Redis, shared by every
/// process that opens it. Clones share one queue.
///
/// ```no_run
/// # async fn run() -> pupkit::Result<()> {
/// use pupkit::jobs::{EnqueueOptions, Priority, Queue, QueueConfig, RateLimit};
/// use pupkit::redis::{RedisConfig, RedisConnection};
///
/// let redis = RedisConnection::connect(&RedisConfig::from_env()).await?;
/// let queue: Queue<String> = Queue::open(
///     redis,
///     QueueConfig::named("embeddings").rate_limit(RateLimit::per_minute(100)),
/// )
/// .await?;
/// let job = queue
///     .enqueue(&"hello".to_owned(), &EnqueueOptions::new().priority(Priority::High))
///     .await?;
/// println!("enqueued {}", job.id);
/// # Ok(())
/// # }
/// ```
pub struct Queue<T> {
    inner: Arc<QueueInner>,
    _payload: PhantomData<fn() -> T>,
}

struct QueueInner {
    connection: RedisConnection,
    config: QueueConfig,
    keys: Vec<String>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            inner: self.inner.clone(),
            _payload: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("name", &self.inner.config.name)
            .field("prefix", &self.inner.config.prefix)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Queue<T> {
    /// Opens the queue and checks that Redis answers, so that a wrong URL fails here.
    ///
    /// The queue's limits (global concurrency, rate limit, dead letters kept) travel with each
    /// claim from this config: every process working a queue should use the same ones, and a
    /// Redis that lost its data still enforces them.
    pub async fn open(connection: RedisConnection, config: QueueConfig) -> Result<Self> {
        config.validate()?;
        let tag = format!("{{{}:q:{}}}", config.prefix, config.name);
        let keys = KEY_NAMES
            .iter()
            .map(|name| format!("{tag}:{name}"))
            .collect();
        let _: String = connection.query("jobs open", &redis::cmd("PING")).await?;
        Ok(Queue {
            inner: Arc::new(QueueInner {
                connection,
                config,
                keys,
            }),
            _payload: PhantomData,
        })
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    /// The shared Redis connection.
    pub(crate) fn connection(&self) -> &RedisConnection {
        &self.inner.connection
    }

    /// The key at `position` (1-based, as in the scripts' table).
    pub(crate) fn key(&self, position: usize) -> &str {
        &self.inner.keys[position - 1]
    }

    /// The wake-up marker idle workers block on.
    pub(crate) fn marker_key(&self) -> &str {
        self.key(11)
    }

    /// Adds one job, or returns the id of the job already waiting or running under the same
    /// dedup key.
    pub async fn enqueue(&self, job: &T, options: &EnqueueOptions) -> Result<Enqueued> {
        let mut added = self.enqueue_many([(job, options)]).await?;
        added
            .pop()
            .ok_or_else(|| Error::corrupt("the enqueue reply has no id for the job"))
    }

    /// Adds jobs, each with its own options: one round trip (one atomic script) per
    /// [`ENQUEUE_CHUNK`] jobs or [`ENQUEUE_CHUNK_BYTES`] of payload. Every job is checked before any is sent; if Redis fails midway,
    /// the chunks before the failing one are enqueued (enqueue again with dedup keys to make
    /// that safe).
    pub async fn enqueue_many<'a, I>(&self, jobs: I) -> Result<Vec<Enqueued>>
    where
        I: IntoIterator<Item = (&'a T, &'a EnqueueOptions)>,
        T: 'a,
    {
        let mut encoded = Vec::new();
        for (job, options) in jobs {
            encoded.push(self.encode(job, options)?);
        }
        let mut out = Vec::with_capacity(encoded.len());
        for chunk in chunks(&encoded) {
            let mut invocation = ENQUEUE_SCRIPT.prepare_invoke();
            self.add_keys(&mut invocation);
            invocation.arg(chunk.len());
            for args in chunk {
                for arg in args {
                    invocation.arg(arg.as_slice());
                }
            }
            let reply: Vec<Value> = self
                .inner
                .connection
                .run_script("jobs enqueue", &invocation)
                .await?;
            if reply.len() != chunk.len() * 2 {
                return Err(unexpected("jobs enqueue", &reply));
            }
            for pair in reply.chunks(2) {
                out.push(Enqueued {
                    id: text(&pair[0]).ok_or_else(|| unexpected("jobs enqueue", &reply))?,
                    duplicate: reply_int(&pair[1]) == Some(1),
                });
            }
        }
        metrics::counter!("pupkit_jobs_enqueued_total", "queue" => self.name().to_owned())
            .increment(out.iter().filter(|e| !e.duplicate).count() as u64);
        Ok(out)
    }

    /// A job's six script arguments, after checking its options and size.
    fn encode(&self, job: &T, options: &EnqueueOptions) -> Result<[Vec<u8>; 6]> {
        options.validate()?;
        let payload = serde_json::to_vec(&EnvelopeRef {
            user: options.user.as_deref(),
            data: job,
        })
        .map_err(|e| Error::invalid("job payload", format!("cannot be serialized: {e}")))?;
        let limit = self.inner.config.max_payload_bytes;
        if payload.len() > limit {
            return Err(Error::ValueTooLarge {
                key: format!("a job of queue {}", self.name()),
                size: payload.len(),
                limit,
            });
        }
        let attempts = options
            .max_attempts
            .unwrap_or(self.inner.config.max_attempts);
        let (dedup_key, dedup_ttl) = match &options.dedup {
            Some((key, ttl)) => (key.as_bytes().to_vec(), millis(*ttl)),
            None => (Vec::new(), 0),
        };
        Ok([
            payload,
            options.priority.level().to_string().into_bytes(),
            millis(options.delay).to_string().into_bytes(),
            attempts.to_string().into_bytes(),
            dedup_key,
            dedup_ttl.to_string().into_bytes(),
        ])
    }

    /// Stops every process's workers from claiming until [`resume`](Self::resume). Running
    /// jobs finish.
    pub async fn pause(&self) -> Result<()> {
        let _: i64 = self
            .inner
            .connection
            .query(
                "jobs pause",
                redis::cmd("HSET").arg(self.key(7)).arg("paused").arg(1),
            )
            .await?;
        Ok(())
    }

    /// Lets workers claim again after [`pause`](Self::pause) or
    /// [`limit_for`](Self::limit_for), and wakes them.
    pub async fn resume(&self) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HDEL")
            .arg(self.key(7))
            .arg("paused")
            .arg("limited_until")
            .ignore()
            .cmd("LPUSH")
            .arg(self.marker_key())
            .arg(1)
            .ignore()
            .cmd("LTRIM")
            .arg(self.marker_key())
            .arg(0)
            .arg(0)
            .ignore();
        self.inner.connection.pipeline("jobs resume", &pipe).await
    }

    /// Holds every process's claims for `pause` (a provider answered 429), on Redis's clock,
    /// at most [`MAX_LIMIT`] (a provider's hint is not trusted further). A later limit
    /// already in place is kept; [`resume`](Self::resume) lifts it. Returns how long claims
    /// are now held.
    pub async fn limit_for(&self, pause: Duration) -> Result<Duration> {
        let mut invocation = LIMIT_SCRIPT.prepare_invoke();
        self.add_keys(&mut invocation);
        invocation.arg(millis(pause.min(MAX_LIMIT)));
        let held: i64 = self
            .inner
            .connection
            .run_script("jobs limit", &invocation)
            .await?;
        Ok(Duration::from_millis(held.max(0) as u64))
    }

    /// The queue's state and counters, across every process, in one round trip.
    pub async fn stats(&self) -> Result<QueueStats> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(self.key(1));
        pipe.cmd("ZCARD").arg(self.key(2));
        pipe.cmd("ZCARD").arg(self.key(3));
        pipe.cmd("ZCARD").arg(self.key(10));
        pipe.cmd("HEXISTS").arg(self.key(7)).arg("paused");
        pipe.cmd("HGETALL").arg(self.key(12));
        let (pending, delayed, active, dead, paused, counters): (
            u64,
            u64,
            u64,
            u64,
            bool,
            HashMap<String, u64>,
        ) = self.inner.connection.pipeline("jobs stats", &pipe).await?;
        let count = |name: &str| counters.get(name).copied().unwrap_or(0);
        Ok(QueueStats {
            pending,
            delayed,
            active,
            dead,
            paused,
            enqueued: count("enqueued"),
            deduplicated: count("deduplicated"),
            completed: count("completed"),
            failed: count("failed"),
            retried: count("retried"),
            dead_lettered: count("dead"),
            stalled: count("stalled"),
            released: count("released"),
        })
    }

    /// Jobs waiting to start now (the backlog workers scale on).
    pub async fn backlog(&self) -> Result<u64> {
        self.inner
            .connection
            .query("jobs backlog", redis::cmd("ZCARD").arg(self.key(1)))
            .await
    }

    /// The newest dead-lettered jobs, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadJob>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let listed: Vec<(String, f64)> = self
            .inner
            .connection
            .query(
                "jobs dead letters",
                redis::cmd("ZREVRANGE")
                    .arg(self.key(10))
                    .arg(0)
                    .arg(limit.min(10_000) - 1)
                    .arg("WITHSCORES"),
            )
            .await?;
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET").arg(self.key(4)).arg(&ids);
        pipe.cmd("HMGET").arg(self.key(5)).arg(&ids);
        pipe.cmd("HMGET").arg(self.key(6)).arg(&ids);
        type Column = Vec<Option<Vec<u8>>>;
        let (payloads, infos, errors): (Column, Column, Column) = self
            .inner
            .connection
            .pipeline("jobs dead letters", &pipe)
            .await?;
        let mut out = Vec::with_capacity(listed.len());
        for (k, (id, at)) in listed.into_iter().enumerate() {
            let text = |column: &Column| {
                column
                    .get(k)
                    .and_then(|v| v.as_deref())
                    .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            };
            let attempts = text(&infos)
                .and_then(|i| i.split('|').next().and_then(|a| a.parse().ok()))
                .unwrap_or(0);
            out.push(DeadJob {
                id,
                payload: text(&payloads).unwrap_or_default(),
                attempts,
                error: text(&errors),
                dead_at: Timestamp::from_millisecond(at as i64).unwrap_or(Timestamp::UNIX_EPOCH),
            });
        }
        Ok(out)
    }

    /// Puts a dead-lettered job back in line with fresh attempts. False when no job `id` is
    /// dead-lettered.
    pub async fn retry_dead(&self, id: &str) -> Result<bool> {
        if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid(
                "job id",
                format!("{:?} is not a job id (digits only)", excerpt(id)),
            ));
        }
        let mut invocation = REVIVE_SCRIPT.prepare_invoke();
        self.add_keys(&mut invocation);
        invocation.arg(id);
        let revived: i64 = self
            .inner
            .connection
            .run_script("jobs retry dead", &invocation)
            .await?;
        Ok(revived == 1)
    }

    /// Claims up to `want` jobs, leased for the queue's lease.
    pub(crate) async fn claim(&self, want: u32) -> Result<Claimed> {
        let mut invocation = CLAIM_SCRIPT.prepare_invoke();
        self.add_keys(&mut invocation);
        let config = &self.inner.config;
        let (interval, burst) = config
            .rate_limit
            .map_or((0, 0), |limit| (limit.interval_micros(), limit.burst));
        invocation
            .arg(want)
            .arg(millis(config.lease))
            .arg(config.global_concurrency.unwrap_or(0))
            .arg(interval)
            .arg(burst)
            .arg(config.keep_dead);
        let reply: Vec<Value> = self
            .inner
            .connection
            .run_script("jobs claim", &invocation)
            .await?;
        parse_claim(&reply).ok_or_else(|| unexpected("jobs claim", &reply))
    }

    /// Renews the leases of `(id, token)` pairs; returns the ids that are no longer ours.
    pub(crate) async fn heartbeat(&self, leases: &[(String, String)]) -> Result<Vec<String>> {
        let mut invocation = HEARTBEAT_SCRIPT.prepare_invoke();
        self.add_keys(&mut invocation);
        invocation.arg(millis(self.inner.config.lease));
        for (id, token) in leases {
            invocation.arg(id).arg(token);
        }
        self.inner
            .connection
            .run_script("jobs heartbeat", &invocation)
            .await
    }

    /// Settles finished jobs in one atomic call, each checked against its fencing token.
    pub(crate) async fn settle(&self, jobs: &[(&ClaimedJob, &Settle)]) -> Result<Vec<Settled>> {
        let mut invocation = SETTLE_SCRIPT.prepare_invoke();
        self.add_keys(&mut invocation);
        invocation.arg(self.inner.config.keep_dead).arg(jobs.len());
        for (job, settle) in jobs {
            let (op, delay, error) = match settle {
                Settle::Complete => ("c", 0, ""),
                Settle::Fail { delay, error } => ("f", millis(*delay), error.as_str()),
                Settle::Bury { error } => ("d", 0, error.as_str()),
                Settle::Release { delay } => ("r", millis(*delay), ""),
            };
            invocation
                .arg(op)
                .arg(&job.id)
                .arg(&job.token)
                .arg(delay)
                .arg(bounded(error));
        }
        let reply: Vec<i64> = self
            .inner
            .connection
            .run_script("jobs settle", &invocation)
            .await?;
        if reply.len() != jobs.len() {
            return Err(unexpected("jobs settle", &reply));
        }
        Ok(reply
            .into_iter()
            .map(|status| match status {
                1 => Settled::Done,
                2 => Settled::Dead,
                _ => Settled::LeaseLost,
            })
            .collect())
    }

    fn add_keys(&self, invocation: &mut redis::ScriptInvocation<'_>) {
        for key in &self.inner.keys {
            invocation.key(key);
        }
    }
}

/// `encoded` cut into runs of at most [`ENQUEUE_CHUNK`] jobs and [`ENQUEUE_CHUNK_BYTES`]
/// (at least one job each).
fn chunks(encoded: &[[Vec<u8>; 6]]) -> Vec<&[[Vec<u8>; 6]]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, job) in encoded.iter().enumerate() {
        let size: usize = job.iter().map(Vec::len).sum();
        if i > start && (i - start == ENQUEUE_CHUNK || bytes + size > ENQUEUE_CHUNK_BYTES) {
            out.push(&encoded[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < encoded.len() {
        out.push(&encoded[start..]);
    }
    out
}

fn parse_claim(reply: &[Value]) -> Option<Claimed> {
    let (head, rest) = reply.split_at_checked(4)?;
    let now_ms = reply_int(&head[0])?;
    let wait = reply_int(&head[1])?;
    let next = match reply_int(&head[2])? {
        0 => Next::Again,
        1 => Next::Sleep(Duration::from_millis(wait.max(1) as u64)),
        _ if wait < 0 => Next::Block(None),
        _ => Next::Block(Some(Duration::from_millis(wait as u64))),
    };
    if rest.len() % 7 != 0 {
        return None;
    }
    let jobs = rest
        .chunks(7)
        .map(|job| {
            Some(ClaimedJob {
                id: text(&job[0])?,
                token: text(&job[1])?,
                attempt: u32::try_from(reply_int(&job[2])?).ok()?,
                max_attempts: u32::try_from(reply_int(&job[3])?).ok()?,
                priority: Priority::from_level(reply_int(&job[4])?),
                enqueued_ms: reply_int(&job[5])?,
                payload: match &job[6] {
                    Value::BulkString(bytes) => bytes.clone(),
                    _ => return None,
                },
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Claimed { now_ms, next, jobs })
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// `text` cut to [`MAX_ERROR_LEN`] bytes on a char boundary.
fn bounded(text: &str) -> &str {
    if text.len() <= MAX_ERROR_LEN {
        return text;
    }
    let mut end = MAX_ERROR_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn unexpected(operation: &'static str, reply: &impl fmt::Debug) -> Error {
    Error::corrupt(format_args!(
        "{operation}: unexpected reply {}",
        excerpt(&format!("{reply:?}"))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_reply_parses_and_a_short_one_is_refused() {
        let reply = vec![
            Value::Int(1_700_000_000_000),
            Value::Int(250),
            Value::Int(1),
            Value::Int(3),
            Value::BulkString(b"7".to_vec()),
            Value::BulkString(b"42".to_vec()),
            Value::Int(1),
            Value::Int(3),
            Value::Int(0),
            Value::Int(1_699_999_999_000),
            Value::BulkString(vec![0xff, 0xfe]),
        ];
        let claimed = parse_claim(&reply).expect("parses");
        assert_eq!(claimed.next, Next::Sleep(Duration::from_millis(250)));
        assert_eq!(claimed.jobs[0].id, "7");
        assert_eq!(claimed.jobs[0].priority, Priority::High);
        assert!(parse_claim(&reply[..10]).is_none());
        assert!(parse_claim(&reply[..2]).is_none());
    }

    #[test]
    fn a_payload_that_does_not_decode_says_what_it_expected() {
        let err = decode_payload::<u32>(br#"{"data":"not a number"}"#).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("u32") && text.contains("not a number"),
            "{text}"
        );
        assert!(
            decode_payload::<u32>(&[0xff, 0xfe]).is_err(),
            "bytes that are not UTF-8"
        );
        let (data, user) = decode_payload::<u32>(br#"{"user":"7","data":5}"#).unwrap();
        assert_eq!((data, user.as_deref()), (5, Some("7")));
    }

    #[test]
    fn enqueue_chunks_are_bounded_by_count_and_bytes() {
        let small = || std::array::from_fn::<Vec<u8>, 6, _>(|_| vec![0; 10]);
        let jobs: Vec<[Vec<u8>; 6]> = (0..2_500).map(|_| small()).collect();
        let sizes: Vec<usize> = chunks(&jobs).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [1_000, 1_000, 500]);
        let big = || {
            let mut job = small();
            job[0] = vec![0; 6 << 20];
            job
        };
        let jobs: Vec<[Vec<u8>; 6]> = (0..5).map(|_| big()).collect();
        let sizes: Vec<usize> = chunks(&jobs).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_LEN);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_ERROR_LEN && cut.len() >= MAX_ERROR_LEN - 1);
    }
}
