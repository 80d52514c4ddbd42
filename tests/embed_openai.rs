//! `OpenAiEmbedder` against a local mock of `POST /v1/embeddings`, served by axum on a
//! loopback port in the test's own runtime. The clock is paused (`start_paused`), so retry
//! waits, `Retry-After` and deadlines run in virtual time and no test sleeps for real.
//!
//! A paused clock jumps to the next timer whenever the runtime idles, and with real sockets
//! it can idle while a loopback packet is still in the kernel (seen under load): the jump
//! would land on the attempt's timeout and fail it spuriously. So [`start`] also runs a
//! ticker that keeps a timer 1 ms ahead: the clock then creeps by 1 ms per idle turn instead
//! of jumping, a packet would have to stall for tens of thousands of turns to time an attempt
//! out, and elapsed times are exact up to that creep (the assertions allow for it).
//!
//! The mock answers as the API documents: it checks the key, decodes the JSON body, returns
//! base64 little-endian f32 vectors (from [`LocalEmbedder::vector`]) in **reversed** order
//! with their `index`, and a usage. Each test scripts failures ahead of that: a queue of canned
//! answers used first, and a rule consulted on every request.
#![cfg(all(feature = "openai", feature = "axum"))]

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use pupkit::Error;
use pupkit::embed::{EmbedRequest, Embedder, LocalEmbedder, OpenAiConfig, OpenAiEmbedder};
use pupkit::resilience::BreakerState;
use serde_json::{Value, json};
use tokio::time::Instant;

const KEY: &str = "sk-test-0123456789abcdef";
const MODEL: &str = "text-embedding-3-small";
/// The mock's dimensions when a request names none.
const DEFAULT_DIMENSIONS: u32 = 12;

/// One request as the mock received it.
#[derive(Clone, Debug)]
struct Seen {
    input: Vec<String>,
    dimensions: Option<u32>,
    has_dimensions: bool,
    encoding_format: Option<String>,
    model: String,
    query: Option<String>,
}

/// An answer the mock gives instead of its normal one.
struct Canned {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Wait this long (in the paused clock) before answering.
    delay: Option<Duration>,
}

impl Canned {
    fn json(status: u16, body: Value) -> Self {
        Canned {
            status,
            headers: Vec::new(),
            body: body.to_string(),
            delay: None,
        }
    }

