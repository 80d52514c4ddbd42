//! Chat messages and user profiles through `CachedRepo`: a Postgres pool read through the
//! tiered cache, with timings and the pool's status.
//!
//! Needs Postgres at `PUPKIT_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`):
//! `cargo run --example repo_postgres --features postgres`

use std::sync::Arc;
use std::time::Instant;

use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
use pupkit::repo::{CachedRepo, PgConfig, PgPool};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    user_id: i64,
    name: String,
    plan: String,
}

#[tokio::main]
async fn main() -> pupkit::Result<()> {
    let pool = PgPool::connect(&PgConfig::from_env()).await?;
    let schema = format!("pupkit_example_{}", std::process::id());
    pool.execute(&format!("CREATE SCHEMA {schema}"), &[])
        .await?;
    pool.execute(
        &format!("CREATE TABLE {schema}.messages (id int8 PRIMARY KEY, conversation int8 NOT NULL, body text NOT NULL)"),
        &[],
    )
    .await?;
    pool.execute(
        &format!("CREATE TABLE {schema}.profiles (user_id int8 PRIMARY KEY, name text NOT NULL, plan text NOT NULL)"),
        &[],
    )
    .await?;
    let insert_message = format!("INSERT INTO {schema}.messages VALUES ($1, $2, $3)");
    for id in 1..=20i64 {
        pool.execute(&insert_message, &[&id, &7i64, &format!("message {id}")])
            .await?;
    }
    pool.execute(
        &format!("INSERT INTO {schema}.profiles VALUES ($1, $2, $3)"),
        &[&42i64, &"Ada", &"pro"],
    )
    .await?;

    let messages = CachedRepo::new(
        pool.clone(),
        Tiered::<Vec<String>>::builder(TieredConfig::named("messages"))
            .memory_tiers(16 << 20)
            .build()?,
    );
    let profiles = CachedRepo::new(
        pool.clone(),
        Tiered::<Profile>::builder(TieredConfig::named("profiles"))
            .memory_tiers(16 << 20)
            .build()?,
    );

    // Message retrieval: the report's hot path.
    let recent = format!(
        "SELECT body FROM {schema}.messages WHERE conversation = $1 ORDER BY id DESC LIMIT 10"
    );
    for attempt in 1..=3 {
        let started = Instant::now();
        let sql = recent.clone();
        let bodies = messages
            .read(
                "conversation:7:recent",
                &EntryOptions::new().tags(["conversation:7"]),
                move |db: Arc<PgPool>| async move {
                    let rows = db.query(&sql, &[&7i64]).await?;
                    Ok(rows
                        .iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<Vec<_>>())
                },
            )
            .await?;
        println!(
            "recent messages, read {attempt}: {} rows in {:?}",
            bodies.len(),
            started.elapsed()
        );
    }

    // User profiles: a read, an update that invalidates its tag, a read that sees it.
    let by_id = format!("SELECT user_id, name, plan FROM {schema}.profiles WHERE user_id = $1");
    let load_profile = |sql: String| {
        move |db: Arc<PgPool>| async move {
            let row = db.query_one(&sql, &[&42i64]).await?;
            Ok(Profile {
                user_id: row.get(0),
                name: row.get(1),
                plan: row.get(2),
            })
        }
    };
    let options = EntryOptions::new().tags(["user:42"]);
    println!(
        "profile: {:?}",
        profiles
            .read("profile:42", &options, load_profile(by_id.clone()))
            .await?
    );
    let upgrade = format!("UPDATE {schema}.profiles SET plan = $1 WHERE user_id = $2");
    profiles
        .write(&["user:42"], |db: Arc<PgPool>| async move {
            db.execute(&upgrade, &[&"team", &42i64]).await
        })
        .await?;
    println!(
        "after the update: {:?}",
        profiles
            .read("profile:42", &options, load_profile(by_id))
            .await?
    );

    println!("\npool: {:?}", pool.status());
    pool.execute(&format!("DROP SCHEMA {schema} CASCADE"), &[])
        .await?;
    Ok(())
}
