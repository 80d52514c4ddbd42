//! Workers: claim jobs in batches, run each in its own task with a timeout, renew their leases
//! in one call per beat, settle finished jobs in batches, scale between min and max slots, and
//! shut down without losing a job.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use jiff::Timestamp;
use metrics::Label;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};

use super::config::{Priority, WorkerConfig};
use super::queue::{ClaimedJob, Next, Queue, Settle, Settled, decode_payload};
use super::stats::WorkerStats;
use crate::cost::{CostMeter, Recorded, Usage};
use crate::error::{BoxError, Result};
use crate::resilience::Backoff;
use crate::tally::Tally;

/// The user a job's cost is booked to when it was enqueued without one.
pub const SYSTEM_USER: &str = "system";

/// One claimed job, handed to the handler: its data and where it stands.
pub struct Job<T> {
    facts: JobFacts,
    data: T,
    user: Option<String>,
}

impl<T: fmt::Debug> fmt::Debug for Job<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("queue", &self.facts.queue)
            .field("id", &self.facts.id)
            .field("attempt", &self.facts.attempt)
            .field("max_attempts", &self.facts.max_attempts)
            .field("priority", &self.facts.priority)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl<T> Job<T> {
    /// The job's id (unique within its queue).
    pub fn id(&self) -> &str {
        &self.facts.id
    }

    /// The payload.
    pub fn data(&self) -> &T {
        &self.data
    }

    /// The payload, owned.
    pub fn into_data(self) -> T {
        self.data
    }

    /// The user it runs for, if it was enqueued with one.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.facts.attempt
    }

    /// Attempts it has in all.
    pub fn max_attempts(&self) -> u32 {
        self.facts.max_attempts
    }

    /// Its priority.
    pub fn priority(&self) -> Priority {
        self.facts.priority
    }

    /// When it was enqueued (Redis's clock).
    pub fn enqueued_at(&self) -> Timestamp {
        self.facts.enqueued_at
    }

    /// When this attempt was claimed (Redis's clock).
    pub fn claimed_at(&self) -> Timestamp {
        self.facts.claimed_at
    }

    /// A usage event for `model`, booked to the queue's service and the job's user (or
    /// [`SYSTEM_USER`]), with a request id unique to this run (`job:<queue>:<id>:<claim
    /// token>`): reporting the same run's usage twice counts once, and every new run (a retry,
    /// a run after a release, a revived dead job), which calls the API again, counts again.
    pub fn usage(&self, model: impl Into<String>) -> Usage {
        Usage::new(
            format!(
                "job:{}:{}:{}",
                self.facts.queue, self.facts.id, self.facts.token
            ),
            self.facts.service.as_ref(),
            self.user.as_deref().unwrap_or(SYSTEM_USER),
            model,
        )
    }

    /// Records `usage` (see [`usage`](Self::usage)) with the worker's cost meter. `None` when
    /// the worker has no meter.
    pub async fn record_cost(&self, usage: Usage) -> Result<Option<Recorded>> {
        match &self.facts.meter {
            Some(meter) => meter.record(usage).await.map(Some),
            None => Ok(None),
        }
    }
}

/// Why a handler did not complete its job.
#[derive(Debug)]
#[non_exhaustive]
pub enum JobError {
    /// Try again after the queue's backoff (or dead-letter it on its last attempt). What `?`
    /// on any error gives.
    Retry(BoxError),
    /// Do not try again: dead-letter it now.
    Fatal(BoxError),
    /// A provider said "too many requests": put the job back without spending an attempt and
    /// hold every process's claims on this queue for `retry_after`.
    RateLimited {
        /// How long the provider asked to wait.
        retry_after: Duration,
    },
}

impl JobError {
    /// A failure worth retrying.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        JobError::Retry(error.into())
    }

    /// A failure that retrying would not fix.
    pub fn fatal(error: impl Into<BoxError>) -> Self {
        JobError::Fatal(error.into())
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Retry(error) => write!(f, "{error}"),
            JobError::Fatal(error) => write!(f, "{error} (not retried)"),
            JobError::RateLimited { retry_after } => {
                write!(f, "rate-limited by the provider for {retry_after:?}")
            }
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(error: E) -> Self {
        JobError::Retry(Box::new(error))
    }
}

