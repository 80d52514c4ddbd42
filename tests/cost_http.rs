//! The cost endpoints over real HTTP: each test serves a [`CostRoutes`] router on a loopback
//! port, over an in-memory meter with a fixed clock, and calls it with reqwest.
#![cfg(feature = "axum")]

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use jiff::Timestamp;
use pupkit::cost::{
    BucketTotal, BucketWidth, CSV_COLUMNS, CostMeter, CostRoutes, Dimension, Ledger, LedgerEntry,
    LedgerQuery, LedgerSummary, MAX_ID_LEN, Meter, Usage, UsageSource,
};
use serde_json::{Value, json};

/// The meter's "now": Wednesday 2026-03-18, noon UTC.
const NOW: &str = "2026-03-18T12:00:00Z";

/// A user id a spreadsheet would run as a formula.
const FORMULA_USER: &str = "=SUM(A1)";

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

/// A meter at [`NOW`] with six events:
///
/// | id | when | service | user | model | cost (µ$) |
/// |---|---|---|---|---|---|
/// | r1 | today 11:00 | chat | alice | gpt-4o-mini 2000/500 | 600 |
/// | r2 | today 10:00 | search | bob | text-embedding-3-small 5000 | 100 |
/// | r3 | today 09:00 | chat | =SUM(A1) | gpt-4o 1000/100 | 3500 |
/// | r4 | today 11:30 | chat | alice | gpt-4o-mini 2000/500, cache hit | 0 (600 saved) |
/// | r5 | Mar 2 | search | carol | gpt-4o-mini 10000/1000 | 2100 |
/// | r6 | Feb 20 | chat | alice | gpt-4o-mini 2000/500 | 600 |
async fn seeded_meter() -> Arc<Meter> {
    let meter = Meter::builder().clock(|| ts(NOW)).build().await.unwrap();
    #[rustfmt::skip]
    let events = [
        ("r1", "2026-03-18T11:00:00Z", "chat", "alice", "gpt-4o-mini", 2_000, 500, UsageSource::Api, 600),
        ("r2", "2026-03-18T10:00:00Z", "search", "bob", "text-embedding-3-small", 5_000, 0, UsageSource::Api, 100),
        ("r3", "2026-03-18T09:00:00Z", "chat", FORMULA_USER, "gpt-4o", 1_000, 100, UsageSource::Api, 3_500),
        ("r4", "2026-03-18T11:30:00Z", "chat", "alice", "gpt-4o-mini", 2_000, 500, UsageSource::Cache, 0),
        ("r5", "2026-03-02T09:00:00Z", "search", "carol", "gpt-4o-mini", 10_000, 1_000, UsageSource::Api, 2_100),
        ("r6", "2026-02-20T09:00:00Z", "chat", "alice", "gpt-4o-mini", 2_000, 500, UsageSource::Api, 600),
    ];
    for (id, at, service, user, model, input, output, source, cost) in events {
        let usage = Usage::new(id, service, user, model)
            .at(ts(at))
            .tokens(input, output)
            .source(source);
        let recorded = meter.record(usage).await.unwrap();
        assert_eq!(recorded.cost.micros(), cost, "{id}");
    }
    Arc::new(meter)
}

/// Serves `routes` on a loopback port; returns its base URL.
async fn serve(routes: CostRoutes) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = routes.router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

/// An open server over the seeded meter.
async fn open_server() -> String {
    serve(CostRoutes::new(seeded_meter().await)).await
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            "application/json",
            "{}",
            self.body
        );
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    Reply {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.text().await.unwrap(),
    }
}

async fn get(url: String) -> Reply {
    send(reqwest::Client::new().get(url)).await
}

async fn post_json(url: String, body: impl Into<String>) -> Reply {
    send(
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(body.into()),
    )
    .await
}

/// The JSON numbers at `pointer`.
fn num(value: &Value, pointer: &str) -> i64 {
    value
        .pointer(pointer)
        .and_then(Value::as_i64)
        .unwrap_or_else(|| panic!("no integer at {pointer} in {value}"))
}

