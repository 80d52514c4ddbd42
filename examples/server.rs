//! One host server built on pupkit: every capability wired together.
//!
//! - the compression layer (brotli, then gzip) and the monitor's request layer;
//! - `GET /api/conversations/{id}/messages` and `GET /api/users/{id}/profile`, read through
//!   `CachedRepo` (Postgres behind the tiered cache), or, without Postgres, through the same
//!   tiered cache over an in-memory store with a simulated 2 ms query;
//! - `POST /api/embeddings` (`{"text", "user"}`) through the batcher (local embedder, cached);
//! - `POST /api/usage` (`{"user", "model", "input_tokens", "output_tokens"}`) to the cost meter;
//! - the cost routes (`/api/costs/...`), `GET /api/health`, `GET /api/metrics`, `GET /dashboard`.
//!
//! It runs on Redis and Postgres when `PUPKIT_REDIS_URL` / `PUPKIT_DATABASE_URL` are set, and
//! in memory otherwise. `PUPKIT_ADMIN_TOKEN` puts the cost, metrics and dashboard routes
//! behind a bearer token. The address is `PUPKIT_SERVER_ADDR` or `--addr` (default
//! `127.0.0.1:3000`).
//!
//! ```sh
//! cargo run --release --example server
//! # then: open http://127.0.0.1:3000/dashboard, and drive it with
//! cargo run --release --example load_test -- 30 5 50 mixed 300 --url http://127.0.0.1:3000
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
use pupkit::compression::{CompressionConfig, CompressionLayer};
use pupkit::cost::{
    AuthHook, CostMeter, CostRoutes, Meter, PgLedger, RedisSpendStore, Spender, Usage,
};
use pupkit::embed::{Batcher, BatcherConfig, EmbeddingBatcher, LocalEmbedder};
use pupkit::health::{Health, HealthRoutes, Monitor, MonitorConfig, MonitorLayer};
use pupkit::redis::{RedisConfig, RedisConnection};
use pupkit::repo::{CachedRepo, PgConfig, PgPool};
use serde::{Deserialize, Serialize};

/// Conversations and users the store holds (ids 1 to these).
const CONVERSATIONS: i64 = 1_000;
const USERS: i64 = 10_000;
/// Messages per conversation; the endpoint returns the latest 20.
const MESSAGES_PER_CONVERSATION: i64 = 30;
/// The longest text `POST /api/embeddings` takes, in bytes.
const MAX_TEXT: usize = 8_192;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Message {
    id: i64,
    conversation: i64,
    role: String,
    body: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Profile {
    user_id: i64,
    name: String,
    plan: String,
    locale: String,
}

/// Where messages and profiles come from.
enum Store {
    /// Postgres through `CachedRepo`.
    Postgres {
        messages: CachedRepo<PgPool, Tiered<Vec<Message>>>,
        profiles: CachedRepo<PgPool, Tiered<Profile>>,
        schema: String,
    },
    /// An in-memory store (rows made up from the id, 2 ms per query) behind the same caches.
    Memory {
        messages: Arc<Tiered<Vec<Message>>>,
        profiles: Arc<Tiered<Profile>>,
    },
}

fn made_up_messages(conversation: i64) -> Vec<Message> {
    (0..MESSAGES_PER_CONVERSATION.min(20))
        .map(|n| Message {
            id: conversation * 1_000 + n,
            conversation,
            role: if n % 2 == 0 { "user" } else { "assistant" }.to_owned(),
            body: format!(
                "message {n} of conversation {conversation}: how do I reset my password?"
            ),
        })
        .collect()
}

fn made_up_profile(user_id: i64) -> Profile {
    Profile {
        user_id,
        name: format!("user {user_id}"),
        plan: if user_id % 10 == 0 { "team" } else { "free" }.to_owned(),
        locale: "en".to_owned(),
    }
}

impl Store {
    async fn messages(&self, conversation: i64) -> pupkit::Result<Arc<Vec<Message>>> {
        let key = format!("conversation:{conversation}:recent");
        let options = EntryOptions::new().tags([format!("conversation:{conversation}")]);
        match self {
            Store::Postgres {
                messages, schema, ..
            } => {
                let sql = format!(
                    "SELECT id, conversation, role, body FROM {schema}.messages WHERE conversation = $1 ORDER BY id DESC LIMIT 20"
                );
                messages
                    .read(&key, &options, move |db: Arc<PgPool>| async move {
                        let rows = db.query(&sql, &[&conversation]).await?;
                        Ok(rows
                            .iter()
                            .map(|r| Message {
                                id: r.get(0),
                                conversation: r.get(1),
                                role: r.get(2),
                                body: r.get(3),
                            })
                            .collect())
                    })
                    .await
            }
            Store::Memory { messages, .. } => {
                messages
                    .get_or_load(&key, &options, move || async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok::<_, std::io::Error>(made_up_messages(conversation))
                    })
                    .await
            }
        }
    }

    async fn profile(&self, user_id: i64) -> pupkit::Result<Arc<Profile>> {
        let key = format!("profile:{user_id}");
        let options = EntryOptions::new().tags([format!("user:{user_id}")]);
        match self {
            Store::Postgres {
                profiles, schema, ..
            } => {
                let sql = format!(
                    "SELECT user_id, name, plan, locale FROM {schema}.profiles WHERE user_id = $1"
                );
                profiles
                    .read(&key, &options, move |db: Arc<PgPool>| async move {
                        let row = db.query_one(&sql, &[&user_id]).await?;
                        Ok(Profile {
                            user_id: row.get(0),
                            name: row.get(1),
                            plan: row.get(2),
                            locale: row.get(3),
                        })
                    })
                    .await
            }
            Store::Memory { profiles, .. } => {
                profiles
                    .get_or_load(&key, &options, move || async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        Ok::<_, std::io::Error>(made_up_profile(user_id))
                    })
                    .await
            }
        }
    }
}

