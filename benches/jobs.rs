//! The job queue against raw Redis list baselines, in one run:
//! - enqueue throughput: `Queue::enqueue` one job at a time from 64 tasks vs raw `LPUSH` of the
//!   same JSON payload from 64 tasks on one multiplexed connection (a bare list queue), and
//!   `enqueue_many` in batches of 100 vs raw `LPUSH` of 100 values per call; each sample
//!   writes to new keys, deleted once it is timed;
//! - processing throughput of 100,000 no-op jobs (pre-enqueued with `enqueue_many` into a
//!   paused queue, timed from `resume` until every job is completed) by 1 and 2 `job_worker`
//!   processes (the example, built in release; its handler makes one `HINCRBY` per job) and by
//!   a `Worker` in this process, vs a raw list of the same payloads drained by as many tasks
//!   doing `RPOP key 32` and nothing else (a hand-rolled queue with no lease, retry or
//!   acknowledgement). Processes are watched with `Queue::stats()` every 50 ms, and the end of
//!   a drain is interpolated within the last interval from the rate before it; the in-process
//!   worker is watched on its own counters, with no Redis call;
//! - Redis round trips per processed job, from `INFO commandstats` before and after each drain:
//!   the commands the workers sent (EVALSHA, EVAL, SCRIPT LOAD, BLPOP: nothing else sends
//!   them), and every command Redis executed, those inside the scripts included (Redis counts
//!   those too), less the bench's own stats polls (counted), its `resume` and the example
//!   handler's `HINCRBY`s.
//!
//! `cargo bench --bench jobs --features redis` (Redis at `PUPKIT_REDIS_URL`, default local).
//! The bench builds the `job_worker` example with
//! `cargo build --release --features redis --example job_worker` first (with `$CARGO`, into
//! `$CARGO_TARGET_DIR` if set). Every key it writes is under `pkbench-jobs-<pid>-<n>` and is
//! deleted (SCAN MATCH + DEL) after use, with a final sweep at the end.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use pupkit::jobs::{
    EnqueueOptions, Job, JobError, Queue, QueueConfig, Worker, WorkerConfig, WorkerHandle,
    WorkerStats,
};
use pupkit::redis::{RedisConfig, RedisConnection};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

/// Producer tasks of the concurrent enqueue.
const TASKS: usize = 64;
/// Jobs per `enqueue_many` (and values per raw `LPUSH`).
const BATCH: usize = 100;
/// No-op jobs per drain: enough for a drain to last well over a second, so that polling every
/// 50 ms blurs its end by little.
const DRAIN_JOBS: u64 = 100_000;
/// Jobs per `enqueue_many` when filling a queue to drain.
const FILL_BATCH: u64 = 1_000;
/// Drains per variant; the median time is reported.
const RUNS: usize = 3;
/// Each worker's slots and claim batch (the baseline pops as many per call).
const WORKER_CONCURRENCY: u32 = 64;
const CLAIM_BATCH: u32 = 32;
/// The shortest interval between two `Queue::stats()` polls.
const POLL: Duration = Duration::from_millis(50);
/// Commands in one `Queue::stats()` (4 ZCARD, HEXISTS, HGETALL) and one `resume()`
/// (MULTI, HDEL, LPUSH, LTRIM, EXEC).
const STATS_COMMANDS: u64 = 6;
const RESUME_COMMANDS: u64 = 5;
const QUEUE: &str = "bench";

static NEXT_PREFIX: AtomicU64 = AtomicU64::new(0);

/// An enqueue benchmark's job: a small embedding request.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct EmbedText {
    doc_id: u64,
    text: String,
}

fn embed(doc_id: u64) -> EmbedText {
    EmbedText {
        doc_id,
        text: "The quick brown fox jumps over the lazy dog.".to_owned(),
    }
}

/// The stored form of a job enqueued without a user: the bytes the queue keeps, which the raw
/// baselines push too.
#[derive(Serialize)]
struct Envelope<'a, T> {
    data: &'a T,
}

fn payload<T: Serialize>(data: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope { data }).unwrap()
}

fn redis_url() -> String {
    std::env::var("PUPKIT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// What every key of this run starts with.
fn base_prefix() -> String {
    format!("pkbench-jobs-{}", std::process::id())
}

/// A prefix no other queue or list of this run uses.
fn unique_prefix() -> String {
    format!(
        "{}-{}",
        base_prefix(),
        NEXT_PREFIX.fetch_add(1, Ordering::Relaxed)
    )
}

async fn raw_redis() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis for the benchmark")
}

/// A connection for the bench's own bookkeeping (INFO, SCAN, DEL of large keys): no response
/// timeout of redis-rs's own.
async fn admin_redis() -> MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("Redis for the benchmark")
}

