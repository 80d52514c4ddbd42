//! The cost endpoints on a local port, over an in-memory meter seeded with 30 days of
//! synthetic usage: 20 users, three services, cache hits, budgets, and one user whose spend
//! spikes today.
//!
//! ```sh
//! cargo run --example cost_server --features axum
//! PUPKIT_COST_TOKEN=s3cret PUPKIT_COST_ADDR=127.0.0.1:8080 cargo run --example cost_server --features axum
//! ```

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use pupkit::cost::{
    Budget, CostMeter, CostRoutes, Meter, MicroUsd, Mode, Period, Scope, Usage, UsageSource,
};

/// SplitMix64: the same "random" month on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let token = std::env::var("PUPKIT_COST_TOKEN").unwrap_or_else(|_| "dev-token".to_owned());
    let addr = std::env::var("PUPKIT_COST_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());

    let meter = Meter::builder()
        .budget(Budget::new(
            Scope::Global,
            MicroUsd::from_dollars(50),
            Period::Month,
        ))
        .budget(
            Budget::new(
                Scope::User("user-03".into()),
                MicroUsd::from_dollars(1),
                Period::Month,
            )
            .mode(Mode::Hard),
        )
        .budget(Budget::new(
            Scope::Service("summaries".into()),
            MicroUsd::from_dollars(2),
            Period::Day,
        ))
        .build()
        .await?;
    let events = seed(&meter).await?;
    println!("seeded {events} usage events over the last 30 days");

    let app = CostRoutes::new(Arc::new(meter))
        .bearer_token(&token)
        .router();
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let auth = format!("-H 'authorization: Bearer {token}'");
    println!("bearer token: {token}\n\ntry:");
    println!("  curl {auth} {base}/api/costs/realtime");
    println!("  curl {auth} {base}/api/costs/report/month");
    println!(
        "  curl {auth} -H 'content-type: application/json' -d '{{\"amount_usd\": 5, \"period\": \"month\", \"mode\": \"hard\"}}' {base}/api/costs/budget/user-01"
    );
    println!("  curl {auth} '{base}/api/costs/export/csv?service=chat' -o costs.csv");
    println!("  curl {auth} '{base}/api/costs/breakdown/user?sort=cost&limit=5'");
    println!("\nserving until Ctrl-C");

    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// Records 30 days of usage ending now, plus a spike by user-07 today. Returns the count.
async fn seed(meter: &Meter) -> pupkit::Result<usize> {
    let mut rng = Rng(42);
    let now = Timestamp::now();
    let start = now - SignedDuration::from_hours(30 * 24);
    let mut count = 0;
    let mut record = async |usage: Usage| {
        count += 1;
        meter.record(usage.operation("demo")).await.map(|_| ())
    };
    // Each hour, a few calls by random users.
    for hour in 0..30 * 24 {
        for _ in 0..rng.below(6) {
            let at = start + SignedDuration::from_secs(hour * 3600 + rng.below(3600) as i64);
            let user = format!("user-{:02}", 1 + rng.below(20));
            let id = format!("req-{}", rng.next());
            let usage = match rng.below(10) {
                0..=5 => {
                    let usage = Usage::new(id, "chat", user, "gpt-4o-mini")
                        .tokens(500 + rng.below(2_000), 100 + rng.below(600));
                    // A quarter of chat answers come from the cache.
                    if rng.below(4) == 0 {
                        usage.source(UsageSource::Cache)
                    } else {
                        usage
                    }
                }
                6..=8 => Usage::new(id, "search", user, "text-embedding-3-small")
                    .tokens(200 + rng.below(1_000), 0),
                _ => Usage::new(id, "summaries", user, "gpt-4o")
                    .tokens(2_000 + rng.below(4_000), 300 + rng.below(500)),
            };
            record(usage.at(at.min(now))).await?;
        }
    }
    // user-07 runs 40 large summaries today: a daily anomaly.
    let today = Period::Day.window(now, &jiff::tz::TimeZone::UTC).start;
    let span = now.duration_since(today).as_secs().max(1);
    for i in 0..40 {
        let at = today + SignedDuration::from_secs(span * i / 40);
        let usage = Usage::new(format!("spike-{i}"), "summaries", "user-07", "gpt-4o")
            .tokens(8_000, 1_500)
            .at(at);
        record(usage).await?;
    }
    Ok(count)
}