/// Creates the server's tables in `schema` and seeds them (idempotent).
async fn seed(pool: &PgPool, schema: &str) -> pupkit::Result<()> {
    pool.execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"), &[])
        .await?;
    pool.execute(
        &format!(
            "CREATE TABLE IF NOT EXISTS {schema}.messages (id int8 PRIMARY KEY, conversation int8 NOT NULL, role text NOT NULL, body text NOT NULL)"
        ),
        &[],
    )
    .await?;
    pool.execute(
        &format!("CREATE INDEX IF NOT EXISTS messages_by_conversation ON {schema}.messages (conversation, id)"),
        &[],
    )
    .await?;
    pool.execute(
        &format!(
            "CREATE TABLE IF NOT EXISTS {schema}.profiles (user_id int8 PRIMARY KEY, name text NOT NULL, plan text NOT NULL, locale text NOT NULL)"
        ),
        &[],
    )
    .await?;
    pool.execute(
        &format!(
            "INSERT INTO {schema}.messages
             SELECT c * 1000 + n, c, CASE WHEN n % 2 = 0 THEN 'user' ELSE 'assistant' END,
                    'message ' || n || ' of conversation ' || c || ': how do I reset my password?'
             FROM generate_series(1, $1::int8) AS c, generate_series(0, $2::int8 - 1) AS n
             ON CONFLICT (id) DO NOTHING"
        ),
        &[&CONVERSATIONS, &MESSAGES_PER_CONVERSATION],
    )
    .await?;
    pool.execute(
        &format!(
            "INSERT INTO {schema}.profiles
             SELECT u, 'user ' || u, CASE WHEN u % 10 = 0 THEN 'team' ELSE 'free' END, 'en'
             FROM generate_series(1, $1::int8) AS u
             ON CONFLICT (user_id) DO NOTHING"
        ),
        &[&USERS],
    )
    .await?;
    Ok(())
}

#[derive(Clone)]
struct App {
    store: Arc<Store>,
    batcher: Arc<dyn EmbeddingBatcher>,
    meter: Arc<dyn CostMeter>,
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// A backend failure: logged in full, answered without details.
fn unavailable(what: &str, failure: pupkit::Error) -> Response {
    tracing::warn!(%failure, "{what} failed");
    if failure.is_invalid_input() {
        return error(StatusCode::BAD_REQUEST, failure.to_string());
    }
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("{what} is unavailable; try again later"),
    )
}

