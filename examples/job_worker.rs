//! One worker process for one queue, for crash-recovery tests and multi-process benchmarks.
//!
//! ```text
//! PUPKIT_REDIS_URL=redis://127.0.0.1:6379 cargo run --features redis --example job_worker -- \
//!     <prefix> <queue> [--lease-ms 1000] [--work-ms 0] [--concurrency 20] [--batch 32]
//! ```
//!
//! Its jobs are numbers. Each run of a job adds one to field `<n>` of the hash
//! `<prefix>:runs`, then the job sleeps `--work-ms` and completes. The process prints `ready`
//! once it works, and shuts down gracefully on Ctrl-C (SIGINT), printing its stats.

use std::time::Duration;

use pupkit::jobs::{Job, JobError, Queue, QueueConfig, Worker, WorkerConfig};
use pupkit::redis::{RedisConfig, RedisConnection};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(prefix), Some(name)) = (args.next(), args.next()) else {
        return Err("usage: job_worker <prefix> <queue> [--lease-ms N] [--work-ms N] [--concurrency N] [--batch N]".into());
    };
    let (mut lease_ms, mut work_ms, mut concurrency, mut batch) = (1_000u64, 0u64, 20u32, 32u32);
    while let Some(flag) = args.next() {
        let value: u64 = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))?;
        match flag.as_str() {
            "--lease-ms" => lease_ms = value,
            "--work-ms" => work_ms = value,
            "--concurrency" => concurrency = u32::try_from(value)?,
            "--batch" => batch = u32::try_from(value)?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }

    let mut redis_config = RedisConfig::from_env();
    redis_config.op_timeout = Duration::from_secs(2);
    let redis = RedisConnection::connect(&redis_config).await?;
    let queue: Queue<u64> = Queue::open(
        redis,
        QueueConfig::named(name)
            .prefix(prefix.clone())
            .lease(Duration::from_millis(lease_ms)),
    )
    .await?;
    let client = ::redis::Client::open(redis_config.url.as_str())?;
    let runs = client.get_multiplexed_async_connection().await?;
    let runs_key = format!("{prefix}:runs");

    let worker = Worker::new(
        queue,
        WorkerConfig::concurrency(concurrency).claim_batch(batch),
    )
    .start(move |job: Job<u64>| {
        let mut runs = runs.clone();
        let runs_key = runs_key.clone();
        async move {
            let _: i64 = ::redis::cmd("HINCRBY")
                .arg(&runs_key)
                .arg(job.data())
                .arg(1)
                .query_async(&mut runs)
                .await?;
            if work_ms > 0 {
                tokio::time::sleep(Duration::from_millis(work_ms)).await;
            }
            Ok::<(), JobError>(())
        }
    })?;
    println!("ready");
    tokio::signal::ctrl_c().await?;
    let report = worker.shutdown(Duration::from_secs(10)).await;
    println!("{}", serde_json::to_string(&report.stats)?);
    eprintln!(
        "shut down: {} finished after the signal, {} released",
        report.finished, report.released
    );
    Ok(())
}
