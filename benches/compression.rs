//! pupkit's `CompressionLayer` against tower-http's `CompressionLayer`, in one run, on the
//! same axum router and the same responses: a ~60 KB and a ~1.2 KB JSON list of chat
//! messages, each as brotli and as gzip, driven in-process with `oneshot` (no sockets) and
//! the body collected. The raw baseline is the same router with no compression. Both layers
//! run at the same levels (brotli quality 4, window 22; gzip 6). After the criterion groups
//! it prints the sizes, the reduction, each layer's throughput and the ratio, then a sweep of
//! brotli qualities and gzip levels on the 60 KB body (the numbers behind the defaults).
//!
//! `cargo bench --bench compression --features axum`

mod support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::BodyExt;
use pupkit::compression::{CompressionConfig, CompressionLayer, Encoding, compress, decompress};
use serde::Serialize;
use tokio::runtime::Runtime;
use tower::ServiceExt;
use tower_http::CompressionLevel;

/// The two bodies: (name, target size in bytes).
const INPUTS: [(&str, usize); 2] = [("60k", 60_000), ("1k2", 1_200)];
/// The codings compared, with the level both layers use.
const CODINGS: [(Encoding, i32); 2] = [(Encoding::Brotli, 4), (Encoding::Gzip, 6)];

// ---- The responses: chat messages with varied English text, built deterministically. ----

/// xorshift64*: a fixed seed gives the same bodies on every run and machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const OPENERS: &[&str] = &[
    "Sure",
    "Thanks for waiting",
    "Good question",
    "Happy to help",
    "Of course",
    "I checked your account",
    "Let me explain",
    "Quick update",
    "Hi again",
    "Understood",
    "I see what happened",
    "Right",
];
const SUBJECTS: &[&str] = &[
    "your order",
    "the refund",
    "the invoice for March",
    "our billing team",
    "the new password",
    "the shipping label",
    "your subscription",
    "the replacement battery",
    "the delivery driver",
    "this week's report",
    "the second payment",
    "the warranty claim",
    "my manager",
    "the mobile app",
    "the API key you created",
    "the support ticket",
    "the weekend schedule",
    "the discount code",
    "your last message",
    "the export job",
];
const VERBS: &[&str] = &[
    "should arrive",
    "was approved",
    "has been moved",
    "will be reviewed",
    "failed to sync",
    "was charged twice",
    "needs one more signature",
    "got stuck in customs",
    "was updated",
    "can be cancelled",
    "is still pending",
    "expired",
    "was sent again",
    "is scheduled",
    "will be refunded",
    "looks correct",
    "was flagged by the fraud check",
    "needs a restart",
];
const TIMES: &[&str] = &[
    "tomorrow morning",
    "before Friday",
    "within three business days",
    "by the end of the month",
    "later today",
    "after the holiday",
    "as soon as the warehouse opens",
    "next Tuesday",
    "in about an hour",
    "overnight",
    "this afternoon",
    "once the bank confirms it",
];
const FOLLOW_UPS: &[&str] = &[
    "Could you confirm the email address on the account?",
    "Is there anything else I can help you with today?",
    "Please keep the original packaging until it is collected.",
    "You will get a confirmation email with the tracking number.",
    "If the problem persists, try clearing the cache and signing in again.",
    "I have added a note so the next agent sees the whole history.",
    "Let me know if the new settings work for you.",
    "The charge should disappear from your statement automatically.",
    "I can also switch you to the annual plan, which is cheaper.",
    "We are sorry for the trouble this caused.",
    "Do you still have the receipt or the order confirmation?",
    "That usually fixes it, but tell me if it does not.",
    "Our records show two devices signed in with the same account.",
    "Which address should we use for the replacement?",
    "I escalated it and marked it urgent.",
];
const USER_LINES: &[&str] = &[
    "where is my package",
    "I was billed twice this month",
    "the app keeps logging me out",
    "can I change the delivery address",
    "my discount code does not work",
    "how do I download last year's invoices",
    "the tracking page has not changed since Monday",
    "I never received the password reset email",
    "can you cancel the second order",
    "the battery died after two weeks",
    "why was my card declined",
    "is the weekend support line open",
];

