//! The control API's client side: one request per connection, as `ctl` and the tests use it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// Client side: [`call`], where any answer but 200 is an error carrying the VMM's message.
pub fn call_checked(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let (code, value) = call(socket, method, path, body)?;
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
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to the VMM's API socket {} (is `spanvmm run --api-socket` running?)",
            socket.display()
        )
    })?;
    // Saving a large VM takes a while; a VMM that hangs must not hang its client forever.
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).context("read API response")?;
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