/// Deletes every key matching `patterns` (SCAN MATCH + DEL); returns how many.
async fn delete_matching(patterns: &[String]) -> usize {
    let mut admin = admin_redis().await;
    let mut deleted = 0;
    for pattern in patterns {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut admin)
                .await
                .unwrap();
            if !keys.is_empty() {
                deleted += keys.len();
                let _: u64 = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    deleted
}

/// Deletes the keys of one prefix: its queues' `{<prefix>:q:<name>}:*` and `<prefix>:*`.
async fn delete_prefix(prefix: &str) {
    delete_matching(&[format!("{{{prefix}:q:*"), format!("{prefix}:*")]).await;
}

/// A queue under a new prefix, for one sample (its keys are deleted after it).
async fn sample_queue(connection: &RedisConnection) -> (String, Queue<EmbedText>) {
    let prefix = unique_prefix();
    let queue = Queue::open(
        connection.clone(),
        QueueConfig::named(QUEUE).prefix(prefix.clone()),
    )
    .await
    .unwrap();
    (prefix, queue)
}

/// Each sample writes to new keys and deletes them once timed, so no sample works on a queue
/// or list that the ones before it grew.
fn enqueue(c: &mut Criterion, rt: &Runtime, connection: &RedisConnection) {
    let raw = rt.block_on(raw_redis());

    let mut group = c.benchmark_group("jobs_enqueue_64_tasks");
    group.throughput(Throughput::Elements(1));
    group.bench_function("pupkit", |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let (prefix, queue) = sample_queue(connection).await;
            let per_task = iters.div_ceil(TASKS as u64);
            let started = Instant::now();
            let tasks: Vec<_> = (0..TASKS as u64)
                .map(|t| {
                    let queue = queue.clone();
                    tokio::spawn(async move {
                        let options = EnqueueOptions::new();
                        for i in 0..per_task {
                            queue
                                .enqueue(&embed(t * per_task + i), &options)
                                .await
                                .unwrap();
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            let elapsed = started.elapsed();
            delete_prefix(&prefix).await;
            elapsed
        })
    });
    group.bench_function("raw_lpush", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let raw = raw.clone();
            async move {
                let prefix = unique_prefix();
                let list = format!("{prefix}:list");
                let per_task = iters.div_ceil(TASKS as u64);
                let started = Instant::now();
                let tasks: Vec<_> = (0..TASKS as u64)
                    .map(|t| {
                        let mut raw = raw.clone();
                        let list = list.clone();
                        tokio::spawn(async move {
                            for i in 0..per_task {
                                let _: i64 = redis::cmd("LPUSH")
                                    .arg(&list)
                                    .arg(payload(&embed(t * per_task + i)))
                                    .query_async(&mut raw)
                                    .await
                                    .unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                let elapsed = started.elapsed();
                delete_prefix(&prefix).await;
                elapsed
            }
        })
    });
    group.finish();

    let jobs: Vec<EmbedText> = (0..BATCH as u64).map(embed).collect();
    let mut group = c.benchmark_group("jobs_enqueue_many_100");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("pupkit", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let jobs = jobs.clone();
            async move {
                let (prefix, queue) = sample_queue(connection).await;
                let options = EnqueueOptions::new();
                let started = Instant::now();
                for _ in 0..iters {
                    let added = queue
                        .enqueue_many(jobs.iter().map(|job| (job, &options)))
                        .await
                        .unwrap();
                    assert_eq!(added.len(), BATCH);
                }
                let elapsed = started.elapsed();
                delete_prefix(&prefix).await;
                elapsed
            }
        })
    });
    group.bench_function("raw_lpush_100", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let mut raw = raw.clone();
            let jobs = jobs.clone();
            async move {
                let prefix = unique_prefix();
                let list = format!("{prefix}:list");
                let started = Instant::now();
                for _ in 0..iters {
                    let values: Vec<Vec<u8>> = jobs.iter().map(payload).collect();
                    let _: i64 = redis::cmd("LPUSH")
                        .arg(&list)
                        .arg(values)
                        .query_async(&mut raw)
                        .await
                        .unwrap();
                }
                let elapsed = started.elapsed();
                delete_prefix(&prefix).await;
                elapsed
            }
        })
    });
    group.finish();
}

