//! [`OpenAiEmbedder`]: the OpenAI embeddings API (`POST {base_url}/embeddings`), or any server
//! that speaks it (Azure OpenAI, vLLM, LiteLLM, ...). Feature `openai`. What one call does is
//! on [`OpenAiEmbedder`]; this example points it at a compatible server:
//!
//! ```no_run
//! # async fn run() -> pupkit::Result<()> {
//! use std::time::Duration;
//!
//! use pupkit::embed::{EmbedRequest, Embedder, OpenAiConfig, OpenAiEmbedder};
//!
//! let mut config = OpenAiConfig::default();
//! config.base_url = "http://127.0.0.1:8000/v1".into();
//! config.api_key = Some("local-key".into());
//! config.timeout = Duration::from_secs(10);
//! config.retry.max_attempts = 3;
//! let embedder = OpenAiEmbedder::new(config)?;
//! let request = EmbedRequest::new("BAAI/bge-small-en-v1.5", vec!["hello world".into()]);
//! let vector = embedder.embed(&request).await?.results.remove(0)?;
//! println!("{} dimensions", vector.len());
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::embedder::{
    EmbedRequest, EmbedResponse, EmbedUsage, Embedder, MAX_INPUTS, MAX_REQUEST_TOKENS, check_text,
};
use crate::error::{Error, Result, excerpt};
use crate::redact::redact_url;
use crate::resilience::{Admission, BreakerConfig, BreakerStats, CircuitBreaker};

/// The backend's name in errors, logs and the breaker.
const BACKEND: &str = "openai";
/// The operation's name in errors.
const OPERATION: &str = "embeddings";
/// The OpenAI API.
const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// Longest API message kept in an error, in bytes.
const MAX_MESSAGE: usize = 512;
/// The largest answer read (2,048 inputs of 3,072 base64 floats take about 34 MB).
const MAX_ANSWER: usize = 128 << 20;
/// What stands in for a secret in `Debug` output and messages.
const REDACTED: &str = "<redacted>";

/// How [`OpenAiEmbedder`] retries one API call. Durations deserialize from milliseconds or
/// strings like `"500ms"`.
///
/// Retried: HTTP 408, 409, 429 (unless the account is out of quota), 5xx, connection errors
/// and timeouts; a server's `x-should-retry: true|false` decides when present (as in the
/// official SDKs). Not retried: 400, 401, 403, 404, 422 and `insufficient_quota`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Attempts per API call, the first included (at least 1). Default 5.
    pub max_attempts: u32,
    /// The backoff before the first retry: a wait is drawn uniformly from zero to
    /// `min(max_delay, base_delay * 2^retry)` ("full jitter"). Default 500 ms.
    #[serde(with = "crate::serde_duration")]
    pub base_delay: Duration,
    /// The longest backoff between attempts. A server's `Retry-After` is honoured even when
    /// longer, as long as it ends before the deadline. Default 8 s.
    #[serde(with = "crate::serde_duration")]
    pub max_delay: Duration,
    /// How long one [`embed`](Embedder::embed) call may take in all, retries, waits and split
    /// requests included. No wait is started that would end past it: a call whose next retry
    /// would start too late fails at once with the last error. Default 60 s.
    #[serde(with = "crate::serde_duration")]
    pub deadline: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            deadline: Duration::from_secs(60),
        }
    }
}

/// Where and how [`OpenAiEmbedder`] calls the API. Durations deserialize from milliseconds or
/// strings like `"30s"`.
///
/// For Azure OpenAI, point `base_url` at the deployment, send the key in `api-key` and add
/// the API version:
///
/// ```
/// use pupkit::embed::OpenAiConfig;
///
/// let mut config = OpenAiConfig::default();
/// config.base_url = "https://my-resource.openai.azure.com/openai/deployments/embed-small".into();
/// config.api_key_header = "api-key".into();
/// config.query.insert("api-version".into(), "2024-10-21".into());
/// config.api_key = Some("...".into());
/// assert!(!format!("{config:?}").contains("\"...\""));
/// ```
#[derive(Clone, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct OpenAiConfig {
    /// The API's base URL; requests go to `{base_url}/embeddings`. Without a query string:
    /// query parameters go in [`query`](Self::query). Default `https://api.openai.com/v1`.
    pub base_url: String,
    /// The API key. `None` (the default) reads `OPENAI_API_KEY` when the embedder is built.
    pub api_key: Option<String>,
    /// The header that carries the key: `authorization` (the default) sends
    /// `Bearer <key>`; any other name (Azure's `api-key`) sends the bare key.
    pub api_key_header: String,
    /// Query parameters added to every request, such as Azure's `api-version`. Default none.
    pub query: BTreeMap<String, String>,
    /// Sent as `OpenAI-Organization` when set. Default none.
    pub organization: Option<String>,
    /// Sent as `OpenAI-Project` when set. Default none.
    pub project: Option<String>,
    /// How long one attempt (connect, send, read the answer) may take. Default 30 s.
    #[serde(with = "crate::serde_duration")]
    pub timeout: Duration,
    /// Retries, backoff and the overall deadline.
    pub retry: RetryConfig,
    /// When the breaker opens: server errors (5xx), connection errors and timeouts count as
    /// failures; answers of 4xx do not. Default [`BreakerConfig::default`].
    pub breaker: BreakerConfig,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_url: DEFAULT_BASE_URL.to_owned(),
            api_key: None,
            api_key_header: "authorization".to_owned(),
            query: BTreeMap::new(),
            organization: None,
            project: None,
            timeout: Duration::from_secs(30),
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
        }
    }
}

