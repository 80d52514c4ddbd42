//! [`CircuitBreaker`]: closed, open, half-open. The closed state's bookkeeping is a few relaxed
//! atomics, so it costs nothing noticeable on a hot path.

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// When a breaker opens and how it recovers. Durations deserialize from milliseconds or
/// strings like `"5s"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. Default 5.
    pub consecutive_failures: u32,
    /// Failure rate within a window that opens the breaker, from 0 to 1. Default 0.5.
    pub failure_rate: f64,
    /// Fewest calls in a window before its failure rate counts. Default 20.
    pub min_calls: u32,
    /// Length of the failure-rate window. Default 10 s.
    #[serde(with = "crate::serde_duration")]
    pub window: Duration,
    /// How long an open breaker skips calls before it lets probes through. Default 5 s.
    #[serde(with = "crate::serde_duration")]
    pub cool_down: Duration,
    /// Up to this fraction of the cool-down is added at random, so instances that failed
    /// together do not all probe at once. Default 0.2.
    pub jitter: f64,
    /// Calls let through at once while half-open; one success closes the breaker, one failure
    /// opens it again. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_calls: 20,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(5),
            jitter: 0.2,
            half_open_probes: 1,
        }
    }
}

/// The state of a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are skipped until the cool-down ends.
    Open,
    /// A few probe calls go through; their outcome closes or reopens the breaker.
    HalfOpen,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// A snapshot of a breaker, for health endpoints.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct BreakerStats {
    /// What it guards, such as `"redis"`.
    pub name: String,
    /// The current state.
    pub state: BreakerState,
    /// Times it has opened.
    pub opened: u64,
    /// Calls it skipped while open.
    pub rejected: u64,
    /// Failures recorded.
    pub failures: u64,
}

/// Leave to make one call, from [`CircuitBreaker::allow`]; hand it back to
/// [`CircuitBreaker::record`] with the outcome.
#[derive(Clone, Copy, Debug)]
#[must_use = "record the call's outcome with CircuitBreaker::record"]
pub struct Admission {
    probe: bool,
}

/// A circuit breaker. Ask [`allow`](Self::allow) before a call and report the outcome with
/// [`record`](Self::record); while it is open, skip the call and use a fallback.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: String,
    config: BreakerConfig,
    base: Instant,
    state: AtomicU8,
    consecutive: AtomicU32,
    window_start_ms: AtomicU64,
    window_calls: AtomicU32,
    window_failures: AtomicU32,
    open_until_ms: AtomicU64,
    probes: AtomicU32,
    /// When the last probe was let through.
    probe_started_ms: AtomicU64,
    opened: AtomicU64,
    rejected: AtomicU64,
    failures: AtomicU64,
}

impl CircuitBreaker {
    /// A closed breaker guarding `name`.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Self {
        CircuitBreaker {
            name: name.into(),
            config,
            base: Instant::now(),
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(0),
            window_calls: AtomicU32::new(0),
            window_failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probes: AtomicU32::new(0),
            probe_started_ms: AtomicU64::new(0),
            opened: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64
    }

    /// Leave for a call now, or `None` while the breaker is open (or half-open with its probes
    /// out).
    pub fn allow(&self) -> Option<Admission> {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Some(Admission { probe: false }),
            OPEN if self.now_ms() >= self.open_until_ms.load(Ordering::Acquire) => {
                // The cool-down is over: one caller moves it to half-open.
                let _ = self.state.compare_exchange(
                    OPEN,
                    HALF_OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                self.try_probe()
            }
            OPEN => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => self.try_probe(),
        }
    }

