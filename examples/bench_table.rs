//! Collects criterion's latest results into README.md's benchmark table: a tool of this
//! repository, not part of the library.
//!
//! For every benchmark id, criterion keeps `<group>/<bench>/new/estimates.json` (mean and
//! median, ns) and `benchmark.json` (the id and its throughput) under `target/criterion`
//! (`$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`, else the target directory `cargo
//! metadata` reports, as criterion itself decides). Each pupkit measurement is paired with
//! its raw baseline by [`PAIRS`]: an explicit table of (bench, group, pupkit's function,
//! the baseline's function), since the benches do not name their baselines uniformly
//! (`raw_moka`, `raw_get`, `unpooled`, `tower_http_br`, ...). Both are read from the same
//! group. The ratio is pupkit's median time over the baseline's: below 1 is faster.
//!
//! ```sh
//! cargo run --example bench_table               # print the table
//! cargo run --example bench_table -- --write    # update it in README.md, between the markers
//! cargo run --example bench_table -- --check    # exit 1 if README.md's table differs
//! ```
//!
//! A pair missing from target/criterion is left out, with a note under the table naming the
//! bench to run. When no pair has been measured, the table is a single line saying what to
//! run, which is what the README keeps in the repository.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::Value;

const START: &str = "<!-- bench-table:start -->";
const END: &str = "<!-- bench-table:end -->";
/// The table when nothing has been measured.
const NOTHING_MEASURED: &str =
    "Run `cargo bench`, then `cargo run --example bench_table -- --write`.";
/// Under a table with rows: what the table cannot hold.
const NOT_COLLECTED: &str = "The `embeddings` bench times its runs itself, without criterion: \
     its figures are in its own output, not here.";

/// A pupkit measurement and its raw baseline: two functions of one criterion group.
#[derive(Clone, Copy, Debug)]
struct Pair {
    /// The bench target (`cargo bench --bench <bench>`).
    bench: &'static str,
    group: &'static str,
    pupkit: &'static str,
    baseline: &'static str,
    what: &'static str,
}

const fn pair(
    bench: &'static str,
    group: &'static str,
    pupkit: &'static str,
    baseline: &'static str,
    what: &'static str,
) -> Pair {
    Pair {
        bench,
        group,
        pupkit,
        baseline,
        what,
    }
}

