//! Shared by the benches: reading back what criterion measured in this run, to print each
//! component's ratio to its raw baseline.

use std::time::Instant;

/// Criterion's mean estimate, in ns, of `group/function`.
pub fn mean_ns(group: &str, function: &str) -> Option<f64> {
    let text = std::fs::read_to_string(estimates(group, function)).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

/// Whether `group/function` was measured by this process (its estimates are newer than
/// `started`), so a ratio never mixes this run with an earlier one.
pub fn ran_since(group: &str, function: &str, started: Instant) -> bool {
    std::fs::metadata(estimates(group, function))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e <= started.elapsed()))
}

/// Where criterion writes: `CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else
/// `target/criterion` (benches run from the package root).
fn estimates(group: &str, function: &str) -> std::path::PathBuf {
    let home = std::env::var_os("CRITERION_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(|target| std::path::PathBuf::from(target).join("criterion"))
        })
        .unwrap_or_else(|| std::path::PathBuf::from("target/criterion"));
    home.join(group)
        .join(function)
        .join("new")
        .join("estimates.json")
}
