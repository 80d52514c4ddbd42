//! The cost meter against raw baselines, in one run:
//! - `record()` in memory vs a hand-rolled mutex map (dedup set, event list, counters);
//! - `record()` on Redis from 64 tasks vs raw EVALSHA of a script doing the same increments,
//!   and the Redis commands each record costs;
//! - reserve + commit latency on Redis vs one raw EVALSHA;
//! - on a 1,000,000-event Postgres ledger: a month report and a CSV export of the month, vs
//!   the raw aggregate query and a raw `COPY ... TO STDOUT (FORMAT csv)`.
//!
//! `cargo bench --bench cost --features redis,postgres` (services at `PUPKIT_REDIS_URL` and
//! `PUPKIT_DATABASE_URL`). The bench uses its own key prefix and schema and removes them.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use futures_util::StreamExt;
use jiff::Timestamp;
use pupkit::cost::{
    Budget, CostMeter, LedgerQuery, Meter, MicroUsd, Mode, Period, PgLedger, RedisSpendStore,
    ReportPeriod, Scope, Spender, Usage,
};
use pupkit::redis::{RedisConfig, RedisConnection};
use pupkit::repo::{PgConfig, PgPool};
use tokio::runtime::Runtime;

const TASKS: usize = 64;
const LEDGER_ROWS: i64 = 1_000_000;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn usage(user: u64) -> Usage {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    Usage::new(
        format!("bench-{id}"),
        "chat",
        format!("user-{}", user % 100),
        "gpt-4o-mini",
    )
    .tokens(1_200, 300)
}

fn redis_url() -> String {
    std::env::var("PUPKIT_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn database_url() -> String {
    std::env::var("PUPKIT_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn prefix() -> String {
    format!("pkbench-cost-{}", std::process::id())
}

/// What a host would write by hand in one process: a dedup set, the event list and three
/// scopes of day and month counters behind a mutex.
#[derive(Default)]
struct HandRolled {
    ids: HashSet<String>,
    events: Vec<(String, String, String, i64)>,
    counters: HashMap<String, i64>,
}

fn record_memory(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("cost_record_memory");
    group.bench_function("pupkit", |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let meter = Meter::builder().build().await.unwrap();
            let started = Instant::now();
            for i in 0..iters {
                meter.record(usage(i)).await.unwrap();
            }
            started.elapsed()
        })
    });
    group.bench_function("raw_mutex_map", |b| {
        b.iter_custom(|iters| {
            let state = Mutex::new(HandRolled::default());
            let started = Instant::now();
            for i in 0..iters {
                let usage = usage(i);
                // 1,200 x $0.15/M + 300 x $0.60/M, in micro-dollars.
                let cost = (1_200 * 150_000 + 300 * 600_000 + 500_000) / 1_000_000;
                let mut state = state.lock().unwrap();
                if !state.ids.insert(usage.request_id.clone()) {
                    continue;
                }
                for scope in [
                    "g".to_owned(),
                    format!("s:{}", usage.service),
                    format!("u:{}", usage.user),
                ] {
                    for period in ["d", "m"] {
                        *state
                            .counters
                            .entry(format!("{scope}|{period}"))
                            .or_default() += cost;
                    }
                }
                state
                    .events
                    .push((usage.request_id, usage.service, usage.user, cost));
            }
            started.elapsed()
        })
    });
    group.finish();
}

async fn redis_meter(connection: &RedisConnection) -> Meter {
    Meter::builder()
        .spend_store(Arc::new(
            RedisSpendStore::new(connection.clone(), &prefix()).unwrap(),
        ))
        .build()
        .await
        .unwrap()
}

/// The increments a record makes (3 scopes x day and month), done by hand in one script.
const RAW_RECORD_LUA: &str = r#"
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[1])
  redis.call('EXPIREAT', KEYS[i], ARGV[2])
end
return 1
"#;