/// Calls per command so far, from `INFO commandstats` (`cmdstat_<name>:calls=<n>,...`).
async fn commandstats(raw: &mut MultiplexedConnection) -> HashMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(raw)
        .await
        .unwrap();
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// The Redis calls of drains, summed.
#[derive(Clone, Copy, Debug, Default)]
struct Calls {
    jobs: u64,
    /// EVALSHA + EVAL + SCRIPT LOAD + BLPOP: commands only clients send.
    round_trips: u64,
    evalsha: u64,
    blpop: u64,
    /// Every command executed, those inside scripts included, less the bench's own and the
    /// example handler's.
    executed: u64,
    /// The claim, settle and heartbeat calls the workers counted themselves (their lifetime,
    /// start and shutdown included).
    worker_scripts: u64,
}

impl Calls {
    fn of(
        before: &HashMap<String, u64>,
        after: &HashMap<String, u64>,
        polls: u64,
        handler_calls: u64,
    ) -> Calls {
        let delta = |name: &str| {
            let count = |stats: &HashMap<String, u64>| stats.get(name).copied().unwrap_or(0);
            count(after).saturating_sub(count(before))
        };
        let evalsha = delta("evalsha");
        let blpop = delta("blpop");
        let all: u64 = after
            .keys()
            .filter(|name| name.as_str() != "info")
            .map(|name| delta(name))
            .sum();
        Calls {
            jobs: DRAIN_JOBS,
            round_trips: evalsha + delta("eval") + delta("script|load") + blpop,
            evalsha,
            blpop,
            executed: all.saturating_sub(polls * STATS_COMMANDS + RESUME_COMMANDS + handler_calls),
            worker_scripts: 0,
        }
    }

    fn add(&mut self, other: &Calls) {
        self.jobs += other.jobs;
        self.round_trips += other.round_trips;
        self.evalsha += other.evalsha;
        self.blpop += other.blpop;
        self.executed += other.executed;
        self.worker_scripts += other.worker_scripts;
    }

    fn per_job(&self, calls: u64) -> f64 {
        calls as f64 / self.jobs.max(1) as f64
    }
}

fn script_calls(stats: &WorkerStats) -> u64 {
    stats.claim_calls + stats.settle_calls + stats.heartbeat_calls
}

/// One drain: how long it took and what it cost in Redis calls.
struct Drain {
    elapsed: Duration,
    calls: Calls,
}

/// Opens a paused queue under a new prefix and fills it with `DRAIN_JOBS` numbers.
async fn paused_queue(connection: &RedisConnection) -> (String, Queue<u64>) {
    let prefix = unique_prefix();
    let queue: Queue<u64> = Queue::open(
        connection.clone(),
        QueueConfig::named(QUEUE).prefix(prefix.clone()),
    )
    .await
    .unwrap();
    queue.pause().await.unwrap();
    let options = EnqueueOptions::new();
    for start in (0..DRAIN_JOBS).step_by(FILL_BATCH as usize) {
        let jobs: Vec<u64> = (start..(start + FILL_BATCH).min(DRAIN_JOBS)).collect();
        queue
            .enqueue_many(jobs.iter().map(|job| (job, &options)))
            .await
            .unwrap();
    }
    (prefix, queue)
}

/// When the last job completed: the last poll saw every job done and the one before did not;
/// the end is estimated from the rate over the interval before that, within the last interval.
fn interpolate(seen: &[(Duration, u64)], last_poll: Duration) -> Duration {
    let [.., (t0, c0), (t1, c1)] = seen else {
        return last_poll;
    };
    if c1 <= c0 || t1 <= t0 {
        return last_poll;
    }
    let rate = (c1 - c0) as f64 / (*t1 - *t0).as_secs_f64();
    let estimate = *t1 + Duration::from_secs_f64((DRAIN_JOBS - c1) as f64 / rate);
    estimate.clamp(*t1, last_poll)
}

