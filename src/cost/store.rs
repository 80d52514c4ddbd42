//! The two backend traits of the cost meter: a [`SpendStore`] for real-time counters,
//! reservations and alert dedup, and a [`Ledger`] for the durable record of every event.
//!
//! Both speak plain data (keys, integer micro-dollars, ledger entries); pricing, budgets and
//! alert rules live in the meter above them, so a new backend stays small.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::budget::Budget;
use super::event::LedgerEntry;
use super::money::MicroUsd;
use crate::error::Result;

/// Add `amount` micro-dollars to the counter `key`, which may be dropped after `expires`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Increment {
    /// The counter.
    pub key: String,
    /// Micro-dollars to add.
    pub amount: i64,
    /// When the counter may be dropped.
    pub expires: Timestamp,
}

/// One budget a reservation must fit in: the counters that sum to its spend, the pool its
/// reservations are held in, and its cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetCheck {
    /// The pool of live reservations against this budget.
    pub pool: String,
    /// The counters whose sum is the budget's spend in its current window.
    pub counters: Vec<String>,
    /// The cap in micro-dollars.
    pub limit: i64,
}

/// What a reservation attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Held in every pool.
    Granted,
    /// Not attempted: the store had lost its state (a restarted Redis). The meter rebuilds
    /// the counters from the ledger and tries again.
    Rebuild,
    /// Refused by the check at `check`: `spent + reserved + amount` would pass its limit.
    Denied {
        /// Index of the refusing check.
        check: usize,
        /// Its spend.
        spent: i64,
        /// Its live reservations.
        reserved: i64,
    },
}

/// One event to book into the counters: its increments, the budgets to sum after them, and
/// the reservation it settles, if any.
#[derive(Clone, Copy, Debug)]
pub struct Booking<'a> {
    /// The event's request id. A request id booked in the last [`DEDUP_WINDOW`] is not
    /// counted again, so retrying after a lost reply never double-counts.
    pub request_id: &'a str,
    /// The reservation it settles: its id and pools.
    pub reservation: Option<(&'a str, &'a [String])>,
    /// What to add.
    pub increments: &'a [Increment],
    /// Groups of counters to sum afterwards (one per budget the event counts against).
    pub watch: &'a [Vec<String>],
}

/// How long a booked request id is remembered by the spend store: a day, long enough for any
/// retry, at about 100 bytes of Redis memory per event.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(86_400);

/// What booking an event came to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Booked {
    /// False when the request id had been booked already: nothing was added.
    pub counted: bool,
    /// True when the reservation was still held (not expired) when it was settled.
    pub held: bool,
    /// The sum of each watched group of counters, after the increments.
    pub sums: Vec<i64>,
    /// True when the store had lost its state (a restarted Redis): the meter then raises the
    /// counters back from the ledger.
    pub fresh: bool,
}

/// Real-time spend counters, reservations, alert dedup and shared budgets.
///
/// Every method is atomic; [`MemorySpendStore`](super::MemorySpendStore) holds them in the
/// process, [`RedisSpendStore`](super::RedisSpendStore) across processes (one Lua call each).
#[async_trait]
pub trait SpendStore: Send + Sync + Debug {
    /// Books one event: settles its reservation, adds its increments unless its request id
    /// was booked already, and sums the watched groups. All in one atomic step.
    async fn book(&self, booking: &Booking<'_>) -> Result<Booked>;

    /// Holds `amount` under `id` in every check's pool for `ttl`, if every check still fits:
    /// `sum(counters) + live reservations + amount <= limit`. All or nothing.
    async fn reserve(
        &self,
        id: &str,
        amount: i64,
        ttl: Duration,
        checks: &[BudgetCheck],
    ) -> Result<ReserveOutcome>;

    /// Drops reservation `id` from `pools`. Returns whether it was still held.
    async fn release(&self, id: &str, pools: &[String]) -> Result<bool>;

    /// The sum of each group of counters, and the live reservations of each pool.
    async fn read(&self, groups: &[Vec<String>], pools: &[String]) -> Result<(Vec<i64>, Vec<i64>)>;

    /// Raises each counter to at least its `amount` (never lowers one): how counters are
    /// rebuilt from the ledger.
    async fn raise(&self, values: &[Increment]) -> Result<()>;

    /// Claims an alert key for `ttl`. True the first time, false while it is held.
    async fn claim_alert(&self, key: &str, ttl: Duration) -> Result<bool>;

    /// Stores a budget under `key`, replacing the one there.
    async fn save_budget(&self, key: &str, budget: &Budget) -> Result<()>;

    /// Stores a budget under `key` only if there is none (restoring one the store lost,
    /// without overwriting a newer one another process saved meanwhile).
    async fn restore_budget(&self, key: &str, budget: &Budget) -> Result<()>;

    /// Every stored budget.
    async fn budgets(&self) -> Result<Vec<Budget>>;
}

/// A filter over the ledger: a time range and optional service, user and model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LedgerQuery {
    /// Inclusive start.
    pub from: Timestamp,
    /// Exclusive end.
    pub to: Timestamp,
    /// Only this service.
    pub service: Option<String>,
    /// Only this user.
    pub user: Option<String>,
    /// Only this model.
    pub model: Option<String>,
}