fn users(breakdown: &Value) -> Vec<String> {
    breakdown["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn realtime_shows_today_and_the_month_in_micro_dollars() {
    let base = open_server().await;
    let reply = get(format!("{base}/api/costs/realtime")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["time_zone"], "UTC");
    assert_eq!(num(&body, "/today/cost"), 4_200);
    assert_eq!(num(&body, "/today/saved"), 600);
    assert_eq!(num(&body, "/today/requests"), 4);
    assert_eq!(num(&body, "/today/input_tokens"), 10_000);
    assert_eq!(num(&body, "/month/cost"), 6_300);
    assert_eq!(num(&body, "/month/requests"), 5);
    assert_eq!(num(&body, "/last_hour/cost"), 600);
    assert_eq!(body["budgets"], json!([]));
}

#[tokio::test]
async fn reports_cover_each_period() {
    let base = open_server().await;
    for (period, cost, requests) in [("day", 4_200, 4), ("week", 4_200, 4), ("month", 6_300, 5)] {
        let reply = get(format!("{base}/api/costs/report/{period}")).await;
        assert_eq!(reply.status, 200, "{period}: {}", reply.body);
        let report = reply.json();
        assert_eq!(report["period"], period);
        assert_eq!(num(&report, "/totals/cost"), cost, "{period}");
        assert_eq!(num(&report, "/totals/requests"), requests, "{period}");
    }
    let month = get(format!("{base}/api/costs/report/month")).await.json();
    assert_eq!(month["from"], "2026-03-01T00:00:00Z");
    assert_eq!(month["to"], "2026-04-01T00:00:00Z");
    assert_eq!(num(&month, "/savings"), 600);
    assert_eq!(month["by_user"][0]["key"], FORMULA_USER);
    assert_eq!(num(&month, "/by_user/0/cost"), 3_500);
    assert_eq!(month["by_service"][0]["key"], "chat");
    assert_eq!(num(&month, "/by_service/0/cost"), 4_100);
    assert_eq!(num(&month, "/by_service/1/cost"), 2_200);

    let custom = get(format!(
        "{base}/api/costs/report/custom?from=2026-02-01T00:00:00Z&to=2026-03-03T00:00:00Z"
    ))
    .await;
    assert_eq!(custom.status, 200, "{}", custom.body);
    let custom = custom.json();
    assert_eq!(custom["period"], "custom");
    assert_eq!(num(&custom, "/totals/cost"), 2_700); // r5 + r6
    assert_eq!(num(&custom, "/totals/requests"), 2);
    // A `+` offset, percent-encoded.
    let offset = get(format!(
        "{base}/api/costs/report/custom?from=2026-03-02T10:00:00%2B01:00&to=2026-03-02T11:00:00%2B01:00"
    ))
    .await;
    assert_eq!(num(&offset.json(), "/totals/cost"), 2_100);
}

#[tokio::test]
async fn a_budget_post_returns_its_status_and_shows_in_realtime() {
    let base = open_server().await;
    let reply = post_json(
        format!("{base}/api/costs/budget/alice"),
        r#"{"amount_usd": 10, "period": "month", "mode": "hard", "thresholds": [50, 90], "time_zone": "Europe/Berlin"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let status = reply.json();
    assert_eq!(
        status["budget"]["scope"],
        json!({"kind": "user", "id": "alice"})
    );
    assert_eq!(num(&status, "/budget/amount"), 10_000_000);
    assert_eq!(status["budget"]["mode"], "hard");
    assert_eq!(status["budget"]["thresholds"], json!([50, 90]));
    assert_eq!(status["budget"]["time_zone"], "Europe/Berlin");
    assert_eq!(num(&status, "/spent"), 600); // r1; r4 was a cache hit, r6 last month
    assert_eq!(num(&status, "/remaining"), 9_999_400);

    // Defaults: alert_only, 50/80/100, the meter's time zone.
    let reply = post_json(
        format!("{base}/api/costs/budget/bob"),
        r#"{"amount_usd": 0.25, "period": "rolling", "rolling_secs": 3600}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let status = reply.json();
    assert_eq!(status["budget"]["mode"], "alert_only");
    assert_eq!(status["budget"]["thresholds"], json!([50, 80, 100]));
    assert_eq!(num(&status, "/budget/amount"), 250_000);

    let realtime = get(format!("{base}/api/costs/realtime")).await.json();
    let budgets = realtime["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2, "{realtime}");
    let alice = budgets
        .iter()
        .find(|b| b["budget"]["scope"]["id"] == "alice")
        .unwrap();
    assert_eq!(num(alice, "/spent"), 600);
    assert_eq!(num(alice, "/budget/amount"), 10_000_000);

    // Posting again replaces the budget.
    let reply = post_json(
        format!("{base}/api/costs/budget/alice"),
        r#"{"amount_usd": 20, "period": "month", "mode": "hard", "thresholds": [50, 90], "time_zone": "Europe/Berlin"}"#,
    )
    .await;
    assert_eq!(num(&reply.json(), "/budget/amount"), 20_000_000);
    let realtime = get(format!("{base}/api/costs/realtime")).await.json();
    assert_eq!(realtime["budgets"].as_array().unwrap().len(), 2);
}

/// The CSV body split into its CRLF-terminated lines, checked to have no bare line feed.
fn csv_lines(reply: &Reply) -> Vec<&str> {
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), "text/csv; charset=utf-8");
    assert_eq!(
        reply.header("content-disposition"),
        "attachment; filename=\"costs.csv\""
    );
    assert!(reply.body.ends_with("\r\n"), "{:?}", reply.body);
    assert_eq!(
        reply.body.matches('\n').count(),
        reply.body.matches("\r\n").count(),
        "a bare LF in {:?}",
        reply.body
    );
    let lines: Vec<&str> = reply.body.trim_end_matches("\r\n").split("\r\n").collect();
    assert_eq!(lines[0], CSV_COLUMNS.join(","));
    lines
}

#[tokio::test]
async fn csv_export_streams_one_row_per_event_and_filters() {
    let base = open_server().await;
    let march = "from=2026-03-01T00:00:00Z&to=2026-04-01T00:00:00Z";
    let reply = get(format!("{base}/api/costs/export/csv?{march}")).await;
    let lines = csv_lines(&reply);
    assert_eq!(lines.len(), 1 + 5, "{lines:#?}");
    // In time order, with the formula made inert.
    assert!(
        lines[1].starts_with("2026-03-02T09:00:00Z,r5,search,carol,gpt-4o-mini,"),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2],
        "2026-03-18T09:00:00Z,r3,chat,\"'=SUM(A1)\",gpt-4o,request,api,1000,100,0,0.003500,0.000000,true"
    );
    assert!(
        lines[5].contains(",r4,") && lines[5].contains(",cache,"),
        "{}",
        lines[5]
    );
    assert!(
        lines[5].ends_with(",0.000000,0.000600,true"),
        "{}",
        lines[5]
    );

    for (filter, ids) in [
        ("user=alice", vec!["r1", "r4"]),
        ("service=search", vec!["r5", "r2"]),
        ("model=gpt-4o", vec!["r3"]),
        ("service=chat&model=gpt-4o-mini", vec!["r1", "r4"]),
        ("user=%3DSUM(A1)", vec!["r3"]),
        ("user=nobody", vec![]),
    ] {
        let reply = get(format!("{base}/api/costs/export/csv?{march}&{filter}")).await;
        let rows: Vec<&str> = csv_lines(&reply)[1..]
            .iter()
            .map(|line| line.split(',').nth(1).unwrap())
            .collect();
        assert_eq!(rows, ids, "{filter}");
    }

    // A custom range takes February's event only.
    let reply = get(format!(
        "{base}/api/costs/export/csv?from=2026-02-01T00:00:00Z&to=2026-03-01T00:00:00Z"
    ))
    .await;
    let lines = csv_lines(&reply);
    assert_eq!(lines.len(), 2);
    assert!(lines[1].contains(",r6,"));
}

#[tokio::test]
async fn csv_export_defaults_to_the_current_utc_month() {
    let meter = Meter::builder().build().await.unwrap();
    let month = pupkit::cost::Period::Month.window(Timestamp::now(), &jiff::tz::TimeZone::UTC);
    let before = month
        .start
        .checked_sub(jiff::SignedDuration::from_secs(1))
        .unwrap();
    for (id, at) in [("this-month", month.start), ("last-month", before)] {
        let usage = Usage::new(id, "chat", "u1", "gpt-4o-mini")
            .at(at)
            .tokens(100, 10);
        meter.record(usage).await.unwrap();
    }
    let base = serve(CostRoutes::new(Arc::new(meter))).await;
    let reply = get(format!("{base}/api/costs/export/csv")).await;
    let lines = csv_lines(&reply);
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[1].contains(",this-month,"));
}

