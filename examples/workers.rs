//! The three queues of the performance report, worked in one process while a producer feeds
//! them, with live stats every second:
//!
//! | queue | job | worker | rate limit (shared by every process) |
//! |---|---|---|---|
//! | `embeddings` | `EmbedText { doc_id, text }` | concurrency 20 | 100 per minute |
//! | `summaries` | `Summarize { conversation_id }` | concurrency 5 | 20 per minute |
//! | `profiles` | `UpdateProfile { user_id }` | 2 to 10 slots, scaling on the backlog | 50 per minute |
//!
//! Each handler sleeps to stand in for its API call, then records what the call cost through
//! an in-memory cost meter (`Job::usage`, `Job::record_cost`), booked to the job's user. The
//! producer enqueues for users; user queries go first (high priority) and backfill last (low),
//! and summaries and profile updates carry dedup keys, so a conversation or a user already
//! waiting is not queued twice. The rate limits hold the queues well below what the producer
//! offers, so backlogs build up and the profiles worker scales up.
//!
//! After `--seconds N` (default 10) the producer stops, every worker shuts down gracefully
//! (running jobs finish), and the example prints the final stats and the cost total, then
//! deletes its keys (all under `pkexample-workers-<pid>`).
//!
//! `cargo run --features redis --example workers` (Redis at `PUPKIT_REDIS_URL`, default local;
//! `-- --seconds 5` for a shorter run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pupkit::cost::{CostMeter, Meter, ReportPeriod};
use pupkit::jobs::{
    EnqueueOptions, Job, JobError, Priority, Queue, QueueConfig, QueueStats, RateLimit, Scaling,
    ShutdownReport, Worker, WorkerConfig, WorkerHandle, WorkerStats,
};
use pupkit::redis::{RedisConfig, RedisConnection};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Embed a document's text.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct EmbedText {
    doc_id: u64,
    text: String,
}

/// Summarise a conversation.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Summarize {
    conversation_id: String,
}

/// Refresh a user's profile from their recent activity.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct UpdateProfile {
    user_id: String,
}

const USERS: [&str; 5] = ["user-1", "user-2", "user-3", "user-4", "user-5"];
/// How long dedup keys hold.
const DEDUP_TTL: Duration = Duration::from_secs(600);
/// How long running jobs may take to finish at shutdown.
const GRACE: Duration = Duration::from_secs(15);

async fn embed_text(job: Job<EmbedText>) -> Result<(), JobError> {
    tokio::time::sleep(Duration::from_millis(120)).await;
    // The payload names the document; its chunks come to about 1,200 tokens.
    let tokens = 1_200 + (job.data().text.len() as u64).div_ceil(4);
    let usage = job
        .usage("text-embedding-3-small")
        .operation("embedding")
        .tokens(tokens, 0);
    job.record_cost(usage).await?;
    Ok(())
}

async fn summarize(job: Job<Summarize>) -> Result<(), JobError> {
    tokio::time::sleep(Duration::from_millis(800)).await;
    let usage = job
        .usage("gpt-4o-mini")
        .operation("summary")
        .tokens(3_000, 250);
    job.record_cost(usage).await?;
    Ok(())
}

async fn update_profile(job: Job<UpdateProfile>) -> Result<(), JobError> {
    // Longer than the rate limit's interval (1.2 s), so several run at once and the worker
    // scales up on the backlog.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let usage = job
        .usage("gpt-4.1-nano")
        .operation("profile")
        .tokens(1_500, 200);
    job.record_cost(usage).await?;
    Ok(())
}

/// What the producer offered.
#[derive(Debug, Default)]
struct Produced {
    embeddings: u64,
    summaries: u64,
    profiles: u64,
    duplicates: u64,
}

