//! The embedding batcher: single-text calls from many callers merged into API calls of up to
//! `batch_size` unique texts, flushed by size, window or token budget; deduplicated within a
//! batch, against calls in flight and against the cache; each caller's share of the cost
//! recorded to a cost meter.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;

use super::embedder::{EmbedRequest, Embedder, MAX_INPUTS, MAX_REQUEST_TOKENS, check_text};
use crate::cache::{EntryOptions, TieredCache};
use crate::cost::{CostMeter, MicroUsd, Reservation, Spender, Usage, UsageSource};
use crate::error::{self, Error, Result};
use crate::tally::Tally;

/// Settings of a [`Batcher`]. The defaults are the report's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BatcherConfig {
    /// The model. Default `text-embedding-3-small`.
    pub model: String,
    /// Shorter vectors (`text-embedding-3-*` only). Default none: the model's own.
    pub dimensions: Option<u32>,
    /// Unique texts per API call; a batch is sent as soon as it has this many. Default 10
    /// (the report's), at most 2,048 (the API's).
    pub batch_size: usize,
    /// How long the first text of a batch waits for others before the batch is sent anyway.
    /// Default 5 s (the report's).
    #[serde(with = "crate::serde_duration")]
    pub window: Duration,
    /// Estimated tokens per API call; a batch is sent before it would pass them. Default
    /// 300,000 (the API's limit per request).
    pub max_batch_tokens: u32,
    /// Callers that may wait at once; past it, `embed` fails at once with an error saying
    /// so. Default 10,000.
    pub queue_capacity: usize,
    /// API calls in flight at once. Default 4.
    pub max_concurrent_calls: usize,
    /// How long vectors stay cached. Default 7 days (the report's).
    #[serde(with = "crate::serde_duration")]
    pub cache_ttl: Duration,
    /// The operation name of the usage events recorded. Default `"embedding"`.
    pub operation: String,
}

impl Default for BatcherConfig {
    fn default() -> Self {
        BatcherConfig {
            model: "text-embedding-3-small".to_owned(),
            dimensions: None,
            batch_size: 10,
            window: Duration::from_secs(5),
            max_batch_tokens: MAX_REQUEST_TOKENS,
            queue_capacity: 10_000,
            max_concurrent_calls: 4,
            cache_ttl: Duration::from_secs(7 * 86_400),
            operation: "embedding".to_owned(),
        }
    }
}

impl BatcherConfig {
    fn validate(&self) -> Result<()> {
        if self.model.is_empty() || self.model.len() > crate::cost::MAX_ID_LEN {
            return Err(Error::invalid(
                "model",
                format!("{:?} must be 1 to 128 bytes", self.model),
            ));
        }
        if self.batch_size == 0 || self.batch_size > MAX_INPUTS {
            return Err(Error::invalid(
                "batch_size",
                format!("{} is outside 1 to {MAX_INPUTS}", self.batch_size),
            ));
        }
        if self.max_batch_tokens == 0 || self.max_batch_tokens > MAX_REQUEST_TOKENS {
            return Err(Error::invalid(
                "max_batch_tokens",
                format!(
                    "{} is outside 1 to {MAX_REQUEST_TOKENS}",
                    self.max_batch_tokens
                ),
            ));
        }
        if self.queue_capacity == 0 || self.max_concurrent_calls == 0 {
            return Err(Error::invalid(
                "queue_capacity",
                "queue_capacity and max_concurrent_calls must be at least 1",
            ));
        }
        if self.dimensions.is_some_and(|d| d == 0 || d > 65_536) {
            return Err(Error::invalid(
                "dimensions",
                format!("{:?} is outside 1 to 65,536", self.dimensions),
            ));
        }
        if self.window > Duration::from_secs(3_600) {
            return Err(Error::invalid(
                "window",
                format!("{:?} is over an hour", self.window),
            ));
        }
        if self.max_concurrent_calls > 1_024 {
            return Err(Error::invalid(
                "max_concurrent_calls",
                format!("{} is over 1,024", self.max_concurrent_calls),
            ));
        }
        Ok(())
    }
}

