//! The control API's client side: one request per connection, as `ctl` and the tests use it.
//! Every request has a deadline: a VMM that does not answer never hangs its client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// How long [`call`] and [`call_checked`] wait for a whole answer (saving a large VM takes a
/// while; `ctl --timeout` chooses per command).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Client side: [`call`], where any answer but 200 is an error carrying the VMM's message.
pub fn call_checked(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    call_checked_within(socket, method, path, body, DEFAULT_TIMEOUT)
}

/// [`call_checked`] with its own deadline for the whole answer.
pub fn call_checked_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let (code, value) = call_within(socket, method, path, body, timeout)?;
    if code != 200 {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        bail!("{msg} (HTTP {code})");
    }
    Ok(value)
}

/// Client side: sends one request, returns (status, JSON body).
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    call_within(socket, method, path, body, DEFAULT_TIMEOUT)
}

fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to the VMM's API socket {} (is `spanvmm run --api-socket` running?)",
            socket.display()
        )
    })
}

/// A read against one deadline for the whole answer.
struct Deadline<'a> {
    s: &'a UnixStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.s.set_read_timeout(Some(left))?;
        let mut s = self.s;
        s.read(buf)
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// [`call`] with its own deadline for the whole answer.
pub fn call_within(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> anyhow::Result<(u16, Value)> {
    let s = connect(socket)?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        &s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = Vec::new();
    let mut reader = Deadline {
        s: &s,
        until: Instant::now() + timeout,
    };
    if let Err(e) = reader.read_to_end(&mut resp) {
        if timed_out(&e) {
            bail!(
                "no answer from the VMM within {} s to {method} {path}: it may be busy or stuck \
                 (the request may still complete; `spanvmm ctl --timeout SECS` waits longer)",
                timeout.as_secs_f64()
            );
        }
        return Err(e).context("read API response");
    }
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed API response")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed API status line")?;
    let value = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    Ok((code, value))
}

/// Follows a streamed answer (`GET path`, chunked, one JSON object a line): hands each line
/// to `each` as it arrives until the VMM ends the stream. The VMM sends an empty line every
/// few seconds while nothing happens; silence for `idle` is an error (a VMM gone or stuck).
pub fn follow(
    socket: &Path,
    path: &str,
    idle: Duration,
    mut each: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let s = connect(socket)?;
    s.set_read_timeout(Some(idle))?;
    s.set_write_timeout(Some(idle))?;
    write!(&s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let silent = |e: std::io::Error| {
        if timed_out(&e) {
            anyhow::anyhow!("the VMM sent nothing for {} s", idle.as_secs())
        } else {
            anyhow::Error::from(e).context("read the stream")
        }
    };
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(silent)?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed API status line")?;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(silent)?;
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        chunked |= h.eq_ignore_ascii_case("transfer-encoding: chunked");
    }
    if code != 200 || !chunked {
        let mut rest = String::new();
        r.read_to_string(&mut rest).map_err(silent)?;
        let v: Value = serde_json::from_str(&rest).unwrap_or(Value::String(rest));
        let msg = v.get("error").and_then(Value::as_str).map(str::to_string);
        bail!("{} (HTTP {code})", msg.unwrap_or_else(|| v.to_string()));
    }
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(silent)? == 0 {
            return Ok(());
        }
        let size = usize::from_str_radix(line.trim(), 16)
            .with_context(|| format!("malformed chunk size {:?}", line.trim()))?;
        if size == 0 {
            return Ok(());
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk).map_err(silent)?;
        for l in String::from_utf8_lossy(&chunk[..size]).lines() {
            if !l.trim().is_empty() {
                each(l)?;
            }
        }
    }
}
