//! pupkit's `CompressionLayer` against tower-http's `CompressionLayer`, in one run, on the
//! same axum router and the same responses: a ~60 KB and a ~1.2 KB JSON list of chat
//! messages, each as brotli and as gzip, driven in-process with `oneshot` (no sockets) and
//! the body collected. The raw baseline is the same router with no compression layer. Both
//! layers run at the same levels (brotli quality 4, window 22; gzip 6).
//!
//! Each case runs twice: spawned onto a worker of a multi-thread runtime, as hyper serves a
//! connection (the production case), and on the bench thread in a current-thread runtime,
//! where glibc's main heap can hand an encoder's freed buffers back to the kernel and fault
//! them in again on the next response. Then, since one criterion run on a small VM wanders by
//! ±15%, the two layers run again in alternating batches, and the median of the per-round
//! ratios is printed too. After the criterion groups it prints the sizes, the reduction, each
//! layer's throughput and the ratios, then a sweep of brotli qualities and gzip levels on the
//! 60 KB body (the numbers behind the defaults).
//!
//! `cargo bench --bench compression --features axum`

#[path = "support/paired.rs"]
mod paired;
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
}

/// The vocabulary of the messages, most frequent first: common English words and the words
/// of a support chat.
const WORDS: &str = "\
the of and to a in is you that it for on with as be this your are was have we can at or \
not by from but will if they our an all my one so do about there what out up has when \
more would which their time also just like them some no how get other only new any these \
been then into need order account please could help make use than now should its very \
here see first know check thanks over may well because send last team back after two \
where most work way want still same right sure today day week month year data email \
number support payment refund issue problem update change plan price card bill invoice \
address package delivery shipping return item product service app page link login \
password code error message reply question answer customer user report file system \
setting option access review request ticket manager store online phone call date morning \
afternoon evening tomorrow yesterday soon later again already usually often never always \
maybe perhaps actually really quite almost enough next another each every both either \
few many much several such own different small large long short early late easy hard \
clear simple quick full free open close start stop try keep give take show find think \
feel look seem leave turn move pay buy sell ship cancel confirm receive arrive expect \
appear follow include continue allow provide create add remove fix test note mention \
explain understand agree wait happen remember notice decide reach offer suggest require \
charge approve process track contact resolve escalate schedule cover apply share save \
load sync restart reset sign sorry glad happy great good bad better best wrong correct \
possible available current recent previous original final extra second third important \
usual normal strange specific general personal private public local main whole part side \
end case point area reason result kind sort type group list form box screen button tab \
menu version device laptop browser window network server cache database record history \
profile balance amount total fee tax discount coupon deal sale stock warehouse courier \
driver label tracking status step detail copy receipt statement person people family \
friend colleague office home city country street road building floor room desk";

/// Words drawn with Zipf's law (the k-th most frequent word with weight 1/k): not grammar,
/// but text that compresses like English prose. gzip 6 takes the messages' text alone down by
/// about 61%, and English prose (the GPL, a changelog) by 62-65%; one repeated sentence would
/// shrink by 99% and overstate every ratio.
struct Words {
    words: Vec<&'static str>,
    /// Cumulative weights.
    cumulative: Vec<f64>,
}

impl Words {
    fn new() -> Self {
        let mut words: Vec<&'static str> = Vec::new();
        for word in WORDS.split_whitespace() {
            if !words.contains(&word) {
                words.push(word);
            }
        }
        let mut total = 0.0;
        let cumulative = (1..=words.len())
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect();
        Words { words, cumulative }
    }

    fn word(&self, rng: &mut Rng) -> &'static str {
        let total = self.cumulative[self.cumulative.len() - 1];
        let x = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let index = self.cumulative.partition_point(|&c| c < x);
        self.words[index.min(self.words.len() - 1)]
    }

    /// A sentence of `min..=max` words, capitalized and punctuated; now and then with an
    /// order number and an amount in it.
    fn sentence(&self, rng: &mut Rng, min: usize, max: usize, end: char) -> String {
        let count = min + rng.below(max - min + 1);
        let mut words: Vec<String> = (0..count).map(|_| self.word(rng).to_owned()).collect();
        if rng.below(6) == 0 {
            let at = rng.below(count);
            words.insert(
                at,
                format!(
                    "order #{} of ${}.{:02}",
                    100_000 + rng.below(900_000),
                    5 + rng.below(400),
                    rng.below(100)
                ),
            );
        }
        let mut sentence = capitalized(&words.join(" "));
        if rng.below(5) == 0 && count > 8 {
            sentence.insert(sentence[..sentence.len() / 2].rfind(' ').unwrap_or(0), ',');
        }
        sentence.push(end);
        sentence
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
    let words = Words::new();
    let conversation_id = format!("conv_{:016x}", rng.next());
    let mut messages = Vec::new();
    let mut size = 2;
    let mut second = 0;
    while size < target {
        let index = messages.len();
        let user = index % 2 == 0;
        let content = if user {
            words.sentence(&mut rng, 4, 14, '?')
        } else {
            (0..2 + rng.below(7))
                .map(|_| {
                    let end = if rng.below(8) == 0 { '!' } else { '.' };
                    words.sentence(&mut rng, 6, 20, end)
                })
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

/// Where a request runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Spawned onto a worker of a multi-thread runtime (2 workers), as hyper runs each
    /// connection: the production case.
    Worker,
    /// On the bench's own thread, in a current-thread runtime (a `flavor = "current_thread"`
    /// host). Its allocations come from glibc's main heap, which returns freed memory at its
    /// top to the kernel, so an encoder's buffers can be page-faulted in again per response.
    CurrentThread,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Worker => "worker",
            Mode::CurrentThread => "current_thread",
        }
    }
}

