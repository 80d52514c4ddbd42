//! Background jobs against the real Redis: delivery, priorities, dedup, the shared rate limit
//! and concurrency cap, leases and fencing, crashes (a worker process killed with SIGKILL),
//! panics, timeouts, shutdown and a Redis restart. Every test has its own key prefix.

mod support;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pupkit::cost::{CostMeter, Meter, ReportPeriod};
use pupkit::jobs::{
    EnqueueOptions, Job, JobError, JobOutcome, Priority, Queue, QueueConfig, QueueStats, RateLimit,
    Scaling, Worker, WorkerConfig,
};
use pupkit::redis::{RedisConfig, RedisConnection};
use pupkit::resilience::Backoff;
use serde::{Deserialize, Serialize};
use support::redis::{PrivateRedis, connect, delete_matching, raw};
use support::unique_prefix;

/// A queue under its own prefix; its keys are deleted when the fixture drops.
struct Fixture {
    prefix: String,
}

impl Fixture {
    fn new(test: &str) -> Self {
        Fixture {
            prefix: unique_prefix(test),
        }
    }

    fn config(&self, name: &str) -> QueueConfig {
        QueueConfig::named(name)
            .prefix(self.prefix.clone())
            .backoff(Backoff::new(
                Duration::from_millis(10),
                Duration::from_millis(50),
            ))
    }

    async fn cleanup(&self) {
        delete_matching(&format!("{{{}:q:*", self.prefix)).await;
        delete_matching(&format!("{}:*", self.prefix)).await;
    }
}

