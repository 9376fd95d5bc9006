//! Interleaved rounds, shared by the benchmarks that compare engines run by run (scatter-gather,
//! gang, agile): every case runs once per round, in order, so a slow spell of the shared machine
//! falls on every case alike; per case each figure's median, min and max, printed as a markdown
//! table on stderr and kept in the JSON rows.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::harness::{stat, Stat};

/// One case's runs over the rounds.
pub struct Case<K, S> {
    pub key: K,
    pub runs: Vec<S>,
    /// Runs that failed (an error, a guest that did not verify clean): counted, not measured.
    pub failed: usize,
}

impl<K, S> Case<K, S> {
    /// Median, min and max of `f` over the runs that have it (a NaN counts as absent); None
    /// when none has.
    pub fn stat(&self, f: impl Fn(&S) -> Option<f64>) -> Option<Stat> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .filter_map(f)
            .filter(|x| !x.is_nan())
            .collect();
        (!v.is_empty()).then(|| stat(v.into_iter()))
    }

    /// The median of [`Case::stat`], NaN when no run has the figure.
    pub fn median(&self, f: impl Fn(&S) -> Option<f64>) -> f64 {
        self.stat(f).map_or(f64::NAN, |s| s.median)
    }
}

/// Runs `runs` rounds of every case of `keys`, in order. `one` measures a case once: an `Err`
/// is a failed run (printed and counted, never fatal to the benchmark). Each run is printed as
/// `round R: NAME: SHOW` as it ends.
pub fn interleave<K, S>(
    runs: usize,
    keys: Vec<K>,
    name: impl Fn(&K) -> String,
    mut one: impl FnMut(&K) -> anyhow::Result<S>,
    show: impl Fn(&S) -> String,
) -> Vec<Case<K, S>> {
    let mut cases: Vec<Case<K, S>> = keys
        .into_iter()
        .map(|key| Case {
            key,
            runs: Vec::new(),
            failed: 0,
        })
        .collect();
    for round in 0..runs {
        for c in &mut cases {
            let n = name(&c.key);
            match one(&c.key) {
                Ok(s) => {
                    eprintln!("round {round}: {n}: {}", show(&s));
                    c.runs.push(s);
                }
                Err(e) => {
                    eprintln!("round {round}: {n}: FAILED: {e:#}");
                    c.failed += 1;
                }
            }
        }
    }
    cases
}

/// How a figure is read from a run (None: not measured in that run).
type Read<'a, S> = Box<dyn Fn(&S) -> Option<f64> + 'a>;

/// One figure of a table: its JSON field (a [`Stat`]), its heading, how to read it from a run
/// (None: not measured in that run), and how to show it (divided by `div`, `digits` decimals).
pub struct Column<'a, S> {
    key: &'a str,
    head: &'a str,
    div: f64,
    digits: usize,
    value: Read<'a, S>,
}

/// A [`Column`].
pub fn col<'a, S>(
    key: &'a str,
    head: &'a str,
    div: f64,
    digits: usize,
    value: impl Fn(&S) -> Option<f64> + 'a,
) -> Column<'a, S> {
    Column {
        key,
        head,
        div,
        digits,
        value: Box::new(value),
    }
}

/// `median (min–max)`, each divided by `div`.
pub fn spread(s: &Stat, div: f64, digits: usize) -> String {
    let d = digits;
    if s.min == s.max {
        return format!("{:.d$}", s.median / div);
    }
    format!(
        "{:.d$} ({:.d$}–{:.d$})",
        s.median / div,
        s.min / div,
        s.max / div
    )
}

/// How a benchmark's cases become a table and JSON rows.
pub struct Table<'a, K, S> {
    /// The headings of the cells naming a case, and those cells.
    pub key_heads: &'a [&'a str],
    pub key_cells: &'a dyn Fn(&K) -> Vec<String>,
    /// The JSON fields naming a case (an object).
    pub key_json: &'a dyn Fn(&K) -> Value,
    pub columns: Vec<Column<'a, S>>,
    /// Cells after the figures (a ratio to another case, say), and their headings.
    pub extra_heads: &'a [&'a str],
    pub extra: &'a dyn Fn(&Case<K, S>) -> Vec<String>,
}

impl<K, S: Serialize> Table<'_, K, S> {
    /// Prints the table of the cases that have a run (a `failed` column last) and returns their
    /// JSON rows: the key's fields, `failed`, each column's [`Stat`] under its key (left out
    /// where no run has the figure), and `runs`.
    pub fn rows(&self, cases: &[Case<K, S>]) -> anyhow::Result<Vec<Value>> {
        let heads: Vec<&str> = self
            .key_heads
            .iter()
            .copied()
            .chain(self.columns.iter().map(|c| c.head))
            .chain(self.extra_heads.iter().copied())
            .chain(["failed"])
            .collect();
        eprintln!("| {} |", heads.join(" | "));
        eprintln!("|{}", "---|".repeat(heads.len()));
        let mut rows = Vec::new();
        for c in cases.iter().filter(|c| !c.runs.is_empty()) {
            let mut row = match (self.key_json)(&c.key) {
                Value::Object(m) => m,
                other => Map::from_iter([("case".to_string(), other)]),
            };
            row.insert("failed".into(), c.failed.into());
            let mut cells = (self.key_cells)(&c.key);
            for col in &self.columns {
                match c.stat(&col.value) {
                    Some(s) => {
                        cells.push(spread(&s, col.div, col.digits));
                        row.insert(col.key.into(), serde_json::to_value(&s)?);
                    }
                    None => cells.push("–".into()),
                }
            }
            cells.extend((self.extra)(c));
            cells.push(c.failed.to_string());
            eprintln!("| {} |", cells.join(" | "));
            row.insert("runs".into(), serde_json::to_value(&c.runs)?);
            rows.push(Value::Object(row));
        }
        Ok(rows)
    }
}

/// No extra cells.
pub fn no_extra<K, S>(_: &Case<K, S>) -> Vec<String> {
    Vec::new()
}
