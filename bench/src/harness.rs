//! Driving spanvmm VMs in benchmarks: spawn, collect console lines, call the API.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// A VM under measurement, its console lines collected as they come.
pub struct Vm {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub sock: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // After a live update another process serves the VM: find it through the API.
        if let Ok((200, status, _)) = self.api("GET", "/vm", None) {
            if let Some(pid) = status["pid"]
                .as_u64()
                .filter(|&p| p != u64::from(self.child.id()))
            {
                // SAFETY: kill(2) on the pid the VMM reported for itself.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// A process's output lines, collected as they come.
pub type Lines = Arc<Mutex<Vec<String>>>;

pub fn collect(out: impl Read + Send + 'static) -> Lines {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

/// Starts `spanvmm run ARGS --api-socket S` without waiting for anything.
pub fn spawn_run(bin: &Path, args: &[&str], tag: &str) -> anyhow::Result<Vm> {
    let sock =
        std::env::temp_dir().join(format!("spanvmm-bench-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(bin)
        .arg("run")
        .args(args)
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(debug_stderr())
        .spawn()?;
    let lines = collect(child.stdout.take().unwrap());
    Ok(Vm { child, lines, sock })
}

/// The VMM's stderr: shown when its restore trace is on (`SPANVMM_RESTORE_DEBUG`), else
/// dropped.
fn debug_stderr() -> Stdio {
    if std::env::var_os("SPANVMM_RESTORE_DEBUG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

pub fn spawn_vm(bin: &Path, elf: &Path, cmdline: &str, mem: u64, tag: &str) -> anyhow::Result<Vm> {
    spawn_vm_env(bin, elf, cmdline, mem, tag, &[])
}

/// [`spawn_vm`] with extra environment variables for the VMM.
pub fn spawn_vm_env(
    bin: &Path,
    elf: &Path,
    cmdline: &str,
    mem: u64,
    tag: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Vm> {
    let sock =
        std::env::temp_dir().join(format!("spanvmm-bench-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(bin)
        .arg("run")
        .arg("--kernel")
        .arg(elf)
        .args([
            "--cmdline",
            cmdline,
            "--memory",
            &mem.to_string(),
            "--api-socket",
        ])
        .arg(&sock)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let lines = collect(child.stdout.take().unwrap());
    let vm = Vm { child, lines, sock };
    vm.wait_lines("SPANGUEST ready", 1, 0, Duration::from_secs(300))?;
    Ok(vm)
}

impl Vm {
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn wait_lines(
        &self,
        needle: &str,
        n: usize,
        from: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<String> = self.lines.lock().unwrap()[from..]
                .iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("{n} lines with {needle:?} not seen in {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One API call over the socket; returns (status, body, round-trip time).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value, Duration)> {
        let t = Instant::now();
        let mut s = UnixStream::connect(&self.sock)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let rtt = t.elapsed();
        let (head, body) = resp.split_once("\r\n\r\n").context("malformed response")?;
        let code = head.split_whitespace().nth(1).context("status")?.parse()?;
        Ok((code, serde_json::from_str(body).unwrap_or(Value::Null), rtt))
    }

    pub fn api_ok(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(Value, Duration)> {
        let (code, v, rtt) = self.api(method, path, body)?;
        if code != 200 {
            bail!("{method} {path}: HTTP {code}: {v}");
        }
        Ok((v, rtt))
    }
}

/// The first of `lines` at or after `from` holding `needle`, waiting up to `timeout` for it.
pub fn wait_line(
    lines: &Lines,
    from: usize,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = lines
            .lock()
            .unwrap()
            .iter()
            .skip(from)
            .find(|l| l.contains(needle))
        {
            return Ok(l.clone());
        }
        if Instant::now() > deadline {
            bail!("no {needle:?} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` on the API socket `api`: the JSON body (None: no answer, or not JSON).
pub fn api_get(api: &Path, path: &str) -> Option<Value> {
    let mut s = UnixStream::connect(api).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    serde_json::from_str(r.split_once("\r\n\r\n")?.1).ok()
}

/// `spanvmm ctl --api-socket API ARGS`: its stdout; an error holding what it said when it
/// fails.
pub fn ctl(bin: &Path, api: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("ctl")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "ctl {args:?}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

/// Median and spread of one figure over the runs.
#[derive(serde::Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(v: impl Iterator<Item = f64>) -> Stat {
    let mut v: Vec<f64> = v.collect();
    let m = median(&mut v);
    Stat {
        median: m,
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// CPU time (user + system) a live process has used so far, ms.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, closed by the last ')').
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1000 / hz)
}

/// Waits up to `timeout` for `child` to exit on its own, then reaps it as [`reap_cpu_ms`] does.
pub fn exit_cpu_ms(child: &mut std::process::Child, timeout: std::time::Duration) -> Option<u64> {
    let deadline = std::time::Instant::now() + timeout;
    let exited = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    while !exited(child.id()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    reap_cpu_ms(child)
}

/// Ends `child` (if it still runs) and reaps it: the CPU time it used in all, ms (a process
/// that exited on its own cannot be read from /proc any more).
pub fn reap_cpu_ms(child: &mut std::process::Child) -> Option<u64> {
    let _ = child.kill();
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into the two locals.
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    if r <= 0 {
        return None;
    }
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    Some(ms(ru.ru_utime) + ms(ru.ru_stime))
}

/// The middle value; with an even count, the mean of the two middle ones (two rounds' median
/// is their mean, not the larger).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n > 0 && n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}