const MODES: [Mode; 2] = [Mode::Worker, Mode::CurrentThread];

/// One request through the router, the whole body collected.
async fn fetch(router: Router, encoding: Encoding) -> Response<Bytes> {
    let response = router.oneshot(request(encoding)).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, bytes)
}

async fn fetch_in(mode: Mode, router: &Router, encoding: Encoding) -> Response<Bytes> {
    match mode {
        Mode::Worker => tokio::spawn(fetch(router.clone(), encoding)).await.unwrap(),
        Mode::CurrentThread => fetch(router.clone(), encoding).await,
    }
}

/// Fetches once and checks the coding and that the body decodes to the original; returns the
/// compressed size.
fn checked_size(rt: &Runtime, router: &Router, encoding: Encoding, original: &Bytes) -> usize {
    let response = rt.block_on(fetch(router.clone(), encoding));
    let coding = response
        .headers()
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok());
    assert_eq!(coding, Some(encoding.as_str()), "Content-Encoding");
    let decoded = decompress(response.body(), encoding, original.len() * 2).unwrap();
    assert!(decoded == original[..], "the body decodes to the original");
    response.body().len()
}

fn group(input: &str, mode: Mode) -> String {
    format!("compression_{input}_{}", mode.name())
}

fn function(layer: &str, encoding: Encoding) -> String {
    format!("{layer}_{encoding}")
}

struct Sizes {
    input: &'static str,
    original: usize,
    /// The start of the body, to show what is compressed.
    sample: String,
    /// (coding, our size, tower-http's size)
    compressed: Vec<(Encoding, usize, usize)>,
    /// Per coding, from [`paired`], when its criterion benchmarks ran.
    paired: Vec<Option<[f64; 3]>>,
}

/// Throughput ratio pupkit / tower-http from alternating batches of requests (~10 ms each) on
/// the worker runtime, so both see the same moment of a noisy machine; the order swaps every
/// round (see `paired`). Returns the lower quartile, median and upper quartile of the
/// per-round ratios.
fn paired(rt: &Runtime, ours: &Router, theirs: &Router, encoding: Encoding) -> [f64; 3] {
    const ROUNDS: usize = 60;
    let started = Instant::now();
    rt.block_on(async {
        for _ in 0..5 {
            std::hint::black_box(fetch_in(Mode::Worker, ours, encoding).await);
        }
    });
    let n = ((0.01 / (started.elapsed().as_secs_f64() / 5.0)) as usize).clamp(1, 1_000);
    let times = paired::run(
        rt,
        ROUNDS,
        Duration::ZERO,
        n,
        || fetch_in(Mode::Worker, theirs, encoding),
        || fetch_in(Mode::Worker, ours, encoding),
    );
    // Time ratios pupkit / tower-http, inverted into throughput ratios.
    let [low, median, high] = times.quartiles;
    [1.0 / high, 1.0 / median, 1.0 / low]
}

fn benches(c: &mut Criterion, runtimes: &[(Mode, Runtime)], started: Instant) -> Vec<Sizes> {
    let mut all = Vec::new();
    for (seed, (input, target)) in INPUTS.into_iter().enumerate() {
        let body = chat_json(target, 0x9E37_79B9_7F4A_7C15 ^ seed as u64);
        let ours = pupkit_router(body.clone());
        let raw = app(body.clone());
        let theirs: Vec<Router> = CODINGS
            .iter()
            .map(|&(_, level)| tower_http_router(body.clone(), level))
            .collect();
        let mut sizes = Sizes {
            input,
            original: body.len(),
            sample: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
            compressed: CODINGS
                .iter()
                .zip(&theirs)
                .map(|(&(encoding, _), theirs)| {
                    let rt = &runtimes[0].1;
                    (
                        encoding,
                        checked_size(rt, &ours, encoding, &body),
                        checked_size(rt, theirs, encoding, &body),
                    )
                })
                .collect(),
            paired: Vec::new(),
        };
        for (mode, rt) in runtimes {
            let mode = *mode;
            let mut group = c.benchmark_group(group(input, mode));
            group.throughput(Throughput::Bytes(body.len() as u64));
            for (&(encoding, _), theirs) in CODINGS.iter().zip(&theirs) {
                group.bench_function(function("pupkit", encoding), |b| {
                    b.to_async(rt).iter(|| fetch_in(mode, &ours, encoding))
                });
                group.bench_function(function("tower_http", encoding), |b| {
                    b.to_async(rt).iter(|| fetch_in(mode, theirs, encoding))
                });
            }
            group.bench_function("none", |b| {
                b.to_async(rt)
                    .iter(|| fetch_in(mode, &raw, Encoding::Identity))
            });
            group.finish();
        }
        let worker = &runtimes[0].1;
        let worker_group = group(input, Mode::Worker);
        sizes.paired = CODINGS
            .iter()
            .zip(&theirs)
            .map(|(&(encoding, _), theirs)| {
                support::ran_since(&worker_group, &function("pupkit", encoding), started)
                    .then(|| paired(worker, &ours, theirs, encoding))
            })
            .collect();
        all.push(sizes);
    }
    all
}

