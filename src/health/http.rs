//! The health routes and the request-recording layer (feature `axum`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::monitor::Monitor;
use super::report::{Health, Status};
use crate::cost::AuthHook;

/// The dashboard: one self-contained page (no external scripts, styles or fonts) that polls
/// `GET /api/metrics`.
pub const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The health routes as an axum `Router`:
///
/// | route | answer |
/// |---|---|
/// | `GET /api/health` | [`HealthReport`](super::HealthReport) as JSON; `503` when a component is down |
/// | `GET /api/metrics` | [`MetricsSnapshot`](super::MetricsSnapshot) as JSON (needs a monitor) |
/// | `GET /dashboard` | the live dashboard page (needs a monitor) |
///
/// The metrics and the dashboard show cost by service: put them behind an
/// [`auth`](HealthRoutes::auth) hook when the router is reachable from outside. A browser
/// cannot add an `Authorization` header when it opens `/dashboard`: behind
/// [`AuthHook::bearer`], reach the page through a proxy that adds the header, or give
/// [`AuthHook::new`] a check of the host's session cookie (the page's requests send cookies).
#[derive(Clone, Debug)]
pub struct HealthRoutes {
    health: Arc<Health>,
    monitor: Option<Arc<Monitor>>,
    auth: Option<AuthHook>,
}

#[derive(Debug)]
struct Shared {
    health: Arc<Health>,
    monitor: Option<Arc<Monitor>>,
    auth: Option<AuthHook>,
}

impl HealthRoutes {
    /// The routes over `health`.
    pub fn new(health: Arc<Health>) -> Self {
        HealthRoutes {
            health,
            monitor: None,
            auth: None,
        }
    }

    /// Serves `/api/metrics` and `/dashboard` from `monitor`.
    pub fn monitor(mut self, monitor: Arc<Monitor>) -> Self {
        self.monitor = Some(monitor);
        self
    }

    /// Runs `hook` before every route; a request it refuses gets `401`.
    pub fn auth(mut self, hook: AuthHook) -> Self {
        self.auth = Some(hook);
        self
    }

    /// The router, with absolute paths: merge it into the host's.
    pub fn router(&self) -> Router {
        let shared = Arc::new(Shared {
            health: self.health.clone(),
            monitor: self.monitor.clone(),
            auth: self.auth.clone(),
        });
        let mut router = Router::new().route("/api/health", get(health));
        if self.monitor.is_some() {
            router = router
                .route("/api/metrics", get(metrics))
                .route("/dashboard", get(dashboard));
        }
        router
            .route_layer(middleware::from_fn_with_state(shared.clone(), authorize))
            .with_state(shared)
    }
}

async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if let Some(hook) = &shared.auth {
        let (parts, body) = request.into_parts();
        if !hook.allows(&parts) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({"error": "missing or invalid credentials"})),
            )
                .into_response();
        }
        return next.run(Request::from_parts(parts, body)).await;
    }
    next.run(request).await
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let report = shared.health.report().await;
    let status = if report.status == Status::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(report)).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match &shared.monitor {
        Some(monitor) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(monitor.snapshot()),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

/// A tower layer that records every request's latency (to the response's headers) and
/// outcome (a `5xx` or an error is a failure) into a [`Monitor`].
#[derive(Clone, Debug)]
pub struct MonitorLayer {
    monitor: Arc<Monitor>,
}

impl MonitorLayer {
    /// Records into `monitor`.
    pub fn new(monitor: Arc<Monitor>) -> Self {
        MonitorLayer { monitor }
    }
}

impl<S> Layer<S> for MonitorLayer {
    type Service = MonitorService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MonitorService {
            inner,
            monitor: self.monitor.clone(),
        }
    }
}

/// The service [`MonitorLayer`] wraps around the host's.
#[derive(Clone, Debug)]
pub struct MonitorService<S> {
    inner: S,
    monitor: Arc<Monitor>,
}

impl<S, B, ResBody> Service<axum::http::Request<B>> for MonitorService<S>
where
    S: Service<axum::http::Request<B>, Response = axum::http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MonitorFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        MonitorFuture {
            inner: self.inner.call(request),
            monitor: self.monitor.clone(),
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// The response future of [`MonitorService`].
    pub struct MonitorFuture<F> {
        #[pin]
        inner: F,
        monitor: Arc<Monitor>,
        started: Instant,
    }
}

impl<F, ResBody, E> Future for MonitorFuture<F>
where
    F: Future<Output = Result<axum::http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        let failed = match &output {
            Ok(response) => response.status().is_server_error(),
            Err(_) => true,
        };
        this.monitor.record(this.started.elapsed(), failed);
        Poll::Ready(output)
    }
}