/// What runs a queue's jobs: any `Fn(Job<T>) -> impl Future<Output = Result<(), JobError>>`.
pub trait Handler<T>: Send + Sync + 'static {
    /// Runs one job.
    fn call(&self, job: Job<T>) -> BoxFuture<'static, std::result::Result<(), JobError>>;
}

impl<T, F, Fut> Handler<T> for F
where
    F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), JobError>> + Send + 'static,
{
    fn call(&self, job: Job<T>) -> BoxFuture<'static, std::result::Result<(), JobError>> {
        Box::pin(self(job))
    }
}

/// What happened to a job, as [`WorkerHandle::events`] reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct JobEvent {
    /// The queue.
    pub queue: String,
    /// The job.
    pub id: String,
    /// The attempt that ended.
    pub attempt: u32,
    /// How it ended.
    pub outcome: JobOutcome,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "error")]
#[non_exhaustive]
pub enum JobOutcome {
    /// Completed.
    Completed,
    /// Failed; it runs again after its backoff.
    Retried(String),
    /// Failed for good; it is in the dead letters.
    Dead(String),
    /// Given back without spending an attempt.
    Released,
    /// Its lease ran out while it ran: it was cancelled, and another worker may have it.
    LeaseLost,
}

/// How many events a slow [`WorkerHandle::events`] receiver may fall behind before it skips.
const EVENT_BUFFER: usize = 1_024;
/// The most jobs settled in one script call.
const SETTLE_BATCH: usize = 256;

/// A running job's cancellation reasons.
const RUNNING: u8 = 0;
const LEASE_LOST: u8 = 1;
const SHUTTING_DOWN: u8 = 2;

/// A worker for one queue: build it, then [`start`](Self::start) it with a handler.
///
/// ```no_run
/// # async fn run(queue: pupkit::jobs::Queue<String>) -> pupkit::Result<()> {
/// use std::time::Duration;
/// use pupkit::jobs::{Job, JobError, Worker, WorkerConfig};
///
/// let worker = Worker::new(queue, WorkerConfig::concurrency(20)).start(
///     |job: Job<String>| async move {
///         println!("embedding {:?}", job.data());
///         Ok::<(), JobError>(())
///     },
/// )?;
/// // ... on SIGTERM:
/// let report = worker.shutdown(Duration::from_secs(25)).await;
/// println!("released {} unfinished jobs", report.released);
/// # Ok(())
/// # }
/// ```
pub struct Worker<T> {
    queue: Queue<T>,
    config: WorkerConfig,
    meter: Option<Arc<dyn CostMeter>>,
}

impl<T> fmt::Debug for Worker<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Worker<T> {
    /// A worker for `queue`.
    pub fn new(queue: Queue<T>, config: WorkerConfig) -> Self {
        Worker {
            queue,
            config,
            meter: None,
        }
    }

    /// Jobs report their cost to `meter` (see [`Job::record_cost`]).
    pub fn cost_meter(mut self, meter: Arc<dyn CostMeter>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Starts claiming and running jobs with `handler`. Must be called inside a Tokio
    /// runtime.
    pub fn start(self, handler: impl Handler<T>) -> Result<WorkerHandle> {
        self.config.validate()?;
        let (start, min, max) = self.config.bounds();
        let name = self.queue.name().to_owned();
        let labels = vec![Label::new("queue", name.clone())];
        let (stop, _) = watch::channel(false);
        let (halt, _) = watch::channel(false);
        let core = Arc::new(Core {
            queue: name.clone(),
            lease: self.queue.config().lease,
            target: AtomicU32::new(start),
            min,
            max,
            running_count: AtomicU32::new(0),
            running: Mutex::new(HashMap::new()),
            slot_freed: Notify::new(),
            stop,
            halt,
            cancelling: AtomicBool::new(false),
            events: broadcast::channel(EVENT_BUFFER).0,
            counters: Counters::new(&labels),
            concurrency_gauge: metrics::gauge!("pupkit_job_worker_concurrency", labels.clone()),
            run_time: metrics::histogram!("pupkit_job_run_seconds", labels.clone()),
            wait_time: metrics::histogram!("pupkit_job_wait_seconds", labels),
            times: Mutex::new(Times::default()),
        });
        core.concurrency_gauge.set(f64::from(start));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let context = Arc::new(JobContext {
            queue: self.queue.clone(),
            handler: Arc::new(handler),
            service: self.queue.config().service_name().into(),
            name: name.into(),
            meter: self.meter,
            backoff: self.queue.config().backoff,
            job_timeout: self.config.job_timeout,
        });
        let mut tasks = vec![
            tokio::spawn(dispatch(
                core.clone(),
                context.clone(),
                self.config.clone(),
                settle_tx,
            )),
            tokio::spawn(settle_loop(core.clone(), self.queue.clone(), settle_rx)),
            tokio::spawn(heartbeat_loop(core.clone(), self.queue.clone())),
        ];
        if let Some(scaling) = self.config.scaling {
            tasks.push(tokio::spawn(scale_loop(
                core.clone(),
                self.queue.clone(),
                scaling.interval,
                scaling.down_after,
            )));
        }
        Ok(WorkerHandle { core, tasks })
    }
}

/// A running worker. [`shutdown`](Self::shutdown) stops it without losing a job; dropping the
/// handle only stops claiming (running jobs finish and settle).
pub struct WorkerHandle {
    core: Arc<Core>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("queue", &self.core.queue)
            .finish_non_exhaustive()
    }
}

