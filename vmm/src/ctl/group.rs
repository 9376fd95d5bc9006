//! `spanvmm ctl migrate-group`: synchronized arrival (CloudNet). Migrates several VMs (the
//! tiers of one application, each its own VMM with its own API socket) so that they switch
//! over together: every member is started with a hold, the group waits until all are `ready`
//! (converged, still running at the source), releases them, waits until all are `prepared`
//! (paused, each destination ready to run its guest), and only then releases the commits.
//! A member that fails (or a deadline) before the commits cancels the others: every guest
//! stays at its source. See `l1_services::migration::hold` and docs/operations.md.
//!
//! [`migrate_group`] is the library entry (the benchmark and gang migration call it); the
//! command parses `--vm SOCK=DEST[,plugin=P][,config=JSON]` or a JSON spec into a
//! [`GroupSpec`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use l1_services::migration::tls::Cipher;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::client;

/// One VM of the group.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberSpec {
    /// The source VMM's API socket.
    pub socket: PathBuf,
    /// Its destination, `tls://HOST:PORT`.
    pub to: String,
    /// Its policy service (default: the group's).
    #[serde(default)]
    pub plugin: Option<PathBuf>,
    /// The service's configuration (default: the group's).
    #[serde(default)]
    pub config: Option<String>,
    /// Bytes per second at most (default: the group's).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
}

impl FromStr for MemberSpec {
    type Err = String;

    /// `SOCK=DEST[,plugin=PATH][,config=JSON]`; `config=` comes last and takes the rest
    /// (JSON has commas).
    fn from_str(s: &str) -> Result<Self, String> {
        let (socket, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("--vm {s:?}: expected SOCK=DEST[,plugin=P][,config=JSON]"))?;
        let (rest, config) = match rest.split_once(",config=") {
            Some((r, c)) => (r, Some(c.to_string())),
            None => (rest, None),
        };
        let mut parts = rest.split(',');
        let to = parts.next().unwrap_or_default().to_string();
        if socket.is_empty() || to.is_empty() {
            return Err(format!("--vm {s:?}: a socket and a destination are needed"));
        }
        let mut m = MemberSpec {
            socket: socket.into(),
            to,
            plugin: None,
            config,
            max_bandwidth: None,
        };
        for kv in parts {
            match kv.split_once('=') {
                Some(("plugin", p)) => m.plugin = Some(p.into()),
                Some(("max_bandwidth", b)) => {
                    m.max_bandwidth = Some(super::parse_rate(b).map_err(|e| format!("{e:#}"))?)
                }
                _ => {
                    return Err(format!(
                        "--vm {s:?}: unknown option {kv:?} (plugin=, max_bandwidth=, config=)"
                    ))
                }
            }
        }
        Ok(m)
    }
}

/// A group migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// The members, in the order they are started.
    pub members: Vec<MemberSpec>,
    /// Directory with ca.pem, node.pem, node.key (all members).
    pub tls_dir: PathBuf,
    /// Policy service of members that name none.
    #[serde(default)]
    pub plugin: Option<PathBuf>,
    /// Its configuration.
    #[serde(default)]
    pub config: String,
    /// Bytes per second at most, per member.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// TLS cipher suite.
    #[serde(default)]
    pub cipher: Cipher,
    /// Hold and release together (false: the members migrate independently, the baseline).
    #[serde(default = "yes")]
    pub sync: bool,
    /// Every member must be ready within this, ms, or all are cancelled.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout_ms: u64,
    /// Every member must be prepared within this after the release, ms (their guests are
    /// paused meanwhile), or all roll back.
    #[serde(default = "default_commit_timeout")]
    pub commit_timeout_ms: u64,
    /// Bytes/s each member's held rounds may send (None: the engine's default).
    #[serde(default)]
    pub held_rate: Option<u64>,
    /// Gang migration: draw one store key for the group and add it to every member's
    /// service configuration as `key` (a JSON object that names no key of its own).
    #[serde(default)]
    pub share_key: bool,
}

fn yes() -> bool {
    true
}

fn default_ready_timeout() -> u64 {
    300_000
}

fn default_commit_timeout() -> u64 {
    5_000
}

/// One member's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberReport {
    /// The source's API socket.
    pub socket: PathBuf,
    /// The destination.
    pub to: String,
    /// `completed`, `failed`, `in-doubt`, or `not-started`.
    pub result: String,
    /// Why it did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where its guest is at the source (`moved`, `running`, `paused`).
    pub source_vm: String,
    /// Its downtime, ms.
    pub downtime_ms: f64,
    /// Its total time, ms.
    pub total_ms: f64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// The engine's full report (absent: never started).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub report: Value,
}