impl OpenAiConfig {
    /// The defaults, with `api_key` from `OPENAI_API_KEY`, `base_url` from `OPENAI_BASE_URL`,
    /// `organization` from `OPENAI_ORG_ID` and `project` from `OPENAI_PROJECT_ID`, where they
    /// are set and not empty (the variables the official SDKs read).
    pub fn from_env() -> Self {
        let mut config = OpenAiConfig {
            api_key: env_var("OPENAI_API_KEY"),
            organization: env_var("OPENAI_ORG_ID"),
            project: env_var("OPENAI_PROJECT_ID"),
            ..OpenAiConfig::default()
        };
        if let Some(base_url) = env_var("OPENAI_BASE_URL") {
            config.base_url = base_url;
        }
        config
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("base_url", &redact_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| REDACTED))
            .field("api_key_header", &self.api_key_header)
            .field("query", &ShownQuery(&self.query))
            .field("organization", &self.organization)
            .field("project", &self.project)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// Query parameters for `Debug`, with the values of secret-looking names hidden.
struct ShownQuery<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for ShownQuery<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(name, value)| {
                let lower = name.to_ascii_lowercase();
                let secret = ["key", "token", "secret", "sig", "password", "auth"]
                    .iter()
                    .any(|word| lower.contains(word));
                (
                    name.as_str(),
                    if secret { REDACTED } else { value.as_str() },
                )
            }))
            .finish()
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Embeddings from the OpenAI API or a compatible server (feature `openai`).
///
/// One [`embed`](Embedder::embed) call:
///
/// - checks every text first: an empty one, or one over 8,192 estimated tokens, fails in its
///   own slot and is not sent; the rest go in API calls of at most 2,048 inputs and 300,000
///   estimated tokens each (a larger request is split);
/// - asks for base64 vectors (a quarter of the size of JSON floats, though float arrays are
///   accepted too) and maps them by `data[].index`, checking the count, that every index is
///   in range and unique, and that all vectors have one dimension (the requested one, if
///   any); a malformed answer fails the call with an [`Error::Api`] that names the problem;
/// - retries in one layer (see [`RetryConfig`]): full-jitter exponential backoff, or the
///   server's `Retry-After` (seconds or an HTTP-date) when it sent one; never more than
///   `max_attempts` attempts, and no wait that would end past the `deadline`;
/// - bisects a batch the API refuses (HTTP 400, 413 or 422 about the input): each half is
///   sent again, recursively, so only the inputs refused alone fail, each in its own slot
///   with an [`Error::InvalidInput`] that quotes the API's message;
/// - goes through a circuit breaker: after repeated server errors, connection errors or
///   timeouts it fails fast with [`Error::Unavailable`] until a probe succeeds.
///
/// Usage is the server's `usage` summed over the calls (the estimate, when a server sends
/// none). The API key never appears in `Debug` output, errors or log events: anything a
/// server echoes back is scrubbed, and redirects are not followed.
///
/// ```no_run
/// # async fn run() -> pupkit::Result<()> {
/// use pupkit::embed::{EmbedRequest, Embedder, OpenAiConfig, OpenAiEmbedder};
///
/// // OPENAI_API_KEY (and OPENAI_BASE_URL, if set) from the environment.
/// let embedder = OpenAiEmbedder::new(OpenAiConfig::from_env())?;
/// let texts = vec!["hello world".to_owned(), String::new()];
/// let request = EmbedRequest::new("text-embedding-3-small", texts).dimensions(256);
/// let response = embedder.embed(&request).await?;
/// assert_eq!(response.results[0].as_ref().map(Vec::len).ok(), Some(256));
/// assert!(response.results[1].is_err(), "the empty text fails alone, and is not sent");
/// println!("{} tokens", response.usage.prompt_tokens);
/// # Ok(())
/// # }
/// ```
pub struct OpenAiEmbedder {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    /// The endpoint for logs and errors: no query string, no password.
    shown_endpoint: String,
    headers: HeaderMap,
    /// Kept only to scrub it from anything a server echoes back.
    key: String,
    timeout: Duration,
    retry: RetryConfig,
    breaker: CircuitBreaker,
    requests: metrics::Counter,
    retries: metrics::Counter,
    refused: metrics::Counter,
}

impl fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("endpoint", &self.shown_endpoint)
            .field("api_key", &REDACTED)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("breaker", &self.breaker.state())
            .finish()
    }
}

impl OpenAiEmbedder {
    /// An embedder for `config`. Fails with [`Error::InvalidInput`] when there is no API key
    /// (neither `config.api_key` nor `OPENAI_API_KEY`), or when the base URL, the key header
    /// or a header value is not valid. Connects lazily: nothing is sent until the first call.
    pub fn new(config: OpenAiConfig) -> Result<Self> {
        let key = resolve_key(config.api_key.as_deref(), env_var("OPENAI_API_KEY"))?;
        let endpoint = endpoint(&config.base_url, &config.query)?;
        let mut shown = endpoint.clone();
        shown.set_query(None);
        let shown_endpoint = redact_url(shown.as_str());

        let mut headers = HeaderMap::new();
        let (name, value) = auth_header(&config.api_key_header, &key)?;
        headers.insert(name, value);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value, what) in [
            (
                "openai-organization",
                &config.organization,
                "openai organization",
            ),
            ("openai-project", &config.project, "openai project"),
        ] {
            if let Some(value) = value {
                let value = HeaderValue::from_str(value.trim()).map_err(|_| {
                    Error::invalid(
                        what,
                        format!("{:?} is not a valid HTTP header value", excerpt(value)),
                    )
                })?;
                headers.insert(HeaderName::from_static(name), value);
            }
        }

