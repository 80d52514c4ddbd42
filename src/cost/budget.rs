//! Budgets: who, how much, over which period, enforced how; and the windows periods make.

use std::fmt;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};
use serde::{Deserialize, Serialize};

use super::event::validate_id;
use super::money::MicroUsd;
use crate::error::{Error, Result, excerpt};

/// Whose spending a budget caps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Scope {
    /// Everything the meter records.
    Global,
    /// One service.
    Service(String),
    /// One end user.
    User(String),
}

impl Scope {
    /// The three scopes a usage event by `user` through `service` counts against.
    pub(crate) fn of_event(service: &str, user: &str) -> [Scope; 3] {
        [
            Scope::Global,
            Scope::Service(service.to_owned()),
            Scope::User(user.to_owned()),
        ]
    }

    /// This scope as a fragment of a store key, with the caller's id escaped.
    pub(crate) fn key_fragment(&self) -> String {
        match self {
            Scope::Global => "g".to_owned(),
            Scope::Service(id) => format!("s:{}", escape_key(id)),
            Scope::User(id) => format!("u:{}", escape_key(id)),
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Scope::Global => Ok(()),
            Scope::Service(id) => validate_id("service", id),
            Scope::User(id) => validate_id("user", id),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("global"),
            Scope::Service(id) => write!(f, "service {id:?}"),
            Scope::User(id) => write!(f, "user {id:?}"),
        }
    }
}

/// Percent-escapes every byte outside `[A-Za-z0-9._@-]`, so a caller's id can never forge a
/// key separator or a Redis Cluster hash tag.
pub(crate) fn escape_key(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'@' | b'-') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The period a budget's spend is summed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A calendar day in the budget's time zone.
    Day,
    /// A calendar week, Monday to Sunday, in the budget's time zone.
    Week,
    /// A calendar month in the budget's time zone.
    Month,
    /// The trailing window of this length, ending now.
    Rolling(#[serde(with = "crate::serde_duration")] Duration),
}

/// The shortest and longest rolling window.
const ROLLING_LIMITS: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(366 * 86_400));

/// A rolling window is counted in this many buckets (plus the current one).
pub(crate) const ROLLING_BUCKETS: u64 = 24;

impl Period {
    /// Parses `day`, `week`, `month`, or `rolling` with a length in seconds.
    pub fn parse(name: &str, rolling_secs: Option<u64>) -> Result<Self> {
        match (name, rolling_secs) {
            ("day", _) => Ok(Period::Day),
            ("week", _) => Ok(Period::Week),
            ("month", _) => Ok(Period::Month),
            ("rolling", Some(secs)) => Ok(Period::Rolling(Duration::from_secs(secs))),
            ("rolling", None) => Err(Error::invalid(
                "period",
                "\"rolling\" needs a window length in seconds",
            )),
            (other, _) => Err(Error::invalid(
                "period",
                format!(
                    "{:?} is not one of day, week, month, rolling",
                    excerpt(other)
                ),
            )),
        }
    }

    /// The period's name: `day`, `week`, `month` or `rolling`.
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Rolling(_) => "rolling",
        }
    }

    /// The window of this period that contains `at`, in `tz`.
    pub fn window(self, at: Timestamp, tz: &TimeZone) -> Window {
        match self {
            Period::Rolling(length) => {
                let length = jiff::SignedDuration::try_from(length).unwrap_or_default();
                Window {
                    start: at.checked_sub(length).unwrap_or(Timestamp::MIN),
                    end: at,
                    rolling: true,
                }
            }
            calendar => {
                let zoned = at.to_zoned(tz.clone());
                let (start, end) = calendar_bounds(calendar, &zoned).unwrap_or((at, at));
                Window {
                    start,
                    end,
                    rolling: false,
                }
            }
        }
    }

    fn validate(self) -> Result<()> {
        if let Period::Rolling(length) = self
            && (length < ROLLING_LIMITS.0 || length > ROLLING_LIMITS.1)
        {
            return Err(Error::invalid(
                "period",
                format!("a rolling window of {length:?} is outside 60 s to 366 days"),
            ));
        }
        Ok(())
    }
}

