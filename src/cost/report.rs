//! What the meter reports: budget states, the real-time view, period reports, breakdowns.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::anomaly::Anomaly;
use super::budget::Budget;
use super::money::MicroUsd;
use super::store::{GroupTotals, Totals};
use crate::error::{Error, Result, excerpt};

/// The longest custom report span.
const MAX_CUSTOM_SPAN_SECS: i64 = 366 * 86_400;

/// The period a report covers. Build a custom one with [`ReportPeriod::custom`], which checks
/// its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportPeriod {
    /// Today, in the meter's time zone.
    Day,
    /// This week (from Monday), in the meter's time zone.
    Week,
    /// This month, in the meter's time zone.
    Month,
    /// `[from, to)`, at most 366 days.
    Custom {
        /// Inclusive start.
        from: Timestamp,
        /// Exclusive end.
        to: Timestamp,
    },
}

impl ReportPeriod {
    /// Parses `day`, `week`, `month`, or `custom` with both bounds.
    pub fn parse(name: &str, from: Option<Timestamp>, to: Option<Timestamp>) -> Result<Self> {
        match name {
            "day" => Ok(ReportPeriod::Day),
            "week" => Ok(ReportPeriod::Week),
            "month" => Ok(ReportPeriod::Month),
            "custom" => match (from, to) {
                (Some(from), Some(to)) => ReportPeriod::custom(from, to),
                _ => Err(Error::invalid(
                    "period",
                    "\"custom\" needs both `from` and `to`",
                )),
            },
            other => Err(Error::invalid(
                "period",
                format!(
                    "{:?} is not one of day, week, month, custom",
                    excerpt(other)
                ),
            )),
        }
    }

    /// A custom period, checked: `from` before `to`, at most 366 days.
    pub fn custom(from: Timestamp, to: Timestamp) -> Result<Self> {
        if from >= to {
            return Err(Error::invalid(
                "to",
                format!("{to} is not after `from` {from}"),
            ));
        }
        if to.as_second() - from.as_second() > MAX_CUSTOM_SPAN_SECS {
            return Err(Error::invalid(
                "to",
                format!("{from} to {to} is longer than 366 days"),
            ));
        }
        Ok(ReportPeriod::Custom { from, to })
    }

    /// `day`, `week`, `month` or `custom`.
    pub fn name(&self) -> &'static str {
        match self {
            ReportPeriod::Day => "day",
            ReportPeriod::Week => "week",
            ReportPeriod::Month => "month",
            ReportPeriod::Custom { .. } => "custom",
        }
    }
}

/// A budget's state now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// The budget.
    pub budget: Budget,
    /// The start of its current window.
    pub period_start: Timestamp,
    /// When the period ends and a new one starts from zero (none for a rolling window).
    pub resets_at: Option<Timestamp>,
    /// Spend in the window.
    pub spent: MicroUsd,
    /// Held by live reservations.
    pub reserved: MicroUsd,
    /// What is left: `amount - spent - reserved`, never below zero.
    pub remaining: MicroUsd,
    /// `spent / amount` in percent; `None` for a budget of zero.
    pub percent_used: Option<f64>,
    /// End-of-period spend at the current run rate.
    pub projected: MicroUsd,
    /// When the run rate reaches the amount, if that is before the period ends.
    pub exhausts_at: Option<Timestamp>,
}

/// End-of-period spend from the run rate.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Projection {
    /// Spend so far.
    pub spent: MicroUsd,
    /// The fraction of the period elapsed (fractional, so the first hour of a month is not a
    /// division by zero).
    pub elapsed_fraction: f64,
    /// Spend per hour so far.
    pub run_rate_per_hour: MicroUsd,
    /// `spent / elapsed_fraction`.
    pub projected: MicroUsd,
}

/// The real-time view: today, this month, the last hour and day, budgets and anomalies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Realtime {
    /// When it was taken.
    pub at: Timestamp,
    /// The meter's time zone (of "today" and "this month").
    pub time_zone: String,
    /// Today so far.
    pub today: Totals,
    /// This month so far.
    pub month: Totals,
    /// The last 60 minutes.
    pub last_hour: Totals,
    /// The last 24 hours.
    pub last_24h: Totals,
    /// Average spend per hour over the last 24 hours.
    pub burn_rate_per_hour: MicroUsd,
    /// This month's projection.
    pub month_projection: Projection,
    /// Every budget's state.
    pub budgets: Vec<BudgetStatus>,
    /// Current anomalies, largest excess first.
    pub anomalies: Vec<Anomaly>,
}

/// A period report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Report {
    /// `day`, `week`, `month` or `custom`.
    pub period: String,
    /// Inclusive start.
    pub from: Timestamp,
    /// Exclusive end.
    pub to: Timestamp,
    /// The time zone of calendar periods.
    pub time_zone: String,
    /// Totals: cost, tokens, requests, unpriced requests, savings.
    pub totals: Totals,
    /// Per service, highest cost first.
    pub by_service: Vec<GroupTotals>,
    /// Per user, highest cost first.
    pub by_user: Vec<GroupTotals>,
    /// Per model, highest cost first.
    pub by_model: Vec<GroupTotals>,
    /// The users who spent most.
    pub top_spenders: Vec<GroupTotals>,
    /// What caches and dedup saved.
    pub savings: MicroUsd,
    /// Current anomalies, largest excess first.
    pub anomalies: Vec<Anomaly>,
    /// The projection to the period's end, when the period is under way.
    pub projection: Option<Projection>,
}

/// How a user breakdown is sorted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SortBy {
    /// By cost.
    #[default]
    Cost,
    /// By input plus output tokens.
    Tokens,
    /// By number of requests.
    Requests,
    /// By user id.
    User,
}

impl SortBy {
    /// Parses `cost`, `tokens`, `requests` or `user`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cost" => Ok(SortBy::Cost),
            "tokens" => Ok(SortBy::Tokens),
            "requests" => Ok(SortBy::Requests),
            "user" => Ok(SortBy::User),
            other => Err(Error::invalid(
                "sort",
                format!(
                    "{:?} is not one of cost, tokens, requests, user",
                    excerpt(other)
                ),
            )),
        }
    }
}

/// One user in a breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UserSpend {
    /// The user.
    pub user: String,
    /// Their sums.
    pub totals: Totals,
    /// Their budgets' states.
    pub budgets: Vec<BudgetStatus>,
    /// True when they have a current anomaly.
    pub anomalous: bool,
}

/// A page of the per-user breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UserBreakdown {
    /// The period.
    pub period: String,
    /// Inclusive start.
    pub from: Timestamp,
    /// Exclusive end.
    pub to: Timestamp,
    /// Users with any usage in the period.
    pub total_users: usize,
    /// This page.
    pub users: Vec<UserSpend>,
}