#[tokio::test]
async fn the_user_breakdown_sorts_pages_and_caps_the_limit() {
    let base = open_server().await;
    let url = |query: &str| format!("{base}/api/costs/breakdown/user?{query}");

    let reply = get(url("")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let page = reply.json();
    assert_eq!(page["period"], "month");
    assert_eq!(num(&page, "/total_users"), 4);
    assert_eq!(users(&page), [FORMULA_USER, "carol", "alice", "bob"]);
    assert_eq!(num(&page, "/users/0/totals/cost"), 3_500);
    assert_eq!(num(&page, "/users/2/totals/requests"), 2);

    let by_user = get(url("sort=user&order=asc")).await.json();
    assert_eq!(users(&by_user), [FORMULA_USER, "alice", "bob", "carol"]);
    let by_tokens = get(url("sort=tokens&order=asc")).await.json();
    // 1,100 tokens; 5,000 each for alice and bob (ties by user id); 11,000.
    assert_eq!(users(&by_tokens), [FORMULA_USER, "alice", "bob", "carol"]);
    let by_tokens = get(url("sort=tokens")).await.json();
    // Descending by tokens, ties still by user id.
    assert_eq!(users(&by_tokens), ["carol", "alice", "bob", FORMULA_USER]);
    let by_requests = get(url("sort=requests")).await.json();
    assert_eq!(users(&by_requests)[0], "alice");

    let paged = get(url("limit=2&offset=1")).await.json();
    assert_eq!(users(&paged), ["carol", "alice"]);
    assert_eq!(num(&paged, "/total_users"), 4);
    let past_the_end = get(url("offset=100")).await.json();
    assert!(users(&past_the_end).is_empty());
    let huge = get(url("limit=1000000")).await;
    assert_eq!(huge.status, 200);
    assert_eq!(users(&huge.json()).len(), 4);

    let today = get(url("period=day")).await.json();
    assert_eq!(today["period"], "day");
    assert_eq!(users(&today), [FORMULA_USER, "alice", "bob"]);
    let custom = get(url(
        "period=custom&from=2026-03-01T00:00:00Z&to=2026-03-10T00:00:00Z",
    ))
    .await
    .json();
    assert_eq!(users(&custom), ["carol"]);

    // A user's budgets come with them.
    post_json(
        format!("{base}/api/costs/budget/carol"),
        r#"{"amount_usd": 1, "period": "month"}"#,
    )
    .await;
    let page = get(url("")).await.json();
    assert_eq!(num(&page, "/users/1/budgets/0/spent"), 2_100);
}

#[tokio::test]
async fn a_bearer_token_is_required_when_set() {
    let routes = CostRoutes::new(seeded_meter().await).bearer_token("s3cret-token");
    let base = serve(routes).await;
    let client = reqwest::Client::new();
    let realtime = format!("{base}/api/costs/realtime");
    for auth in [
        None,
        Some("Bearer wrong-token"),
        Some("Bearer s3cret-toke"),
        Some("Bearer s3cret-token-and-more"),
        Some("Basic czNjcmV0LXRva2Vu"),
        Some("s3cret-token"),
        Some("Bearer "),
    ] {
        let mut request = client.get(&realtime);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let reply = send(request).await;
        assert_eq!(reply.status, 401, "{auth:?}");
        assert_eq!(reply.header("www-authenticate"), "Bearer");
        assert!(reply.json()["error"].is_string());
    }
    let ok = send(client.get(&realtime).bearer_auth("s3cret-token")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let lower = send(
        client
            .get(&realtime)
            .header("authorization", "bearer s3cret-token"),
    )
    .await;
    assert_eq!(lower.status, 200);

    // Every route is behind it, and a refused POST changes nothing.
    for path in [
        "/api/costs/report/day",
        "/api/costs/export/csv",
        "/api/costs/breakdown/user",
    ] {
        assert_eq!(get(format!("{base}{path}")).await.status, 401, "{path}");
        let ok = send(
            client
                .get(format!("{base}{path}"))
                .bearer_auth("s3cret-token"),
        )
        .await;
        assert_eq!(ok.status, 200, "{path}");
    }
    let budget = format!("{base}/api/costs/budget/alice");
    let body = r#"{"amount_usd": 1, "period": "day"}"#;
    assert_eq!(post_json(budget.clone(), body).await.status, 401);
    let status = send(client.get(&realtime).bearer_auth("s3cret-token"))
        .await
        .json();
    assert_eq!(status["budgets"], json!([]));
    let set = send(
        client
            .post(&budget)
            .bearer_auth("s3cret-token")
            .header("content-type", "application/json")
            .body(body),
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
}

#[tokio::test]
async fn a_custom_auth_hook_sees_the_request_head() {
    let hook = pupkit::cost::AuthHook::new(|parts| {
        parts.headers.get("x-role").is_some_and(|v| v == "finance")
    });
    let base = serve(CostRoutes::new(seeded_meter().await).auth(hook)).await;
    let url = format!("{base}/api/costs/realtime");
    assert_eq!(get(url.clone()).await.status, 401);
    let client = reqwest::Client::new();
    assert_eq!(
        send(client.get(&url).header("x-role", "finance"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn bad_input_gets_400_naming_the_field() {
    let base = open_server().await;
    let long_id = "u".repeat(MAX_ID_LEN + 1);
    let gets = [
        ("/api/costs/report/fortnight", "period"),
        ("/api/costs/report/custom?from=2026-03-01T00:00:00Z", "to"),
        ("/api/costs/report/custom?to=2026-03-01T00:00:00Z", "from"),
        (
            "/api/costs/report/custom?from=yesterday&to=2026-03-01T00:00:00Z",
            "from",
        ),
        (
            "/api/costs/report/custom?from=2026-03-05T00:00:00Z&to=2026-03-01T00:00:00Z",
            "to",
        ),
        (
            "/api/costs/report/custom?from=2024-01-01T00:00:00Z&to=2026-03-01T00:00:00Z",
            "to",
        ),
        ("/api/costs/report/day?from=2026-03-01T00:00:00Z", "from"),
        ("/api/costs/report/day?colour=red", "colour"),
        ("/api/costs/export/csv?from=not-a-time", "from"),
        ("/api/costs/export/csv?to=2026-13-01T00:00:00Z", "to"),
        (
            "/api/costs/export/csv?from=2026-03-05T00:00:00Z&to=2026-03-01T00:00:00Z",
            "to",
        ),
        (&format!("/api/costs/export/csv?user={long_id}"), "user"),
        ("/api/costs/export/csv?user=a%00b", "user"),
        ("/api/costs/export/csv?service=", "service"),
        ("/api/costs/export/csv?model=a%0Ab", "model"),
        ("/api/costs/breakdown/user?sort=price", "sort"),
        ("/api/costs/breakdown/user?sort=cost&sort=user", "sort"),
        ("/api/costs/breakdown/user?order=up", "order"),
        ("/api/costs/breakdown/user?limit=-1", "limit"),
        ("/api/costs/breakdown/user?limit=ten", "limit"),
        (
            "/api/costs/breakdown/user?offset=99999999999999999999999",
            "offset",
        ),
        ("/api/costs/breakdown/user?period=year", "period"),
        ("/api/costs/breakdown/user?period=custom", "from"),
        ("/api/costs/breakdown/user?colour=red", "colour"),
    ];
    for (path, field) in gets {
        let reply = get(format!("{base}{path}")).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.body);
        let body = reply.json();
        assert_eq!(body["field"], field, "{path}: {body}");
        assert!(!body["error"].as_str().unwrap().is_empty());
    }

    let budget = format!("{base}/api/costs/budget/alice");
    let posts = [
        (r#"{"period": "month"}"#, "amount_usd"),
        (r#"{"amount_usd": -1, "period": "month"}"#, "amount_usd"),
        (
            r#"{"amount_usd": -0.000001, "period": "month"}"#,
            "amount_usd",
        ),
        (r#"{"amount_usd": 1e300, "period": "month"}"#, "amount_usd"),
        (r#"{"amount_usd": "NaN", "period": "month"}"#, "amount_usd"),
        (r#"{"amount_usd": "10", "period": "month"}"#, "amount_usd"),
        (r#"{"amount_usd": NaN, "period": "month"}"#, "body"),
        (r#"{"amount_usd": 1e999, "period": "month"}"#, "body"),
        (r#"{"amount_usd": 1, "period": "month""#, "body"),
        ("", "body"),
        ("[1, 2]", "body"),
        (
            r#"{"amount_usd": 1, "period": "month", "colour": "red"}"#,
            "colour",
        ),
        (r#"{"amount_usd": 1}"#, "period"),
        (r#"{"amount_usd": 1, "period": "quarter"}"#, "period"),
        (r#"{"amount_usd": 1, "period": 30}"#, "period"),
        (r#"{"amount_usd": 1, "period": "rolling"}"#, "rolling_secs"),
        (
            r#"{"amount_usd": 1, "period": "rolling", "rolling_secs": 5}"#,
            "rolling_secs",
        ),
        (
            r#"{"amount_usd": 1, "period": "rolling", "rolling_secs": -60}"#,
            "rolling_secs",
        ),
        (
            r#"{"amount_usd": 1, "period": "month", "rolling_secs": 60}"#,
            "rolling_secs",
        ),
        (
            r#"{"amount_usd": 1, "period": "month", "mode": "soft"}"#,
            "mode",
        ),
        (
            r#"{"amount_usd": 1, "period": "month", "thresholds": [0]}"#,
            "thresholds",
        ),
        (
            r#"{"amount_usd": 1, "period": "month", "thresholds": [-50]}"#,
            "thresholds",
        ),
        (
            r#"{"amount_usd": 1, "period": "month", "thresholds": "50"}"#,
            "thresholds",
        ),
        (
            r#"{"amount_usd": 1, "period": "month", "time_zone": "Mars/Olympus"}"#,
            "time_zone",
        ),
    ];
    for (body, field) in posts {
        let reply = post_json(budget.clone(), body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        let json = reply.json();
        assert_eq!(json["field"], field, "{body}: {json}");
    }
    let good = r#"{"amount_usd": 1, "period": "month"}"#;
    for (user, what) in [
        (long_id.as_str(), "over-long"),
        ("a%07b", "control character"),
    ] {
        let reply = post_json(format!("{base}/api/costs/budget/{user}"), good).await;
        assert_eq!(reply.status, 400, "{what}: {}", reply.body);
        assert_eq!(reply.json()["field"], "userId", "{what}");
    }

    // Not JSON, and too large.
    let plain = send(reqwest::Client::new().post(&budget).body(good)).await;
    assert_eq!(plain.status, 415, "{}", plain.body);
    assert_eq!(plain.json()["field"], "content-type");
    let huge = format!(
        r#"{{"amount_usd": 1, "period": "month", "time_zone": "{}"}}"#,
        "x".repeat(20 * 1024)
    );
    let reply = post_json(budget.clone(), huge).await;
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert_eq!(reply.json()["field"], "body");

    // None of it set a budget.
    let realtime = get(format!("{base}/api/costs/realtime")).await.json();
    assert_eq!(realtime["budgets"], json!([]));
}

#[tokio::test]
async fn odd_requests_never_get_a_server_error() {
    let base = open_server().await;
    let client = reqwest::Client::new();
    for path in [
        "/api/costs/report/%FF%FE",
        "/api/costs/report/%00",
        "/api/costs/report/day?%FF=%FE",
        "/api/costs/report/custom?from=%FF&to=%FF",
        "/api/costs/breakdown/user?limit=18446744073709551616",
        "/api/costs/breakdown/user?offset=18446744073709551615&limit=1000",
        "/api/costs/export/csv?from=-009999-01-01T00:00:00Z",
        "/api/costs/export/csv?from=9999-12-31T23:59:59Z&to=9999-12-31T23:59:59.5Z",
        "/api/costs/export/csv?user&model",
        "/api/costs/export/csv?&&&=",
        "/api/costs/report/day?from",
    ] {
        let reply = get(format!("{base}{path}")).await;
        assert!(
            (200..500).contains(&reply.status),
            "{path}: {} {}",
            reply.status,
            reply.body
        );
    }
    for (user, body) in [
        ("%FF", r#"{"amount_usd": 1, "period": "month"}"#),
        ("x", r#"{"amount_usd": 9e12, "period": "month"}"#),
        ("x", r#"{"amount_usd": 9000000000001, "period": "month"}"#),
        (
            "x",
            r#"{"amount_usd": 1, "period": "rolling", "rolling_secs": 18446744073709551615}"#,
        ),
        (
            "x",
            r#"{"amount_usd": 1, "period": "month", "thresholds": [4294967296]}"#,
        ),
        (
            "x",
            r#"{"amount_usd": 1, "period": "month", "time_zone": "../../../etc/passwd"}"#,
        ),
        ("x", "\u{0}"),
        ("x", r#"{"amount_usd": {"$gt": 0}, "period": "month"}"#),
    ] {
        let reply = send(
            client
                .post(format!("{base}/api/costs/budget/{user}"))
                .header("content-type", "application/json; charset=utf-8")
                .body(body),
        )
        .await;
        assert!(
            (200..500).contains(&reply.status),
            "{user} {body}: {} {}",
            reply.status,
            reply.body
        );
    }
    // The wrong method is the router's 405.
    let wrong = send(client.delete(format!("{base}/api/costs/realtime"))).await;
    assert_eq!(wrong.status, 405);
}

/// A ledger whose every call fails, with a secret in its error.
#[derive(Debug)]
struct DownLedger;

fn down() -> pupkit::Error {
    pupkit::Error::Backend {
        backend: "postgres",
        operation: "summarize",
        source: "connection to postgres://admin:hunter2@db.internal:5432 refused".into(),
    }
}

#[async_trait]
impl Ledger for DownLedger {
    async fn append(&self, _: &LedgerEntry) -> pupkit::Result<bool> {
        Err(down())
    }
    async fn summarize(&self, _: &LedgerQuery) -> pupkit::Result<LedgerSummary> {
        Err(down())
    }
    async fn buckets(
        &self,
        _: &LedgerQuery,
        _: Dimension,
        _: BucketWidth,
        _: &str,
    ) -> pupkit::Result<Vec<BucketTotal>> {
        Err(down())
    }
    fn entries(&self, _: &LedgerQuery) -> BoxStream<'static, pupkit::Result<LedgerEntry>> {
        Box::pin(futures_util::stream::once(async { Err(down()) }))
    }
}

#[tokio::test]
async fn a_failing_backend_gets_503_without_its_details() {
    let meter = Meter::builder()
        .clock(|| ts(NOW))
        .ledger(Arc::new(DownLedger))
        .build()
        .await
        .unwrap();
    let base = serve(CostRoutes::new(Arc::new(meter))).await;
    for path in [
        "/api/costs/realtime",
        "/api/costs/report/month",
        "/api/costs/breakdown/user",
        "/api/costs/export/csv",
    ] {
        let reply = get(format!("{base}{path}")).await;
        assert_eq!(reply.status, 503, "{path}: {}", reply.body);
        let body = reply.json();
        assert!(body["error"].is_string());
        assert!(body.get("field").is_none());
        for secret in ["hunter2", "db.internal", "postgres"] {
            assert!(
                !reply.body.contains(secret),
                "{path} leaks {secret}: {}",
                reply.body
            );
        }
    }
    let reply = post_json(
        format!("{base}/api/costs/budget/alice"),
        r#"{"amount_usd": 1, "period": "month"}"#,
    )
    .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
}