/// One caller's embedding.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Embedding {
    /// The vector.
    pub vector: Arc<Vec<f32>>,
    /// The tokens charged to this caller (its share of the call's `prompt_tokens`; zero when
    /// served from the cache or merged with another caller's text).
    pub tokens: u64,
    /// What this caller was charged.
    pub cost: MicroUsd,
    /// What the cache or dedup saved this caller.
    pub saved: MicroUsd,
    /// Served from the cache.
    pub cached: bool,
    /// Merged with another caller's identical text (in a pending batch or a call in flight).
    pub deduped: bool,
}

/// Counters of a batcher.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BatcherStats {
    /// `embed` calls (one per text).
    pub requests: u64,
    /// API calls made.
    pub api_calls: u64,
    /// API calls that failed as a whole.
    pub failed_calls: u64,
    /// Texts sent to the API.
    pub texts_sent: u64,
    /// Texts served from the cache.
    pub cache_hits: u64,
    /// Cache reads or writes that failed (and were bypassed).
    pub cache_errors: u64,
    /// Texts merged with an identical pending or in-flight text.
    pub deduped: u64,
    /// Callers turned away because the queue was full.
    pub rejected: u64,
    /// Prompt tokens the API reported.
    pub tokens: u64,
}

/// Embeddings one text at a time for many concurrent callers, batched underneath.
///
/// [`Batcher`] implements it over any [`Embedder`].
#[async_trait]
pub trait EmbeddingBatcher: Send + Sync + fmt::Debug {
    /// The embedding of `text` for `caller`, whose share of the cost is recorded.
    async fn embed(&self, text: &str, caller: &Spender) -> Result<Embedding>;

    /// The embeddings of several texts for one caller, each with its own outcome.
    async fn embed_many(&self, texts: &[String], caller: &Spender) -> Vec<Result<Embedding>>;

    /// Activity counters.
    fn stats(&self) -> BatcherStats;
}

/// What a call delivers to one waiting caller.
struct Delivery {
    vector: Arc<Vec<f32>>,
    tokens: u64,
    cost: MicroUsd,
    saved: MicroUsd,
}

/// A caller waiting for a text's vector.
struct Waiter {
    caller: Spender,
    reservation: Option<Reservation>,
    reply: oneshot::Sender<Result<Delivery>>,
}

/// One unique text, pending or in flight, and everyone waiting for it.
struct Slot {
    tokens: u32,
    queued_at: Instant,
    waiters: Vec<Waiter>,
}

#[derive(Default)]
struct State {
    /// Unique texts not yet sent, in arrival order.
    pending: VecDeque<String>,
    pending_tokens: u64,
    /// Every unique text pending or in flight.
    slots: HashMap<String, Slot>,
    /// Callers waiting, for the queue bound.
    waiting: usize,
    closed: bool,
}

struct Counters {
    requests: Tally,
    api_calls: Tally,
    failed_calls: Tally,
    texts_sent: Tally,
    cache_hits: Tally,
    cache_errors: Tally,
    deduped: Tally,
    rejected: Tally,
    tokens: Tally,
}

impl Counters {
    fn new() -> Self {
        let tally = |name| Tally::new(name, Vec::new());
        Counters {
            requests: tally("pupkit_embed_requests_total"),
            api_calls: tally("pupkit_embed_api_calls_total"),
            failed_calls: tally("pupkit_embed_failed_calls_total"),
            texts_sent: tally("pupkit_embed_texts_sent_total"),
            cache_hits: tally("pupkit_embed_cache_hits_total"),
            cache_errors: tally("pupkit_embed_cache_errors_total"),
            deduped: tally("pupkit_embed_deduped_total"),
            rejected: tally("pupkit_embed_rejected_total"),
            tokens: tally("pupkit_embed_tokens_total"),
        }
    }
}

