//! The cost meter: pricing, idempotency, budgets, reservations, alerts, anomalies, reports and
//! CSV in memory; then the same enforcement across processes on the real Redis.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use jiff::Timestamp;
use pupkit::cost::{
    AlertKind, Budget, CSV_COLUMNS, CostConfig, CostMeter, LedgerQuery, MemorySink, Meter,
    MicroUsd, Mode, Period, ReportPeriod, Scope, Spender, Usage, UsageSource,
};

/// A clock the test moves by hand.
#[derive(Clone)]
struct TestClock(Arc<AtomicI64>);

impl TestClock {
    fn at(text: &str) -> Self {
        let at: Timestamp = text.parse().unwrap();
        TestClock(Arc::new(AtomicI64::new(at.as_second())))
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_second(self.0.load(Ordering::SeqCst)).unwrap()
    }

    fn set(&self, text: &str) {
        let at: Timestamp = text.parse().unwrap();
        self.0.store(at.as_second(), Ordering::SeqCst);
    }

    fn advance(&self, seconds: i64) {
        self.0.fetch_add(seconds, Ordering::SeqCst);
    }
}

async fn meter_at(clock: &TestClock, sink: &Arc<MemorySink>) -> Meter {
    let clock = clock.clone();
    Meter::builder()
        .clock(move || clock.now())
        .sink(sink.clone())
        .build()
        .await
        .unwrap()
}

/// Usage that costs exactly `cents` (gpt-4.1-nano input is $0.10 per million tokens).
fn costing(id: &str, user: &str, cents: u64) -> Usage {
    Usage::new(id, "chat", user, "gpt-4.1-nano").tokens(cents * 100_000, 0)
}

/// Waits until the sink holds at least `count` alerts (they are delivered in the background).
async fn alerts_of(sink: &MemorySink, kind: AlertKind, count: usize) -> Vec<pupkit::cost::Alert> {
    for _ in 0..200 {
        let alerts: Vec<_> = sink
            .alerts()
            .into_iter()
            .filter(|a| a.kind == kind)
            .collect();
        if alerts.len() >= count {
            // Give a duplicate (which must not come) a moment to show up.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return sink
                .alerts()
                .into_iter()
                .filter(|a| a.kind == kind)
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sink.alerts()
        .into_iter()
        .filter(|a| a.kind == kind)
        .collect()
}

#[tokio::test]
async fn recording_prices_in_micro_dollars_and_counts_a_request_id_once() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-10T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    let usage = Usage::new("req-1", "search", "u1", "text-embedding-3-large").tokens(1_000, 0);
    let first = meter.record(usage.clone()).await.unwrap();
    assert_eq!(first.cost.micros(), 130); // 1,000 x $0.13 / 1M
    assert!(first.priced && !first.duplicate && first.counted);
    let again = meter.record(usage).await.unwrap();
    assert!(again.duplicate);
    let report = meter.report(ReportPeriod::Day).await.unwrap();
    assert_eq!(report.totals.requests, 1);
    assert_eq!(report.totals.cost.micros(), 130);
    assert_eq!(report.totals.input_tokens, 1_000);
    assert_eq!(meter.stats().duplicates, 1);
}

#[tokio::test]
async fn an_unknown_model_is_unpriced_not_free_and_alerts_once_a_day() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-10T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    for i in 0..3 {
        let usage = Usage::new(format!("r{i}"), "chat", "u1", "brand-new-model").tokens(500, 500);
        let recorded = meter.record(usage).await.unwrap();
        assert!(!recorded.priced);
    }
    let alerts = alerts_of(&sink, AlertKind::UnpricedModel, 1).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].entity, "brand-new-model");
    let report = meter.report(ReportPeriod::Day).await.unwrap();
    assert_eq!(report.totals.unpriced_requests, 3);
    assert_eq!(report.totals.requests, 3);
    // The next day it alerts again.
    clock.advance(86_400);
    meter
        .record(Usage::new("r9", "chat", "u1", "brand-new-model").tokens(1, 1))
        .await
        .unwrap();
    assert_eq!(alerts_of(&sink, AlertKind::UnpricedModel, 2).await.len(), 2);
}

#[tokio::test]
async fn a_hundred_concurrent_reservations_against_a_budget_for_ten_grant_exactly_ten() {
    let meter = Arc::new(Meter::builder().build().await.unwrap());
    meter
        .set_budget(
            Budget::new(
                Scope::User("u1".into()),
                MicroUsd::from_dollars(10),
                Period::Day,
            )
            .mode(Mode::Hard),
        )
        .await
        .unwrap();
    let granted = reserve_concurrently(std::slice::from_ref(&meter), 100).await;
    assert_eq!(granted, 10);
    assert_eq!(meter.stats().reservations_denied, 90);
}

