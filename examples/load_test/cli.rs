//! The command line: positional `DURATION RAMP USERS SCENARIO RPS`, named flags, validation.
//! Every error names the argument and the value it got; nothing here panics.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub const USAGE: &str = "\
usage: load_test [DURATION RAMP USERS SCENARIO RPS] [options]

  DURATION, --duration SECONDS   length of the run, ramp included (default 60)
  RAMP,     --ramp SECONDS       linear ramp-up from 0 to the target rate (default 10)
  USERS,    --users N            virtual users = most requests in flight at once (default 50)
  SCENARIO, --scenario NAME      cache | messages | embeddings | cost | mixed (default mixed)
  RPS,      --rps N              target arrival rate, requests per second (default 200)
  --url http://host:port         drive an HTTP server (routes under /api) instead of the
                                 components in process
  --redis                        in process: put the caches' shared tiers in Redis
                                 (PUPKIT_REDIS_URL) instead of memory
  --timeout SECONDS              a request slower than this is an error (default 10)
  --report FILE.html             write a self-contained HTML report
  --json FILE.json               write the full results as JSON
  --quiet                        no live progress line
  -h, --help                     this text

Example: cargo run --release --example load_test -- 120 20 100 mixed 1000 --report load.html";

/// What one run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioArg {
    Cache,
    Messages,
    Embeddings,
    Cost,
    Mixed,
}

impl ScenarioArg {
    pub const NAMES: &'static str = "cache, messages, embeddings, cost, mixed";

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "cache" => ScenarioArg::Cache,
            "messages" => ScenarioArg::Messages,
            "embeddings" => ScenarioArg::Embeddings,
            "cost" => ScenarioArg::Cost,
            "mixed" => ScenarioArg::Mixed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ScenarioArg::Cache => "cache",
            ScenarioArg::Messages => "messages",
            ScenarioArg::Embeddings => "embeddings",
            ScenarioArg::Cost => "cost",
            ScenarioArg::Mixed => "mixed",
        }
    }
}

/// The validated configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    #[serde(serialize_with = "secs")]
    pub ramp: Duration,
    pub users: usize,
    pub scenario: ScenarioArg,
    pub rps: f64,
    pub url: Option<String>,
    pub redis: bool,
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    pub report: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub quiet: bool,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What the command line asked for.
pub enum Command {
    Run(Config),
    Help,
}

/// A bad argument: which one, what it got, and why.
#[derive(Debug)]
pub struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(arg: &str, value: &str, why: impl fmt::Display) -> ArgError {
    ArgError(format!("invalid {arg} {value:?}: {why}"))
}

/// The names of the positional arguments, in order.
const POSITIONAL: [&str; 5] = ["--duration", "--ramp", "--users", "--scenario", "--rps"];

#[derive(Default)]
struct Raw {
    /// (flag name, value, how it was given) for each of the five positional-capable fields.
    fields: [Option<(String, String)>; 5],
    url: Option<String>,
    timeout: Option<String>,
    report: Option<String>,
    json: Option<String>,
    redis: bool,
    quiet: bool,
}

impl Raw {
    fn set(&mut self, index: usize, given_as: String, value: String) -> Result<(), ArgError> {
        if let Some((before, old)) = &self.fields[index] {
            return Err(ArgError(format!(
                "{} given twice: {old:?} (as {before}) and {value:?} (as {given_as})",
                POSITIONAL[index]
            )));
        }
        self.fields[index] = Some((given_as, value));
        Ok(())
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, ArgError> {
    let mut raw = Raw::default();
    let mut positional = 0usize;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        if let Some(flag) = arg.strip_prefix("--") {
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (flag, None),
            };
            let switch = |inline: Option<String>| match inline {
                None => Ok(()),
                Some(value) => Err(bad(&format!("--{name}"), &value, "takes no value")),
            };
            match name {
                "redis" => {
                    switch(inline)?;
                    raw.redis = true;
                    continue;
                }
                "quiet" => {
                    switch(inline)?;
                    raw.quiet = true;
                    continue;
                }
                _ => {}
            }
            let flag_name = format!("--{name}");
            let known = POSITIONAL.iter().position(|p| *p == flag_name);
            if known.is_none() && !matches!(name, "url" | "timeout" | "report" | "json") {
                return Err(ArgError(format!("unknown argument {arg:?} (see --help)")));
            }
            let value = match inline {
                Some(value) => value,
                None => args
                    .next()
                    .ok_or_else(|| ArgError(format!("{flag_name} needs a value")))?,
            };
            match (known, name) {
                (Some(index), _) => raw.set(index, flag_name.clone(), value)?,
                (None, "url") => raw.url = Some(value),
                (None, "timeout") => raw.timeout = Some(value),
                (None, "report") => raw.report = Some(value),
                (None, _) => raw.json = Some(value),
            }
        } else if arg.starts_with('-') && arg.len() > 1 && arg.parse::<f64>().is_err() {
            return Err(ArgError(format!("unknown argument {arg:?} (see --help)")));
        } else {
            if positional >= POSITIONAL.len() {
                return Err(ArgError(format!(
                    "unexpected argument {arg:?}: at most 5 positional arguments (DURATION RAMP USERS SCENARIO RPS)"
                )));
            }
            let given_as = format!("positional argument {}", positional + 1);
            raw.set(positional, given_as, arg)?;
            positional += 1;
        }
    }
    validate(raw).map(Command::Run)
}