struct Shared {
    config: BatcherConfig,
    embedder: Arc<dyn Embedder>,
    cache: Option<Arc<dyn TieredCache<Vec<f32>>>>,
    meter: Option<Arc<dyn CostMeter>>,
    state: Mutex<State>,
    wake: Notify,
    calls: Arc<Semaphore>,
    counters: Counters,
    /// Per caller, pico-dollars of cost and of savings not yet recorded (below one
    /// micro-dollar each).
    carry: Mutex<HashMap<Spender, (i128, i128)>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The usage event of `tokens` for `caller`, served from `source`, with its cost worked
    /// out to the pico-dollar and recorded in whole micro-dollars, the fraction carried to
    /// the caller's next event. One short text costs well under a micro-dollar; carried, each
    /// caller's recorded total stays within a micro-dollar of the exact one.
    fn usage(&self, caller: &Spender, tokens: u64, source: UsageSource) -> Usage {
        let usage = usage_for(&self.config, caller, tokens).source(source);
        let Some(meter) = &self.meter else {
            return usage;
        };
        // The standard price of a million times the tokens, in micro-dollars, is the price
        // of the tokens in pico-dollars.
        let scaled = usage_for(&self.config, caller, tokens.saturating_mul(1_000_000));
        let Some(pico) = meter.estimate(&scaled) else {
            return usage; // unpriced: the meter records it so, and alerts
        };
        let mut carry = self.carry.lock().unwrap_or_else(|p| p.into_inner());
        if carry.len() >= 100_000 && !carry.contains_key(caller) {
            // Bounded: forgetting the fractions loses under a micro-dollar per caller.
            carry.clear();
        }
        let fractions = carry.entry(caller.clone()).or_default();
        let slot = if source.is_saving() {
            &mut fractions.1
        } else {
            &mut fractions.0
        };
        let total = *slot + i128::from(pico.micros());
        *slot = total % 1_000_000;
        usage.cost(MicroUsd::from_micros((total / 1_000_000) as i64))
    }
}