/// Starts `count` reservations of $1 for user u1 at once, spread over the meters; returns how
/// many were granted.
async fn reserve_concurrently(meters: &[Arc<Meter>], count: usize) -> usize {
    let start = Arc::new(tokio::sync::Barrier::new(count));
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let meter = meters[i % meters.len()].clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                meter
                    .reserve(&Spender::new("chat", "u1"), MicroUsd::from_dollars(1))
                    .await
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => granted += 1,
            Err(error) => assert!(error.is_budget_exceeded(), "{error}"),
        }
    }
    granted
}

#[tokio::test]
async fn commit_counts_the_actual_cost_release_frees_and_expired_reservations_stop_holding() {
    let mut config = CostConfig::default();
    config.reservation_ttl = Duration::from_millis(50);
    let meter = Meter::builder().config(config).build().await.unwrap();
    meter
        .set_budget(
            Budget::new(
                Scope::Service("chat".into()),
                MicroUsd::from_dollars(1),
                Period::Month,
            )
            .mode(Mode::Hard),
        )
        .await
        .unwrap();
    let spender = Spender::new("chat", "u1");
    let held = meter
        .reserve(&spender, "0.60".parse().unwrap())
        .await
        .unwrap();
    // $0.60 held: another $0.60 does not fit, and the error says why.
    let error = meter
        .reserve(&spender, "0.60".parse().unwrap())
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("service \"chat\""), "{message}");
    assert!(
        message.contains("reserved $0.600000 of $1.000000 this month"),
        "{message}"
    );
    assert!(message.contains("resets"), "{message}");
    // Commit $0.30 actual: $0.70 left.
    meter.commit(&held, costing("c1", "u1", 30)).await.unwrap();
    let status = meter.budget_status(None).await.unwrap();
    assert_eq!(status[0].spent.micros(), 300_000);
    assert_eq!(status[0].reserved, MicroUsd::ZERO);
    let held = meter
        .reserve(&spender, "0.60".parse().unwrap())
        .await
        .unwrap();
    meter.release(&held).await.unwrap();
    let held = meter
        .reserve(&spender, "0.70".parse().unwrap())
        .await
        .unwrap();
    // Never committed: it stops holding budget once it expires.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let again = meter.reserve(&spender, "0.70".parse().unwrap()).await;
    assert!(again.is_ok(), "an expired reservation still held budget");
    // A late commit still records the spend.
    let late = meter.commit(&held, costing("c2", "u1", 10)).await.unwrap();
    assert!(late.counted);
    assert_eq!(meter.stats().commits_after_expiry, 1);
}

#[tokio::test]
async fn thresholds_alert_once_each_per_period_and_periods_come_from_the_ledger() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-10T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    meter
        .set_budget(Budget::new(
            Scope::User("u1".into()),
            MicroUsd::from_dollars(1),
            Period::Day,
        ))
        .await
        .unwrap();
    // 30c, 60c (past 50%), 90c (past 80%), then $1.20 and $1.50 (past 100%, twice).
    for i in 0..5 {
        meter
            .record(costing(&format!("t{i}"), "u1", 30))
            .await
            .unwrap();
    }
    let alerts = alerts_of(&sink, AlertKind::ThresholdCrossed, 3).await;
    let mut thresholds: Vec<u32> = alerts.iter().filter_map(|a| a.threshold).collect();
    thresholds.sort();
    assert_eq!(thresholds, vec![50, 80, 100]);
    let status = &meter.budget_status(None).await.unwrap()[0];
    assert_eq!(status.spent.micros(), 1_500_000);
    assert_eq!(status.remaining, MicroUsd::ZERO);
    // The next day the window is new: nothing was reset, the new window's ledger is empty.
    clock.set("2026-11-11T00:00:01Z");
    let status = &meter.budget_status(None).await.unwrap()[0];
    assert_eq!(status.spent, MicroUsd::ZERO);
    assert_eq!(
        status.period_start,
        "2026-11-11T00:00:00Z".parse::<Timestamp>().unwrap()
    );
    meter.record(costing("t9", "u1", 60)).await.unwrap();
    assert_eq!(
        alerts_of(&sink, AlertKind::ThresholdCrossed, 4).await.len(),
        4
    );
}

