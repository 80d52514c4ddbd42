//! The monitor: request latency and errors in a sliding window of per-second buckets, cache
//! hit rates per tier sampled every second, cost by service, and the alert rules evaluated
//! over the window.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::histogram::LatencyHistogram;
use crate::cache::CacheStats;
use crate::cost::{
    Alert, AlertKind, AlertSink, CostMeter, Dimension, MicroUsd, ReportPeriod, TracingSink,
};
use crate::error::{Error, Result};

/// The conditions that raise an alert, with the report's defaults. Each is evaluated over the
/// monitor's window; an alert is sent once when its condition starts to hold, and again only
/// after it has cleared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct AlertRules {
    /// p95 request latency above this. Default 500 ms.
    #[serde(with = "crate::serde_duration")]
    pub p95_latency: Duration,
    /// Failed requests (5xx, or `error` when recorded by hand) over all requests above this.
    /// Default 0.01 (1%).
    pub error_rate: f64,
    /// A cache's hit rate (lookups answered by any tier) below this. Default 0.80.
    pub cache_hit_rate: f64,
    /// Alert on the cost meter's anomalies: a user or service over its anomaly factor (2x by
    /// default) times its trailing average. Default true.
    pub cost_anomalies: bool,
    /// The fewest requests in the window before latency and error rules are judged. Default 20.
    pub min_requests: u64,
    /// The fewest lookups of a cache in the window before its hit rate is judged. Default 100.
    pub min_cache_lookups: u64,
}

impl Default for AlertRules {
    fn default() -> Self {
        AlertRules {
            p95_latency: Duration::from_millis(500),
            error_rate: 0.01,
            cache_hit_rate: 0.80,
            cost_anomalies: true,
            min_requests: 20,
            min_cache_lookups: 100,
        }
    }
}

/// How the monitor keeps its figures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct MonitorConfig {
    /// The width of one point of the time series. Default 1 s.
    #[serde(with = "crate::serde_duration")]
    pub resolution: Duration,
    /// How far back the time series go (the dashboard's span). Default 15 min.
    #[serde(with = "crate::serde_duration")]
    pub history: Duration,
    /// The sliding window the alert rules judge. Default 5 min.
    #[serde(with = "crate::serde_duration")]
    pub window: Duration,
    /// How often the rules are evaluated (and cost figures refreshed). Default 10 s.
    #[serde(with = "crate::serde_duration")]
    pub evaluate_every: Duration,
    /// The alert rules.
    pub rules: AlertRules,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            resolution: Duration::from_secs(1),
            history: Duration::from_secs(15 * 60),
            window: Duration::from_secs(5 * 60),
            evaluate_every: Duration::from_secs(10),
            rules: AlertRules::default(),
        }
    }
}

impl MonitorConfig {
    /// With another point width.
    pub fn resolution(mut self, resolution: Duration) -> Self {
        self.resolution = resolution;
        self
    }

    /// With another span kept for the time series.
    pub fn history(mut self, history: Duration) -> Self {
        self.history = history;
        self
    }

    /// With another window for the rules.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// With other alert rules.
    pub fn rules(mut self, rules: AlertRules) -> Self {
        self.rules = rules;
        self
    }

    /// Checks the settings, naming the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.resolution < Duration::from_millis(10) {
            return Err(Error::invalid(
                "monitor resolution",
                format!("{:?} is under 10 ms", self.resolution),
            ));
        }
        let points = self.history.as_secs_f64() / self.resolution.as_secs_f64();
        if !(1.0..=100_000.0).contains(&points) || self.window > self.history {
            return Err(Error::invalid(
                "monitor history",
                format!(
                    "history {:?} must hold 1 to 100000 points of {:?} and the window {:?}",
                    self.history, self.resolution, self.window
                ),
            ));
        }
        if self.window.is_zero() || self.evaluate_every.is_zero() {
            return Err(Error::invalid(
                "monitor window",
                "window and evaluate_every must be above zero",
            ));
        }
        let rules = &self.rules;
        if !(0.0..=1.0).contains(&rules.error_rate) || !(0.0..=1.0).contains(&rules.cache_hit_rate)
        {
            return Err(Error::invalid(
                "alert rules",
                format!(
                    "error_rate {} and cache_hit_rate {} must be between 0 and 1",
                    rules.error_rate, rules.cache_hit_rate
                ),
            ));
        }
        Ok(())
    }
}

