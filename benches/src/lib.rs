//! Rampart's benchmarks: criterion micro-benchmarks under `benches/` and load scenarios, each
//! measured side by side with the peer crate or tool in the same run. `scripts/bench` runs them
//! all and the `report` binary turns the results into `benches/RESULTS.md`.
//!
//! Load scenarios (harness-less bench targets) record their figures with [`record`], one JSON
//! file per scenario under `target/rampart-bench/`.

pub mod chart;
pub mod load;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One measured figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// What was measured (e.g. `rampart RedisStore, 50 concurrent`).
    pub name: String,
    /// The median (or the single run's) value; NaN (JSON `null`) when there is none.
    #[serde(deserialize_with = "null_as_nan")]
    pub value: f64,
    /// Unit, e.g. `decisions/s`.
    pub unit: String,
    /// The row (by name) the ratio column compares this one with; without it, the first row
    /// of the scenario when the units match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
}

impl Row {
    /// A figure.
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Self { name: name.into(), value, unit: unit.into(), baseline: None }
    }

    /// Compares this row with the row named `baseline` in the ratio column.
    pub fn against(mut self, baseline: impl Into<String>) -> Self {
        self.baseline = Some(baseline.into());
        self
    }
}

/// The figures of one load scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scenario {
    /// Section title in the report.
    pub title: String,
    /// The command that produced it.
    pub command: String,
    /// Figures; the report's ratio column compares each with its baseline row.
    pub rows: Vec<Row>,
    /// Free-form lines (goals, caveats, what was not measured).
    pub notes: Vec<String>,
    /// Time series, drawn as line charts (one per `chart` title).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<Series>,
}

/// One line of a line chart: `(x, y)` points, e.g. seconds into a run and a rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    /// The chart it belongs to (its title).
    pub chart: String,
    /// The line's label.
    pub name: String,
    /// The y unit (`log` in it draws a logarithmic axis: `ms (log)`).
    pub unit: String,
    /// The points; a NaN (JSON `null`) y is a gap.
    #[serde(deserialize_with = "null_ys_as_nan")]
    pub points: Vec<(f64, f64)>,
}

/// serde_json writes NaN as `null`; read it back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn null_ys_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(f64, f64)>, D::Error> {
    let points = Vec::<(f64, Option<f64>)>::deserialize(d)?;
    Ok(points.into_iter().map(|(x, y)| (x, y.unwrap_or(f64::NAN))).collect())
}

/// Where scenarios are written: `$RAMPART_BENCH_OUT` or `<workspace>/target/rampart-bench`.
pub fn out_dir() -> PathBuf {
    std::env::var_os("RAMPART_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/rampart-bench"))
}

/// Writes a scenario's JSON file (named after `file`) for the report.
pub fn record(file: &str, scenario: &Scenario) -> std::io::Result<()> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::to_vec_pretty(scenario).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(format!("{file}.json")), json)
}

/// The median of a sample (0 when empty).
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) { (values[mid - 1] + values[mid]) / 2.0 } else { values[mid] }
}

/// CPU time (user + system) a process used so far, in seconds (0 if it is gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3; utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}
