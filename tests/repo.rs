//! The Postgres pool against the real database: each test in its own schema and with its own
//! application_name, so it can kill its own connections only.
#![cfg(feature = "postgres")]

mod support;

use std::time::{Duration, Instant};

use support::postgres::{drop_schema, pool};

#[tokio::test]
async fn queries_take_parameters_never_interpolated() {
    let Some((pool, schema)) = pool("params", |_| {}).await else {
        return;
    };
    pool.execute(
        &format!("CREATE TABLE {schema}.messages (id int8 PRIMARY KEY, body text NOT NULL)"),
        &[],
    )
    .await
    .unwrap();
    let hostile = "'); DROP TABLE messages; --";
    let insert = format!("INSERT INTO {schema}.messages (id, body) VALUES ($1, $2)");
    for (id, body) in [(1i64, "hello"), (2, hostile)] {
        assert_eq!(pool.execute(&insert, &[&id, &body]).await.unwrap(), 1);
    }
    let select = format!("SELECT body FROM {schema}.messages WHERE id = $1");
    let row = pool.query_one(&select, &[&2i64]).await.unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        hostile,
        "stored verbatim, the table intact"
    );
    assert!(pool.query_opt(&select, &[&3i64]).await.unwrap().is_none());
    let all = pool
        .query(
            &format!("SELECT id FROM {schema}.messages ORDER BY id"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let err = pool
        .query_one(&format!("SELECT id FROM {schema}.messages"), &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("returned 2 rows"), "{err}");
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_failing_statement_leaves_its_connection_usable() {
    let Some((pool, schema)) = pool("failing", |c| c.max_size = 1).await else {
        return;
    };
    let err = pool.execute("SELEC broken syntax", &[]).await.unwrap_err();
    match &err {
        pupkit::Error::Database {
            code, statement, ..
        } => {
            assert_eq!(code.as_deref(), Some("42601"));
            assert_eq!(statement, "SELEC broken syntax");
        }
        other => panic!("unexpected {other}"),
    }
    // The only connection serves the next statement.
    let row = pool.query_one("SELECT 1::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(pool.status().broken_connections, 0);
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_schema_change_drops_the_cached_statement_and_retries() {
    let Some((pool, schema)) = pool("plan", |c| c.max_size = 1).await else {
        return;
    };
    pool.execute(&format!("CREATE TABLE {schema}.t (a int4)"), &[])
        .await
        .unwrap();
    pool.execute(&format!("INSERT INTO {schema}.t VALUES (1)"), &[])
        .await
        .unwrap();
    let select = format!("SELECT * FROM {schema}.t");
    assert_eq!(pool.query_one(&select, &[]).await.unwrap().len(), 1);
    pool.execute(
        &format!("ALTER TABLE {schema}.t ADD COLUMN b int4 DEFAULT 2"),
        &[],
    )
    .await
    .unwrap();
    let row = pool.query_one(&select, &[]).await.unwrap();
    assert_eq!(
        row.len(),
        2,
        "the statement was prepared again for the new columns"
    );
    assert_eq!(row.get::<_, i32>(1), 2);
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn statement_timeout_cancels_and_the_pool_goes_on() {
    let Some((pool, schema)) = pool("stmt-timeout", |c| {
        c.statement_timeout = Duration::from_millis(200)
    })
    .await
    else {
        return;
    };
    let err = pool.execute("SELECT pg_sleep(5)", &[]).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("57014"), "{err}");
    for _ in 0..5 {
        pool.execute("SELECT 1", &[]).await.unwrap();
    }
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn an_exhausted_pool_times_out_with_its_size_and_waiters() {
    let Some((pool, schema)) = pool("exhausted", |c| {
        c.max_size = 1;
        c.checkout_timeout = Duration::from_millis(300);
    })
    .await
    else {
        return;
    };
    let holder = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("SELECT pg_sleep(2)", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let err = pool.execute("SELECT 1", &[]).await.unwrap_err();
    assert!(
        matches!(err, pupkit::Error::PoolExhausted { max_size: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pool of 1 open (max 1)"), "{err}");
    assert!(err.to_string().contains("callers waiting"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited {:?}",
        started.elapsed()
    );
    assert_eq!(pool.status().checkout_timeouts, 1);
    holder.await.unwrap().unwrap();
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn killed_backends_are_never_handed_out_and_queries_go_on() {
    let Some((pool, schema)) = pool("killed", |c| c.max_size = 3).await else {
        return;
    };
    // Open three connections.
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.execute("SELECT pg_sleep(0.2)", &[]).await })
        })
        .collect();
    for task in busy {
        task.await.unwrap().unwrap();
    }
    assert_eq!(pool.status().size, 3);
    // Terminate every backend of this pool (found by its own application_name).
    let (killer, connection) =
        tokio_postgres::connect(&support::database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let app = killer
        .query_one("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'pkt-killed-%' LIMIT 1", &[])
        .await
        .unwrap()
        .get::<_, String>(0);
    let killed = killer
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    assert_eq!(killed.len(), 3);
    // Every later query succeeds: dead connections fail validation and are replaced.
    for i in 0..10 {
        let row = pool.query_one("SELECT $1::int4", &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    assert!(pool.status().broken_connections >= 1, "{:?}", pool.status());
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn slow_queries_are_logged_without_their_parameters() {
    let Some((pool, schema)) = pool("slow", |c| {
        c.slow_query_threshold = Duration::from_millis(50)
    })
    .await
    else {
        return;
    };
    pool.execute(
        "SELECT pg_sleep($1::float8), $2::text",
        &[&0.1f64, &"a secret value"],
    )
    .await
    .unwrap();
    // Other statements may be slow too on a loaded machine: look for this one.
    let log = pool.slow_queries();
    let entry = log
        .iter()
        .find(|q| q.statement == "SELECT pg_sleep($1::float8), $2::text")
        .expect("the slow statement is in the log");
    assert!(entry.elapsed >= Duration::from_millis(50));
    assert!(pool.status().slow_queries >= 1);
    assert!(
        !format!("{log:?}").contains("a secret value"),
        "parameters are never kept"
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn transactions_commit_or_roll_back_as_a_whole() {
    use pupkit::repo::TxOptions;
    let Some((pool, schema)) = pool("tx", |_| {}).await else {
        return;
    };
    pool.execute(
        &format!("CREATE TABLE {schema}.accounts (id int8 PRIMARY KEY, cents int8 NOT NULL)"),
        &[],
    )
    .await
    .unwrap();
    pool.execute(
        &format!("INSERT INTO {schema}.accounts VALUES (1, 500), (2, 0)"),
        &[],
    )
    .await
    .unwrap();
    let debit = format!("UPDATE {schema}.accounts SET cents = cents - $2 WHERE id = $1");
    let credit = format!("UPDATE {schema}.accounts SET cents = cents + $2 WHERE id = $1");
    let (d, c) = (debit.clone(), credit.clone());
    pool.transaction(&TxOptions::default(), move |tx| {
        let (d, c) = (d.clone(), c.clone());
        Box::pin(async move {
            tx.execute(&d, &[&1i64, &100i64]).await?;
            tx.execute(&c, &[&2i64, &100i64]).await
        })
    })
    .await
    .unwrap();
    // A failure half-way rolls the whole transaction back.
    let (d, bad) = (
        debit.clone(),
        format!("UPDATE {schema}.no_such_table SET x = 1"),
    );
    let err = pool
        .transaction(&TxOptions::default(), move |tx| {
            let (d, bad) = (d.clone(), bad.clone());
            Box::pin(async move {
                tx.execute(&d, &[&1i64, &100i64]).await?;
                tx.execute(&bad, &[]).await
            })
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("42P01"), "{err}");
    let balances: Vec<i64> = pool
        .query(
            &format!("SELECT cents FROM {schema}.accounts ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(balances, [400, 100]);
    // Read-only transactions refuse writes.
    let mut options = TxOptions::default();
    options.read_only = true;
    let d = debit.clone();
    let err = pool
        .transaction(&options, move |tx| {
            let d = d.clone();
            Box::pin(async move { tx.execute(&d, &[&1i64, &1i64]).await })
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("25006"), "{err}");
    drop_schema(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serialization_failures_are_retried_until_every_increment_lands() {
    use pupkit::repo::{Isolation, TxOptions};
    let Some((pool, schema)) = pool("serializable", |c| c.max_size = 8).await else {
        return;
    };
    pool.execute(
        &format!("CREATE TABLE {schema}.counter (id int4 PRIMARY KEY, n int8 NOT NULL)"),
        &[],
    )
    .await
    .unwrap();
    pool.execute(&format!("INSERT INTO {schema}.counter VALUES (1, 0)"), &[])
        .await
        .unwrap();
    let read = format!("SELECT n FROM {schema}.counter WHERE id = 1");
    let write = format!("UPDATE {schema}.counter SET n = $1 WHERE id = 1");
    let mut options = TxOptions::isolation(Isolation::Serializable);
    options.retries = 50;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (pool, read, write, options) =
                (pool.clone(), read.clone(), write.clone(), options.clone());
            tokio::spawn(async move {
                pool.transaction(&options, move |tx| {
                    let (read, write) = (read.clone(), write.clone());
                    Box::pin(async move {
                        let n: i64 = tx.query_one(&read, &[]).await?.get(0);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        tx.execute(&write, &[&(n + 1)]).await
                    })
                })
                .await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let n: i64 = pool.query_one(&read, &[]).await.unwrap().get(0);
    assert_eq!(n, 8, "every increment landed, none lost");
    assert!(
        pool.status().transaction_retries >= 1,
        "{:?}",
        pool.status()
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn cached_repo_reads_through_the_cache_and_writes_invalidate_their_tags() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
    use pupkit::repo::{CachedRepo, PgPool, PooledRepo};

    let Some((pool, schema)) = pool("cachedrepo", |_| {}).await else {
        return;
    };
    pool.execute(
        &format!("CREATE TABLE {schema}.messages (id int8 PRIMARY KEY, conv int8, body text)"),
        &[],
    )
    .await
    .unwrap();
    pool.execute(
        &format!("INSERT INTO {schema}.messages VALUES (1, 7, 'first')"),
        &[],
    )
    .await
    .unwrap();
    let cache: Tiered<String> = Tiered::builder(TieredConfig::named("messages"))
        .memory_tiers(1 << 20)
        .build()
        .unwrap();
    let repo = CachedRepo::new(pool.clone(), cache);
    let loads = Arc::new(AtomicUsize::new(0));
    let read = |repo: &CachedRepo<PgPool, Tiered<String>>| {
        let (loads, sql) = (
            loads.clone(),
            format!("SELECT body FROM {schema}.messages WHERE id = $1"),
        );
        let options = EntryOptions::new().tags(["conv:7"]);
        let repo = repo.clone();
        async move {
            repo.read("message:1", &options, move |db: Arc<PgPool>| async move {
                loads.fetch_add(1, Ordering::SeqCst);
                let row = db.query_one(&sql, &[&1i64]).await?;
                Ok(row.get::<_, String>(0))
            })
            .await
            .unwrap()
        }
    };
    assert_eq!(*read(&repo).await, "first");
    assert_eq!(*read(&repo).await, "first");
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "the second read was a cache hit"
    );

    let update = format!("UPDATE {schema}.messages SET body = $1 WHERE id = $2");
    let changed = repo
        .write(&["conv:7"], |db: Arc<PgPool>| async move {
            db.execute(&update, &[&"edited", &1i64]).await
        })
        .await
        .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(
        *read(&repo).await,
        "edited",
        "a read after a write never sees the old row"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2);

    // The repository also works behind the dyn-compatible trait.
    let dynamic: Arc<dyn PooledRepo> = Arc::new(pool.clone());
    let row = dynamic.query_one("SELECT 2::int4", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn reads_go_to_the_replica_and_a_unit_that_wrote_reads_the_primary() {
    // The "replica" is the same database under another application_name, which tells the
    // sessions apart.
    let Some((pool, schema)) =
        pool("replica", |c| c.replica_url = Some(support::database_url())).await
    else {
        return;
    };
    let whoami = "SELECT current_setting('application_name')";
    let primary_name: String = {
        let mut unit = pool.unit_of_work();
        unit.execute("SELECT 1", &[]).await.unwrap();
        unit.query_one(whoami, &[]).await.unwrap().get(0)
    };
    let read_name: String = pool.query_one(whoami, &[]).await.unwrap().get(0);
    assert_eq!(
        read_name,
        format!("{primary_name}-replica"),
        "plain reads use the replica"
    );
    let mut unit = pool.unit_of_work();
    let before: String = unit.query_one(whoami, &[]).await.unwrap().get(0);
    assert!(before.ends_with("-replica"));
    unit.execute(&format!("CREATE TABLE {schema}.t (a int4)"), &[])
        .await
        .unwrap();
    let after: String = unit.query_one(whoami, &[]).await.unwrap().get(0);
    assert_eq!(
        after, primary_name,
        "after its write the unit reads the primary"
    );
    let mut transacted = pool.unit_of_work();
    let insert = format!("INSERT INTO {schema}.t VALUES (1)");
    transacted
        .transaction(&pupkit::repo::TxOptions::default(), move |tx| {
            let insert = insert.clone();
            Box::pin(async move { tx.execute(&insert, &[]).await })
        })
        .await
        .unwrap();
    let after_tx: String = transacted.query_one(whoami, &[]).await.unwrap().get(0);
    assert_eq!(after_tx, primary_name, "a transaction counts as a write");
    assert!(pool.status().replica_size.is_some_and(|n| n >= 1));
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn status_reports_saturation_once_callers_wait_past_the_threshold() {
    let Some((pool, schema)) = pool("saturated", |c| {
        c.max_size = 1;
        c.saturation_threshold = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    assert!(!pool.status().saturated);
    let holder = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("SELECT pg_sleep(1)", &[]).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute("SELECT 1", &[]).await })
    };
    let mut saturated = false;
    for _ in 0..200 {
        let status = pool.status();
        if status.saturated {
            assert!(status.waiters >= 1);
            saturated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saturated, "never reported saturated: {:?}", pool.status());
    holder.await.unwrap().unwrap();
    waiter.await.unwrap().unwrap();
    assert!(
        !pool.status().saturated,
        "no longer saturated once nobody waits"
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn a_caller_that_gives_up_waiting_for_a_connection_is_not_counted_as_waiting() {
    let Some((pool, schema)) = pool("waiters", |c| c.max_size = 1).await else {
        return;
    };
    let held = pool.connection().await.unwrap();
    // A request deadline, shorter than the pool's checkout timeout, drops the checkout.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), pool.connection()).await;
    assert!(gave_up.is_err(), "the only connection is held");
    assert_eq!(pool.status().waiters, 0, "{:?}", pool.status());
    drop(held);
    drop_schema(&pool, &schema).await;
}
