//! The `load_test` example, end to end: it runs the built example binary for a few seconds in
//! process and reads its JSON and HTML reports (the HTML through headless Chromium:
//! `--dump-dom` and `--screenshot`), drives a mock HTTP server with `--url`, and checks that
//! bad arguments fail clearly. No assertion depends on how fast the machine is.
//!
//! Chromium (and Redis / Postgres for the parts that use them) are skipped loudly when
//! missing, or fail the test with `PUPKIT_REQUIRE_SERVICES=1`.
#![cfg(all(feature = "axum", feature = "redis", feature = "postgres"))]

mod support;

use support::browser;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use pupkit::repo::{PgConfig, PgPool};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The binary and its runs

/// The example binary next to this test binary (`target/<profile>/examples/load_test`),
/// built (once per test process) with the same profile, so it is never stale.
fn example_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let profile_dir = profile_dir();
            let mut command =
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
            command
                .args(["build", "--example", "load_test", "--manifest-path"])
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
            // Without the variables cargo set for this test process: build scripts (ring's)
            // rerun when they change, which would rebuild half the tree on every run.
            for (key, _) in std::env::vars_os() {
                let Some(key) = key.to_str() else { continue };
                let set_by_cargo = ["CARGO_PKG_", "CARGO_CFG_", "CARGO_BIN_"]
                    .iter()
                    .any(|prefix| key.starts_with(prefix))
                    || matches!(
                        key,
                        "CARGO_MANIFEST_DIR"
                            | "CARGO_MANIFEST_PATH"
                            | "CARGO_MANIFEST_LINKS"
                            | "CARGO_CRATE_NAME"
                            | "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                            | "CARGO_RUSTC_CURRENT_DIR"
                            | "OUT_DIR"
                    );
                if set_by_cargo {
                    command.env_remove(key);
                }
            }
            match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => {}
                Some("release") => {
                    command.arg("--release");
                }
                Some(other) => {
                    command.args(["--profile", other]);
                }
            }
            let status = command.status().expect("run cargo build");
            assert!(status.success(), "building the load_test example failed");
            let binary = profile_dir.join("examples").join("load_test");
            assert!(binary.exists(), "{} was not built", binary.display());
            binary
        })
        .clone()
}

/// `target/<profile>`, from this test binary's path (`target/<profile>/deps/load_test-...`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory")
        .to_path_buf()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs the example with `args`, bounded in time (a hung run fails instead of hanging CI).
async fn run_example(args: &[&str]) -> Output {
    let binary = example_binary();
    let run = tokio::process::Command::new(&binary)
        .args(args)
        .env("PUPKIT_REDIS_URL", support::redis_url())
        .env("PUPKIT_DATABASE_URL", support::database_url())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the load test finished within 300 s")
        .expect("run the load_test example")
}

fn describe(output: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("the JSON report parses")
}