        let client = reqwest::Client::builder()
            // An API call is not redirected; following one could hand the key to another host.
            .redirect(reqwest::redirect::Policy::none())
            // Retries happen in one layer, here: none inside the client.
            .retry(reqwest::retry::never())
            .user_agent(concat!("pupkit/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Backend {
                backend: BACKEND,
                operation: "build client",
                source: Box::new(e),
            })?;
        Ok(OpenAiEmbedder {
            client,
            endpoint,
            shown_endpoint,
            headers,
            key,
            timeout: config.timeout,
            retry: config.retry,
            breaker: CircuitBreaker::new(BACKEND, config.breaker),
            requests: metrics::counter!("pupkit_openai_requests_total"),
            retries: metrics::counter!("pupkit_openai_retries_total"),
            refused: metrics::counter!("pupkit_openai_refused_inputs_total"),
        })
    }

    /// The circuit breaker's state and counters, for health endpoints.
    pub fn breaker_stats(&self) -> BreakerStats {
        self.breaker.stats()
    }

    /// One API call for `texts`, with its retries.
    async fn call(
        &self,
        request: &EmbedRequest,
        texts: &[&str],
        deadline: Instant,
    ) -> std::result::Result<Reply, Failure> {
        let body = serde_json::to_vec(&WireRequest {
            model: &request.model,
            input: texts,
            encoding_format: "base64",
            dimensions: request.dimensions,
        })
        .map_err(|e| {
            Failure::Fatal(Error::Codec {
                action: "encode",
                key: "openai embeddings request".to_owned(),
                source: Box::new(e),
            })
        })?;
        let body = Bytes::from(body);
        let max_attempts = self.retry.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Failure::Fatal(Error::Timeout {
                    backend: BACKEND,
                    operation: OPERATION,
                    after: self.retry.deadline,
                }));
            }
            let Some(admission) = self.breaker.allow() else {
                return Err(Failure::Fatal(Error::Unavailable {
                    backend: BACKEND,
                    operation: OPERATION,
                    retry_in: self.breaker.retry_in(),
                }));
            };
            let guard = BreakerGuard::new(&self.breaker, admission);
            let per_attempt = self.timeout.min(remaining);
            self.requests.increment(1);
            let sent = tokio::time::timeout(per_attempt, self.send(body.clone())).await;
            let (error, status, hint) = match sent {
                Err(_) => {
                    guard.finish(false);
                    let error = Error::Timeout {
                        backend: BACKEND,
                        operation: OPERATION,
                        after: per_attempt,
                    };
                    (error, None, None)
                }
                Ok(Err(e)) => {
                    guard.finish(false);
                    let error = Error::Backend {
                        backend: BACKEND,
                        operation: "embeddings request",
                        source: Box::new(e.without_url()),
                    };
                    (error, None, None)
                }
                Ok(Ok((status, headers, bytes))) => {
                    guard.finish(!status.is_server_error());
                    if status.is_success() {
                        return decode(
                            status.as_u16(),
                            &bytes,
                            texts.len(),
                            request.dimensions,
                            &self.key,
                        )
                        .map_err(|e| Failure::Fatal(self.scrub_error(e)));
                    }
                    match self.classify(status.as_u16(), &headers, &bytes) {
                        Verdict::Retry { error, hint } => (error, Some(status.as_u16()), hint),
                        Verdict::Stop(failure) => return Err(failure),
                    }
                }
            };
            if attempt >= max_attempts {
                tracing::warn!(
                    endpoint = %self.shown_endpoint, attempts = attempt, error = %error,
                    "openai embeddings call failed; no attempts left"
                );
                return Err(Failure::Fatal(error));
            }
            let wait = hint.unwrap_or_else(|| backoff(&self.retry, attempt - 1));
            if Instant::now()
                .checked_add(wait)
                .is_none_or(|resume| resume >= deadline)
            {
                tracing::warn!(
                    endpoint = %self.shown_endpoint, attempts = attempt,
                    wait_ms = wait.as_millis() as u64,
                    deadline_ms = self.retry.deadline.as_millis() as u64, error = %error,
                    "openai embeddings call failed; the next retry would start past the deadline"
                );
                return Err(Failure::Fatal(error));
            }
            self.retries.increment(1);
            tracing::warn!(
                endpoint = %self.shown_endpoint, status, attempt, max_attempts,
                wait_ms = wait.as_millis() as u64, retry_after = hint.is_some(), error = %error,
                "openai embeddings call failed; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// One HTTP exchange: status, headers and the whole body.
    async fn send(
        &self,
        body: Bytes,
    ) -> std::result::Result<(reqwest::StatusCode, HeaderMap, Bytes), reqwest::Error> {
        let response = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        // Bounded: a faulty server cannot make this process buffer without end. A cut answer
        // then fails to decode, with an error that says so.
        let mut response = response;
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if bytes.len() + chunk.len() > MAX_ANSWER {
                tracing::warn!(limit = MAX_ANSWER, "openai answer over its size limit; cut");
                break;
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok((status, headers, Bytes::from(bytes)))
    }

    /// What to do about an error status.
    fn classify(&self, status: u16, headers: &HeaderMap, body: &[u8]) -> Verdict {
        let mut api = parse_api_error(status, body, &self.key);
        let quota = api.kind.as_deref() == Some("insufficient_quota")
            || api.code.as_deref() == Some("insufficient_quota");
        let server_says = headers
            .get("x-should-retry")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.trim() {
                v if v.eq_ignore_ascii_case("true") => Some(true),
                v if v.eq_ignore_ascii_case("false") => Some(false),
                _ => None,
            });
        let retry =
            !quota && server_says.unwrap_or(matches!(status, 408 | 409 | 429) || status >= 500);
        if retry {
            // A wait of zero (or a date in the past) is no hint: back off rather than hammer.
            let hint = retry_after(headers, jiff::Timestamp::now())
                .or_else(|| {
                    (status == 429)
                        .then(|| try_again_in(&api.message))
                        .flatten()
                })
                .filter(|wait| !wait.is_zero());
            return Verdict::Retry {
                error: api.into_error(),
                hint,
            };
        }
        // A refusal of the inputs (not of the model, the dimensions, ...) is bisected.
        // Without a `param`, only a message about the input or its length counts: a refusal
        // of the model or the dimensions would otherwise be bisected into 2n - 1 requests.
        let about_input = match api.param.as_deref() {
            Some(param) => param.starts_with("input"),
            None => {
                let message = api.message.to_ascii_lowercase();
                ["input", "token", "context length"]
                    .iter()
                    .any(|word| message.contains(word))
            }
        };
        if matches!(status, 400 | 413 | 422) && about_input && !quota {
            return Verdict::Stop(Failure::Refused(api));
        }
        let advice = match status {
            _ if quota => {
                " (the account is out of credit or over its spending limit; retrying will not help)"
            }
            401 => " (check the API key: OPENAI_API_KEY or OpenAiConfig::api_key)",
            403 => " (the key has no access to this model or endpoint)",
            404 => " (check the model name and OpenAiConfig::base_url)",
            _ => "",
        };
        api.message.push_str(advice);
        Verdict::Stop(Failure::Fatal(api.into_error()))
    }

    /// `error` with the key replaced, in case a server echoed it into something we quote.
    fn scrub_error(&self, error: Error) -> Error {
        match error {
            Error::Api {
                backend,
                status,
                kind,
                code,
                message,
            } => Error::Api {
                backend,
                status,
                kind,
                code,
                message: scrub(&message, &self.key),
            },
            other => other,
        }
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    async fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse> {
        if request.model.trim().is_empty() {
            return Err(Error::invalid(
                "embedding model",
                "is empty; name one, such as \"text-embedding-3-small\"",
            ));
        }
        if request.dimensions == Some(0) {
            return Err(Error::invalid("dimensions", "must be at least 1"));
        }
        let deadline = far_from_now(self.retry.deadline);
        let texts = &request.texts;
        let mut results: Vec<Option<Result<Vec<f32>>>> = texts.iter().map(|_| None).collect();
        let mut estimates = vec![0u32; texts.len()];
        let mut pending = Vec::with_capacity(texts.len());
        for (slot, text) in texts.iter().enumerate() {
            match check_text(text) {
                Ok(tokens) => {
                    estimates[slot] = tokens;
                    pending.push(slot);
                }
                Err(error) => results[slot] = Some(Err(error)),
            }
        }

        let mut usage = EmbedUsage::default();
        let mut dimensions = request.dimensions.map(|d| d as usize);
        // A stack of batches of slots, popped in request order; a refused batch pushes its
        // halves.
        let mut stack = chunks(&pending, &estimates);
        stack.reverse();
        while let Some(batch) = stack.pop() {
            let batch_texts: Vec<&str> = batch.iter().map(|&slot| texts[slot].as_str()).collect();
            match self.call(request, &batch_texts, deadline).await {
                Ok(reply) => {
                    let used = reply.usage.unwrap_or_else(|| {
                        let estimate: u64 = batch.iter().map(|&s| u64::from(estimates[s])).sum();
                        tracing::debug!(
                            endpoint = %self.shown_endpoint, estimate,
                            "openai embeddings answer has no usage; counting estimated tokens"
                        );
                        EmbedUsage {
                            prompt_tokens: estimate,
                            total_tokens: estimate,
                        }
                    });
                    usage.prompt_tokens = usage.prompt_tokens.saturating_add(used.prompt_tokens);
                    usage.total_tokens = usage.total_tokens.saturating_add(used.total_tokens);
                    for (&slot, vector) in batch.iter().zip(reply.vectors) {
                        let expected = *dimensions.get_or_insert(vector.len());
                        if vector.len() != expected {
                            return Err(Error::Api {
                                backend: BACKEND,
                                status: 200,
                                kind: None,
                                code: None,
                                message: format!(
                                    "one request's vectors have {} dimensions, another's {expected}",
                                    vector.len()
                                ),
                            });
                        }
                        results[slot] = Some(Ok(vector));
                    }
                }
                Err(Failure::Refused(api)) if batch.len() > 1 => {
                    tracing::debug!(
                        endpoint = %self.shown_endpoint, inputs = batch.len(),
                        status = api.status, message = %api.message,
                        "openai refused a batch; bisecting it to find the bad inputs"
                    );
                    let (first, second) = batch.split_at(batch.len() / 2);
                    stack.push(second.to_vec());
                    stack.push(first.to_vec());
                }
                Err(Failure::Refused(api)) => {
                    let slot = batch[0];
                    self.refused.increment(1);
                    tracing::debug!(
                        endpoint = %self.shown_endpoint, slot, status = api.status,
                        message = %api.message, "openai refused one input"
                    );
                    results[slot] = Some(Err(refused_input(&texts[slot], api)));
                }
                Err(Failure::Fatal(error)) => return Err(error),
            }
        }
        let results = results
            .into_iter()
            .map(|result| {
                result
                    .unwrap_or_else(|| Err(Error::corrupt("openai embedder left a slot unfilled")))
            })
            .collect();
        Ok(EmbedResponse::new(results, usage))
    }

    fn name(&self) -> &str {
        BACKEND
    }
}

/// Records a breaker admission exactly once: with the call's outcome, or as a failure when
/// the call is dropped half-way (so a half-open probe is always handed back).
struct BreakerGuard<'a> {
    breaker: &'a CircuitBreaker,
    admission: Option<Admission>,
}