/// A cloneable view of a worker's [`stats`](WorkerHandle::stats), that does not keep it
/// running.
#[derive(Clone)]
pub struct WorkerWatch(Arc<Core>);

impl WorkerWatch {
    /// The worker's counters and current concurrency.
    pub fn stats(&self) -> WorkerStats {
        self.0.stats()
    }
}

impl fmt::Debug for WorkerWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("WorkerWatch").field(&self.0.queue).finish()
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Jobs that finished (completed, retried or dead-lettered) after claiming stopped.
    pub finished: u64,
    /// Jobs given back to the queue without spending an attempt after claiming stopped: those
    /// still running at the deadline (cancelled), and any a provider's 429 released meanwhile.
    pub released: u64,
    /// The worker's final counters.
    pub stats: WorkerStats,
}

impl WorkerHandle {
    /// The worker's counters and current concurrency.
    pub fn stats(&self) -> WorkerStats {
        self.core.stats()
    }

    /// A cloneable view of this worker's stats, for a health report or a dashboard.
    pub fn watch(&self) -> WorkerWatch {
        WorkerWatch(self.core.clone())
    }

    /// Every attempt's end, as it is settled. A receiver that falls more than 1,024 events
    /// behind skips ahead.
    pub fn events(&self) -> broadcast::Receiver<JobEvent> {
        self.core.events.subscribe()
    }

    /// Stops claiming, lets running jobs finish for up to `grace`, then cancels the rest and
    /// gives them back to the queue without spending an attempt; every finished job is
    /// settled before this returns.
    pub async fn shutdown(mut self, grace: Duration) -> ShutdownReport {
        let core = self.core.clone();
        let c = &core.counters;
        let settled = || c.completed.get() + c.retried.get() + c.dead.get();
        let (settled_before, released_before) = (settled(), c.released.get());
        core.stop.send_replace(true);
        // The dispatcher is the first task; once it has returned, nothing more is claimed.
        if !self.tasks.is_empty() {
            let _ = self.tasks.remove(0).await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while core.running_count.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        {
            // Set under the lock, so a job registering itself after the sweep sees it.
            let running = core.lock_running();
            core.cancelling.store(true, Ordering::Release);
            for job in running.values() {
                job.reason.store(SHUTTING_DOWN, Ordering::Release);
                job.abort.abort();
            }
        }
        while core.running_count.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        core.halt.send_replace(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        ShutdownReport {
            finished: settled() - settled_before,
            released: c.released.get() - released_before,
            stats: core.stats(),
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.core.stop.send_replace(true);
        if self.tasks.is_empty() {
            return;
        }
        // Not shut down: running jobs finish, and their leases are renewed until they have.
        let core = self.core.clone();
        let mut tasks = std::mem::take(&mut self.tasks);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // A claim in flight may still add jobs until the dispatcher returns.
                let _ = tasks.remove(0).await;
                while core.running_count.load(Ordering::Acquire) > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                core.halt.send_replace(true);
                for task in tasks {
                    let _ = task.await;
                }
            });
        }
    }
}