/// Every 250 ms: a user uploads a document (normal priority) or asks a question (high), a
/// backfill embeds an old document (low), a conversation asks for a summary and a user's
/// profile asks for a refresh (both deduplicated).
async fn produce(
    embeddings: Queue<EmbedText>,
    summaries: Queue<Summarize>,
    profiles: Queue<UpdateProfile>,
    mut stop: watch::Receiver<bool>,
) -> pupkit::Result<Produced> {
    let mut produced = Produced::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    for round in 0u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let user = USERS[(round % USERS.len() as u64) as usize];
        let (first, priority) = if round % 4 == 0 {
            ("what did we decide about the launch date?", Priority::High)
        } else {
            (
                "quarterly report, section 3: revenue by region",
                Priority::Normal,
            )
        };
        let jobs = [
            (
                EmbedText {
                    doc_id: round * 2,
                    text: first.to_owned(),
                },
                EnqueueOptions::new().user(user).priority(priority),
            ),
            (
                EmbedText {
                    doc_id: round * 2 + 1,
                    text: "archived ticket: the export button does nothing on Safari".to_owned(),
                },
                EnqueueOptions::new().priority(Priority::Low),
            ),
        ];
        let added = embeddings
            .enqueue_many(jobs.iter().map(|(job, options)| (job, options)))
            .await?;
        produced.embeddings += added.len() as u64;

        let conversation_id = format!("conv-{}", round % 7);
        let summary = summaries
            .enqueue(
                &Summarize {
                    conversation_id: conversation_id.clone(),
                },
                &EnqueueOptions::new()
                    .user(user)
                    .dedup(format!("summary:{conversation_id}"), DEDUP_TTL),
            )
            .await?;
        produced.summaries += 1;
        produced.duplicates += u64::from(summary.duplicate);

        if round % 2 == 0 {
            let profile_user = USERS[((round / 2) % 3) as usize];
            let update = profiles
                .enqueue(
                    &UpdateProfile {
                        user_id: profile_user.to_owned(),
                    },
                    &EnqueueOptions::new()
                        .user(profile_user)
                        .dedup(format!("profile:{profile_user}"), DEDUP_TTL),
                )
                .await?;
            produced.profiles += 1;
            produced.duplicates += u64::from(update.duplicate);
        }
    }
    Ok(produced)
}

fn live_line(name: &str, queue: &QueueStats, worker: &WorkerStats) -> String {
    format!(
        "  {name:<10} pending {:>3}  active {:>2}  completed {:>3}  deduplicated {:>3} | slots {:>2}  running {:>2}",
        queue.pending,
        queue.active,
        queue.completed,
        queue.deduplicated,
        worker.concurrency,
        worker.running
    )
}

fn final_lines(name: &str, queue: &QueueStats, report: &ShutdownReport) {
    let worker = &report.stats;
    println!(
        "  {name:<10} enqueued {:>3}, deduplicated {:>3}, completed {:>3}, failed {}, left waiting {:>3}",
        queue.enqueued, queue.deduplicated, queue.completed, queue.failed, queue.pending
    );
    println!(
        "  {:<10} worker: claimed {}, completed {}, {} claim / {} settle / {} heartbeat calls, mean wait {:.0} ms, mean run {:.0} ms; shutdown: {} finished, {} released",
        "",
        worker.claimed,
        worker.completed,
        worker.claim_calls,
        worker.settle_calls,
        worker.heartbeat_calls,
        worker.mean_wait_ms,
        worker.mean_run_ms,
        report.finished,
        report.released
    );
}

fn parse_seconds() -> Result<u64, Box<dyn std::error::Error>> {
    let mut seconds = 10;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .ok_or("--seconds needs a value")?
                    .parse()
                    .map_err(|e| format!("--seconds: {e}"))?;
            }
            other => {
                return Err(
                    format!("unknown argument {other}; usage: workers [--seconds N]").into(),
                );
            }
        }
    }
    Ok(seconds)
}