/// Start and end of the calendar day, week or month that contains `zoned`.
fn calendar_bounds(period: Period, zoned: &Zoned) -> Option<(Timestamp, Timestamp)> {
    let day = zoned.date();
    let first = match period {
        Period::Day => day,
        Period::Week => day
            .checked_sub(i64::from(day.weekday().to_monday_zero_offset()).days())
            .ok()?,
        Period::Month => day.first_of_month(),
        Period::Rolling(_) => return None,
    };
    let next = match period {
        Period::Day => first.checked_add(1.day()).ok()?,
        Period::Week => first.checked_add(1.week()).ok()?,
        _ => first.checked_add(1.month()).ok()?,
    };
    let tz = zoned.time_zone().clone();
    let start = first.to_zoned(tz.clone()).ok()?.timestamp();
    let end = next.to_zoned(tz).ok()?.timestamp();
    Some((start, end))
}

/// A span of time spend is summed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Inclusive start.
    pub start: Timestamp,
    /// Exclusive end; for a rolling window, now.
    pub end: Timestamp,
    /// True for a rolling window, which never resets.
    pub rolling: bool,
}

impl Window {
    /// The fraction of the window elapsed at `now`, in `[0, 1]` (always 1 for a rolling
    /// window).
    pub fn elapsed_fraction(&self, now: Timestamp) -> f64 {
        if self.rolling {
            return 1.0;
        }
        let total = self.end.as_millisecond() - self.start.as_millisecond();
        if total <= 0 {
            return 1.0;
        }
        ((now.as_millisecond() - self.start.as_millisecond()) as f64 / total as f64).clamp(0.0, 1.0)
    }

    /// True when `at` falls inside the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        self.start <= at && (at < self.end || (self.rolling && at <= self.end))
    }
}

/// What a budget does when spend reaches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Tracked and shown, but no alerts and no enforcement.
    Off,
    /// Alerts at the thresholds; calls are never refused.
    #[default]
    AlertOnly,
    /// Alerts, and [`reserve`](super::CostMeter::reserve) refuses calls that would exceed it.
    Hard,
}

impl Mode {
    /// Parses `off`, `alert_only` or `hard`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "off" => Ok(Mode::Off),
            "alert_only" => Ok(Mode::AlertOnly),
            "hard" => Ok(Mode::Hard),
            other => Err(Error::invalid(
                "mode",
                format!("{:?} is not one of off, alert_only, hard", excerpt(other)),
            )),
        }
    }
}

/// A spending cap for a scope over a period.
///
/// ```
/// use pupkit::cost::{Budget, MicroUsd, Mode, Period, Scope};
///
/// let budget = Budget::new(Scope::User("u42".into()), MicroUsd::from_dollars(10), Period::Month)
///     .mode(Mode::Hard)
///     .time_zone("Europe/Berlin");
/// assert_eq!(budget.thresholds, vec![50, 80, 100]);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Budget {
    /// Whose spend it caps.
    pub scope: Scope,
    /// The cap per period.
    pub amount: MicroUsd,
    /// The period.
    pub period: Period,
    /// What happens at the cap. Default [`Mode::AlertOnly`].
    pub mode: Mode,
    /// Alert thresholds in percent of `amount`. Default 50, 80, 100.
    pub thresholds: Vec<u32>,
    /// The IANA time zone of calendar periods. `None` uses the meter's.
    pub time_zone: Option<String>,
}

impl Budget {
    /// A budget of `amount` per `period` for `scope`, alerting at 50/80/100%.
    pub fn new(scope: Scope, amount: MicroUsd, period: Period) -> Self {
        Budget {
            scope,
            amount,
            period,
            mode: Mode::AlertOnly,
            thresholds: vec![50, 80, 100],
            time_zone: None,
        }
    }

    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the alert thresholds, in percent.
    pub fn thresholds(mut self, thresholds: impl Into<Vec<u32>>) -> Self {
        self.thresholds = thresholds.into();
        self
    }

    /// Sets the time zone of calendar periods.
    pub fn time_zone(mut self, tz: impl Into<String>) -> Self {
        self.time_zone = Some(tz.into());
        self
    }