/// Requests in one time slot.
#[derive(Default)]
struct Slot {
    index: u64,
    requests: u64,
    errors: u64,
    latency: LatencyHistogram,
}

/// One cache's counters in one time slot.
#[derive(Clone, Debug, Default)]
struct CacheSlot {
    index: u64,
    hits: u64,
    lookups: u64,
    /// Per tier, in the cache's order: (hits, hits + misses).
    tiers: Vec<(u64, u64)>,
}

struct WatchedCache {
    name: String,
    stats: Box<dyn Fn() -> CacheStats + Send + Sync>,
    last: Option<CacheStats>,
    tier_names: Vec<String>,
    slots: VecDeque<CacheSlot>,
}

/// One point of the request series.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RequestPoint {
    /// The start of the slot.
    pub at: Timestamp,
    /// Requests finished in it.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles, ms (0 when there were no requests).
    pub p50_ms: f64,
    /// p95, ms.
    pub p95_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
}

/// Requests over a span.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RequestSummary {
    /// The span, in seconds.
    pub seconds: f64,
    /// Requests finished in it.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// errors / requests (0 when idle).
    pub error_rate: f64,
    /// Requests per second.
    pub rps: f64,
    /// p50, ms.
    pub p50_ms: f64,
    /// p95, ms.
    pub p95_ms: f64,
    /// p99, ms.
    pub p99_ms: f64,
    /// The slowest, ms.
    pub max_ms: f64,
}

/// One tier of a cache over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct TierWindow {
    /// The tier (`l0`, `hot`, ...).
    pub name: String,
    /// Reads it answered.
    pub hits: u64,
    /// Reads that looked in it.
    pub reads: u64,
    /// hits / reads (0 when idle).
    pub hit_rate: f64,
}

/// A cache over the window, and its hit rate over time.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CacheWindow {
    /// The cache's name.
    pub name: String,
    /// Lookups answered by any tier, over lookups, in the window (0 when idle).
    pub hit_rate: f64,
    /// Lookups in the window.
    pub lookups: u64,
    /// Per tier, L0 first.
    pub tiers: Vec<TierWindow>,
    /// The hit rate per slot: (slot start, hit rate or `None` when idle).
    pub series: Vec<(Timestamp, Option<f64>)>,
}

/// Today's cost of one service.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ServiceCost {
    /// The service.
    pub service: String,
    /// Its cost today, micro-dollars.
    pub cost: MicroUsd,
    /// Its priced requests today.
    pub requests: u64,
}

/// Everything the dashboard shows: what `GET /api/metrics` returns.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// When it was taken.
    pub at: Timestamp,
    /// The width of one point, ms.
    pub resolution_ms: u64,
    /// The requests in the rules' window.
    pub window: RequestSummary,
    /// The request series, oldest first (the current, unfinished slot left out).
    pub requests: Vec<RequestPoint>,
    /// The watched caches.
    pub caches: Vec<CacheWindow>,
    /// Today's cost by service, highest first (empty without a meter).
    pub cost_by_service: Vec<ServiceCost>,
    /// The alerts whose condition holds now.
    pub active_alerts: Vec<Alert>,
}

/// Watches a host: call [`record`](Self::record) per request (or wrap the router in its
/// `MonitorLayer`, feature `axum`), [`watch_cache`](Self::watch_cache) and
/// [`watch_cost`](Self::watch_cost) what it should sample, and [`spawn`](Self::spawn) its
/// ticker. It keeps per-second figures for the dashboard and sends alerts through its sinks.
pub struct Monitor {
    config: MonitorConfig,
    started: Instant,
    started_at: Timestamp,
    requests: Mutex<VecDeque<Slot>>,
    caches: Mutex<Vec<WatchedCache>>,
    meter: Mutex<Option<Arc<dyn CostMeter>>>,
    costs: Mutex<Vec<ServiceCost>>,
    sinks: Mutex<Vec<Arc<dyn AlertSink>>>,
    active: Mutex<HashMap<String, Alert>>,
}