/// Deletes every key under `prefix`: the queues' `{<prefix>:q:<name>}:*` and anything at
/// `<prefix>:*`.
async fn delete_keys(url: &str, prefix: &str) -> Result<usize, Box<dyn std::error::Error>> {
    let client = ::redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut deleted = 0;
    for pattern in [format!("{{{prefix}:q:*"), format!("{prefix}:*")] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                deleted += keys.len();
                let _: u64 = ::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(deleted)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds = parse_seconds()?;
    let prefix = format!("pkexample-workers-{}", std::process::id());
    let mut redis_config = RedisConfig::from_env();
    redis_config.op_timeout = Duration::from_secs(2);
    let redis = RedisConnection::connect(&redis_config).await?;
    let meter = Arc::new(Meter::builder().build().await?);

    let embeddings: Queue<EmbedText> = Queue::open(
        redis.clone(),
        QueueConfig::named("embeddings")
            .prefix(prefix.clone())
            .rate_limit(RateLimit::per_minute(100)),
    )
    .await?;
    let summaries: Queue<Summarize> = Queue::open(
        redis.clone(),
        QueueConfig::named("summaries")
            .prefix(prefix.clone())
            .rate_limit(RateLimit::per_minute(20)),
    )
    .await?;
    let profiles: Queue<UpdateProfile> = Queue::open(
        redis.clone(),
        QueueConfig::named("profiles")
            .prefix(prefix.clone())
            .rate_limit(RateLimit::per_minute(50)),
    )
    .await?;

    let workers: [(&str, WorkerHandle); 3] = [
        (
            "embeddings",
            Worker::new(embeddings.clone(), WorkerConfig::concurrency(20))
                .cost_meter(meter.clone())
                .start(embed_text)?,
        ),
        (
            "summaries",
            Worker::new(summaries.clone(), WorkerConfig::concurrency(5))
                .cost_meter(meter.clone())
                .start(summarize)?,
        ),
        (
            "profiles",
            Worker::new(
                profiles.clone(),
                WorkerConfig::concurrency(10).scaling(Scaling::between(2, 10)),
            )
            .cost_meter(meter.clone())
            .start(update_profile)?,
        ),
    ];

    let (stop, stopped) = watch::channel(false);
    let producer = tokio::spawn(produce(
        embeddings.clone(),
        summaries.clone(),
        profiles.clone(),
        stopped,
    ));
    println!("running for {seconds} s under prefix {prefix} (Ctrl-C to stop early)");

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let queues = [
            embeddings.stats().await?,
            summaries.stats().await?,
            profiles.stats().await?,
        ];
        println!(
            "[{:>3.0} s] cost so far {}",
            started.elapsed().as_secs_f64(),
            pupkit::cost::MicroUsd::from_micros(meter.stats().spent_micros as i64)
        );
        for ((name, worker), queue) in workers.iter().zip(&queues) {
            println!("{}", live_line(name, queue, &worker.stats()));
        }
    }

    stop.send_replace(true);
    let produced = producer.await??;
    println!(
        "\nstopping: the producer offered {} embeddings, {} summaries and {} profile updates ({} deduplicated); shutting the workers down (grace {GRACE:?})",
        produced.embeddings, produced.summaries, produced.profiles, produced.duplicates
    );
    let shutdown_started = Instant::now();
    let [(_, embed_worker), (_, summary_worker), (_, profile_worker)] = workers;
    let reports = tokio::join!(
        embed_worker.shutdown(GRACE),
        summary_worker.shutdown(GRACE),
        profile_worker.shutdown(GRACE),
    );
    let reports = [reports.0, reports.1, reports.2];
    // The counters after the shutdown: jobs that finished during the grace period included.
    let queues = [
        embeddings.stats().await?,
        summaries.stats().await?,
        profiles.stats().await?,
    ];
    println!(
        "all workers stopped in {:.2?}\n\nfinal stats:",
        shutdown_started.elapsed()
    );
    for ((name, queue), report) in ["embeddings", "summaries", "profiles"]
        .iter()
        .zip(&queues)
        .zip(&reports)
    {
        final_lines(name, queue, report);
    }

    let report = meter.report(ReportPeriod::Day).await?;
    println!(
        "\ncost total: {} over {} recorded jobs ({} input and {} output tokens)",
        report.totals.cost,
        report.totals.requests,
        report.totals.input_tokens,
        report.totals.output_tokens
    );
    for service in &report.by_service {
        println!(
            "  {:<10} {} over {} jobs",
            service.key, service.totals.cost, service.totals.requests
        );
    }
    if let Some(top) = report.by_user.first() {
        println!("  top spender: {} with {}", top.key, top.totals.cost);
    }

    let deleted = delete_keys(&redis_config.url, &prefix).await?;
    println!("deleted {deleted} keys under {prefix}");
    Ok(())
}
