//! The in-process cost stores: exact, for tests, the quickstart and single-process hosts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, BoxStream, StreamExt};
use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::budget::{Budget, resolve_time_zone};
use super::event::LedgerEntry;
use super::store::{
    Booked, Booking, BucketTotal, BucketWidth, BudgetCheck, DEDUP_WINDOW, Dimension, GroupTotals,
    Increment, Ledger, LedgerQuery, LedgerSummary, ReserveOutcome, SpendStore,
};
use crate::error::Result;

/// Counters, reservations, alert claims and budgets in the process, behind one mutex, so each
/// operation is atomic.
pub struct MemorySpendStore {
    state: Mutex<SpendState>,
    clock: Clock,
}

/// Where a store reads the time.
type Clock = std::sync::Arc<dyn Fn() -> Timestamp + Send + Sync>;

impl std::fmt::Debug for MemorySpendStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySpendStore").finish_non_exhaustive()
    }
}

impl Default for MemorySpendStore {
    fn default() -> Self {
        MemorySpendStore::with_clock(Timestamp::now)
    }
}

#[derive(Debug, Default)]
struct SpendState {
    /// Counter key → (micro-dollars, expiry).
    counters: HashMap<String, (i64, Timestamp)>,
    /// Pool key → reservation id → (amount, expiry).
    pools: HashMap<String, HashMap<String, (i64, Timestamp)>>,
    /// Alert key → expiry.
    alerts: HashMap<String, Timestamp>,
    /// Booked request id → expiry.
    booked: HashMap<String, Timestamp>,
    budgets: BTreeMap<String, Budget>,
    /// When expired entries were last swept.
    swept: Option<Timestamp>,
}

impl MemorySpendStore {
    /// An empty store on the wall clock.
    pub fn new() -> Self {
        MemorySpendStore::default()
    }