/// The group's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// `completed` (every member moved), `aborted` (none moved: every guest at its source),
    /// or `split` (some moved, some not: only a commit lost on its way can do that).
    pub result: String,
    /// Why the group did not complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Held and released together.
    pub sync: bool,
    /// Members, in order.
    pub members: Vec<MemberReport>,
    /// From the first member's start to the last one's end, ms.
    pub total_ms: f64,
    /// First member ready to the last one ready, ms (how long the fast ones were held).
    pub ready_spread_ms: f64,
    /// Between the first and the last member's switch-over (pause), ms.
    pub switch_spread_ms: f64,
    /// Between the first and the last member's guest running at its destination, ms.
    pub arrival_spread_ms: f64,
    /// Bytes all members sent while held at `ready`: what synchronization cost.
    pub held_bytes: u64,
    /// Bytes on the wire, all members.
    pub bytes: u64,
}

/// Where the coordinator found a member.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// Running, hold stage (`converging`, `ready`, `released`, `prepared`, ...).
    Running(String),
    /// Ended: its report.
    Ended(Value),
}

struct Member<'a> {
    spec: &'a MemberSpec,
    id: Option<u64>,
    end: Option<Value>,
}

impl Member<'_> {
    fn socket(&self) -> &Path {
        &self.spec.socket
    }

    /// The starter's poll (only it lets a source whose guest moved exit).
    fn poll(&mut self) -> anyhow::Result<Seen> {
        if let Some(r) = &self.end {
            return Ok(Seen::Ended(r.clone()));
        }
        let Some(id) = self.id else {
            anyhow::bail!("not started");
        };
        let (code, v) = client::call(
            self.socket(),
            "PUT",
            "/vm/migrate",
            Some(&json!({ "poll": id })),
        )
        .with_context(|| format!("{}: lost the source VMM", self.socket().display()))?;
        anyhow::ensure!(
            code == 200,
            "{}: poll: HTTP {code}: {v}",
            self.socket().display()
        );
        if let Some(r) = v.get("report") {
            self.end = Some(r.clone());
            return Ok(Seen::Ended(r.clone()));
        }
        let stage = v["progress"]["hold"]["stage"]
            .as_str()
            .unwrap_or("unheld")
            .to_string();
        Ok(Seen::Running(stage))
    }

    fn verb(&self, verb: &str) -> anyhow::Result<()> {
        let Some(id) = self.id else { return Ok(()) };
        let (code, v) = client::call(
            self.socket(),
            "PUT",
            "/vm/migrate",
            Some(&json!({ verb: id })),
        )?;
        anyhow::ensure!(
            code == 200,
            "{}: {verb}: HTTP {code}: {}",
            self.socket().display(),
            v["error"]
        );
        Ok(())
    }

    fn report(&self) -> MemberReport {
        let r = self.end.clone().unwrap_or(Value::Null);
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        MemberReport {
            socket: self.spec.socket.clone(),
            to: self.spec.to.clone(),
            result: r["result"].as_str().unwrap_or("not-started").into(),
            error: r["error"].as_str().map(String::from),
            source_vm: r["source_vm"].as_str().unwrap_or("running").into(),
            downtime_ms: f("downtime_ms"),
            total_ms: f("total_ms"),
            bytes: r["bytes"].as_u64().unwrap_or(0),
            report: r,
        }
    }
}

/// How often members are polled while they converge, and around the gates (their guests are
/// paused while the coordinator waits at the second).
const POLL_SLOW: Duration = Duration::from_millis(50);
const POLL_FAST: Duration = Duration::from_millis(1);

