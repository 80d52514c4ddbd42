//! The Postgres pool against raw tokio-postgres, in one run: a primary-key select from 10
//! concurrent tasks (raw: 10 dedicated connections with prepared statements), a query with a
//! new connection each time, and a `CachedRepo` hit against the database query. The bench
//! makes its own schema and table and drops them after.
//!
//! `cargo bench --bench database --features postgres` (Postgres at `PUPKIT_DATABASE_URL`).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
use pupkit::repo::{CachedRepo, PgConfig, PgPool};
use tokio::runtime::Runtime;
use tokio_postgres::NoTls;

const TASKS: usize = 10;
const QUERIES: usize = 50;
const ROWS: i64 = 10_000;

fn url() -> String {
    std::env::var("PUPKIT_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn schema() -> String {
    format!("pkbench_{}", std::process::id())
}

fn select_sql() -> String {
    format!("SELECT body FROM {}.messages WHERE id = $1", schema())
}

async fn raw_client() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url(), NoTls)
        .await
        .expect("Postgres for the benchmark");
    tokio::spawn(connection);
    client
}

fn setup(rt: &Runtime) -> PgPool {
    rt.block_on(async {
        let pool = PgPool::connect(&PgConfig::new(url())).await.expect("Postgres for the benchmark");
        let schema = schema();
        pool.execute(&format!("CREATE SCHEMA {schema}"), &[]).await.unwrap();
        pool.execute(&format!("CREATE TABLE {schema}.messages (id int8 PRIMARY KEY, body text NOT NULL)"), &[])
            .await
            .unwrap();
        pool.execute(
            &format!("INSERT INTO {schema}.messages SELECT g, 'message body number ' || g FROM generate_series(1, {ROWS}) g"),
            &[],
        )
        .await
        .unwrap();
        pool
    })
}