    /// Checks the budget and resolves its time zone (or `default_tz`).
    pub(crate) fn resolve(mut self, default_tz: &str) -> Result<ResolvedBudget> {
        self.scope.validate()?;
        self.period.validate()?;
        if self.amount.is_negative() {
            return Err(Error::invalid(
                "amount",
                format!("{} is negative", self.amount),
            ));
        }
        if let Some(bad) = self.thresholds.iter().find(|t| **t == 0 || **t > 1000) {
            return Err(Error::invalid(
                "thresholds",
                format!("{bad}% is outside 1% to 1000%"),
            ));
        }
        if self.thresholds.len() > 10 {
            return Err(Error::invalid(
                "thresholds",
                format!("{} thresholds, over the limit of 10", self.thresholds.len()),
            ));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        let tz_name = self
            .time_zone
            .clone()
            .unwrap_or_else(|| default_tz.to_owned());
        let tz = resolve_time_zone(&tz_name)?;
        let spec = CounterSpec::new(self.period, &tz_name);
        Ok(ResolvedBudget {
            budget: self,
            tz,
            spec,
        })
    }
}

/// Looks up an IANA time zone name (`UTC`, `Europe/Berlin`, ...).
pub(crate) fn resolve_time_zone(name: &str) -> Result<TimeZone> {
    if name.len() > 64 {
        return Err(Error::invalid(
            "time zone",
            format!("{:?} is too long", excerpt(name)),
        ));
    }
    TimeZone::get(name).map_err(|_| {
        Error::invalid(
            "time zone",
            format!("{:?} is not a known IANA time zone", excerpt(name)),
        )
    })
}

/// A validated budget with its time zone looked up.
#[derive(Clone, Debug)]
pub(crate) struct ResolvedBudget {
    pub budget: Budget,
    pub tz: TimeZone,
    pub spec: CounterSpec,
}

impl ResolvedBudget {
    /// The window the budget is in at `now`.
    pub fn window(&self, now: Timestamp) -> Window {
        self.budget.period.window(now, &self.tz)
    }

    /// The counter keys whose sum is the budget's spend at `now`.
    pub fn counter_keys(&self, now: Timestamp) -> Vec<String> {
        self.spec.window_keys(&self.budget.scope, now, &self.tz)
    }

    /// The key of the pool its reservations are held in.
    pub fn pool_key(&self) -> String {
        format!("r|{}|{}", self.budget.scope.key_fragment(), self.spec.id)
    }
}

/// How spend is counted for one kind of period: a calendar period in a time zone (one counter
/// per window) or a rolling window (one counter per 1/24 of it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct CounterSpec {
    pub id: String,
    pub period: Period,
    pub tz_name: String,
}

impl CounterSpec {
    pub fn new(period: Period, tz_name: &str) -> Self {
        let id = match period {
            Period::Day => format!("d@{}", escape_key(tz_name)),
            Period::Week => format!("w@{}", escape_key(tz_name)),
            Period::Month => format!("m@{}", escape_key(tz_name)),
            Period::Rolling(length) => format!("r{}", length.as_secs()),
        };
        // A rolling window is the same in every time zone.
        let tz_name = match period {
            Period::Rolling(_) => "",
            _ => tz_name,
        };
        CounterSpec {
            id,
            period,
            tz_name: tz_name.to_owned(),
        }
    }

    fn bucket_secs(&self) -> i64 {
        match self.period {
            Period::Rolling(length) => (length.as_secs() / ROLLING_BUCKETS).max(1) as i64,
            _ => 0,
        }
    }

    /// The bucket (window start, in seconds) an event at `at` counts in, for every scope, and
    /// when its counters may be dropped.
    pub fn event_bucket(&self, at: Timestamp, tz: &TimeZone) -> (i64, Timestamp) {
        let (bucket, expires) = match self.period {
            Period::Rolling(length) => {
                let width = self.bucket_secs();
                let start = at.as_second().div_euclid(width) * width;
                (start, start + width + length.as_secs() as i64)
            }
            calendar => {
                let window = calendar.window(at, tz);
                (window.start.as_second(), window.end.as_second())
            }
        };
        // Counters outlive their window by two days, for late events and the realtime view.
        let expires =
            Timestamp::from_second(expires.saturating_add(2 * 86_400)).unwrap_or(Timestamp::MAX);
        (bucket, expires)
    }

    /// The counters that sum to a scope's spend in the window containing `now`. A rolling
    /// window counts its oldest bucket whole, so it may over-count by at most 1/24 of the
    /// window, never under-count.
    pub fn window_keys(&self, scope: &Scope, now: Timestamp, tz: &TimeZone) -> Vec<String> {
        self.window_buckets(now, tz)
            .into_iter()
            .map(|(start, _)| self.key(scope, start.as_second()))
            .collect()
    }

