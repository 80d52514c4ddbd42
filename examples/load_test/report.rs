//! The results: one serde structure for the JSON file, the HTML report and the summary on
//! stdout. Every figure is rounded once, here ([`round`]), and turned into text once
//! ([`metric_text`]), so the HTML table shows exactly what the JSON holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::cli::Config;
use crate::inproc::ComponentStats;
use crate::recorder::{ErrorSample, Hist, Second, State, ms, round};

#[derive(Debug, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub started_at: String,
    pub mode: &'static str,
    pub config: Config,
    /// The scenarios that ran (for `mixed`, with their weights).
    pub scenarios_run: BTreeMap<&'static str, u32>,
    /// What was left out or fell back, and why.
    pub notes: Vec<String>,
    pub summary: Summary,
    pub scenarios: BTreeMap<&'static str, ScenarioSummary>,
    pub errors: ErrorReport,
    pub timeline: Vec<Second>,
    pub pool: Option<PoolReport>,
    /// In process: the caches' tiers, the pool, the batcher and the meter, from their stats.
    pub components: Option<ComponentStats>,
    /// Over HTTP: what `/api/health` said.
    pub health: Option<HealthReport>,
}

/// The headline figures. Latencies are of successful requests, from their intended start.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Requests the schedule asked for.
    pub scheduled: u64,
    /// Requests answered (successfully or not).
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    /// errors / requests.
    pub error_rate: f64,
    /// Scheduled requests never sent: no virtual user came free before the drain deadline.
    pub dropped: u64,
    /// From the start to the last answer.
    pub elapsed_s: f64,
    /// requests / elapsed_s.
    pub throughput_rps: f64,
    /// Mean answered rate over the seconds after the ramp-up, within the duration.
    pub steady_rps: Option<f64>,
    pub target_rps: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    /// From the actual start (no waiting for a virtual user).
    pub service_p50_ms: Option<f64>,
    pub service_p99_ms: Option<f64>,
    /// How late requests started against the schedule (waiting for a virtual user, timers).
    pub lag_p99_ms: Option<f64>,
}

/// The order and labels of the summary table; keys not listed here follow, by name.
pub const SUMMARY_LABELS: &[(&str, &str)] = &[
    ("requests", "Requests answered"),
    ("ok", "Successful"),
    ("errors", "Errors"),
    ("error_rate", "Error rate"),
    ("throughput_rps", "Throughput (req/s)"),
    ("steady_rps", "Throughput after ramp-up (req/s)"),
    ("target_rps", "Target (req/s)"),
    ("p50_ms", "Latency p50 (ms)"),
    ("p95_ms", "Latency p95 (ms)"),
    ("p99_ms", "Latency p99 (ms)"),
    ("max_ms", "Latency max (ms)"),
    ("mean_ms", "Latency mean (ms)"),
    ("service_p50_ms", "Service time p50 (ms)"),
    ("service_p99_ms", "Service time p99 (ms)"),
    ("lag_p99_ms", "Start lag p99 (ms)"),
    ("scheduled", "Requests scheduled"),
    ("dropped", "Dropped (never sent)"),
    ("elapsed_s", "Elapsed (s)"),
];

#[derive(Debug, Serialize)]
pub struct ScenarioSummary {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub throughput_rps: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ErrorReport {
    pub count: u64,
    pub rate: f64,
    /// The first few, in order.
    pub first: Vec<ErrorSample>,
    /// Count per message (the first 50 distinct messages; the rest together).
    pub by_message: BTreeMap<String, u64>,
}

/// The Postgres pool, sampled once a second.
#[derive(Debug, Serialize)]
pub struct PoolReport {
    pub samples: u64,
    pub max_size: u64,
    pub in_use_max: u64,
    pub in_use_mean: f64,
    /// in_use / max_size.
    pub utilization_max: f64,
    pub utilization_mean: f64,
    pub waiters_max: u64,
    pub waiters_mean: f64,
}

#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// `components` of `/api/health` after the run (before it, when the end could not be read).
    pub components: Option<Value>,
    pub before: Option<Value>,
    pub after: Option<Value>,
    /// Health reads that failed (they are not request errors).
    pub failures: u64,
    pub last_failure: Option<String>,
}