/// The pairing rule: every benchmark id the benches produce that has a baseline to be
/// compared with. Ids not listed here (`format_decode/*`, `format_encode/*`, the compression
/// groups' `none`) are measured for context and not tabled.
const PAIRS: &[Pair] = &[
    pair(
        "cache",
        "l0_hit",
        "pupkit",
        "raw_moka",
        "L0 hit vs `moka::future::Cache::get` of an `Arc`",
    ),
    pair(
        "cache",
        "redis_hit",
        "pupkit",
        "raw_get",
        "Redis-tier hit (L0 off) vs one raw `GET` of the same bytes",
    ),
    pair(
        "cache",
        "get_many_100",
        "pupkit",
        "raw_mget",
        "`get_many` of 100 chat messages vs one raw `MGET`",
    ),
    pair(
        "cache",
        "get_many_100_embedding",
        "pupkit",
        "raw_mget",
        "`get_many` of 100 embeddings (256 f32) vs one raw `MGET`",
    ),
    pair(
        "cache",
        "concurrent_64",
        "pupkit",
        "raw_get",
        "64 tasks × 16 Redis-tier hits vs 64 tasks × 16 raw `GET`s",
    ),
    pair(
        "cache",
        "concurrent_64_embedding",
        "pupkit",
        "raw_get",
        "the same with embeddings",
    ),
    pair(
        "cache",
        "stampede_1000",
        "pupkit",
        "raw_loader_and_get",
        "1,000 concurrent `get_or_load` of a cold key (5 ms loader) vs one load + one `GET`",
    ),
    pair(
        "cache",
        "miss_lock",
        "pupkit",
        "plain_miss",
        "`get_or_load` miss with the cross-instance lock vs without it (both pupkit)",
    ),
    pair(
        "database",
        "pk_select_10_tasks",
        "pupkit",
        "raw_tokio_postgres",
        "primary-key select, 10 tasks × 50, vs 10 raw tokio-postgres clients with prepared \
         statements",
    ),
    pair(
        "database",
        "connect_per_query",
        "pupkit",
        "unpooled",
        "a query through the pool vs a new raw connection per query",
    ),
    pair(
        "database",
        "cached_repo_hit",
        "pupkit",
        "db_query",
        "`CachedRepo` hit vs the query through the pool",
    ),
    pair(
        "cost",
        "cost_record_memory",
        "pupkit",
        "raw_mutex_map",
        "`record()` in memory vs a hand-rolled mutex map",
    ),
    pair(
        "cost",
        "cost_record_redis_64_tasks",
        "pupkit",
        "raw_evalsha",
        "`record()` on Redis, 64 tasks, vs raw `EVALSHA` of the same increments",
    ),
    pair(
        "compression",
        "compression_60k_worker",
        "pupkit_br",
        "tower_http_br",
        "60 KB JSON, br 4, multi-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_60k_worker",
        "pupkit_gzip",
        "tower_http_gzip",
        "60 KB JSON, gzip 6, multi-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_60k_current_thread",
        "pupkit_br",
        "tower_http_br",
        "60 KB JSON, br 4, current-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_60k_current_thread",
        "pupkit_gzip",
        "tower_http_gzip",
        "60 KB JSON, gzip 6, current-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_1k2_worker",
        "pupkit_br",
        "tower_http_br",
        "1.2 KB JSON, br 4, multi-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_1k2_worker",
        "pupkit_gzip",
        "tower_http_gzip",
        "1.2 KB JSON, gzip 6, multi-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_1k2_current_thread",
        "pupkit_br",
        "tower_http_br",
        "1.2 KB JSON, br 4, current-thread runtime, vs tower-http",
    ),
    pair(
        "compression",
        "compression_1k2_current_thread",
        "pupkit_gzip",
        "tower_http_gzip",
        "1.2 KB JSON, gzip 6, current-thread runtime, vs tower-http",
    ),
    pair(
        "jobs",
        "jobs_enqueue_64_tasks",
        "pupkit",
        "raw_lpush",
        "`enqueue` one at a time, 64 tasks, vs raw `LPUSH` of the same JSON",
    ),
    pair(
        "jobs",
        "jobs_enqueue_many_100",
        "pupkit",
        "raw_lpush_100",
        "`enqueue_many` of 100 vs one raw `LPUSH` of 100 values",
    ),
];

/// What one iteration processes, from `benchmark.json`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Throughput {
    Bytes(u64),
    Elements(u64),
    Bits(u64),
}

/// One benchmark id's latest result.
#[derive(Clone, Debug, PartialEq)]
struct Measurement {
    full_id: String,
    group_id: String,
    function_id: Option<String>,
    throughput: Option<Throughput>,
    mean_ns: f64,
    median_ns: f64,
}

/// Criterion serializes its `Throughput` enum as `{"Bytes": n}`, `{"Elements": n}`, ...
fn parse_throughput(value: &Value) -> Option<Throughput> {
    let (kind, amount) = value.as_object()?.iter().next()?;
    match kind.as_str() {
        "Bytes" | "BytesDecimal" => Some(Throughput::Bytes(amount.as_u64()?)),
        "Elements" => Some(Throughput::Elements(amount.as_u64()?)),
        "Bits" => Some(Throughput::Bits(amount.as_u64()?)),
        // Elements are the primary figure of the two.
        "ElementsAndBytes" => Some(Throughput::Elements(amount["elements"].as_u64()?)),
        _ => None,
    }
}