    /// The buckets, `[start, end)`, whose counters make up the window containing `now`: the
    /// calendar window itself, or a rolling window's 24 buckets and the current one.
    pub fn window_buckets(&self, now: Timestamp, tz: &TimeZone) -> Vec<(Timestamp, Timestamp)> {
        match self.period {
            Period::Rolling(length) => {
                let width = self.bucket_secs();
                let last = now.as_second().div_euclid(width) * width;
                let first = (now.as_second() - length.as_secs() as i64).div_euclid(width) * width;
                (0..)
                    .map(|i| first + i * width)
                    .take_while(|b| *b <= last)
                    .filter_map(|b| {
                        Some((
                            Timestamp::from_second(b).ok()?,
                            Timestamp::from_second(b + width).ok()?,
                        ))
                    })
                    .collect()
            }
            calendar => {
                let window = calendar.window(now, tz);
                vec![(window.start, window.end)]
            }
        }
    }

    /// The counter of `scope` for the bucket starting at `bucket` (seconds).
    pub fn key(&self, scope: &Scope, bucket: i64) -> String {
        format!("c|{}|{}|{bucket}", scope.key_fragment(), self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn calendar_windows_follow_the_time_zone() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 23:30 UTC on Nov 30 is already Dec 1 in Berlin.
        let at = ts("2026-11-30T23:30:00Z");
        let month = Period::Month.window(at, &berlin);
        assert_eq!(month.start, ts("2026-11-30T23:00:00Z"));
        assert_eq!(month.end, ts("2026-12-31T23:00:00Z"));
        let utc_month = Period::Month.window(at, &TimeZone::UTC);
        assert_eq!(utc_month.start, ts("2026-11-01T00:00:00Z"));
        let day = Period::Day.window(at, &berlin);
        assert_eq!(day.start, ts("2026-11-30T23:00:00Z"));
        assert_eq!(day.end, ts("2026-12-01T23:00:00Z"));
        // 2026-11-26 is a Thursday; the week starts Monday the 23rd.
        let week = Period::Week.window(ts("2026-11-26T12:00:00Z"), &TimeZone::UTC);
        assert_eq!(week.start, ts("2026-11-23T00:00:00Z"));
        assert_eq!(week.end, ts("2026-11-30T00:00:00Z"));
    }

    #[test]
    fn a_day_across_a_dst_change_is_23_hours() {
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        let day = Period::Day.window(ts("2026-03-29T12:00:00Z"), &berlin);
        assert_eq!(day.end.as_second() - day.start.as_second(), 23 * 3600);
        assert_eq!(date(2026, 3, 29), day.start.to_zoned(berlin).date());
    }

    #[test]
    fn rolling_windows_cover_their_buckets() {
        let spec = CounterSpec::new(Period::Rolling(Duration::from_secs(24 * 3600)), "UTC");
        let now = ts("2026-11-26T12:30:00Z");
        let keys = spec.window_keys(&Scope::Global, now, &TimeZone::UTC);
        assert_eq!(keys.len(), 25);
        let event_key = |at| {
            let (bucket, _) = spec.event_bucket(at, &TimeZone::UTC);
            spec.key(&Scope::Global, bucket)
        };
        assert_eq!(keys.last(), Some(&event_key(now)));
        assert_eq!(keys.first(), Some(&event_key(ts("2026-11-25T12:30:00Z"))));
    }

    #[test]
    fn ids_are_escaped_in_keys() {
        let scope = Scope::User("a|b{c}:d e".into());
        assert_eq!(scope.key_fragment(), "u:a%7Cb%7Bc%7D%3Ad%20e");
    }

    #[test]
    fn bad_budgets_are_refused_with_the_field() {
        let base = Budget::new(Scope::Global, MicroUsd::from_dollars(1), Period::Day);
        let negative = Budget {
            amount: MicroUsd::from_micros(-1),
            ..base.clone()
        };
        assert!(
            negative
                .resolve("UTC")
                .unwrap_err()
                .to_string()
                .contains("amount")
        );
        let tz = base.clone().time_zone("Mars/Olympus");
        assert!(
            tz.resolve("UTC")
                .unwrap_err()
                .to_string()
                .contains("time zone")
        );
        let threshold = base.clone().thresholds(vec![0]);
        assert!(
            threshold
                .resolve("UTC")
                .unwrap_err()
                .to_string()
                .contains("thresholds")
        );
        let rolling = Budget::new(
            Scope::Global,
            MicroUsd::from_dollars(1),
            Period::Rolling(Duration::from_secs(1)),
        );
        assert!(
            rolling
                .resolve("UTC")
                .unwrap_err()
                .to_string()
                .contains("period")
        );
        assert!(Period::parse("fortnight", None).is_err());
    }
}
