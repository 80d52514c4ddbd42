//! The HTML report: one self-contained file (inline CSS and SVG, no script, no external
//! resource). The summary table's cells carry `data-metric` with the JSON summary's key and
//! the text [`metric_text`] gives its value; the charts are `<svg id="throughput-chart">`,
//! `<svg id="latency-chart">` (and `<svg id="pool-chart">` when a pool was sampled), one
//! `<polyline data-series="...">` per series.

use std::fmt::Write as _;

use serde_json::Value;

use crate::recorder::Second;
use crate::report::{Report, metric_text, summary_rows};

/// Escapes text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; color: #1d2433; margin: 24px auto; max-width: 1040px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dde2ea; padding-bottom: 4px; }
p.config { color: #4a5568; margin-top: 0; }
ul.notes li { color: #8a4b00; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #edf0f4; text-align: left; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table#summary td { text-align: right; font-variant-numeric: tabular-nums; font-weight: 600; }
svg { background: #fbfcfe; border: 1px solid #e2e6ee; display: block; margin: 8px 0; }
pre { background: #f5f7fa; padding: 8px; overflow-x: auto; font-size: 12px; }
.bad { color: #b42318; }
";

/// The whole report as one HTML document.
pub fn render(report: &Report) -> String {
    let c = &report.config;
    let mut h = String::new();
    let title = format!(
        "pupkit load test: {} {}, {} req/s",
        report.mode,
        c.scenario.name(),
        c.rps
    );
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let scenarios: Vec<String> = report
        .scenarios_run
        .iter()
        .map(|(name, weight)| format!("{name} ({weight})"))
        .collect();
    let _ = writeln!(
        h,
        "<p class=\"config\">Started {} &middot; {} s with a {} s ramp-up &middot; {} virtual users &middot; target {} req/s &middot; {} &middot; scenarios (weight): {}</p>",
        esc(&report.started_at),
        c.duration.as_secs_f64(),
        c.ramp.as_secs_f64(),
        c.users,
        c.rps,
        esc(&match &c.url {
            Some(url) => format!("HTTP target {url}"),
            None => "components in process".to_owned(),
        }),
        esc(&scenarios.join(", "))
    );
    if !report.notes.is_empty() {
        h.push_str("<ul class=\"notes\">\n");
        for note in &report.notes {
            let _ = writeln!(h, "<li>{}</li>", esc(note));
        }
        h.push_str("</ul>\n");
    }

    h.push_str("<h2>Summary</h2>\n<table id=\"summary\">\n<tbody>\n");
    for (key, label, text) in summary_rows(&report.summary) {
        let _ = writeln!(
            h,
            "<tr><th>{}</th><td id=\"summary-{}\" data-metric=\"{}\">{}</td></tr>",
            esc(&label),
            esc(&key),
            esc(&key),
            esc(&text)
        );
    }
    h.push_str("</tbody>\n</table>\n");
    h.push_str(
        "<p>Latency is measured from each request's intended start on the open-loop schedule to its answer (successful requests), so waiting for a free virtual user counts; service time starts when the request was actually sent.</p>\n",
    );

    let x_max = report
        .timeline
        .last()
        .map_or(1.0, |s| s.t + s.span_s)
        .max(c.duration.as_secs_f64());
    let series = |f: &dyn Fn(&Second) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .timeline
            .iter()
            .filter_map(|s| Some((s.t + s.span_s / 2.0, f(s)?)))
            .collect()
    };
    h.push_str("<h2>Throughput</h2>\n");
    h.push_str(&chart(
        "throughput-chart",
        "requests per second",
        x_max,
        &[
            ("target", "#9aa5b8", series(&|s| Some(s.target_rps))),
            ("achieved", "#2563eb", series(&|s| Some(s.achieved_rps))),
            (
                "errors",
                "#dc2626",
                series(&|s| Some(s.errors as f64 / s.span_s)),
            ),
        ],
    ));
    h.push_str("<h2>Latency</h2>\n");
    h.push_str(&chart(
        "latency-chart",
        "milliseconds",
        x_max,
        &[
            ("p50", "#16a34a", series(&|s| s.p50_ms)),
            ("p95", "#d97706", series(&|s| s.p95_ms)),
            ("p99", "#dc2626", series(&|s| s.p99_ms)),
        ],
    ));
    if let Some(pool) = &report.pool {
        h.push_str("<h2>Postgres pool</h2>\n");
        h.push_str(&chart(
            "pool-chart",
            "connections",
            x_max,
            &[
                (
                    "max_size",
                    "#9aa5b8",
                    series(&|s| s.pool_max_size.map(|v| v as f64)),
                ),
                (
                    "in_use",
                    "#7c3aed",
                    series(&|s| s.pool_in_use.map(|v| v as f64)),
                ),
                (
                    "waiters",
                    "#dc2626",
                    series(&|s| s.pool_waiters.map(|v| v as f64)),
                ),
            ],
        ));
        h.push_str(&kv_table(
            "pool",
            &serde_json::to_value(pool).unwrap_or(Value::Null),
        ));
    }

    h.push_str("<h2>Scenarios</h2>\n<table id=\"scenarios\">\n<thead><tr><th>scenario</th><th class=\"num\">requests</th><th class=\"num\">errors</th><th class=\"num\">error rate</th><th class=\"num\">req/s</th><th class=\"num\">p50 ms</th><th class=\"num\">p95 ms</th><th class=\"num\">p99 ms</th><th class=\"num\">max ms</th><th class=\"num\">mean ms</th></tr></thead>\n<tbody>\n");
    for (name, s) in &report.scenarios {
        let v = serde_json::to_value(s).unwrap_or(Value::Null);
        let _ = write!(
            h,
            "<tr data-scenario=\"{}\"><th>{}</th>",
            esc(name),
            esc(name)
        );
        for key in [
            "requests",
            "errors",
            "error_rate",
            "throughput_rps",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
            "mean_ms",
        ] {
            let text = metric_text(v.get(key).unwrap_or(&Value::Null));
            let _ = write!(
                h,
                "<td class=\"num\" data-metric=\"{key}\">{}</td>",
                esc(&text)
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");

    if let Some(components) = &report.components {
        let _ = writeln!(
            h,
            "<h2>Caches</h2>\n<p>Shared tiers: {}{}</p>",
            esc(components.cache_backend),
            components
                .redis_key_prefix
                .as_ref()
                .map_or(String::new(), |p| format!(" (keys under {}:)", esc(p)))
        );
        for cache in &components.caches {
            let _ = writeln!(
                h,
                "<h3>{} &middot; hit rate {:.2}% &middot; loader calls {} &middot; coalesced {}</h3>",
                esc(&cache.name),
                cache.hit_rate * 100.0,
                cache.loader_calls,
                cache.coalesced_loads
            );
            let _ = writeln!(
                h,
                "<table class=\"cache\" data-cache=\"{}\"><thead><tr><th>tier</th><th class=\"num\">hits</th><th class=\"num\">misses</th><th class=\"num\">hit rate</th><th class=\"num\">promotions</th><th class=\"num\">demotions</th></tr></thead><tbody>",
                esc(&cache.name)
            );
            for tier in &cache.tiers {
                let _ = writeln!(
                    h,
                    "<tr><th>{}</th><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{:.2}%</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                    esc(&tier.name),
                    tier.hits,
                    tier.misses,
                    tier.hit_rate * 100.0,
                    tier.promotions,
                    tier.demotions
                );
            }
            h.push_str("</tbody></table>\n");
        }
        if let Some(status) = &components.pool {
            h.push_str("<h3>Pool status at the end</h3>\n");
            h.push_str(&kv_table(
                "pool-status",
                &serde_json::to_value(status).unwrap_or(Value::Null),
            ));
        }
        if let Some(batcher) = &components.batcher {
            h.push_str("<h2>Embedding batcher</h2>\n");
            h.push_str(&kv_table(
                "batcher",
                &serde_json::to_value(batcher).unwrap_or(Value::Null),
            ));
        }
        if let Some(cost) = &components.cost {
            h.push_str("<h2>Cost meter</h2>\n");
            h.push_str(&kv_table(
                "cost",
                &serde_json::to_value(cost).unwrap_or(Value::Null),
            ));
        }
    }
    if let Some(health) = &report.health {
        h.push_str("<h2>Server components (/api/health)</h2>\n");
        match &health.components {
            Some(components) => {
                let pretty = serde_json::to_string_pretty(components).unwrap_or_default();
                let _ = writeln!(h, "<pre id=\"health-components\">{}</pre>", esc(&pretty));
            }
            None => h.push_str("<p>The health endpoint had no <code>components</code>.</p>\n"),
        }
        if health.failures > 0 {
            let _ = writeln!(
                h,
                "<p class=\"bad\">/api/health failed {} times; last: {}</p>",
                health.failures,
                esc(health.last_failure.as_deref().unwrap_or(""))
            );
        }
    }

    h.push_str("<h2>Errors</h2>\n");
    let e = &report.errors;
    if e.count == 0 {
        h.push_str("<p>None.</p>\n");
    } else {
        let _ = writeln!(
            h,
            "<p class=\"bad\">{} errors (rate {}).</p>\n<table id=\"errors\"><thead><tr><th class=\"num\">count</th><th>message</th></tr></thead><tbody>",
            e.count, e.rate
        );
        let mut by: Vec<_> = e.by_message.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1));
        for (message, count) in by {
            let _ = writeln!(
                h,
                "<tr><td class=\"num\">{count}</td><td>{}</td></tr>",
                esc(message)
            );
        }
        h.push_str("</tbody></table>\n<h3>First errors</h3>\n<table><tbody>\n");
        for sample in &e.first {
            let _ = writeln!(
                h,
                "<tr><td class=\"num\">{} s</td><td>{}</td><td>{}</td></tr>",
                sample.at_s,
                esc(sample.scenario),
                esc(&sample.message)
            );
        }
        h.push_str("</tbody></table>\n");
    }

    h.push_str("<details><summary>Per-second data</summary>\n<table id=\"timeline\"><thead><tr><th class=\"num\">t (s)</th><th class=\"num\">target/s</th><th class=\"num\">achieved/s</th><th class=\"num\">errors</th><th class=\"num\">p50 ms</th><th class=\"num\">p95 ms</th><th class=\"num\">p99 ms</th><th class=\"num\">max ms</th><th class=\"num\">in flight</th><th class=\"num\">pool in use</th><th class=\"num\">waiters</th></tr></thead><tbody>\n");
    for s in &report.timeline {
        let o = |v: Option<f64>| metric_text(&serde_json::to_value(v).unwrap_or(Value::Null));
        let u = |v: Option<u64>| v.map_or("n/a".to_owned(), |v| v.to_string());
        let _ = writeln!(
            h,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            s.t,
            s.target_rps,
            s.achieved_rps,
            s.errors,
            o(s.p50_ms),
            o(s.p95_ms),
            o(s.p99_ms),
            o(s.max_ms),
            s.in_flight,
            u(s.pool_in_use),
            u(s.pool_waiters)
        );
    }
    h.push_str("</tbody></table>\n</details>\n");
    let config = serde_json::to_string_pretty(&report.config).unwrap_or_default();
    let _ = writeln!(
        h,
        "<h2>Configuration</h2>\n<pre id=\"config\">{}</pre>\n</body>\n</html>",
        esc(&config)
    );
    h
}

/// A two-column table of an object's scalar fields (nested values as JSON).
fn kv_table(id: &str, value: &Value) -> String {
    let mut h = format!("<table id=\"{}\"><tbody>\n", esc(id));
    if let Value::Object(map) = value {
        for (key, v) in map {
            let text = match v {
                Value::Object(_) | Value::Array(_) => v.to_string(),
                other => metric_text(other),
            };
            let _ = writeln!(
                h,
                "<tr><th>{}</th><td class=\"num\" data-field=\"{}\">{}</td></tr>",
                esc(key),
                esc(key),
                esc(&text)
            );
        }
    }
    h.push_str("</tbody></table>\n");
    h
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `x`.
fn nice_ceiling(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let power = 10f64.powf(x.log10().floor());
    for step in [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0] {
        if step * power >= x * 0.999_999 {
            return step * power;
        }
    }
    10.0 * power
}

/// One line of a chart: its name (`data-series`), colour, and (x seconds, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// A line chart of `series` as inline SVG.
fn chart(id: &str, y_label: &str, x_max: f64, series: &[Series<'_>]) -> String {
    const W: f64 = 1000.0;
    const H: f64 = 320.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 20.0;
    const TOP: f64 = 34.0;
    const BOTTOM: f64 = 42.0;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let y_top = nice_ceiling(
        series
            .iter()
            .flat_map(|(_, _, points)| points.iter().map(|p| p.1))
            .fold(0.0, f64::max)
            * 1.05,
    );
    let x_top = x_max.max(1.0);
    let px = |x: f64| LEFT + (x / x_top).clamp(0.0, 1.0) * pw;
    let py = |y: f64| TOP + ph - (y / y_top).clamp(0.0, 1.0) * ph;
    let mut s = format!(
        "<svg id=\"{}\" width=\"{W}\" height=\"{H}\" style=\"width: 100%; height: auto\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\" font-size=\"12\" fill=\"#4a5568\">\n",
        esc(id),
        esc(y_label)
    );
    // Grid and y ticks.
    for i in 0..=5 {
        let y = y_top * i as f64 / 5.0;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#e5e9f0\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            py(y),
            py(y),
            LEFT - 6.0,
            py(y) + 4.0,
            tick_label(y)
        );
    }
    // X ticks: about ten, on a 1-2-5 step of seconds.
    let step = nice_ceiling(x_top / 10.0).max(1.0);
    let mut x = 0.0;
    while x <= x_top + 1e-9 {
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#c9d0dc\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            px(x),
            px(x),
            TOP + ph,
            TOP + ph + 5.0,
            px(x),
            TOP + ph + 18.0,
            tick_label(x)
        );
        x += step;
    }
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" x2=\"{LEFT}\" y1=\"{TOP}\" y2=\"{:.1}\" stroke=\"#8795aa\"/><line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#8795aa\"/>",
        TOP + ph,
        LEFT + pw,
        TOP + ph,
        TOP + ph
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since start</text><text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 14 {:.1})\">{}</text>",
        LEFT + pw / 2.0,
        H - 6.0,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    // Series, then the legend.
    for (name, colour, points) in series {
        let coords: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline data-series=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"{} stroke-linejoin=\"round\" points=\"{}\"><title>{}</title></polyline>",
            esc(name),
            if *name == "target" || *name == "max_size" {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            },
            coords.join(" "),
            esc(name)
        );
        if points.len() == 1 {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>",
                px(points[0].0),
                py(points[0].1)
            );
        }
    }
    let mut lx = LEFT + 10.0;
    for (name, colour, _) in series {
        let _ = writeln!(
            s,
            "<rect x=\"{lx:.1}\" y=\"10\" width=\"14\" height=\"4\" fill=\"{colour}\"/><text x=\"{:.1}\" y=\"16\">{}</text>",
            lx + 18.0,
            esc(name)
        );
        lx += 28.0 + 8.0 * name.len() as f64;
    }
    s.push_str("</svg>\n");
    s
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_owned()
    }
}
