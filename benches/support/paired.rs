//! A component and its raw baseline timed in alternating rounds, in the same process and on
//! the same connection, so that a machine that speeds up or slows down during the run (a
//! shared 2-core VM does both) moves both sides alike. Criterion measures one function after
//! the other, so drift between its two measurements shows up in their ratio; the median of
//! per-round ratios does not carry it.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::runtime::Runtime;

/// What a paired run measured.
#[allow(dead_code)] // Each bench prints the fields it needs.
pub struct Paired {
    /// How many rounds each side ran.
    pub rounds: usize,
    /// The median time of one call of the component, in ns.
    pub ours_ns: f64,
    /// The median time of one call of the baseline, in ns.
    pub baseline_ns: f64,
    /// The median over rounds of (component time / baseline time) in that round.
    pub ratio: f64,
    /// The lower quartile, median and upper quartile of those per-round ratios.
    pub quartiles: [f64; 3],
    /// This process's CPU time (every thread, user and system) per call of the component
    /// and of the baseline, in ns, where the platform tells it.
    pub cpu_ns: Option<(f64, f64)>,
}

/// Runs `baseline` and `ours` on `rt` in alternating rounds of `calls` sequential calls each,
/// for at least `min_rounds` rounds and about `duration`, after one untimed round of each. The
/// side that goes first alternates from round to round.
pub fn run<FA, FutA, FB, FutB>(
    rt: &Runtime,
    min_rounds: usize,
    duration: Duration,
    calls: usize,
    mut baseline: FA,
    mut ours: FB,
) -> Paired
where
    FA: FnMut() -> FutA,
    FutA: Future,
    FB: FnMut() -> FutB,
    FutB: Future,
{
    rt.block_on(async {
        time(&mut baseline, calls).await;
        time(&mut ours, calls).await;
        let (mut baseline_ns, mut ours_ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut baseline_cpu, mut ours_cpu) = (Some(0), Some(0));
        let started = Instant::now();
        while started.elapsed() < duration || ratios.len() < min_rounds.max(1) {
            let ((b, b_cpu), (o, o_cpu)) = if ratios.len().is_multiple_of(2) {
                let b = time(&mut baseline, calls).await;
                (b, time(&mut ours, calls).await)
            } else {
                let o = time(&mut ours, calls).await;
                (time(&mut baseline, calls).await, o)
            };
            baseline_cpu = baseline_cpu.zip(b_cpu).map(|(sum, t)| sum + t);
            ours_cpu = ours_cpu.zip(o_cpu).map(|(sum, t)| sum + t);
            baseline_ns.push(b);
            ours_ns.push(o);
            ratios.push(o / b);
        }
        let rounds = ratios.len();
        let per_call = |total: u64| total as f64 / (rounds * calls) as f64;
        Paired {
            rounds,
            ours_ns: median(&mut ours_ns),
            baseline_ns: median(&mut baseline_ns),
            quartiles: quartiles(&mut ratios),
            ratio: median(&mut ratios),
            cpu_ns: ours_cpu
                .zip(baseline_cpu)
                .map(|(o, b)| (per_call(o), per_call(b))),
        }
    })
}

/// The time of one call in ns, averaged over `calls` sequential calls, and the process's CPU
/// time over all of them.
async fn time<F, Fut>(f: &mut F, calls: usize) -> (f64, Option<u64>)
where
    F: FnMut() -> Fut,
    Fut: Future,
{
    let cpu_before = process_cpu_ns();
    let started = Instant::now();
    for _ in 0..calls {
        std::hint::black_box(f().await);
    }
    let elapsed = started.elapsed().as_nanos() as f64 / calls as f64;
    let cpu = cpu_before
        .zip(process_cpu_ns())
        .map(|(before, after)| after.saturating_sub(before));
    (elapsed, cpu)
}

/// This process's CPU time so far, every thread, in ns: the sum of its threads' run times
/// from `/proc/self/task/*/schedstat` (Linux; `None` elsewhere).
fn process_cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The lower quartile, median and upper quartile of `values`.
fn quartiles(values: &mut [f64]) -> [f64; 3] {
    values.sort_by(f64::total_cmp);
    let last = values.len() - 1;
    let (low, high) = (values[last / 4], values[last * 3 / 4]);
    [low, median(values), high]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}