/// Resumes the paused queue and times it until every job is completed: on the worker's own
/// counter when it runs in this process (no Redis call), else on `Queue::stats()` polled every
/// 50 ms. Returns the time, the polls made and the command counts before and after.
async fn timed_drain(
    queue: &Queue<u64>,
    raw: &mut MultiplexedConnection,
    local: Option<&WorkerHandle>,
) -> (Duration, u64, HashMap<String, u64>, HashMap<String, u64>) {
    // Let the workers block on the wake-up marker.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = commandstats(raw).await;
    let started = Instant::now();
    queue.resume().await.unwrap();
    let mut polls = 0;
    let mut seen = vec![(Duration::ZERO, 0)];
    let elapsed = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the drain stalled: {:?}",
            queue.stats().await
        );
        match local {
            Some(worker) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if worker.stats().completed >= DRAIN_JOBS {
                    break started.elapsed();
                }
            }
            None => {
                tokio::time::sleep(POLL).await;
                polls += 1;
                let completed = queue.stats().await.unwrap().completed;
                let at = started.elapsed();
                if completed >= DRAIN_JOBS {
                    break interpolate(&seen, at);
                }
                seen.push((at, completed));
            }
        }
    };
    let after = commandstats(raw).await;
    (elapsed, polls, before, after)
}

/// Every job completed once, none failed or is left.
async fn check_drained(queue: &Queue<u64>) {
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.completed, DRAIN_JOBS, "{stats:?}");
    assert_eq!(
        (
            stats.pending,
            stats.active,
            stats.delayed,
            stats.dead,
            stats.failed
        ),
        (0, 0, 0, 0, 0),
        "{stats:?}"
    );
    if stats.stalled > 0 || stats.released > 0 {
        println!(
            "  note: {} leases ran out and {} jobs were released during the drain",
            stats.stalled, stats.released
        );
    }
}