impl fmt::Debug for Monitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Monitor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl Monitor {
    /// A monitor with `config`; alerts go to a [`TracingSink`] until
    /// [`alert_sink`](Self::alert_sink) adds others.
    pub fn new(config: MonitorConfig) -> Result<Arc<Self>> {
        config.validate()?;
        Ok(Arc::new(Monitor {
            config,
            started: Instant::now(),
            started_at: Timestamp::now(),
            requests: Mutex::new(VecDeque::new()),
            caches: Mutex::new(Vec::new()),
            meter: Mutex::new(None),
            costs: Mutex::new(Vec::new()),
            sinks: Mutex::new(vec![Arc::new(TracingSink)]),
            active: Mutex::new(HashMap::new()),
        }))
    }

    /// The settings.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    /// Sends alerts to `sink` too (for example the cost meter's webhook).
    pub fn alert_sink(&self, sink: Arc<dyn AlertSink>) {
        lock(&self.sinks).push(sink);
    }

    /// Samples `stats` every slot: the cache's hit rate per tier goes to the dashboard and to
    /// the hit-rate rule. `stats` is usually `move || cache.stats()`.
    pub fn watch_cache(&self, stats: impl Fn() -> CacheStats + Send + Sync + 'static) {
        let first = stats();
        lock(&self.caches).push(WatchedCache {
            name: first.name.clone(),
            tier_names: first.tiers.iter().map(|t| t.name.clone()).collect(),
            stats: Box::new(stats),
            last: Some(first),
            slots: VecDeque::new(),
        });
    }

    /// Reads today's cost by service, and the meter's anomalies for the cost rule, at every
    /// evaluation.
    pub fn watch_cost(&self, meter: Arc<dyn CostMeter>) {
        *lock(&self.meter) = Some(meter);
    }

    fn slot_index(&self, at: Instant) -> u64 {
        (at.duration_since(self.started).as_nanos() / self.config.resolution.as_nanos().max(1))
            as u64
    }

    fn slot_start(&self, index: u64) -> Timestamp {
        let nanos = self
            .config
            .resolution
            .as_nanos()
            .saturating_mul(u128::from(index));
        let offset = SignedDuration::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
        self.started_at
            .checked_add(offset)
            .unwrap_or(self.started_at)
    }

    fn slots_kept(&self) -> u64 {
        (self.config.history.as_nanos() / self.config.resolution.as_nanos().max(1)) as u64 + 1
    }

    /// Records one finished request.
    pub fn record(&self, latency: Duration, error: bool) {
        let mut slots = lock(&self.requests);
        // Read under the lock, so slots are pushed in order.
        let index = self.slot_index(Instant::now());
        if slots.back().is_none_or(|s| s.index != index) {
            slots.push_back(Slot {
                index,
                ..Slot::default()
            });
            let oldest = index.saturating_sub(self.slots_kept());
            while slots.front().is_some_and(|s| s.index < oldest) {
                slots.pop_front();
            }
        }
        if let Some(slot) = slots.back_mut() {
            slot.requests += 1;
            slot.errors += u64::from(error);
            slot.latency.record(latency);
        }
    }

