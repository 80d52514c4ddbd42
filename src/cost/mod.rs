//! Cost tracking: usage priced from a dated price table into an idempotent ledger, budgets per
//! user, service and globally with alert thresholds and hard enforcement by reservation,
//! anomaly detection, projections, reports and CSV export.
//!
//! The [`Meter`] sits on two backends: a [`SpendStore`] for real-time counters, reservations
//! and alert dedup ([`MemorySpendStore`], or [`RedisSpendStore`] across processes), and a
//! [`Ledger`] for the durable record ([`MemoryLedger`], or [`PgLedger`] with reports in SQL).
//! Money is integer micro-dollars ([`MicroUsd`]) throughout.
//!
//! ```
//! use pupkit::cost::{Budget, CostMeter, Meter, MicroUsd, Mode, Period, ReportPeriod, Scope, Spender, Usage};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> pupkit::Result<()> {
//! let meter = Meter::builder()
//!     .budget(Budget::new(Scope::Global, MicroUsd::from_dollars(100), Period::Day).mode(Mode::Hard))
//!     .build()
//!     .await?;
//! let usage = Usage::new("req-1", "search", "u1", "text-embedding-3-small").tokens(5_000, 0);
//! meter.record(usage.clone()).await?;
//! assert!(meter.record(usage).await?.duplicate); // same request id: counted once
//! let report = meter.report(ReportPeriod::Day).await?;
//! assert_eq!(report.totals.requests, 1);
//! assert_eq!(report.totals.cost.micros(), 100); // 5,000 tokens at $0.02 per million
//! # Ok(())
//! # }
//! ```

mod alerts;
mod anomaly;
mod budget;
mod csv;
mod event;
#[cfg(feature = "axum")]
mod http;
mod memory;
mod meter;
mod money;
#[cfg(feature = "postgres")]
mod postgres;
mod prices;
#[cfg(feature = "redis")]
mod redis;
mod report;
mod store;

#[cfg(feature = "webhook")]
pub use alerts::WebhookSink;
pub use alerts::{Alert, AlertKind, AlertSink, MemorySink, TracingSink, webhook_signature};
pub use anomaly::{Anomaly, AnomalyConfig};
pub use budget::{Budget, Mode, Period, Scope, Window};
pub use csv::{CSV_COLUMNS, write_cell};
pub use event::{LedgerEntry, MAX_ID_LEN, Usage, UsageSource};
#[cfg(feature = "axum")]
pub use http::{AuthHook, CostRoutes};
pub use memory::{MemoryLedger, MemorySpendStore};
pub use meter::{
    CostConfig, CostMeter, CostStats, Meter, MeterBuilder, Recorded, Reservation, Spender,
};
pub use money::MicroUsd;
#[cfg(feature = "postgres")]
pub use postgres::PgLedger;
pub use prices::{ModelPrice, PriceTable, Priced};
#[cfg(feature = "redis")]
pub use redis::RedisSpendStore;
pub use report::{
    BudgetStatus, Projection, Realtime, Report, ReportPeriod, SortBy, UserBreakdown, UserSpend,
};
pub use store::{
    Booked, Booking, BucketTotal, BucketWidth, BudgetCheck, DEDUP_WINDOW, Dimension, GroupTotals,
    Increment, Ledger, LedgerQuery, LedgerSummary, ReserveOutcome, SpendStore, Totals,
};

#[allow(dead_code)]
fn _assert_impls() {
    fn dyn_compatible(
        _: Option<&dyn CostMeter>,
        _: Option<&dyn SpendStore>,
        _: Option<&dyn Ledger>,
        _: Option<&dyn AlertSink>,
    ) {
    }
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Meter>();
    send_sync::<MemorySpendStore>();
    send_sync::<MemoryLedger>();
    #[cfg(feature = "postgres")]
    send_sync::<PgLedger>();
    #[cfg(feature = "redis")]
    send_sync::<RedisSpendStore>();
    #[cfg(feature = "axum")]
    send_sync::<CostRoutes>();
}
