//! `redis-benchmark` as the benchmarks' network client, against a guest's `kv` server from
//! inside a namespace: how a run is started and how its CSV is read, in one place so that every
//! benchmark counts a client error the same way.

use std::process::{Child, Command, Output, Stdio};

use anyhow::{bail, Context};
use serde::Serialize;

/// Words in redis-benchmark's output that mean a request failed (an error reply, a reset
/// connection, a warning about either).
const FAILURE_WORDS: [&str; 3] = ["rror", "eset", "WARNING"];

/// One test's figures: requests/s and latencies in ms.
#[derive(Serialize, Clone, Copy, Debug)]
pub struct Figures {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What one client run printed: each test's figures, and the first failure if there was one.
pub struct Run {
    pub tests: Vec<(String, Figures)>,
    pub error: Option<String>,
}

impl Run {
    /// The figures of test `name` (`GET`, `SET`, ...), if it ran.
    pub fn test(&self, name: &str) -> Option<Figures> {
        self.tests
            .iter()
            .find(|(n, f)| n == name && f.rps > 0.0)
            .map(|(_, f)| *f)
    }

    /// The figures of test `name`, or an error when the run failed or the test did not run.
    pub fn require(&self, name: &str) -> anyhow::Result<Figures> {
        if let Some(e) = &self.error {
            bail!("redis-benchmark failed: {e}");
        }
        self.test(name)
            .with_context(|| format!("redis-benchmark: no {name} row"))
    }
}

/// A latency client: `n` GETs of one key over `clients` connections, one request in flight
/// each, bounded by `timeout_s`; `ns_cmd` is `timeout` run inside the client's namespace.
pub fn start_get(
    mut ns_cmd: Command,
    host: &str,
    clients: &str,
    n: u64,
    timeout_s: u64,
) -> anyhow::Result<Child> {
    ns_cmd
        .arg(timeout_s.to_string())
        .args(["redis-benchmark", "-h", host, "-p", "6379"])
        .args(["-t", "get", "-c", clients, "-P", "1", "-k", "1"])
        .args(["-n", &n.to_string(), "--csv"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("redis-benchmark")
}

/// Waits for a client started by [`start_get`] and reads its output.
pub fn finish(child: Child) -> anyhow::Result<Run> {
    Ok(read(&child.wait_with_output()?))
}

/// Reads a finished run's output: the rows after the CSV header, and whether it failed (a
/// non-zero exit or any failure word on either stream).
pub fn read(out: &Output) -> Run {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let failed_line = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| FAILURE_WORDS.iter().any(|w| l.contains(w)));
    let error = (!out.status.success() || failed_line.is_some())
        .then(|| format!("exit {}: {}", out.status, failed_line.unwrap_or("").trim()));
    let tests = stdout
        .lines()
        .skip_while(|l| !l.starts_with("\"test\""))
        .skip(1)
        .filter_map(|row| {
            // test, rps, avg, min, p50, p95, p99, max.
            let f: Vec<&str> = row.split(',').map(|f| f.trim_matches('"')).collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
            Some((
                f.first()?.to_string(),
                Figures {
                    rps: n(1)?,
                    p50_ms: n(4)?,
                    p99_ms: n(6)?,
                    max_ms: n(7)?,
                },
            ))
        })
        .collect();
    Run { tests, error }
}