impl LedgerQuery {
    /// Every event in `[from, to)`.
    pub fn between(from: Timestamp, to: Timestamp) -> Self {
        LedgerQuery {
            from,
            to,
            service: None,
            user: None,
            model: None,
        }
    }

    /// Only events of `service`.
    pub fn service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Only events of `user`.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Only events of `model`.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// True when `entry` passes the filter.
    pub fn matches(&self, entry: &LedgerEntry) -> bool {
        self.from <= entry.at
            && entry.at < self.to
            && self.service.as_ref().is_none_or(|s| *s == entry.service)
            && self.user.as_ref().is_none_or(|u| *u == entry.user)
            && self.model.as_ref().is_none_or(|m| *m == entry.model)
    }
}

/// Sums over a set of events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Totals {
    /// What they cost, in micro-dollars.
    pub cost: MicroUsd,
    /// What caches and dedup saved, in micro-dollars.
    pub saved: MicroUsd,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Other units.
    pub units: u64,
    /// Events.
    pub requests: u64,
    /// Events whose model had no price.
    pub unpriced_requests: u64,
}

impl Totals {
    /// Adds one entry.
    pub fn add(&mut self, entry: &LedgerEntry) {
        self.cost += entry.cost;
        self.saved += entry.saved;
        self.input_tokens = self.input_tokens.saturating_add(entry.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(entry.output_tokens);
        self.units = self.units.saturating_add(entry.units);
        self.requests += 1;
        self.unpriced_requests += u64::from(!entry.priced);
    }
}

/// The totals of one service, user or model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GroupTotals {
    /// The service, user or model.
    pub key: String,
    /// Its sums.
    #[serde(flatten)]
    pub totals: Totals,
}

/// Totals of a query, and breakdowns by service, user and model, each sorted by cost
/// (highest first, then by key).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LedgerSummary {
    /// Everything.
    pub totals: Totals,
    /// Per service.
    pub by_service: Vec<GroupTotals>,
    /// Per user.
    pub by_user: Vec<GroupTotals>,
    /// Per model.
    pub by_model: Vec<GroupTotals>,
}

impl LedgerSummary {
    /// Sorts every breakdown by cost, highest first, then by key.
    pub fn sort(&mut self) {
        for groups in [&mut self.by_service, &mut self.by_user, &mut self.by_model] {
            groups.sort_by(|a, b| b.totals.cost.cmp(&a.totals.cost).then(a.key.cmp(&b.key)));
        }
    }
}

/// Which column a bucket series is grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    /// Per service.
    Service,
    /// Per user.
    User,
}

/// The width of a time bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BucketWidth {
    /// An hour (UTC-aligned).
    Hour,
    /// A calendar day in the meter's time zone.
    Day,
}

/// The cost of one service or user in one time bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketTotal {
    /// The service or user.
    pub key: String,
    /// The bucket's start.
    pub bucket: Timestamp,
    /// What it spent in the bucket.
    pub cost: MicroUsd,
}

/// The durable, append-only record of every priced event, idempotent by request id.
///
/// [`MemoryLedger`](super::MemoryLedger) keeps it in the process;
/// [`PgLedger`](super::PgLedger) in a Postgres table, with reports computed in SQL.
#[async_trait]
pub trait Ledger: Send + Sync + Debug {
    /// Appends an entry. False (and nothing written) when its request id is already there.
    async fn append(&self, entry: &LedgerEntry) -> Result<bool>;

    /// Totals and breakdowns of the events the query selects.
    async fn summarize(&self, query: &LedgerQuery) -> Result<LedgerSummary>;

    /// The cost per service or user per bucket, for the events the query selects; buckets
    /// with no cost are left out. `tz` is the IANA zone day buckets are aligned to.
    async fn buckets(
        &self,
        query: &LedgerQuery,
        by: Dimension,
        width: BucketWidth,
        tz: &str,
    ) -> Result<Vec<BucketTotal>>;

    /// The selected events in time order, as a stream (for CSV export).
    fn entries(&self, query: &LedgerQuery) -> BoxStream<'static, Result<LedgerEntry>>;
}