/// Batches, deduplicates, caches and accounts embeddings over an [`Embedder`].
///
/// ```
/// use std::sync::Arc;
/// use pupkit::cost::Spender;
/// use pupkit::embed::{Batcher, BatcherConfig, EmbeddingBatcher, LocalEmbedder};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pupkit::Result<()> {
/// let mut config = BatcherConfig::default();
/// config.window = std::time::Duration::from_millis(20);
/// let batcher = Batcher::builder(config).embedder(Arc::new(LocalEmbedder::new(64))).build()?;
/// let embedding = batcher.embed("hello", &Spender::new("search", "u1")).await?;
/// assert_eq!(embedding.vector.len(), 64);
/// batcher.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub struct Batcher {
    shared: Arc<Shared>,
    worker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.shared.config)
            .field("embedder", &self.shared.embedder)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Batcher`].
pub struct BatcherBuilder {
    config: BatcherConfig,
    embedder: Option<Arc<dyn Embedder>>,
    cache: Option<Arc<dyn TieredCache<Vec<f32>>>>,
    meter: Option<Arc<dyn CostMeter>>,
}

impl BatcherBuilder {
    /// The embedder the batches go to (required).
    pub fn embedder(mut self, embedder: Arc<dyn Embedder>) -> Self {
        self.embedder = Some(embedder);
        self
    }

    /// A cache for vectors (optional; keyed by a hash of model, dimensions and text).
    pub fn cache(mut self, cache: Arc<dyn TieredCache<Vec<f32>>>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// A cost meter that records each caller's share, savings, and enforces hard budgets
    /// (optional).
    pub fn meter(mut self, meter: Arc<dyn CostMeter>) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Checks the configuration and starts the batcher's task. Must be called inside a
    /// Tokio runtime.
    pub fn build(self) -> Result<Batcher> {
        self.config.validate()?;
        let embedder = self
            .embedder
            .ok_or_else(|| Error::invalid("embedder", "a Batcher needs an embedder"))?;
        let shared = Arc::new(Shared {
            calls: Arc::new(Semaphore::new(self.config.max_concurrent_calls)),
            config: self.config,
            embedder,
            cache: self.cache,
            meter: self.meter,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            counters: Counters::new(),
            carry: Mutex::new(HashMap::new()),
        });
        let worker = tokio::spawn(run(shared.clone()));
        Ok(Batcher {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }
}

impl Batcher {
    /// A builder with `config`.
    pub fn builder(config: BatcherConfig) -> BatcherBuilder {
        BatcherBuilder {
            config,
            embedder: None,
            cache: None,
            meter: None,
        }
    }

    /// The cache key of a text: a SHA-256 of model, dimensions and the exact text.
    pub fn cache_key(&self, text: &str) -> String {
        cache_key_for(&self.shared.config, text)
    }

    /// Stops taking texts, sends what is pending at once, and waits for every call in
    /// flight. Callers waiting get their vectors; new ones get an error.
    pub async fn shutdown(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(worker) = worker {
            let _ = worker.await;
        }
    }

    /// Serves a cache hit, or `None` on a miss or a cache failure (which is bypassed).
    async fn cached(&self, key: &str, text: &str, caller: &Spender) -> Option<Embedding> {
        let cache = self.shared.cache.as_ref()?;
        let vector = match cache.get(key).await {
            Ok(hit) => hit?,
            Err(error) => {
                self.shared.counters.cache_errors.add(1);
                tracing::warn!(%error, "embedding cache unavailable; bypassing it");
                return None;
            }
        };
        self.shared.counters.cache_hits.add(1);
        let saved = self.record_saving(caller, text, UsageSource::Cache).await;
        Some(Embedding {
            vector,
            tokens: 0,
            cost: MicroUsd::ZERO,
            saved,
            cached: true,
            deduped: false,
        })
    }

    /// Records what serving `text` without an API call saved; returns the saving.
    async fn record_saving(&self, caller: &Spender, text: &str, source: UsageSource) -> MicroUsd {
        let Some(meter) = &self.shared.meter else {
            return MicroUsd::ZERO;
        };
        let tokens = u64::from(super::estimate_tokens(text));
        match meter
            .record(self.shared.usage(caller, tokens, source))
            .await
        {
            Ok(recorded) => recorded.saved,
            Err(error) => {
                tracing::warn!(%error, "could not record an embedding saving");
                MicroUsd::ZERO
            }
        }
    }
}

fn usage_for(config: &BatcherConfig, caller: &Spender, tokens: u64) -> Usage {
    let id = format!("emb-{:032x}", crate::random::random_u128());
    Usage::new(id, &caller.service, &caller.user, &config.model)
        .operation(&config.operation)
        .tokens(tokens, 0)
}

impl Drop for Batcher {
    fn drop(&mut self) {
        // The task flushes what is pending and ends once it is closed.
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

#[async_trait]
impl EmbeddingBatcher for Batcher {
    async fn embed(&self, text: &str, caller: &Spender) -> Result<Embedding> {
        let shared = &self.shared;
        shared.counters.requests.add(1);
        let tokens = check_text(text)?;
        let key = self.cache_key(text);
        if let Some(hit) = self.cached(&key, text, caller).await {
            return Ok(hit);
        }
        // Hold the estimate against the caller's hard budgets before the text can be sent.
        let reservation = match &shared.meter {
            Some(meter) => {
                let usage = usage_for(&shared.config, caller, u64::from(tokens));
                let estimate = meter.estimate(&usage).unwrap_or(MicroUsd::ZERO);
                Some(meter.reserve(caller, estimate).await?)
            }
            None => None,
        };
        let (reply, delivered) = oneshot::channel();
        let waiter = Waiter {
            caller: caller.clone(),
            reservation,
            reply,
        };
        // `Err(waiter)` hands the waiter back when the batcher cannot take it.
        let queued: std::result::Result<bool, (Waiter, bool)> = {
            let mut state = shared.lock();
            if state.closed || state.waiting >= shared.config.queue_capacity {
                Err((waiter, state.closed))
            } else {
                state.waiting += 1;
                match state.slots.get_mut(text) {
                    Some(slot) => {
                        slot.waiters.push(waiter);
                        Ok(true)
                    }
                    None => {
                        state.slots.insert(
                            text.to_owned(),
                            Slot {
                                tokens,
                                queued_at: Instant::now(),
                                waiters: vec![waiter],
                            },
                        );
                        state.pending.push_back(text.to_owned());
                        state.pending_tokens += u64::from(tokens);
                        Ok(false)
                    }
                }
            }
        };
        let deduped = match queued {
            Ok(deduped) => deduped,
            Err((waiter, closed)) => {
                release(shared, &waiter).await;
                if closed {
                    return Err(Error::invalid("batcher", "it has been shut down"));
                }
                shared.counters.rejected.add(1);
                return Err(Error::Backend {
                    backend: "embeddings",
                    operation: "queue",
                    source: format!(
                        "the batcher's queue is full ({} callers waiting); try again later",
                        shared.config.queue_capacity
                    )
                    .into(),
                });
            }
        };
        if deduped {
            shared.counters.deduped.add(1);
        } else {
            shared.wake.notify_one();
        }
        let delivery = delivered.await.map_err(|_| Error::Backend {
            backend: "embeddings",
            operation: "embed",
            source: "the batcher stopped before answering".into(),
        })??;
        Ok(Embedding {
            vector: delivery.vector,
            tokens: delivery.tokens,
            cost: delivery.cost,
            saved: delivery.saved,
            cached: false,
            deduped,
        })
    }

    async fn embed_many(&self, texts: &[String], caller: &Spender) -> Vec<Result<Embedding>> {
        join_all(texts.iter().map(|text| self.embed(text, caller))).await
    }

    fn stats(&self) -> BatcherStats {
        let c = &self.shared.counters;
        BatcherStats {
            requests: c.requests.get(),
            api_calls: c.api_calls.get(),
            failed_calls: c.failed_calls.get(),
            texts_sent: c.texts_sent.get(),
            cache_hits: c.cache_hits.get(),
            cache_errors: c.cache_errors.get(),
            deduped: c.deduped.get(),
            rejected: c.rejected.get(),
            tokens: c.tokens.get(),
        }
    }
}

/// The batcher's task: sends a batch when it is full, over its token budget, or its first
/// text has waited a window; on close, sends everything and waits for the calls in flight.
async fn run(shared: Arc<Shared>) {
    loop {
        let (batch, deadline, closed) = {
            let mut state = shared.lock();
            let due = state
                .pending
                .front()
                .and_then(|t| state.slots.get(t))
                .map(|slot| {
                    let at = slot.queued_at;
                    at.checked_add(shared.config.window).unwrap_or(at)
                });
            let full = state.pending.len() >= shared.config.batch_size
                || state.pending_tokens >= u64::from(shared.config.max_batch_tokens);
            let ready = !state.pending.is_empty()
                && (full || state.closed || due.is_some_and(|d| d <= Instant::now()));
            let batch = if ready {
                take_batch(&mut state, &shared.config)
            } else {
                Vec::new()
            };
            (batch, due, state.closed && state.pending.is_empty())
        };
        if !batch.is_empty() {
            let Ok(permit) = shared.calls.clone().acquire_owned().await else {
                return;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                send(&shared, batch).await;
                drop(permit);
            });
            continue;
        }
        if closed {
            // Wait for every call in flight, then end.
            let all = shared.config.max_concurrent_calls as u32;
            let _ = shared.calls.acquire_many(all).await;
            return;
        }
        match deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => shared.wake.notified().await,
        }
    }
}

/// Takes up to `batch_size` pending texts, in arrival order, within the token budget (at
/// least one).
fn take_batch(state: &mut State, config: &BatcherConfig) -> Vec<(String, u32)> {
    let mut batch = Vec::new();
    let mut tokens = 0u64;
    while batch.len() < config.batch_size && !state.pending.is_empty() {
        let next = state
            .pending
            .front()
            .and_then(|t| state.slots.get(t))
            .map_or(0, |slot| slot.tokens);
        if !batch.is_empty() && tokens + u64::from(next) > u64::from(config.max_batch_tokens) {
            break;
        }
        tokens += u64::from(next);
        let Some(text) = state.pending.pop_front() else {
            break;
        };
        batch.push((text, next));
    }
    state.pending_tokens = state.pending_tokens.saturating_sub(tokens);
    batch
}

/// Splits `total` in proportion to `weights` with largest remainders, so the parts sum to
/// `total` exactly. All-zero weights split evenly.
pub(crate) fn split_proportionally(total: u64, weights: &[u64]) -> Vec<u64> {
    if weights.is_empty() {
        return Vec::new();
    }
    let weights: Vec<u128> = if weights.iter().all(|w| *w == 0) {
        vec![1; weights.len()]
    } else {
        weights.iter().map(|w| u128::from(*w)).collect()
    };
    let sum: u128 = weights.iter().sum();
    let mut parts: Vec<u64> = weights
        .iter()
        .map(|w| (u128::from(total) * w / sum) as u64)
        .collect();
    let mut left = total - parts.iter().sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by_key(|i| std::cmp::Reverse(u128::from(total) * weights[*i] % sum));
    for i in by_remainder {
        if left == 0 {
            break;
        }
        parts[i] += 1;
        left -= 1;
    }
    parts
}

/// Makes one API call for a batch, caches the vectors, then answers and charges each
/// caller. The slots stay open until the vectors are cached, so a caller asking for one of
/// these texts meanwhile joins this call rather than making another.
async fn send(shared: &Shared, batch: Vec<(String, u32)>) {
    let config = &shared.config;
    let texts: Vec<String> = batch.iter().map(|(t, _)| t.clone()).collect();
    // If the embedder or the cache panics, the batch's callers get an error, not a hang.
    let mut guard = PanicGuard {
        shared,
        texts: &texts,
        armed: true,
    };
    let mut request = EmbedRequest::new(&config.model, texts.clone());
    request.dimensions = config.dimensions;
    shared.counters.api_calls.add(1);
    shared.counters.texts_sent.add(texts.len() as u64);
    let outcome = match shared.embedder.embed(&request).await {
        Ok(response) if response.results.len() == texts.len() => Ok(response),
        Ok(response) => Err(Error::corrupt(format!(
            "the embedder returned {} results for {} texts",
            response.results.len(),
            texts.len()
        ))),
        Err(error) => Err(error),
    };
    if let (Ok(response), Some(cache)) = (&outcome, &shared.cache) {
        let entries: Vec<(String, Vec<f32>)> = texts
            .iter()
            .zip(&response.results)
            .filter_map(|(text, result)| {
                Some((cache_key_for(config, text), result.as_ref().ok()?.clone()))
            })
            .collect();
        let options = EntryOptions::new().ttl(config.cache_ttl);
        if !entries.is_empty()
            && let Err(error) = cache.set_many(entries, &options).await
        {
            shared.counters.cache_errors.add(1);
            tracing::warn!(%error, "could not cache embeddings");
        }
    }
    guard.armed = false;
    let slots: Vec<Slot> = {
        let mut state = shared.lock();
        let slots: Vec<Slot> = texts.iter().filter_map(|t| state.slots.remove(t)).collect();
        state.waiting = state
            .waiting
            .saturating_sub(slots.iter().map(|s| s.waiters.len()).sum());
        slots
    };
    let response = match outcome {
        Ok(response) => response,
        Err(error) => {
            fail(shared, slots, error).await;
            return;
        }
    };
    shared.counters.tokens.add(response.usage.prompt_tokens);
    // The call's tokens, split over its successful texts by their estimates.
    let weights: Vec<u64> = batch
        .iter()
        .zip(&response.results)
        .map(|((_, tokens), r)| if r.is_ok() { u64::from(*tokens) } else { 0 })
        .collect();
    let shares = split_proportionally(response.usage.prompt_tokens, &weights);
    let mut answering = Vec::new();
    for ((slot, result), share) in slots.into_iter().zip(response.results).zip(shares) {
        match result {
            Ok(vector) => {
                let vector = Arc::new(vector);
                for (i, waiter) in slot.waiters.into_iter().enumerate() {
                    // The first caller of a text pays its share; the others merged with it.
                    // The saving of a merged caller is what its text cost the first one.
                    let (tokens, source) = match i {
                        0 => (share, UsageSource::Api),
                        _ if share > 0 => (share, UsageSource::Dedup),
                        _ => (u64::from(slot.tokens), UsageSource::Dedup),
                    };
                    answering.push(answer(shared, waiter, vector.clone(), tokens, source));
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for waiter in slot.waiters {
                    release(shared, &waiter).await;
                    let copy = error::share(&error, "embeddings", "embed batch");
                    let _ = waiter.reply.send(Err(copy));
                }
            }
        }
    }
    join_all(answering).await;
}

/// Fails a batch's callers if its call unwinds before they were answered.
struct PanicGuard<'a> {
    shared: &'a Shared,
    texts: &'a [String],
    armed: bool,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.shared.lock();
        for text in self.texts {
            if let Some(slot) = state.slots.remove(text) {
                state.waiting = state.waiting.saturating_sub(slot.waiters.len());
                for waiter in slot.waiters {
                    let _ = waiter.reply.send(Err(Error::Backend {
                        backend: "embeddings",
                        operation: "embed batch",
                        source: "the embedding call panicked".into(),
                    }));
                }
            }
        }
    }
}

fn cache_key_for(config: &BatcherConfig, text: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(config.model.as_bytes());
    hash.update([0]);
    hash.update(config.dimensions.unwrap_or(0).to_le_bytes());
    hash.update([0]);
    hash.update(text.as_bytes());
    format!("emb:v1:{}", crate::hex::to_hex(&hash.finalize()))
}

/// Charges one waiter (committing its reservation) and hands it the vector.
async fn answer(
    shared: &Shared,
    waiter: Waiter,
    vector: Arc<Vec<f32>>,
    tokens: u64,
    source: UsageSource,
) {
    let mut delivery = Delivery {
        vector,
        tokens: if source == UsageSource::Api {
            tokens
        } else {
            0
        },
        cost: MicroUsd::ZERO,
        saved: MicroUsd::ZERO,
    };
    if let Some(meter) = &shared.meter {
        let usage = shared.usage(&waiter.caller, tokens, source);
        let recorded = match &waiter.reservation {
            Some(reservation) => meter.commit(reservation, usage).await,
            None => meter.record(usage).await,
        };
        match recorded {
            Ok(recorded) => {
                delivery.cost = recorded.cost;
                delivery.saved = recorded.saved;
            }
            Err(error) => tracing::warn!(%error, "could not record an embedding's cost"),
        }
    }
    // A caller that went away does not stop the others.
    let _ = waiter.reply.send(Ok(delivery));
}

async fn release(shared: &Shared, waiter: &Waiter) {
    if let (Some(meter), Some(reservation)) = (&shared.meter, &waiter.reservation)
        && let Err(error) = meter.release(reservation).await
    {
        tracing::warn!(%error, "could not release an embedding's reservation; it will expire");
    }
}

/// Fails every waiter of a batch whose call failed.
async fn fail(shared: &Shared, slots: Vec<Slot>, error: Error) {
    shared.counters.failed_calls.add(1);
    tracing::warn!(%error, texts = slots.len(), "embedding call failed");
    let shared_error = Arc::new(error);
    for slot in slots {
        for waiter in slot.waiters {
            release(shared, &waiter).await;
            let copy = error::share(&shared_error, "embeddings", "embed batch");
            let _ = waiter.reply.send(Err(copy));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_splits_sum_exactly() {
        assert_eq!(split_proportionally(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(split_proportionally(7, &[2, 0, 5]), vec![2, 0, 5]);
        assert_eq!(
            split_proportionally(100, &[3, 3, 3]).iter().sum::<u64>(),
            100
        );
        assert_eq!(split_proportionally(5, &[0, 0]), vec![3, 2]);
        assert_eq!(split_proportionally(0, &[4, 4]), vec![0, 0]);
        let parts = split_proportionally(1_000_003, &[7, 11, 13, 17, 19]);
        assert_eq!(parts.iter().sum::<u64>(), 1_000_003);
    }
}