impl<'a> BreakerGuard<'a> {
    fn new(breaker: &'a CircuitBreaker, admission: Admission) -> Self {
        BreakerGuard {
            breaker,
            admission: Some(admission),
        }
    }

    fn finish(mut self, success: bool) {
        if let Some(admission) = self.admission.take() {
            self.breaker.record(admission, success);
        }
    }
}

impl Drop for BreakerGuard<'_> {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            self.breaker.record(admission, false);
        }
    }
}

/// How one API call (with its retries) ended, short of vectors.
enum Failure {
    /// The API refused the inputs (HTTP 400, 413 or 422): bisect the batch, or fail the one
    /// input's slot.
    Refused(ApiError),
    /// Anything else fails the whole `embed` call.
    Fatal(Error),
}

/// What to do after an error status.
enum Verdict {
    /// Try again, after `hint` if the server said how long.
    Retry {
        error: Error,
        hint: Option<Duration>,
    },
    /// Give up.
    Stop(Failure),
}

/// One API call's vectors, in input order, and its usage if the server reported it.
#[derive(Debug)]
struct Reply {
    vectors: Vec<Vec<f32>>,
    usage: Option<EmbedUsage>,
}

/// An error answer, with the key already scrubbed out.
#[derive(Debug)]
struct ApiError {
    status: u16,
    kind: Option<String>,
    code: Option<String>,
    param: Option<String>,
    message: String,
}

