//! Health and monitoring for a host built on pupkit: one report of every component's
//! `stats()` for `GET /api/health`, a [`Monitor`] that keeps per-second request, cache and cost
//! figures and raises the report's alerts (p95 latency over 500 ms, error rate over 1%, cost
//! anomalies over 2x the average, cache hit rate under 80%) through the cost meter's
//! [`AlertSink`](crate::cost::AlertSink)s, and a live dashboard page (feature `axum`).
//!
//! ```no_run
//! # #[cfg(feature = "axum")]
//! # async fn run(app: axum::Router) -> pupkit::Result<()> {
//! use std::sync::Arc;
//! use pupkit::health::{Health, HealthRoutes, Monitor, MonitorConfig, MonitorLayer};
//!
//! let monitor = Monitor::new(MonitorConfig::default())?; // 1 s points, 5 min window
//! monitor.spawn();
//! let health = Arc::new(Health::new().monitor(monitor.clone()));
//! let app = app
//!     .merge(HealthRoutes::new(health).monitor(monitor.clone()).router())
//!     .layer(MonitorLayer::new(monitor));
//! # let _ = app;
//! # Ok(())
//! # }
//! ```

mod histogram;
#[cfg(feature = "axum")]
mod http;
mod monitor;
mod report;

#[cfg(feature = "axum")]
pub use http::{DASHBOARD_HTML, HealthRoutes, MonitorFuture, MonitorLayer, MonitorService};
pub use monitor::{
    AlertRules, CacheWindow, MetricsSnapshot, Monitor, MonitorConfig, RequestPoint, RequestSummary,
    ServiceCost, TierWindow,
};
pub use report::{ComponentHealth, Health, HealthReport, Status};