/// The state a worker's tasks share; not generic, so a handle is one type for every queue.
struct Core {
    queue: String,
    lease: Duration,
    target: AtomicU32,
    min: u32,
    max: u32,
    running_count: AtomicU32,
    running: Mutex<HashMap<String, RunningJob>>,
    slot_freed: Notify,
    /// Stop claiming.
    stop: watch::Sender<bool>,
    /// Stop renewing leases and scaling (after the last job ended).
    halt: watch::Sender<bool>,
    /// Set when shutdown cancels what still runs: a job that registers after it cancels
    /// itself.
    cancelling: AtomicBool,
    events: broadcast::Sender<JobEvent>,
    counters: Counters,
    concurrency_gauge: metrics::Gauge,
    run_time: metrics::Histogram,
    wait_time: metrics::Histogram,
    times: Mutex<Times>,
}

/// A running job, in the map keyed by its claim's token (an id can be claimed again while an
/// older run of it still ends).
struct RunningJob {
    id: String,
    abort: AbortHandle,
    reason: Arc<AtomicU8>,
}

#[derive(Default)]
struct Times {
    runs: u64,
    run_total: f64,
    run_max: f64,
    waits: u64,
    wait_total: f64,
}

struct Counters {
    claimed: Tally,
    completed: Tally,
    retried: Tally,
    dead: Tally,
    panicked: Tally,
    timed_out: Tally,
    lease_lost: Tally,
    released: Tally,
    claim_calls: Tally,
    settle_calls: Tally,
    heartbeat_calls: Tally,
    redis_errors: Tally,
}

impl Counters {
    fn new(labels: &[Label]) -> Self {
        let tally = |outcome: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(Label::new("outcome", outcome));
            Tally::new("pupkit_jobs_total", labels)
        };
        let call = |script: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(Label::new("script", script));
            Tally::new("pupkit_job_redis_calls_total", labels)
        };
        Counters {
            claimed: tally("claimed"),
            completed: tally("completed"),
            retried: tally("retried"),
            dead: tally("dead"),
            panicked: tally("panicked"),
            timed_out: tally("timed_out"),
            lease_lost: tally("lease_lost"),
            released: tally("released"),
            claim_calls: call("claim"),
            settle_calls: call("settle"),
            heartbeat_calls: call("heartbeat"),
            redis_errors: Tally::new("pupkit_job_redis_errors_total", labels.to_vec()),
        }
    }
}

impl Core {
    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningJob>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> WorkerStats {
        let c = &self.counters;
        let times = self.lock_times();
        let mean = |total: f64, n: u64| if n == 0 { 0.0 } else { total / n as f64 };
        WorkerStats {
            queue: self.queue.clone(),
            concurrency: self.target.load(Ordering::Relaxed),
            running: self.running_count.load(Ordering::Relaxed),
            claimed: c.claimed.get(),
            completed: c.completed.get(),
            retried: c.retried.get(),
            dead: c.dead.get(),
            panicked: c.panicked.get(),
            timed_out: c.timed_out.get(),
            lease_lost: c.lease_lost.get(),
            released: c.released.get(),
            claim_calls: c.claim_calls.get(),
            settle_calls: c.settle_calls.get(),
            heartbeat_calls: c.heartbeat_calls.get(),
            redis_errors: c.redis_errors.get(),
            mean_wait_ms: mean(times.wait_total, times.waits),
            mean_run_ms: mean(times.run_total, times.runs),
            max_run_ms: times.run_max,
        }
    }

    /// One job's wait from enqueue to start, in ms.
    fn record_wait(&self, wait_ms: f64) {
        self.wait_time.record(wait_ms / 1e3);
        let mut times = self.lock_times();
        times.waits += 1;
        times.wait_total += wait_ms;
    }

    /// One handler's run time.
    fn record_run(&self, run: Duration) {
        let run = run.as_secs_f64();
        self.run_time.record(run);
        let mut times = self.lock_times();
        times.runs += 1;
        times.run_total += run * 1e3;
        times.run_max = times.run_max.max(run * 1e3);
    }