fn num(value: &Value, path: &str) -> f64 {
    value
        .pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {value:#}"))
}

/// The text the report shows for a JSON figure: the JSON's own formatting, "n/a" for null.
fn shown(value: &Value) -> String {
    match value {
        Value::Null => "n/a".to_owned(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// p50 <= p95 <= p99 <= max, all positive, in `object` (a summary or a scenario).
fn assert_sane_percentiles(object: &Value, what: &str) {
    let p = |key: &str| num(object, &format!("/{key}"));
    let (p50, p95, p99, max) = (p("p50_ms"), p("p95_ms"), p("p99_ms"), p("max_ms"));
    assert!(
        0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max,
        "{what}: p50 {p50} <= p95 {p95} <= p99 {p99} <= max {max} does not hold"
    );
}

/// The part of `html` from `start` to the first `end` after it.
fn section<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in the DOM:\n{html}"));
    let to = html[from..]
        .find(end)
        .map_or(html.len(), |offset| from + offset + end.len());
    &html[from..to]
}

/// The text of the element with `data-metric="key"` in `html`.
fn metric_cell<'a>(html: &'a str, key: &str) -> &'a str {
    let marker = format!("data-metric=\"{key}\"");
    let at = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no cell {marker} in:\n{html}"));
    let rest = &html[at..];
    let open = rest.find('>').expect("end of the cell's tag") + 1;
    let close = rest[open..].find('<').expect("end of the cell's text");
    &rest[open..open + close]
}

/// Checks the DOM Chromium rendered from the report against the JSON.
fn check_dom(dom: &str, report: &Value) {
    for chart in ["throughput-chart", "latency-chart"] {
        let svg = section(dom, &format!("<svg id=\"{chart}\""), "</svg>");
        let series: &[&str] = if chart == "throughput-chart" {
            &["target", "achieved"]
        } else {
            &["p50", "p95", "p99"]
        };
        for name in series {
            let line = section(svg, &format!("data-series=\"{name}\""), ">");
            let points = line
                .split("points=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_else(|| panic!("{chart} {name} has no points: {line}"));
            assert!(
                points.split_whitespace().count() >= 1 && points.contains(','),
                "{chart} series {name} has no points: {line}"
            );
        }
    }
    let summary_table = section(dom, "<table id=\"summary\"", "</table>");
    let summary = report["summary"].as_object().expect("summary object");
    assert!(!summary.is_empty());
    for (key, value) in summary {
        assert_eq!(
            metric_cell(summary_table, key),
            shown(value),
            "summary cell {key} differs from the JSON"
        );
    }
    for (name, scenario) in report["scenarios"].as_object().expect("scenarios") {
        let row = section(dom, &format!("<tr data-scenario=\"{name}\""), "</tr>");
        for key in ["requests", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms"] {
            assert_eq!(
                metric_cell(row, key),
                shown(&scenario[key]),
                "scenario {name} cell {key} differs from the JSON"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup checks

async fn schema_exists(schema: &str) -> bool {
    let mut config = PgConfig::new(support::database_url());
    config.min_idle = 0;
    config.max_size = 1;
    let pool = PgPool::connect(&config).await.expect("connect to Postgres");
    let row = pool
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .expect("look the schema up");
    row.get::<_, i64>(0) > 0
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_run_writes_a_json_and_an_html_report_that_agree() {
    let dir = browser::scratch("loadtest");
    let (json_path, html_path) = (dir.join("load.json"), dir.join("load.html"));
    let output = run_example(&[
        "3",
        "1",
        "20",
        "mixed",
        "200",
        "--redis",
        "--report",
        path_str(&html_path),
        "--json",
        path_str(&json_path),
        "--quiet",
    ])
    .await;
    let context = describe(&output);
    assert!(output.status.success(), "{context}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Latency p95 (ms)"), "{context}");

    let report = read_json(&json_path);
    let summary = &report["summary"];
    assert!(num(summary, "/requests") > 0.0, "{context}");
    assert!(num(summary, "/ok") > 0.0, "{context}");
    assert_eq!(
        num(summary, "/requests"),
        num(summary, "/ok") + num(summary, "/errors")
    );
    assert_sane_percentiles(summary, "summary");
    assert!(
        !report["timeline"].as_array().expect("timeline").is_empty(),
        "no timeline"
    );
    assert_eq!(report["config"]["users"], 20);
    assert_eq!(report["mode"], "in-process");
    let notes: Vec<String> = report["notes"]
        .as_array()
        .expect("notes")
        .iter()
        .map(|n| n.as_str().unwrap_or_default().to_owned())
        .collect();
    if !notes.is_empty() {
        eprintln!("load_test notes: {notes:?}");
    }

    // Each scenario that ran answered, with sane percentiles.
    let scenarios = report["scenarios"].as_object().expect("scenarios");
    for name in ["cache", "embeddings", "cost"] {
        let scenario = &scenarios
            .get(name)
            .unwrap_or_else(|| panic!("scenario {name} missing\n{context}"));
        assert!(num(scenario, "/ok") > 0.0, "{name}: {scenario}");
        assert_sane_percentiles(scenario, name);
    }
    let components = &report["components"];
    match scenarios.get("messages") {
        Some(messages) => {
            assert!(num(messages, "/ok") > 0.0, "messages: {messages}");
            let schema = components["postgres_schema"]
                .as_str()
                .expect("the run names its schema");
            assert!(
                !schema_exists(schema).await,
                "schema {schema} is still there after the run"
            );
            assert!(report["pool"]["samples"].as_u64().unwrap_or(0) > 0);
            assert!(report["pool"]["max_size"].as_u64().unwrap_or(0) > 0);
        }
        None => support::unavailable("PostgreSQL", &format!("{notes:?}")),
    }
    match components["cache_backend"].as_str() {
        Some("redis") => {
            let prefix = components["redis_key_prefix"].as_str().expect("prefix");
            assert_eq!(
                support::redis::keys_matching(&format!("{prefix}:*"))
                    .await
                    .len(),
                0,
                "keys under {prefix} left behind"
            );
        }
        _ => support::unavailable("Redis", &format!("{notes:?}")),
    }
    let caches = components["caches"].as_array().expect("cache stats");
    assert!(caches.iter().any(|c| c["name"] == "load-profiles"));
    for cache in caches {
        assert_eq!(cache["tiers"][0]["name"], "l0", "{cache}");
    }
    assert!(num(components, "/batcher/requests") > 0.0);
    assert!(num(components, "/cost/recorded") > 0.0);

    // The HTML stands alone: no script, no stylesheet or image from anywhere.
    let html = std::fs::read_to_string(&html_path).expect("read the HTML report");
    for forbidden in [
        "<script", "<link", "src=", "href=", "http://", "https://", "url(",
    ] {
        assert!(
            !html.contains(forbidden),
            "the report contains {forbidden:?}"
        );
    }

    let Some(chromium) = browser::chromium().await else {
        return;
    };
    let page = format!("file://{}", path_str(&html_path));
    let dumped = browser::headless(&chromium, &page, 1_000, &["--dump-dom".to_owned()]).await;
    assert!(dumped.success, "Chromium --dump-dom: {}", dumped.context());
    check_dom(&dumped.stdout, &report);

    let png = browser::artifact("load_report.png");
    let _ = std::fs::remove_file(&png);
    let shot = browser::headless(
        &chromium,
        &page,
        1_000,
        &[
            format!("--screenshot={}", path_str(&png)),
            "--window-size=1200,2200".to_owned(),
        ],
    )
    .await;
    assert!(shot.success, "Chromium --screenshot: {}", shot.context());
    let bytes = std::fs::read(&png).expect("the screenshot was written");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 20_000,
        "a tiny screenshot: {} bytes",
        bytes.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_arguments_exit_non_zero_naming_the_argument_and_value() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["--users", "abc"], &["--users", "abc"]),
        (&["--users", "0"], &["--users", "\"0\""]),
        (
            &["3", "1", "20", "nosuch", "200"],
            &["--scenario", "nosuch"],
        ),
        (&["--duration", "-4"], &["--duration", "-4"]),
        (&["ten"], &["--duration", "ten"]),
        (&["--rps", "0"], &["--rps", "\"0\""]),
        (&["--duration", "5", "--ramp", "9"], &["--ramp", "9"]),
        (&["--url", "localhost:3000"], &["--url", "localhost:3000"]),
        (&["--bogus"], &["--bogus"]),
        (&["3", "1", "20", "mixed", "200", "7"], &["\"7\""]),
        (&["--users"], &["--users"]),
        (&["60", "--duration", "30"], &["--duration", "60", "30"]),
    ];
    for (args, wanted) in cases {
        let output = run_example(args).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?} should exit 2\n{}",
            describe(&output)
        );
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        for want in *wanted {
            assert!(
                stderr.contains(want),
                "{args:?}: the message should name {want}: {stderr}"
            );
        }
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let help = run_example(&["--help"]).await;
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--scenario"));
}

/// A stand-in for the example server: the five routes, counting what they serve; every 10th
/// usage post fails with 503.
#[derive(Default)]
struct Mock {
    profiles: AtomicU64,
    messages: AtomicU64,
    embeddings: AtomicU64,
    usage: AtomicU64,
    failed: AtomicU64,
    health: AtomicU64,
}

fn mock_components() -> Value {
    json!({
        "caches": {"profiles": {"hit_rate": 0.95, "tiers": {"l0": 0.9, "hot": 0.5}}},
        "pool": {"size": 4, "idle": 1, "in_use": 3, "max_size": 10, "waiters": 2},
    })
}

async fn mock_server() -> (String, Arc<Mock>) {
    let mock = Arc::new(Mock::default());
    let app = Router::new()
        .route(
            "/api/users/{id}/profile",
            get(
                |State(m): State<Arc<Mock>>, UrlPath(id): UrlPath<u64>| async move {
                    m.profiles.fetch_add(1, Ordering::Relaxed);
                    axum::Json(json!({"id": id, "name": format!("User {id}")}))
                },
            ),
        )
        .route(
            "/api/conversations/{id}/messages",
            get(
                |State(m): State<Arc<Mock>>, UrlPath(id): UrlPath<u64>| async move {
                    m.messages.fetch_add(1, Ordering::Relaxed);
                    axum::Json(json!([{"id": 1, "conversation": id, "body": "hi"}]))
                },
            ),
        )
        .route(
            "/api/embeddings",
            post(
                |State(m): State<Arc<Mock>>, body: axum::Json<Value>| async move {
                    m.embeddings.fetch_add(1, Ordering::Relaxed);
                    if !(body["text"].is_string() && body["user"].is_string()) {
                        return (StatusCode::BAD_REQUEST, "bad embeddings body").into_response();
                    }
                    axum::Json(json!({"dims": 3, "vector": [0.1, 0.2, 0.3]})).into_response()
                },
            ),
        )
        .route(
            "/api/usage",
            post(
                |State(m): State<Arc<Mock>>, body: axum::Json<Value>| async move {
                    let n = m.usage.fetch_add(1, Ordering::Relaxed) + 1;
                    let valid = body["model"] == "gpt-4o-mini"
                        && body["input_tokens"].is_u64()
                        && body["output_tokens"].is_u64()
                        && body["user"].is_string();
                    if !valid {
                        return (StatusCode::BAD_REQUEST, "bad usage body").into_response();
                    }
                    if n % 10 == 0 {
                        m.failed.fetch_add(1, Ordering::Relaxed);
                        return (StatusCode::SERVICE_UNAVAILABLE, "try later").into_response();
                    }
                    axum::Json(json!({"recorded": true})).into_response()
                },
            ),
        )
        .route(
            "/api/health",
            get(|State(m): State<Arc<Mock>>| async move {
                m.health.fetch_add(1, Ordering::Relaxed);
                axum::Json(json!({"status": "ok", "components": mock_components()}))
            }),
        )
        .with_state(mock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the mock server");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (base, mock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_url_it_drives_the_http_routes_and_reports_their_errors_and_health() {
    let (base, mock) = mock_server().await;
    let dir = browser::scratch("loadtesthttp");
    let (json_path, html_path) = (dir.join("http.json"), dir.join("http.html"));
    let output = run_example(&[
        "--url",
        &base,
        "--duration",
        "2",
        "--ramp",
        "0.5",
        "--users",
        "10",
        "--rps",
        "100",
        "--json",
        path_str(&json_path),
        "--report",
        path_str(&html_path),
        "--quiet",
    ])
    .await;
    let context = describe(&output);
    assert!(output.status.success(), "{context}");
    let report = read_json(&json_path);
    assert_eq!(report["mode"], "http", "{context}");
    let served = [
        ("cache", mock.profiles.load(Ordering::Relaxed)),
        ("messages", mock.messages.load(Ordering::Relaxed)),
        ("embeddings", mock.embeddings.load(Ordering::Relaxed)),
        ("cost", mock.usage.load(Ordering::Relaxed)),
    ];
    let mut total = 0;
    for (scenario, count) in served {
        assert!(count > 0, "no {scenario} requests reached the server");
        assert_eq!(
            report["scenarios"][scenario]["requests"].as_u64(),
            Some(count),
            "{scenario}: the report and the server disagree"
        );
        total += count;
    }
    assert_eq!(report["summary"]["requests"].as_u64(), Some(total));
    // Every 503 is an error, and nothing else is.
    let failed = mock.failed.load(Ordering::Relaxed);
    assert_eq!(
        report["summary"]["errors"].as_u64(),
        Some(failed),
        "{context}"
    );
    assert_eq!(report["scenarios"]["cost"]["errors"].as_u64(), Some(failed));
    if failed > 0 {
        let messages = report["errors"]["by_message"]
            .as_object()
            .expect("by_message");
        assert!(
            messages
                .keys()
                .all(|m| m.contains("POST /api/usage") && m.contains("503")),
            "{messages:?}"
        );
        assert!(
            !report["errors"]["first"]
                .as_array()
                .expect("first")
                .is_empty()
        );
    }
    assert_sane_percentiles(&report["summary"], "summary");
    // The health endpoint's components are copied as they are, and its pool is sampled.
    assert_eq!(report["health"]["components"], mock_components());
    assert!(mock.health.load(Ordering::Relaxed) >= 2);
    assert_eq!(report["pool"]["max_size"], 10);
    assert_eq!(report["pool"]["in_use_max"], 3);
    assert_eq!(report["pool"]["waiters_max"], 2);
    let html = std::fs::read_to_string(&html_path).expect("read the HTML report");
    assert!(html.contains("id=\"health-components\""));
    assert!(html.contains("POST /api/usage"));
    let _ = std::fs::remove_dir_all(&dir);
}
