//! The cost meter: prices usage, keeps the ledger, enforces budgets, raises alerts.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use super::alerts::{Alert, AlertKind, AlertSink};
use super::anomaly::{self, Anomaly, AnomalyConfig};
use super::budget::{Budget, CounterSpec, Period, ResolvedBudget, Scope, resolve_time_zone};
use super::event::{LedgerEntry, Usage, validate_id};
use super::memory::{MemoryLedger, MemorySpendStore, bucket_start};
use super::money::MicroUsd;
use super::prices::PriceTable;
use super::report::{
    BudgetStatus, Projection, Realtime, Report, ReportPeriod, SortBy, UserBreakdown, UserSpend,
};
use super::store::{
    Booking, BucketWidth, BudgetCheck, Dimension, Increment, Ledger, LedgerQuery, ReserveOutcome,
    SpendStore,
};
use crate::error::{Error, Result};
use crate::tally::Tally;

/// Settings of a [`Meter`]. The defaults are the report's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CostConfig {
    /// The IANA time zone of calendar days, weeks and months, for reports and for budgets
    /// that name none. Default `"UTC"`.
    pub time_zone: String,
    /// How long a reservation holds budget if it is never committed or released. Default 5 min.
    #[serde(with = "crate::serde_duration")]
    pub reservation_ttl: Duration,
    /// The anomaly rule. Default: over 2× the trailing average, 3 buckets of warm-up, $0.05
    /// floor.
    pub anomaly: AnomalyConfig,
    /// The fraction of a period that must pass before a projection can raise an alert, so the
    /// first minutes of a month do not. Default 0.1.
    pub projection_min_elapsed: f64,
    /// How many users "top spenders" lists. Default 10.
    pub top_spenders: usize,
    /// How far in the future a usage timestamp may be (clock skew between hosts): an event
    /// dated later would count in a future window, out of reach of today's budgets.
    /// Default 5 min. Past timestamps (backfills) are accepted.
    #[serde(with = "crate::serde_duration")]
    pub max_future_skew: Duration,
    /// How often budgets are re-read from the spend store, to pick up changes made by other
    /// processes. Default 5 s.
    #[serde(with = "crate::serde_duration")]
    pub budget_refresh: Duration,
}

impl Default for CostConfig {
    fn default() -> Self {
        CostConfig {
            time_zone: "UTC".to_owned(),
            reservation_ttl: Duration::from_secs(300),
            anomaly: AnomalyConfig::default(),
            projection_min_elapsed: 0.1,
            top_spenders: 10,
            max_future_skew: Duration::from_secs(300),
            budget_refresh: Duration::from_secs(5),
        }
    }
}

/// Who is spending: the service and the end user a call is made for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Spender {
    /// The service.
    pub service: String,
    /// The end user.
    pub user: String,
}

impl Spender {
    /// `user` spending through `service`.
    pub fn new(service: impl Into<String>, user: impl Into<String>) -> Self {
        Spender {
            service: service.into(),
            user: user.into(),
        }
    }
}

/// Budget held for one expensive call, from [`CostMeter::reserve`] until
/// [`commit`](CostMeter::commit) or [`release`](CostMeter::release). If neither comes, it
/// expires after [`CostConfig::reservation_ttl`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "a reservation holds budget until it is committed, released or expires"]
pub struct Reservation {
    /// Its id.
    pub id: String,
    /// Who it is for.
    pub spender: Spender,
    /// What it holds.
    pub estimate: MicroUsd,
    /// When it stops holding budget.
    pub expires_at: Timestamp,
    pools: Vec<String>,
}

/// What recording one usage event came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Recorded {
    /// The event's request id.
    pub request_id: String,
    /// What it cost.
    pub cost: MicroUsd,
    /// What a cache or dedup saved.
    pub saved: MicroUsd,
    /// False when its model has no price (an alert was raised).
    pub priced: bool,
    /// True when the request id was already in the ledger: nothing was counted again.
    pub duplicate: bool,
    /// False when the ledger has it but the real-time counters could not be updated (the
    /// spend store was down); the meter rebuilds them from the ledger when it is back. A
    /// reservation this commit settled then holds its budget until it expires.
    pub counted: bool,
}

/// Counters of a meter's activity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CostStats {
    /// Events written to the ledger.
    pub recorded: u64,
    /// Events refused as duplicates of a recorded request id.
    pub duplicates: u64,
    /// Events of unpriced models.
    pub unpriced: u64,
    /// Reservations granted.
    pub reservations_granted: u64,
    /// Reservations refused by a hard budget.
    pub reservations_denied: u64,
    /// Commits whose reservation had already expired.
    pub commits_after_expiry: u64,
    /// Alerts raised (after dedup).
    pub alerts_raised: u64,
    /// Alert deliveries that failed.
    pub alert_failures: u64,
    /// Spend-store calls that failed.
    pub store_errors: u64,
    /// Micro-dollars recorded.
    pub spent_micros: u64,
}

/// The meter's counters, mirrored to `metrics` as `pupkit_cost_*_total`.
struct Counters {
    recorded: Tally,
    duplicates: Tally,
    unpriced: Tally,
    spent_micros: Tally,
    granted: Tally,
    denied: Tally,
    late_commits: Tally,
    alerts: Tally,
    alert_failures: Arc<Tally>,
    store_errors: Tally,
}

impl Counters {
    fn new() -> Self {
        let tally = |name| Tally::new(name, Vec::new());
        Counters {
            recorded: tally("pupkit_cost_recorded_total"),
            duplicates: tally("pupkit_cost_duplicates_total"),
            unpriced: tally("pupkit_cost_unpriced_total"),
            spent_micros: tally("pupkit_cost_spent_micros_total"),
            granted: tally("pupkit_cost_reservations_granted_total"),
            denied: tally("pupkit_cost_reservations_denied_total"),
            late_commits: tally("pupkit_cost_commits_after_expiry_total"),
            alerts: tally("pupkit_cost_alerts_total"),
            alert_failures: Arc::new(tally("pupkit_cost_alert_failures_total")),
            store_errors: tally("pupkit_cost_store_errors_total"),
        }
    }
}