fn number(arg: &str, value: &str) -> Result<f64, ArgError> {
    let trimmed = value.strip_suffix('s').unwrap_or(value);
    match trimmed.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(n),
        _ => Err(bad(arg, value, "not a number")),
    }
}

fn seconds(arg: &str, value: &str, min_exclusive: bool, max: f64) -> Result<Duration, ArgError> {
    let n = number(arg, value)?;
    if n < 0.0 || (min_exclusive && n == 0.0) {
        let bound = if min_exclusive {
            "must be more than 0 seconds"
        } else {
            "must not be negative"
        };
        return Err(bad(arg, value, bound));
    }
    if n > max {
        return Err(bad(arg, value, format!("must be at most {max} seconds")));
    }
    Ok(Duration::from_secs_f64(n))
}

fn validate(raw: Raw) -> Result<Config, ArgError> {
    let field = |i: usize, default: &str| -> (String, String) {
        match &raw.fields[i] {
            Some((given_as, value)) if given_as.starts_with("--") => {
                (given_as.clone(), value.clone())
            }
            Some((given_as, value)) => (format!("{} ({given_as})", POSITIONAL[i]), value.clone()),
            None => (POSITIONAL[i].to_owned(), default.to_owned()),
        }
    };
    let (arg, value) = field(0, "60");
    let duration = seconds(&arg, &value, true, 86_400.0)?;
    let (ramp_arg, ramp_value) = field(1, "10");
    let mut ramp = seconds(&ramp_arg, &ramp_value, false, 86_400.0)?;
    if ramp > duration {
        if raw.fields[1].is_some() {
            return Err(bad(
                &ramp_arg,
                &ramp_value,
                format!(
                    "the ramp-up is part of the run and cannot be longer than the duration ({} s)",
                    duration.as_secs_f64()
                ),
            ));
        }
        // The default ramp shrinks to fit a short run.
        ramp = duration / 2;
    }
    let (arg, value) = field(2, "50");
    let users = match value.parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => n,
        Ok(_) => return Err(bad(&arg, &value, "must be from 1 to 10000")),
        Err(_) => return Err(bad(&arg, &value, "not a whole number")),
    };
    let (arg, value) = field(3, "mixed");
    let scenario = ScenarioArg::parse(&value).ok_or_else(|| {
        bad(
            &arg,
            &value,
            format!("unknown scenario; one of {}", ScenarioArg::NAMES),
        )
    })?;
    let (arg, value) = field(4, "200");
    let rps = number(&arg, &value)?;
    if rps <= 0.0 || rps > 1_000_000.0 {
        return Err(bad(&arg, &value, "must be more than 0 and at most 1000000"));
    }
    let url = match raw.url {
        None => None,
        Some(url) => {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            match rest {
                Some(host) if !host.is_empty() && !host.starts_with('/') => {
                    Some(url.trim_end_matches('/').to_owned())
                }
                _ => return Err(bad("--url", &url, "expected http://host:port")),
            }
        }
    };
    let timeout = match raw.timeout {
        None => Duration::from_secs(10),
        Some(value) => seconds("--timeout", &value, true, 3_600.0)?,
    };
    let path = |arg: &str, value: Option<String>| -> Result<Option<PathBuf>, ArgError> {
        match value {
            Some(v) if v.is_empty() => Err(bad(arg, &v, "expected a file path")),
            Some(v) => Ok(Some(PathBuf::from(v))),
            None => Ok(None),
        }
    };
    Ok(Config {
        duration,
        ramp,
        users,
        scenario,
        rps,
        url,
        redis: raw.redis,
        timeout,
        report: path("--report", raw.report)?,
        json: path("--json", raw.json)?,
        quiet: raw.quiet,
    })
}