fn teardown(rt: &Runtime, pool: &PgPool) {
    rt.block_on(pool.execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", schema()), &[]))
        .unwrap();
}

fn key(task: usize, i: usize) -> i64 {
    ((task * 7919 + i * 104_729) as i64 % ROWS) + 1
}

fn pk_select(c: &mut Criterion, rt: &Runtime, pool: &PgPool) {
    let raw: Vec<(Arc<tokio_postgres::Client>, tokio_postgres::Statement)> = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..TASKS {
            let client = raw_client().await;
            let statement = client.prepare(&select_sql()).await.unwrap();
            clients.push((Arc::new(client), statement));
        }
        clients
    });
    let mut group = c.benchmark_group("pk_select_10_tasks");
    group.throughput(criterion::Throughput::Elements((TASKS * QUERIES) as u64));
    group.bench_function("raw_tokio_postgres", |b| {
        b.to_async(rt).iter(|| {
            let raw = raw.clone();
            async move {
                let tasks: Vec<_> = raw
                    .into_iter()
                    .enumerate()
                    .map(|(t, (client, statement))| {
                        tokio::spawn(async move {
                            for i in 0..QUERIES {
                                client.query_one(&statement, &[&key(t, i)]).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            }
        })
    });
    group.bench_function("pupkit", |b| {
        b.to_async(rt).iter(|| {
            let pool = pool.clone();
            async move {
                let sql = Arc::new(select_sql());
                let tasks: Vec<_> = (0..TASKS)
                    .map(|t| {
                        let (pool, sql) = (pool.clone(), sql.clone());
                        tokio::spawn(async move {
                            for i in 0..QUERIES {
                                pool.query_one(&sql, &[&key(t, i)]).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            }
        })
    });
    group.finish();
}

fn connect_per_query(c: &mut Criterion, rt: &Runtime, pool: &PgPool) {
    let mut group = c.benchmark_group("connect_per_query");
    group.bench_function("pupkit", |b| {
        b.to_async(rt)
            .iter(|| async { pool.query_one(&select_sql(), &[&42i64]).await.unwrap() })
    });
    group.bench_function("unpooled", |b| {
        b.to_async(rt).iter(|| async {
            let client = raw_client().await;
            client.query_one(&select_sql(), &[&42i64]).await.unwrap()
        })
    });
    group.finish();
}

fn cached_repo_hit(c: &mut Criterion, rt: &Runtime, pool: &PgPool) {
    let _runtime = rt.enter();
    let cache: Tiered<String> = Tiered::builder(TieredConfig::named("bench-messages"))
        .memory_tiers(16 << 20)
        .build()
        .unwrap();
    let repo = CachedRepo::new(pool.clone(), cache);
    let read = |repo: &CachedRepo<PgPool, Tiered<String>>| {
        let repo = repo.clone();
        async move {
            repo.read(
                "message:42",
                &EntryOptions::new(),
                |db: Arc<PgPool>| async move {
                    Ok(db
                        .query_one(&select_sql(), &[&42i64])
                        .await?
                        .get::<_, String>(0))
                },
            )
            .await
            .unwrap()
        }
    };
    rt.block_on(read(&repo));
    let mut group = c.benchmark_group("cached_repo_hit");
    group.bench_function("db_query", |b| {
        b.to_async(rt)
            .iter(|| async { pool.query_one(&select_sql(), &[&42i64]).await.unwrap() })
    });
    group.bench_function("pupkit", |b| b.to_async(rt).iter(|| read(&repo)));
    group.finish();
}

/// Pool checkout latency, p50 and p99, with `tasks` tasks each taking and returning a
/// connection 200 times (the default pool: 50 connections at most); printed if `print`.
fn checkout_latency(rt: &Runtime, pool: &PgPool, tasks: usize, print: bool) {
    let mut latencies: Vec<Duration> = rt.block_on(async {
        let workers: Vec<_> = (0..tasks)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::with_capacity(200);
                    for _ in 0..200 {
                        let started = Instant::now();
                        let connection = pool.connection().await.unwrap();
                        seen.push(started.elapsed());
                        // Hold it as a short query would.
                        tokio::task::yield_now().await;
                        drop(connection);
                    }
                    seen
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(worker.await.unwrap());
        }
        all
    });
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    if print {
        println!(
            "pool checkout under {tasks} tasks: p50 {:?}, p99 {:?}",
            at(0.5),
            at(0.99)
        );
    }
}

fn print_ratios(started: Instant) {
    println!("\n== pupkit database vs raw baselines (this run) ==");
    let rows = [
        (
            "pk_select_10_tasks",
            "pupkit",
            "raw_tokio_postgres",
            "PK select, 10 tasks, vs raw clients (time)",
            "<= 1.11x (throughput >= 0.9x)",
        ),
        (
            "connect_per_query",
            "unpooled",
            "pupkit",
            "connect per query vs pooled (how much the pool saves)",
            "report",
        ),
        (
            "cached_repo_hit",
            "db_query",
            "pupkit",
            "DB query vs CachedRepo hit (how much the cache saves)",
            "report",
        ),
    ];
    for (group, top, bottom, label, target) in rows {
        match (
            support::ran_since(group, "pupkit", started),
            support::mean_ns(group, top),
            support::mean_ns(group, bottom),
        ) {
            (true, Some(a), Some(b)) => println!(
                "{label}: {:.0} ns vs {:.0} ns, ratio {:.2}x (target {target})",
                a,
                b,
                a / b
            ),
            _ => println!("{label}: not run"),
        }
    }
}

fn main() {
    let started = Instant::now();
    let rt = Runtime::new().unwrap();
    let pool = setup(&rt);
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    pk_select(&mut criterion, &rt, &pool);
    connect_per_query(&mut criterion, &rt, &pool);
    cached_repo_hit(&mut criterion, &rt, &pool);
    // The first pass opens the pool's connections; the next ones measure checkouts.
    checkout_latency(&rt, &pool, 100, false);
    checkout_latency(&rt, &pool, 10, true);
    checkout_latency(&rt, &pool, 100, true);
    teardown(&rt, &pool);
    criterion.final_summary();
    print_ratios(started);
}