    fn set_target(&self, target: u32) {
        self.target.store(target, Ordering::Release);
        self.concurrency_gauge.set(f64::from(target));
        self.slot_freed.notify_one();
    }

    fn event(&self, job: &ClaimedJob, outcome: JobOutcome) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(JobEvent {
                queue: self.queue.clone(),
                id: job.id.clone(),
                attempt: job.attempt,
                outcome,
            });
        }
    }
}

/// What every job of one worker shares.
struct JobContext<T> {
    queue: Queue<T>,
    handler: Arc<dyn Handler<T>>,
    name: Arc<str>,
    service: Arc<str>,
    meter: Option<Arc<dyn CostMeter>>,
    backoff: Backoff,
    job_timeout: Duration,
}

/// A finished job on its way to the settle script.
struct Finished {
    job: ClaimedJob,
    settle: Settle,
    /// After this, its lease has run out and settling it is pointless.
    lease_ends: Instant,
}

/// Claims jobs while there are free slots; waits on the marker (on a dedicated connection)
/// when there is nothing to claim, or sleeps while the queue is rate-limited.
async fn dispatch<T: Serialize + DeserializeOwned + Send + Sync + 'static>(
    core: Arc<Core>,
    context: Arc<JobContext<T>>,
    config: WorkerConfig,
    settle_tx: mpsc::UnboundedSender<Finished>,
) {
    let mut stop = core.stop.subscribe();
    let mut blocker: Option<redis::aio::MultiplexedConnection> = None;
    let mut failures = 0u32;
    let retry = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        let target = core.target.load(Ordering::Acquire);
        let free = target.saturating_sub(core.running_count.load(Ordering::Acquire));
        if free == 0 {
            tokio::select! {
                _ = core.slot_freed.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        core.counters.claim_calls.add(1);
        let claimed = match context.queue.claim(free.min(config.claim_batch)).await {
            Ok(claimed) => claimed,
            Err(error) => {
                core.counters.redis_errors.add(1);
                tracing::warn!(queue = %core.queue, %error, "claiming jobs failed; retrying");
                let wait = retry.delay(failures);
                failures = failures.saturating_add(1);
                sleep_or_stop(wait, &mut stop).await;
                continue;
            }
        };
        failures = 0;
        let count = claimed.jobs.len() as u64;
        core.counters.claimed.add(count);
        for job in claimed.jobs {
            core.running_count.fetch_add(1, Ordering::AcqRel);
            tokio::spawn(run_job(
                core.clone(),
                context.clone(),
                job,
                claimed.now_ms,
                settle_tx.clone(),
            ));
        }
        match claimed.next {
            Next::Again => {}
            Next::Sleep(wait) => sleep_or_stop(wait, &mut stop).await,
            Next::Block(limit) => {
                let wait = limit.map_or(config.idle_wait, |l| l.min(config.idle_wait));
                if !wait.is_zero() {
                    wait_for_work(&core, &context.queue, &mut blocker, wait, &mut stop).await;
                }
            }
        }
    }
}

async fn sleep_or_stop(wait: Duration, stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = stop.changed() => {}
    }
}

/// Blocks on the queue's marker with `BLPOP` on this worker's own connection (a blocking
/// command on the shared multiplexed connection would hold up every other command).
async fn wait_for_work<T: Serialize + DeserializeOwned + Send + Sync + 'static>(
    core: &Core,
    queue: &Queue<T>,
    blocker: &mut Option<redis::aio::MultiplexedConnection>,
    wait: Duration,
    stop: &mut watch::Receiver<bool>,
) {
    if blocker.is_none() {
        match queue.connection().dedicated().await {
            Ok(connection) => *blocker = Some(connection),
            Err(error) => {
                core.counters.redis_errors.add(1);
                tracing::warn!(queue = %core.queue, %error, "opening the wake-up connection failed");
                sleep_or_stop(wait.min(Duration::from_millis(200)), stop).await;
                return;
            }
        }
    }
    let Some(connection) = blocker.as_mut() else {
        return;
    };
    let mut blpop = redis::cmd("BLPOP");
    blpop
        .arg(queue.marker_key())
        .arg(wait.as_secs_f64().max(0.01));
    let answer = tokio::select! {
        answer = tokio::time::timeout(
            wait + Duration::from_secs(2),
            blpop.query_async::<Option<(String, String)>>(connection),
        ) => answer,
        _ = stop.changed() => {
            // The connection is mid-command; it is not reused.
            *blocker = None;
            return;
        }
    };
    if !matches!(answer, Ok(Ok(_))) {
        core.counters.redis_errors.add(1);
        *blocker = None;
        sleep_or_stop(Duration::from_millis(50), stop).await;
    }
}