/// The one way a reported figure becomes text: the JSON's own number formatting.
pub fn metric_text(value: &Value) -> String {
    match value {
        Value::Null => "n/a".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The summary as (key, label, text) rows, in table order.
pub fn summary_rows(summary: &Summary) -> Vec<(String, String, String)> {
    let value = serde_json::to_value(summary).expect("the summary serializes");
    let Value::Object(map) = value else {
        return Vec::new();
    };
    let mut rows: Vec<(String, String, String)> = SUMMARY_LABELS
        .iter()
        .filter_map(|(key, label)| {
            map.get(*key)
                .map(|v| (key.to_string(), label.to_string(), metric_text(v)))
        })
        .collect();
    for (key, v) in &map {
        if !SUMMARY_LABELS.iter().any(|(k, _)| k == key) {
            rows.push((key.clone(), key.clone(), metric_text(v)));
        }
    }
    rows
}

fn pct(hist: &Hist, q: f64) -> Option<f64> {
    (!hist.is_empty()).then(|| round(ms(hist.value_at_quantile(q)), 3))
}

fn max(hist: &Hist) -> Option<f64> {
    (!hist.is_empty()).then(|| round(ms(hist.max()), 3))
}

fn mean(hist: &Hist) -> Option<f64> {
    (!hist.is_empty()).then(|| round(hist.mean() / 1000.0, 3))
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round(part as f64 / whole as f64, 6)
    }
}

/// What the run measured, summed up.
pub struct Measured {
    pub state: State,
    pub scheduled: u64,
    pub dropped: u64,
}

pub fn summarize(
    config: &Config,
    measured: &Measured,
) -> (Summary, BTreeMap<&'static str, ScenarioSummary>) {
    let state = &measured.state;
    let requests = state.ok + state.errors;
    let elapsed = state.last_answer.map_or(0.0, |d| d.as_secs_f64());
    let per_second = |count: u64| {
        if elapsed > 0.0 {
            round(count as f64 / elapsed, 2)
        } else {
            0.0
        }
    };
    let ramp = config.ramp.as_secs_f64();
    let duration = config.duration.as_secs_f64();
    let steady: Vec<&Second> = state
        .timeline
        .iter()
        .filter(|s| s.t >= ramp - 1e-9 && s.t + s.span_s <= duration + 1e-3)
        .collect();
    let steady_rps = (!steady.is_empty()).then(|| {
        let answered: u64 = steady.iter().map(|s| s.ok + s.errors).sum();
        let span: f64 = steady.iter().map(|s| s.span_s).sum();
        round(answered as f64 / span, 2)
    });
    let summary = Summary {
        scheduled: measured.scheduled,
        requests,
        ok: state.ok,
        errors: state.errors,
        error_rate: rate(state.errors, requests),
        dropped: measured.dropped,
        elapsed_s: round(elapsed, 3),
        throughput_rps: per_second(requests),
        steady_rps,
        target_rps: round(config.rps, 2),
        p50_ms: pct(&state.latency, 0.50),
        p95_ms: pct(&state.latency, 0.95),
        p99_ms: pct(&state.latency, 0.99),
        max_ms: max(&state.latency),
        mean_ms: mean(&state.latency),
        service_p50_ms: pct(&state.service, 0.50),
        service_p99_ms: pct(&state.service, 0.99),
        lag_p99_ms: pct(&state.lag, 0.99),
    };
    let scenarios = state
        .scenarios
        .iter()
        .map(|(name, tally)| {
            let requests = tally.ok + tally.errors;
            (
                *name,
                ScenarioSummary {
                    requests,
                    ok: tally.ok,
                    errors: tally.errors,
                    error_rate: rate(tally.errors, requests),
                    throughput_rps: per_second(requests),
                    p50_ms: pct(&tally.latency, 0.50),
                    p95_ms: pct(&tally.latency, 0.95),
                    p99_ms: pct(&tally.latency, 0.99),
                    max_ms: max(&tally.latency),
                    mean_ms: mean(&tally.latency),
                },
            )
        })
        .collect();
    (summary, scenarios)
}

pub fn pool_report(timeline: &[Second]) -> Option<PoolReport> {
    let samples: Vec<(u64, u64, u64)> = timeline
        .iter()
        .filter_map(|s| Some((s.pool_in_use?, s.pool_max_size?, s.pool_waiters?)))
        .collect();
    if samples.is_empty() {
        return None;
    }
    let n = samples.len() as f64;
    let utilization = |(in_use, max, _): &(u64, u64, u64)| {
        if *max == 0 {
            0.0
        } else {
            *in_use as f64 / *max as f64
        }
    };
    Some(PoolReport {
        samples: samples.len() as u64,
        max_size: samples.iter().map(|s| s.1).max().unwrap_or(0),
        in_use_max: samples.iter().map(|s| s.0).max().unwrap_or(0),
        in_use_mean: round(samples.iter().map(|s| s.0 as f64).sum::<f64>() / n, 2),
        utilization_max: round(samples.iter().map(utilization).fold(0.0, f64::max), 4),
        utilization_mean: round(samples.iter().map(utilization).sum::<f64>() / n, 4),
        waiters_max: samples.iter().map(|s| s.2).max().unwrap_or(0),
        waiters_mean: round(samples.iter().map(|s| s.2 as f64).sum::<f64>() / n, 2),
    })
}

/// The final summary for stdout.
pub fn text_summary(report: &Report) -> String {
    let mut out = String::new();
    let c = &report.config;
    let _ = writeln!(
        out,
        "\n== pupkit load test: {} {} for {} s (ramp {} s), {} users, target {} req/s ==",
        report.mode,
        c.scenario.name(),
        c.duration.as_secs_f64(),
        c.ramp.as_secs_f64(),
        c.users,
        c.rps
    );
    if let Some(url) = &c.url {
        let _ = writeln!(out, "target: {url}");
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for (_, label, text) in summary_rows(&report.summary) {
        let _ = writeln!(out, "  {label:<34} {text}");
    }
    if !report.scenarios.is_empty() {
        let _ = writeln!(
            out,
            "\n  {:<11} {:>9} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10}",
            "scenario", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"
        );
        for (name, s) in &report.scenarios {
            let v = |x: Option<f64>| metric_text(&serde_json::to_value(x).unwrap_or(Value::Null));
            let _ = writeln!(
                out,
                "  {:<11} {:>9} {:>7} {:>9} {:>10} {:>10} {:>10} {:>10}",
                name,
                s.requests,
                s.errors,
                s.throughput_rps,
                v(s.p50_ms),
                v(s.p95_ms),
                v(s.p99_ms),
                v(s.max_ms)
            );
        }
    }
    if let Some(components) = &report.components {
        let _ = writeln!(
            out,
            "\n  caches ({} shared tiers):",
            components.cache_backend
        );
        for cache in &components.caches {
            let tiers: Vec<String> = cache
                .tiers
                .iter()
                .filter(|t| t.hits + t.misses > 0)
                .map(|t| {
                    format!(
                        "{} {:.1}% ({}/{})",
                        t.name,
                        t.hit_rate * 100.0,
                        t.hits,
                        t.hits + t.misses
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "    {:<16} hit rate {:.1}%, loader calls {}: {}",
                cache.name,
                cache.hit_rate * 100.0,
                cache.loader_calls,
                tiers.join(", ")
            );
        }
        if let Some(b) = &components.batcher {
            let _ = writeln!(
                out,
                "  batcher: {} texts, {} API calls ({} texts sent), {} cache hits, {} merged duplicates, {} rejected",
                b.requests, b.api_calls, b.texts_sent, b.cache_hits, b.deduped, b.rejected
            );
        }
        if let Some(cost) = &components.cost {
            let _ = writeln!(
                out,
                "  meter: {} events recorded, {} duplicates, {} micro-dollars",
                cost.recorded, cost.duplicates, cost.spent_micros
            );
        }
        if components.messages_posted > 0 {
            let _ = writeln!(
                out,
                "  messages posted (writes through CachedRepo): {}",
                components.messages_posted
            );
        }
    }
    if let Some(pool) = &report.pool {
        let _ = writeln!(
            out,
            "  pool ({} samples): in use max {}/{} (mean {}), utilization max {:.1}% mean {:.1}%, waiters max {} (mean {})",
            pool.samples,
            pool.in_use_max,
            pool.max_size,
            pool.in_use_mean,
            pool.utilization_max * 100.0,
            pool.utilization_mean * 100.0,
            pool.waiters_max,
            pool.waiters_mean
        );
    }
    if let Some(health) = &report.health {
        match &health.components {
            Some(components) => {
                let mut text = components.to_string();
                if text.len() > 1_500 {
                    let mut cut = 1_500;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    text.push_str(" ...");
                }
                let _ = writeln!(out, "  server components (/api/health): {text}");
            }
            None => {
                let _ = writeln!(out, "  /api/health had no \"components\"");
            }
        }
        if health.failures > 0 {
            let _ = writeln!(
                out,
                "  /api/health failed {} times; last: {}",
                health.failures,
                health.last_failure.as_deref().unwrap_or("")
            );
        }
    }
    if report.errors.count > 0 {
        let _ = writeln!(out, "\n  errors by message:");
        let mut by: Vec<_> = report.errors.by_message.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1));
        for (message, count) in by.iter().take(10) {
            let _ = writeln!(out, "    {count:>8}  {message}");
        }
    }
    out
}