    fn error(status: u16, kind: &str, code: Option<&str>, message: &str) -> Self {
        Canned::json(
            status,
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        )
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

type Queued = Box<dyn FnOnce(&Seen) -> Canned + Send>;
type Rule = Box<dyn Fn(&Seen) -> Option<Canned> + Send + Sync>;

#[derive(Default)]
struct Mock {
    queue: Mutex<VecDeque<Queued>>,
    rule: Mutex<Option<Rule>>,
    seen: Mutex<Vec<Seen>>,
    /// Every request, those refused before they were recorded included.
    hits: std::sync::atomic::AtomicUsize,
}

impl Mock {
    /// Answers the next request with `answer` (before any rule or normal behaviour).
    fn then(&self, answer: impl FnOnce(&Seen) -> Canned + Send + 'static) {
        self.queue.lock().unwrap().push_back(Box::new(answer));
    }

    /// Answers every request `rule` picks (after the queue is empty).
    fn rule(&self, rule: impl Fn(&Seen) -> Option<Canned> + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = Some(Box::new(rule));
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests recorded (with a valid key and body).
    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// All requests.
    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The vector the mock returns for `text`.
fn expected(text: &str, dimensions: u32) -> Vec<f32> {
    LocalEmbedder::new(dimensions).vector(text, dimensions)
}

fn base64_of(vector: &[f32]) -> String {
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The tokens the mock reports: one per byte, so tests can tell them from the client's
/// estimates.
fn mock_tokens(texts: &[String]) -> u64 {
    texts.iter().map(|t| t.len() as u64).sum()
}

/// The documented answer: base64 vectors with their index, in reversed order, and usage.
fn normal_json(seen: &Seen) -> Value {
    let dimensions = seen.dimensions.unwrap_or(DEFAULT_DIMENSIONS);
    let data: Vec<Value> = seen
        .input
        .iter()
        .enumerate()
        .rev()
        .map(|(index, text)| {
            json!({
                "object": "embedding",
                "index": index,
                "embedding": base64_of(&expected(text, dimensions)),
            })
        })
        .collect();
    let tokens = mock_tokens(&seen.input);
    json!({
        "object": "list",
        "data": data,
        "model": seen.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

fn reply(canned: Canned) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    for (name, value) in canned.headers {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).unwrap(),
        );
    }
    let status = StatusCode::from_u16(canned.status).unwrap();
    (status, headers, canned.body).into_response()
}

async fn embeddings(
    State(mock): State<Arc<Mock>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    mock.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let presented = header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header("api-key"))
        .unwrap_or("");
    if presented != KEY {
        // Like some compatible servers, echo the whole key back: the client must scrub it.
        return reply(Canned::error(
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
            &format!("Incorrect API key provided: {presented}."),
        ));
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return reply(Canned::error(
            400,
            "invalid_request_error",
            None,
            "body is not JSON",
        ));
    };
    let input: Option<Vec<String>> = body["input"].as_array().and_then(|items| {
        items
            .iter()
            .map(|t| t.as_str().map(str::to_owned))
            .collect()
    });
    let (Some(input), Some(model)) = (input, body["model"].as_str()) else {
        return reply(Canned::error(
            400,
            "invalid_request_error",
            None,
            "model and input (an array of strings) are required",
        ));
    };
    if input.is_empty() || input.iter().any(String::is_empty) {
        return reply(Canned::error(
            400,
            "invalid_request_error",
            None,
            "input must not be empty",
        ));
    }
    let seen = Seen {
        input,
        dimensions: body["dimensions"].as_u64().map(|d| d as u32),
        has_dimensions: body.get("dimensions").is_some(),
        encoding_format: body["encoding_format"].as_str().map(str::to_owned),
        model: model.to_owned(),
        query,
    };
    mock.seen.lock().unwrap().push(seen.clone());
    let queued = mock.queue.lock().unwrap().pop_front();
    let canned = match queued {
        Some(answer) => Some(answer(&seen)),
        None => mock
            .rule
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|rule| rule(&seen)),
    };
    match canned {
        Some(canned) => {
            if let Some(delay) = canned.delay {
                tokio::time::sleep(delay).await;
            }
            reply(canned)
        }
        None => reply(Canned::json(200, normal_json(&seen))),
    }
}

/// Serves a fresh mock on a loopback port; returns it and the base URL (`.../v1`).
async fn start() -> (Arc<Mock>, String) {
    let mock = Arc::new(Mock::default());
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .with_state(mock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    (mock, format!("http://{addr}/v1"))
}

/// A config for the mock: short backoff (so a wait of a second or more can only be a
/// `Retry-After`), and a long attempt timeout and deadline (see the module docs), the
/// default breaker.
fn config(base_url: &str) -> OpenAiConfig {
    let mut config = OpenAiConfig::default();
    config.base_url = base_url.to_owned();
    config.api_key = Some(KEY.to_owned());
    config.timeout = Duration::from_secs(600);
    config.retry.deadline = Duration::from_secs(3_600);
    config.retry.base_delay = Duration::from_millis(10);
    config.retry.max_delay = Duration::from_millis(40);
    config
}

async fn embedder() -> (Arc<Mock>, OpenAiEmbedder) {
    let (mock, url) = start().await;
    (mock, OpenAiEmbedder::new(config(&url)).unwrap())
}

fn texts(items: &[&str]) -> Vec<String> {
    items.iter().map(|t| (*t).to_owned()).collect()
}

fn request(items: &[&str]) -> EmbedRequest {
    EmbedRequest::new(MODEL, texts(items))
}

fn rate_limited() -> Canned {
    Canned::error(
        429,
        "requests",
        Some("rate_limit_exceeded"),
        "Rate limit reached for text-embedding-3-small on requests per min (RPM): Limit 3, Used 3, Requested 1.",
    )
}

#[tokio::test(start_paused = true)]
async fn maps_vectors_by_index_and_sends_dimensions_only_when_asked() {
    let (mock, embedder) = embedder().await;
    let items = ["alpha", "beta gamma", "delta epsilon zeta"];
    let response = embedder
        .embed(&request(&items).dimensions(8))
        .await
        .unwrap();
    for (text, result) in items.iter().zip(&response.results) {
        // The mock answers in reversed order: equal vectors prove the mapping by index.
        assert_eq!(result.as_ref().unwrap(), &expected(text, 8), "{text}");
    }
    let tokens = mock_tokens(&texts(&items));
    assert_eq!(
        (response.usage.prompt_tokens, response.usage.total_tokens),
        (tokens, tokens),
        "usage is the server's, not the estimate"
    );
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].input, texts(&items));
    assert_eq!(seen[0].model, MODEL);
    assert_eq!(seen[0].encoding_format.as_deref(), Some("base64"));
    assert_eq!(seen[0].dimensions, Some(8));

    let response = embedder.embed(&request(&["alpha"])).await.unwrap();
    assert_eq!(
        response.results[0].as_ref().unwrap(),
        &expected("alpha", DEFAULT_DIMENSIONS)
    );
    assert!(
        !mock.seen()[1].has_dimensions,
        "no `dimensions` field unless asked"
    );
}

#[tokio::test(start_paused = true)]
async fn accepts_float_arrays_from_servers_that_ignore_encoding_format() {
    let (mock, embedder) = embedder().await;
    mock.then(|seen| {
        let data: Vec<Value> = seen
            .input
            .iter()
            .enumerate()
            .map(|(index, text)| json!({"index": index, "embedding": expected(text, 4)}))
            .collect();
        // And no usage: the client counts its estimate instead.
        Canned::json(200, json!({"data": data}))
    });
    let response = embedder
        .embed(&request(&["one two", "three"]).dimensions(4))
        .await
        .unwrap();
    assert_eq!(
        response.results[0].as_ref().unwrap(),
        &expected("one two", 4)
    );
    assert_eq!(response.results[1].as_ref().unwrap(), &expected("three", 4));
    let estimate = u64::from(
        pupkit::embed::estimate_tokens("one two") + pupkit::embed::estimate_tokens("three"),
    );
    assert_eq!(response.usage.prompt_tokens, estimate);
}

#[tokio::test(start_paused = true)]
async fn a_429_waits_for_retry_after_seconds_then_succeeds() {
    let (mock, embedder) = embedder().await;
    mock.then(|_| rate_limited().header("retry-after", "1"));
    let started = Instant::now();
    let response = embedder.embed(&request(&["hello"])).await.unwrap();
    let waited = started.elapsed();
    assert!(response.results[0].is_ok());
    assert_eq!(mock.requests(), 2);
    // The backoff alone is at most 40 ms: a wait of a second is the Retry-After.
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_millis(1_500),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_waits_for_retry_after_as_an_http_date() {
    let (mock, embedder) = embedder().await;
    mock.then(|_| {
        let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3);
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&at)
            .unwrap();
        assert!(date.ends_with(" GMT"), "{date}");
        rate_limited().header("retry-after", date)
    });
    let started = Instant::now();
    embedder.embed(&request(&["hello"])).await.unwrap();
    let waited = started.elapsed();
    assert_eq!(mock.requests(), 2);
    // The date has whole seconds: 3 s from now, truncated, is between 2 and 3 s away.
    assert!(
        waited >= Duration::from_millis(1_900) && waited <= Duration::from_millis(3_500),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_retried_with_backoff() {
    let (mock, embedder) = embedder().await;
    mock.then(|_| Canned::error(500, "server_error", None, "The server had an error"));
    mock.then(|_| Canned::error(503, "server_error", None, "The server is overloaded"));
    let started = Instant::now();
    let response = embedder.embed(&request(&["hello"])).await.unwrap();
    assert_eq!(
        response.results[0].as_ref().unwrap(),
        &expected("hello", DEFAULT_DIMENSIONS)
    );
    assert_eq!(mock.requests(), 3);
    // Full jitter under the caps: below 10 ms, then below 20 ms (plus the ticker's creep).
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(embedder.breaker_stats().failures, 2);
}

#[tokio::test(start_paused = true)]
async fn x_should_retry_false_stops_a_retry() {
    let (mock, embedder) = embedder().await;
    mock.then(|_| {
        Canned::error(500, "server_error", None, "do not retry").header("x-should-retry", "false")
    });
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    assert_eq!(mock.requests(), 1);
    assert!(matches!(error, Error::Api { status: 500, .. }), "{error}");
}

#[tokio::test(start_paused = true)]
async fn insufficient_quota_fails_at_once() {
    let (mock, embedder) = embedder().await;
    mock.rule(|_| {
        Some(
            Canned::error(
                429,
                "insufficient_quota",
                Some("insufficient_quota"),
                "You exceeded your current quota, please check your plan and billing details.",
            )
            .header("retry-after", "1"),
        )
    });
    let started = Instant::now();
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    assert_eq!(mock.requests(), 1, "not retried");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "no wait for the Retry-After"
    );
    assert!(error.is_api_error(), "{error}");
    assert!(
        matches!(&error, Error::Api { status: 429, code: Some(code), .. } if code == "insufficient_quota"),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("exceeded your current quota") && message.contains("will not help"),
        "{message}"
    );
    assert_eq!(
        embedder.breaker_stats().failures,
        0,
        "a 4xx is not a failure"
    );
}

#[tokio::test(start_paused = true)]
async fn unauthorized_fails_at_once_without_showing_the_key() {
    const WRONG: &str = "sk-wrong-SECRET-9876543210";
    let (mock, url) = start().await;
    let mut config = config(&url);
    config.api_key = Some(WRONG.to_owned());
    let embedder = OpenAiEmbedder::new(config).unwrap();
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    assert_eq!(mock.hits(), 1, "not retried");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(WRONG), "{shown}");
    assert!(
        shown.contains("401") && shown.contains("<redacted>") && shown.contains("OPENAI_API_KEY"),
        "{shown}"
    );
    let stats = embedder.breaker_stats();
    assert_eq!((stats.failures, stats.state), (0, BreakerState::Closed));
}

#[tokio::test(start_paused = true)]
async fn malformed_json_fails_the_call_clearly() {
    let (mock, embedder) = embedder().await;
    mock.then(|_| Canned::json(200, json!({"object": "list"})));
    mock.then(|_| Canned {
        status: 200,
        headers: Vec::new(),
        body: "{\"data\": [".to_owned(),
        delay: None,
    });
    let error = embedder.embed(&request(&["a b c"])).await.unwrap_err();
    assert!(error.is_api_error(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("invalid response") && message.contains("missing field `data`"),
        "{message}"
    );
    let error = embedder.embed(&request(&["a b c"])).await.unwrap_err();
    assert!(error.to_string().contains("not embeddings JSON"), "{error}");
    assert_eq!(mock.requests(), 2, "a malformed answer is not retried");
}

#[tokio::test(start_paused = true)]
async fn a_wrong_count_fails_the_call() {
    let (mock, embedder) = embedder().await;
    mock.then(|seen| {
        let mut body = normal_json(seen);
        body["data"].as_array_mut().unwrap().pop();
        Canned::json(200, body)
    });
    let error = embedder
        .embed(&request(&["one", "two", "three"]))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("2 embeddings for 3 inputs"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_repeated_or_out_of_range_index_fails_the_call() {
    let (mock, embedder) = embedder().await;
    mock.then(|seen| {
        let mut body = normal_json(seen);
        body["data"][0]["index"] = json!(1);
        body["data"][1]["index"] = json!(1);
        Canned::json(200, body)
    });
    mock.then(|seen| {
        let mut body = normal_json(seen);
        body["data"][0]["index"] = json!(2);
        Canned::json(200, body)
    });
    let error = embedder.embed(&request(&["one", "two"])).await.unwrap_err();
    assert!(
        error.to_string().contains("index 1 appears more than once"),
        "{error}"
    );
    let error = embedder.embed(&request(&["one", "two"])).await.unwrap_err();
    assert!(
        error.to_string().contains("out of range for 2 inputs"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wrong_dimension_fails_the_call() {
    let (mock, embedder) = embedder().await;
    // Asked for 8, answered with 4.
    mock.then(|seen| {
        let mut body = normal_json(&Seen {
            dimensions: Some(4),
            ..seen.clone()
        });
        body["model"] = json!(MODEL);
        Canned::json(200, body)
    });
    let error = embedder
        .embed(&request(&["one", "two"]).dimensions(8))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("4 dimensions, but 8 were requested"),
        "{error}"
    );
    // Not asked: the vectors must still agree with each other.
    mock.then(|seen| {
        let mut body = normal_json(seen);
        body["data"][0]["embedding"] = json!(base64_of(&[1.0, 0.0]));
        Canned::json(200, body)
    });
    let error = embedder.embed(&request(&["one", "two"])).await.unwrap_err();
    assert!(
        error.to_string().contains("2 dimensions, but others have"),
        "{error}"
    );
    // And a length that is not whole f32s.
    mock.then(|seen| {
        let mut body = normal_json(seen);
        body["data"][0]["embedding"] = json!("AAAAAAA=");
        Canned::json(200, body)
    });
    let error = embedder.embed(&request(&["one"])).await.unwrap_err();
    assert!(error.to_string().contains("not a whole number"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_refused_input_fails_alone_by_bisection() {
    let (mock, embedder) = embedder().await;
    mock.rule(|seen| {
        seen.input.iter().any(|t| t == "bad").then(|| {
            Canned::error(
                400,
                "invalid_request_error",
                None,
                "'bad' is not an acceptable input.",
            )
        })
    });
    let items = ["one", "two", "bad", "four"];
    let response = embedder.embed(&request(&items)).await.unwrap();
    for slot in [0, 1, 3] {
        assert_eq!(
            response.results[slot].as_ref().unwrap(),
            &expected(items[slot], DEFAULT_DIMENSIONS)
        );
    }
    let error = response.results[2].as_ref().unwrap_err();
    assert!(error.is_invalid_input(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("\"bad\"")
            && message.contains("HTTP 400")
            && message.contains("not an acceptable input"),
        "{message}"
    );
    let batches: Vec<Vec<String>> = mock.seen().into_iter().map(|s| s.input).collect();
    assert_eq!(
        batches,
        vec![
            texts(&items),
            texts(&["one", "two"]),
            texts(&["bad", "four"]),
            texts(&["bad"]),
            texts(&["four"]),
        ]
    );
    let tokens = mock_tokens(&texts(&["one", "two", "four"]));
    assert_eq!(
        response.usage.prompt_tokens, tokens,
        "refused calls use nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_400_about_another_parameter_fails_the_call_without_bisecting() {
    let (mock, embedder) = embedder().await;
    mock.then(|_| {
        Canned::json(
            400,
            json!({"error": {"message": "This model does not support specifying dimensions.", "type": "invalid_request_error", "param": "dimensions", "code": null}}),
        )
    });
    let error = embedder
        .embed(&request(&["one", "two"]).dimensions(8))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Api { status: 400, .. }), "{error}");
    assert_eq!(mock.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_stops_retries() {
    let (mock, url) = start().await;
    let mut config = config(&url);
    config.retry.max_attempts = 100;
    config.retry.deadline = Duration::from_secs(75);
    let embedder = OpenAiEmbedder::new(config).unwrap();
    mock.rule(|_| Some(rate_limited().header("retry-after", "30")));
    let started = Instant::now();
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    // Attempts at 0 s, 30 s and 60 s; a fourth would start at 90 s, past the deadline, so
    // the call fails at 60 s instead of sleeping.
    assert_eq!(mock.requests(), 3);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(60) && elapsed < Duration::from_secs(61),
        "{elapsed:?}"
    );
    assert!(matches!(error, Error::Api { status: 429, .. }), "{error}");

    // A Retry-After beyond the deadline (here, beyond any clock): fail now, without sleeping.
    mock.rule(|_| Some(rate_limited().header("retry-after", "99999999999999999999")));
    let started = Instant::now();
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    assert!(matches!(error, Error::Api { status: 429, .. }), "{error}");
    assert_eq!(mock.requests(), 4);
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_shortens_the_attempt_timeout_of_a_hung_server() {
    let (mock, url) = start().await;
    let mut config = config(&url);
    config.timeout = Duration::from_secs(20);
    config.retry.max_attempts = 100;
    config.retry.deadline = Duration::from_secs(50);
    let embedder = OpenAiEmbedder::new(config).unwrap();
    mock.rule(|seen| {
        Some(Canned {
            delay: Some(Duration::from_secs(3_600)),
            ..Canned::json(200, normal_json(seen))
        })
    });
    let started = Instant::now();
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(error.is_timeout(), "{error}");
    // 20 s, 20 s, then what is left of the 50 s.
    assert_eq!(mock.requests(), 3);
    assert!(
        elapsed <= Duration::from_secs(50) && elapsed >= Duration::from_secs(49),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_repeated_server_errors_then_fails_fast() {
    let (mock, url) = start().await;
    let mut config = config(&url);
    config.retry.max_attempts = 2;
    config.breaker.consecutive_failures = 4;
    config.breaker.cool_down = Duration::from_secs(60);
    let embedder = OpenAiEmbedder::new(config).unwrap();
    mock.rule(|_| Some(Canned::error(500, "server_error", None, "boom")));
    for _ in 0..2 {
        let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
        assert!(matches!(error, Error::Api { status: 500, .. }), "{error}");
    }
    assert_eq!(mock.requests(), 4);
    assert_eq!(embedder.breaker_stats().state, BreakerState::Open);
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    assert!(matches!(error, Error::Unavailable { .. }), "{error}");
    assert!(error.is_backend());
    assert_eq!(mock.requests(), 4, "failed fast, without a request");
}

#[tokio::test(start_paused = true)]
async fn client_errors_do_not_open_the_breaker() {
    let (mock, url) = start().await;
    let mut config = config(&url);
    config.breaker.consecutive_failures = 2;
    let embedder = OpenAiEmbedder::new(config).unwrap();
    mock.rule(|_| {
        Some(Canned::error(
            404,
            "invalid_request_error",
            Some("model_not_found"),
            "The model does not exist",
        ))
    });
    for _ in 0..5 {
        let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
        assert!(
            error.to_string().contains("check the model name"),
            "{error}"
        );
    }
    assert_eq!(mock.requests(), 5);
    assert_eq!(embedder.breaker_stats().state, BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn connection_errors_are_retried_then_reported() {
    let port = support::free_port();
    let mut config = config(&format!("http://127.0.0.1:{port}/v1"));
    config.retry.max_attempts = 3;
    let embedder = OpenAiEmbedder::new(config).unwrap();
    let error = embedder.embed(&request(&["hello"])).await.unwrap_err();
    assert!(matches!(error, Error::Backend { .. }), "{error:?}");
    assert_eq!(
        embedder.breaker_stats().failures,
        3,
        "three attempts, each a failure"
    );
}

#[tokio::test(start_paused = true)]
async fn empty_and_overlong_texts_fail_alone_and_are_not_sent() {
    let (mock, embedder) = embedder().await;
    let long = "word ".repeat(8_000);
    let items = ["ok", "", long.as_str(), "fine"];
    let response = embedder.embed(&request(&items)).await.unwrap();
    assert!(response.results[0].is_ok() && response.results[3].is_ok());
    for slot in [1, 2] {
        let error = response.results[slot].as_ref().unwrap_err();
        assert!(error.is_invalid_input(), "{error}");
    }
    assert!(
        response.results[2]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("8192")
    );
    let seen = mock.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].input, texts(&["ok", "fine"]));

    // Nothing valid: nothing sent.
    let response = embedder.embed(&request(&["", ""])).await.unwrap();
    assert!(response.results.iter().all(Result::is_err));
    assert_eq!(response.usage.prompt_tokens, 0);
    assert_eq!(mock.requests(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_token_limit_is_split_into_calls() {
    let (mock, embedder) = embedder().await;
    // 40 texts of about 8,000 estimated tokens: 37 fit in 300,000.
    let items: Vec<String> = (0..40)
        .map(|i| format!("{i:02} {}", "abcd".repeat(7_999)))
        .collect();
    let request = EmbedRequest::new(MODEL, items.clone()).dimensions(4);
    let response = embedder.embed(&request).await.unwrap();
    for (text, result) in items.iter().zip(&response.results) {
        assert_eq!(result.as_ref().unwrap(), &expected(text, 4));
    }
    let sizes: Vec<usize> = mock.seen().iter().map(|s| s.input.len()).collect();
    assert_eq!(sizes, vec![37, 3]);
    assert_eq!(response.usage.prompt_tokens, mock_tokens(&items));
}

#[tokio::test(start_paused = true)]
async fn azure_style_key_header_and_query_parameters() {
    let (mock, url) = start().await;
    let mut config = config(&url);
    config.api_key_header = "api-key".to_owned();
    config
        .query
        .insert("api-version".to_owned(), "2024-10-21".to_owned());
    let embedder = OpenAiEmbedder::new(config).unwrap();
    embedder.embed(&request(&["hello"])).await.unwrap();
    assert_eq!(
        mock.seen()[0].query.as_deref(),
        Some("api-version=2024-10-21")
    );
}

#[tokio::test(start_paused = true)]
async fn debug_output_never_contains_the_key() {
    let (_mock, url) = start().await;
    let config = config(&url);
    let shown = format!("{config:?} {config:#?}");
    assert!(
        !shown.contains(KEY) && shown.contains("<redacted>"),
        "{shown}"
    );
    let embedder = OpenAiEmbedder::new(config).unwrap();
    let shown = format!("{embedder:?} {embedder:#?}");
    assert!(
        !shown.contains(KEY) && shown.contains("<redacted>"),
        "{shown}"
    );
}

/// The batcher over the client over the mock server: the whole path a host uses.
mod through_the_batcher {
    use super::*;
    use pupkit::cache::{Tiered, TieredConfig};
    use pupkit::cost::{CostMeter, Meter, MicroUsd, ReportPeriod, Spender};
    use pupkit::embed::{Batcher, BatcherConfig, EmbeddingBatcher};

    async fn stack(batch_size: usize) -> (Arc<Mock>, Arc<Batcher>, Arc<Meter>) {
        let (mock, url) = start().await;
        let client = OpenAiEmbedder::new(config(&url)).unwrap();
        let cache: Tiered<Vec<f32>> = Tiered::builder(TieredConfig::named("embeddings"))
            .memory_tiers(64 << 20)
            .build()
            .unwrap();
        let meter = Arc::new(Meter::builder().build().await.unwrap());
        let mut batcher = BatcherConfig::default();
        batcher.batch_size = batch_size;
        let batcher = Batcher::builder(batcher)
            .embedder(Arc::new(client))
            .cache(Arc::new(cache))
            .meter(meter.clone())
            .build()
            .unwrap();
        (mock, Arc::new(batcher), meter)
    }

    async fn embed_all(
        batcher: &Arc<Batcher>,
        texts: &[String],
    ) -> Vec<pupkit::Result<pupkit::embed::Embedding>> {
        let tasks: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let batcher = batcher.clone();
                let text = text.clone();
                let user = format!("user-{}", i % 7);
                tokio::spawn(
                    async move { batcher.embed(&text, &Spender::new("search", user)).await },
                )
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_callers_with_30_percent_duplicates_make_ceil_unique_over_ten_calls() {
        let (mock, batcher, meter) = stack(10).await;
        let texts: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    "support ticket {}",
                    if i < 700 { i } else { (i * 13) % 700 }
                )
            })
            .collect();
        for (outcome, text) in embed_all(&batcher, &texts).await.into_iter().zip(&texts) {
            let embedding = outcome.unwrap();
            assert_eq!(
                *embedding.vector,
                expected(text, DEFAULT_DIMENSIONS),
                "{text}"
            );
        }
        assert_eq!(mock.requests(), 70, "ceil(700 unique / 10)");
        let seen = mock.seen();
        assert!(seen.iter().all(|s| s.input.len() <= 10));
        let mut sent: Vec<&String> = seen.iter().flat_map(|s| &s.input).collect();
        sent.sort();
        sent.dedup();
        assert_eq!(sent.len(), 700, "each unique text sent once");
        let first = meter.report(ReportPeriod::Day).await.unwrap();
        assert_eq!(first.totals.requests, 1000);
        // The same texts again: the cache answers, the server sees nothing, savings recorded.
        for outcome in embed_all(&batcher, &texts).await {
            assert!(outcome.unwrap().cached);
        }
        assert_eq!(mock.requests(), 70, "zero API calls the second time");
        let second = meter.report(ReportPeriod::Day).await.unwrap();
        assert_eq!(second.totals.requests, 2000);
        assert_eq!(
            second.totals.cost, first.totals.cost,
            "the cache costs nothing"
        );
        assert!(second.savings > first.savings && second.savings > MicroUsd::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_answer_fails_only_its_batch_and_a_429_is_waited_out() {
        let (mock, batcher, _meter) = stack(2).await;
        // The first call gets garbage; the second a 429 with Retry-After, then success.
        mock.then(|_| Canned::json(200, json!({"object": "list"})));
        mock.then(|_| rate_limited().header("retry-after", "1"));
        let texts: Vec<String> = ["a one", "a two", "b one", "b two"]
            .iter()
            .map(|t| (*t).to_owned())
            .collect();
        let outcomes = embed_all(&batcher, &texts).await;
        let failed: Vec<bool> = outcomes.iter().map(|o| o.is_err()).collect();
        assert_eq!(failed, [true, true, false, false], "{outcomes:?}");
        let error = outcomes[0].as_ref().unwrap_err();
        let mut chain = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(next) = source {
            chain.push_str(&format!(": {next}"));
            source = next.source();
        }
        assert!(chain.contains("invalid response"), "{chain}");
        assert_eq!(
            mock.requests(),
            3,
            "garbage once, 429 once, then the answer"
        );
        assert_eq!(batcher.stats().failed_calls, 1);
    }
}