/// A `job_worker` process: its stdout lines arrive on a channel; it is killed if dropped
/// while still running.
struct WorkerProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl WorkerProcess {
    fn spawn(binary: &Path, prefix: &str) -> WorkerProcess {
        let mut child = Command::new(binary)
            .args([
                prefix,
                QUEUE,
                "--concurrency",
                &WORKER_CONCURRENCY.to_string(),
                "--batch",
                &CLAIM_BATCH.to_string(),
            ])
            .env("PUPKIT_REDIS_URL", redis_url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        WorkerProcess {
            child,
            lines,
            stderr: Some(stderr),
        }
    }

    fn wait_ready(&mut self) {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.trim() == "ready" => return,
                Ok(_) => {}
                Err(e) => panic!(
                    "job_worker did not print `ready` ({e}): {}",
                    self.stderr_text()
                ),
            }
        }
    }

    fn stderr_text(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    /// SIGINT, then waits for a graceful exit and reads the stats line it prints.
    fn interrupt(mut self) -> WorkerStats {
        let sent = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -INT failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "job_worker did not exit after SIGINT"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let stats = self
            .lines
            .iter()
            .find_map(|line| serde_json::from_str::<WorkerStats>(&line).ok());
        let stderr = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        match stats {
            Some(stats) if status.success() => stats,
            _ => panic!("job_worker exited with {status} and no stats line: {stderr}"),
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Builds the `job_worker` example in release and returns its path.
fn build_worker() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args([
            "build",
            "--release",
            "--features",
            "redis",
            "--example",
            "job_worker",
            "--manifest-path",
        ])
        .arg(manifest_dir.join("Cargo.toml"))
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    assert!(status.success(), "building the job_worker example failed");
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => manifest_dir.join(dir),
        None => manifest_dir.join("target"),
    };
    let binary = target
        .join("release")
        .join("examples")
        .join(format!("job_worker{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "no {}", binary.display());
    binary
}

fn drain_processes(
    rt: &Runtime,
    connection: &RedisConnection,
    binary: &Path,
    workers: usize,
) -> Drain {
    let (prefix, queue) = rt.block_on(paused_queue(connection));
    let mut raw = rt.block_on(admin_redis());
    let mut processes: Vec<WorkerProcess> = (0..workers)
        .map(|_| WorkerProcess::spawn(binary, &prefix))
        .collect();
    for process in &mut processes {
        process.wait_ready();
    }
    let (elapsed, polls, before, after) = rt.block_on(timed_drain(&queue, &mut raw, None));
    let stats: Vec<WorkerStats> = processes
        .into_iter()
        .map(WorkerProcess::interrupt)
        .collect();
    // Each run of a job adds one to its field of `<prefix>:runs`.
    let runs: Vec<u64> = rt
        .block_on(
            redis::cmd("HVALS")
                .arg(format!("{prefix}:runs"))
                .query_async(&mut raw),
        )
        .unwrap();
    let total_runs: u64 = runs.iter().sum();
    let mut calls = Calls::of(&before, &after, polls, total_runs);
    calls.worker_scripts = stats.iter().map(script_calls).sum();
    rt.block_on(check_drained(&queue));
    assert_eq!(runs.len() as u64, DRAIN_JOBS, "jobs that never ran");
    if total_runs > DRAIN_JOBS {
        println!("  note: {} job runs were repeats", total_runs - DRAIN_JOBS);
    }
    rt.block_on(delete_prefix(&prefix));
    Drain { elapsed, calls }
}

fn drain_in_process(rt: &Runtime, connection: &RedisConnection) -> Drain {
    rt.block_on(async {
        let (prefix, queue) = paused_queue(connection).await;
        let mut raw = admin_redis().await;
        let worker = Worker::new(
            queue.clone(),
            WorkerConfig::concurrency(WORKER_CONCURRENCY).claim_batch(CLAIM_BATCH),
        )
        .start(|_job: Job<u64>| async { Ok::<(), JobError>(()) })
        .unwrap();
        let (elapsed, polls, before, after) = timed_drain(&queue, &mut raw, Some(&worker)).await;
        let stats = worker.stats();
        let report = worker.shutdown(Duration::from_secs(5)).await;
        assert_eq!(report.released, 0);
        let mut calls = Calls::of(&before, &after, polls, 0);
        calls.worker_scripts = script_calls(&stats);
        check_drained(&queue).await;
        delete_prefix(&prefix).await;
        Drain { elapsed, calls }
    })
}

/// The baseline: `DRAIN_JOBS` payloads in a bare list, drained by `tasks` tasks (each on its
/// own connection, like a process) doing `RPOP key 32` and nothing else. Returns the time
/// and the RPOP calls.
fn drain_raw(rt: &Runtime, tasks: usize) -> (Duration, u64) {
    rt.block_on(async {
        let prefix = unique_prefix();
        let key = format!("{prefix}:list");
        let mut raw = raw_redis().await;
        for start in (0..DRAIN_JOBS).step_by(FILL_BATCH as usize) {
            let values: Vec<Vec<u8>> = (start..(start + FILL_BATCH).min(DRAIN_JOBS))
                .map(|n| payload(&n))
                .collect();
            let _: i64 = redis::cmd("LPUSH")
                .arg(&key)
                .arg(values)
                .query_async(&mut raw)
                .await
                .unwrap();
        }
        let mut connections = Vec::with_capacity(tasks);
        for _ in 0..tasks {
            connections.push(raw_redis().await);
        }
        let started = Instant::now();
        let handles: Vec<_> = connections
            .into_iter()
            .map(|mut connection| {
                let key = key.clone();
                tokio::spawn(async move {
                    let (mut popped, mut calls) = (0u64, 0u64);
                    loop {
                        calls += 1;
                        let batch: Option<Vec<Vec<u8>>> = redis::cmd("RPOP")
                            .arg(&key)
                            .arg(CLAIM_BATCH)
                            .query_async(&mut connection)
                            .await
                            .unwrap();
                        match batch {
                            Some(batch) => popped += batch.len() as u64,
                            None => break,
                        }
                    }
                    (popped, calls)
                })
            })
            .collect();
        let (mut popped, mut calls) = (0, 0);
        for handle in handles {
            let (p, c) = handle.await.unwrap();
            popped += p;
            calls += c;
        }
        let elapsed = started.elapsed();
        assert_eq!(popped, DRAIN_JOBS);
        delete_prefix(&prefix).await;
        (elapsed, calls)
    })
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn jobs_per_sec(jobs: u64, time: Duration) -> f64 {
    jobs as f64 / time.as_secs_f64()
}

/// Drains `RUNS` times per variant and prints each figure next to its baseline; returns the
/// summary lines.
fn processing(rt: &Runtime, connection: &RedisConnection) -> Vec<String> {
    let binary = build_worker();
    let mut summary = Vec::new();
    let variants: [(&str, usize, Option<usize>); 3] = [
        ("1 job_worker process", 1, Some(1)),
        ("2 job_worker processes", 2, Some(2)),
        ("1 Worker in the bench process", 1, None),
    ];
    let mut calls_lines = Vec::new();
    for (label, tasks, processes) in variants {
        let mut times = Vec::with_capacity(RUNS);
        let mut calls = Calls::default();
        for _ in 0..RUNS {
            let drain = match processes {
                Some(workers) => drain_processes(rt, connection, &binary, workers),
                None => drain_in_process(rt, connection),
            };
            times.push(drain.elapsed);
            calls.add(&drain.calls);
        }
        let mut raw_times = Vec::with_capacity(RUNS);
        let mut rpops = 0;
        for _ in 0..RUNS {
            let (time, calls) = drain_raw(rt, tasks);
            raw_times.push(time);
            rpops += calls;
        }
        let (ours, raw) = (median(times), median(raw_times));
        let handler = if processes.is_some() {
            ", whose handler makes one HINCRBY per job"
        } else {
            ""
        };
        let line = format!(
            "process {DRAIN_JOBS} no-op jobs, {label} (concurrency {WORKER_CONCURRENCY}, claim batch {CLAIM_BATCH}{handler}): {:.0} jobs/s ({ours:.2?}); raw list drained by {tasks} task(s) doing RPOP 32: {:.0} jobs/s ({raw:.2?}); time ratio {:.2}x (median of {RUNS})",
            jobs_per_sec(DRAIN_JOBS, ours),
            jobs_per_sec(DRAIN_JOBS, raw),
            ours.as_secs_f64() / raw.as_secs_f64(),
        );
        println!("{line}");
        summary.push(line);
        let line = format!(
            "Redis round trips per processed job, {label}: {:.3} (EVALSHA {:.3} + BLPOP {:.3}; the workers counted {:.3} script calls per job over their lifetime; the handler's own calls not counted); commands Redis executed per job, those inside the scripts included: {:.1}; raw RPOP 32: {:.3} round trips per job",
            calls.per_job(calls.round_trips),
            calls.per_job(calls.evalsha),
            calls.per_job(calls.blpop),
            calls.per_job(calls.worker_scripts),
            calls.per_job(calls.executed),
            rpops as f64 / (DRAIN_JOBS * RUNS as u64) as f64,
        );
        println!("{line}");
        calls_lines.push(line);
    }
    summary.extend(calls_lines);
    summary
}

/// Deletes every key of this run left behind: `{pkbench-jobs-<pid>-<n>:q:<name>}:*`,
/// `pkbench-jobs-<pid>-<n>:runs` and the raw lists.
fn delete_keys(rt: &Runtime) {
    let base = base_prefix();
    let deleted = rt.block_on(delete_matching(&[
        format!("{{{base}-*"),
        format!("{base}-*"),
    ]));
    println!("deleted {deleted} leftover keys under {base}-*");
}

fn print_summary(started: Instant, processing: &[String]) {
    println!("\n== pupkit jobs vs raw baselines (this run) ==");
    let rows = [
        (
            "jobs_enqueue_64_tasks",
            "raw_lpush",
            1,
            "enqueue() one at a time, 64 tasks, vs raw LPUSH of the same JSON, 64 tasks on one connection",
        ),
        (
            "jobs_enqueue_many_100",
            "raw_lpush_100",
            BATCH,
            "enqueue_many(100), one caller, vs raw LPUSH of 100 values per call",
        ),
    ];
    for (group, baseline, jobs, label) in rows {
        match (
            support::ran_since(group, "pupkit", started),
            support::mean_ns(group, "pupkit"),
            support::mean_ns(group, baseline),
        ) {
            (true, Some(ours), Some(raw)) => println!(
                "{label}: pupkit {:.0} jobs/s, raw {:.0} jobs/s, time ratio {:.2}x",
                jobs as f64 * 1e9 / ours,
                jobs as f64 * 1e9 / raw,
                ours / raw
            ),
            _ => println!("{label}: not run"),
        }
    }
    for line in processing {
        println!("{line}");
    }
    println!(
        "for context, published peer figures on their own hardware (not measured here): BullMQ ~18k jobs/s, Sidekiq 7 ~23k jobs/s"
    );
}

fn main() {
    let started = Instant::now();
    let rt = Runtime::new().unwrap();
    let mut config = RedisConfig::new(redis_url());
    config.op_timeout = Duration::from_secs(2);
    let connection = rt
        .block_on(RedisConnection::connect(&config))
        .expect("Redis for the benchmark");
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();
    enqueue(&mut criterion, &rt, &connection);
    let processing = processing(&rt, &connection);
    delete_keys(&rt);
    criterion.final_summary();
    print_summary(started, &processing);
}