/// Polls `check` every 20 ms until it holds, or panics after `limit` with `what`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stats<T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static>(
    queue: &Queue<T>,
) -> QueueStats {
    queue.stats().await.expect("queue stats")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct EmbedText {
    doc: u32,
    text: String,
}

#[tokio::test]
async fn jobs_run_once_with_their_data_and_report_cost_to_the_meter() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("basic");
    let queue: Queue<EmbedText> =
        Queue::open(redis, fixture.config("embeddings").service("search"))
            .await
            .unwrap();
    let meter = Arc::new(Meter::builder().build().await.unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let jobs: Vec<(EmbedText, EnqueueOptions)> = (0..50)
        .map(|doc| {
            (
                EmbedText {
                    doc,
                    text: format!("document {doc}"),
                },
                EnqueueOptions::new().user(format!("u{}", doc % 5)),
            )
        })
        .collect();
    let added = queue
        .enqueue_many(jobs.iter().map(|(job, options)| (job, options)))
        .await
        .unwrap();
    assert_eq!(added.len(), 50);
    assert!(added.iter().all(|e| !e.duplicate));

    let worker = {
        let seen = seen.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(8))
            .cost_meter(meter.clone())
            .start(move |job: Job<EmbedText>| {
                let seen = seen.clone();
                async move {
                    assert_eq!(job.data().text, format!("document {}", job.data().doc));
                    let usage = job.usage("text-embedding-3-small").tokens(1_000, 0);
                    job.record_cost(usage).await?;
                    seen.lock()
                        .unwrap()
                        .push((job.data().doc, job.user().map(str::to_owned)));
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    wait_until("50 completions", Duration::from_secs(30), || async {
        stats(&queue).await.completed == 50
    })
    .await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.released, 0);

    let seen = seen.lock().unwrap().clone();
    let docs: HashSet<u32> = seen.iter().map(|(doc, _)| *doc).collect();
    assert_eq!(docs.len(), 50, "every job ran, each once: {seen:?}");
    assert_eq!(seen.len(), 50);
    assert!(
        seen.iter()
            .all(|(doc, user)| user.as_deref() == Some(&*format!("u{}", doc % 5)))
    );
    let after = stats(&queue).await;
    assert_eq!(
        (
            after.pending,
            after.active,
            after.delayed,
            after.dead,
            after.enqueued
        ),
        (0, 0, 0, 0, 50)
    );

    let report = meter.report(ReportPeriod::Day).await.unwrap();
    assert_eq!(report.totals.requests, 50);
    assert_eq!(report.by_service.len(), 1);
    assert_eq!(report.by_service[0].key, "search");
    let users: HashSet<&str> = report.by_user.iter().map(|g| g.key.as_str()).collect();
    assert_eq!(users, HashSet::from(["u0", "u1", "u2", "u3", "u4"]));
    fixture.cleanup().await;
}

#[tokio::test]
async fn with_a_backlog_higher_priority_jobs_start_first() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("priority");
    let queue: Queue<String> = Queue::open(redis, fixture.config("work")).await.unwrap();
    for (n, priority) in [
        (10, Priority::Low),
        (10, Priority::Normal),
        (10, Priority::High),
    ] {
        for k in 0..n {
            let label = format!("{priority:?}-{k}");
            queue
                .enqueue(&label, &EnqueueOptions::new().priority(priority))
                .await
                .unwrap();
        }
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let order = order.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(1).claim_batch(1))
            .start(move |job: Job<String>| {
                let order = order.clone();
                async move {
                    order
                        .lock()
                        .unwrap()
                        .push((job.priority(), job.into_data()));
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    wait_until("30 completions", Duration::from_secs(30), || async {
        stats(&queue).await.completed == 30
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    let order = order.lock().unwrap().clone();
    let priorities: Vec<Priority> = order.iter().map(|(p, _)| *p).collect();
    let mut sorted = priorities.clone();
    sorted.sort();
    assert_eq!(priorities, sorted, "started in priority order: {order:?}");
    // First in, first out within a priority.
    let high: Vec<&str> = order[..10].iter().map(|(_, l)| l.as_str()).collect();
    let expected: Vec<String> = (0..10).map(|k| format!("High-{k}")).collect();
    assert_eq!(
        high,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_hundred_concurrent_enqueues_with_one_dedup_key_make_one_job() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("dedup");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("profiles"))
        .await
        .unwrap();
    let options = EnqueueOptions::new().dedup("profile:42", Duration::from_secs(60));
    let mut tasks = Vec::new();
    for n in 0..100 {
        let queue = queue.clone();
        let options = options.clone();
        tasks.push(tokio::spawn(
            async move { queue.enqueue(&n, &options).await },
        ));
    }
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    for task in tasks {
        let enqueued = task.await.unwrap().unwrap();
        ids.insert(enqueued.id);
        duplicates += usize::from(enqueued.duplicate);
    }
    assert_eq!(ids.len(), 1, "one id for all: {ids:?}");
    assert_eq!(duplicates, 99);
    let before = stats(&queue).await;
    assert_eq!(
        (before.pending, before.enqueued, before.deduplicated),
        (1, 1, 99)
    );

    // Once the job has run, the key is free again.
    let worker = Worker::new(queue.clone(), WorkerConfig::concurrency(1))
        .start(|_job: Job<u32>| async { Ok::<(), JobError>(()) })
        .unwrap();
    wait_until("the job to complete", Duration::from_secs(10), || async {
        stats(&queue).await.completed == 1
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    let again = queue.enqueue(&7, &options).await.unwrap();
    assert!(!again.duplicate);
    assert!(!ids.contains(&again.id));
    fixture.cleanup().await;
}

#[tokio::test]
async fn four_workers_never_start_more_than_the_rate_limit_plus_burst() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("ratelimit");
    const PER_SECOND: usize = 10;
    const BURST: usize = 2;
    const JOBS: usize = 36;
    let limit = RateLimit::per_second(PER_SECOND as u32).burst(BURST as u32);
    let queue: Queue<u32> = Queue::open(redis, fixture.config("limited").rate_limit(limit))
        .await
        .unwrap();
    let jobs: Vec<u32> = (0..JOBS as u32).collect();
    let options = EnqueueOptions::new();
    queue
        .enqueue_many(jobs.iter().map(|job| (job, &options)))
        .await
        .unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let starts = starts.clone();
        workers.push(
            Worker::new(queue.clone(), WorkerConfig::concurrency(5))
                .start(move |job: Job<u32>| {
                    let starts = starts.clone();
                    async move {
                        starts
                            .lock()
                            .unwrap()
                            .push(job.claimed_at().as_millisecond());
                        Ok::<(), JobError>(())
                    }
                })
                .unwrap(),
        );
    }
    wait_until("every job to complete", Duration::from_secs(60), || async {
        stats(&queue).await.completed == JOBS as u64
    })
    .await;
    for worker in workers {
        worker.shutdown(Duration::from_secs(5)).await;
    }
    // Start times are Redis's clock at the claim (ms). In any window of 1 s, GCRA admits at
    // most burst + rate * 1 s.
    let mut starts = starts.lock().unwrap().clone();
    starts.sort();
    assert_eq!(starts.len(), JOBS);
    for (k, &from) in starts.iter().enumerate() {
        let in_window = starts[k..]
            .iter()
            .take_while(|&&t| t < from + 1_000)
            .count();
        assert!(
            in_window <= PER_SECOND + BURST,
            "{in_window} starts in the second from {from}: {starts:?}"
        );
    }
    let span = starts[JOBS - 1] - starts[0];
    assert!(
        span >= ((JOBS - BURST) as i64 - 1) * 1_000 / PER_SECOND as i64,
        "{JOBS} jobs at {PER_SECOND}/s took only {span} ms"
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn the_global_concurrency_cap_holds_across_workers() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("globalcap");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("capped").global_concurrency(2))
        .await
        .unwrap();
    let jobs: Vec<u32> = (0..12).collect();
    let options = EnqueueOptions::new();
    queue
        .enqueue_many(jobs.iter().map(|job| (job, &options)))
        .await
        .unwrap();
    let now = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (now, peak) = (now.clone(), peak.clone());
        workers.push(
            Worker::new(queue.clone(), WorkerConfig::concurrency(5))
                .start(move |_job: Job<u32>| {
                    let (now, peak) = (now.clone(), peak.clone());
                    async move {
                        let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(running, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok::<(), JobError>(())
                    }
                })
                .unwrap(),
        );
    }
    wait_until("every job to complete", Duration::from_secs(30), || async {
        stats(&queue).await.completed == 12
    })
    .await;
    for worker in workers {
        worker.shutdown(Duration::from_secs(5)).await;
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!((1..=2).contains(&peak), "at most 2 at once, saw {peak}");
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_panicking_handler_fails_its_job_to_the_dead_letters_and_the_worker_lives_on() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("panic");
    let queue: Queue<String> = Queue::open(redis, fixture.config("fragile").max_attempts(3))
        .await
        .unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let attempts = attempts.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(2))
            .start(move |job: Job<String>| {
                let attempts = attempts.clone();
                async move {
                    if job.data() == "boom" {
                        attempts.lock().unwrap().push(job.attempt());
                        panic!("handler bug on {}", job.data());
                    }
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    let mut events = worker.events();
    let boom = queue
        .enqueue(&"boom".to_owned(), &EnqueueOptions::new())
        .await
        .unwrap();
    wait_until(
        "the job to be dead-lettered",
        Duration::from_secs(30),
        || async { stats(&queue).await.dead == 1 },
    )
    .await;
    // The worker still works.
    queue
        .enqueue(&"fine".to_owned(), &EnqueueOptions::new())
        .await
        .unwrap();
    wait_until(
        "the next job to complete",
        Duration::from_secs(30),
        || async { stats(&queue).await.completed == 1 },
    )
    .await;
    let worker_stats = worker.stats();
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(worker_stats.panicked, 3);
    assert_eq!((worker_stats.retried, worker_stats.dead), (2, 1));
    let dead = queue.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, boom.id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].decode::<String>().unwrap(), "boom");
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains("handler bug on boom"),
        "{error}"
    );
    let mut outcomes = Vec::new();
    while let Ok(event) = events.try_recv() {
        outcomes.push(event.outcome);
    }
    assert!(
        matches!(outcomes.last(), Some(JobOutcome::Completed)),
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, JobOutcome::Dead(_)))
            .count(),
        1,
        "{outcomes:?}"
    );

    // A dead job can be put back in line, with fresh attempts.
    assert!(queue.retry_dead(&boom.id).await.unwrap());
    assert!(!queue.retry_dead(&boom.id).await.unwrap());
    assert!(
        queue
            .retry_dead("1; DEL x")
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    let after = stats(&queue).await;
    assert_eq!((after.pending, after.dead), (1, 0));
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_complete_the_job() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("fencing");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("leased")).await.unwrap();
    let job = queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let (finish_tx, finish_rx) = tokio::sync::watch::channel(false);
    let first = {
        let started = started.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(1))
            .start(move |_job: Job<u32>| {
                let started = started.clone();
                let mut finish = finish_rx.clone();
                async move {
                    started.store(true, Ordering::SeqCst);
                    while !*finish.borrow_and_update() {
                        finish.changed().await.ok();
                    }
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    wait_until(
        "the first worker to start the job",
        Duration::from_secs(10),
        || async { started.load(Ordering::SeqCst) },
    )
    .await;
    // The lease runs out (as if the first worker had been partitioned away)...
    let mut conn = raw().await;
    let active = format!("{{{}:q:leased}}:active", fixture.prefix);
    let _: i64 = redis::cmd("ZADD")
        .arg(&active)
        .arg("XX")
        .arg("CH")
        .arg(0)
        .arg(&job.id)
        .query_async(&mut conn)
        .await
        .unwrap();
    // ... and a second worker takes the job over and completes it.
    let second = Worker::new(queue.clone(), WorkerConfig::concurrency(1))
        .start(|job: Job<u32>| async move {
            assert_eq!(job.attempt(), 2);
            Ok::<(), JobError>(())
        })
        .unwrap();
    wait_until(
        "the second worker to complete it",
        Duration::from_secs(10),
        || async { stats(&queue).await.completed == 1 },
    )
    .await;
    // The first worker's late completion is refused by the fencing token.
    finish_tx.send_replace(true);
    wait_until(
        "the first worker to settle",
        Duration::from_secs(10),
        || async { first.stats().lease_lost == 1 },
    )
    .await;
    let first_stats = first.stats();
    first.shutdown(Duration::from_secs(5)).await;
    second.shutdown(Duration::from_secs(5)).await;
    assert_eq!(first_stats.completed, 0);
    let after = stats(&queue).await;
    assert_eq!((after.completed, after.stalled, after.active), (1, 1, 0));
    fixture.cleanup().await;
}

#[tokio::test]
async fn heartbeats_keep_a_job_longer_than_its_lease() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("heartbeat");
    let queue: Queue<u32> = Queue::open(
        redis,
        fixture.config("long").lease(Duration::from_millis(900)),
    )
    .await
    .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let worker = {
        let runs = runs.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(1))
            .start(move |_job: Job<u32>| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2_500)).await;
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    wait_until("the job to complete", Duration::from_secs(20), || async {
        stats(&queue).await.completed == 1
    })
    .await;
    let worker_stats = worker.stats();
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(worker_stats.heartbeat_calls >= 2, "{worker_stats:?}");
    assert_eq!(stats(&queue).await.stalled, 0);
    fixture.cleanup().await;
}

/// Drops set a flag: proof that a cancelled handler's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn the_job_timeout_cancels_the_handler_and_fails_the_attempt() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("timeout");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("slow").max_attempts(1))
        .await
        .unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let worker = {
        let (dropped, finished) = (dropped.clone(), finished.clone());
        Worker::new(
            queue.clone(),
            WorkerConfig::concurrency(1).job_timeout(Duration::from_millis(200)),
        )
        .start(move |_job: Job<u32>| {
            let guard = DropFlag(dropped.clone());
            let finished = finished.clone();
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(600)).await;
                finished.store(true, Ordering::SeqCst);
                Ok::<(), JobError>(())
            }
        })
        .unwrap()
    };
    queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    wait_until(
        "the job to be dead-lettered",
        Duration::from_secs(20),
        || async { stats(&queue).await.dead == 1 },
    )
    .await;
    let worker_stats = worker.stats();
    worker.shutdown(Duration::from_secs(5)).await;
    assert!(dropped.load(Ordering::SeqCst), "the handler was cancelled");
    assert!(!finished.load(Ordering::SeqCst));
    assert_eq!(worker_stats.timed_out, 1);
    let dead = queue.dead_letters(1).await.unwrap();
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(error.contains("timed out after 200ms"), "{error}");
    fixture.cleanup().await;
}

#[tokio::test]
async fn shutdown_gives_unfinished_jobs_back_without_spending_an_attempt() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("shutdown");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("drain")).await.unwrap();
    let jobs: Vec<u32> = (0..4).collect();
    let options = EnqueueOptions::new();
    queue
        .enqueue_many(jobs.iter().map(|job| (job, &options)))
        .await
        .unwrap();
    let started = Arc::new(AtomicU32::new(0));
    let worker = {
        let started = started.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(3))
            .start(move |_job: Job<u32>| {
                let started = started.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(600)).await;
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    wait_until("three jobs to start", Duration::from_secs(10), || async {
        started.load(Ordering::SeqCst) == 3
    })
    .await;
    let report = worker.shutdown(Duration::from_millis(100)).await;
    assert_eq!((report.finished, report.released), (0, 3));
    let after = stats(&queue).await;
    assert_eq!((after.pending, after.active, after.released), (4, 0, 3));

    // The next worker sees every job on its first attempt.
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let next = {
        let attempts = attempts.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(4))
            .start(move |job: Job<u32>| {
                let attempts = attempts.clone();
                async move {
                    attempts.lock().unwrap().push(job.attempt());
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    wait_until("four completions", Duration::from_secs(10), || async {
        stats(&queue).await.completed == 4
    })
    .await;
    next.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), vec![1, 1, 1, 1]);
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_provider_429_holds_claims_and_releases_the_job_without_an_attempt() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("limited429");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("provider"))
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let seen = seen.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(1))
            .start(move |job: Job<u32>| {
                let seen = seen.clone();
                async move {
                    let first = {
                        let mut seen = seen.lock().unwrap();
                        seen.push((job.attempt(), job.claimed_at()));
                        seen.len() == 1
                    };
                    if first {
                        return Err(JobError::RateLimited {
                            retry_after: Duration::from_millis(400),
                        });
                    }
                    Ok(())
                }
            })
            .unwrap()
    };
    queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    wait_until("the job to complete", Duration::from_secs(20), || async {
        stats(&queue).await.completed == 1
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].0, seen[1].0), (1, 1), "no attempt was spent");
    let held = seen[1].1.duration_since(seen[0].1);
    assert!(
        held >= jiff::SignedDuration::from_millis(400),
        "held for {held:?}"
    );
    assert_eq!(stats(&queue).await.released, 1);
    fixture.cleanup().await;
}