/// One id from the texts of its `new/benchmark.json` and `new/estimates.json`.
fn parse_measurement(benchmark: &str, estimates: &str) -> Result<Measurement, String> {
    let benchmark: Value =
        serde_json::from_str(benchmark).map_err(|e| format!("benchmark.json: {e}"))?;
    let estimates: Value =
        serde_json::from_str(estimates).map_err(|e| format!("estimates.json: {e}"))?;
    let text = |field: &str| benchmark[field].as_str().map(str::to_owned);
    let point = |estimate: &str| {
        estimates[estimate]["point_estimate"]
            .as_f64()
            .ok_or_else(|| format!("estimates.json: no {estimate}.point_estimate"))
    };
    Ok(Measurement {
        full_id: text("full_id").ok_or("benchmark.json: no full_id")?,
        group_id: text("group_id").ok_or("benchmark.json: no group_id")?,
        function_id: text("function_id"),
        throughput: parse_throughput(&benchmark["throughput"]),
        mean_ns: point("mean")?,
        median_ns: point("median")?,
    })
}

/// Every `new/` result under `dir`, by full id. Saved baselines (`base/`, `main/`, ...) and
/// reports are not read. A directory that does not exist holds no results.
fn collect(dir: &Path) -> Result<HashMap<String, Measurement>, String> {
    fn walk(
        dir: &Path,
        depth: usize,
        found: &mut HashMap<String, Measurement>,
    ) -> Result<(), String> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        for entry in entries {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            if !path.is_dir() {
                continue;
            }
            match path.file_name().and_then(|n| n.to_str()) {
                Some("report") => {}
                Some("new") => {
                    let (benchmark, estimates) =
                        (path.join("benchmark.json"), path.join("estimates.json"));
                    if !benchmark.is_file() || !estimates.is_file() {
                        continue;
                    }
                    let read = |file: &Path| {
                        std::fs::read_to_string(file)
                            .map_err(|e| format!("{}: {e}", file.display()))
                    };
                    let measurement = parse_measurement(&read(&benchmark)?, &read(&estimates)?)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    found.insert(measurement.full_id.clone(), measurement);
                }
                // group / function / value / new at most.
                _ if depth < 4 => walk(&path, depth + 1, found)?,
                _ => {}
            }
        }
        Ok(())
    }
    let mut found = HashMap::new();
    walk(dir, 0, &mut found)?;
    Ok(found)
}

/// A time in ns with three significant digits and its unit.
fn format_time(ns: f64) -> String {
    let (value, unit) = if ns < 1e3 {
        (ns, "ns")
    } else if ns < 1e6 {
        (ns / 1e3, "µs")
    } else if ns < 1e9 {
        (ns / 1e6, "ms")
    } else {
        (ns / 1e9, "s")
    };
    format!("{} {unit}", significant(value))
}

/// Three significant digits, without an exponent.
fn significant(value: f64) -> String {
    let magnitude = if value == 0.0 {
        0
    } else {
        value.abs().log10().floor() as i32
    };
    let decimals = (2 - magnitude).max(0) as usize;
    format!("{value:.decimals$}")
}

/// A rate per second with three significant digits and a decimal prefix.
fn format_rate(per_second: f64, unit: &str) -> String {
    let (value, prefix) = if per_second >= 1e9 {
        (per_second / 1e9, " G")
    } else if per_second >= 1e6 {
        (per_second / 1e6, " M")
    } else if per_second >= 1e3 {
        (per_second / 1e3, " K")
    } else {
        (per_second, " ")
    };
    format!("{}{prefix}{unit}/s", significant(value))
}

/// The median time, and the throughput it makes when the benchmark declares one.
fn format_cell(measurement: &Measurement) -> String {
    let time = format_time(measurement.median_ns);
    let per_second = |amount: u64| amount as f64 * 1e9 / measurement.median_ns;
    match measurement.throughput {
        Some(Throughput::Bytes(n)) => format!("{time}, {}", format_rate(per_second(n), "B")),
        Some(Throughput::Bits(n)) => format!("{time}, {}", format_rate(per_second(n), "bit")),
        Some(Throughput::Elements(n)) => format!("{time}, {}", format_rate(per_second(n), "")),
        None => time,
    }
}