/// Runs one job in its own task (so a panic or a cancel is contained), with the job timeout,
/// then hands the outcome to the settle loop.
async fn run_job<T: Serialize + DeserializeOwned + Send + Sync + 'static>(
    core: Arc<Core>,
    context: Arc<JobContext<T>>,
    mut job: ClaimedJob,
    now_ms: i64,
    settle_tx: mpsc::UnboundedSender<Finished>,
) {
    // Frees the slot on every way out.
    let _slot = SlotGuard(core.clone());
    core.record_wait((now_ms - job.enqueued_ms).max(0) as f64);
    let started = Instant::now();
    let reason = Arc::new(AtomicU8::new(RUNNING));
    // Decoding (the payload's `Deserialize`) and the handler's call run in the job's own task
    // too: a panic anywhere in them fails the attempt, and nothing else.
    let payload = std::mem::take(&mut job.payload);
    let handler = context.handler.clone();
    let handed = JobFacts {
        id: job.id.clone(),
        token: job.token.clone(),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        priority: job.priority,
        enqueued_at: timestamp(job.enqueued_ms),
        claimed_at: timestamp(now_ms),
        queue: context.name.clone(),
        service: context.service.clone(),
        meter: context.meter.clone(),
    };
    let mut task = tokio::spawn(async move {
        let (data, user) = decode_payload::<T>(&payload).map_err(JobError::fatal)?;
        handler.call(handed.into_job(data, user)).await
    });
    {
        let mut running = core.lock_running();
        if core.cancelling.load(Ordering::Acquire) {
            reason.store(SHUTTING_DOWN, Ordering::Release);
            task.abort();
        }
        running.insert(
            job.token.clone(),
            RunningJob {
                id: job.id.clone(),
                abort: task.abort_handle(),
                reason: reason.clone(),
            },
        );
    }
    let ended = tokio::time::timeout(context.job_timeout, &mut task).await;
    core.lock_running().remove(&job.token);
    let settle = match ended {
        Ok(Ok(Ok(()))) => Some(Settle::Complete),
        Ok(Ok(Err(JobError::Retry(error)))) => Some(context.fail(&job, error.to_string())),
        Ok(Ok(Err(JobError::Fatal(error)))) => Some(Settle::Bury {
            error: error.to_string(),
        }),
        Ok(Ok(Err(JobError::RateLimited { retry_after }))) => {
            if let Err(error) = context.queue.limit_for(retry_after).await {
                tracing::warn!(queue = %core.queue, %error, "holding claims after a 429 failed");
            }
            Some(Settle::Release {
                delay: Duration::ZERO,
            })
        }
        Ok(Err(join)) if join.is_panic() => {
            core.counters.panicked.add(1);
            let message = panic_message(join.into_panic());
            tracing::error!(queue = %core.queue, id = %job.id, %message, "job handler panicked");
            Some(context.fail(&job, format!("the handler panicked: {message}")))
        }
        Ok(Err(_cancelled)) => match reason.load(Ordering::Acquire) {
            LEASE_LOST => {
                core.counters.lease_lost.add(1);
                core.event(&job, JobOutcome::LeaseLost);
                None
            }
            SHUTTING_DOWN => Some(Settle::Release {
                delay: Duration::ZERO,
            }),
            _ => Some(context.fail(&job, "the handler was cancelled".to_owned())),
        },
        Err(_elapsed) => {
            task.abort();
            core.counters.timed_out.add(1);
            Some(context.fail(
                &job,
                format!(
                    "timed out after {:?} and was cancelled",
                    context.job_timeout
                ),
            ))
        }
    };
    core.record_run(started.elapsed());
    if let Some(settle) = settle {
        let _ = settle_tx.send(Finished {
            job,
            settle,
            lease_ends: Instant::now() + core.lease,
        });
    }
}