#[tokio::test]
async fn delayed_jobs_start_after_their_delay_on_the_redis_clock() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("delayed");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("later")).await.unwrap();
    let seen = Arc::new(Mutex::new(None));
    let worker = {
        let seen = seen.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(1))
            .start(move |job: Job<u32>| {
                let seen = seen.clone();
                async move {
                    *seen.lock().unwrap() = Some((job.enqueued_at(), job.claimed_at()));
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    queue
        .enqueue(&1, &EnqueueOptions::new().delay(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(stats(&queue).await.delayed, 1);
    wait_until("the job to complete", Duration::from_secs(20), || async {
        stats(&queue).await.completed == 1
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    let (enqueued, claimed) = seen.lock().unwrap().expect("ran");
    assert!(
        claimed.duration_since(enqueued) >= jiff::SignedDuration::from_millis(300),
        "{enqueued} -> {claimed}"
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn workers_scale_up_on_a_backlog_and_back_down_when_idle() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("scaling");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("bursty")).await.unwrap();
    let mut scaling = Scaling::between(1, 6);
    scaling.interval = Duration::from_millis(50);
    scaling.down_after = 3;
    let now = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let worker = {
        let (now, peak) = (now.clone(), peak.clone());
        Worker::new(queue.clone(), WorkerConfig::default().scaling(scaling))
            .start(move |_job: Job<u32>| {
                let (now, peak) = (now.clone(), peak.clone());
                async move {
                    let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(running, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    assert_eq!(worker.stats().concurrency, 1);
    let jobs: Vec<u32> = (0..60).collect();
    let options = EnqueueOptions::new();
    queue
        .enqueue_many(jobs.iter().map(|job| (job, &options)))
        .await
        .unwrap();
    wait_until("60 completions", Duration::from_secs(60), || async {
        stats(&queue).await.completed == 60
    })
    .await;
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        (2..=6).contains(&peak),
        "scaled up within bounds, peak {peak}"
    );
    wait_until(
        "the worker to scale back to 1",
        Duration::from_secs(20),
        || async { worker.stats().concurrency == 1 },
    )
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_payload_that_does_not_decode_is_dead_lettered_without_a_panic() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("badpayload");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("typed")).await.unwrap();
    let job = queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    let mut conn = raw().await;
    let _: i64 = redis::cmd("HSET")
        .arg(format!("{{{}:q:typed}}:job", fixture.prefix))
        .arg(&job.id)
        .arg(r#"{"data":"not a number"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ran = Arc::new(AtomicBool::new(false));
    let worker = {
        let ran = ran.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(1))
            .start(move |_job: Job<u32>| {
                let ran = ran.clone();
                async move {
                    ran.store(true, Ordering::SeqCst);
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    wait_until(
        "the job to be dead-lettered",
        Duration::from_secs(10),
        || async { stats(&queue).await.dead == 1 },
    )
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    assert!(!ran.load(Ordering::SeqCst));
    let dead = queue.dead_letters(5).await.unwrap();
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("not a number") && error.contains("u32"),
        "{error}"
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_what_and_which_value() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("badinput");
    let err = Queue::<u32>::open(redis.clone(), fixture.config("bad}name"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("bad}name"), "{err}");
    let mut small = fixture.config("small");
    small.max_payload_bytes = 64;
    let queue: Queue<String> = Queue::open(redis, small).await.unwrap();
    let err = queue
        .enqueue(&"x".repeat(100), &EnqueueOptions::new())
        .await
        .unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    let err = queue
        .enqueue(
            &"x".to_owned(),
            &EnqueueOptions::new().dedup("k".repeat(300), Duration::from_secs(1)),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("300 bytes"), "{err}");
    let err = queue
        .enqueue(&"x".to_owned(), &EnqueueOptions::new().max_attempts(0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max attempts"), "{err}");
    // A dedup key with Lua or Redis syntax in it is just bytes.
    let odd =
        EnqueueOptions::new().dedup("x'); redis.call('FLUSHALL') --|9", Duration::from_secs(5));
    let first = queue.enqueue(&"a".to_owned(), &odd).await.unwrap();
    let second = queue.enqueue(&"b".to_owned(), &odd).await.unwrap();
    assert!(second.duplicate);
    assert_eq!(first.id, second.id);
    assert_eq!(stats(&queue).await.pending, 1);
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_worker_survives_a_redis_restart_and_takes_new_jobs() {
    let Some(mut server) = PrivateRedis::start() else {
        return;
    };
    let mut config = RedisConfig::new(server.url());
    config.op_timeout = Duration::from_millis(500);
    let redis = RedisConnection::connect(&config).await.unwrap();
    let queue: Queue<u32> = Queue::open(redis, QueueConfig::named("restart"))
        .await
        .unwrap();
    let done = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let done = done.clone();
        let mut worker_config = WorkerConfig::concurrency(2);
        worker_config.idle_wait = Duration::from_millis(200);
        Worker::new(queue.clone(), worker_config)
            .start(move |job: Job<u32>| {
                let done = done.clone();
                async move {
                    done.lock().unwrap().push(*job.data());
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    wait_until("the first job", Duration::from_secs(10), || async {
        done.lock().unwrap().contains(&1)
    })
    .await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(queue.enqueue(&2, &EnqueueOptions::new()).await.is_err());
    server.restart();
    // The restarted server has no scripts loaded: they are loaded again by themselves.
    wait_until(
        "an enqueue after the restart",
        Duration::from_secs(20),
        || async { queue.enqueue(&3, &EnqueueOptions::new()).await.is_ok() },
    )
    .await;
    wait_until(
        "the job after the restart",
        Duration::from_secs(20),
        || async { done.lock().unwrap().contains(&3) },
    )
    .await;
    let worker_stats = worker.stats();
    worker.shutdown(Duration::from_secs(5)).await;
    assert!(worker_stats.redis_errors > 0, "{worker_stats:?}");
}

// ---- crash recovery with a real worker process -------------------------------------------

/// The `job_worker` example binary, built by `cargo test` next to this test's binary (or
/// built here when missing).
fn worker_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory");
    let binary = profile_dir.join("examples").join("job_worker");
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--features", "redis", "--example", "job_worker"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the job_worker example failed");
    }
    binary
}

/// A worker process on queue `name` under `prefix`.
fn spawn_worker(prefix: &str, name: &str, args: &[&str]) -> Child {
    Command::new(worker_binary())
        .args([prefix, name])
        .args(args)
        .env("PUPKIT_REDIS_URL", support::redis_url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the job_worker example")
}

fn sigkill(child: &mut Child) {
    child.kill().expect("SIGKILL the worker");
    child.wait().expect("reap the worker");
}

/// Runs per job number, from the worker processes' `<prefix>:runs` hash.
async fn runs(prefix: &str) -> HashMap<u64, u64> {
    let mut conn = raw().await;
    redis::cmd("HGETALL")
        .arg(format!("{prefix}:runs"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_job_of_a_killed_worker_process_is_redelivered_after_its_lease_and_completes_once() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("crashone");
    let queue: Queue<u64> = Queue::open(redis, fixture.config("crash")).await.unwrap();
    queue.enqueue(&7, &EnqueueOptions::new()).await.unwrap();
    let lease = ["--lease-ms", "1000", "--work-ms", "1500"];
    let mut doomed = spawn_worker(&fixture.prefix, "crash", &lease);
    wait_until(
        "the worker process to start the job",
        Duration::from_secs(30),
        || async { runs(&fixture.prefix).await.get(&7) == Some(&1) },
    )
    .await;
    sigkill(&mut doomed);
    let mut survivor = spawn_worker(&fixture.prefix, "crash", &lease);
    wait_until(
        "the redelivered job to complete",
        Duration::from_secs(30),
        || async { stats(&queue).await.completed == 1 },
    )
    .await;
    sigkill(&mut survivor);
    let after = stats(&queue).await;
    assert_eq!(runs(&fixture.prefix).await.get(&7), Some(&2));
    assert_eq!(
        (
            after.completed,
            after.stalled,
            after.pending,
            after.active,
            after.dead
        ),
        (1, 1, 0, 0, 0)
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_thousand_jobs_survive_random_sigkills_of_their_worker_processes() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("crashmany");
    let queue: Queue<u64> = Queue::open(redis, fixture.config("crash")).await.unwrap();
    const JOBS: u64 = 1_000;
    let jobs: Vec<u64> = (0..JOBS).collect();
    // Enough attempts that no job is dead-lettered by the kills themselves.
    let options = EnqueueOptions::new().max_attempts(50);
    queue
        .enqueue_many(jobs.iter().map(|job| (job, &options)))
        .await
        .unwrap();
    let args = [
        "--lease-ms",
        "1000",
        "--work-ms",
        "100",
        "--concurrency",
        "10",
    ];
    let mut kills = 0;
    let mut seed = std::process::id() as u64;
    while kills < 6 && stats(&queue).await.completed < JOBS * 3 / 4 {
        let mut pair = [
            spawn_worker(&fixture.prefix, "crash", &args),
            spawn_worker(&fixture.prefix, "crash", &args),
        ];
        // A pseudo-random 300..900 ms of work before the kill.
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        tokio::time::sleep(Duration::from_millis(300 + (seed >> 33) % 600)).await;
        for child in &mut pair {
            sigkill(child);
        }
        kills += 1;
    }
    let mut finisher = spawn_worker(&fixture.prefix, "crash", &args);
    wait_until(
        "every job to complete",
        Duration::from_secs(120),
        || async { stats(&queue).await.completed >= JOBS },
    )
    .await;
    // Let in-flight settles land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sigkill(&mut finisher);
    let after = stats(&queue).await;
    let runs = runs(&fixture.prefix).await;
    assert_eq!(
        after.completed, JOBS,
        "each job completed exactly once: {after:?}"
    );
    assert_eq!(
        (after.pending, after.delayed, after.active, after.dead),
        (0, 0, 0, 0),
        "{after:?}"
    );
    let missing: Vec<u64> = (0..JOBS).filter(|n| !runs.contains_key(n)).collect();
    assert!(missing.is_empty(), "jobs that never ran: {missing:?}");
    let total_runs: u64 = runs.values().sum();
    assert!(total_runs >= JOBS);
    eprintln!(
        "{kills} rounds of SIGKILL: {total_runs} runs for {JOBS} jobs, {} leases taken back",
        after.stalled
    );
    assert!(
        kills > 0 && after.stalled > 0,
        "the test killed workers mid-job: {after:?}"
    );
    fixture.cleanup().await;
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_until_it_is_resumed() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("pause");
    let queue: Queue<u32> = Queue::open(redis, fixture.config("held")).await.unwrap();
    queue.pause().await.unwrap();
    let ran = Arc::new(AtomicU32::new(0));
    let worker = {
        let ran = ran.clone();
        Worker::new(queue.clone(), WorkerConfig::concurrency(2))
            .start(move |_job: Job<u32>| {
                let ran = ran.clone();
                async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), JobError>(())
                }
            })
            .unwrap()
    };
    queue.enqueue(&1, &EnqueueOptions::new()).await.unwrap();
    // The worker is woken by the enqueue and claims: the pause holds it back.
    wait_until(
        "a claim on the paused queue",
        Duration::from_secs(10),
        || async { worker.stats().claim_calls >= 2 },
    )
    .await;
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    let held = stats(&queue).await;
    assert!(held.paused);
    assert_eq!(held.pending, 1);
    queue.resume().await.unwrap();
    wait_until("the job after resume", Duration::from_secs(10), || async {
        stats(&queue).await.completed == 1
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    fixture.cleanup().await;
}

/// A payload whose decoding panics (a `Deserialize` with a bug).
#[derive(Debug, Serialize)]
struct Boom(u32);

impl<'de> Deserialize<'de> for Boom {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("a Deserialize that panics")
    }
}

#[tokio::test]
async fn a_panic_while_decoding_fails_the_attempt_and_frees_the_slot() {
    let Some(redis) = connect().await else { return };
    let fixture = Fixture::new("decodepanic");
    let queue: Queue<Boom> = Queue::open(redis, fixture.config("boom").max_attempts(1))
        .await
        .unwrap();
    let options = EnqueueOptions::new();
    let jobs = [Boom(1), Boom(2), Boom(3)];
    queue
        .enqueue_many(jobs.iter().map(|job| (job, &options)))
        .await
        .unwrap();
    // One slot: the second and third jobs run only if each panic gave the slot back.
    let worker = Worker::new(queue.clone(), WorkerConfig::concurrency(1))
        .start(|_job: Job<Boom>| async { Ok::<(), JobError>(()) })
        .unwrap();
    wait_until("three dead letters", Duration::from_secs(30), || async {
        stats(&queue).await.dead == 3
    })
    .await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.stats.panicked, 3);
    assert_eq!(report.stats.running, 0);
    let dead = queue.dead_letters(3).await.unwrap();
    assert!(
        dead.iter().all(|d| d
            .error
            .as_deref()
            .unwrap_or("")
            .contains("a Deserialize that panics")),
        "{dead:?}"
    );
    fixture.cleanup().await;
}