    /// Samples every watched cache into the current slot. The ticker calls it every slot.
    pub fn sample(&self) {
        let index = self.slot_index(Instant::now());
        let oldest = index.saturating_sub(self.slots_kept());
        for cache in lock(&self.caches).iter_mut() {
            let now = (cache.stats)();
            let slot = match &cache.last {
                Some(last) => CacheSlot {
                    index,
                    hits: now.hits.saturating_sub(last.hits),
                    lookups: now.lookups.saturating_sub(last.lookups),
                    tiers: now
                        .tiers
                        .iter()
                        .zip(&last.tiers)
                        .map(|(n, l)| {
                            let hits = n.hits.saturating_sub(l.hits);
                            let reads = (n.hits + n.misses).saturating_sub(l.hits + l.misses);
                            (hits, reads)
                        })
                        .collect(),
                },
                None => CacheSlot {
                    index,
                    ..CacheSlot::default()
                },
            };
            cache.last = Some(now);
            match cache.slots.back_mut() {
                Some(back) if back.index == index => {
                    back.hits += slot.hits;
                    back.lookups += slot.lookups;
                    for (mine, add) in back.tiers.iter_mut().zip(&slot.tiers) {
                        mine.0 += add.0;
                        mine.1 += add.1;
                    }
                }
                _ => cache.slots.push_back(slot),
            }
            while cache.slots.front().is_some_and(|s| s.index < oldest) {
                cache.slots.pop_front();
            }
        }
    }

    /// The requests of the last `span`, the current slot included.
    pub fn requests_over(&self, span: Duration) -> RequestSummary {
        let now = self.slot_index(Instant::now());
        let from =
            now.saturating_sub((span.as_nanos() / self.config.resolution.as_nanos().max(1)) as u64);
        let mut merged = LatencyHistogram::default();
        let (mut requests, mut errors) = (0, 0);
        for slot in lock(&self.requests).iter().filter(|s| s.index >= from) {
            requests += slot.requests;
            errors += slot.errors;
            merged.merge(&slot.latency);
        }
        let seconds = span
            .as_secs_f64()
            .min(self.started.elapsed().as_secs_f64())
            .max(self.config.resolution.as_secs_f64());
        RequestSummary {
            seconds,
            requests,
            errors,
            error_rate: ratio(errors, requests),
            rps: requests as f64 / seconds,
            p50_ms: merged.quantile_ms(0.50),
            p95_ms: merged.quantile_ms(0.95),
            p99_ms: merged.quantile_ms(0.99),
            max_ms: merged.max_ms(),
        }
    }

