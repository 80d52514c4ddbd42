//! The Postgres ledger against the real database, each test in its own schema: appends are
//! idempotent, summaries, buckets and entries agree with the in-memory ledger, values travel
//! only as parameters, and a killed connection loses no event and counts none twice.
#![cfg(feature = "postgres")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use jiff::Timestamp;
use pupkit::Error;
use pupkit::cost::{
    BucketWidth, CostConfig, CostMeter, Dimension, Ledger, LedgerEntry, LedgerQuery, Meter,
    MicroUsd, PgLedger, Usage, UsageSource,
};
use pupkit::repo::{PgConfig, PgPool};
use support::postgres::{drop_schema, pool};

/// A small deterministic generator (splitmix64), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// The first instant of the random events: a day before Berlin leaves summer time.
const BASE: &str = "2024-10-26T00:00:00Z";

/// `count` random usage events over three days from [`BASE`]: several services, users and
/// models (one without a price), every source, some known costs, some zero-cost, and some
/// events sharing an instant.
fn random_usages(seed: u64, count: usize) -> Vec<Usage> {
    let mut rng = Rng(seed);
    let base = ts(BASE).as_microsecond();
    let mut at = base;
    (0..count)
        .map(|i| {
            if i % 40 != 7 {
                at = base + rng.below(3 * 86_400 * 1_000_000) as i64;
            }
            let service = rng.pick(&["chat", "search", "Batch-Jobs", "ünïcode svc"]);
            let user = rng.pick(&["u1", "u2", "u3", "U3", "u10", "user-ä", "x'); --"]);
            let model = rng.pick(&[
                "gpt-4o-mini",
                "gpt-4o",
                "text-embedding-3-small",
                "no-such-model",
            ]);
            let source = match rng.below(6) {
                0 => UsageSource::Batch,
                1 => UsageSource::Cache,
                2 => UsageSource::Dedup,
                _ => UsageSource::Api,
            };
            let input = if rng.below(10) == 0 {
                0
            } else {
                rng.below(50_000)
            };
            let mut usage = Usage::new(format!("req-{i:04}"), service, user, model)
                .operation(rng.pick(&["completion", "embedding", "request"]))
                .tokens(input, rng.below(5_000))
                .cached_input_tokens(input / 4)
                .units(rng.below(3))
                .source(source)
                .at(Timestamp::from_microsecond(at).unwrap());
            if rng.below(8) == 0 {
                usage = usage.cost(MicroUsd::from_micros(rng.below(2_000_000) as i64));
            }
            usage
        })
        .collect()
}

/// Events here are dated anywhere from year 1 to 9999.
fn any_date() -> CostConfig {
    let mut config = CostConfig::default();
    config.max_future_skew = Duration::from_secs(10_000 * 366 * 86_400);
    config
}

async fn memory_meter() -> Meter {
    Meter::builder().config(any_date()).build().await.unwrap()
}

async fn pg_meter(ledger: PgLedger) -> Meter {
    Meter::builder()
        .config(any_date())
        .ledger(Arc::new(ledger))
        .build()
        .await
        .unwrap()
}

/// Every entry of a ledger, in its stream's order.
async fn all_entries(ledger: &dyn Ledger, query: &LedgerQuery) -> Vec<LedgerEntry> {
    ledger.entries(query).try_collect().await.unwrap()
}

/// Ledger entries made through the public API: priced by a memory meter.
async fn entries_of(usages: Vec<Usage>) -> Vec<LedgerEntry> {
    let meter = memory_meter().await;
    for usage in usages {
        meter.record(usage).await.unwrap();
    }
    all_entries(
        meter.ledger().as_ref(),
        &LedgerQuery::between(Timestamp::MIN, Timestamp::MAX),
    )
    .await
}

fn everything() -> LedgerQuery {
    LedgerQuery::between(Timestamp::MIN, Timestamp::MAX)
}

async fn ledger_in(pool: &PgPool, schema: &str) -> PgLedger {
    PgLedger::connect(pool.clone(), schema).await.unwrap()
}

