//! Health, monitoring and the dashboard over real loopback HTTP: the report, the metrics, the
//! alert rules raising each alert once until it clears, auth, and the dashboard rendered by
//! headless Chromium (a screenshot is left in `target/test-artifacts/dashboard.png`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use jiff::{SignedDuration, Timestamp};
use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
use pupkit::cost::{AlertKind, AuthHook, CostMeter, MemorySink, Meter, MicroUsd, Usage};
use pupkit::health::{Health, HealthRoutes, Monitor, MonitorConfig, MonitorLayer};
use serde_json::Value;
use support::browser;

/// A host: `/ok`, `/fail` (500), the health routes, all behind the monitor's layer.
struct Host {
    base: String,
    monitor: Arc<Monitor>,
    sink: Arc<MemorySink>,
    cache: Arc<Tiered<String>>,
    meter: Arc<dyn CostMeter>,
    client: reqwest::Client,
}

async fn host(auth: Option<AuthHook>) -> Host {
    let mut config = MonitorConfig::default()
        .resolution(Duration::from_millis(100))
        .history(Duration::from_secs(60))
        .window(Duration::from_secs(30));
    config.rules.min_requests = 10;
    config.rules.min_cache_lookups = 50;
    let monitor = Monitor::new(config).unwrap();
    let sink = Arc::new(MemorySink::new());
    monitor.alert_sink(sink.clone());
    let cache: Arc<Tiered<String>> = Arc::new(
        Tiered::builder(TieredConfig::named("messages"))
            .memory_tiers(1 << 20)
            .build()
            .unwrap(),
    );
    monitor.watch_cache({
        let cache = cache.clone();
        move || cache.stats()
    });
    let meter: Arc<dyn CostMeter> = Arc::new(Meter::builder().build().await.unwrap());
    monitor.watch_cost(meter.clone());
    let health = Arc::new(
        Health::new()
            .cache({
                let cache = cache.clone();
                move || cache.stats()
            })
            .cost(meter.clone())
            .monitor(monitor.clone()),
    );
    let mut routes = HealthRoutes::new(health).monitor(monitor.clone());
    if let Some(auth) = auth {
        routes = routes.auth(auth);
    }
    let app = Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        )
        .merge(routes.router())
        .layer(MonitorLayer::new(monitor.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Host {
        base,
        monitor,
        sink,
        cache,
        meter,
        client: reqwest::Client::new(),
    }
}

async fn json(answer: reqwest::Response) -> Value {
    serde_json::from_str(&answer.text().await.unwrap()).unwrap()
}

impl Host {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn traffic(&self, ok: usize, failed: usize) {
        for _ in 0..ok {
            assert_eq!(self.get("/ok").await.status(), 200);
        }
        for _ in 0..failed {
            assert_eq!(self.get("/fail").await.status(), 500);
        }
    }

    /// `hits` reads of a cached key and `misses` reads of absent ones.
    async fn cache_reads(&self, hits: usize, misses: usize) {
        let options = EntryOptions::new();
        self.cache
            .set("hello", "world".to_owned(), &options)
            .await
            .unwrap();
        for _ in 0..hits {
            assert!(self.cache.get("hello").await.unwrap().is_some());
        }
        for n in 0..misses {
            assert!(
                self.cache
                    .get(&format!("absent-{n}"))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    }
}

#[tokio::test]
async fn the_health_report_and_metrics_show_every_component_and_the_traffic() {
    let host = host(None).await;
    host.traffic(30, 0).await;
    host.cache_reads(90, 10).await;
    host.meter
        .record(Usage::new("req-1", "chat", "u1", "gpt-4o-mini").tokens(1_000, 200))
        .await
        .unwrap();
    host.monitor.sample();
    assert!(
        host.monitor.evaluate().await.is_empty(),
        "healthy traffic raises nothing"
    );

    let answer = host.get("/api/health").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["cache-control"], "no-store");
    let report: Value = json(answer).await;
    assert_eq!(report["status"], "ok", "{report}");
    let names: Vec<&str> = report["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["messages", "cost"]);
    assert_eq!(report["components"][0]["stats"]["tiers"][0]["name"], "l0");
    assert!(
        report["requests"]["requests"].as_u64().unwrap() >= 30,
        "{report}"
    );

    // The current slot is left out of the series: wait for it to close.
    tokio::time::sleep(Duration::from_millis(250)).await;
    host.monitor.sample();
    let metrics: Value = json(host.get("/api/metrics").await).await;
    let points = metrics["requests"].as_array().unwrap();
    let counted: u64 = points.iter().map(|p| p["requests"].as_u64().unwrap()).sum();
    assert!(counted >= 31, "{metrics}");
    assert_eq!(metrics["window"]["errors"], 0);
    let cache = &metrics["caches"][0];
    assert_eq!(cache["name"], "messages");
    assert_eq!(cache["lookups"], 100, "{cache}");
    assert!(
        (cache["hit_rate"].as_f64().unwrap() - 0.9).abs() < 1e-9,
        "{cache}"
    );
    assert_eq!(metrics["cost_by_service"][0]["service"], "chat");
    assert!(metrics["cost_by_service"][0]["cost"].as_i64().unwrap() > 0);

    let page = host.get("/dashboard").await;
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"throughput-chart\""));
    for external in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!html.contains(external), "self-contained: no {external}");
    }
}