    fn cache_windows(&self) -> Vec<CacheWindow> {
        let now = self.slot_index(Instant::now());
        let window_slots =
            (self.config.window.as_nanos() / self.config.resolution.as_nanos().max(1)) as u64;
        let from = now.saturating_sub(window_slots);
        lock(&self.caches)
            .iter()
            .map(|cache| {
                let in_window = cache.slots.iter().filter(|s| s.index >= from);
                let (mut hits, mut lookups) = (0, 0);
                let mut tiers = vec![(0u64, 0u64); cache.tier_names.len()];
                for slot in in_window {
                    hits += slot.hits;
                    lookups += slot.lookups;
                    for (sum, add) in tiers.iter_mut().zip(&slot.tiers) {
                        sum.0 += add.0;
                        sum.1 += add.1;
                    }
                }
                CacheWindow {
                    name: cache.name.clone(),
                    hit_rate: ratio(hits, lookups),
                    lookups,
                    tiers: cache
                        .tier_names
                        .iter()
                        .zip(tiers)
                        .map(|(name, (hits, reads))| TierWindow {
                            name: name.clone(),
                            hits,
                            reads,
                            hit_rate: ratio(hits, reads),
                        })
                        .collect(),
                    series: cache
                        .slots
                        .iter()
                        .filter(|s| s.index < now)
                        .map(|s| {
                            let rate = (s.lookups > 0).then(|| ratio(s.hits, s.lookups));
                            (self.slot_start(s.index), rate)
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// What the dashboard shows.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let now = self.slot_index(Instant::now());
        let seconds = self.config.resolution.as_secs_f64();
        // Every slot of the history up to now, the idle ones as zeros (an outage shows).
        let first = now.saturating_sub(self.slots_kept() - 1);
        let requests = {
            let slots = lock(&self.requests);
            let mut recorded = slots.iter().filter(|s| s.index >= first).peekable();
            (first..now)
                .map(|index| match recorded.next_if(|s| s.index == index) {
                    Some(s) => RequestPoint {
                        at: self.slot_start(index),
                        requests: s.requests,
                        errors: s.errors,
                        rps: s.requests as f64 / seconds,
                        p50_ms: s.latency.quantile_ms(0.50),
                        p95_ms: s.latency.quantile_ms(0.95),
                        p99_ms: s.latency.quantile_ms(0.99),
                    },
                    None => RequestPoint {
                        at: self.slot_start(index),
                        requests: 0,
                        errors: 0,
                        rps: 0.0,
                        p50_ms: 0.0,
                        p95_ms: 0.0,
                        p99_ms: 0.0,
                    },
                })
                .collect()
        };
        let mut active: Vec<Alert> = lock(&self.active).values().cloned().collect();
        active.sort_by_key(|a| a.at);
        MetricsSnapshot {
            at: Timestamp::now(),
            resolution_ms: self.config.resolution.as_millis() as u64,
            window: self.requests_over(self.config.window),
            requests,
            caches: self.cache_windows(),
            cost_by_service: lock(&self.costs).clone(),
            active_alerts: active,
        }
    }

    /// Evaluates every rule, marks the alerts whose condition has just started to hold as
    /// active and returns them, and forgets those that cleared.
    async fn judge(&self) -> Vec<Alert> {
        let now = Timestamp::now();
        let window_start = now
            .checked_sub(
                SignedDuration::try_from(self.config.window).unwrap_or(SignedDuration::ZERO),
            )
            .unwrap_or(now);
        let period = format!("{}s", self.config.window.as_secs());
        let rules = &self.config.rules;
        let mut firing: Vec<(String, Alert)> = Vec::new();
        let alert =
            |kind: AlertKind, entity: String, observed: f64, limit: f64, message: String| Alert {
                kind,
                entity,
                scope: None,
                threshold: None,
                period: period.clone(),
                period_start: window_start,
                spent: MicroUsd::ZERO,
                budget: None,
                percent_used: None,
                projected: None,
                expected: None,
                excess: None,
                observed: Some(observed),
                limit: Some(limit),
                message,
                at: now,
            };

        let window = self.requests_over(self.config.window);
        if window.requests >= rules.min_requests {
            let limit_ms = rules.p95_latency.as_secs_f64() * 1e3;
            if window.p95_ms > limit_ms {
                firing.push((
                    "latency".to_owned(),
                    alert(
                        AlertKind::LatencyHigh,
                        "requests".to_owned(),
                        window.p95_ms,
                        limit_ms,
                        format!(
                            "p95 latency {:.1} ms over the last {period} is above {limit_ms:.0} ms ({} requests)",
                            window.p95_ms, window.requests
                        ),
                    ),
                ));
            }
            if window.error_rate > rules.error_rate {
                firing.push((
                    "errors".to_owned(),
                    alert(
                        AlertKind::ErrorRateHigh,
                        "requests".to_owned(),
                        window.error_rate,
                        rules.error_rate,
                        format!(
                            "{:.2}% of requests failed over the last {period} ({} of {}), above {:.2}%",
                            window.error_rate * 100.0,
                            window.errors,
                            window.requests,
                            rules.error_rate * 100.0
                        ),
                    ),
                ));
            }
        }
        for cache in self.cache_windows() {
            if cache.lookups >= rules.min_cache_lookups && cache.hit_rate < rules.cache_hit_rate {
                firing.push((
                    format!("cache|{}", cache.name),
                    alert(
                        AlertKind::CacheHitRateLow,
                        format!("cache {:?}", cache.name),
                        cache.hit_rate,
                        rules.cache_hit_rate,
                        format!(
                            "cache {:?} answered {:.1}% of {} lookups over the last {period}, under {:.0}%",
                            cache.name,
                            cache.hit_rate * 100.0,
                            cache.lookups,
                            rules.cache_hit_rate * 100.0
                        ),
                    ),
                ));
            }
        }
        // Conditions whose figures could not be read this time keep their state.
        let mut unknown_prefixes: Vec<&str> = Vec::new();
        let meter = lock(&self.meter).clone();
        if let Some(meter) = meter {
            match meter.report(ReportPeriod::Day).await {
                Ok(report) => {
                    *lock(&self.costs) = report
                        .by_service
                        .iter()
                        .map(|g| ServiceCost {
                            service: g.key.clone(),
                            cost: g.totals.cost,
                            requests: g.totals.requests,
                        })
                        .collect();
                }
                Err(error) => tracing::warn!(%error, "the monitor could not read today's costs"),
            }
            if rules.cost_anomalies {
                match meter.anomalies().await {
                    Ok(anomalies) => {
                        for anomaly in anomalies {
                            let who = match anomaly.dimension {
                                Dimension::Service => format!("service {:?}", anomaly.key),
                                Dimension::User => format!("user {:?}", anomaly.key),
                            };
                            let mut raised = alert(
                                AlertKind::Anomaly,
                                who.clone(),
                                anomaly.ratio,
                                0.0,
                                format!(
                                    "{who} spent {} in the {:?} bucket from {}, {:.1}x its trailing average of {}",
                                    anomaly.cost,
                                    anomaly.width,
                                    anomaly.bucket,
                                    anomaly.ratio,
                                    anomaly.expected
                                ),
                            );
                            // The factor is the meter's (`AnomalyConfig`), not this rule's.
                            raised.limit = None;
                            raised.spent = anomaly.cost;
                            raised.expected = Some(anomaly.expected);
                            raised.excess = Some(anomaly.excess);
                            raised.period_start = anomaly.bucket;
                            firing.push((
                                format!("cost|{}|{}", who, anomaly.bucket.as_second()),
                                raised,
                            ));
                        }
                    }
                    Err(error) => {
                        unknown_prefixes.push("cost|");
                        tracing::warn!(%error, "the monitor could not read the cost anomalies")
                    }
                }
            }
        }

        let mut sent = Vec::new();
        {
            let mut active = lock(&self.active);
            let holding: std::collections::HashSet<&String> =
                firing.iter().map(|(key, _)| key).collect();
            active.retain(|key, alert| {
                let keep = holding.contains(key)
                    || unknown_prefixes.iter().any(|prefix| key.starts_with(prefix));
                if !keep {
                    tracing::info!(kind = alert.kind.as_str(), entity = %alert.entity, "alert cleared");
                }
                keep
            });
            for (key, alert) in firing {
                if let std::collections::hash_map::Entry::Vacant(slot) = active.entry(key) {
                    slot.insert(alert.clone());
                    sent.push(alert);
                }
            }
        }
        sent
    }

    /// Sends `alerts` through every sink, one after the other.
    async fn dispatch(sinks: Vec<Arc<dyn AlertSink>>, alerts: &[Alert]) {
        for alert in alerts {
            for sink in &sinks {
                if let Err(error) = sink.send(alert).await {
                    tracing::warn!(%error, kind = alert.kind.as_str(), "an alert sink failed");
                }
            }
        }
    }

    /// Refreshes the cost figures, evaluates every rule now, sends the alerts whose condition
    /// has just started to hold (waiting for the sinks), and forgets those that cleared.
    /// Returns the alerts sent.
    pub async fn evaluate(&self) -> Vec<Alert> {
        let sent = self.judge().await;
        let sinks = lock(&self.sinks).clone();
        Self::dispatch(sinks, &sent).await;
        sent
    }

    /// The alerts whose condition holds now.
    pub fn active_alerts(&self) -> Vec<Alert> {
        lock(&self.active).values().cloned().collect()
    }

    /// Starts the ticker: samples the caches every slot and evaluates the rules every
    /// `evaluate_every`, sending new alerts from a task of their own. It stops when the last
    /// other `Arc` of the monitor is dropped.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let resolution = self.config.resolution;
        let evaluate_every = self.config.evaluate_every;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(resolution);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_evaluation = Instant::now();
            loop {
                ticker.tick().await;
                let Some(monitor) = weak.upgrade() else { break };
                monitor.sample();
                if last_evaluation.elapsed() >= evaluate_every {
                    last_evaluation = Instant::now();
                    let sent = monitor.judge().await;
                    if !sent.is_empty() {
                        // A slow sink (a webhook retrying) must not stop the sampling.
                        let sinks = lock(&monitor.sinks).clone();
                        tokio::spawn(async move { Monitor::dispatch(sinks, &sent).await });
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::MemorySink;

    fn monitor(rules: AlertRules) -> Arc<Monitor> {
        Monitor::new(MonitorConfig::default().rules(rules)).unwrap()
    }

    #[tokio::test]
    async fn slow_requests_raise_one_latency_alert_until_they_clear() {
        let monitor = monitor(AlertRules::default());
        let sink = Arc::new(MemorySink::new());
        monitor.alert_sink(sink.clone());
        for _ in 0..19 {
            monitor.record(Duration::from_millis(900), false);
        }
        assert!(monitor.evaluate().await.is_empty(), "under min_requests");
        for _ in 0..81 {
            monitor.record(Duration::from_millis(900), false);
        }
        let sent = monitor.evaluate().await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].kind, AlertKind::LatencyHigh);
        assert!(sent[0].observed.unwrap() >= 900.0 && sent[0].limit == Some(500.0));
        assert!(
            sent[0].message.contains("p95 latency"),
            "{}",
            sent[0].message
        );
        // Still holding: not sent again.
        assert!(monitor.evaluate().await.is_empty());
        assert_eq!(sink.alerts().len(), 1);
        assert_eq!(monitor.active_alerts().len(), 1);
    }

    #[tokio::test]
    async fn an_alert_clears_and_fires_again_when_its_condition_returns() {
        let mut config = MonitorConfig::default()
            .resolution(Duration::from_millis(10))
            .history(Duration::from_millis(500))
            .window(Duration::from_millis(50));
        config.rules.min_requests = 5;
        let monitor = Monitor::new(config).unwrap();
        for _ in 0..10 {
            monitor.record(Duration::from_millis(1), true);
        }
        let sent = monitor.evaluate().await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].kind, AlertKind::ErrorRateHigh);
        // The window moves past the failures: the condition clears.
        tokio::time::sleep(Duration::from_millis(120)).await;
        for _ in 0..10 {
            monitor.record(Duration::from_millis(1), false);
        }
        assert!(monitor.evaluate().await.is_empty());
        assert!(monitor.active_alerts().is_empty());
        for _ in 0..10 {
            monitor.record(Duration::from_millis(1), true);
        }
        assert_eq!(
            monitor.evaluate().await.len(),
            1,
            "fires again after clearing"
        );
    }

    #[test]
    fn the_window_summary_counts_errors_and_percentiles() {
        let monitor = monitor(AlertRules::default());
        for ms in 1..=100u64 {
            monitor.record(Duration::from_millis(ms), ms > 98);
        }
        let summary = monitor.requests_over(Duration::from_secs(60));
        assert_eq!((summary.requests, summary.errors), (100, 2));
        assert!((summary.error_rate - 0.02).abs() < 1e-9);
        assert!(
            summary.p50_ms >= 50.0 && summary.p50_ms <= 52.0,
            "{summary:?}"
        );
        assert_eq!(summary.max_ms, 100.0);
    }

    #[tokio::test]
    async fn idle_slots_show_as_zeros_in_the_series() {
        let monitor = Monitor::new(
            MonitorConfig::default()
                .resolution(Duration::from_millis(10))
                .history(Duration::from_secs(1))
                .window(Duration::from_millis(500)),
        )
        .unwrap();
        monitor.record(Duration::from_millis(1), false);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let points = monitor.snapshot().requests;
        assert!(points.len() >= 5, "{points:?}");
        assert_eq!(points.iter().map(|p| p.requests).sum::<u64>(), 1);
        assert!(points.iter().filter(|p| p.requests == 0).count() >= 4);
        assert!(points.windows(2).all(|w| w[0].at < w[1].at), "in order");
    }

    #[test]
    fn bad_settings_are_refused() {
        let err = Monitor::new(MonitorConfig::default().resolution(Duration::from_millis(1)))
            .unwrap_err();
        assert!(err.to_string().contains("1ms"), "{err}");
        let mut config = MonitorConfig::default();
        config.rules.error_rate = 2.0;
        assert!(Monitor::new(config).is_err());
    }
}