/// pupkit's time over the baseline's.
fn format_ratio(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("{ratio:.1}x")
    } else if ratio >= 0.1 {
        format!("{ratio:.2}x")
    } else {
        format!("{}x", significant(ratio))
    }
}

/// The text between the markers: the table of every measured pair, then a note per bench
/// with pairs missing; or one line saying what to run when nothing is measured.
fn render(pairs: &[Pair], results: &HashMap<String, Measurement>) -> String {
    let lookup = |group: &str, function: &str| results.get(&format!("{group}/{function}"));
    let mut rows = String::new();
    // (bench, groups missing), in the order of `pairs`.
    let mut missing: Vec<(&str, Vec<String>)> = Vec::new();
    for pair in pairs {
        match (
            lookup(pair.group, pair.pupkit),
            lookup(pair.group, pair.baseline),
        ) {
            (Some(ours), Some(theirs)) => {
                let _ = writeln!(
                    rows,
                    "| {} | {} (`{}/{}` vs `{}`) | {} | {} | {} |",
                    pair.bench,
                    pair.what,
                    pair.group,
                    pair.pupkit,
                    pair.baseline,
                    format_cell(ours),
                    format_cell(theirs),
                    format_ratio(ours.median_ns / theirs.median_ns),
                );
            }
            _ => {
                let id = format!("{}/{}", pair.group, pair.pupkit);
                match missing.iter_mut().find(|(bench, _)| *bench == pair.bench) {
                    Some((_, ids)) => ids.push(id),
                    None => missing.push((pair.bench, vec![id])),
                }
            }
        }
    }
    if rows.is_empty() {
        return NOTHING_MEASURED.to_owned();
    }
    let mut text = String::from(
        "| bench | what | pupkit median | baseline median | ratio |\n|---|---|---|---|---|\n",
    );
    text.push_str(&rows);
    for (bench, ids) in missing {
        let all = pairs.iter().filter(|p| p.bench == bench).count();
        let what = if ids.len() == all {
            format!("no `{bench}` results")
        } else {
            ids.iter()
                .map(|id| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            text,
            "\nNot in target/criterion: {what}; run `cargo bench --bench {bench}`.\n"
        );
    }
    let _ = write!(text, "\n{NOT_COLLECTED}\n");
    text.trim_end().to_owned()
}

/// Where the markers are: (end of the start marker, start of the end marker).
fn markers(readme: &str) -> Result<(usize, usize), String> {
    let count = |marker: &str| readme.matches(marker).count();
    match (count(START), count(END)) {
        (1, 1) => {}
        (0, _) | (_, 0) => return Err(format!("README.md has no `{START}` ... `{END}` markers")),
        _ => return Err(format!("README.md has `{START}` or `{END}` more than once")),
    }
    let start = readme.find(START).unwrap() + START.len();
    let end = readme.find(END).unwrap();
    if end < start {
        return Err(format!("README.md has `{END}` before `{START}`"));
    }
    Ok((start, end))
}

/// The text between README's markers, without the blank lines around it.
fn current_table(readme: &str) -> Result<&str, String> {
    let (start, end) = markers(readme)?;
    Ok(readme[start..end].trim())
}

/// README with `table` between its markers (a blank line either side); the rest unchanged.
fn splice(readme: &str, table: &str) -> Result<String, String> {
    let (start, end) = markers(readme)?;
    Ok(format!(
        "{}\n\n{}\n\n{}",
        &readme[..start],
        table.trim(),
        &readme[end..]
    ))
}

/// Whether two tables read the same, line endings and trailing spaces aside.
fn same_table(a: &str, b: &str) -> bool {
    let lines = |text: &str| {
        text.trim()
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n")
    };
    lines(a) == lines(b)
}

/// Where criterion writes, as criterion decides it: `$CRITERION_HOME`, else
/// `$CARGO_TARGET_DIR/criterion`, else `cargo metadata`'s target directory, else
/// `target/criterion`. The benches run in the package root, so relative paths are taken from
/// there.
fn criterion_dir(root: &Path) -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return root.join(home);
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return root.join(target).join("criterion");
    }
    let metadata = std::env::var_os("CARGO").and_then(|cargo| {
        let output = std::process::Command::new(cargo)
            .args(["metadata", "--format-version", "1", "--no-deps"])
            .arg("--manifest-path")
            .arg(root.join("Cargo.toml"))
            .output()
            .ok()?;
        let metadata: Value = serde_json::from_slice(&output.stdout).ok()?;
        metadata["target_directory"].as_str().map(PathBuf::from)
    });
    metadata
        .unwrap_or_else(|| root.join("target"))
        .join("criterion")
}

