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
    /// Prints the table of the cases that ran (a `failed` column last; a case whose every run
    /// failed keeps its row, with no figures) and returns their JSON rows: the key's fields,
    /// `failed`, each column's [`Stat`] under its key (left out where no run has the figure),
    /// and `runs`.
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
        for c in cases.iter().filter(|c| !c.runs.is_empty() || c.failed > 0) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rounds_interleave_the_cases_and_count_failures() {
        let mut order = Vec::new();
        let cases = interleave(
            3,
            vec!["a", "b"],
            |k| k.to_string(),
            |&k| {
                order.push(k);
                // "b" fails its second run.
                anyhow::ensure!(!(k == "b" && order.len() == 4), "b broke");
                Ok(order.len() as u64)
            },
            |s| s.to_string(),
        );
        assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
        assert_eq!((cases[0].runs.clone(), cases[0].failed), (vec![1, 3, 5], 0));
        assert_eq!((cases[1].runs.clone(), cases[1].failed), (vec![2, 6], 1));
        let s = cases[0].stat(|&x| Some(x as f64)).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert!(cases[0].stat(|_| None).is_none());
        assert!(cases[0].median(|_| Some(f64::NAN)).is_nan());
    }

    #[test]
    fn rows_keep_each_figure_and_leave_out_what_was_not_measured() {
        let cases = vec![
            Case {
                key: "with",
                runs: vec![(10u64, Some(1u64)), (30, Some(3)), (20, Some(2))],
                failed: 1,
            },
            Case {
                key: "without",
                runs: vec![(5, None)],
                failed: 0,
            },
            Case {
                key: "every run failed",
                runs: vec![],
                failed: 3,
            },
        ];
        let rows = Table {
            key_heads: &["case"],
            key_cells: &|k: &&str| vec![k.to_string()],
            key_json: &|k: &&str| json!({ "case": k }),
            columns: vec![
                col("ms", "s", 1e3, 2, |r: &(u64, Option<u64>)| Some(r.0 as f64)),
                col("opt", "opt", 1.0, 0, |r: &(u64, Option<u64>)| {
                    r.1.map(|x| x as f64)
                }),
            ],
            extra_heads: &[],
            extra: &no_extra,
        }
        .rows(&cases)
        .unwrap();
        assert_eq!(rows.len(), 3, "a case whose every run failed keeps its row");
        assert_eq!(rows[2]["failed"], 3);
        assert!(rows[2].get("ms").is_none(), "{}", rows[2]);
        assert_eq!(rows[0]["case"], "with");
        assert_eq!(rows[0]["failed"], 1);
        assert_eq!(
            rows[0]["ms"],
            json!({"median": 20.0, "min": 10.0, "max": 30.0})
        );
        assert_eq!(rows[0]["opt"]["median"], 2.0);
        assert_eq!(rows[0]["runs"].as_array().unwrap().len(), 3);
        assert!(rows[1].get("opt").is_none(), "no run measured it");
        assert_eq!(
            spread(&stat([1500.0, 2500.0].into_iter()), 1e3, 1),
            "2.0 (1.5–2.5)"
        );
    }
}
