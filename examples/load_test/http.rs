//! The HTTP target (`--url`): the example server's routes, one per scenario.
//!
//! - `cache`: `GET /api/users/{id}/profile`, 95% from the hot ids 1..=50, else 51..=1000;
//! - `messages`: `GET /api/conversations/{id}/messages`, ids 1..=200, skewed to the low ones;
//! - `embeddings`: `POST /api/embeddings` `{"text", "user"}`, 400 texts, skewed;
//! - `cost`: `POST /api/usage` `{"user", "model", "input_tokens", "output_tokens"}`.
//!
//! A non-2xx status, a transport error, or a body of the wrong JSON shape is an error.
//! `GET /api/health` is read before, during (once a second) and after the run.

use std::time::Duration;

use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

use crate::{Scenario, chain, unit};

pub struct HttpTarget {
    client: reqwest::Client,
    base: String,
    health_client: reqwest::Client,
}

/// Hot profile ids (`1..=HOT_USERS`) and all profile ids (`1..=USERS`).
pub const HOT_USERS: u64 = 50;
pub const USERS: u64 = 1_000;
pub const CONVERSATIONS: u64 = 200;
pub const TEXTS: u64 = 400;

impl HttpTarget {
    pub fn new(base: &str, users: usize, timeout: Duration) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(users)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("building the HTTP client: {}", chain(&e)))?;
        let health_client = reqwest::Client::builder()
            .timeout(Duration::from_millis(900))
            .build()
            .map_err(|e| format!("building the HTTP client: {}", chain(&e)))?;
        Ok(HttpTarget {
            client,
            base: base.to_owned(),
            health_client,
        })
    }

    /// One request of `scenario`, the `n`th of the run.
    pub async fn call(&self, scenario: Scenario, n: u64) -> Result<(), String> {
        let user = format!("user-{}", n % 50);
        let (route, request, want) = match scenario {
            Scenario::Cache => {
                let id = if unit(n, 1) < 0.95 {
                    1 + (unit(n, 2) * HOT_USERS as f64) as u64
                } else {
                    HOT_USERS + 1 + (unit(n, 2) * (USERS - HOT_USERS) as f64) as u64
                };
                (
                    "GET /api/users/{id}/profile",
                    self.client
                        .get(format!("{}/api/users/{id}/profile", self.base)),
                    Shape::Object,
                )
            }
            Scenario::Messages => {
                let id = 1 + (unit(n, 3).powi(2) * CONVERSATIONS as f64) as u64;
                (
                    "GET /api/conversations/{id}/messages",
                    self.client
                        .get(format!("{}/api/conversations/{id}/messages", self.base)),
                    Shape::Array,
                )
            }
            Scenario::Embeddings => {
                let i = (unit(n, 8).powi(2) * TEXTS as f64) as u64;
                let body = json!({"text": format!("how do I find my answer? (question {i})"), "user": user});
                (
                    "POST /api/embeddings",
                    self.post("/api/embeddings", &body),
                    Shape::Any,
                )
            }
            Scenario::Cost => {
                let body = json!({
                    "user": user,
                    "model": "gpt-4o-mini",
                    "input_tokens": 200 + (unit(n, 6) * 3_800.0) as u64,
                    "output_tokens": 50 + (unit(n, 7) * 750.0) as u64,
                });
                (
                    "POST /api/usage",
                    self.post("/api/usage", &body),
                    Shape::Any,
                )
            }
        };
        let response = request.send().await.map_err(|e| transport(route, e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| transport(route, e))?;
        if !status.is_success() {
            return Err(format!("{route}: HTTP {status}"));
        }
        want.check(route, &body)
    }

    fn post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }

    /// `GET /api/health` as JSON.
    pub async fn health(&self) -> Result<Value, String> {
        let response = self
            .health_client
            .get(format!("{}/api/health", self.base))
            .send()
            .await
            .map_err(|e| transport("GET /api/health", e))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| transport("GET /api/health", e))?;
        if !status.is_success() {
            return Err(format!("GET /api/health: HTTP {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET /api/health: not JSON ({e})"))
    }
}

/// A transport error, without the request's URL (so that errors group by route).
fn transport(route: &str, error: reqwest::Error) -> String {
    let error = error.without_url();
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "transport error"
    };
    format!("{route}: {kind}: {}", chain(&error))
}

/// The JSON a route must answer with.
enum Shape {
    Object,
    Array,
    Any,
}

impl Shape {
    fn check(&self, route: &str, body: &[u8]) -> Result<(), String> {
        let shape = match self {
            Shape::Any => return Ok(()),
            Shape::Object => "object",
            Shape::Array => "array",
        };
        match (self, serde_json::from_slice::<Value>(body)) {
            (Shape::Object, Ok(Value::Object(_))) | (Shape::Array, Ok(Value::Array(_))) => Ok(()),
            _ => Err(format!("{route}: the body is not a JSON {shape}")),
        }
    }
}

/// The first object under `value` with numeric `in_use` and `max_size` (a pool's status, in
/// whatever shape the health endpoint has): in use, max size, waiters.
pub fn find_pool(value: &Value) -> Option<(u64, u64, u64)> {
    match value {
        Value::Object(map) => {
            if let (Some(in_use), Some(max_size)) = (
                map.get("in_use").and_then(Value::as_u64),
                map.get("max_size").and_then(Value::as_u64),
            ) {
                let waiters = map.get("waiters").and_then(Value::as_u64).unwrap_or(0);
                return Some((in_use, max_size, waiters));
            }
            map.values().find_map(find_pool)
        }
        Value::Array(items) => items.iter().find_map(find_pool),
        _ => None,
    }
}