fn record_redis(c: &mut Criterion, rt: &Runtime, connection: &RedisConnection) {
    let meter = Arc::new(rt.block_on(redis_meter(connection)));
    let raw = rt.block_on(raw_redis());
    let script = redis::Script::new(RAW_RECORD_LUA);
    let keyspace = format!("{{{}:raw}}", prefix());
    let mut group = c.benchmark_group("cost_record_redis_64_tasks");
    group.throughput(criterion::Throughput::Elements(1));
    group.bench_function("pupkit", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let meter = meter.clone();
            async move {
                let per_task = iters.div_ceil(TASKS as u64);
                let started = Instant::now();
                let tasks: Vec<_> = (0..TASKS as u64)
                    .map(|t| {
                        let meter = meter.clone();
                        tokio::spawn(async move {
                            for i in 0..per_task {
                                meter.record(usage(t * per_task + i)).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                started.elapsed()
            }
        })
    });
    group.bench_function("raw_evalsha", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let raw = raw.clone();
            let script = script.clone();
            let keyspace = keyspace.clone();
            async move {
                let per_task = iters.div_ceil(TASKS as u64);
                let expires = Timestamp::now().as_second() + 86_400;
                let started = Instant::now();
                let tasks: Vec<_> = (0..TASKS as u64)
                    .map(|t| {
                        let mut raw = raw.clone();
                        let script = script.clone();
                        let keyspace = keyspace.clone();
                        tokio::spawn(async move {
                            for i in 0..per_task {
                                let user = (t * per_task + i) % 100;
                                let mut invocation = script.prepare_invoke();
                                for scope in [
                                    "g".to_owned(),
                                    "s:chat".to_owned(),
                                    format!("u:user-{user}"),
                                ] {
                                    for period in ["d", "m"] {
                                        invocation.key(format!("{keyspace}:{scope}|{period}"));
                                    }
                                }
                                invocation.arg(360).arg(expires);
                                let _: i64 = invocation.invoke_async(&mut raw).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
                started.elapsed()
            }
        })
    });
    group.finish();
    // Round trips: count the EVALSHA calls Redis saw for a known number of records.
    rt.block_on(async {
        let mut raw = raw.clone();
        let before = evalsha_calls(&mut raw).await;
        for i in 0..1_000 {
            meter.record(usage(i)).await.unwrap();
        }
        let after = evalsha_calls(&mut raw).await;
        println!(
            "Redis record round trips: {:.2} EVALSHA per record (1,000 records, no other command)",
            (after - before) as f64 / 1_000.0
        );
    });
}

async fn raw_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis for the benchmark")
}

/// Calls of EVALSHA so far, from `INFO commandstats`.
async fn evalsha_calls(raw: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(raw)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

fn reserve_commit_latency(rt: &Runtime, connection: &RedisConnection) {
    rt.block_on(async {
        let meter = redis_meter(connection).await;
        meter
            .set_budget(
                Budget::new(Scope::User("latency".into()), MicroUsd::from_dollars(1_000_000), Period::Month)
                    .mode(Mode::Hard),
            )
            .await
            .unwrap();
        let spender = Spender::new("chat", "latency");
        let mut pupkit = Vec::with_capacity(2_000);
        for i in 0..2_200 {
            let started = Instant::now();
            let held = meter.reserve(&spender, "0.01".parse().unwrap()).await.unwrap();
            let mut actual = usage(i);
            actual.user = "latency".into();
            meter.commit(&held, actual).await.unwrap();
            if i >= 200 {
                pupkit.push(started.elapsed());
            }
        }
        let mut raw = raw_redis().await;
        let script = redis::Script::new("return 1");
        let mut baseline = Vec::with_capacity(2_000);
        for i in 0..2_200 {
            let started = Instant::now();
            let _: i64 = script.invoke_async(&mut raw).await.unwrap();
            if i >= 200 {
                baseline.push(started.elapsed());
            }
        }
        let (p50, p99) = percentiles(pupkit);
        let (raw50, raw99) = percentiles(baseline);
        println!(
            "reserve + commit on Redis: p50 {p50:?}, p99 {p99:?}; one raw EVALSHA: p50 {raw50:?}, p99 {raw99:?}; ratio p50 {:.2}x (two round trips)",
            p50.as_secs_f64() / raw50.as_secs_f64()
        );
    });
}

/// Fills a ledger with a million events over November 2026 in one INSERT ... SELECT.
async fn seed_ledger(pool: &PgPool, schema: &str) {
    pool.execute(
        &format!(
            "INSERT INTO {schema}.pupkit_cost_ledger \
             (request_id, at, service, user_id, model, operation, source, input_tokens, \
              output_tokens, units, cost_micros, saved_micros, priced) \
             SELECT 'seed-' || g, timestamptz '2026-11-01 00:00:00+00' + (g % 2505600) * interval '1 second', \
                    (ARRAY['chat','search','summaries'])[1 + g % 3], 'user-' || (g % 5000), \
                    (ARRAY['gpt-4o-mini','text-embedding-3-small','gpt-4o'])[1 + g % 3], 'request', \
                    CASE WHEN g % 10 = 0 THEN 'cache' ELSE 'api' END, 1000 + g % 500, g % 300, 0, \
                    CASE WHEN g % 10 = 0 THEN 0 ELSE 100 + g % 900 END, \
                    CASE WHEN g % 10 = 0 THEN 500 ELSE 0 END, true \
             FROM generate_series(1, {LEDGER_ROWS}) g"
        ),
        &[],
    )
    .await
    .unwrap();
    pool.execute(&format!("ANALYZE {schema}.pupkit_cost_ledger"), &[])
        .await
        .unwrap();
}

fn postgres_ledger(rt: &Runtime) {
    let schema = format!("pkbench_cost_{}", std::process::id());
    rt.block_on(async {
        let pool = PgPool::connect(&PgConfig::new(database_url())).await.expect("Postgres for the benchmark");
        pool.execute(&format!("CREATE SCHEMA {schema}"), &[]).await.unwrap();
        let ledger = PgLedger::new(pool.clone(), &schema).unwrap();
        ledger.migrate().await.unwrap();
        let seeding = Instant::now();
        seed_ledger(&pool, &schema).await;
        println!("seeded {LEDGER_ROWS} ledger rows in {:?}", seeding.elapsed());
        let now: Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
        let meter = Meter::builder()
            .ledger(Arc::new(ledger))
            .clock(move || now)
            .build()
            .await
            .unwrap();
        let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);

        let mut report = Vec::new();
        let mut raw_report = Vec::new();
        let raw_sql = format!(
            "SELECT service, user_id, model, sum(cost_micros)::int8, sum(input_tokens)::int8, count(*) \
             FROM {schema}.pupkit_cost_ledger WHERE at >= $1::text::timestamptz AND at < $2::text::timestamptz \
             GROUP BY GROUPING SETS ((), (service), (user_id), (model))"
        );
        for _ in 0..3 {
            let started = Instant::now();
            let month = meter.report(ReportPeriod::Month).await.unwrap();
            report.push(started.elapsed());
            assert_eq!(month.totals.requests, LEDGER_ROWS as u64);
            let started = Instant::now();
            let rows = client
                .query(&raw_sql, &[&"2026-11-01T00:00:00Z", &"2026-12-01T00:00:00Z"])
                .await
                .unwrap();
            raw_report.push(started.elapsed());
            assert!(rows.len() > 5_000);
        }
        let query = LedgerQuery::between("2026-11-01T00:00:00Z".parse().unwrap(), "2026-12-01T00:00:00Z".parse().unwrap());
        let mut export = Vec::new();
        let mut raw_export = Vec::new();
        let copy_sql = format!(
            "COPY (SELECT at, request_id, service, user_id, model, operation, source, input_tokens, \
             output_tokens, units, cost_micros, saved_micros, priced FROM {schema}.pupkit_cost_ledger \
             WHERE at >= '2026-11-01T00:00:00Z' AND at < '2026-12-01T00:00:00Z' ORDER BY at, request_id) \
             TO STDOUT (FORMAT csv)"
        );
        let mut bytes = 0;
        for _ in 0..2 {
            let started = Instant::now();
            let mut stream = meter.export_csv(&query);
            bytes = 0;
            while let Some(chunk) = stream.next().await {
                bytes += chunk.unwrap().len();
            }
            export.push(started.elapsed());
            let started = Instant::now();
            let copy = client.copy_out(&copy_sql).await.unwrap();
            let mut copy = std::pin::pin!(copy);
            let mut raw_bytes = 0;
            while let Some(chunk) = copy.next().await {
                raw_bytes += chunk.unwrap().len();
            }
            raw_export.push(started.elapsed());
            assert!(raw_bytes > 0);
        }
        let best = |v: &Vec<Duration>| *v.iter().min().unwrap();
        println!(
            "1M-event ledger: month report {:?} (raw aggregate query {:?}, {:.2}x); CSV export of the month {:?} for {} MB (raw COPY {:?}, {:.2}x)",
            best(&report),
            best(&raw_report),
            best(&report).as_secs_f64() / best(&raw_report).as_secs_f64(),
            best(&export),
            bytes / 1_000_000,
            best(&raw_export),
            best(&export).as_secs_f64() / best(&raw_export).as_secs_f64(),
        );
        pool.execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"), &[]).await.unwrap();
    });
}

fn delete_keys(rt: &Runtime) {
    rt.block_on(async {
        let mut raw = raw_redis().await;
        for pattern in [
            format!("{{{}:cost}}*", prefix()),
            format!("{{{}:raw}}*", prefix()),
        ] {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query_async(&mut raw)
                .await
                .unwrap();
            for chunk in keys.chunks(1000) {
                let _: () = redis::cmd("DEL")
                    .arg(chunk)
                    .query_async(&mut raw)
                    .await
                    .unwrap();
            }
        }
    });
}

fn print_ratios(started: Instant) {
    println!("\n== pupkit cost vs raw baselines (this run) ==");
    let rows = [
        (
            "cost_record_memory",
            "pupkit",
            "raw_mutex_map",
            "record() in memory vs hand-rolled mutex map",
        ),
        (
            "cost_record_redis_64_tasks",
            "pupkit",
            "raw_evalsha",
            "record() on Redis, 64 tasks, vs raw EVALSHA",
        ),
    ];
    for (group, top, bottom, label) in rows {
        match (
            support::ran_since(group, top, started),
            support::mean_ns(group, top),
            support::mean_ns(group, bottom),
        ) {
            (true, Some(a), Some(b)) => println!(
                "{label}: {:.0} ns vs {:.0} ns per record ({:.0} vs {:.0} records/s), ratio {:.2}x",
                a,
                b,
                1e9 / a,
                1e9 / b,
                a / b
            ),
            _ => println!("{label}: not run"),
        }
    }
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
        .sample_size(20)
        .configure_from_args();
    record_memory(&mut criterion, &rt);
    record_redis(&mut criterion, &rt, &connection);
    reserve_commit_latency(&rt, &connection);
    postgres_ledger(&rt);
    delete_keys(&rt);
    criterion.final_summary();
    print_ratios(started);
}
