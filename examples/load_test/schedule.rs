//! The arrival schedule: open loop, a linear ramp from 0 to the target rate, then the target.
//!
//! The rate is `r(t) = R·t/T` during the ramp (`T` long) and `R` after it, so the number of
//! arrivals by `t` is `N(t) = R·t²/(2T)` during the ramp and `R·T/2 + R·(t − T)` after it.
//! Request `n` (from 0) is due at `N⁻¹(n)`: the schedule never depends on how fast the target
//! answers, which is what keeps coordinated omission out of the measurements.

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    rate: f64,
    ramp: f64,
    duration: f64,
}

impl Schedule {
    pub fn new(rate: f64, ramp: Duration, duration: Duration) -> Self {
        Schedule {
            rate,
            ramp: ramp.as_secs_f64(),
            duration: duration.as_secs_f64(),
        }
    }

    /// Arrivals due by `t` seconds (fractional), the run's end included.
    pub fn arrivals_by(&self, t: f64) -> f64 {
        let t = t.clamp(0.0, self.duration);
        if t < self.ramp {
            self.rate * t * t / (2.0 * self.ramp)
        } else {
            self.rate * self.ramp / 2.0 + self.rate * (t - self.ramp)
        }
    }

    /// Requests the whole run schedules.
    pub fn total(&self) -> u64 {
        let n = self.arrivals_by(self.duration);
        // Request n is due at N⁻¹(n); those due strictly before the end are sent.
        let whole = n.ceil() as u64;
        if whole > 0 && self.due(whole - 1).is_none() {
            whole - 1
        } else {
            whole
        }
    }

    /// When request `n` is due, from the start; `None` past the end of the run.
    pub fn due(&self, n: u64) -> Option<Duration> {
        let n = n as f64;
        let in_ramp = self.rate * self.ramp / 2.0;
        let t = if n < in_ramp {
            (2.0 * n * self.ramp / self.rate).sqrt()
        } else {
            self.ramp + (n - in_ramp) / self.rate
        };
        (t < self.duration).then(|| Duration::from_secs_f64(t))
    }

    /// The scheduled rate averaged over `[from, to)` seconds.
    pub fn mean_rate(&self, from: f64, to: f64) -> f64 {
        if to <= from {
            return 0.0;
        }
        (self.arrivals_by(to) - self.arrivals_by(from)) / (to - from)
    }
}
