//! A load generator for a host built on pupkit: open-loop arrivals at a target rate (linear
//! ramp-up), latency from each request's intended start (no coordinated omission), HDR
//! histograms, a live line, and JSON and HTML reports.
//!
//! ```sh
//! cargo run --release --example load_test -- 120 20 100 mixed 1000     # in process
//! cargo run --release --example load_test -- --duration 60 --users 50 --scenario cache \
//!     --rps 500 --redis --report load.html --json load.json
//! cargo run --release --example load_test -- --url http://127.0.0.1:3000 30 5 50 mixed 200
//! ```
//!
//! In process it drives pupkit's components directly: a `Tiered` cache (`cache`), `CachedRepo`
//! on Postgres (`messages`, in a schema of its own, dropped at the end), the embedding
//! `Batcher` over `LocalEmbedder` (`embeddings`), and `Meter::record` (`cost`); `mixed` weighs
//! them 40/30/20/10. With `--url` it calls the example server's routes instead (see
//! `http.rs`). `--help` lists every option.

mod cli;
mod html;
mod http;
mod inproc;
mod recorder;
mod report;
mod schedule;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Semaphore, oneshot};

use crate::cli::{Command, Config, ScenarioArg};
use crate::http::HttpTarget;
use crate::inproc::InProcess;
use crate::recorder::Recorder;
use crate::report::{HealthReport, Measured, Report};
use crate::schedule::Schedule;

/// One kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Cache,
    Messages,
    Embeddings,
    Cost,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Cache => "cache",
            Scenario::Messages => "messages",
            Scenario::Embeddings => "embeddings",
            Scenario::Cost => "cost",
        }
    }
}

/// The weights of `mixed`.
const MIX: [(Scenario, u32); 4] = [
    (Scenario::Cache, 40),
    (Scenario::Messages, 30),
    (Scenario::Embeddings, 20),
    (Scenario::Cost, 10),
];