#[tokio::test]
async fn a_rolling_budget_alerts_once_per_window_and_day_and_week_budgets_alert_apart() {
    let sink = Arc::new(MemorySink::new());
    // A Monday: the day and the week start together.
    let clock = TestClock::at("2026-11-23T06:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    let user = Scope::User("u1".into());
    for period in [
        Period::Day,
        Period::Week,
        Period::Rolling(Duration::from_secs(3600)),
    ] {
        let budget =
            Budget::new(user.clone(), MicroUsd::from_dollars(1), period).thresholds(vec![50]);
        meter.set_budget(budget).await.unwrap();
    }
    // 60c: past 50% of each of the three budgets; then more of the same, a minute apart.
    for i in 0..5 {
        meter
            .record(costing(&format!("r{i}"), "u1", 60))
            .await
            .unwrap();
        clock.advance(60);
    }
    let alerts = alerts_of(&sink, AlertKind::ThresholdCrossed, 3).await;
    let mut periods: Vec<&str> = alerts.iter().map(|a| a.period.as_str()).collect();
    periods.sort();
    assert_eq!(periods, ["day", "rolling3600", "week"], "{alerts:?}");
    // An hour later the rolling window may alert again; the day and the week may not.
    clock.advance(3600);
    meter.record(costing("later", "u1", 60)).await.unwrap();
    assert_eq!(
        alerts_of(&sink, AlertKind::ThresholdCrossed, 4).await.len(),
        4
    );
}

#[tokio::test]
async fn commits_must_match_their_reservation_and_times_must_not_be_in_the_future() {
    let meter = Meter::builder().build().await.unwrap();
    meter
        .set_budget(
            Budget::new(
                Scope::User("u1".into()),
                MicroUsd::from_dollars(1),
                Period::Day,
            )
            .mode(Mode::Hard),
        )
        .await
        .unwrap();
    let held = meter
        .reserve(&Spender::new("chat", "u1"), "0.50".parse().unwrap())
        .await
        .unwrap();
    let error = meter
        .commit(&held, costing("x", "someone-else", 10))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("someone-else"), "{error}");
    let future = Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(1))
        .unwrap();
    let error = meter
        .record(costing("f", "u1", 10).at(future))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("in the future"), "{error}");
    // A backfill is fine: it counts in its own (past) window.
    let backfill: Timestamp = "2026-01-05T00:00:00Z".parse().unwrap();
    meter
        .record(costing("old", "u1", 10).at(backfill))
        .await
        .unwrap();
    // An unpriced call spends its reservation's estimate against the budget.
    let unpriced = Usage::new("u", "chat", "u1", "brand-new-model").tokens(10, 10);
    meter.commit(&held, unpriced).await.unwrap();
    let status = &meter.budget_status(None).await.unwrap()[0];
    assert_eq!(status.spent.micros(), 500_000);
}

#[tokio::test]
async fn a_budget_set_mid_period_counts_the_spend_already_in_the_ledger() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-10T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    meter.record(costing("early", "u7", 40)).await.unwrap();
    let status = meter
        .set_budget(
            Budget::new(
                Scope::User("u7".into()),
                MicroUsd::from_dollars(1),
                Period::Week,
            )
            .time_zone("America/New_York"),
        )
        .await
        .unwrap();
    assert_eq!(status.spent.micros(), 400_000);
}

#[tokio::test]
async fn projections_use_fractional_elapsed_time_and_give_the_exhaustion_time() {
    let sink = Arc::new(MemorySink::new());
    // A quarter of the way through November (30 days): 7.5 days in.
    let clock = TestClock::at("2026-11-08T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    meter
        .set_budget(Budget::new(
            Scope::Global,
            MicroUsd::from_dollars(3),
            Period::Month,
        ))
        .await
        .unwrap();
    meter
        .record(costing("p1", "u1", 100).at("2026-11-02T00:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    let status = &meter.budget_status(Some(&Scope::Global)).await.unwrap()[0];
    assert_eq!(status.spent.micros(), 1_000_000);
    assert_eq!(status.projected.micros(), 4_000_000); // $1 in a quarter → $4
    // $2 left at $1 per 7.5 days: exhausted 15 days from now.
    assert_eq!(
        status.exhausts_at,
        Some("2026-11-23T12:00:00Z".parse().unwrap())
    );
    let alerts = alerts_of(&sink, AlertKind::ProjectedToExceed, 1).await;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].projected, Some(MicroUsd::from_dollars(4)));
    let report = meter.report(ReportPeriod::Month).await.unwrap();
    let projection = report.projection.unwrap();
    assert!((projection.elapsed_fraction - 0.25).abs() < 1e-9);
    assert_eq!(projection.projected.micros(), 4_000_000);
}

#[tokio::test]
async fn anomalies_over_twice_the_trailing_average_are_ranked_and_alerted_once() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-10T00:30:00Z");
    let meter = meter_at(&clock, &sink).await;
    // 24 hours of $0.50 an hour for u1 and $0.20 for u2, then a spike for both.
    for hour in 0..24 {
        for (user, cents) in [("u1", 50), ("u2", 20)] {
            let id = format!("{user}-{hour}");
            meter.record(costing(&id, user, cents)).await.unwrap();
        }
        clock.advance(3600);
    }
    meter.record(costing("spike1", "u1", 300)).await.unwrap();
    meter.record(costing("spike2", "u2", 100)).await.unwrap();
    let anomalies = meter.check_anomalies().await.unwrap();
    let hourly_users: Vec<_> = anomalies
        .iter()
        .filter(|a| a.dimension == pupkit::cost::Dimension::User)
        .filter(|a| a.width == pupkit::cost::BucketWidth::Hour)
        .collect();
    assert_eq!(hourly_users.len(), 2, "{anomalies:?}");
    assert_eq!(hourly_users[0].key, "u1"); // $2.50 over beats $0.80 over
    assert_eq!(hourly_users[0].expected.micros(), 500_000);
    assert_eq!(hourly_users[0].excess.micros(), 2_500_000);
    meter.check_anomalies().await.unwrap();
    let raised = meter.stats().alerts_raised;
    assert_eq!(meter.anomalies().await.unwrap(), anomalies);
    meter.report(ReportPeriod::Day).await.unwrap();
    assert_eq!(
        meter.stats().alerts_raised,
        raised,
        "reading raises no alert"
    );
    let alerts = alerts_of(&sink, AlertKind::Anomaly, anomalies.len()).await;
    assert_eq!(
        alerts.len(),
        anomalies.len(),
        "one alert per anomaly, not per check"
    );
}

