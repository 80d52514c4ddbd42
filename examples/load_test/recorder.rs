//! What the run measured: HDR histograms of latency (overall, per scenario, per second),
//! counts, errors, and the per-second timeline.
//!
//! Latency is measured from each request's *intended* start on the schedule to its answer, so
//! time spent waiting for a free virtual user counts (no coordinated omission). The service
//! time (from the actual start) and the schedule lag (intended to actual start) are kept
//! apart, to tell a slow target from a saturated generator.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Scenario;

/// Values in µs, from 1 µs to one hour, 3 significant digits.
pub type Hist = Histogram<u64>;

pub fn new_hist() -> Hist {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// How many error samples are kept in full, and how many distinct messages are counted.
const FIRST_ERRORS: usize = 10;
const DISTINCT_ERRORS: usize = 50;

#[derive(Clone, Debug, Serialize)]
pub struct ErrorSample {
    /// Seconds from the start of the run to the error.
    pub at_s: f64,
    pub scenario: &'static str,
    pub message: String,
}

/// Counts and latency of one scenario.
pub struct ScenarioTally {
    pub ok: u64,
    pub errors: u64,
    pub latency: Hist,
}

/// One closed second of the timeline (the last one may be shorter).
#[derive(Clone, Debug, Serialize)]
pub struct Second {
    /// Start of the interval, in seconds from the start of the run.
    pub t: f64,
    /// Its length in seconds (1 except for the last).
    pub span_s: f64,
    /// The rate the schedule asked for in this interval.
    pub target_rps: f64,
    /// Requests answered (ok or not) in this interval, per second.
    pub achieved_rps: f64,
    pub ok: u64,
    pub errors: u64,
    /// Latency percentiles of the successful requests answered in this interval.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Requests in flight at the end of the interval.
    pub in_flight: u64,
    /// The Postgres pool at the end of the interval, when there is one.
    pub pool_in_use: Option<u64>,
    pub pool_max_size: Option<u64>,
    pub pool_waiters: Option<u64>,
}

pub struct State {
    pub latency: Hist,
    pub service: Hist,
    pub lag: Hist,
    pub ok: u64,
    pub errors: u64,
    pub scenarios: BTreeMap<&'static str, ScenarioTally>,
    pub first_errors: Vec<ErrorSample>,
    pub error_messages: BTreeMap<String, u64>,
    pub timeline: Vec<Second>,
    pub first_answer: Option<Duration>,
    pub last_answer: Option<Duration>,
    interval: Hist,
    /// The interval closed last, kept to fold a short final interval into it.
    previous: Hist,
    interval_ok: u64,
    interval_errors: u64,
    interval_start: Duration,
}

impl State {
    fn new() -> Self {
        State {
            latency: new_hist(),
            service: new_hist(),
            lag: new_hist(),
            ok: 0,
            errors: 0,
            scenarios: BTreeMap::new(),
            first_errors: Vec::new(),
            error_messages: BTreeMap::new(),
            timeline: Vec::new(),
            first_answer: None,
            last_answer: None,
            interval: new_hist(),
            previous: new_hist(),
            interval_ok: 0,
            interval_errors: 0,
            interval_start: Duration::ZERO,
        }
    }
}

pub struct Recorder {
    pub start: Instant,
    state: Mutex<State>,
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Recorder {
            start,
            state: Mutex::new(State::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one answered request.
    pub fn record(
        &self,
        scenario: Scenario,
        intended: Instant,
        started: Instant,
        done: Instant,
        outcome: Result<(), String>,
    ) {
        let latency = micros(done.saturating_duration_since(intended));
        let service = micros(done.saturating_duration_since(started));
        let lag = micros(started.saturating_duration_since(intended));
        let at = done.saturating_duration_since(self.start);
        let mut guard = self.lock();
        let state = &mut *guard;
        state.first_answer.get_or_insert(at);
        state.last_answer = Some(at);
        state.lag.saturating_record(lag);
        let tally = state
            .scenarios
            .entry(scenario.name())
            .or_insert_with(|| ScenarioTally {
                ok: 0,
                errors: 0,
                latency: new_hist(),
            });
        match outcome {
            Ok(()) => {
                tally.ok += 1;
                tally.latency.saturating_record(latency);
                state.ok += 1;
                state.interval_ok += 1;
                state.latency.saturating_record(latency);
                state.service.saturating_record(service);
                state.interval.saturating_record(latency);
            }
            Err(message) => {
                tally.errors += 1;
                state.errors += 1;
                state.interval_errors += 1;
                if state.first_errors.len() < FIRST_ERRORS {
                    state.first_errors.push(ErrorSample {
                        at_s: (at.as_secs_f64() * 1000.0).round() / 1000.0,
                        scenario: scenario.name(),
                        message: message.clone(),
                    });
                }
                let distinct = state.error_messages.len();
                let key =
                    if distinct < DISTINCT_ERRORS || state.error_messages.contains_key(&message) {
                        message
                    } else {
                        "(other messages)".to_owned()
                    };
                *state.error_messages.entry(key).or_insert(0) += 1;
            }
        }
    }

    /// Closes the interval ending now and adds it to the timeline; returns it. With `last`,
    /// an interval shorter than a quarter second is folded into the one before it (a rate
    /// over a few milliseconds says nothing).
    pub fn close_interval(
        &self,
        now: Instant,
        target_rps: impl Fn(f64, f64) -> f64,
        in_flight: u64,
        last: bool,
    ) -> Second {
        let end = now.saturating_duration_since(self.start);
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut start = state.interval_start;
        let (mut ok, mut errors) = (state.interval_ok, state.interval_errors);
        let fold = last
            && end.saturating_sub(start) < Duration::from_millis(250)
            && !state.timeline.is_empty();
        if fold {
            let previous = state.timeline.pop().expect("checked non-empty");
            start = Duration::from_secs_f64(previous.t);
            ok += previous.ok;
            errors += previous.errors;
            let _ = state.previous.add(&state.interval);
            std::mem::swap(&mut state.previous, &mut state.interval);
        }
        let span = end.saturating_sub(start).as_secs_f64().max(1e-3);
        let hist = &state.interval;
        let pct = |q: f64| (!hist.is_empty()).then(|| ms(hist.value_at_quantile(q)));
        let second = Second {
            t: round(start.as_secs_f64(), 3),
            span_s: round(span, 3),
            target_rps: round(target_rps(start.as_secs_f64(), end.as_secs_f64()), 2),
            achieved_rps: round((ok + errors) as f64 / span, 2),
            ok,
            errors,
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            max_ms: (!hist.is_empty()).then(|| ms(hist.max())),
            in_flight,
            pool_in_use: None,
            pool_max_size: None,
            pool_waiters: None,
        };
        std::mem::swap(&mut state.previous, &mut state.interval);
        state.interval.reset();
        state.interval_ok = 0;
        state.interval_errors = 0;
        state.interval_start = end;
        state.timeline.push(second.clone());
        second
    }

    /// Adds a pool sample to the last closed second.
    pub fn pool_sample(&self, in_use: u64, max_size: u64, waiters: u64) {
        let mut state = self.lock();
        if let Some(last) = state.timeline.last_mut() {
            last.pool_in_use = Some(in_use);
            last.pool_max_size = Some(max_size);
            last.pool_waiters = Some(waiters);
        }
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.lock().errors
    }

    /// Everything recorded, once the run is over (the recorder starts afresh).
    pub fn take_state(&self) -> State {
        std::mem::replace(&mut *self.lock(), State::new())
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros().min(u64::MAX as u128) as u64).max(1)
}

/// `x` rounded to `decimals` places (the one rounding every reported figure goes through).
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    let r = (x * scale).round() / scale;
    if r == 0.0 { 0.0 } else { r }
}