impl ApiError {
    fn into_error(self) -> Error {
        Error::Api {
            backend: BACKEND,
            status: self.status,
            kind: self.kind,
            code: self.code,
            message: self.message,
        }
    }
}

/// The error of one input the API refused.
fn refused_input(text: &str, api: ApiError) -> Error {
    let code = api
        .code
        .or(api.kind)
        .map(|c| format!(", {c}"))
        .unwrap_or_default();
    Error::invalid(
        "text",
        format!(
            "{:?} was refused by the openai API (HTTP {}{code}): {}",
            excerpt(text),
            api.status,
            api.message
        ),
    )
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    input: &'a [&'a str],
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
}

#[derive(Deserialize)]
struct WireResponse {
    data: Vec<WireEmbedding>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    index: usize,
    embedding: WireVector,
}

/// Base64 of little-endian f32 (what we ask for), or floats (from servers that ignore
/// `encoding_format`).
#[derive(Deserialize)]
#[serde(untagged)]
enum WireVector {
    Base64(String),
    Floats(Vec<f32>),
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

/// Decodes a 2xx answer for `expected` inputs: vectors by `data[].index`, all of one
/// dimension (`dimensions` when asked for).
fn decode(
    status: u16,
    body: &[u8],
    expected: usize,
    dimensions: Option<u32>,
    key: &str,
) -> Result<Reply> {
    let invalid = |message: String| Error::Api {
        backend: BACKEND,
        status,
        kind: None,
        code: None,
        message,
    };
    let response: WireResponse = serde_json::from_slice(body).map_err(|e| {
        // Scrub the key from a window longer than the excerpt, so a key cut by the excerpt
        // cannot survive in part; then clip.
        let start = String::from_utf8_lossy(&body[..body.len().min(64 + key.len())]);
        let start = scrub(&start, key);
        let start: String = start.chars().take(64).collect();
        invalid(clip(&scrub(
            &format!("the answer is not embeddings JSON ({e}); it starts {start:?}"),
            key,
        )))
    })?;
    if response.data.len() != expected {
        return Err(invalid(format!(
            "the answer has {} embeddings for {expected} inputs",
            response.data.len()
        )));
    }
    let mut vectors: Vec<Option<Vec<f32>>> = (0..expected).map(|_| None).collect();
    let mut width = dimensions.map(|d| d as usize);
    for (position, item) in response.data.into_iter().enumerate() {
        let index = item.index;
        let Some(place) = vectors.get_mut(index) else {
            return Err(invalid(format!(
                "data[{position}].index is {index}, out of range for {expected} inputs"
            )));
        };
        if place.is_some() {
            return Err(invalid(format!("index {index} appears more than once")));
        }
        let vector = match item.embedding {
            WireVector::Floats(floats) => floats,
            WireVector::Base64(text) => decode_base64(&text)
                .map_err(|reason| invalid(format!("the embedding of index {index} {reason}")))?,
        };
        if vector.is_empty() {
            return Err(invalid(format!("the embedding of index {index} is empty")));
        }
        match width {
            Some(w) if w != vector.len() => {
                let expectation = match dimensions {
                    Some(d) => format!("{d} were requested"),
                    None => format!("others have {w}"),
                };
                return Err(invalid(format!(
                    "the embedding of index {index} has {} dimensions, but {expectation}",
                    vector.len()
                )));
            }
            _ => width = Some(vector.len()),
        }
        *place = Some(vector);
    }
    // Count matched and every index was in range and unique, so every slot is filled.
    let vectors = vectors.into_iter().flatten().collect();
    let usage = response.usage.and_then(|u| {
        u.prompt_tokens.map(|prompt| EmbedUsage {
            prompt_tokens: prompt,
            total_tokens: u.total_tokens.unwrap_or(prompt),
        })
    });
    Ok(Reply { vectors, usage })
}

/// Base64 of little-endian f32s.
fn decode_base64(text: &str) -> std::result::Result<Vec<f32>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("is not valid base64 ({e})"))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "decodes to {} bytes, not a whole number of 4-byte f32 values",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The `{"error": {"message", "type", "param", "code"}}` envelope, leniently: compatible
/// servers send `{"error": "..."}`, `{"message": ...}`, `{"detail": ...}` or plain text.
fn parse_api_error(status: u16, body: &[u8], key: &str) -> ApiError {
    let value: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let text = |v: Option<&serde_json::Value>| -> Option<String> {
        match v? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let (message, kind, code, param) = match value.as_ref().and_then(|v| v.get("error")) {
        Some(error @ serde_json::Value::Object(_)) => (
            text(error.get("message")),
            text(error.get("type")),
            text(error.get("code")),
            text(error.get("param")),
        ),
        Some(error) => (text(Some(error)), None, None, None),
        None => (
            value
                .as_ref()
                .and_then(|v| text(v.get("message")).or_else(|| text(v.get("detail")))),
            None,
            None,
            None,
        ),
    };
    let message = message.unwrap_or_else(|| {
        let body = String::from_utf8_lossy(body);
        let body = body.trim();
        if body.is_empty() {
            reqwest::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("no message")
                .to_owned()
        } else {
            body.to_owned()
        }
    });
    let clean = |s: String| clip(&scrub(&s, key));
    ApiError {
        status,
        kind: kind.map(clean),
        code: code.map(clean),
        param: param.map(clean),
        message: clean(message),
    }
}

/// `text` with every occurrence of `key` replaced.
fn scrub(text: &str, key: &str) -> String {
    if key.is_empty() {
        text.to_owned()
    } else {
        text.replace(key, REDACTED)
    }
}

/// `text` cut to [`MAX_MESSAGE`] bytes on a char boundary.
fn clip(text: &str) -> String {
    if text.len() <= MAX_MESSAGE {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// The server's wait: `retry-after-ms` (milliseconds), else `Retry-After` as seconds or an
/// HTTP-date (RFC 9110 IMF-fixdate, such as `Sun, 06 Nov 1994 08:49:37 GMT`) measured from
/// `now`. A date in the past is a wait of zero.
fn retry_after(headers: &HeaderMap, now: jiff::Timestamp) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = get("retry-after-ms").and_then(|v| seconds(v, 1_000.0)) {
        return Some(ms);
    }
    parse_retry_after(get("retry-after")?, now)
}

/// `Retry-After`: seconds or an HTTP-date, measured from `now`.
fn parse_retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Some(wait) = seconds(value, 1.0) {
        return Some(wait);
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let millis = at.as_millisecond().saturating_sub(now.as_millisecond());
    Some(Duration::from_millis(u64::try_from(millis).unwrap_or(0)))
}

/// A non-negative decimal number of units (`per_second` units in a second) as a duration.
fn seconds(value: &str, per_second: f64) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let number: f64 = value.parse().ok()?;
    // Digits and dots only, so never negative or NaN; too large for a Duration is "forever".
    Some(Duration::try_from_secs_f64(number / per_second).unwrap_or(Duration::MAX))
}

/// The wait in a rate-limit message: "Please try again in 2.812s." or "... in 350ms."
fn try_again_in(message: &str) -> Option<Duration> {
    const MARK: &str = "try again in ";
    let start = message.find(MARK)? + MARK.len();
    let rest = &message[start..];
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, unit) = rest.split_at(number_end);
    let number = number.trim_end_matches('.');
    if unit.starts_with("ms") {
        seconds(number, 1_000.0)
    } else if unit.starts_with('s') {
        seconds(number, 1.0)
    } else {
        None
    }
}