#[tokio::test]
async fn each_rule_alerts_once_while_its_condition_holds() {
    let host = host(None).await;
    host.traffic(20, 2).await;
    host.cache_reads(30, 30).await;
    host.monitor.sample();
    let sent = host.monitor.evaluate().await;
    let mut kinds: Vec<AlertKind> = sent.iter().map(|a| a.kind).collect();
    kinds.sort_by_key(|k| k.as_str());
    assert_eq!(
        kinds,
        [AlertKind::CacheHitRateLow, AlertKind::ErrorRateHigh],
        "{sent:?}"
    );
    let errors = sent
        .iter()
        .find(|a| a.kind == AlertKind::ErrorRateHigh)
        .unwrap();
    assert!(errors.message.contains("2 of 22"), "{}", errors.message);
    assert_eq!(errors.limit, Some(0.01));
    let cache = sent
        .iter()
        .find(|a| a.kind == AlertKind::CacheHitRateLow)
        .unwrap();
    assert_eq!(cache.entity, "cache \"messages\"");
    assert!((cache.observed.unwrap() - 0.5).abs() < 1e-9);

    // Still holding: nothing new; the sink has each once; the dashboard lists both.
    host.traffic(5, 1).await;
    assert!(host.monitor.evaluate().await.is_empty());
    assert_eq!(host.sink.alerts().len(), 2);
    let metrics: Value = json(host.get("/api/metrics").await).await;
    assert_eq!(metrics["active_alerts"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_cost_anomaly_raises_an_alert_through_the_monitor() {
    let host = host(None).await;
    let now = Timestamp::now();
    // Four quiet hours for user "u7", then an hour at ten times their average.
    for hours_ago in 1..=4 {
        let at = now - SignedDuration::from_hours(hours_ago);
        host.meter
            .record(
                Usage::new(format!("past-{hours_ago}"), "chat", "u7", "gpt-4o-mini")
                    .cost(MicroUsd::from_micros(100_000))
                    .at(at),
            )
            .await
            .unwrap();
    }
    host.meter
        .record(
            Usage::new("spike", "chat", "u7", "gpt-4o-mini").cost(MicroUsd::from_micros(1_000_000)),
        )
        .await
        .unwrap();
    let sent = host.monitor.evaluate().await;
    let anomaly = sent
        .iter()
        .find(|a| a.kind == AlertKind::Anomaly && a.entity == "user \"u7\"")
        .unwrap_or_else(|| panic!("no anomaly alert for u7 in {sent:?}"));
    assert_eq!(anomaly.spent, MicroUsd::from_micros(1_000_000));
    assert!(anomaly.observed.unwrap() >= 2.0, "{anomaly:?}");
    assert!(
        host.monitor
            .evaluate()
            .await
            .iter()
            .all(|a| a.kind != AlertKind::Anomaly)
    );
}

#[tokio::test]
async fn the_routes_want_credentials_when_an_auth_hook_is_set() {
    let host = host(Some(AuthHook::bearer("s3cret"))).await;
    for path in ["/api/health", "/api/metrics", "/dashboard"] {
        let refused = host.get(path).await;
        assert_eq!(refused.status(), 401, "{path}");
        let allowed = host
            .client
            .get(format!("{}{path}", host.base))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(allowed.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn the_dashboard_renders_live_charts_in_chromium() {
    let Some(chromium) = browser::chromium().await else {
        return;
    };
    let host = host(None).await;
    host.traffic(40, 1).await;
    host.cache_reads(80, 20).await;
    host.meter
        .record(Usage::new("req-1", "chat", "u1", "gpt-4o-mini").tokens(5_000, 500))
        .await
        .unwrap();
    host.meter
        .record(Usage::new("req-2", "search", "u2", "text-embedding-3-small").tokens(90_000, 0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    host.monitor.sample();
    host.monitor.evaluate().await;
    let url = format!("{}/dashboard", host.base);

    let dom = browser::headless(&chromium, &url, 5_000, &["--dump-dom".to_owned()]).await;
    let context = dom.context();
    assert!(dom.success, "{context}");
    let html = &dom.stdout;
    assert!(
        html.contains("data-rendered="),
        "the page rendered the metrics\n{context}"
    );
    for series in ["requests/s", "p50", "p95", "p99", "errors %", "messages"] {
        assert!(
            html.contains(&format!("data-series=\"{series}\"")),
            "a {series} series\n{context}"
        );
    }
    assert!(
        !html.contains("data-points=\"0\" data-series=\"requests/s\""),
        "{context}"
    );
    assert!(
        html.contains("<rect") && html.contains("data-series=\"chat\""),
        "cost bars\n{context}"
    );
    assert!(
        html.contains("error_rate_high"),
        "the active alert is listed\n{context}"
    );

    let shot = browser::artifact("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let run = browser::headless(
        &chromium,
        &url,
        5_000,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1400,1000".to_owned(),
        ],
    )
    .await;
    assert!(run.success, "{}", run.context());
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "a screenshot of the dashboard ({size} bytes) at {}",
        shot.display()
    );
}