/// A sentence from the parts, with an order number, a price or a time mixed in.
fn sentence(rng: &mut Rng) -> String {
    match rng.below(4) {
        0 => format!(
            "{}, {} {} {}.",
            rng.pick(OPENERS),
            rng.pick(SUBJECTS),
            rng.pick(VERBS),
            rng.pick(TIMES)
        ),
        1 => format!(
            "Order #{} for ${}.{:02} {} {}.",
            100_000 + rng.below(900_000),
            5 + rng.below(400),
            rng.below(100),
            rng.pick(VERBS),
            rng.pick(TIMES)
        ),
        2 => format!(
            "{} {}, and {} {}.",
            capitalized(rng.pick(SUBJECTS)),
            rng.pick(VERBS),
            rng.pick(SUBJECTS),
            rng.pick(VERBS)
        ),
        _ => rng.pick(FOLLOW_UPS).to_owned(),
    }
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

#[derive(Serialize)]
struct Message {
    id: String,
    conversation_id: String,
    role: &'static str,
    created_at: String,
    model: Option<&'static str>,
    tokens: u32,
    content: String,
}

/// A JSON array of chat messages, compact as an API sends it, of at least `target` bytes
/// (one message more than fits).
fn chat_json(target: usize, seed: u64) -> Bytes {
    let mut rng = Rng(seed);
    let conversation_id = format!("conv_{:016x}", rng.next());
    let mut messages = Vec::new();
    let mut size = 2;
    let mut second = 0;
    while size < target {
        let index = messages.len();
        let user = index % 2 == 0;
        let content = if user {
            let line = rng.pick(USER_LINES);
            format!("{}?", capitalized(line))
        } else {
            let sentences = 2 + rng.below(4);
            (0..sentences)
                .map(|_| sentence(&mut rng))
                .collect::<Vec<_>>()
                .join(" ")
        };
        second += 5 + rng.below(90);
        let message = Message {
            id: format!("msg_{:016x}", rng.next()),
            conversation_id: conversation_id.clone(),
            role: if user { "user" } else { "assistant" },
            created_at: format!(
                "2026-11-27T{:02}:{:02}:{:02}Z",
                9 + second / 3600,
                second / 60 % 60,
                second % 60
            ),
            model: if user { None } else { Some("gpt-4o-mini") },
            tokens: (content.len() / 4) as u32,
            content,
        };
        size += serde_json::to_vec(&message).unwrap().len() + 1;
        messages.push(message);
    }
    Bytes::from(serde_json::to_vec(&messages).unwrap())
}

// ---- The routers. ----

fn app(body: Bytes) -> Router {
    Router::new().route(
        "/messages",
        get(move || {
            let body = body.clone();
            async move { ([(CONTENT_TYPE, "application/json")], body) }
        }),
    )
}

fn pupkit_router(body: Bytes) -> Router {
    let mut config = CompressionConfig::default();
    config.brotli_quality = 4;
    config.brotli_window = 22;
    config.gzip_level = 6;
    app(body).layer(CompressionLayer::new(config))
}

/// tower-http at an explicit level; its brotli window is the brotli crate's default, 22.
fn tower_http_router(body: Bytes, level: i32) -> Router {
    app(body).layer(
        tower_http::compression::CompressionLayer::new().quality(CompressionLevel::Precise(level)),
    )
}

fn request(encoding: Encoding) -> Request<Body> {
    Request::get("/messages")
        .header(ACCEPT_ENCODING, encoding.as_str())
        .body(Body::empty())
        .unwrap()
}

/// One request through the router, the whole body collected.
async fn fetch(router: &Router, encoding: Encoding) -> Response<Bytes> {
    let response = router.clone().oneshot(request(encoding)).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, bytes)
}

/// Fetches once and checks the coding and that the body decodes to the original; returns the
/// compressed size.
fn checked_size(rt: &Runtime, router: &Router, encoding: Encoding, original: &Bytes) -> usize {
    let response = rt.block_on(fetch(router, encoding));
    let coding = response
        .headers()
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    assert_eq!(coding, Some(encoding.as_str()), "Content-Encoding");
    let decoded = decompress(response.body(), encoding, original.len() * 2).unwrap();
    assert!(decoded == original[..], "the body decodes to the original");
    response.body().len()
}

fn group(input: &str) -> String {
    format!("compression_{input}")
}

fn function(layer: &str, encoding: Encoding) -> String {
    format!("{layer}_{encoding}")
}

struct Sizes {
    input: &'static str,
    original: usize,
    /// (coding, ours, tower-http's)
    compressed: Vec<(Encoding, usize, usize)>,
}