#[tokio::test]
async fn reports_break_down_by_service_user_and_model_with_savings() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-26T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    meter.record(costing("a", "alice", 100)).await.unwrap();
    meter.record(costing("b", "bob", 50)).await.unwrap();
    let embedding = Usage::new("c", "search", "bob", "text-embedding-3-small")
        .tokens(1_000_000, 0)
        .operation("embedding");
    meter.record(embedding.clone()).await.unwrap();
    let mut cached = embedding.source(UsageSource::Cache);
    cached.request_id = "d".into();
    meter.record(cached).await.unwrap();
    // Last week: outside the day report, inside the month.
    meter
        .record(costing("old", "carol", 500).at("2026-11-19T12:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    let day = meter.report(ReportPeriod::Day).await.unwrap();
    assert_eq!(day.totals.requests, 4);
    assert_eq!(day.totals.cost.micros(), 1_000_000 + 500_000 + 20_000);
    assert_eq!(day.savings.micros(), 20_000);
    assert_eq!(day.by_user[0].key, "alice");
    assert_eq!(day.by_service.len(), 2);
    assert_eq!(day.by_model.len(), 2);
    assert_eq!(day.top_spenders.len(), 2);
    let week = meter.report(ReportPeriod::Week).await.unwrap();
    assert_eq!(
        week.totals.requests, 4,
        "the week starts on Monday the 23rd"
    );
    let month = meter.report(ReportPeriod::Month).await.unwrap();
    assert_eq!(month.totals.requests, 5);
    assert_eq!(month.top_spenders[0].key, "carol");
    let custom = ReportPeriod::custom(
        "2026-11-19T00:00:00Z".parse().unwrap(),
        "2026-11-20T00:00:00Z".parse().unwrap(),
    )
    .unwrap();
    let custom = meter.report(custom).await.unwrap();
    assert_eq!(custom.totals.requests, 1);
    assert!(custom.projection.is_none());
    assert!(ReportPeriod::parse("fortnight", None, None).is_err());
}

#[tokio::test]
async fn csv_export_is_rfc4180_filtered_and_formula_safe() {
    let sink = Arc::new(MemorySink::new());
    let clock = TestClock::at("2026-11-26T12:00:00Z");
    let meter = meter_at(&clock, &sink).await;
    meter
        .record(costing("r1", "=cmd|' /C calc'!A0", 10))
        .await
        .unwrap();
    meter
        .record(costing("r2", "plain, \"quoted\"", 10))
        .await
        .unwrap();
    meter.record(costing("r3", "other", 10)).await.unwrap();
    let query = LedgerQuery::between(
        "2026-11-01T00:00:00Z".parse().unwrap(),
        "2026-12-01T00:00:00Z".parse().unwrap(),
    );
    let csv = collect_csv(&meter, &query).await;
    let lines: Vec<&str> = csv.split("\r\n").collect();
    assert_eq!(lines[0], CSV_COLUMNS.join(","));
    assert_eq!(
        lines.len(),
        5,
        "header, 3 rows, and the empty tail: {csv:?}"
    );
    assert!(
        lines[1].contains(",\"'=cmd|' /C calc'!A0\","),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains(",\"plain, \"\"quoted\"\"\","),
        "{}",
        lines[2]
    );
    assert!(
        lines[1].ends_with(",0.100000,0.000000,true"),
        "{}",
        lines[1]
    );
    let only_other = collect_csv(&meter, &query.clone().user("other")).await;
    assert_eq!(only_other.matches("\r\n").count(), 2);
}

async fn collect_csv(meter: &Meter, query: &LedgerQuery) -> String {
    let mut stream = meter.export_csv(query);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_and_value() {
    let meter = Meter::builder().build().await.unwrap();
    let long_user = "u".repeat(129);
    let cases = [
        (Usage::new("", "chat", "u1", "gpt-4o"), "request id"),
        (
            Usage::new("r", "chat", long_user.as_str(), "gpt-4o"),
            "user",
        ),
        (Usage::new("r", "chat\n", "u1", "gpt-4o"), "service"),
        (
            Usage::new("r", "chat", "u1", "gpt-4o")
                .tokens(5, 0)
                .cached_input_tokens(6),
            "cached input tokens",
        ),
        (
            Usage::new("r", "chat", "u1", "gpt-4o").cost(MicroUsd::from_micros(-1)),
            "cost",
        ),
    ];
    for (usage, field) in cases {
        let error = meter.record(usage).await.unwrap_err();
        assert!(error.is_invalid_input(), "{error}");
        assert!(
            error.to_string().contains(field),
            "{error} should name {field}"
        );
    }
    let error = meter
        .reserve(&Spender::new("chat", "u1"), MicroUsd::from_micros(-5))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("estimate"), "{error}");
    let error = meter
        .set_budget(
            Budget::new(Scope::Global, MicroUsd::from_dollars(1), Period::Day)
                .time_zone("Nowhere/Land"),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("Nowhere/Land"), "{error}");
    let mut bad_config = CostConfig::default();
    bad_config.time_zone = "Not/AZone".into();
    assert!(Meter::builder().config(bad_config).build().await.is_err());
}

/// A ledger whose next appends fail: before writing (the database was down) or after writing
/// (the commit happened, the reply was lost).
#[derive(Debug, Default)]
struct FlakyLedger {
    inner: pupkit::cost::MemoryLedger,
    fail_before: std::sync::atomic::AtomicUsize,
    fail_after: std::sync::atomic::AtomicUsize,
}

fn lost_connection() -> pupkit::Error {
    pupkit::Error::Backend {
        backend: "postgres",
        operation: "append",
        source: "connection reset".into(),
    }
}

fn take_one(counter: &std::sync::atomic::AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl pupkit::cost::Ledger for FlakyLedger {
    async fn append(&self, entry: &pupkit::cost::LedgerEntry) -> pupkit::Result<bool> {
        if take_one(&self.fail_before) {
            return Err(lost_connection());
        }
        let appended = self.inner.append(entry).await?;
        if take_one(&self.fail_after) {
            return Err(lost_connection());
        }
        Ok(appended)
    }

    async fn summarize(&self, query: &LedgerQuery) -> pupkit::Result<pupkit::cost::LedgerSummary> {
        self.inner.summarize(query).await
    }

    async fn buckets(
        &self,
        query: &LedgerQuery,
        by: pupkit::cost::Dimension,
        width: pupkit::cost::BucketWidth,
        tz: &str,
    ) -> pupkit::Result<Vec<pupkit::cost::BucketTotal>> {
        self.inner.buckets(query, by, width, tz).await
    }

    fn entries(
        &self,
        query: &LedgerQuery,
    ) -> futures_util::stream::BoxStream<'static, pupkit::Result<pupkit::cost::LedgerEntry>> {
        self.inner.entries(query)
    }
}

#[tokio::test]
async fn a_failed_or_lost_ledger_write_is_retried_without_losing_or_double_counting() {
    let ledger = Arc::new(FlakyLedger::default());
    let meter = Meter::builder()
        .ledger(ledger.clone())
        .build()
        .await
        .unwrap();
    meter
        .set_budget(
            Budget::new(
                Scope::User("u1".into()),
                MicroUsd::from_dollars(1),
                Period::Day,
            )
            .mode(Mode::Hard),
        )
        .await
        .unwrap();
    let spender = Spender::new("chat", "u1");
    // The database is down at commit: nothing recorded, the reservation still holds.
    let held = meter
        .reserve(&spender, "0.50".parse().unwrap())
        .await
        .unwrap();
    ledger.fail_before.store(1, Ordering::SeqCst);
    assert!(meter.commit(&held, costing("f1", "u1", 40)).await.is_err());
    let status = &meter.budget_status(None).await.unwrap()[0];
    assert_eq!(
        (status.spent.micros(), status.reserved.micros()),
        (0, 500_000)
    );
    // The retry commits once.
    let recorded = meter.commit(&held, costing("f1", "u1", 40)).await.unwrap();
    assert!(recorded.counted && !recorded.duplicate);
    // The write commits but its reply is lost: the retry finds it in the ledger and the
    // counters count it once.
    ledger.fail_after.store(1, Ordering::SeqCst);
    assert!(meter.record(costing("f2", "u1", 20)).await.is_err());
    let retried = meter.record(costing("f2", "u1", 20)).await.unwrap();
    assert!(retried.duplicate);
    meter.record(costing("f2", "u1", 20)).await.unwrap();
    let status = &meter.budget_status(None).await.unwrap()[0];
    assert_eq!(status.spent.micros(), 600_000, "40c + 20c, each once");
    assert_eq!(status.reserved, MicroUsd::ZERO);
    assert_eq!(ledger.inner.len(), 2);
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;
    use pupkit::cost::RedisSpendStore;
    use pupkit::redis::{RedisConfig, RedisConnection};
    use support::redis::{PrivateRedis, connect, delete_prefix};

    async fn redis_meter(
        connection: RedisConnection,
        prefix: &str,
        sink: &Arc<MemorySink>,
    ) -> Meter {
        let store = RedisSpendStore::new(connection, prefix).unwrap();
        // Re-read budgets on every call, so a budget set by one "process" is seen at once.
        let mut config = CostConfig::default();
        config.budget_refresh = Duration::ZERO;
        Meter::builder()
            .config(config)
            .spend_store(Arc::new(store))
            .sink(sink.clone())
            .build()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_hundred_reservations_from_four_processes_grant_exactly_ten() {
        let Some(connection) = connect().await else {
            return;
        };
        let prefix = support::unique_prefix("costreserve");
        let sink = Arc::new(MemorySink::new());
        // Four meters on one Redis: four host processes as far as the store can tell.
        let mut meters = Vec::new();
        for _ in 0..4 {
            meters.push(Arc::new(
                redis_meter(connection.clone(), &prefix, &sink).await,
            ));
        }
        meters[0]
            .set_budget(
                Budget::new(
                    Scope::User("u1".into()),
                    MicroUsd::from_dollars(10),
                    Period::Day,
                )
                .mode(Mode::Hard),
            )
            .await
            .unwrap();
        for meter in &meters[1..] {
            // Each process picks the budget up from Redis.
            assert_eq!(meter.budget_status(None).await.unwrap().len(), 1);
        }
        assert_eq!(reserve_concurrently(&meters, 100).await, 10);
        delete_prefix(&format!("{{{prefix}:cost}}")).await;
    }

    #[tokio::test]
    async fn spend_is_shared_and_each_threshold_alerts_once_across_processes() {
        let Some(connection) = connect().await else {
            return;
        };
        let prefix = support::unique_prefix("costshared");
        let sink = Arc::new(MemorySink::new());
        let first = redis_meter(connection.clone(), &prefix, &sink).await;
        let second = redis_meter(connection.clone(), &prefix, &sink).await;
        first
            .set_budget(Budget::new(
                Scope::Service("chat".into()),
                MicroUsd::from_dollars(1),
                Period::Month,
            ))
            .await
            .unwrap();
        second.budget_status(None).await.unwrap();
        for i in 0..10 {
            let meter = if i % 2 == 0 { &first } else { &second };
            meter
                .record(costing(&format!("s{i}"), "u1", 20))
                .await
                .unwrap();
        }
        let status = &second.budget_status(None).await.unwrap()[0];
        assert_eq!(status.spent.micros(), 2_000_000);
        let alerts = alerts_of(&sink, AlertKind::ThresholdCrossed, 3).await;
        assert_eq!(alerts.len(), 3, "{alerts:?}");
        delete_prefix(&format!("{{{prefix}:cost}}")).await;
    }

    #[tokio::test]
    async fn a_reservation_right_after_a_redis_restart_sees_the_spend_again() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut config = RedisConfig::new(server.url());
        config.op_timeout = Duration::from_millis(500);
        config.breaker.cool_down = Duration::from_millis(100);
        config.breaker.jitter = 0.0;
        let connection = RedisConnection::connect(&config).await.unwrap();
        let sink = Arc::new(MemorySink::new());
        let meter = redis_meter(connection, "reserve-restart", &sink).await;
        meter
            .set_budget(
                Budget::new(
                    Scope::User("u1".into()),
                    MicroUsd::from_dollars(1),
                    Period::Month,
                )
                .mode(Mode::Hard),
            )
            .await
            .unwrap();
        meter.record(costing("spent", "u1", 90)).await.unwrap();
        server.restart();
        let spender = Spender::new("chat", "u1");
        // The first call after the restart is a reservation: it must see the 90c again.
        let outcome = loop {
            match meter.reserve(&spender, "0.20".parse().unwrap()).await {
                Err(error) if error.is_backend() => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                other => break other,
            }
        };
        let error = outcome.unwrap_err();
        assert!(error.is_budget_exceeded(), "{error}");
        assert!(error.to_string().contains("spent $0.900000"), "{error}");
        let last_dime = meter.reserve(&spender, "0.10".parse().unwrap()).await;
        assert!(last_dime.is_ok(), "$0.10 still fits");
    }

    #[tokio::test]
    async fn a_redis_restart_loses_no_recorded_spend() {
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut config = RedisConfig::new(server.url());
        config.op_timeout = Duration::from_millis(500);
        config.breaker.cool_down = Duration::from_millis(100);
        config.breaker.jitter = 0.0;
        let connection = RedisConnection::connect(&config).await.unwrap();
        let sink = Arc::new(MemorySink::new());
        let meter = redis_meter(connection, "restart", &sink).await;
        meter
            .set_budget(Budget::new(
                Scope::User("u1".into()),
                MicroUsd::from_dollars(100),
                Period::Month,
            ))
            .await
            .unwrap();
        for i in 0..5 {
            meter
                .record(costing(&format!("before{i}"), "u1", 10))
                .await
                .unwrap();
        }
        server.kill();
        // While Redis is down, events still reach the ledger.
        for i in 0..5 {
            let recorded = meter
                .record(costing(&format!("down{i}"), "u1", 10))
                .await
                .unwrap();
            assert!(!recorded.counted);
        }
        server.restart();
        let mut counted = false;
        for i in 0..50 {
            let recorded = meter.record(costing(&format!("after{i}"), "u1", 10)).await;
            if recorded.is_ok_and(|r| r.counted) {
                counted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(counted, "Redis did not come back");
        let status = &meter.budget_status(None).await.unwrap()[0];
        let ledger = meter.report(ReportPeriod::Month).await.unwrap().totals;
        // The budget, lost with Redis's memory, was saved again by the meter that knew it.
        assert_eq!(status.budget.amount, MicroUsd::from_dollars(100));
        assert_eq!(
            status.spent, ledger.cost,
            "counters rebuilt from the ledger"
        );
        assert!(ledger.requests >= 11);
    }
}

#[cfg(feature = "webhook")]
mod webhook {
    use super::*;
    use pupkit::cost::{AlertSink, WebhookSink, webhook_signature};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// One request as the receiver saw it.
    struct Received {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Received {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// A bare HTTP/1.1 receiver on a loopback port: answers each request with the next status
    /// in `statuses` (the last one repeats) and hands the requests to the test.
    async fn receiver(
        statuses: Vec<u16>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for i in 0.. {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                let header_end = loop {
                    let n = socket.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "connection closed before the headers ended");
                    buffer.extend_from_slice(&chunk[..n]);
                    if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at;
                    }
                };
                let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
                let headers: Vec<(String, String)> = head
                    .lines()
                    .skip(1)
                    .filter_map(|line| line.split_once(':'))
                    .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                    .collect();
                let length: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                let mut body = buffer[header_end + 4..].to_vec();
                while body.len() < length {
                    let n = socket.read(&mut chunk).await.unwrap();
                    body.extend_from_slice(&chunk[..n]);
                }
                let status = statuses[i.min(statuses.len() - 1)];
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                socket.write_all(reply.as_bytes()).await.unwrap();
                let _ = sender.send(Received { headers, body });
            }
        });
        (url, received)
    }

    #[tokio::test]
    async fn the_webhook_posts_signed_json_and_retries_a_server_error() {
        let (url, mut received) = receiver(vec![503, 200]).await;
        let sink = Arc::new(WebhookSink::new(url, "s3cret").unwrap());
        assert!(
            !format!("{sink:?}").contains("s3cret"),
            "the secret is never in Debug"
        );
        // Early in the day, so no projection alert joins the threshold alert.
        let early: Timestamp = "2026-11-27T00:30:00Z".parse().unwrap();
        let meter = Meter::builder()
            .sink(sink.clone())
            .clock(move || early)
            .build()
            .await
            .unwrap();
        meter
            .set_budget(
                Budget::new(
                    Scope::User("u1".into()),
                    MicroUsd::from_dollars(1),
                    Period::Day,
                )
                .thresholds(vec![50]),
            )
            .await
            .unwrap();
        meter.record(costing("w1", "u1", 60)).await.unwrap();
        let first = received.recv().await.unwrap();
        let second = received.recv().await.unwrap();
        assert_eq!(first.body, second.body, "the retry sends the same alert");
        assert_eq!(second.header("content-type"), Some("application/json"));
        let timestamp: i64 = second
            .header("x-pupkit-timestamp")
            .unwrap()
            .parse()
            .unwrap();
        let signature = second.header("x-pupkit-signature").unwrap();
        assert_eq!(
            signature,
            webhook_signature(b"s3cret", timestamp, &second.body)
        );
        assert_ne!(
            signature,
            webhook_signature(b"wrong", timestamp, &second.body)
        );
        let alert: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
        assert_eq!(alert["kind"], "threshold_crossed");
        assert_eq!(alert["threshold"], 50);
        assert_eq!(alert["spent"], 600_000);
        assert_eq!(alert["budget"], 1_000_000);
        assert_eq!(alert["entity"], "user \"u1\"");
    }

    #[tokio::test]
    async fn a_client_error_is_not_retried_and_is_reported() {
        let (url, mut received) = receiver(vec![400]).await;
        let sink = WebhookSink::new(url, "k").unwrap();
        let alert: pupkit::cost::Alert = serde_json::from_value(serde_json::json!({
            "kind": "unpriced_model", "entity": "m", "scope": null, "threshold": null,
            "period": "day", "period_start": "2026-11-27T00:00:00Z", "spent": 0, "budget": null,
            "percent_used": null, "projected": null, "expected": null, "excess": null,
            "message": "model m has no price", "at": "2026-11-27T01:00:00Z"
        }))
        .unwrap();
        let error = sink.send(&alert).await.unwrap_err();
        assert!(error.is_backend(), "{error}");
        received.recv().await.unwrap();
        assert!(received.try_recv().is_err(), "a 400 is not retried");
        assert!(WebhookSink::new("ftp://x", "k").is_err());
    }
}

#[cfg(all(feature = "redis", feature = "postgres"))]
mod redis_and_postgres {
    use super::*;
    use pupkit::cost::{PgLedger, RedisSpendStore};
    use pupkit::redis::{RedisConfig, RedisConnection};
    use support::redis::PrivateRedis;

    #[tokio::test]
    async fn a_redis_restart_loses_no_committed_event_from_the_ledger() {
        let Some((pool, schema)) = support::postgres::pool("costrestart", |_| {}).await else {
            return;
        };
        let Some(mut server) = PrivateRedis::start() else {
            return;
        };
        let mut config = RedisConfig::new(server.url());
        config.op_timeout = Duration::from_millis(500);
        config.breaker.cool_down = Duration::from_millis(100);
        config.breaker.jitter = 0.0;
        let redis = RedisConnection::connect(&config).await.unwrap();
        let ledger = PgLedger::connect(pool.clone(), &schema).await.unwrap();
        let meter = Meter::builder()
            .spend_store(Arc::new(RedisSpendStore::new(redis, "restart").unwrap()))
            .ledger(Arc::new(ledger))
            .budget(
                Budget::new(
                    Scope::User("u1".into()),
                    MicroUsd::from_dollars(1_000),
                    Period::Month,
                )
                .mode(Mode::Hard),
            )
            .build()
            .await
            .unwrap();
        let spender = Spender::new("chat", "u1");
        let mut held = Vec::new();
        for i in 0..5 {
            held.push(
                meter
                    .reserve(&spender, "0.50".parse().unwrap())
                    .await
                    .unwrap(),
            );
            meter
                .record(costing(&format!("before{i}"), "u1", 10))
                .await
                .unwrap();
        }
        server.kill();
        // Redis is gone mid-operation: the reserved calls commit and new events record, all
        // into the ledger; new reservations are refused rather than unenforced.
        for (i, reservation) in held.iter().enumerate() {
            let recorded = meter
                .commit(reservation, costing(&format!("commit{i}"), "u1", 20))
                .await
                .unwrap();
            assert!(!recorded.counted && !recorded.duplicate);
        }
        for i in 0..5 {
            meter
                .record(costing(&format!("down{i}"), "u1", 10))
                .await
                .unwrap();
        }
        assert!(
            meter
                .reserve(&spender, "0.50".parse().unwrap())
                .await
                .unwrap_err()
                .is_backend()
        );
        server.restart();
        let mut after = 0;
        loop {
            let recorded = meter
                .record(costing(&format!("after{after}"), "u1", 10))
                .await;
            after += 1;
            if recorded.is_ok_and(|r| r.counted) {
                break;
            }
            assert!(after < 100, "Redis did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rows = pool
            .query(
                &format!("SELECT request_id, cost_micros FROM {schema}.pupkit_cost_ledger"),
                &[],
            )
            .await
            .unwrap();
        let mut stored: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        stored.sort();
        let mut expected: Vec<String> = (0..5)
            .flat_map(|i| {
                [
                    format!("before{i}"),
                    format!("commit{i}"),
                    format!("down{i}"),
                ]
            })
            .chain((0..after).map(|i| format!("after{i}")))
            .collect();
        expected.sort();
        assert_eq!(
            stored, expected,
            "every committed and recorded event is in the ledger"
        );
        let sum: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
        let status = &meter.budget_status(None).await.unwrap()[0];
        assert_eq!(
            status.spent.micros(),
            sum,
            "the counters were rebuilt from the ledger"
        );
        assert_eq!(status.reserved, MicroUsd::ZERO);
        support::postgres::drop_schema(&pool, &schema).await;
    }
}