async fn count_rows(pool: &PgPool, schema: &str) -> (i64, i64) {
    let row = pool
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT request_id) FROM {schema}.pupkit_cost_ledger"
            ),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn appends_are_idempotent_by_request_id() {
    let Some((pool, schema)) = pool("append", |_| {}).await else {
        return;
    };
    let ledger = ledger_in(&pool, &schema).await;
    let usage = Usage::new("req-1", "chat", "u1", "gpt-4o-mini")
        .tokens(1_200, 300)
        .at(ts("2026-01-05T10:00:00Z"));
    let entries = entries_of(vec![usage.clone()]).await;
    assert!(ledger.append(&entries[0]).await.unwrap(), "first append");
    assert!(
        !ledger.append(&entries[0]).await.unwrap(),
        "same request id again"
    );
    assert_eq!(count_rows(&pool, &schema).await, (1, 1));

    // Through a meter: the second record is a duplicate, counted once.
    let meter = pg_meter(ledger.clone()).await;
    let again = meter.record(usage).await.unwrap();
    assert!(again.duplicate, "{again:?}");
    let other = Usage::new("req-2", "chat", "u1", "gpt-4o-mini")
        .tokens(10, 10)
        .at(ts("2026-01-05T10:00:01Z"));
    assert!(!meter.record(other.clone()).await.unwrap().duplicate);
    assert!(meter.record(other).await.unwrap().duplicate);
    assert_eq!(count_rows(&pool, &schema).await, (2, 2));
    let summary = ledger.summarize(&everything()).await.unwrap();
    assert_eq!(summary.totals.requests, 2);
    assert_eq!(meter.stats().duplicates, 2);
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn summaries_buckets_and_entries_match_the_memory_ledger() {
    let Some((pool, schema)) = pool("summaries", |_| {}).await else {
        return;
    };
    let pg = pg_meter(ledger_in(&pool, &schema).await).await;
    let memory = memory_meter().await;
    let seed = 0x5eed_2026;
    let usages = random_usages(seed, 500);
    for usage in usages {
        let a = pg.record(usage.clone()).await.unwrap();
        let b = memory.record(usage).await.unwrap();
        assert_eq!(a, b);
    }
    let (pg, memory) = (pg.ledger().as_ref(), memory.ledger().as_ref());
    let base = ts(BASE);
    let hours = |h: i64| {
        base.checked_add(jiff::SignedDuration::from_hours(h))
            .unwrap()
    };
    let queries = [
        everything(),
        LedgerQuery::between(hours(-24), hours(96)),
        LedgerQuery::between(hours(10), hours(30)),
        LedgerQuery::between(hours(10), hours(10)),
        LedgerQuery::between(hours(200), hours(300)),
        everything().service("chat"),
        everything().service("ünïcode svc"),
        everything().user("U3"),
        everything().user("x'); --"),
        everything().model("gpt-4o"),
        everything().model("no-such-model"),
        LedgerQuery::between(hours(5), hours(50))
            .service("search")
            .user("u2"),
        LedgerQuery::between(hours(5), hours(50))
            .service("search")
            .user("u2")
            .model("gpt-4o-mini"),
        everything().user("nobody"),
    ];
    let mut compared_groups = 0;
    for query in &queries {
        let expected = memory.summarize(query).await.unwrap();
        let got = pg.summarize(query).await.unwrap();
        assert_eq!(got, expected, "summary of {query:?} (seed {seed:#x})");
        compared_groups += got.by_user.len();
        for by in [Dimension::Service, Dimension::User] {
            for width in [BucketWidth::Hour, BucketWidth::Day] {
                for tz in ["Europe/Berlin", "UTC", "Asia/Kolkata"] {
                    let expected = memory.buckets(query, by, width, tz).await.unwrap();
                    let got = pg.buckets(query, by, width, tz).await.unwrap();
                    assert_eq!(got, expected, "{by:?} {width:?} {tz} buckets of {query:?}");
                }
            }
        }
        let mut expected = all_entries(memory, query).await;
        expected.sort_by(|a, b| (a.at, &a.request_id).cmp(&(b.at, &b.request_id)));
        assert_eq!(
            all_entries(pg, query).await,
            expected,
            "entries of {query:?}"
        );
    }
    let whole = pg.summarize(&everything()).await.unwrap();
    assert_eq!(whole.totals.requests, 500);
    assert!(whole.totals.unpriced_requests > 0 && whole.totals.saved.micros() > 0);
    assert!(compared_groups > 20, "the queries selected something");
    // The day buckets of Berlin's 25-hour day start at local midnight.
    let days = pg
        .buckets(
            &everything(),
            Dimension::Service,
            BucketWidth::Day,
            "Europe/Berlin",
        )
        .await
        .unwrap();
    let starts: std::collections::BTreeSet<Timestamp> = days.iter().map(|b| b.bucket).collect();
    assert!(starts.contains(&ts("2024-10-26T22:00:00Z")), "{starts:?}");
    assert!(starts.contains(&ts("2024-10-27T23:00:00Z")), "{starts:?}");
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn day_buckets_start_where_the_memory_ledger_starts_them_across_dst_at_midnight() {
    let Some((pool, schema)) = pool("dstbuckets", |_| {}).await else {
        return;
    };
    let pg = pg_meter(ledger_in(&pool, &schema).await).await;
    let memory = memory_meter().await;
    // Events every 37 minutes around days that begin in a gap (Havana 2024-03-10), in a
    // repeated hour (Havana 2024-11-03), or are 23 and 25 hours long elsewhere.
    let mut n = 0;
    for day in ["2024-03-10", "2024-11-03", "2024-10-27", "2024-04-07"] {
        let start = ts(&format!("{day}T00:00:00Z")).as_second() - 86_400;
        for step in 0..(3 * 86_400 / (37 * 60)) {
            let at = Timestamp::from_second(start + step * 37 * 60).unwrap();
            let usage = Usage::new(format!("d{n}"), "svc", format!("u{}", n % 3), "gpt-4o")
                .tokens(1_000, 100)
                .at(at);
            n += 1;
            pg.record(usage.clone()).await.unwrap();
            memory.record(usage).await.unwrap();
        }
    }
    for tz in [
        "America/Havana",
        "America/Santiago",
        "Australia/Lord_Howe",
        "Europe/Berlin",
        "Asia/Kolkata",
    ] {
        for by in [Dimension::Service, Dimension::User] {
            for width in [BucketWidth::Hour, BucketWidth::Day] {
                let expected = memory
                    .ledger()
                    .buckets(&everything(), by, width, tz)
                    .await
                    .unwrap();
                let got = pg
                    .ledger()
                    .buckets(&everything(), by, width, tz)
                    .await
                    .unwrap();
                assert_eq!(got, expected, "{by:?} {width:?} buckets in {tz}");
            }
        }
    }
    // Havana's 2024-11-03 begins at the first of its two midnights.
    let days = pg
        .ledger()
        .buckets(
            &everything(),
            Dimension::Service,
            BucketWidth::Day,
            "America/Havana",
        )
        .await
        .unwrap();
    assert!(
        days.iter().any(|b| b.bucket == ts("2024-11-03T04:00:00Z")),
        "{days:#?}"
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn unknown_time_zones_are_refused() {
    let Some((pool, schema)) = pool("tz", |_| {}).await else {
        return;
    };
    let ledger = ledger_in(&pool, &schema).await;
    for tz in ["Mars/Olympus_Mons", "'; DROP TABLE x; --", ""] {
        let error = ledger
            .buckets(&everything(), Dimension::User, BucketWidth::Day, tz)
            .await
            .unwrap_err();
        assert!(error.is_invalid_input(), "{tz:?}: {error}");
    }
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn entries_stream_in_time_order_across_pages() {
    let Some((pool, schema)) = pool("pages", |_| {}).await else {
        return;
    };
    let ledger = ledger_in(&pool, &schema).await;
    // 12,001 rows, three to an instant, so page boundaries (every 5,000) split ties; ids that
    // sort differently by bytes than by a natural-language collation.
    let rows = 12_001;
    pool.execute(
        &format!(
            "INSERT INTO {schema}.pupkit_cost_ledger \
             SELECT (ARRAY['a', 'B', '_'])[i % 3 + 1] || '-' || i, \
                    timestamptz '2026-01-01 00:00:00+00' + (i / 3) * interval '1 second', \
                    'svc', 'u' || (i % 7), 'gpt-4o-mini', 'request', 'api', i, 1, 0, i, 0, true \
             FROM generate_series(1, $1::int4) AS i"
        ),
        &[&rows],
    )
    .await
    .unwrap();
    let check_order = |entries: &[LedgerEntry]| {
        for pair in entries.windows(2) {
            assert!(
                (pair[0].at, &pair[0].request_id) < (pair[1].at, &pair[1].request_id),
                "{:?} then {:?}",
                (pair[0].at, &pair[0].request_id),
                (pair[1].at, &pair[1].request_id)
            );
        }
    };
    let entries = all_entries(&ledger, &everything()).await;
    assert_eq!(entries.len(), rows as usize);
    check_order(&entries);
    assert_eq!(entries[0].request_id, "B-1");
    assert_eq!(entries[0].at, ts("2026-01-01T00:00:00Z"));
    assert_eq!(entries[0].input_tokens, 1);

    // A time range that spans a page boundary, and a user filter.
    let from = ts("2026-01-01T00:10:00Z");
    let to = ts("2026-01-01T00:50:00Z");
    let ranged = all_entries(&ledger, &LedgerQuery::between(from, to)).await;
    check_order(&ranged);
    assert_eq!(ranged.len(), 3 * 40 * 60);
    assert!(ranged.iter().all(|e| from <= e.at && e.at < to));
    let user = all_entries(&ledger, &everything().user("u3")).await;
    check_order(&user);
    assert_eq!(user.len(), (1..=rows).filter(|i| i % 7 == 3).count());

    // Dropping the stream after the first entry stops it.
    let mut stream = ledger.entries(&everything());
    assert!(stream.try_next().await.unwrap().is_some());
    drop(stream);
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn hostile_ids_are_stored_and_read_back_verbatim() {
    let Some((pool, schema)) = pool("hostile", |_| {}).await else {
        return;
    };
    let ledger = ledger_in(&pool, &schema).await;
    let meter = pg_meter(ledger.clone()).await;
    let user = "x'); DROP TABLE pupkit_cost_ledger; --";
    let service = "\"; DELETE FROM pupkit_cost_ledger; --";
    let model = "Robert'); DROP SCHEMA public CASCADE; --";
    let request = "r'1\\'; --";
    let at = ts("2026-02-03T04:05:06.789012Z");
    let usage = Usage::new(request, service, user, model)
        .operation("$1; SELECT 'x'")
        .tokens(5, 5)
        .cost(MicroUsd::from_micros(42))
        .at(at);
    meter.record(usage).await.unwrap();
    let entries = all_entries(&ledger, &everything().user(user)).await;
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(
        (
            entry.request_id.as_str(),
            entry.service.as_str(),
            entry.user.as_str(),
            entry.model.as_str(),
            entry.operation.as_str()
        ),
        (request, service, user, model, "$1; SELECT 'x'")
    );
    assert_eq!(entry.at, at);
    let summary = ledger
        .summarize(&everything().service(service).user(user).model(model))
        .await
        .unwrap();
    assert_eq!(summary.totals.requests, 1);
    assert_eq!(summary.by_user[0].key, user);
    let buckets = ledger
        .buckets(
            &everything().user(user),
            Dimension::User,
            BucketWidth::Day,
            "UTC",
        )
        .await
        .unwrap();
    assert_eq!(buckets[0].key, user);
    assert_eq!(
        count_rows(&pool, &schema).await,
        (1, 1),
        "the table is intact"
    );
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn bad_schema_names_are_refused() {
    // No connection is made: the name is checked first.
    let mut config = PgConfig::new(support::database_url());
    config.min_idle = 0;
    let pool = PgPool::lazy(&config).unwrap();
    for bad in [
        "",
        "1ledger",
        "cost-ledger",
        "cost.ledger",
        "public\"; DROP TABLE x; --",
        "schéma",
        &"s".repeat(64),
    ] {
        let error = PgLedger::new(pool.clone(), bad).unwrap_err();
        assert!(error.is_invalid_input(), "{bad:?}: {error}");
        assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
    }
    for good in ["public", "_ledger", "Cost_2026", &"s".repeat(63)] {
        PgLedger::new(pool.clone(), good).unwrap();
    }
    // Debug names the table, never the password.
    let mut secret = PgConfig::new("postgres://postgres:hunter2@127.0.0.1:5432/test");
    secret.min_idle = 0;
    let ledger = PgLedger::new(PgPool::lazy(&secret).unwrap(), "public").unwrap();
    let debug = format!("{ledger:?}");
    assert!(
        debug.contains("pupkit_cost_ledger") && !debug.contains("hunter2"),
        "{debug}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_safe_to_run_at_once() {
    let Some((pool, schema)) = pool("migrate", |c| c.max_size = 8).await else {
        return;
    };
    // A schema that does not exist yet: migrate creates it.
    let inner = format!("{schema}_new");
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let (pool, inner) = (pool.clone(), inner.clone());
            tokio::spawn(async move { PgLedger::connect(pool, &inner).await.map(|_| ()) })
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
    PgLedger::connect(pool.clone(), &inner).await.unwrap();
    let indexes: Vec<String> = pool
        .query(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'pupkit_cost_ledger' ORDER BY indexname",
            &[&inner],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(indexes.len(), 4, "{indexes:#?}");
    for columns in ["(at)", "(user_id, at)", "(service, at)", "(request_id)"] {
        assert!(
            indexes.iter().any(|i| i.ends_with(columns)),
            "{columns} in {indexes:#?}"
        );
    }
    drop_schema(&pool, &inner).await;
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn timestamps_round_trip_to_the_microsecond() {
    let Some((pool, schema)) = pool("timestamps", |_| {}).await else {
        return;
    };
    let ledger = ledger_in(&pool, &schema).await;
    let meter = pg_meter(ledger.clone()).await;
    let instants = [
        "0001-01-01T00:00:00Z",
        "1969-12-31T23:59:59.999999Z",
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00.000001Z",
        "2024-03-31T01:00:00.123456Z",
        "9999-12-30T21:59:59.999999Z", // jiff ends at 9999-12-30T22:00Z
    ];
    for (i, instant) in instants.iter().enumerate() {
        let usage = Usage::new(format!("t{i}"), "svc", "u", "gpt-4o-mini").at(ts(instant));
        meter.record(usage).await.unwrap();
    }
    // Nanoseconds are dropped toward the past, before and after 1970.
    for (id, instant) in [
        ("n1", "2026-01-01T00:00:00.000001999Z"),
        ("n2", "1969-12-31T23:59:59.999998001Z"),
    ] {
        let usage = Usage::new(id, "svc", "u", "gpt-4o-mini").at(ts(instant));
        meter.record(usage).await.unwrap();
    }
    let entries = all_entries(&ledger, &everything()).await;
    let read: Vec<(String, Timestamp)> =
        entries.into_iter().map(|e| (e.request_id, e.at)).collect();
    let mut expected: Vec<(String, Timestamp)> = instants
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("t{i}"), ts(t)))
        .chain([
            ("n1".to_owned(), ts("2026-01-01T00:00:00.000001Z")),
            ("n2".to_owned(), ts("1969-12-31T23:59:59.999998Z")),
        ])
        .collect();
    expected.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    assert_eq!(read, expected);
    // `from` is inclusive and `to` exclusive, to the microsecond.
    let at = ts("2024-03-31T01:00:00.123456Z");
    let next = ts("2024-03-31T01:00:00.123457Z");
    let count = |from, to| {
        let ledger = ledger.clone();
        async move {
            ledger
                .summarize(&LedgerQuery::between(from, to))
                .await
                .unwrap()
                .totals
                .requests
        }
    };
    assert_eq!(count(at, next).await, 1);
    assert_eq!(count(next, ts("2025-01-01T00:00:00Z")).await, 0);
    assert_eq!(count(ts("2024-01-01T00:00:00Z"), at).await, 0);
    assert_eq!(count(Timestamp::MIN, Timestamp::MAX).await, 8);
    // Before the earliest instant Postgres stores: refused by the database, not a panic.
    let ancient =
        Usage::new("ancient", "svc", "u", "gpt-4o-mini").at(ts("-009000-01-01T00:00:00Z"));
    let error = meter.record(ancient).await.unwrap_err();
    assert!(error.is_backend(), "{error}");
    drop_schema(&pool, &schema).await;
}

#[tokio::test]
async fn garbled_rows_are_errors_not_panics() {
    let Some((pool, schema)) = pool("garbled", |_| {}).await else {
        return;
    };
    let ledger = ledger_in(&pool, &schema).await;
    let table = format!("{schema}.pupkit_cost_ledger");
    pool.execute(
        &format!("ALTER TABLE {table} DROP CONSTRAINT pupkit_cost_ledger_input_tokens_check"),
        &[],
    )
    .await
    .unwrap();
    let insert = format!(
        "INSERT INTO {table} VALUES ($1, $2::text::timestamptz, 's', 'u', 'm', 'op', $3, $4, 0, 0, 0, 0, true)"
    );
    let rows: [(&str, &str, &str, i64); 3] = [
        ("pigeon", "2026-01-01 00:00:00+00", "carrier-pigeon", 1),
        ("negative", "2026-02-01 00:00:00+00", "api", -5),
        ("forever", "infinity", "api", 1),
    ];
    // No query reaches an infinite instant (a query ends by year 9999).
    for (id, at, source, tokens) in rows {
        pool.execute(&insert, &[&id, &at, &source, &tokens])
            .await
            .unwrap();
    }
    let january = LedgerQuery::between(ts("2026-01-01T00:00:00Z"), ts("2026-01-02T00:00:00Z"));
    let error = ledger
        .entries(&january)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("carrier-pigeon"), "{error}");
    assert!(error.to_string().contains("pigeon"), "{error}");
    assert_eq!(ledger.summarize(&january).await.unwrap().totals.requests, 1);

    let february = LedgerQuery::between(ts("2026-02-01T00:00:00Z"), ts("2026-02-02T00:00:00Z"));
    let error = ledger
        .entries(&february)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("-5"), "{error}");
    let error = ledger.summarize(&february).await.unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }), "{error}");
    let late = LedgerQuery::between(ts("2027-01-01T00:00:00Z"), Timestamp::MAX);
    assert!(all_entries(&ledger, &late).await.is_empty());
    assert_eq!(ledger.summarize(&late).await.unwrap().totals.requests, 0);
    drop_schema(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_lose_no_event_and_count_none_twice() {
    let mut application_name = String::new();
    let Some((pool, schema)) = pool("killed", |c| {
        c.max_size = 1;
        c.checkout_timeout = Duration::from_secs(2);
        application_name = c.application_name.clone();
    })
    .await
    else {
        return;
    };
    let meter = Arc::new(pg_meter(ledger_in(&pool, &schema).await).await);
    let usages = random_usages(0xdead_beef, 300);

    // Terminate the pool's backend every few milliseconds while the events are recorded.
    let (killer, connection) =
        tokio_postgres::connect(&support::database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut killed = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                killed += killer
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                        &[&application_name],
                    )
                    .await
                    .unwrap()
                    .len();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            killed
        })
    };
    let mut failed = Vec::new();
    // Ids are unique, so a duplicate means an earlier attempt was written although it failed
    // (the connection died after the commit, before the answer): the ledger is right, the
    // meter's real-time counters missed that event.
    let mut written_but_failed = 0;
    for usage in &usages {
        match meter.record(usage.clone()).await {
            Ok(recorded) => written_but_failed += usize::from(recorded.duplicate),
            Err(error) => {
                assert!(error.is_backend(), "{error}");
                failed.push(usage.clone());
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed = killing.await.unwrap();
    assert!(killed > 0, "no backend was killed");
    let retried = failed.len();

    // Retry what failed (some of it may have been written before its connection died).
    for usage in failed {
        let mut attempts = 0;
        loop {
            match meter.record(usage.clone()).await {
                Ok(recorded) => {
                    written_but_failed += usize::from(recorded.duplicate);
                    break;
                }
                Err(error) => {
                    attempts += 1;
                    assert!(attempts < 20, "{} still fails: {error}", usage.request_id);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    eprintln!(
        "{killed} backends killed; {retried} of {} records failed and were retried; \
         {written_but_failed} had been written by an attempt that failed",
        usages.len()
    );
    assert_eq!(count_rows(&pool, &schema).await, (300, 300));

    // The ledger holds exactly what a ledger that never failed holds.
    let memory = memory_meter().await;
    for usage in usages {
        memory.record(usage).await.unwrap();
    }
    let expected = memory.ledger().summarize(&everything()).await.unwrap();
    assert_eq!(
        meter.ledger().summarize(&everything()).await.unwrap(),
        expected
    );
    drop_schema(&pool, &schema).await;
}