/// Real-time cost tracking with budgets: the interface the HTTP routes, the embedding batcher
/// and the job workers use. [`Meter`] implements it.
#[async_trait]
pub trait CostMeter: Send + Sync + fmt::Debug {
    /// Prices and records one usage event. The same request id twice counts once.
    async fn record(&self, usage: Usage) -> Result<Recorded>;

    /// Holds `estimate` against every hard budget of the spender, or fails with
    /// [`Error::BudgetExceeded`] if one would pass its cap. Concurrent reservations can never
    /// together pass a cap.
    async fn reserve(&self, spender: &Spender, estimate: MicroUsd) -> Result<Reservation>;

    /// Records the actual usage of a reserved call and frees the reservation, atomically. On
    /// an error nothing was recorded and the reservation still holds: commit again (the
    /// request id makes a retry safe) or release it.
    async fn commit(&self, reservation: &Reservation, usage: Usage) -> Result<Recorded>;

    /// Frees a reservation whose call did not happen.
    async fn release(&self, reservation: &Reservation) -> Result<()>;

    /// Creates or replaces the budget of a scope and period; returns its state.
    async fn set_budget(&self, budget: Budget) -> Result<BudgetStatus>;

    /// The state of every budget, or of one scope's.
    async fn budget_status(&self, scope: Option<&Scope>) -> Result<Vec<BudgetStatus>>;

    /// Today, this month, burn rates, budgets and anomalies.
    async fn realtime(&self) -> Result<Realtime>;

    /// A period report.
    async fn report(&self, period: ReportPeriod) -> Result<Report>;

