//! The in-process target: pupkit's components as a host would wire them, driven directly.
//!
//! - `cache`: a `Tiered<Profile>` (memory tiers, or Redis with `--redis`), a hot set of
//!   profiles written before the run; 95% of reads pick a hot key, 5% a key from a million
//!   others, which misses and goes through `get_or_load` with a 1 ms loader.
//! - `messages`: a table in a schema of the run's own, seeded with 200 conversations of 30
//!   messages; reads of a conversation's latest 20 go through `CachedRepo` (skewed towards
//!   the busiest conversations); 1 in 20 posts a message instead (`CachedRepo::write`,
//!   invalidating the conversation's tag), so the next read goes to Postgres. Dropped at the
//!   end.
//! - `embeddings`: single texts through the `Batcher` over `LocalEmbedder`, drawn with skew
//!   from 400 texts, so the cache and the merging of identical texts matter.
//! - `cost`: `Meter::record` of chat usage events, in memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pupkit::cache::{CacheStats, EntryOptions, Tiered, TieredConfig};
use pupkit::cost::{CostMeter, CostStats, Meter, Spender, Usage};
use pupkit::embed::{Batcher, BatcherConfig, BatcherStats, EmbeddingBatcher, LocalEmbedder};
use pupkit::redis::{RedisConfig, RedisConnection};
use pupkit::repo::{CachedRepo, PgConfig, PgPool, PoolStatus};
use serde::{Deserialize, Serialize};

use crate::{Scenario, chain, unit};

/// Profiles written before the run (the hot set).
pub const HOT_PROFILES: u64 = 1_000;
/// Conversations seeded, and messages in each.
pub const CONVERSATIONS: i64 = 200;
const MESSAGES_PER_CONVERSATION: i64 = 30;
/// Distinct texts of the embeddings scenario.
pub const TEXTS: u64 = 400;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    email: String,
    plan: String,
    bio: String,
}