/// Migrates the group; an error only when the coordinator itself cannot go on (a member
/// that fails is in the report, and aborts the group).
pub fn migrate_group(spec: &GroupSpec, progress: bool) -> anyhow::Result<GroupReport> {
    anyhow::ensure!(
        !spec.members.is_empty(),
        "a group needs at least one member"
    );
    let t0 = Instant::now();
    let mut members: Vec<Member> = spec
        .members
        .iter()
        .map(|m| Member {
            spec: m,
            id: None,
            end: None,
        })
        .collect();
    let say = |m: &str| {
        if progress {
            eprintln!("[{:>8.1} ms] {m}", t0.elapsed().as_secs_f64() * 1e3);
        }
    };
    let error = run_group(spec, &mut members, &say).err();
    if let Some(e) = &error {
        say(&format!("aborting the group: {e:#}"));
        for m in members.iter().filter(|m| m.id.is_some() && m.end.is_none()) {
            if let Err(e) = m.verb("cancel") {
                say(&format!("cancel: {e:#}"));
            }
        }
    }
    // Every started member's report (a cancelled one ends within its link's timeouts).
    let deadline = Instant::now() + Duration::from_secs(120);
    for m in members.iter_mut().filter(|m| m.id.is_some()) {
        while !matches!(m.poll(), Ok(Seen::Ended(_)) | Err(_)) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{}: no report 120 s after the group ended",
                m.socket().display()
            );
            std::thread::sleep(POLL_SLOW);
        }
    }
    let reports: Vec<MemberReport> = members.iter().map(Member::report).collect();
    let moved = reports.iter().filter(|r| r.result == "completed").count();
    let result = match moved {
        n if n == reports.len() => "completed",
        0 => "aborted",
        _ => "split",
    };
    let spread = |v: Vec<f64>| {
        let v: Vec<f64> = v.into_iter().filter(|&x| x > 0.0).collect();
        if v.len() < 2 {
            return 0.0;
        }
        let max = v.iter().cloned().fold(f64::MIN, f64::max);
        let min = v.iter().cloned().fold(f64::MAX, f64::min);
        max - min
    };
    let switch_ms = |r: &MemberReport| r.report["switch_unix_us"].as_f64().unwrap_or(0.0) / 1e3;
    let done: Vec<&MemberReport> = reports.iter().filter(|r| r.result == "completed").collect();
    let ready_at =
        |r: &MemberReport| r.report["hold"]["ready_unix_us"].as_f64().unwrap_or(0.0) / 1e3;
    let report = GroupReport {
        result: result.into(),
        error: error.map(|e| format!("{e:#}")).or_else(|| {
            (result != "completed").then(|| {
                reports
                    .iter()
                    .filter_map(|r| r.error.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        }),
        sync: spec.sync,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        ready_spread_ms: if spec.sync {
            spread(done.iter().map(|r| ready_at(r)).collect())
        } else {
            0.0
        },
        switch_spread_ms: spread(done.iter().map(|r| switch_ms(r)).collect()),
        arrival_spread_ms: spread(done.iter().map(|r| switch_ms(r) + r.downtime_ms).collect()),
        held_bytes: reports
            .iter()
            .map(|r| r.report["hold"]["held_bytes"].as_u64().unwrap_or(0))
            .sum(),
        bytes: reports.iter().map(|r| r.bytes).sum(),
        members: reports,
    };
    Ok(report)
}

/// Starts, holds and releases the members; Err: abort the group.
fn run_group(spec: &GroupSpec, members: &mut [Member], say: &dyn Fn(&str)) -> anyhow::Result<()> {
    let tls_dir = std::path::absolute(&spec.tls_dir).context("resolve the TLS directory")?;
    // One secret for the group, drawn here and handed to each source over its API socket.
    let shared_key = if spec.share_key {
        let k = l1_services::migration::intermediary::StoreKey::generate()
            .map_err(|e| anyhow::anyhow!("draw the group's store key: {e}"))?;
        Some(
            k.as_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        )
    } else {
        None
    };
    for m in members.iter_mut() {
        let plugin = m
            .spec
            .plugin
            .as_ref()
            .or(spec.plugin.as_ref())
            .map(std::path::absolute)
            .transpose()
            .context("resolve the plugin path")?;
        let mut config = m.spec.config.as_deref().unwrap_or(&spec.config).to_string();
        if let Some(k) = &shared_key {
            config = with_key(&config, k)
                .with_context(|| format!("{}: --share-key", m.socket().display()))?;
        }
        let mut body = json!({
            "to": m.spec.to,
            "plugin": plugin,
            "config": config,
            "tls_dir": tls_dir,
            "max_bandwidth": m.spec.max_bandwidth.or(spec.max_bandwidth),
            "cipher": spec.cipher,
        });
        if spec.sync {
            // A member whose coordinator is gone gives up by itself after the same deadline.
            body["hold"] = json!({
                "timeout_ms": spec.ready_timeout_ms,
                "commit_timeout_ms": spec.commit_timeout_ms,
                "held_rate": spec.held_rate,
            });
        }
        let (code, v) = client::call(m.socket(), "PUT", "/vm/migrate", Some(&body))
            .with_context(|| format!("{}: cannot reach the source VMM", m.socket().display()))?;
        anyhow::ensure!(
            code == 200,
            "{} → {}: the migration did not start: {} (HTTP {code})",
            m.socket().display(),
            m.spec.to,
            v["error"].as_str().unwrap_or("?")
        );
        m.id = Some(
            v["id"]
                .as_u64()
                .context("the VMM's answer names no migration")?,
        );
        say(&format!(
            "{} → {}: started",
            m.socket().display(),
            m.spec.to
        ));
    }
    if !spec.sync {
        return wait_all(members, None, Duration::MAX, POLL_SLOW, say);
    }
    wait_all(
        members,
        Some("ready"),
        Duration::from_millis(spec.ready_timeout_ms),
        POLL_SLOW,
        say,
    )?;
    say("all ready: releasing the switch-overs");
    for m in members.iter() {
        m.verb("release")?;
    }
    wait_all(
        members,
        Some("prepared"),
        Duration::from_millis(spec.commit_timeout_ms),
        POLL_FAST,
        say,
    )?;
    for m in members.iter() {
        m.verb("release")?;
    }
    say("all prepared: committed");
    wait_all(members, None, Duration::MAX, POLL_SLOW, say)
}

/// `config` (a JSON object, or nothing) with `"key": key` added.
fn with_key(config: &str, key: &str) -> anyhow::Result<String> {
    let mut v: Value = if config.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(config).context("the service's configuration is not JSON")?
    };
    let obj = v
        .as_object_mut()
        .context("the service's configuration is not a JSON object")?;
    anyhow::ensure!(
        !obj.contains_key("key"),
        "the configuration names a key already"
    );
    obj.insert("key".into(), Value::String(key.into()));
    Ok(v.to_string())
}

/// Waits until every member is at `stage` (None: ended). A member that ended anywhere but
/// completed while others are still to come fails the wait.
fn wait_all(
    members: &mut [Member],
    stage: Option<&str>,
    timeout: Duration,
    every: Duration,
    say: &dyn Fn(&str),
) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut at = vec![false; members.len()];
    loop {
        for (i, m) in members.iter_mut().enumerate() {
            if at[i] {
                continue;
            }
            match m.poll()? {
                Seen::Ended(r) if r["result"] != "completed" || stage.is_some() => {
                    anyhow::bail!(
                        "{}: the migration ended ({}) before the group's {}: {}",
                        m.socket().display(),
                        r["result"].as_str().unwrap_or("?"),
                        stage.unwrap_or("end"),
                        r["error"].as_str().unwrap_or("no error given")
                    );
                }
                Seen::Ended(_) => at[i] = true,
                Seen::Running(s) if Some(s.as_str()) == stage => {
                    say(&format!("{}: {s}", m.socket().display()));
                    at[i] = true;
                }
                Seen::Running(_) => {}
            }
        }
        if at.iter().all(|&a| a) {
            return Ok(());
        }
        anyhow::ensure!(
            t.elapsed() < timeout,
            "not every member reached {} within {} ms",
            stage.unwrap_or("the end"),
            timeout.as_millis()
        );
        std::thread::sleep(every);
    }
}