async fn messages(State(app): State<App>, Path(conversation): Path<i64>) -> Response {
    if !(1..=CONVERSATIONS).contains(&conversation) {
        return error(
            StatusCode::NOT_FOUND,
            format!("no conversation {conversation}"),
        );
    }
    match app.store.messages(conversation).await {
        Ok(messages) => Json(messages.as_ref().clone()).into_response(),
        Err(failure) => unavailable("reading messages", failure),
    }
}

async fn profile(State(app): State<App>, Path(user_id): Path<i64>) -> Response {
    if !(1..=USERS).contains(&user_id) {
        return error(StatusCode::NOT_FOUND, format!("no user {user_id}"));
    }
    match app.store.profile(user_id).await {
        Ok(profile) => Json(profile.as_ref().clone()).into_response(),
        Err(failure) => unavailable("reading the profile", failure),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedBody {
    text: String,
    user: String,
}

async fn embed(
    State(app): State<App>,
    body: Result<Json<EmbedBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    if body.text.len() > MAX_TEXT {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "text is {} bytes, over the limit of {MAX_TEXT}",
                body.text.len()
            ),
        );
    }
    match app
        .batcher
        .embed(&body.text, &Spender::new("search", body.user))
        .await
    {
        Ok(embedding) => Json(serde_json::json!({
            "dimensions": embedding.vector.len(),
            "tokens": embedding.tokens,
            "cached": embedding.cached,
            "deduped": embedding.deduped,
        }))
        .into_response(),
        Err(failure) => unavailable("embedding", failure),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageBody {
    user: String,
    model: String,
    input_tokens: u64,
    output_tokens: u64,
    #[serde(default)]
    request_id: Option<String>,
}

async fn usage(
    State(app): State<App>,
    body: Result<Json<UsageBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let request_id = body
        .request_id
        .unwrap_or_else(|| format!("chat-{:032x}", rand_id()));
    let usage = Usage::new(request_id, "chat", body.user, body.model)
        .tokens(body.input_tokens, body.output_tokens);
    match app.meter.record(usage).await {
        Ok(recorded) => Json(serde_json::json!({
            "request_id": recorded.request_id,
            "cost": recorded.cost,
            "priced": recorded.priced,
            "duplicate": recorded.duplicate,
        }))
        .into_response(),
        Err(failure) => unavailable("recording usage", failure),
    }
}

/// A request id nobody else has (not a secret).
fn rand_id() -> u128 {
    use std::hash::{BuildHasher, RandomState};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (u128::from(RandomState::new().hash_one(n)) << 64) | u128::from(n)
}

fn address() -> Result<SocketAddr, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut addr =
        std::env::var("PUPKIT_SERVER_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                addr = args
                    .next()
                    .ok_or("--addr needs a value, e.g. 127.0.0.1:3000")?
            }
            other => {
                return Err(format!("unknown argument {other:?} (only --addr HOST:PORT)").into());
            }
        }
    }
    addr.parse()
        .map_err(|e| format!("address {addr:?} is not HOST:PORT: {e}").into())
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = address()?;
    let redis = if env_set("PUPKIT_REDIS_URL") {
        Some(RedisConnection::connect(&RedisConfig::from_env()).await?)
    } else {
        None
    };
    let pool = if env_set("PUPKIT_DATABASE_URL") {
        Some(PgPool::connect(&PgConfig::from_env()).await?)
    } else {
        None
    };

    // Caches: L0 plus Redis hot/warm/cold, or in-process tiers.
    fn cache<V>(name: &str, redis: &Option<RedisConnection>) -> pupkit::Result<Arc<Tiered<V>>>
    where
        V: Serialize + for<'de> Deserialize<'de> + Send + Sync + 'static,
    {
        let builder = Tiered::builder(TieredConfig::named(name));
        let builder = match redis {
            Some(redis) => builder.redis(redis.clone()),
            None => builder.memory_tiers(64 << 20),
        };
        Ok(Arc::new(builder.build()?))
    }
    let message_cache: Arc<Tiered<Vec<Message>>> = cache("messages", &redis)?;
    let profile_cache: Arc<Tiered<Profile>> = cache("profiles", &redis)?;
    let embedding_cache: Arc<Tiered<Vec<f32>>> = cache("embeddings", &redis)?;

    // The cost meter: spend on Redis and the ledger in Postgres when they are there.
    let mut meter = Meter::builder();
    if let Some(redis) = &redis {
        meter = meter.spend_store(Arc::new(RedisSpendStore::new(
            redis.clone(),
            "pupkit-server",
        )?));
    }
    let store = match &pool {
        Some(pool) => {
            let schema = "pupkit_server";
            seed(pool, schema).await?;
            let ledger = PgLedger::new(pool.clone(), schema)?;
            ledger.migrate().await?;
            meter = meter.ledger(Arc::new(ledger));
            Store::Postgres {
                messages: CachedRepo::new(pool.clone(), message_cache.as_ref().clone()),
                profiles: CachedRepo::new(pool.clone(), profile_cache.as_ref().clone()),
                schema: schema.to_owned(),
            }
        }
        None => Store::Memory {
            messages: message_cache.clone(),
            profiles: profile_cache.clone(),
        },
    };
    let meter: Arc<dyn CostMeter> = Arc::new(meter.build().await?);

    let mut batcher_config = BatcherConfig::default();
    batcher_config.window = Duration::from_millis(20); // interactive: a short batching window
    let batcher = Arc::new(
        Batcher::builder(batcher_config)
            .embedder(Arc::new(LocalEmbedder::new(256)))
            .cache(embedding_cache.clone())
            .meter(meter.clone())
            .build()?,
    );

    // Monitoring: per-second figures, the report's alert rules, the dashboard.
    let monitor = Monitor::new(MonitorConfig::default())?;
    monitor.watch_cache({
        let cache = message_cache.clone();
        move || cache.stats()
    });
    monitor.watch_cache({
        let cache = profile_cache.clone();
        move || cache.stats()
    });
    monitor.watch_cache({
        let cache = embedding_cache.clone();
        move || cache.stats()
    });
    monitor.watch_cost(meter.clone());
    monitor.spawn();

    let mut health = Health::new()
        .cache({
            let cache = message_cache.clone();
            move || cache.stats()
        })
        .cache({
            let cache = profile_cache.clone();
            move || cache.stats()
        })
        .cache({
            let cache = embedding_cache.clone();
            move || cache.stats()
        })
        .batcher("embedding batcher", batcher.clone())
        .cost(meter.clone())
        .monitor(monitor.clone());
    if let Some(redis) = &redis {
        health = health.redis(redis.clone());
    }
    if let Some(pool) = &pool {
        health = health.pool("postgres", pool.clone());
    }

    let auth = std::env::var("PUPKIT_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(AuthHook::bearer);
    let mut cost_routes = CostRoutes::new(meter.clone());
    let mut health_routes = HealthRoutes::new(Arc::new(health)).monitor(monitor.clone());
    if let Some(auth) = &auth {
        cost_routes = cost_routes.auth(auth.clone());
        health_routes = health_routes.auth(auth.clone());
    }

    let app = Router::new()
        .route("/api/conversations/{id}/messages", get(messages))
        .route("/api/users/{id}/profile", get(profile))
        .route("/api/embeddings", post(embed))
        .route("/api/usage", post(usage))
        .with_state(App {
            store: Arc::new(store),
            batcher: batcher.clone() as Arc<dyn EmbeddingBatcher>,
            meter: meter.clone(),
        })
        .merge(cost_routes.router())
        .merge(health_routes.router())
        .layer(CompressionLayer::new(CompressionConfig::default()))
        .layer(MonitorLayer::new(monitor.clone()));

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "pupkit server on http://{} (caches on {}, data in {}{}); dashboard at /dashboard",
        listener.local_addr()?,
        if redis.is_some() { "Redis" } else { "memory" },
        if pool.is_some() { "Postgres" } else { "memory" },
        if auth.is_some() {
            "; admin routes need the bearer token"
        } else {
            ""
        },
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    batcher.shutdown().await;
    println!("stopped");
    Ok(())
}