fn print_summary(all: &[Sizes], started: Instant) {
    println!("\n== pupkit CompressionLayer vs tower-http CompressionLayer (this run) ==");
    println!(
        "Same axum router, oneshot + collect; br quality 4 window 22, gzip 6 on both. MB/s \
         counts original bytes. Target: pupkit >= 0.95x tower-http's throughput at an equal or \
         better ratio."
    );
    let mean = |group: &str, name: &str| {
        support::ran_since(group, name, started)
            .then(|| support::mean_ns(group, name))
            .flatten()
    };
    for sizes in all {
        println!("\n{} body: {} bytes of JSON", sizes.input, sizes.original);
        println!("  starts: {}...", sizes.sample);
        let reduction = |size: usize| 100.0 * (1.0 - size as f64 / sizes.original as f64);
        for &(encoding, ours, theirs) in &sizes.compressed {
            println!(
                "  {encoding} size: pupkit {ours} B (-{:.1}%), tower-http {theirs} B (-{:.1}%), \
                 pupkit/tower-http {:.3}",
                reduction(ours),
                reduction(theirs),
                ours as f64 / theirs as f64
            );
        }
        for mode in MODES {
            let group = group(sizes.input, mode);
            let none = mean(&group, "none");
            println!(
                "  {} mode{}",
                mode.name(),
                none.map(|ns| format!(", uncompressed through the router: {:.1} us", ns / 1e3))
                    .unwrap_or_default()
            );
            let rate = |ns: f64| {
                format!(
                    "{:>7.1} us {:>6.1} MB/s {:>6.0} resp/s",
                    ns / 1e3,
                    sizes.original as f64 / ns * 1e3,
                    1e9 / ns
                )
            };
            for &(encoding, _, _) in &sizes.compressed {
                match (
                    mean(&group, &function("pupkit", encoding)),
                    mean(&group, &function("tower_http", encoding)),
                ) {
                    (Some(a), Some(b)) => println!(
                        "    {encoding:>4}: pupkit {} | tower-http {} | pupkit/tower-http \
                         throughput {:.2}x (target >= 0.95x)",
                        rate(a),
                        rate(b),
                        b / a
                    ),
                    _ => println!("    {encoding:>4}: not run"),
                }
            }
        }
        println!("  paired (alternating batches, worker mode), pupkit/tower-http throughput:");
        for (&(encoding, _, _), paired) in sizes.compressed.iter().zip(&sizes.paired) {
            match paired {
                Some([low, median, high]) => println!(
                    "    {encoding:>4}: median {median:.2}x, quartiles {low:.2}x..{high:.2}x \
                     (target >= 0.95x)"
                ),
                None => println!("    {encoding:>4}: not run"),
            }
        }
    }
}

/// Size and median time of `compress` on the 60 KB body at each level, after a few warm-up
/// runs. One level at a time: interleaving brotli and gzip makes each free the other's
/// buffers back to the kernel, and the sweep would measure page faults.
fn level_sweep() {
    const RUNS: usize = 51;
    const WARM_UP: usize = 5;
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
        let mut rng = Rng(0x5EED);
        let mut times: Vec<Duration> = (0..WARM_UP + RUNS)
            .map(|_| {
                // A live block of random size moves the encoder's buffers around the heap:
                // brotli's speed depends on where its tables land (±30% between runs of
                // this bench, with no page faults), and the median should not rest on one
                // placement.
                let pad = std::hint::black_box(vec![1u8; 64 * rng.below(4096)]);
                let started = Instant::now();
                let packed = compress(&body, encoding, &config).unwrap();
                let elapsed = started.elapsed();
                size = packed.len();
                drop(pad);
                elapsed
            })
            .skip(WARM_UP)
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
    let worker = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runtimes = [(Mode::Worker, worker), (Mode::CurrentThread, current)];
    let mut criterion = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .without_plots()
        .configure_from_args();
    let sizes = benches(&mut criterion, &runtimes, started);
    criterion.final_summary();
    print_summary(&sizes, started);
    level_sweep();
}