    fn try_probe(&self) -> Option<Admission> {
        let now = self.now_ms();
        // A probe whose caller was cancelled never reports: after a cool-down's length (at
        // least a second) its slot is given back, so the breaker cannot stay half-open.
        let lease = (self.config.cool_down.as_millis() as u64).max(1_000);
        if self.probes.load(Ordering::Acquire) >= self.config.half_open_probes.max(1)
            && now.saturating_sub(self.probe_started_ms.load(Ordering::Acquire)) >= lease
        {
            self.probes.store(0, Ordering::Release);
        }
        let taken = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p < self.config.half_open_probes.max(1)).then_some(p + 1)
            })
            .is_ok();
        if !taken {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.probe_started_ms.store(now, Ordering::Release);
        Some(Admission { probe: true })
    }

    /// Records the outcome of a call that [`allow`](Self::allow) let through.
    pub fn record(&self, admission: Admission, success: bool) {
        if !success {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if admission.probe {
            // Saturating: a late probe may report after its slot was given back.
            let _ = self
                .probes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
            if success {
                self.close();
            } else {
                self.open();
            }
            return;
        }
        if self.state.load(Ordering::Acquire) != CLOSED {
            // A call let through before the breaker opened: too late to count.
            return;
        }
        let now = self.now_ms();
        let window_ms = self.config.window.as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= window_ms
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.window_calls.store(0, Ordering::Relaxed);
            self.window_failures.store(0, Ordering::Relaxed);
        }
        let calls = self.window_calls.fetch_add(1, Ordering::Relaxed) + 1;
        if success {
            self.consecutive.store(0, Ordering::Relaxed);
            return;
        }
        let failures = self.window_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let rate_exceeded = calls >= self.config.min_calls
            && failures as f64 / calls as f64 >= self.config.failure_rate;
        if consecutive >= self.config.consecutive_failures || rate_exceeded {
            self.open();
        }
    }

    fn open(&self) {
        let cool_down = self.config.cool_down.as_millis() as u64;
        let jitter = (cool_down as f64
            * self.config.jitter.clamp(0.0, 1.0)
            * crate::random::random_fraction()) as u64;
        self.open_until_ms
            .store(self.now_ms() + cool_down + jitter, Ordering::Release);
        if self.state.swap(OPEN, Ordering::AcqRel) != OPEN {
            self.opened.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(breaker = %self.name, cool_down_ms = cool_down + jitter, "circuit breaker opened");
        }
    }

    fn close(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.window_calls.store(0, Ordering::Relaxed);
        self.window_failures.store(0, Ordering::Relaxed);
        if self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED {
            tracing::info!(breaker = %self.name, "circuit breaker closed");
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            CLOSED => BreakerState::Closed,
            OPEN => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }

    /// Time left in the current cool-down (zero unless open).
    pub fn retry_in(&self) -> Duration {
        if self.state.load(Ordering::Acquire) != OPEN {
            return Duration::ZERO;
        }
        let until = self.open_until_ms.load(Ordering::Acquire);
        Duration::from_millis(until.saturating_sub(self.now_ms()))
    }

    /// A snapshot for health endpoints.
    pub fn stats(&self) -> BreakerStats {
        BreakerStats {
            name: self.name.clone(),
            state: self.state(),
            opened: self.opened.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_calls: 10,
            window: Duration::from_secs(10),
            cool_down: Duration::from_secs(5),
            jitter: 0.0,
            half_open_probes: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_then_probes_after_the_cool_down() {
        let breaker = CircuitBreaker::new("redis", config());
        let late = breaker.allow().unwrap();
        for _ in 0..2 {
            breaker.record(breaker.allow().unwrap(), false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.record(breaker.allow().unwrap(), false);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.allow().is_none(), "open: calls are skipped");
        // A call let through before it opened reports late: no effect on the state.
        breaker.record(late, true);
        assert_eq!(breaker.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert!(breaker.allow().is_none());
        tokio::time::advance(Duration::from_millis(200)).await;
        let probe = breaker.allow().expect("the cool-down is over: one probe");
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.allow().is_none(), "only one probe at a time");
        breaker.record(probe, false);
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed probe reopens it"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        let probe = breaker.allow().unwrap();
        breaker.record(probe, true);
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "a good probe closes it"
        );
        let stats = breaker.stats();
        assert_eq!((stats.opened, stats.failures), (2, 4));
        assert!(stats.rejected >= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_gives_its_slot_back_after_a_cool_down() {
        let breaker = CircuitBreaker::new("openai", config());
        for _ in 0..3 {
            breaker.record(breaker.allow().unwrap(), false);
        }
        tokio::time::advance(Duration::from_millis(5_100)).await;
        // The probe's caller goes away before recording its outcome.
        let _cancelled = breaker.allow().expect("a probe");
        assert!(breaker.allow().is_none(), "the slot is still taken");
        tokio::time::advance(Duration::from_millis(5_100)).await;
        let probe = breaker.allow().expect("the slot came back");
        breaker.record(probe, true);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_past_the_failure_rate_even_without_a_streak() {
        let breaker = CircuitBreaker::new("redis", config());
        // Alternating outcomes: never three failures in a row, but half of all calls fail.
        for i in 0..9 {
            breaker.record(breaker.allow().unwrap(), i % 2 == 0);
        }
        assert_eq!(
            breaker.state(),
            BreakerState::Closed,
            "below min_calls the rate does not count"
        );
        breaker.record(breaker.allow().unwrap(), false);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_old_failures() {
        let breaker = CircuitBreaker::new("redis", config());
        for i in 0..9 {
            breaker.record(breaker.allow().unwrap(), i % 2 == 0);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        breaker.record(breaker.allow().unwrap(), false);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_lengthens_the_cool_down_within_its_bound() {
        let mut config = config();
        config.jitter = 0.5;
        let breaker = CircuitBreaker::new("redis", config);
        for _ in 0..3 {
            breaker.record(breaker.allow().unwrap(), false);
        }
        let retry_in = breaker.retry_in();
        assert!(
            retry_in >= Duration::from_secs(5) && retry_in <= Duration::from_millis(7_500),
            "{retry_in:?}"
        );
    }
}