fn profile(id: u64) -> Profile {
    Profile {
        id,
        name: format!("User {id}"),
        email: format!("user{id}@example.test"),
        plan: ["free", "pro", "team"][(id % 3) as usize].to_owned(),
        bio: format!("Profile {id}: ").repeat(12),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Message {
    id: i64,
    author: String,
    body: String,
}

struct Messages {
    pool: PgPool,
    cache: Tiered<Vec<Message>>,
    repo: CachedRepo<PgPool, Tiered<Vec<Message>>>,
    schema: String,
    recent: Arc<str>,
    insert: Arc<str>,
}

struct Embeddings {
    batcher: Arc<Batcher>,
    cache: Tiered<Vec<f32>>,
}

/// Where the caches keep their shared tiers.
struct RedisBackend {
    connection: RedisConnection,
    url: String,
    prefix: String,
}

pub struct InProcess {
    run_id: String,
    profiles: Option<Tiered<Profile>>,
    messages: Option<Messages>,
    embeddings: Option<Embeddings>,
    meter: Option<Arc<Meter>>,
    redis: Option<RedisBackend>,
    posted: AtomicU64,
}

/// What the components reported at the end.
#[derive(Debug, Serialize)]
pub struct ComponentStats {
    pub cache_backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_key_prefix: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_schema: Option<String>,
    pub caches: Vec<CacheStats>,
    pub pool: Option<PoolStatus>,
    pub batcher: Option<BatcherStats>,
    pub cost: Option<CostStats>,
    pub messages_posted: u64,
}

impl InProcess {
    /// Builds the components `scenarios` need. Returns the scenarios it could set up and notes
    /// about what it left out or fell back from.
    pub async fn setup(
        run_id: &str,
        want_redis: bool,
        scenarios: &[Scenario],
    ) -> (InProcess, Vec<Scenario>, Vec<String>) {
        let mut notes = Vec::new();
        let mut target = InProcess {
            run_id: run_id.to_owned(),
            profiles: None,
            messages: None,
            embeddings: None,
            meter: None,
            redis: None,
            posted: AtomicU64::new(0),
        };
        if want_redis {
            let config = RedisConfig::from_env();
            match RedisConnection::connect(&config).await {
                Ok(connection) => {
                    target.redis = Some(RedisBackend {
                        connection,
                        url: config.url.clone(),
                        prefix: format!("pupkit-load-{run_id}"),
                    })
                }
                Err(error) => notes.push(format!(
                    "--redis: Redis unreachable ({}); the caches use in-process memory tiers instead",
                    chain(&error)
                )),
            }
        }
        let mut ready = Vec::new();
        for &scenario in scenarios {
            let outcome = match scenario {
                Scenario::Cache => target.setup_cache().await,
                Scenario::Messages => target.setup_messages().await,
                Scenario::Embeddings => target.setup_embeddings().await,
                Scenario::Cost => target.setup_meter().await.map(|_| ()),
            };
            match outcome {
                Ok(()) => ready.push(scenario),
                Err(why) => notes.push(format!("{} left out: {why}", scenario.name())),
            }
        }
        (target, ready, notes)
    }

    fn tiered<V>(&self, name: &str) -> pupkit::Result<Tiered<V>>
    where
        V: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        let mut config = TieredConfig::named(name);
        match &self.redis {
            Some(redis) => {
                config.key_prefix = redis.prefix.clone();
                Tiered::builder(config)
                    .redis(redis.connection.clone())
                    .build()
            }
            None => Tiered::builder(config).memory_tiers(64 << 20).build(),
        }
    }

    async fn setup_cache(&mut self) -> Result<(), String> {
        let profiles: Tiered<Profile> = self.tiered("load-profiles").map_err(|e| chain(&e))?;
        let options = EntryOptions::new()
            .tier("hot")
            .ttl(Duration::from_secs(3_600));
        let entries: Vec<(String, Profile)> = (0..HOT_PROFILES)
            .map(|id| (format!("profile:{id}"), profile(id)))
            .collect();
        for chunk in entries.chunks(100) {
            profiles
                .set_many(chunk.to_vec(), &options)
                .await
                .map_err(|e| format!("warming the hot set: {}", chain(&e)))?;
        }
        self.profiles = Some(profiles);
        Ok(())
    }

    async fn setup_messages(&mut self) -> Result<(), String> {
        let mut config = PgConfig::from_env();
        config.application_name = format!("pupkit-load-{}", self.run_id);
        let url = redacted(&config.url);
        let pool = PgPool::connect(&config)
            .await
            .map_err(|e| format!("PostgreSQL unreachable at {url} ({})", chain(&e)))?;
        let schema = format!("pupkit_load_{}", self.run_id.replace('-', "_"));
        pool.execute(&format!("CREATE SCHEMA {schema}"), &[])
            .await
            .map_err(|e| format!("creating schema {schema}: {}", chain(&e)))?;
        let seeded = seed(&pool, &schema).await;
        let cache = match self.tiered::<Vec<Message>>("load-messages") {
            Ok(cache) => cache,
            Err(e) => {
                drop_schema(&pool, &schema).await;
                return Err(chain(&e));
            }
        };
        if let Err(e) = seeded {
            drop_schema(&pool, &schema).await;
            return Err(format!("seeding {schema}.messages: {}", chain(&e)));
        }
        self.messages = Some(Messages {
            repo: CachedRepo::new(pool.clone(), cache.clone()),
            pool,
            cache,
            recent: format!(
                "SELECT id, author, body FROM {schema}.messages WHERE conversation = $1 ORDER BY id DESC LIMIT 20"
            )
            .into(),
            insert: format!(
                "INSERT INTO {schema}.messages (conversation, author, body) VALUES ($1, $2, $3)"
            )
            .into(),
            schema,
        });
        Ok(())
    }

    async fn setup_meter(&mut self) -> Result<Arc<Meter>, String> {
        if let Some(meter) = &self.meter {
            return Ok(meter.clone());
        }
        let meter = Arc::new(Meter::builder().build().await.map_err(|e| chain(&e))?);
        self.meter = Some(meter.clone());
        Ok(meter)
    }

    async fn setup_embeddings(&mut self) -> Result<(), String> {
        let meter = self.setup_meter().await?;
        let cache: Tiered<Vec<f32>> = self.tiered("load-embeddings").map_err(|e| chain(&e))?;
        let mut config = BatcherConfig::default();
        // The report's 5 s window suits background work; a request path waits 20 ms at most.
        config.window = Duration::from_millis(20);
        let batcher = Batcher::builder(config)
            .embedder(Arc::new(LocalEmbedder::new(256)))
            .cache(Arc::new(cache.clone()))
            .meter(meter)
            .build()
            .map_err(|e| chain(&e))?;
        self.embeddings = Some(Embeddings {
            batcher: Arc::new(batcher),
            cache,
        });
        Ok(())
    }

    /// One request of `scenario`, the `n`th of the run.
    pub async fn call(&self, scenario: Scenario, n: u64) -> Result<(), String> {
        match scenario {
            Scenario::Cache => self.read_profile(n).await,
            Scenario::Messages => self.read_messages(n).await,
            Scenario::Embeddings => self.embed(n).await,
            Scenario::Cost => self.record_usage(n).await,
        }
    }

    async fn read_profile(&self, n: u64) -> Result<(), String> {
        let profiles = self.profiles.as_ref().ok_or("the cache is not set up")?;
        let id = if unit(n, 1) < 0.95 {
            (unit(n, 2) * HOT_PROFILES as f64) as u64
        } else {
            HOT_PROFILES + (unit(n, 2) * 1_000_000.0) as u64
        };
        let options = EntryOptions::new().ttl(Duration::from_secs(600));
        let value = profiles
            .get_or_load(&format!("profile:{id}"), &options, move || async move {
                // A stand-in for the database read behind the cache.
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok::<_, std::io::Error>(profile(id))
            })
            .await
            .map_err(|e| format!("cache get_or_load: {}", chain(&e)))?;
        if value.id != id {
            return Err(format!("cache returned profile {} for {id}", value.id));
        }
        Ok(())
    }

    async fn read_messages(&self, n: u64) -> Result<(), String> {
        let messages = self.messages.as_ref().ok_or("messages are not set up")?;
        // Skewed: the busiest conversations get most of the traffic.
        let conversation = 1 + (unit(n, 3).powi(2) * CONVERSATIONS as f64) as i64;
        let tag = format!("conv:{conversation}");
        if unit(n, 4) < 0.05 {
            let sql = messages.insert.clone();
            let author = format!("user-{}", n % 50);
            let body = format!("message {n} posted during the load test");
            messages
                .repo
                .write::<Vec<Message>, _, _, _>(&[&tag], move |db| async move {
                    db.execute(&sql, &[&conversation, &author, &body]).await
                })
                .await
                .map_err(|e| format!("CachedRepo::write: {}", chain(&e)))?;
            self.posted.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let sql = messages.recent.clone();
        let options = EntryOptions::new()
            .ttl(Duration::from_secs(300))
            .tags([tag]);
        let rows = messages
            .repo
            .read(
                &format!("conv:{conversation}:recent"),
                &options,
                move |db| async move {
                    let rows = db.query(&sql, &[&conversation]).await?;
                    Ok(rows
                        .iter()
                        .map(|row| Message {
                            id: row.get(0),
                            author: row.get(1),
                            body: row.get(2),
                        })
                        .collect::<Vec<_>>())
                },
            )
            .await
            .map_err(|e| format!("CachedRepo::read: {}", chain(&e)))?;
        if rows.is_empty() {
            return Err(format!("conversation {conversation} has no messages"));
        }
        Ok(())
    }

    async fn embed(&self, n: u64) -> Result<(), String> {
        let embeddings = self
            .embeddings
            .as_ref()
            .ok_or("the batcher is not set up")?;
        let text = text(n);
        let caller = Spender::new("search", format!("user-{}", n % 50));
        let embedding = embeddings
            .batcher
            .embed(&text, &caller)
            .await
            .map_err(|e| format!("Batcher::embed: {}", chain(&e)))?;
        if embedding.vector.is_empty() {
            return Err("empty embedding".to_owned());
        }
        Ok(())
    }

    async fn record_usage(&self, n: u64) -> Result<(), String> {
        let meter = self.meter.as_ref().ok_or("the meter is not set up")?;
        let model = if unit(n, 5) < 0.8 {
            "gpt-4o-mini"
        } else {
            "gpt-4.1-mini"
        };
        let input = 200 + (unit(n, 6) * 3_800.0) as u64;
        let output = 50 + (unit(n, 7) * 750.0) as u64;
        let usage = Usage::new(
            format!("load-{}-{n}", self.run_id),
            "chat",
            format!("user-{}", n % 50),
            model,
        )
        .tokens(input, output);
        meter
            .record(usage)
            .await
            .map_err(|e| format!("Meter::record: {}", chain(&e)))?;
        Ok(())
    }

    /// Pool in use, max size and waiters, when there is a pool.
    pub fn pool_sample(&self) -> Option<(u64, u64, u64)> {
        let status = self.messages.as_ref()?.pool.status();
        Some((status.in_use as u64, status.max_size as u64, status.waiters))
    }

    pub fn stats(&self) -> ComponentStats {
        let mut caches = Vec::new();
        if let Some(profiles) = &self.profiles {
            caches.push(profiles.stats());
        }
        if let Some(messages) = &self.messages {
            caches.push(messages.cache.stats());
        }
        if let Some(embeddings) = &self.embeddings {
            caches.push(embeddings.cache.stats());
        }
        ComponentStats {
            cache_backend: if self.redis.is_some() {
                "redis"
            } else {
                "memory"
            },
            redis_key_prefix: self.redis.as_ref().map(|r| r.prefix.clone()),
            postgres_schema: self.messages.as_ref().map(|m| m.schema.clone()),
            caches,
            pool: self.messages.as_ref().map(|m| m.pool.status()),
            batcher: self.embeddings.as_ref().map(|e| e.batcher.stats()),
            cost: self.meter.as_ref().map(|m| m.stats()),
            messages_posted: self.posted.load(Ordering::Relaxed),
        }
    }

    /// Drops what the run made: the batcher's pending work, the schema, the Redis keys.
    /// Returns what could not be cleaned up.
    pub async fn cleanup(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(embeddings) = &self.embeddings {
            embeddings.batcher.shutdown().await;
        }
        if let Some(messages) = &self.messages
            && let Err(e) = messages
                .pool
                .execute(
                    &format!("DROP SCHEMA IF EXISTS {} CASCADE", messages.schema),
                    &[],
                )
                .await
        {
            problems.push(format!(
                "dropping schema {}: {}",
                messages.schema,
                chain(&e)
            ));
        }
        if let Some(redis) = &self.redis
            && let Err(e) = delete_keys(&redis.url, &format!("{}:*", redis.prefix)).await
        {
            problems.push(format!(
                "deleting Redis keys {}:*: {}",
                redis.prefix,
                chain(&e)
            ));
        }
        problems
    }
}

async fn seed(pool: &PgPool, schema: &str) -> pupkit::Result<()> {
    pool.execute(
        &format!(
            "CREATE TABLE {schema}.messages (id bigserial PRIMARY KEY, conversation int8 NOT NULL, \
             author text NOT NULL, body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
        ),
        &[],
    )
    .await?;
    pool.execute(
        &format!("CREATE INDEX ON {schema}.messages (conversation, id DESC)"),
        &[],
    )
    .await?;
    pool.execute(
        &format!(
            "INSERT INTO {schema}.messages (conversation, author, body) \
             SELECT c, 'user-' || (n % 7), 'message ' || n || ' of conversation ' || c || ': ' || repeat('lorem ipsum ', 8) \
             FROM generate_series(1, $1::int8) c, generate_series(1, $2::int8) n ORDER BY c, n"
        ),
        &[&CONVERSATIONS, &MESSAGES_PER_CONVERSATION],
    )
    .await?;
    pool.execute(&format!("ANALYZE {schema}.messages"), &[])
        .await?;
    Ok(())
}

async fn drop_schema(pool: &PgPool, schema: &str) {
    let _ = pool
        .execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"), &[])
        .await;
}

/// Text `n` of the embeddings scenario: one of [`TEXTS`], the first ones far more often.
fn text(n: u64) -> String {
    const VERBS: [&str; 8] = [
        "reset", "change", "export", "delete", "share", "recover", "update", "find",
    ];
    const NOUNS: [&str; 10] = [
        "password",
        "invoice",
        "order",
        "profile",
        "subscription",
        "api key",
        "workspace",
        "conversation",
        "billing address",
        "team",
    ];
    let i = (unit(n, 8).powi(2) * TEXTS as f64) as u64;
    format!(
        "how do I {} my {}? (question {i})",
        VERBS[(i % 8) as usize],
        NOUNS[(i / 8 % 10) as usize]
    )
}

/// The URL without its password.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Deletes the keys matching `pattern` (this run's own), never a flush.
async fn delete_keys(url: &str, pattern: &str) -> Result<(), redis::RedisError> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