/// Full-jitter exponential backoff before retry `retry` (0 for the first): uniform in
/// `[0, min(max_delay, base_delay * 2^retry))`.
fn backoff(config: &RetryConfig, retry: u32) -> Duration {
    crate::resilience::Backoff::new(config.base_delay, config.max_delay)
        .jitter(1.0)
        .delay(retry)
}

/// `after` from now, or a century from now if that overflows the clock.
fn far_from_now(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Slots split into consecutive batches of at most [`MAX_INPUTS`] inputs and
/// [`MAX_REQUEST_TOKENS`] estimated tokens.
fn chunks(slots: &[usize], estimates: &[u32]) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut batch: Vec<usize> = Vec::new();
    let mut tokens = 0u64;
    for &slot in slots {
        let estimate = u64::from(estimates[slot]);
        if !batch.is_empty()
            && (batch.len() >= MAX_INPUTS || tokens + estimate > u64::from(MAX_REQUEST_TOKENS))
        {
            batches.push(std::mem::take(&mut batch));
            tokens = 0;
        }
        batch.push(slot);
        tokens += estimate;
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

/// The key from the config, else from the environment; never empty.
fn resolve_key(configured: Option<&str>, from_env: Option<String>) -> Result<String> {
    configured
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .or_else(|| from_env.map(|k| k.trim().to_owned()).filter(|k| !k.is_empty()))
        .ok_or_else(|| {
            Error::invalid(
                "openai api key",
                "none configured: set the OPENAI_API_KEY environment variable or OpenAiConfig::api_key",
            )
        })
}

/// `{base_url}/embeddings` with the query parameters.
fn endpoint(base_url: &str, query: &BTreeMap<String, String>) -> Result<reqwest::Url> {
    let shown = redact_url(base_url);
    let invalid = |reason: String| Error::invalid("openai base url", reason);
    let mut url = reqwest::Url::parse(base_url.trim())
        .map_err(|e| invalid(format!("{shown:?} is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("{shown:?} is not an http(s) URL")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(format!(
            "{shown:?} has a query string or fragment; put query parameters such as api-version in OpenAiConfig::query"
        )));
    }
    let already = url
        .path_segments()
        .and_then(|mut segments| segments.rfind(|s| !s.is_empty()))
        == Some("embeddings");
    if !already {
        url.path_segments_mut()
            .map_err(|_| invalid(format!("{shown:?} cannot be a base URL")))?
            .pop_if_empty()
            .push("embeddings");
    }
    if !query.is_empty() {
        let mut pairs = url.query_pairs_mut();
        for (name, value) in query {
            pairs.append_pair(name, value);
        }
    }
    Ok(url)
}

/// The header carrying the key: `Authorization: Bearer <key>`, or `<name>: <key>`.
fn auth_header(name: &str, key: &str) -> Result<(HeaderName, HeaderValue)> {
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| {
        Error::invalid(
            "openai api key header",
            format!("{:?} is not a valid HTTP header name", excerpt(name)),
        )
    })?;
    let value = if name == header::AUTHORIZATION {
        format!("Bearer {key}")
    } else {
        key.to_owned()
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| {
        Error::invalid(
            "openai api key",
            "contains characters an HTTP header cannot carry (a newline or other control character?)",
        )
    })?;
    value.set_sensitive(true);
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;

    fn config(key: &str) -> OpenAiConfig {
        OpenAiConfig {
            api_key: Some(key.to_owned()),
            ..OpenAiConfig::default()
        }
    }

    #[test]
    fn embedder_is_send_sync_and_usable_as_dyn_embedder() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<OpenAiEmbedder>();
        let embedder = OpenAiEmbedder::new(config("sk-test")).unwrap();
        let shared: Arc<dyn Embedder> = Arc::new(embedder);
        assert_eq!(shared.name(), "openai");
    }

    #[test]
    fn retry_after_reads_seconds_dates_and_milliseconds() {
        let now: jiff::Timestamp = "1994-11-06T08:49:30Z".parse().unwrap();
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after(" 20 ", now),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999", now),
            Some(Duration::MAX)
        );
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1_500))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: retry now"
        );
        for bad in [
            "",
            "-1",
            "soon",
            "1e3",
            "Sun, 06 Nov 1994",
            "Mon, 06 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(3)));
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(
            retry_after(&headers, now),
            Some(Duration::from_millis(250)),
            "retry-after-ms is the more precise and wins"
        );
    }

    #[test]
    fn rate_limit_messages_give_a_wait() {
        let tpm = "Rate limit reached for text-embedding-3-small in organization org-x on tokens per min (TPM): Limit 1000000, Used 976163, Requested 70716. Please try again in 2.812s. Visit https://platform.openai.com/account/rate-limits";
        assert_eq!(try_again_in(tpm), Some(Duration::from_millis(2_812)));
        assert_eq!(
            try_again_in("... Please try again in 20s."),
            Some(Duration::from_secs(20))
        );
        assert_eq!(
            try_again_in("Please try again in 350ms."),
            Some(Duration::from_millis(350))
        );
        assert_eq!(try_again_in("Please try again later."), None);
        assert_eq!(try_again_in("try again in 6m0s"), None);
    }

    #[test]
    fn backoff_is_full_jitter_under_the_cap() {
        let config = RetryConfig::default();
        for retry in 0..40 {
            let ceiling =
                (Duration::from_millis(500) * 2u32.pow(retry.min(20))).min(Duration::from_secs(8));
            let wait = backoff(&config, retry);
            assert!(wait < ceiling, "retry {retry}: {wait:?} >= {ceiling:?}");
        }
        let waits: HashSet<Duration> = (0..20).map(|_| backoff(&config, 4)).collect();
        assert!(waits.len() > 10, "jittered: {waits:?}");
    }

    #[test]
    fn chunks_respect_input_and_token_limits() {
        // 40 texts of 8,000 tokens: 37 fit under 300,000.
        let estimates = vec![8_000u32; 40];
        let slots: Vec<usize> = (0..40).collect();
        let batches = chunks(&slots, &estimates);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![37, 3]
        );
        let estimates = vec![1u32; 5_000];
        let slots: Vec<usize> = (0..5_000).collect();
        let batches = chunks(&slots, &estimates);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2_048, 2_048, 904]
        );
        assert_eq!(batches.concat(), slots, "in order, each slot once");
        assert!(chunks(&[], &[]).is_empty());
    }

    #[test]
    fn decode_maps_by_index_and_names_what_is_wrong() {
        let b64 = |v: &[f32]| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            base64::engine::general_purpose::STANDARD.encode(bytes)
        };
        let body = serde_json::json!({
            "object": "list",
            "data": [
                {"object": "embedding", "index": 1, "embedding": b64(&[3.0, 4.0])},
                {"object": "embedding", "index": 0, "embedding": [1.0, 2.0]},
            ],
            "model": "m",
            "usage": {"prompt_tokens": 5, "total_tokens": 5}
        });
        let reply = decode(200, body.to_string().as_bytes(), 2, Some(2), "").unwrap();
        assert_eq!(reply.vectors, vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(reply.usage.unwrap().prompt_tokens, 5);

        let err = |body: serde_json::Value, expected: usize, dims: Option<u32>| {
            decode(200, body.to_string().as_bytes(), expected, dims, "")
                .unwrap_err()
                .to_string()
        };
        let item = |index: i64, embedding: serde_json::Value| serde_json::json!({"index": index, "embedding": embedding});
        let e = err(
            serde_json::json!({"data": [item(0, b64(&[1.0]).into())]}),
            2,
            None,
        );
        assert!(e.contains("1 embeddings for 2 inputs"), "{e}");
        let e = err(
            serde_json::json!({"data": [item(0, "AAAAAAA=".into())]}),
            1,
            None,
        );
        assert!(e.contains("5 bytes") && e.contains("4-byte"), "{e}");
        let e = err(serde_json::json!({"data": [item(0, "!!".into())]}), 1, None);
        assert!(e.contains("not valid base64"), "{e}");
        let e = err(
            serde_json::json!({"data": [item(3, b64(&[1.0]).into()), item(0, b64(&[1.0]).into())]}),
            2,
            None,
        );
        assert!(e.contains("index is 3, out of range"), "{e}");
        let e = err(
            serde_json::json!({"data": [item(0, b64(&[1.0]).into()), item(0, b64(&[1.0]).into())]}),
            2,
            None,
        );
        assert!(e.contains("index 0 appears more than once"), "{e}");
        let e = err(
            serde_json::json!({"data": [item(0, b64(&[1.0, 2.0]).into()), item(1, b64(&[1.0]).into())]}),
            2,
            None,
        );
        assert!(e.contains("1 dimensions, but others have 2"), "{e}");
        let e = err(
            serde_json::json!({"data": [item(0, b64(&[1.0]).into())]}),
            1,
            Some(4),
        );
        assert!(e.contains("1 dimensions, but 4 were requested"), "{e}");
        let e = decode(200, b"<html>oops</html>", 1, None, "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not embeddings JSON") && e.contains("<html>"),
            "{e}"
        );
        let e = err(
            serde_json::json!({"data": [item(-1, b64(&[1.0]).into())]}),
            1,
            None,
        );
        assert!(e.contains("not embeddings JSON"), "{e}");
        // No usage: left to the caller to estimate.
        let body = serde_json::json!({"data": [item(0, b64(&[1.0]).into())]});
        assert!(
            decode(200, body.to_string().as_bytes(), 1, None, "")
                .unwrap()
                .usage
                .is_none()
        );
    }

    #[test]
    fn api_errors_are_parsed_leniently_and_scrubbed() {
        let body = br#"{"error": {"message": "Incorrect API key provided: sk-secret-123.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}"#;
        let api = parse_api_error(401, body, "sk-secret-123");
        assert_eq!(api.code.as_deref(), Some("invalid_api_key"));
        assert_eq!(api.kind.as_deref(), Some("invalid_request_error"));
        assert_eq!(api.param, None);
        assert_eq!(api.message, "Incorrect API key provided: <redacted>.");
        let api = parse_api_error(400, br#"{"error": "bad input", "code": 400}"#, "k");
        assert_eq!(api.message, "bad input");
        let api = parse_api_error(422, br#"{"detail": "field required"}"#, "k");
        assert_eq!(api.message, "field required");
        let api = parse_api_error(400, br#"{"error": {"message": "x", "code": 400}}"#, "k");
        assert_eq!(api.code.as_deref(), Some("400"));
        let api = parse_api_error(502, b"", "k");
        assert_eq!(api.message, "Bad Gateway");
        let long = "x".repeat(5_000);
        assert!(parse_api_error(500, long.as_bytes(), "k").message.len() <= MAX_MESSAGE + 3);
    }

    #[test]
    fn config_checks_key_url_and_headers() {
        assert_eq!(resolve_key(Some(" sk-a "), None).unwrap(), "sk-a");
        assert_eq!(
            resolve_key(Some(""), Some("sk-env".into())).unwrap(),
            "sk-env"
        );
        let error = resolve_key(None, Some("  ".into())).unwrap_err();
        assert!(
            error.is_invalid_input() && error.to_string().contains("OPENAI_API_KEY"),
            "{error}"
        );

        let mut query = BTreeMap::new();
        assert_eq!(
            endpoint("https://api.openai.com/v1", &query)
                .unwrap()
                .as_str(),
            "https://api.openai.com/v1/embeddings"
        );
        assert_eq!(
            endpoint("http://127.0.0.1:8080/v1/", &query)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/v1/embeddings"
        );
        assert_eq!(
            endpoint("http://host/v1/embeddings", &query)
                .unwrap()
                .as_str(),
            "http://host/v1/embeddings"
        );
        query.insert("api-version".to_owned(), "2024-10-21".to_owned());
        assert_eq!(
            endpoint("https://r.openai.azure.com/openai/deployments/d", &query)
                .unwrap()
                .as_str(),
            "https://r.openai.azure.com/openai/deployments/d/embeddings?api-version=2024-10-21"
        );
        for bad in [
            "not a url",
            "ftp://host/v1",
            "https://host/v1?api-version=1",
        ] {
            let error = endpoint(bad, &BTreeMap::new()).unwrap_err();
            assert!(error.is_invalid_input(), "{bad}: {error}");
        }
        let mut bad = config("sk-a");
        bad.base_url = "https://user:hunter2@host/v1?x=1".to_owned();
        let error = OpenAiEmbedder::new(bad).unwrap_err().to_string();
        assert!(!error.contains("hunter2"), "{error}");

        let (name, value) = auth_header("authorization", "sk-a").unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("authorization", "Bearer sk-a")
        );
        assert!(value.is_sensitive());
        let (name, value) = auth_header("api-key", "sk-a").unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("api-key", "sk-a")
        );
        let error = auth_header("authorization", "sk-secret\nx")
            .unwrap_err()
            .to_string();
        assert!(!error.contains("sk-secret"), "{error}");
        assert!(auth_header("bad header", "k").is_err());
    }

    #[test]
    fn config_deserializes_with_durations_and_defaults() {
        let config: OpenAiConfig = serde_json::from_value(serde_json::json!({
            "base_url": "http://localhost:8000/v1",
            "timeout": "5s",
            "query": {"api-version": "2024-10-21"},
            "retry": {"max_attempts": 3, "base_delay": 100, "deadline": "20s"}
        }))
        .unwrap();
        assert_eq!(config.timeout, Duration::from_secs(5));
        assert_eq!(config.retry.max_attempts, 3);
        assert_eq!(config.retry.base_delay, Duration::from_millis(100));
        assert_eq!(config.retry.max_delay, Duration::from_secs(8));
        assert_eq!(config.retry.deadline, Duration::from_secs(20));
        assert_eq!(config.api_key_header, "authorization");
        assert_eq!(config.api_key, None);
    }

    #[test]
    fn debug_never_shows_the_key() {
        let mut config = config("sk-very-secret");
        config
            .query
            .insert("api-key".to_owned(), "sk-very-secret".to_owned());
        config
            .query
            .insert("api-version".to_owned(), "1".to_owned());
        config.base_url = "https://user:pw-secret@host/v1".to_owned();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("sk-very-secret") && !shown.contains("pw-secret"),
            "{shown}"
        );
        assert!(
            shown.contains("<redacted>") && shown.contains("api-version"),
            "{shown}"
        );
        config.query.clear();
        let embedder = OpenAiEmbedder::new(config).unwrap();
        let shown = format!("{embedder:?} {embedder:#?}");
        assert!(
            !shown.contains("sk-very-secret") && !shown.contains("pw-secret"),
            "{shown}"
        );
    }
}