/// Notes on stderr: pupkit measurements that no pair names.
fn warn_unpaired(pairs: &[Pair], results: &HashMap<String, Measurement>) {
    let mut unpaired: Vec<&str> = results
        .values()
        .filter(|m| {
            m.function_id
                .as_deref()
                .is_some_and(|f| f.starts_with("pupkit"))
                && !pairs
                    .iter()
                    .any(|p| p.group == m.group_id && Some(p.pupkit) == m.function_id.as_deref())
        })
        .map(|m| m.full_id.as_str())
        .collect();
    unpaired.sort();
    for id in unpaired {
        eprintln!("note: `{id}` has no baseline in bench_table's PAIRS; left out");
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Print,
    Write,
    Check,
}

fn run(mode: Mode) -> Result<ExitCode, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = criterion_dir(root);
    eprintln!("reading {}", dir.display());
    let results = collect(&dir)?;
    warn_unpaired(PAIRS, &results);
    let table = render(PAIRS, &results);
    if mode == Mode::Print {
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = writeln!(std::io::stdout(), "{table}");
        return Ok(ExitCode::SUCCESS);
    }
    let path = root.join("README.md");
    let readme = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let current = current_table(&readme)?;
    let up_to_date = same_table(current, &table);
    match mode {
        Mode::Check if up_to_date => {
            eprintln!("README.md's benchmark table matches target/criterion");
            Ok(ExitCode::SUCCESS)
        }
        Mode::Check => {
            eprintln!(
                "README.md's benchmark table differs from target/criterion; \
                 run `cargo run --example bench_table -- --write`\n\
                 -- README.md:\n{current}\n-- target/criterion:\n{table}"
            );
            Ok(ExitCode::FAILURE)
        }
        _ if up_to_date => {
            eprintln!("README.md's benchmark table is already up to date");
            Ok(ExitCode::SUCCESS)
        }
        _ => {
            let updated = splice(&readme, &table)?;
            std::fs::write(&path, updated).map_err(|e| format!("{}: {e}", path.display()))?;
            eprintln!("updated the benchmark table in {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

const USAGE: &str = "usage: cargo run --example bench_table [-- --write | --check]
  (no flag)  print the table from target/criterion
  --write    put it in README.md between the bench-table markers
  --check    exit 1 if README.md's table differs from target/criterion";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => Mode::Print,
        ["--write"] => Mode::Write,
        ["--check"] => Mode::Check,
        ["--help" | "-h"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(mode) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench_table: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BENCHMARK: &str = r#"{"group_id":"jobs_enqueue_64_tasks","function_id":"pupkit",
        "value_str":null,"throughput":{"Elements":1},"full_id":"jobs_enqueue_64_tasks/pupkit",
        "directory_name":"jobs_enqueue_64_tasks/pupkit","title":"jobs_enqueue_64_tasks/pupkit"}"#;

    fn estimates(mean: f64, median: f64) -> String {
        format!(
            r#"{{"mean":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":1.0,
            "upper_bound":2.0}},"point_estimate":{mean},"standard_error":0.5}},
            "median":{{"point_estimate":{median},"standard_error":0.5}},
            "median_abs_dev":{{"point_estimate":3.0}},"slope":null,"std_dev":{{"point_estimate":4.0}}}}"#
        )
    }

    fn benchmark(group: &str, function: &str, throughput: &str) -> String {
        format!(
            r#"{{"group_id":"{group}","function_id":"{function}","value_str":null,
            "throughput":{throughput},"full_id":"{group}/{function}",
            "directory_name":"{group}/{function}","title":"{group}/{function}"}}"#
        )
    }

    fn measurement(group: &str, function: &str, median: f64) -> (String, Measurement) {
        let m = parse_measurement(
            &benchmark(group, function, "null"),
            &estimates(median, median),
        )
        .unwrap();
        (m.full_id.clone(), m)
    }

    #[test]
    fn parses_criterion_files() {
        let m = parse_measurement(BENCHMARK, &estimates(10537.8, 10583.3)).unwrap();
        assert_eq!(m.full_id, "jobs_enqueue_64_tasks/pupkit");
        assert_eq!(m.group_id, "jobs_enqueue_64_tasks");
        assert_eq!(m.function_id.as_deref(), Some("pupkit"));
        assert_eq!(m.throughput, Some(Throughput::Elements(1)));
        assert_eq!(m.mean_ns, 10537.8);
        assert_eq!(m.median_ns, 10583.3);
    }

    #[test]
    fn parses_every_throughput() {
        let parse = |text: &str| parse_throughput(&serde_json::from_str(text).unwrap());
        assert_eq!(parse(r#"{"Bytes":60000}"#), Some(Throughput::Bytes(60_000)));
        assert_eq!(parse(r#"{"BytesDecimal":5}"#), Some(Throughput::Bytes(5)));
        assert_eq!(parse(r#"{"Bits":8}"#), Some(Throughput::Bits(8)));
        assert_eq!(
            parse(r#"{"ElementsAndBytes":{"elements":3,"bytes":9}}"#),
            Some(Throughput::Elements(3))
        );
        assert_eq!(parse("null"), None);
    }

    #[test]
    fn rejects_incomplete_files() {
        assert!(parse_measurement("{", &estimates(1.0, 1.0)).is_err());
        assert!(parse_measurement(r#"{"group_id":"g"}"#, &estimates(1.0, 1.0)).is_err());
        let no_median = r#"{"mean":{"point_estimate":1.0}}"#;
        let error = parse_measurement(BENCHMARK, no_median).unwrap_err();
        assert!(error.contains("median"), "{error}");
    }

    #[test]
    fn collects_new_results_only() {
        let dir = std::env::temp_dir().join(format!("bench_table_test_{}", std::process::id()));
        let write = |path: &str, text: &str| {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let ours = benchmark("l0_hit", "pupkit", "null");
        write("l0_hit/pupkit/new/benchmark.json", &ours);
        write("l0_hit/pupkit/new/estimates.json", &estimates(250.0, 255.0));
        // A saved baseline and an incomplete result are not read.
        write("l0_hit/pupkit/main/benchmark.json", &ours);
        write("l0_hit/pupkit/main/estimates.json", &estimates(1.0, 1.0));
        let raw = benchmark("l0_hit", "raw_moka", r#"{"Elements":1}"#);
        write("l0_hit/raw_moka/new/benchmark.json", &raw);
        write("l0_hit/report/index.html", "<html></html>");
        let results = collect(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let results = results.unwrap();
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results["l0_hit/pupkit"].median_ns, 255.0);
        assert!(
            collect(&dir).unwrap().is_empty(),
            "a missing directory is empty"
        );
    }

    #[test]
    fn formats_figures() {
        assert_eq!(format_time(255.4), "255 ns");
        assert_eq!(format_time(87_512.0), "87.5 µs");
        assert_eq!(format_time(8_050_000.0), "8.05 ms");
        assert_eq!(format_time(1_310_000_000.0), "1.31 s");
        assert_eq!(format_ratio(1.7586), "1.76x");
        assert_eq!(format_ratio(33.62), "33.6x");
        assert_eq!(format_ratio(0.035_41), "0.0354x");
        let mut m = measurement("g", "pupkit", 1_190_000.0).1;
        m.throughput = Some(Throughput::Bytes(60_000));
        assert_eq!(format_cell(&m), "1.19 ms, 50.4 MB/s");
        m.throughput = Some(Throughput::Elements(1_024));
        assert_eq!(format_cell(&m), "1.19 ms, 861 K/s");
    }

    #[test]
    fn renders_measured_pairs_and_names_the_missing_bench() {
        let results: HashMap<_, _> = [
            measurement("l0_hit", "pupkit", 255.0),
            measurement("l0_hit", "raw_moka", 145.0),
            // Only one side of this pair: left out.
            measurement("redis_hit", "pupkit", 87_500.0),
        ]
        .into_iter()
        .collect();
        let table = render(PAIRS, &results);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "| bench | what | pupkit median | baseline median | ratio |"
        );
        assert_eq!(
            lines[2],
            "| cache | L0 hit vs `moka::future::Cache::get` of an `Arc` (`l0_hit/pupkit` vs \
             `raw_moka`) | 255 ns | 145 ns | 1.76x |"
        );
        assert!(lines[3].is_empty());
        assert!(lines[4].starts_with("Not in target/criterion: `redis_hit/pupkit`, "));
        assert!(lines[4].ends_with("; run `cargo bench --bench cache`."));
        for bench in ["database", "cost", "compression", "jobs"] {
            let line = format!(
                "Not in target/criterion: no `{bench}` results; run `cargo bench --bench {bench}`."
            );
            assert!(lines.contains(&line.as_str()), "{table}");
        }
        assert!(table.ends_with(NOT_COLLECTED));
        assert_eq!(render(PAIRS, &HashMap::new()), NOTHING_MEASURED);
    }

    #[test]
    fn every_pair_is_distinct() {
        for (i, a) in PAIRS.iter().enumerate() {
            assert_ne!(a.pupkit, a.baseline);
            for b in &PAIRS[i + 1..] {
                assert!(
                    (a.group, a.pupkit) != (b.group, b.pupkit),
                    "{}/{} twice",
                    a.group,
                    a.pupkit
                );
            }
        }
    }

    const README: &str = "# pupkit\n\n## Benchmarks\n\nFirst paragraph.\n\n\
        <!-- bench-table:start -->\n\nold table\n\n<!-- bench-table:end -->\n\nMore text.\n";

    #[test]
    fn splices_between_the_markers_only() {
        let updated = splice(README, "| new |\n|---|\n").unwrap();
        assert_eq!(
            updated,
            "# pupkit\n\n## Benchmarks\n\nFirst paragraph.\n\n\
             <!-- bench-table:start -->\n\n| new |\n|---|\n\n<!-- bench-table:end -->\n\nMore text.\n"
        );
        assert_eq!(current_table(&updated).unwrap(), "| new |\n|---|");
        assert_eq!(splice(&updated, "| new |\n|---|").unwrap(), updated);
        assert_eq!(current_table(README).unwrap(), "old table");
    }

    #[test]
    fn compares_tables_loosely_on_whitespace() {
        assert!(same_table("a |\r\nb", "a |  \nb\n"));
        assert!(!same_table("a\nb", "a\nc"));
    }

    #[test]
    fn refuses_bad_markers() {
        assert!(splice("no markers", "x").is_err());
        assert!(splice(&format!("{END}\n{START}\n"), "x").is_err());
        assert!(splice(&format!("{START}\n{END}\n{START}\n{END}\n"), "x").is_err());
        assert!(current_table(&format!("{START}\n")).is_err());
    }
}