    /// Per-user spend in a period, sorted and paged.
    async fn user_breakdown(
        &self,
        period: ReportPeriod,
        sort: SortBy,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> Result<UserBreakdown>;

    /// Current anomalies (hourly and daily, per user and per service), largest excess first.
    /// Reads only; see [`check_anomalies`](Self::check_anomalies).
    async fn anomalies(&self) -> Result<Vec<Anomaly>>;

    /// Like [`anomalies`](Self::anomalies), and raises an alert for each new one (once per
    /// entity and bucket). [`Meter::spawn_anomaly_checks`] calls it on a timer.
    async fn check_anomalies(&self) -> Result<Vec<Anomaly>>;

    /// The selected ledger events as RFC 4180 CSV, streamed.
    fn export_csv(&self, query: &LedgerQuery) -> BoxStream<'static, Result<Bytes>>;

    /// What `usage` would cost at the prices in effect now: for the estimate a caller
    /// reserves before a call. `None` when its model has no price.
    fn estimate(&self, usage: &Usage) -> Option<MicroUsd>;

    /// Activity counters.
    fn stats(&self) -> CostStats;
}

/// Budgets as last read from the store, with the counter specs they need.
struct BudgetSet {
    budgets: Vec<ResolvedBudget>,
    /// Every spec counted: the meter's day and month, plus each budget's.
    specs: Vec<(CounterSpec, TimeZone)>,
    loaded: Instant,
}

type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The cost meter over a [`SpendStore`] and a [`Ledger`].
///
/// ```
/// use pupkit::cost::{Budget, CostMeter, Meter, MicroUsd, Mode, Period, Scope, Spender, Usage};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pupkit::Result<()> {
/// let meter = Meter::builder().build().await?; // in memory
/// meter
///     .set_budget(
///         Budget::new(Scope::User("u1".into()), MicroUsd::from_dollars(5), Period::Month)
///             .mode(Mode::Hard),
///     )
///     .await?;
/// let spender = Spender::new("chat", "u1");
/// let held = meter.reserve(&spender, "0.01".parse()?).await?;
/// let usage = Usage::new("req-1", "chat", "u1", "gpt-4o-mini").tokens(2_000, 500);
/// let recorded = meter.commit(&held, usage).await?;
/// assert_eq!(recorded.cost.micros(), 600); // 2000 x $0.15/M + 500 x $0.60/M
/// # Ok(())
/// # }
/// ```
pub struct Meter {
    config: CostConfig,
    tz: TimeZone,
    prices: PriceTable,
    spend: Arc<dyn SpendStore>,
    ledger: Arc<dyn Ledger>,
    sinks: Arc<Vec<Arc<dyn AlertSink>>>,
    budgets: RwLock<Arc<BudgetSet>>,
    /// Alert keys this process already knows were claimed.
    fired: Mutex<HashSet<String>>,
    /// The spend store missed increments (it was down) or lost its state.
    counters_stale: AtomicBool,
    clock: Clock,
    counters: Counters,
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("config", &self.config)
            .field("spend", &self.spend)
            .field("ledger", &self.ledger)
            .field("sinks", &self.sinks.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Meter`]. Without a store or ledger it keeps both in memory.
pub struct MeterBuilder {
    config: CostConfig,
    prices: PriceTable,
    spend: Option<Arc<dyn SpendStore>>,
    ledger: Option<Arc<dyn Ledger>>,
    sinks: Vec<Arc<dyn AlertSink>>,
    budgets: Vec<Budget>,
    clock: Option<Clock>,
}

impl MeterBuilder {
    /// Sets the configuration.
    pub fn config(mut self, config: CostConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the price table (default [`PriceTable::builtin`]).
    pub fn prices(mut self, prices: PriceTable) -> Self {
        self.prices = prices;
        self
    }

    /// Sets the spend store (default in memory).
    pub fn spend_store(mut self, store: Arc<dyn SpendStore>) -> Self {
        self.spend = Some(store);
        self
    }

    /// Sets the ledger (default in memory).
    pub fn ledger(mut self, ledger: Arc<dyn Ledger>) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Adds an alert sink.
    pub fn sink(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    /// Adds a budget, saved to the spend store on build.
    pub fn budget(mut self, budget: Budget) -> Self {
        self.budgets.push(budget);
        self
    }

    /// Replaces the wall clock (for tests and simulations).
    pub fn clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Checks the configuration, saves the budgets, and builds the meter.
    pub async fn build(self) -> Result<Meter> {
        let tz = resolve_time_zone(&self.config.time_zone)?;
        if !(0.0..=1.0).contains(&self.config.projection_min_elapsed) {
            return Err(Error::invalid(
                "projection_min_elapsed",
                format!("{} is outside 0 to 1", self.config.projection_min_elapsed),
            ));
        }
        let ttl = self.config.reservation_ttl;
        if ttl.is_zero() || ttl > Duration::from_secs(86_400) {
            return Err(Error::invalid(
                "reservation_ttl",
                format!("{ttl:?} is outside 1 ms to 1 day"),
            ));
        }
        let clock = self.clock.unwrap_or_else(|| Arc::new(Timestamp::now));
        let store_clock = clock.clone();
        let meter = Meter {
            tz,
            prices: self.prices,
            spend: self
                .spend
                .unwrap_or_else(|| Arc::new(MemorySpendStore::with_clock(move || store_clock()))),
            ledger: self.ledger.unwrap_or_else(|| Arc::new(MemoryLedger::new())),
            sinks: Arc::new(self.sinks),
            budgets: RwLock::new(Arc::new(BudgetSet {
                budgets: Vec::new(),
                specs: Vec::new(),
                loaded: Instant::now(),
            })),
            fired: Mutex::new(HashSet::new()),
            counters_stale: AtomicBool::new(false),
            clock,
            counters: Counters::new(),
            config: self.config,
        };
        for budget in self.budgets {
            meter.set_budget(budget).await?;
        }
        meter.reload_budgets().await?;
        Ok(meter)
    }
}

/// The key a budget is stored under: one budget per scope and period.
fn budget_key(budget: &Budget) -> String {
    format!(
        "{}|{}",
        budget.scope.key_fragment(),
        period_id(budget.period)
    )
}

/// `day`, `week`, `month`, or `rolling<seconds>`.
fn period_id(period: Period) -> String {
    match period {
        Period::Rolling(length) => format!("rolling{}", length.as_secs()),
        other => other.name().to_owned(),
    }
}

impl Meter {
    /// A builder with the default configuration and in-memory stores.
    pub fn builder() -> MeterBuilder {
        MeterBuilder {
            config: CostConfig::default(),
            prices: PriceTable::builtin(),
            spend: None,
            ledger: None,
            sinks: Vec::new(),
            budgets: Vec::new(),
            clock: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CostConfig {
        &self.config
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// Re-reads the budgets from the store. Budgets are never deleted (a budget is switched
    /// off with [`Mode::Off`](super::Mode::Off)), so one this meter knows that the store has
    /// lost (a Redis restart without persistence) is saved again. A period kind this process
    /// did not count before is counted from now on, and its current window raised to the
    /// ledger's sums.
    async fn reload_budgets(&self) -> Result<Arc<BudgetSet>> {
        let mut stored = self.spend.budgets().await?;
        let known = self
            .budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for lost in known.budgets.iter().map(|b| &b.budget) {
            let key = budget_key(lost);
            if !stored.iter().any(|b| budget_key(b) == key) {
                tracing::warn!(budget = %key, "the spend store lost a budget; saving it again");
                self.spend.restore_budget(&key, lost).await?;
                stored.push(lost.clone());
            }
        }
        let mut budgets = Vec::with_capacity(stored.len());
        for budget in stored {
            match budget.clone().resolve(&self.config.time_zone) {
                Ok(resolved) => budgets.push(resolved),
                Err(error) => tracing::warn!(%error, ?budget, "skipping an invalid stored budget"),
            }
        }
        let mut specs: Vec<(CounterSpec, TimeZone)> = [Period::Day, Period::Month]
            .into_iter()
            .map(|p| (CounterSpec::new(p, &self.config.time_zone), self.tz.clone()))
            .collect();
        for budget in &budgets {
            if !specs.iter().any(|(spec, _)| spec.id == budget.spec.id) {
                specs.push((budget.spec.clone(), budget.tz.clone()));
            }
        }
        let new_specs: Vec<(CounterSpec, TimeZone)> = specs
            .iter()
            .filter(|(spec, _)| !known.specs.iter().any(|(k, _)| k.id == spec.id))
            .cloned()
            .collect();
        let set = Arc::new(BudgetSet {
            budgets,
            specs,
            loaded: Instant::now(),
        });
        *self.budgets.write().unwrap_or_else(|p| p.into_inner()) = set.clone();
        // Counted from now on; raise what happened before from the ledger.
        if !new_specs.is_empty()
            && let Err(error) = self.raise_from_ledger(&new_specs, None).await
        {
            tracing::warn!(%error, "could not raise new spend counters from the ledger");
            self.counters_stale.store(true, Ordering::Relaxed);
        }
        Ok(set)
    }

    /// The budgets, re-read from the store when older than `budget_refresh`.
    async fn current_budgets(&self) -> Arc<BudgetSet> {
        let set = self
            .budgets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if set.loaded.elapsed() < self.config.budget_refresh {
            return set;
        }
        match self.reload_budgets().await {
            Ok(set) => set,
            Err(error) => {
                self.counters.store_errors.add(1);
                tracing::warn!(%error, "could not re-read budgets; using the last ones");
                set
            }
        }
    }

    /// Prices a usage event into a ledger entry.
    fn entry(&self, usage: Usage) -> Result<LedgerEntry> {
        usage.validate()?;
        let now = self.now();
        let at = usage.at.unwrap_or(now);
        let skew = self.config.max_future_skew.as_secs().min(i64::MAX as u64) as i64;
        if at.as_second() > now.as_second().saturating_add(skew) {
            return Err(Error::invalid(
                "at",
                format!(
                    "{at} is more than {:?} in the future (now is {now})",
                    self.config.max_future_skew
                ),
            ));
        }
        let priced = self.prices.price(&usage, at);
        Ok(LedgerEntry {
            request_id: usage.request_id,
            at,
            service: usage.service,
            user: usage.user,
            model: usage.model,
            operation: usage.operation,
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            units: usage.units,
            source: usage.source,
            cost: priced.cost,
            saved: priced.saved,
            priced: priced.priced,
        })
    }

    /// The counters an entry adds `amount` to.
    fn increments(set: &BudgetSet, entry: &LedgerEntry, amount: MicroUsd) -> Vec<Increment> {
        if amount.micros() == 0 {
            return Vec::new();
        }
        let scopes = Scope::of_event(&entry.service, &entry.user);
        let mut increments = Vec::with_capacity(scopes.len() * set.specs.len());
        for (spec, tz) in &set.specs {
            // The window depends on the period only: compute it once for the three scopes.
            let (bucket, expires) = spec.event_bucket(entry.at, tz);
            for scope in &scopes {
                increments.push(Increment {
                    key: spec.key(scope, bucket),
                    amount: amount.micros(),
                    expires,
                });
            }
        }
        increments
    }

    /// The budgets (not off) that an event of `service` and `user` counts against.
    fn applicable<'a>(
        set: &'a BudgetSet,
        service: &str,
        user: &str,
    ) -> impl Iterator<Item = &'a ResolvedBudget> {
        let scopes = Scope::of_event(service, user);
        set.budgets
            .iter()
            .filter(move |b| b.budget.mode != super::Mode::Off && scopes.contains(&b.budget.scope))
    }

    /// Writes an entry to the ledger, then books it into the counters (settling its
    /// reservation), then raises the alerts it causes. Both steps are idempotent by request
    /// id, so a retry after an error (or a lost reply) counts the event exactly once.
    async fn book(
        &self,
        entry: LedgerEntry,
        reservation: Option<&Reservation>,
    ) -> Result<Recorded> {
        let mut recorded = Recorded {
            request_id: entry.request_id.clone(),
            cost: entry.cost,
            saved: entry.saved,
            priced: entry.priced,
            duplicate: false,
            counted: true,
        };
        if self.ledger.append(&entry).await? {
            self.counters.recorded.add(1);
            self.counters
                .spent_micros
                .add(entry.cost.micros().max(0) as u64);
            if !entry.priced {
                self.counters.unpriced.add(1);
                self.unpriced_alert(&entry).await;
            }
        } else {
            self.counters.duplicates.add(1);
            recorded.duplicate = true;
        }
        let set = self.current_budgets().await;
        let now = self.now();
        let watched: Vec<&ResolvedBudget> =
            Self::applicable(&set, &entry.service, &entry.user).collect();
        let watch: Vec<Vec<String>> = watched.iter().map(|b| b.counter_keys(now)).collect();
        let amount = match reservation {
            // A duplicate older than the store's dedup window was counted long ago (or by a
            // rebuild since): it must not count again after its request id was forgotten.
            _ if recorded.duplicate
                && now.as_second() - entry.at.as_second()
                    > super::DEDUP_WINDOW.as_secs() as i64 =>
            {
                MicroUsd::ZERO
            }
            // An unpriced call still spends its reservation, so unknown models cannot slip
            // past a hard budget. (The ledger keeps it as unpriced; a rebuild drops it.)
            Some(reservation) if !entry.priced => reservation.estimate,
            _ => entry.cost,
        };
        let increments = Self::increments(&set, &entry, amount);
        let reservation = reservation
            .filter(|r| !r.pools.is_empty())
            .map(|r| (r.id.as_str(), r.pools.as_slice()));
        if increments.is_empty() && watch.is_empty() && reservation.is_none() {
            return Ok(recorded);
        }
        let booking = Booking {
            request_id: &entry.request_id,
            reservation,
            increments: &increments,
            watch: &watch,
        };
        let booked = match self.spend.book(&booking).await {
            Ok(booked) => booked,
            Err(error) => {
                self.counters.store_errors.add(1);
                self.counters_stale.store(true, Ordering::Relaxed);
                tracing::warn!(%error, request_id = %entry.request_id, "spend counters not updated; the ledger has the event");
                recorded.counted = false;
                return Ok(recorded);
            }
        };
        if reservation.is_some() && !booked.held {
            self.counters.late_commits.add(1);
        }
        if booked.fresh
            && let Err(error) = self.reload_budgets().await
        {
            tracing::warn!(%error, "could not restore budgets after the spend store lost them");
        }
        if booked.fresh || self.counters_stale.swap(false, Ordering::Relaxed) {
            self.rebuild_counters(&set).await;
        }
        for (budget, spent) in watched.into_iter().zip(booked.sums) {
            self.budget_alerts(budget, MicroUsd::from_micros(spent), now)
                .await;
        }
        Ok(recorded)
    }

    /// Raises every counter of the current windows back to what the ledger says: after the
    /// spend store lost its state or missed increments.
    async fn rebuild_counters(&self, set: &BudgetSet) {
        match self.raise_from_ledger(&set.specs, None).await {
            Ok(count) => tracing::info!(counters = count, "spend counters rebuilt from the ledger"),
            Err(error) => {
                tracing::warn!(%error, "could not rebuild spend counters from the ledger");
                self.counters_stale.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Raises the counters of `specs` in their current windows (each bucket of a rolling
    /// one) to the ledger's sums, for every scope or for `only` one. Returns how many
    /// counters it raised.
    async fn raise_from_ledger(
        &self,
        specs: &[(CounterSpec, TimeZone)],
        only: Option<&Scope>,
    ) -> Result<usize> {
        let now = self.now();
        let mut values = Vec::new();
        for (spec, tz) in specs {
            for (from, to) in spec.window_buckets(now, tz) {
                let mut query = LedgerQuery::between(from, to);
                match only {
                    Some(Scope::Service(service)) => query.service = Some(service.clone()),
                    Some(Scope::User(user)) => query.user = Some(user.clone()),
                    _ => {}
                }
                let summary = self.ledger.summarize(&query).await?;
                let sums: Vec<(Scope, MicroUsd)> = match only {
                    Some(scope) => vec![(scope.clone(), summary.totals.cost)],
                    None => std::iter::once((Scope::Global, summary.totals.cost))
                        .chain(
                            summary
                                .by_service
                                .iter()
                                .map(|g| (Scope::Service(g.key.clone()), g.totals.cost)),
                        )
                        .chain(
                            summary
                                .by_user
                                .iter()
                                .map(|g| (Scope::User(g.key.clone()), g.totals.cost)),
                        )
                        .collect(),
                };
                let (bucket, expires) = spec.event_bucket(from, tz);
                values.extend(sums.into_iter().filter(|(_, cost)| cost.micros() > 0).map(
                    |(scope, cost)| Increment {
                        key: spec.key(&scope, bucket),
                        amount: cost.micros(),
                        expires,
                    },
                ));
            }
        }
        // In slices, so one script never holds Redis for long.
        for slice in values.chunks(1_000) {
            self.spend.raise(slice).await?;
        }
        Ok(values.len())
    }

    fn status(
        &self,
        budget: &ResolvedBudget,
        spent: i64,
        reserved: i64,
        now: Timestamp,
    ) -> BudgetStatus {
        let window = budget.window(now);
        let amount = budget.budget.amount;
        let spent = MicroUsd::from_micros(spent);
        let reserved = MicroUsd::from_micros(reserved);
        let projection = project(spent, window.start, window.end, window.rolling, now);
        let exhausts_at = exhaustion(spent, amount, window.start, now)
            .filter(|t| window.rolling || *t < window.end);
        BudgetStatus {
            budget: budget.budget.clone(),
            period_start: window.start,
            resets_at: (!window.rolling).then_some(window.end),
            spent,
            reserved,
            remaining: amount.saturating_sub(spent + reserved),
            percent_used: percent(spent, amount),
            projected: projection.projected,
            exhausts_at,
        }
    }

    async fn statuses(
        &self,
        set: &BudgetSet,
        filter: impl Fn(&ResolvedBudget) -> bool,
    ) -> Result<Vec<BudgetStatus>> {
        let now = self.now();
        let chosen: Vec<&ResolvedBudget> = set.budgets.iter().filter(|b| filter(b)).collect();
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let groups: Vec<Vec<String>> = chosen.iter().map(|b| b.counter_keys(now)).collect();
        let pools: Vec<String> = chosen.iter().map(|b| b.pool_key()).collect();
        let (sums, reserved) = self.spend.read(&groups, &pools).await?;
        Ok(chosen
            .into_iter()
            .zip(sums.into_iter().zip(reserved))
            .map(|(b, (spent, reserved))| self.status(b, spent, reserved, now))
            .collect())
    }

    async fn budget_alerts(&self, budget: &ResolvedBudget, spent: MicroUsd, now: Timestamp) {
        let window = budget.window(now);
        let amount = budget.budget.amount;
        let ttl = alert_ttl(&window, now);
        let entity = budget.budget.scope.to_string();
        let used = percent(spent, amount);
        let period = period_id(budget.budget.period);
        // A rolling window has no start of its own: alert at most once per window length.
        let period_start = match budget.budget.period {
            Period::Rolling(length) => {
                let length = length.as_secs().max(1) as i64;
                Timestamp::from_second(now.as_second().div_euclid(length) * length)
                    .unwrap_or(window.start)
            }
            _ => window.start,
        };
        for &threshold in budget.budget.thresholds.iter().rev() {
            if (spent.micros() as i128) * 100 < threshold as i128 * amount.micros() as i128 {
                continue;
            }
            let alert = Alert {
                kind: AlertKind::ThresholdCrossed,
                entity: entity.clone(),
                scope: Some(budget.budget.scope.clone()),
                threshold: Some(threshold),
                period: period.clone(),
                period_start,
                spent,
                budget: Some(amount),
                percent_used: used,
                projected: None,
                expected: None,
                excess: None,
                observed: None,
                limit: None,
                message: format!(
                    "{entity} has spent {spent} of its {amount} {} budget ({}), past the {threshold}% threshold",
                    budget.budget.period.name(),
                    used.map_or("no budget".to_owned(), |u| format!("{u:.1}%"))
                ),
                at: now,
            };
            self.raise(alert, ttl).await;
        }
        let elapsed = window.elapsed_fraction(now);
        if window.rolling || elapsed < self.config.projection_min_elapsed || spent >= amount {
            return;
        }
        let projection = project(spent, window.start, window.end, false, now);
        if projection.projected > amount {
            let projected = projection.projected;
            self.raise(
                Alert {
                    kind: AlertKind::ProjectedToExceed,
                    entity: entity.clone(),
                    scope: Some(budget.budget.scope.clone()),
                    threshold: None,
                    period,
                    period_start,
                    spent,
                    budget: Some(amount),
                    percent_used: used,
                    projected: Some(projected),
                    expected: None,
                    excess: None,
                    observed: None,
                    limit: None,
                    message: format!(
                        "{entity} is on course to spend {projected} this {}, over its {amount} budget",
                        budget.budget.period.name()
                    ),
                    at: now,
                },
                ttl,
            )
            .await;
        }
    }

    async fn unpriced_alert(&self, entry: &LedgerEntry) {
        let now = self.now();
        let day = super::Period::Day.window(now, &self.tz);
        let alert = Alert {
            kind: AlertKind::UnpricedModel,
            entity: entry.model.clone(),
            scope: None,
            threshold: None,
            period: "day".to_owned(),
            period_start: day.start,
            spent: MicroUsd::ZERO,
            budget: None,
            percent_used: None,
            projected: None,
            expected: None,
            excess: None,
            observed: None,
            limit: None,
            message: format!(
                "model {:?} has no price: its usage (request {:?}, {} tokens) is recorded as unpriced, not free",
                entry.model,
                entry.request_id,
                entry.total_tokens()
            ),
            at: now,
        };
        self.raise(alert, alert_ttl(&day, now)).await;
    }

    /// Raises an alert once per dedup key (across processes, through the spend store), and
    /// hands it to the sinks in the background.
    async fn raise(&self, alert: Alert, ttl: Duration) {
        let key = alert.dedup_key();
        {
            let fired = self.fired.lock().unwrap_or_else(|p| p.into_inner());
            if fired.contains(&key) {
                return;
            }
        }
        match self.spend.claim_alert(&format!("a|{key}"), ttl).await {
            Ok(claimed) => {
                let mut fired = self.fired.lock().unwrap_or_else(|p| p.into_inner());
                if fired.len() > 100_000 {
                    fired.clear();
                }
                fired.insert(key);
                if !claimed {
                    return;
                }
            }
            Err(error) => {
                self.counters.store_errors.add(1);
                tracing::warn!(%error, "could not claim an alert; it will be raised again later");
                return;
            }
        }
        self.counters.alerts.add(1);
        let sinks = self.sinks.clone();
        let failures = self.counters.alert_failures.clone();
        let deliver = async move {
            for sink in sinks.iter() {
                if let Err(error) = sink.send(&alert).await {
                    failures.add(1);
                    tracing::warn!(%error, ?sink, kind = alert.kind.as_str(), "alert not delivered");
                }
            }
        };
        // In the background on Tokio, so a slow webhook never holds up a record; inline on
        // another executor.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(deliver);
            }
            Err(_) => deliver.await,
        }
    }

    fn report_window(&self, period: ReportPeriod, now: Timestamp) -> (Timestamp, Timestamp) {
        match period {
            ReportPeriod::Day => bounds(Period::Day, now, &self.tz),
            ReportPeriod::Week => bounds(Period::Week, now, &self.tz),
            ReportPeriod::Month => bounds(Period::Month, now, &self.tz),
            ReportPeriod::Custom { from, to } => (from, to),
        }
    }

    /// Bucket starts for anomaly detection: the current one and the `count` before it.
    fn bucket_starts(
        &self,
        width: BucketWidth,
        now: Timestamp,
        count: usize,
    ) -> (Timestamp, Vec<Timestamp>) {
        let current = bucket_start(now, width, &self.tz);
        let mut history = Vec::with_capacity(count);
        let mut start = current;
        for _ in 0..count {
            start = match width {
                BucketWidth::Hour => {
                    Timestamp::from_second(start.as_second() - 3600).unwrap_or(start)
                }
                BucketWidth::Day => start
                    .to_zoned(self.tz.clone())
                    .checked_sub(1.day())
                    .map(|z| bucket_start(z.timestamp(), width, &self.tz))
                    .unwrap_or(start),
            };
            history.push(start);
        }
        history.reverse();
        (current, history)
    }

    /// The anomalies at `now`, ranked: the current hour and day of each user and service
    /// against their trailing buckets.
    async fn detect_anomalies(&self, now: Timestamp) -> Result<Vec<Anomaly>> {
        let config = &self.config.anomaly;
        let mut found = Vec::new();
        for (width, count) in [
            (BucketWidth::Hour, config.hourly_history),
            (BucketWidth::Day, config.daily_history),
        ] {
            let (current, history) = self.bucket_starts(width, now, count);
            let from = history.first().copied().unwrap_or(current);
            let to = now.checked_add(1.second()).unwrap_or(now);
            for dimension in [Dimension::User, Dimension::Service] {
                let totals = self
                    .ledger
                    .buckets(
                        &LedgerQuery::between(from, to),
                        dimension,
                        width,
                        &self.config.time_zone,
                    )
                    .await?;
                found.extend(anomaly::detect(
                    config, dimension, width, &totals, current, &history,
                ));
            }
        }
        anomaly::rank(&mut found);
        Ok(found)
    }

    /// Runs [`CostMeter::check_anomalies`] every `every` (at least a second) until the
    /// returned handle is aborted or the meter dropped, so anomaly alerts fire on their own.
    /// Must be called inside a Tokio runtime.
    pub fn spawn_anomaly_checks(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let meter = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every.max(Duration::from_secs(1)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(meter) = meter.upgrade() else { return };
                if let Err(error) = meter.check_anomalies().await {
                    tracing::warn!(%error, "anomaly check failed");
                }
            }
        })
    }
}

fn bounds(period: Period, now: Timestamp, tz: &TimeZone) -> (Timestamp, Timestamp) {
    let window = period.window(now, tz);
    (window.start, window.end)
}

/// Keep an alert's dedup key until a day after its window ends.
fn alert_ttl(window: &super::Window, now: Timestamp) -> Duration {
    let end = if window.rolling {
        now.as_second() + (window.end.as_second() - window.start.as_second())
    } else {
        window.end.as_second()
    };
    Duration::from_secs((end - now.as_second()).max(0) as u64 + 86_400)
}

/// Spend as a percentage of a budget; `None` for a budget of zero.
fn percent(spent: MicroUsd, amount: MicroUsd) -> Option<f64> {
    (amount.micros() > 0).then(|| spent.micros() as f64 * 100.0 / amount.micros() as f64)
}

/// End-of-window spend at the run rate so far, in integer arithmetic on milliseconds.
fn project(
    spent: MicroUsd,
    start: Timestamp,
    end: Timestamp,
    rolling: bool,
    now: Timestamp,
) -> Projection {
    let total_ms = (end.as_millisecond() - start.as_millisecond()).max(1);
    let elapsed_ms = (now.as_millisecond() - start.as_millisecond()).clamp(1, total_ms);
    let projected = if rolling {
        spent
    } else {
        spent.mul_div(total_ms, elapsed_ms).unwrap_or(spent)
    };
    Projection {
        spent,
        elapsed_fraction: elapsed_ms as f64 / total_ms as f64,
        run_rate_per_hour: spent.mul_div(3_600_000, elapsed_ms).unwrap_or(spent),
        projected,
    }
}

/// When spend reaches `amount` at the run rate: `now + (amount - spent) / rate`.
fn exhaustion(
    spent: MicroUsd,
    amount: MicroUsd,
    start: Timestamp,
    now: Timestamp,
) -> Option<Timestamp> {
    if spent >= amount {
        return Some(now);
    }
    if spent.micros() <= 0 {
        return None;
    }
    let elapsed_ms = (now.as_millisecond() - start.as_millisecond()).max(1) as i128;
    let remaining_ms =
        (amount.micros() - spent.micros()) as i128 * elapsed_ms / spent.micros() as i128;
    let at = now.as_millisecond() as i128 + remaining_ms;
    Timestamp::from_millisecond(at.min(i64::MAX as i128) as i64).ok()
}

#[async_trait]
impl CostMeter for Meter {
    async fn record(&self, usage: Usage) -> Result<Recorded> {
        let entry = self.entry(usage)?;
        self.book(entry, None).await
    }

    async fn reserve(&self, spender: &Spender, estimate: MicroUsd) -> Result<Reservation> {
        validate_id("service", &spender.service)?;
        validate_id("user", &spender.user)?;
        if estimate.is_negative() {
            return Err(Error::invalid(
                "estimate",
                format!("{estimate} is negative"),
            ));
        }
        let set = self.current_budgets().await;
        let now = self.now();
        let hard: Vec<&ResolvedBudget> = Self::applicable(&set, &spender.service, &spender.user)
            .filter(|b| b.budget.mode == super::Mode::Hard)
            .collect();
        let id = format!("{:032x}", crate::random::random_u128());
        let ttl = self.config.reservation_ttl;
        let reservation = Reservation {
            id: id.clone(),
            spender: spender.clone(),
            estimate,
            expires_at: now
                .checked_add(jiff::SignedDuration::try_from(ttl).unwrap_or_default())
                .unwrap_or(now),
            pools: hard.iter().map(|b| b.pool_key()).collect(),
        };
        if hard.is_empty() {
            self.counters.granted.add(1);
            return Ok(reservation);
        }
        let checks: Vec<BudgetCheck> = hard
            .iter()
            .map(|b| BudgetCheck {
                pool: b.pool_key(),
                counters: b.counter_keys(now),
                limit: b.budget.amount.micros(),
            })
            .collect();
        // Counters that missed events (the store was down) are rebuilt before they decide.
        if self.counters_stale.swap(false, Ordering::Relaxed) {
            self.rebuild_counters(&set).await;
        }
        let mut outcome = self
            .spend
            .reserve(&id, estimate.micros(), ttl, &checks)
            .await?;
        if outcome == ReserveOutcome::Rebuild {
            // The store lost its state: restore budgets and counters, then decide.
            let set = self.reload_budgets().await?;
            self.rebuild_counters(&set).await;
            outcome = self
                .spend
                .reserve(&id, estimate.micros(), ttl, &checks)
                .await?;
        }
        match outcome {
            ReserveOutcome::Rebuild => Err(Error::Backend {
                backend: "cost store",
                operation: "reserve",
                source: "the spend store lost its state twice in a row".into(),
            }),
            ReserveOutcome::Granted => {
                self.counters.granted.add(1);
                Ok(reservation)
            }
            ReserveOutcome::Denied {
                check,
                spent,
                reserved,
            } => {
                self.counters.denied.add(1);
                let budget = &hard[check.min(hard.len() - 1)].budget;
                let window = hard[check.min(hard.len() - 1)].window(now);
                Err(Error::BudgetExceeded {
                    scope: budget.scope.to_string(),
                    period: budget.period.name(),
                    amount: budget.amount,
                    spent: MicroUsd::from_micros(spent),
                    reserved: MicroUsd::from_micros(reserved),
                    estimate,
                    resets_at: (!window.rolling).then_some(window.end),
                })
            }
        }
    }

    async fn commit(&self, reservation: &Reservation, usage: Usage) -> Result<Recorded> {
        if usage.service != reservation.spender.service || usage.user != reservation.spender.user {
            return Err(Error::invalid(
                "usage",
                format!(
                    "is for service {:?} and user {:?}, but the reservation is for service {:?} and user {:?}",
                    crate::error::excerpt(&usage.service),
                    crate::error::excerpt(&usage.user),
                    reservation.spender.service,
                    reservation.spender.user
                ),
            ));
        }
        let entry = self.entry(usage)?;
        self.book(entry, Some(reservation)).await
    }

    async fn release(&self, reservation: &Reservation) -> Result<()> {
        if reservation.pools.is_empty() {
            return Ok(());
        }
        self.spend
            .release(&reservation.id, &reservation.pools)
            .await
            .map(|_| ())
    }

    async fn set_budget(&self, budget: Budget) -> Result<BudgetStatus> {
        let resolved = budget.clone().resolve(&self.config.time_zone)?;
        self.spend
            .save_budget(&budget_key(&budget), &budget)
            .await?;
        // Count its period from now on, then raise its window to what the ledger already has.
        let set = self.reload_budgets().await?;
        self.raise_from_ledger(
            &[(resolved.spec.clone(), resolved.tz.clone())],
            Some(&resolved.budget.scope),
        )
        .await?;
        let key = budget_key(&budget);
        self.statuses(&set, |b| budget_key(&b.budget) == key)
            .await?
            .pop()
            .ok_or_else(|| Error::invalid("budget", "was saved but could not be read back"))
    }

    async fn budget_status(&self, scope: Option<&Scope>) -> Result<Vec<BudgetStatus>> {
        let set = self.current_budgets().await;
        self.statuses(&set, |b| scope.is_none_or(|s| *s == b.budget.scope))
            .await
    }

    async fn realtime(&self) -> Result<Realtime> {
        let now = self.now();
        let summarize = |from: Timestamp, to: Timestamp| async move {
            self.ledger
                .summarize(&LedgerQuery::between(from, to))
                .await
                .map(|s| s.totals)
        };
        let after_now = now.checked_add(1.second()).unwrap_or(now);
        let (day_start, _) = bounds(Period::Day, now, &self.tz);
        let (month_start, month_end) = bounds(Period::Month, now, &self.tz);
        let today = summarize(day_start, after_now).await?;
        let month = summarize(month_start, after_now).await?;
        let last_hour = summarize(now.checked_sub(1.hour()).unwrap_or(now), after_now).await?;
        let last_24h = summarize(now.checked_sub(24.hours()).unwrap_or(now), after_now).await?;
        let set = self.current_budgets().await;
        Ok(Realtime {
            at: now,
            time_zone: self.config.time_zone.clone(),
            today,
            month,
            last_hour,
            burn_rate_per_hour: last_24h.cost.mul_div(1, 24).unwrap_or_default(),
            last_24h,
            month_projection: project(month.cost, month_start, month_end, false, now),
            budgets: self.statuses(&set, |_| true).await?,
            anomalies: self.anomalies().await?,
        })
    }

    async fn report(&self, period: ReportPeriod) -> Result<Report> {
        let now = self.now();
        let (from, to) = self.report_window(period, now);
        let summary = self
            .ledger
            .summarize(&LedgerQuery::between(from, to))
            .await?;
        let projection =
            (from <= now && now < to).then(|| project(summary.totals.cost, from, to, false, now));
        Ok(Report {
            period: period.name().to_owned(),
            from,
            to,
            time_zone: self.config.time_zone.clone(),
            savings: summary.totals.saved,
            top_spenders: summary
                .by_user
                .iter()
                .take(self.config.top_spenders)
                .cloned()
                .collect(),
            totals: summary.totals,
            by_service: summary.by_service,
            by_user: summary.by_user,
            by_model: summary.by_model,
            anomalies: self.anomalies().await?,
            projection,
        })
    }

    async fn user_breakdown(
        &self,
        period: ReportPeriod,
        sort: SortBy,
        descending: bool,
        offset: usize,
        limit: usize,
    ) -> Result<UserBreakdown> {
        let now = self.now();
        let (from, to) = self.report_window(period, now);
        let summary = self
            .ledger
            .summarize(&LedgerQuery::between(from, to))
            .await?;
        let mut users = summary.by_user;
        users.sort_by(|a, b| {
            let order = match sort {
                SortBy::Cost => a.totals.cost.cmp(&b.totals.cost),
                SortBy::Tokens => (a.totals.input_tokens + a.totals.output_tokens)
                    .cmp(&(b.totals.input_tokens + b.totals.output_tokens)),
                SortBy::Requests => a.totals.requests.cmp(&b.totals.requests),
                SortBy::User => a.key.cmp(&b.key),
            };
            let order = if descending { order.reverse() } else { order };
            order.then_with(|| a.key.cmp(&b.key))
        });
        let total_users = users.len();
        let page: Vec<_> = users.into_iter().skip(offset).take(limit).collect();
        let set = self.current_budgets().await;
        let on_page: HashSet<&str> = page.iter().map(|g| g.key.as_str()).collect();
        let mut statuses: HashMap<String, Vec<BudgetStatus>> = HashMap::new();
        for status in self
            .statuses(
                &set,
                |b| matches!(&b.budget.scope, Scope::User(u) if on_page.contains(u.as_str())),
            )
            .await?
        {
            if let Scope::User(user) = &status.budget.scope {
                statuses.entry(user.clone()).or_default().push(status);
            }
        }
        let anomalous: HashSet<String> = self
            .anomalies()
            .await?
            .into_iter()
            .filter(|a| a.dimension == Dimension::User)
            .map(|a| a.key)
            .collect();
        Ok(UserBreakdown {
            period: period.name().to_owned(),
            from,
            to,
            total_users,
            users: page
                .into_iter()
                .map(|g| UserSpend {
                    budgets: statuses.remove(&g.key).unwrap_or_default(),
                    anomalous: anomalous.contains(&g.key),
                    user: g.key,
                    totals: g.totals,
                })
                .collect(),
        })
    }

    async fn anomalies(&self) -> Result<Vec<Anomaly>> {
        self.detect_anomalies(self.now()).await
    }

    async fn check_anomalies(&self) -> Result<Vec<Anomaly>> {
        let now = self.now();
        let found = self.detect_anomalies(now).await?;
        for anomaly in &found {
            let entity = match anomaly.dimension {
                Dimension::User => format!("user {:?}", anomaly.key),
                Dimension::Service => format!("service {:?}", anomaly.key),
            };
            let width = match anomaly.width {
                BucketWidth::Hour => "hour",
                BucketWidth::Day => "day",
            };
            let alert = Alert {
                kind: AlertKind::Anomaly,
                entity: entity.clone(),
                scope: None,
                threshold: None,
                period: width.to_owned(),
                period_start: anomaly.bucket,
                spent: anomaly.cost,
                budget: None,
                percent_used: None,
                projected: None,
                expected: Some(anomaly.expected),
                excess: Some(anomaly.excess),
                observed: None,
                limit: None,
                message: format!(
                    "{entity} spent {} this {width}, {:.1}x its trailing average of {} ({} over)",
                    anomaly.cost, anomaly.ratio, anomaly.expected, anomaly.excess
                ),
                at: now,
            };
            self.raise(alert, Duration::from_secs(2 * 86_400)).await;
        }
        Ok(found)
    }

    fn export_csv(&self, query: &LedgerQuery) -> BoxStream<'static, Result<Bytes>> {
        super::csv::encode(self.ledger.entries(query))
    }

    fn estimate(&self, usage: &Usage) -> Option<MicroUsd> {
        let priced = self.prices.price(usage, self.now());
        priced.priced.then_some(priced.cost)
    }

    fn stats(&self) -> CostStats {
        let c = &self.counters;
        CostStats {
            recorded: c.recorded.get(),
            duplicates: c.duplicates.get(),
            unpriced: c.unpriced.get(),
            reservations_granted: c.granted.get(),
            reservations_denied: c.denied.get(),
            commits_after_expiry: c.late_commits.get(),
            alerts_raised: c.alerts.get(),
            alert_failures: c.alert_failures.get(),
            store_errors: c.store_errors.get(),
            spent_micros: c.spent_micros.get(),
        }
    }
}
