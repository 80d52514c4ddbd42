//! Resilience shared by every backend: a [`CircuitBreaker`] that stops calling a backend that
//! keeps failing, and lets it prove itself again with a few probes after a cool-down, and the
//! [`Backoff`] every retry waits by.

mod backoff;
mod breaker;

pub use backoff::Backoff;

pub use breaker::{Admission, BreakerConfig, BreakerState, BreakerStats, CircuitBreaker};