fn benches(c: &mut Criterion, rt: &Runtime) -> Vec<Sizes> {
    let mut all = Vec::new();
    for (seed, (input, target)) in INPUTS.into_iter().enumerate() {
        let body = chat_json(target, 0x9E37_79B9_7F4A_7C15 ^ seed as u64);
        let ours = pupkit_router(body.clone());
        let raw = app(body.clone());
        let mut sizes = Sizes {
            input,
            original: body.len(),
            compressed: Vec::new(),
        };
        let mut group = c.benchmark_group(group(input));
        group.throughput(Throughput::Bytes(body.len() as u64));
        for (encoding, level) in CODINGS {
            let theirs = tower_http_router(body.clone(), level);
            sizes.compressed.push((
                encoding,
                checked_size(rt, &ours, encoding, &body),
                checked_size(rt, &theirs, encoding, &body),
            ));
            group.bench_function(function("pupkit", encoding), |b| {
                b.to_async(rt).iter(|| fetch(&ours, encoding))
            });
            group.bench_function(function("tower_http", encoding), |b| {
                b.to_async(rt).iter(|| fetch(&theirs, encoding))
            });
        }
        group.bench_function("none", |b| {
            b.to_async(rt).iter(|| fetch(&raw, Encoding::Identity))
        });
        group.finish();
        all.push(sizes);
    }
    all
}

fn print_summary(all: &[Sizes], started: Instant) {
    println!("\n== pupkit CompressionLayer vs tower-http CompressionLayer (this run) ==");
    println!(
        "Same axum router, oneshot + collect; br quality 4 window 22, gzip 6 on both. \
         Throughput counts original bytes. Target: pupkit >= 0.95x tower-http's throughput \
         at an equal or better ratio."
    );
    for sizes in all {
        let group = group(sizes.input);
        let none = (support::ran_since(&group, "none", started))
            .then(|| support::mean_ns(&group, "none"))
            .flatten();
        println!(
            "\n{} body: {} bytes of JSON{}",
            sizes.input,
            sizes.original,
            none.map(|ns| format!(
                "; uncompressed through the router: {:.1} us ({:.0} responses/s)",
                ns / 1e3,
                1e9 / ns
            ))
            .unwrap_or_default()
        );
        for &(encoding, ours, theirs) in &sizes.compressed {
            let reduction = |size: usize| 100.0 * (1.0 - size as f64 / sizes.original as f64);
            println!(
                "  {encoding:>4}: size pupkit {ours} B (-{:.1}%), tower-http {theirs} B (-{:.1}%), \
                 pupkit/tower-http size {:.3}",
                reduction(ours),
                reduction(theirs),
                ours as f64 / theirs as f64
            );
            let mean = |layer: &str| {
                let name = function(layer, encoding);
                support::ran_since(&group, &name, started)
                    .then(|| support::mean_ns(&group, &name))
                    .flatten()
            };
            let rate = |ns: f64| {
                format!(
                    "{:.1} us, {:.1} MB/s, {:.0} responses/s",
                    ns / 1e3,
                    sizes.original as f64 / ns * 1e3,
                    1e9 / ns
                )
            };
            match (mean("pupkit"), mean("tower_http")) {
                (Some(a), Some(b)) => println!(
                    "        pupkit {}; tower-http {}; throughput ratio pupkit/tower-http \
                     {:.2}x (target >= 0.95x){}",
                    rate(a),
                    rate(b),
                    b / a,
                    none.map(|n| format!(
                        "; compression alone (minus the uncompressed path): pupkit {:.1} us, \
                         tower-http {:.1} us",
                        (a - n) / 1e3,
                        (b - n) / 1e3
                    ))
                    .unwrap_or_default()
                ),
                _ => println!("        not run"),
            }
        }
    }
}

/// Size and median time of `compress` on the 60 KB body at each level.
fn level_sweep() {
    const RUNS: usize = 50;
    let body = chat_json(INPUTS[0].1, 0x9E37_79B9_7F4A_7C15);
    println!(
        "\n== level sweep: pupkit::compression::compress on the {} B body, median of {RUNS} ==",
        body.len()
    );
    let levels = (3..=6)
        .map(|q| (Encoding::Brotli, q))
        .chain([1, 4, 6, 9].map(|l| (Encoding::Gzip, l)));
    for (encoding, level) in levels {
        let mut config = CompressionConfig::default();
        match encoding {
            Encoding::Brotli => config.brotli_quality = level,
            _ => config.gzip_level = level,
        }
        let mut size = 0;
        let mut times: Vec<Duration> = (0..RUNS)
            .map(|_| {
                let started = Instant::now();
                let packed = compress(&body, encoding, &config).unwrap();
                let elapsed = started.elapsed();
                size = packed.len();
                elapsed
            })
            .collect();
        times.sort();
        let median = times[RUNS / 2];
        println!(
            "  {encoding:>4} {level}: {size:>6} B (-{:.1}%, ratio {:.2}), {:>7.1} us ({:.0} MB/s)",
            100.0 * (1.0 - size as f64 / body.len() as f64),
            body.len() as f64 / size as f64,
            median.as_secs_f64() * 1e6,
            body.len() as f64 / median.as_secs_f64() / 1e6
        );
    }
}

fn main() {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let sizes = benches(&mut criterion, &rt);
    criterion.final_summary();
    print_summary(&sizes, started);
    level_sweep();
}