/// splitmix64 of request `n` and a salt: the run's only randomness, reproducible per request.
pub fn mix(n: u64, salt: u64) -> u64 {
    let mut z = n
        .wrapping_add(salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A number in `[0, 1)` for request `n` and a salt.
pub fn unit(n: u64, salt: u64) -> f64 {
    (mix(n, salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// An error and its sources on one line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

enum Target {
    InProcess(Box<InProcess>),
    Http(HttpTarget),
}

impl Target {
    async fn call(&self, scenario: Scenario, n: u64) -> Result<(), String> {
        match self {
            Target::InProcess(target) => target.call(scenario, n).await,
            Target::Http(target) => target.call(scenario, n).await,
        }
    }
}

/// What `/api/health` said during the run.
#[derive(Default)]
struct HealthLog {
    before: Option<Value>,
    last: Option<Value>,
    failures: u64,
    last_failure: Option<String>,
}

fn main() -> ExitCode {
    let config = match cli::parse(std::env::args().skip(1)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            println!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("error: {error}\n\n{}", cli::USAGE);
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let run_id = format!("{}-{nanos:x}", std::process::id());
    let wanted: Vec<Scenario> = match config.scenario {
        ScenarioArg::Cache => vec![Scenario::Cache],
        ScenarioArg::Messages => vec![Scenario::Messages],
        ScenarioArg::Embeddings => vec![Scenario::Embeddings],
        ScenarioArg::Cost => vec![Scenario::Cost],
        ScenarioArg::Mixed => MIX.iter().map(|(s, _)| *s).collect(),
    };
    let mut health = HealthLog::default();
    let (target, ready, mut notes) = match &config.url {
        Some(url) => {
            let target = match HttpTarget::new(url, config.users, config.timeout) {
                Ok(target) => target,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let mut notes = Vec::new();
            if config.redis {
                notes.push(
                    "--redis ignored: the HTTP target chooses its own cache backend".to_owned(),
                );
            }
            match target.health().await {
                Ok(value) => health.before = Some(value),
                Err(error) => {
                    notes.push(format!(
                        "the target's health endpoint failed before the run: {error}"
                    ));
                    health.failures += 1;
                    health.last_failure = Some(error);
                }
            }
            (Target::Http(target), wanted.clone(), notes)
        }
        None => {
            let (target, ready, notes) = InProcess::setup(&run_id, config.redis, &wanted).await;
            (Target::InProcess(Box::new(target)), ready, notes)
        }
    };
    for note in &notes {
        eprintln!("warning: {note}");
    }
    if ready.is_empty() {
        eprintln!(
            "error: nothing to run: the {} scenario could not be set up (see above)",
            config.scenario.name()
        );
        if let Target::InProcess(target) = &target {
            for problem in target.cleanup().await {
                eprintln!("warning: cleanup: {problem}");
            }
        }
        return ExitCode::FAILURE;
    }
    let weights: Vec<(Scenario, u32)> = MIX
        .iter()
        .copied()
        .filter(|(s, _)| ready.contains(s))
        .map(|(s, w)| if ready.len() == 1 { (s, 1) } else { (s, w) })
        .collect();
    if config.scenario == ScenarioArg::Mixed && ready.len() < wanted.len() {
        let names: Vec<&str> = weights.iter().map(|(s, _)| s.name()).collect();
        notes.push(format!(
            "mixed ran without the scenarios above; the weights are renormalized over {}",
            names.join(", ")
        ));
    }

    let schedule = Schedule::new(config.rps, config.ramp, config.duration);
    eprintln!(
        "load test: {} {} for {} s (ramp {} s), {} users, target {} req/s{}",
        if config.url.is_some() {
            "HTTP"
        } else {
            "in-process"
        },
        config.scenario.name(),
        config.duration.as_secs_f64(),
        config.ramp.as_secs_f64(),
        config.users,
        config.rps,
        config
            .url
            .as_ref()
            .map_or(String::new(), |url| format!(" at {url}"))
    );

    let target = Arc::new(target);
    let started_at = jiff::Timestamp::now().to_string();
    let start = Instant::now() + Duration::from_millis(20);
    let recorder = Arc::new(Recorder::new(start));
    let stop = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicU64::new(0));
    let users = Arc::new(Semaphore::new(config.users));
    let health = Arc::new(Mutex::new(health));

    let (stop_sampler, sampler_stopped) = oneshot::channel();
    let sampler = tokio::spawn(sample(
        Sampling {
            recorder: recorder.clone(),
            target: target.clone(),
            health: health.clone(),
            in_flight: in_flight.clone(),
            schedule,
            start,
            quiet: config.quiet,
        },
        sampler_stopped,
    ));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: finishing the requests in flight");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }
    let dispatcher = {
        let plan = Plan {
            handle: tokio::runtime::Handle::current(),
            schedule,
            start,
            weights,
            target: target.clone(),
            recorder: recorder.clone(),
            users: users.clone(),
            stop: stop.clone(),
            in_flight: in_flight.clone(),
            timeout: config.timeout,
            drain_deadline: start + config.duration + config.timeout + Duration::from_secs(5),
        };
        std::thread::Builder::new()
            .name("load-dispatcher".to_owned())
            .spawn(move || plan.dispatch())
    };
    let (scheduled, dropped) = match dispatcher {
        Ok(thread) => tokio::task::spawn_blocking(move || thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or((0, 0)),
        Err(error) => {
            eprintln!("error: cannot start the dispatcher thread: {error}");
            (0, 0)
        }
    };
    // Every request has a deadline, so the ones in flight finish; wait for all users free.
    let all = u32::try_from(config.users).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(
        config.timeout + Duration::from_secs(5),
        users.acquire_many(all),
    )
    .await;
    let _ = stop_sampler.send(());
    let _ = sampler.await;

    // The components' own figures, then cleanup.
    let mut components = None;
    let mut health_report = None;
    match &*target {
        Target::InProcess(target) => {
            components = Some(target.stats());
            for problem in target.cleanup().await {
                eprintln!("warning: cleanup: {problem}");
                notes.push(format!("cleanup: {problem}"));
            }
        }
        Target::Http(target) => {
            let after = target.health().await;
            let mut log = health.lock().unwrap_or_else(|e| e.into_inner());
            let after = match after {
                Ok(value) => Some(value),
                Err(error) => {
                    log.failures += 1;
                    log.last_failure = Some(error);
                    log.last.clone()
                }
            };
            let components = after
                .as_ref()
                .or(log.before.as_ref())
                .and_then(|v| v.get("components"))
                .cloned();
            health_report = Some(HealthReport {
                components,
                before: log.before.clone(),
                after,
                failures: log.failures,
                last_failure: log.last_failure.clone(),
            });
        }
    }
    if stop.load(Ordering::Relaxed) {
        notes.push(format!(
            "interrupted after {:.1} s: the report covers the run up to then",
            start.elapsed().as_secs_f64()
        ));
    }
    let in_flight_left = in_flight.load(Ordering::Relaxed);
    if in_flight_left > 0 {
        notes.push(format!(
            "{in_flight_left} requests were still in flight when the run ended and are not counted"
        ));
    }

    let measured = Measured {
        state: recorder.take_state(),
        scheduled,
        dropped,
    };
    if dropped > 0 {
        notes.push(format!(
            "{dropped} scheduled requests were never sent: no virtual user came free before the drain deadline (the target could not keep up)"
        ));
    }
    let (summary, scenarios) = report::summarize(&config, &measured);
    let pool = report::pool_report(&measured.state.timeline);
    let scenarios_run: BTreeMap<&'static str, u32> = MIX
        .iter()
        .filter(|(s, _)| ready.contains(s))
        .map(|(s, w)| (s.name(), if ready.len() == 1 { 1 } else { *w }))
        .collect();
    let requests = summary.requests;
    let state = measured.state;
    let report = Report {
        tool: "pupkit load_test",
        started_at,
        mode: if config.url.is_some() {
            "http"
        } else {
            "in-process"
        },
        config: config.clone(),
        scenarios_run,
        notes,
        summary,
        scenarios,
        errors: report::ErrorReport {
            count: state.errors,
            rate: if requests == 0 {
                0.0
            } else {
                recorder::round(state.errors as f64 / requests as f64, 6)
            },
            first: state.first_errors,
            by_message: state.error_messages,
        },
        timeline: state.timeline,
        pool,
        components,
        health: health_report,
    };

    let mut code = ExitCode::SUCCESS;
    if let Some(path) = &config.json {
        match serde_json::to_vec_pretty(&report) {
            Ok(bytes) => {
                if let Err(error) = write_file(path, &bytes) {
                    eprintln!("error: writing {}: {error}", path.display());
                    code = ExitCode::FAILURE;
                }
            }
            Err(error) => {
                eprintln!("error: serializing the report: {error}");
                code = ExitCode::FAILURE;
            }
        }
    }
    if let Some(path) = &config.report
        && let Err(error) = write_file(path, html::render(&report).as_bytes())
    {
        eprintln!("error: writing {}: {error}", path.display());
        code = ExitCode::FAILURE;
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(report::text_summary(&report).as_bytes());
    for (flag, path) in [("JSON", &config.json), ("HTML report", &config.report)] {
        if let Some(path) = path {
            let _ = writeln!(out, "{flag}: {}", path.display());
        }
    }
    let _ = out.flush();
    code
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, bytes)
}

/// What the dispatcher thread needs.
struct Plan {
    handle: tokio::runtime::Handle,
    schedule: Schedule,
    start: Instant,
    weights: Vec<(Scenario, u32)>,
    target: Arc<Target>,
    recorder: Arc<Recorder>,
    users: Arc<Semaphore>,
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicU64>,
    timeout: Duration,
    drain_deadline: Instant,
}

impl Plan {
    fn pick(&self, n: u64) -> Scenario {
        let total: u32 = self.weights.iter().map(|(_, w)| w).sum();
        let mut r = (mix(n, 9) % u64::from(total.max(1))) as u32;
        for (scenario, weight) in &self.weights {
            if r < *weight {
                return *scenario;
            }
            r -= weight;
        }
        self.weights[0].0
    }

    /// Sends request `n` at its due time, on an OS thread of its own (precise sleeps, and the
    /// schedule never waits on the runtime). A request waits for a free virtual user; its
    /// latency counts from its due time all the same. Returns (scheduled, dropped).
    fn dispatch(self) -> (u64, u64) {
        let total = self.schedule.total();
        let mut n = 0u64;
        while let Some(due) = self.schedule.due(n) {
            let intended = self.start + due;
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return (n, 0);
                }
                let now = Instant::now();
                if now >= intended {
                    break;
                }
                std::thread::sleep((intended - now).min(Duration::from_millis(100)));
            }
            let permit = match self.users.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let users = self.users.clone();
                    let deadline = tokio::time::Instant::from_std(self.drain_deadline);
                    let stop = self.stop.clone();
                    let waited = self.handle.block_on(async move {
                        tokio::select! {
                            permit = tokio::time::timeout_at(deadline, users.acquire_owned()) => permit.ok().and_then(Result::ok),
                            _ = async {
                                while !stop.load(Ordering::Relaxed) {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            } => None,
                        }
                    });
                    match waited {
                        Some(permit) => permit,
                        None if self.stop.load(Ordering::Relaxed) => return (n, 0),
                        None => return (total, total - n),
                    }
                }
            };
            let scenario = self.pick(n);
            let (target, recorder, in_flight) = (
                self.target.clone(),
                self.recorder.clone(),
                self.in_flight.clone(),
            );
            let timeout = self.timeout;
            in_flight.fetch_add(1, Ordering::Relaxed);
            self.handle.spawn(async move {
                let started = Instant::now();
                let outcome = match tokio::time::timeout(timeout, target.call(scenario, n)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!(
                        "{}: timed out after {} s",
                        scenario.name(),
                        timeout.as_secs_f64()
                    )),
                };
                let done = Instant::now();
                recorder.record(scenario, intended, started, done, outcome);
                in_flight.fetch_sub(1, Ordering::Relaxed);
                // Everything shared goes before the user is handed back.
                drop((recorder, target, in_flight));
                drop(permit);
            });
            n += 1;
        }
        (n, 0)
    }
}

/// What the once-a-second sampler needs.
struct Sampling {
    recorder: Arc<Recorder>,
    target: Arc<Target>,
    health: Arc<Mutex<HealthLog>>,
    in_flight: Arc<AtomicU64>,
    schedule: Schedule,
    start: Instant,
    quiet: bool,
}

/// Closes a timeline interval each second (and one last, shorter one when told to stop),
/// samples the pool, and prints the live line.
async fn sample(s: Sampling, mut stop: oneshot::Receiver<()>) {
    let first = tokio::time::Instant::from_std(s.start + Duration::from_secs(1));
    let mut ticker = tokio::time::interval_at(first, Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            _ = &mut stop => true,
        };
        let second = s.recorder.close_interval(
            Instant::now(),
            |from, to| s.schedule.mean_rate(from, to),
            s.in_flight.load(Ordering::Relaxed),
            last,
        );
        if !s.quiet {
            let p95 = second
                .p95_ms
                .map_or("n/a".to_owned(), |p| format!("{p:.3} ms"));
            eprint!(
                "\r[{:>6.1} s] {:>9.1} req/s (target {:>8.1}) | p95 {:>12} | errors {:>6} | in flight {:>5}   ",
                second.t + second.span_s,
                second.achieved_rps,
                second.target_rps,
                p95,
                s.recorder.errors(),
                second.in_flight
            );
            let _ = std::io::stderr().flush();
        }
        let pool = match &*s.target {
            Target::InProcess(target) => target.pool_sample(),
            Target::Http(target) => {
                let answer = target.health().await;
                let mut log = s.health.lock().unwrap_or_else(|e| e.into_inner());
                match answer {
                    Ok(value) => {
                        let pool = http::find_pool(&value);
                        log.last = Some(value);
                        pool
                    }
                    Err(error) => {
                        log.failures += 1;
                        log.last_failure = Some(error);
                        None
                    }
                }
            }
        };
        if let Some((in_use, max_size, waiters)) = pool {
            s.recorder.pool_sample(in_use, max_size, waiters);
        }
        if last {
            break;
        }
    }
    if !s.quiet {
        eprintln!();
    }
}