    /// An empty store whose reservations, alert claims, booked ids and counters expire by
    /// `clock` (the meter's own clock when the meter builds the store).
    pub fn with_clock(clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        MemorySpendStore {
            state: Mutex::new(SpendState::default()),
            clock: std::sync::Arc::new(clock),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SpendState> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the process's counters, so a poisoned lock is reused.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn later(now: Timestamp, ttl: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(ttl)
        .ok()
        .and_then(|d| now.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

impl SpendState {
    /// Drops expired entries, at most once a minute, so the cost stays flat per operation.
    fn sweep(&mut self, now: Timestamp) {
        let due = self
            .swept
            .is_none_or(|at| now.as_second() - at.as_second() >= 60);
        if !due {
            return;
        }
        self.swept = Some(now);
        self.counters.retain(|_, (_, expires)| *expires > now);
        self.alerts.retain(|_, expires| *expires > now);
        self.booked.retain(|_, expires| *expires > now);
        self.pools.retain(|_, pool| {
            pool.retain(|_, (_, expires)| *expires > now);
            !pool.is_empty()
        });
    }

    /// The counter `key` (created at zero), its expiry pushed to at least `expires`.
    fn counter(&mut self, key: &str, expires: Timestamp) -> &mut i64 {
        let counter = self.counters.entry(key.to_owned()).or_insert((0, expires));
        counter.1 = counter.1.max(expires);
        &mut counter.0
    }

    fn apply(&mut self, increments: &[Increment]) {
        for increment in increments {
            let counter = self.counter(&increment.key, increment.expires);
            *counter = counter.saturating_add(increment.amount);
        }
    }

    fn sum(&self, keys: &[String]) -> i64 {
        keys.iter()
            .filter_map(|k| self.counters.get(k))
            .fold(0i64, |acc, (value, _)| acc.saturating_add(*value))
    }

    fn reserved(&mut self, pool: &str, now: Timestamp) -> i64 {
        let Some(pool) = self.pools.get_mut(pool) else {
            return 0;
        };
        pool.retain(|_, (_, expires)| *expires > now);
        pool.values()
            .fold(0i64, |acc, (amount, _)| acc.saturating_add(*amount))
    }

    fn drop_reservation(&mut self, id: &str, pools: &[String], now: Timestamp) -> bool {
        let mut held = false;
        for pool in pools {
            if let Some(entries) = self.pools.get_mut(pool)
                && let Some((_, expires)) = entries.remove(id)
            {
                held |= expires > now;
            }
        }
        held
    }
}

#[async_trait]
impl SpendStore for MemorySpendStore {
    async fn book(&self, booking: &Booking<'_>) -> Result<Booked> {
        let now = (self.clock)();
        let mut state = self.lock();
        state.sweep(now);
        let held = match booking.reservation {
            Some((id, pools)) => state.drop_reservation(id, pools, now),
            None => false,
        };
        let counted = match state.booked.get(booking.request_id) {
            Some(expires) if *expires > now => false,
            _ => {
                state
                    .booked
                    .insert(booking.request_id.to_owned(), later(now, DEDUP_WINDOW));
                true
            }
        };
        if counted {
            state.apply(booking.increments);
        }
        Ok(Booked {
            counted,
            held,
            sums: booking.watch.iter().map(|keys| state.sum(keys)).collect(),
            fresh: false,
        })
    }

    async fn reserve(
        &self,
        id: &str,
        amount: i64,
        ttl: Duration,
        checks: &[BudgetCheck],
    ) -> Result<ReserveOutcome> {
        let now = (self.clock)();
        let mut state = self.lock();
        for (index, check) in checks.iter().enumerate() {
            let spent = state.sum(&check.counters);
            let reserved = state.reserved(&check.pool, now);
            if spent.saturating_add(reserved).saturating_add(amount) > check.limit {
                return Ok(ReserveOutcome::Denied {
                    check: index,
                    spent,
                    reserved,
                });
            }
        }
        let expires = later(now, ttl);
        for check in checks {
            state
                .pools
                .entry(check.pool.clone())
                .or_default()
                .insert(id.to_owned(), (amount, expires));
        }
        Ok(ReserveOutcome::Granted)
    }

    async fn release(&self, id: &str, pools: &[String]) -> Result<bool> {
        Ok(self.lock().drop_reservation(id, pools, (self.clock)()))
    }

    async fn read(&self, groups: &[Vec<String>], pools: &[String]) -> Result<(Vec<i64>, Vec<i64>)> {
        let now = (self.clock)();
        let mut state = self.lock();
        let sums = groups.iter().map(|keys| state.sum(keys)).collect();
        let reserved = pools.iter().map(|p| state.reserved(p, now)).collect();
        Ok((sums, reserved))
    }

    async fn raise(&self, values: &[Increment]) -> Result<()> {
        let mut state = self.lock();
        for value in values {
            let counter = state.counter(&value.key, value.expires);
            *counter = (*counter).max(value.amount);
        }
        Ok(())
    }

    async fn claim_alert(&self, key: &str, ttl: Duration) -> Result<bool> {
        let now = (self.clock)();
        let mut state = self.lock();
        match state.alerts.get(key) {
            Some(expires) if *expires > now => Ok(false),
            _ => {
                state.alerts.insert(key.to_owned(), later(now, ttl));
                Ok(true)
            }
        }
    }

    async fn save_budget(&self, key: &str, budget: &Budget) -> Result<()> {
        self.lock().budgets.insert(key.to_owned(), budget.clone());
        Ok(())
    }

    async fn restore_budget(&self, key: &str, budget: &Budget) -> Result<()> {
        self.lock()
            .budgets
            .entry(key.to_owned())
            .or_insert_with(|| budget.clone());
        Ok(())
    }

    async fn budgets(&self) -> Result<Vec<Budget>> {
        Ok(self.lock().budgets.values().cloned().collect())
    }
}

/// The ledger in the process: every entry in time order, with an index of request ids.
/// [`entries`](Ledger::entries) copies the selection before streaming it.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    state: RwLock<LedgerState>,
}

#[derive(Debug, Default)]
struct LedgerState {
    entries: Vec<LedgerEntry>,
    ids: HashSet<String>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        MemoryLedger::default()
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// True when it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, LedgerState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The selected entries, in time order.
    fn select(&self, query: &LedgerQuery) -> Vec<LedgerEntry> {
        let state = self.read();
        let start = state.entries.partition_point(|e| e.at < query.from);
        state.entries[start..]
            .iter()
            .take_while(|e| e.at < query.to)
            .filter(|e| query.matches(e))
            .cloned()
            .collect()
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn append(&self, entry: &LedgerEntry) -> Result<bool> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if !state.ids.insert(entry.request_id.clone()) {
            return Ok(false);
        }
        // Keep time order; events mostly arrive in order, so this is a push.
        let at = state.entries.partition_point(|e| e.at <= entry.at);
        state.entries.insert(at, entry.clone());
        Ok(true)
    }

    async fn summarize(&self, query: &LedgerQuery) -> Result<LedgerSummary> {
        let mut summary = LedgerSummary::default();
        let mut groups: [HashMap<String, GroupTotals>; 3] = Default::default();
        let state = self.read();
        let start = state.entries.partition_point(|e| e.at < query.from);
        for entry in state.entries[start..]
            .iter()
            .take_while(|e| e.at < query.to)
            .filter(|e| query.matches(e))
        {
            summary.totals.add(entry);
            for (map, key) in groups
                .iter_mut()
                .zip([&entry.service, &entry.user, &entry.model])
            {
                map.entry(key.clone())
                    .or_insert_with(|| GroupTotals {
                        key: key.clone(),
                        totals: Default::default(),
                    })
                    .totals
                    .add(entry);
            }
        }
        let [services, users, models] = groups;
        summary.by_service = services.into_values().collect();
        summary.by_user = users.into_values().collect();
        summary.by_model = models.into_values().collect();
        summary.sort();
        Ok(summary)
    }

    async fn buckets(
        &self,
        query: &LedgerQuery,
        by: Dimension,
        width: BucketWidth,
        tz: &str,
    ) -> Result<Vec<BucketTotal>> {
        let tz = resolve_time_zone(tz)?;
        let mut totals: BTreeMap<(String, Timestamp), i64> = BTreeMap::new();
        for entry in self.select(query) {
            if entry.cost.micros() == 0 {
                continue;
            }
            let key = match by {
                Dimension::Service => entry.service,
                Dimension::User => entry.user,
            };
            let bucket = bucket_start(entry.at, width, &tz);
            let total = totals.entry((key, bucket)).or_default();
            *total = total.saturating_add(entry.cost.micros());
        }
        Ok(totals
            .into_iter()
            .map(|((key, bucket), cost)| BucketTotal {
                key,
                bucket,
                cost: super::MicroUsd::from_micros(cost),
            })
            .collect())
    }

    fn entries(&self, query: &LedgerQuery) -> BoxStream<'static, Result<LedgerEntry>> {
        stream::iter(self.select(query).into_iter().map(Ok)).boxed()
    }
}

/// The start of the bucket that contains `at`: the UTC hour, or the day in `tz`.
pub(crate) fn bucket_start(at: Timestamp, width: BucketWidth, tz: &TimeZone) -> Timestamp {
    match width {
        BucketWidth::Hour => {
            Timestamp::from_second(at.as_second().div_euclid(3600) * 3600).unwrap_or(at)
        }
        BucketWidth::Day => at
            .to_zoned(tz.clone())
            .start_of_day()
            .map(|z| z.timestamp())
            .unwrap_or(at),
    }
}
