//! The full L0 + hot/warm/cold setup on Redis, printing where each read was served from.
//!
//! Needs Redis at `PUPKIT_REDIS_URL` (default `redis://127.0.0.1:6379`):
//! `cargo run --example tiered_redis --features redis`

use std::time::Duration;

use pupkit::cache::{CacheStats, EntryOptions, Tiered, TieredConfig};
use pupkit::redis::{RedisConfig, RedisConnection};

/// The tier whose hit counter moved between two snapshots.
fn served_from(before: &CacheStats, after: &CacheStats) -> String {
    before
        .tiers
        .iter()
        .zip(&after.tiers)
        .find(|(b, a)| a.hits > b.hits)
        .map_or("nowhere (miss)".to_owned(), |(_, a)| a.name.clone())
}

#[tokio::main]
async fn main() -> pupkit::Result<()> {
    let redis = RedisConnection::connect(&RedisConfig::from_env()).await?;
    let mut config = TieredConfig::named("example-messages");
    config.key_prefix = format!("pupkit-example-{}", std::process::id());
    let node_a: Tiered<String> = Tiered::builder(config.clone())
        .redis(redis.clone())
        .build()?;
    // A second "node" without L0, so every read goes to Redis.
    config.l0.enabled = false;
    let node_b: Tiered<String> = Tiered::builder(config).redis(redis).build()?;

    node_a
        .set(
            "msg:1",
            "hello from the cold tier".to_owned(),
            &EntryOptions::new().tier("cold"),
        )
        .await?;
    node_a
        .set(
            "msg:2",
            "tagged".to_owned(),
            &EntryOptions::new()
                .tags(["conv:7"])
                .ttl(Duration::from_secs(60)),
        )
        .await?;

    for (node, name, key) in [
        (&node_a, "A", "msg:1"),
        (&node_b, "B", "msg:1"),
        (&node_b, "B", "msg:1"),
        (&node_b, "B", "msg:1"),
        (&node_b, "B", "msg:1"),
        (&node_b, "B", "msg:2"),
    ] {
        let before = node.stats();
        let value = node.get(key).await?;
        println!(
            "node {name} get {key} -> {value:?} from {}",
            served_from(&before, &node.stats())
        );
    }
    node_a.invalidate_tags(&["conv:7"]).await?;
    println!(
        "after invalidate_tags(conv:7), node B get msg:2 -> {:?}",
        node_b.get("msg:2").await?
    );

    println!("\nnode B per tier:");
    for tier in node_b.stats().tiers {
        println!(
            "  {:<5} hits {} misses {} promotions {}",
            tier.name, tier.hits, tier.misses, tier.promotions
        );
    }
    node_a.clear().await?;
    Ok(())
}