/// One claimed job's slot: given back when the job's supervisor ends, however it ends.
struct SlotGuard(Arc<Core>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.running_count.fetch_sub(1, Ordering::AcqRel);
        self.0.slot_freed.notify_one();
    }
}

/// What a [`Job`] carries besides its data, gathered before the payload is decoded.
struct JobFacts {
    id: String,
    /// The claim's fencing token: unique per claim, across restarts of Redis too.
    token: String,
    attempt: u32,
    max_attempts: u32,
    priority: Priority,
    enqueued_at: Timestamp,
    claimed_at: Timestamp,
    queue: Arc<str>,
    service: Arc<str>,
    meter: Option<Arc<dyn CostMeter>>,
}

impl JobFacts {
    fn into_job<T>(self, data: T, user: Option<String>) -> Job<T> {
        Job {
            facts: self,
            data,
            user,
        }
    }
}

impl<T> JobContext<T> {
    /// A failed attempt: retried after the backoff for this attempt.
    fn fail(&self, job: &ClaimedJob, error: String) -> Settle {
        Settle::Fail {
            delay: self.backoff.delay(job.attempt.saturating_sub(1)),
            error,
        }
    }
}

fn timestamp(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic".to_owned()
    }
}

/// Settles finished jobs in batches: whatever finished while the previous call was in flight
/// goes in the next one. A failed call is retried until the jobs' leases would have run out
/// (they are then handed out again: at-least-once).
async fn settle_loop<T: Serialize + DeserializeOwned + Send + Sync + 'static>(
    core: Arc<Core>,
    queue: Queue<T>,
    mut finished: mpsc::UnboundedReceiver<Finished>,
) {
    let retry = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    let mut batch: Vec<Finished> = Vec::with_capacity(SETTLE_BATCH);
    while let Some(first) = finished.recv().await {
        batch.push(first);
        while batch.len() < SETTLE_BATCH {
            match finished.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut failures = 0;
        while !batch.is_empty() {
            core.counters.settle_calls.add(1);
            let pairs: Vec<(&ClaimedJob, &Settle)> =
                batch.iter().map(|f| (&f.job, &f.settle)).collect();
            match queue.settle(&pairs).await {
                Ok(results) => {
                    for (done, result) in batch.iter().zip(results) {
                        account(&core, done, result);
                    }
                    batch.clear();
                }
                Err(error) => {
                    core.counters.redis_errors.add(1);
                    tracing::warn!(queue = %core.queue, %error, jobs = batch.len(), "settling jobs failed; retrying");
                    let now = Instant::now();
                    batch.retain(|f| f.lease_ends > now);
                    tokio::time::sleep(retry.delay(failures)).await;
                    failures += 1;
                }
            }
        }
    }
}

fn account(core: &Core, done: &Finished, result: Settled) {
    let c = &core.counters;
    let error = || match &done.settle {
        Settle::Fail { error, .. } | Settle::Bury { error } => error.clone(),
        _ => String::new(),
    };
    match (result, &done.settle) {
        (Settled::LeaseLost, _) => {
            c.lease_lost.add(1);
            core.event(&done.job, JobOutcome::LeaseLost);
        }
        (Settled::Done, Settle::Complete) => {
            c.completed.add(1);
            core.event(&done.job, JobOutcome::Completed);
        }
        (Settled::Done, Settle::Fail { .. }) => {
            c.retried.add(1);
            core.event(&done.job, JobOutcome::Retried(error()));
        }
        (Settled::Dead, _) | (Settled::Done, Settle::Bury { .. }) => {
            c.dead.add(1);
            tracing::warn!(queue = %core.queue, id = %done.job.id, error = %error(), "job dead-lettered");
            core.event(&done.job, JobOutcome::Dead(error()));
        }
        (Settled::Done, Settle::Release { .. }) => {
            c.released.add(1);
            core.event(&done.job, JobOutcome::Released);
        }
    }
}

/// Renews every running job's lease in one call every third of the lease; a job whose lease
/// is no longer ours is cancelled.
async fn heartbeat_loop<T: Serialize + DeserializeOwned + Send + Sync + 'static>(
    core: Arc<Core>,
    queue: Queue<T>,
) {
    let mut halt = core.halt.subscribe();
    let beat = core.lease / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(beat) => {}
            _ = halt.changed() => break,
        }
        let leases: Vec<(String, String)> = core
            .lock_running()
            .iter()
            .map(|(token, job)| (job.id.clone(), token.clone()))
            .collect();
        if leases.is_empty() {
            continue;
        }
        core.counters.heartbeat_calls.add(1);
        match queue.heartbeat(&leases).await {
            Ok(lost) => {
                let running = core.lock_running();
                for token in lost {
                    if let Some(job) = running.get(&token) {
                        tracing::warn!(queue = %core.queue, id = %job.id, "lease lost; cancelling the job");
                        job.reason.store(LEASE_LOST, Ordering::Release);
                        job.abort.abort();
                    }
                }
            }
            Err(error) => {
                core.counters.redis_errors.add(1);
                tracing::warn!(queue = %core.queue, %error, "renewing leases failed");
            }
        }
    }
}

