//! The main flow with no services: a tiered cache on in-process tiers, with get_or_load,
//! a stampede that causes one load, tags and stats; then a cost meter in memory with a hard
//! budget, a reserved call, a cache hit recorded as a saving, and the day's report.
//!
//! `cargo run --example quickstart`

use std::time::Duration;

use pupkit::cache::{EntryOptions, Tiered, TieredConfig};
use pupkit::cost::{
    Budget, CostMeter, Meter, Mode, Period, ReportPeriod, Scope, Spender, Usage, UsageSource,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Profile {
    user_id: String,
    name: String,
    plan: String,
}

/// Stands in for a database query.
async fn load_profile(user_id: &str) -> Result<Profile, std::io::Error> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(Profile {
        user_id: user_id.to_owned(),
        name: format!("User {user_id}"),
        plan: "pro".to_owned(),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> pupkit::Result<()> {
    // L0 (moka) in front of in-process hot/warm/cold tiers; with the `redis` feature,
    // `.redis(connection)` puts the shared tiers in Redis instead.
    let profiles: Tiered<Profile> = Tiered::builder(TieredConfig::named("profiles"))
        .memory_tiers(64 << 20)
        .build()?;

    let options = EntryOptions::new()
        .tier("warm")
        .ttl(Duration::from_secs(3600))
        .tags(["user:42"]);
    for attempt in 1..=3 {
        let started = std::time::Instant::now();
        let profile = profiles
            .get_or_load("profile:42", &options, || load_profile("42"))
            .await?;
        println!(
            "read {attempt}: {} ({} plan) in {:?}",
            profile.name,
            profile.plan,
            started.elapsed()
        );
    }

    // A stampede: 100 concurrent readers of a cold key share one load.
    let readers: Vec<_> = (0..100)
        .map(|_| {
            let profiles = profiles.clone();
            tokio::spawn(async move {
                profiles
                    .get_or_load("profile:7", &EntryOptions::new(), || load_profile("7"))
                    .await
            })
        })
        .collect();
    for reader in readers {
        reader.await.expect("reader task")?;
    }
    println!(
        "100 concurrent readers of a cold key: {} loader calls in all so far ({} joined a load in flight)",
        profiles.stats().loader_calls,
        profiles.stats().coalesced_loads
    );

    // A profile update invalidates everything tagged with the user: one timestamp, no scan.
    profiles.invalidate_tags(&["user:42"]).await?;
    let after = profiles.get("profile:42").await?;
    println!(
        "after invalidate_tags(user:42): {}",
        if after.is_some() {
            "still cached"
        } else {
            "gone"
        }
    );

    let stats = profiles.stats();
    println!(
        "\nloader calls: {}, overall hit rate: {:.0}%",
        stats.loader_calls,
        stats.hit_rate * 100.0
    );
    for tier in &stats.tiers {
        println!(
            "  {:<5} hits {:>2}  misses {:>2}  promotions {}  bytes written {} -> {}",
            tier.name, tier.hits, tier.misses, tier.promotions, tier.bytes_raw, tier.bytes_stored
        );
    }

    track_costs().await
}

/// The cost meter in memory: a hard daily budget, one reserved call, a cache hit recorded as
/// a saving, and the day's report.
async fn track_costs() -> pupkit::Result<()> {
    let meter = Meter::builder()
        .budget(
            Budget::new(Scope::User("42".into()), "0.01".parse()?, Period::Day).mode(Mode::Hard),
        )
        .build()
        .await?;
    let spender = Spender::new("chat", "42");
    // Hold an estimate before the expensive call, commit what it really cost after it.
    let held = meter.reserve(&spender, "0.005".parse()?).await?;
    let usage = Usage::new("req-1", "chat", "42", "gpt-4o-mini").tokens(12_000, 800);
    let recorded = meter.commit(&held, usage).await?;
    println!(
        "
chat call for user 42 cost {}",
        recorded.cost
    );
    // The same embedding served from the cache: no cost, a saving.
    let hit = Usage::new("req-2", "search", "42", "text-embedding-3-small")
        .tokens(50_000, 0)
        .source(UsageSource::Cache);
    meter.record(hit).await?;
    match meter.reserve(&spender, "0.01".parse()?).await {
        Ok(_) => println!("a second $0.01 call fits the budget"),
        Err(refused) => println!("a second $0.01 call is refused: {refused}"),
    }
    let report = meter.report(ReportPeriod::Day).await?;
    println!(
        "today: {} over {} requests, {} saved by the cache (budget left: {})",
        report.totals.cost,
        report.totals.requests,
        report.savings,
        meter.budget_status(None).await?[0].remaining
    );
    Ok(())
}