/// `ctl migrate-group`: runs the group, writes the report, prints a summary; fails unless
/// every member moved.
pub fn ctl_migrate_group(spec: &GroupSpec, report_path: &Path) -> anyhow::Result<()> {
    let r = migrate_group(spec, true)?;
    std::fs::write(report_path, serde_json::to_string_pretty(&r)?)
        .with_context(|| format!("write {}", report_path.display()))?;
    for m in &r.members {
        eprintln!(
            "{} → {}: {} (downtime {:.1} ms, {} bytes, guest at the source: {})",
            m.socket.display(),
            m.to,
            m.result,
            m.downtime_ms,
            m.bytes,
            m.source_vm
        );
    }
    eprintln!(
        "group {}: switch-overs within {:.1} ms, arrivals within {:.1} ms, held rounds cost {} bytes",
        r.result, r.switch_spread_ms, r.arrival_spread_ms, r.held_bytes
    );
    println!("{}", serde_json::to_string(&r)?);
    match r.result.as_str() {
        "completed" => Ok(()),
        "aborted" => anyhow::bail!(
            "the group did not move: every guest stays at its source ({}; report in {})",
            r.error.unwrap_or_default(),
            report_path.display()
        ),
        _ => anyhow::bail!(
            "the group is split: some members moved, some did not ({}; report in {})",
            r.error.unwrap_or_default(),
            report_path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_syntax() {
        let m: MemberSpec = "/a.sock=tls://10.0.0.2:7000".parse().unwrap();
        assert_eq!(
            (m.socket.to_str(), m.to.as_str()),
            (Some("/a.sock"), "tls://10.0.0.2:7000")
        );
        let m: MemberSpec = r#"/b.sock=tls://h:1,plugin=p.wasm,config={"a":1,"b":2}"#
            .parse()
            .unwrap();
        assert_eq!(m.plugin.as_deref(), Some(Path::new("p.wasm")));
        assert_eq!(m.config.as_deref(), Some(r#"{"a":1,"b":2}"#));
        assert!("/c.sock".parse::<MemberSpec>().is_err());
        let c: Value = serde_json::from_str(&with_key(r#"{"a":1}"#, "ab").unwrap()).unwrap();
        assert_eq!(c, json!({"a": 1, "key": "ab"}));
        assert!(with_key(r#"{"key":"x"}"#, "ab").is_err());
        assert!(with_key("[1]", "ab").is_err());
        assert_eq!(with_key("", "ab").unwrap(), r#"{"key":"ab"}"#);
        assert!("/c.sock=x,nope=1".parse::<MemberSpec>().is_err());
    }
}