/// Moves the worker's slots between min and max on the queue's backlog: up at once when every
/// slot is busy and jobs wait, down by half the idle slots after `down_after` quiet reads.
async fn scale_loop<T: Serialize + DeserializeOwned + Send + Sync + 'static>(
    core: Arc<Core>,
    queue: Queue<T>,
    interval: Duration,
    down_after: u32,
) {
    let mut halt = core.halt.subscribe();
    let mut quiet = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = halt.changed() => break,
        }
        let backlog = match queue.backlog().await {
            Ok(backlog) => backlog,
            Err(_) => {
                core.counters.redis_errors.add(1);
                continue;
            }
        };
        let target = core.target.load(Ordering::Acquire);
        let running = core.running_count.load(Ordering::Acquire);
        let (next, next_quiet) = next_target(
            target, running, backlog, core.min, core.max, quiet, down_after,
        );
        quiet = next_quiet;
        if next != target {
            tracing::debug!(queue = %core.queue, from = target, to = next, backlog, "scaling");
            core.set_target(next);
        }
    }
}

/// The scaling rule: returns the next target and the count of quiet reads.
fn next_target(
    target: u32,
    running: u32,
    backlog: u64,
    min: u32,
    max: u32,
    quiet: u32,
    down_after: u32,
) -> (u32, u32) {
    if backlog > 0 && running >= target && target < max {
        let wanted = u64::from(running).saturating_add(backlog);
        return (wanted.min(u64::from(max)) as u32, 0);
    }
    if backlog == 0 && running < target && target > min {
        let quiet = quiet + 1;
        if quiet >= down_after {
            let step = ((target - running) / 2).max(1);
            return ((target - step).max(min), 0);
        }
        return (target, quiet);
    }
    (target, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_goes_up_at_once_and_down_slowly() {
        // Saturated with a backlog: up to running + backlog, capped at max.
        assert_eq!(next_target(2, 2, 3, 1, 20, 0, 3), (5, 0));
        assert_eq!(next_target(2, 2, 300, 1, 20, 0, 3), (20, 0));
        // Idle: down only after three quiet reads, by half of the idle slots.
        assert_eq!(next_target(20, 4, 0, 1, 20, 0, 3), (20, 1));
        assert_eq!(next_target(20, 4, 0, 1, 20, 1, 3), (20, 2));
        assert_eq!(next_target(20, 4, 0, 1, 20, 2, 3), (12, 0));
        // Never below min; a busy read resets the count.
        assert_eq!(next_target(2, 0, 0, 2, 20, 5, 3), (2, 0));
        assert_eq!(next_target(10, 10, 0, 1, 20, 2, 3), (10, 0));
    }

    #[test]
    fn panic_messages_are_read_from_text_payloads() {
        assert_eq!(panic_message(Box::new("boom")), "boom");
        assert_eq!(panic_message(Box::new(String::from("bang"))), "bang");
        assert_eq!(panic_message(Box::new(7_u8)), "a non-text panic");
    }

    #[test]
    fn any_error_converts_to_a_retry() {
        let error: JobError = std::io::Error::other("disk").into();
        assert!(matches!(error, JobError::Retry(_)));
        assert_eq!(
            JobError::fatal("bad input").to_string(),
            "bad input (not retried)"
        );
    }
}
