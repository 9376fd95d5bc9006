//! The control API's server: the Unix socket (mode 0600, owner or root only), one thread
//! per connection, size limits and a deadline per request, and the hand-off of each routed
//! request to the main loop (which claims it or lets it be abandoned). Also serves the
//! `--metrics-addr` scrapes. See docs/api.yaml.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::routes::{route, ApiRequest, ApiResult};
use crate::metrics::Metrics;

/// Longest request head (request line + headers) accepted.
const MAX_HEAD: usize = 16 << 10;
/// Longest request body accepted.
const MAX_BODY: usize = 64 << 10;
/// Connections served at once; more are answered 503 straight away.
const MAX_CONNECTIONS: usize = 16;
/// A client has this long to send its whole request (a deadline for the request, not for
/// each read: a client dribbling a byte at a time must not hold a connection slot forever),
/// and each write of the answer this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A request, where its answer goes, and a signal that the answer has been written to the
/// client (a VMM handing over to another process waits for it before exiting).
pub type ApiCall = (ApiRequest, Reply, mpsc::Receiver<()>);

/// How long a request may wait for the main loop to take it up; then it is abandoned (never
/// executed) and answered 503 naming what holds the main loop (e.g. a service's call that
/// does not return). A request the main loop has taken up is waited for to its end.
const PICKUP_TIMEOUT: Duration = Duration::from_secs(10);

const WAITING: u8 = 0;
const CLAIMED: u8 = 1;
const ABANDONED: u8 = 2;

/// Where a request's answer goes. The main loop claims a request before executing it; the
/// API thread abandons one the main loop did not take up in time: whichever comes first
/// decides, so an abandoned request never runs late behind its client's back.
pub struct Reply {
    tx: Sender<ApiResult>,
    state: Arc<AtomicU8>,
}

impl Reply {
    /// Sends the answer.
    pub fn send(&self, r: ApiResult) -> Result<(), mpsc::SendError<ApiResult>> {
        self.tx.send(r)
    }

    /// The main loop takes the request up; false: its client gave up on it, skip it.
    pub fn claim(&self) -> bool {
        match self
            .state
            .compare_exchange(WAITING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(now) => now == CLAIMED,
        }
    }
}

/// What the main loop is doing, and since when (for the 503 of an abandoned request).
static BUSY: std::sync::Mutex<Option<(String, Instant)>> = std::sync::Mutex::new(None);

/// The main loop says what it is doing (None: waiting for work).
pub fn set_busy(what: Option<String>) {
    let mut b = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((done, since)) = &*b {
        // Requests wait while it works: a step this long is worth an operator's look.
        let took = since.elapsed();
        if took >= SLOW_STEP {
            tracing::warn!(
                "the main loop was busy with {done} for {:.1} s",
                took.as_secs_f64()
            );
        }
    }
    *b = what.map(|w| (w, Instant::now()));
}

/// A main-loop step this long is logged (requests wait [`PICKUP_TIMEOUT`] at most).
const SLOW_STEP: Duration = Duration::from_secs(2);

/// What the main loop is busy with and since when (None: waiting for work).
pub fn busy() -> Option<(String, Instant)> {
    BUSY.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A short description of a request, for [`set_busy`].
pub fn describe(req: &ApiRequest) -> String {
    match req {
        ApiRequest::PluginCall { name, method, .. } => {
            format!("service {name}'s call {method:?}")
        }
        ApiRequest::PluginAttach { path, .. } => format!("attaching {}", path.display()),
        ApiRequest::PluginDetach(name) => format!("detaching service {name}"),
        ApiRequest::PluginReplace { name, .. } => format!("replacing service {name}"),
        other => {
            let d = format!("{other:?}");
            d.split([' ', '(', '{'])
                .next()
                .unwrap_or("a request")
                .to_string()
        }
    }
}

fn busy_answer() -> (u16, String) {
    let b = BUSY.lock().unwrap_or_else(|p| p.into_inner());
    let what = match &*b {
        Some((w, since)) => format!("{w} (for {:.1} s)", since.elapsed().as_secs_f64()),
        None => "other requests".into(),
    };
    (
        503,
        format!(
            "the VMM's main loop is busy with {what}: this request was not started (it waited \
             {} s); retry later",
            PICKUP_TIMEOUT.as_secs()
        ),
    )
}

/// Binds the API socket with mode 0600. A stale socket (nobody listening) is replaced; a
/// live one is refused naming the process that serves it; anything else at the path (a
/// regular file, a directory) is never removed.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!(
            "{} exists and is not a socket: refusing to replace it (choose another \
             --api-socket path, or remove the file if it is not needed)",
            path.display()
        ),
        Ok(_) => match UnixStream::connect(path) {
            Ok(live) => {
                let who = peer_cred(&live)
                    .map(|c| format!("process {}", c.pid))
                    .unwrap_or_else(|_| "another process".into());
                bail!(
                    "API socket {} is in use by a running VMM ({who}): shut it down \
                     (`spanvmm ctl --api-socket {} shutdown`) or choose another path",
                    path.display(),
                    path.display()
                );
            }
            Err(_) => std::fs::remove_file(path)
                .with_context(|| format!("remove stale API socket {}", path.display()))?,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => bail!("API socket path {}: {e}", path.display()),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("bind API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(listener)
}

/// The peer's credentials (pid, uid, gid) of a connected Unix socket.
fn peer_cred(s: &UnixStream) -> std::io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and describe a `ucred`, which is what
    // SO_PEERCRED fills.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred)
}

/// Only the socket's owner (this process's user) and root may drive the VMM; the socket's
/// mode says so too, but a mode can be changed and a descriptor passed on.
fn peer_allowed(s: &UnixStream) -> Result<(), (u16, String)> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match peer_cred(s) {
        Ok(c) if c.uid == me || c.uid == 0 => Ok(()),
        Ok(c) => Err((
            403,
            format!(
                "uid {} may not use this VMM's API (it belongs to uid {me})",
                c.uid
            ),
        )),
        Err(e) => Err((403, format!("cannot tell who is calling: {e}"))),
    }
}

/// The API's accepting thread, which can be told to stop accepting: a live update's old
/// process must not take connections meant for the new one, which shares the listener.
pub struct Accepting {
    stop: Arc<AtomicBool>,
    stopped: mpsc::Receiver<()>,
}

impl Accepting {
    /// Stops accepting, returning once the accepting thread has left (it may be blocked in
    /// accept, so it is woken by connections of our own to `path`; one the other process
    /// takes instead is an empty connection it closes). False if it could not be confirmed.
    pub fn stop(&self, path: &Path) -> bool {
        self.stop_with(|| drop(UnixStream::connect(path)))
    }

    /// [`Accepting::stop`] for any listener: `wake` connects to it.
    pub fn stop_with(&self, wake: impl Fn()) -> bool {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..50 {
            if self.stopped.try_recv().is_ok() {
                return true;
            }
            wake();
            if self.stopped.recv_timeout(Duration::from_millis(20)).is_ok() {
                return true;
            }
        }
        false
    }
}

/// Serves the API on its own thread until told to stop, handing each request to `deliver`
/// (false: the VMM is shutting down).
pub fn serve<D>(listener: UnixListener, deliver: D, metrics: Arc<Metrics>) -> Accepting
where
    D: Fn(ApiCall) -> bool + Clone + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let (stopped_tx, stopped) = mpsc::channel();
    let stopping = stop.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            // Its connection threads inherit this filter (they are API threads too).
            base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Api);
            let open = Arc::new(AtomicUsize::new(0));
            for mut stream in listener.incoming().flatten() {
                if stopping.load(Ordering::SeqCst) {
                    let _ = stopped_tx.send(());
                    return;
                }
                if open.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    let _ = respond(
                        &mut stream,
                        Err((503, "too many open API connections".into())),
                    );
                    continue;
                }
                open.fetch_add(1, Ordering::SeqCst);
                let (deliver, mine, metrics) = (deliver.clone(), open.clone(), metrics.clone());
                // One thread per connection: a slow or silent client only delays itself.
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            let _ = handle_connection(stream, &deliver, &metrics);
                            mine.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .expect("cannot start the API thread");
    Accepting { stop, stopped }
}

fn handle_connection(
    stream: UnixStream,
    deliver: &impl Fn(ApiCall) -> bool,
    metrics: &Arc<Metrics>,
) -> std::io::Result<()> {
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut out = stream.try_clone()?;
    let mut written = None;
    let request = peer_allowed(&stream).and_then(|()| {
        read_request(DeadlineReader {
            stream,
            deadline: Instant::now() + CLIENT_TIMEOUT,
        })
    });
    let result = match request {
        // Scrapes are answered here, not by the main loop: a busy VMM still answers them.
        Ok((method, path, _)) if path == "/metrics" && method == "GET" => {
            return respond_text(&mut out, &metrics.scrape());
        }
        // So are notifications (they need no service): a stuck service's VMM still answers.
        Ok((method, path, _)) if method == "GET" && notifications_query(&path).is_some() => {
            let follow = notifications_query(&path) == Some(true);
            return match (metrics.manager(), follow) {
                (Some(m), true) => follow_notifications(&mut out, m),
                (Some(m), false) => respond(&mut out, Ok(json!(m.take_notifications()))),
                (None, _) => respond(
                    &mut out,
                    Err((503, "no VM yet: nothing publishes notifications".into())),
                ),
            };
        }
        Ok((method, path, body)) => match route(&method, &path, &body) {
            Ok(req) => {
                let (tx, rx) = mpsc::channel();
                let (written_tx, written_rx) = mpsc::channel();
                written = Some(written_tx);
                let state = Arc::new(AtomicU8::new(WAITING));
                let reply = Reply {
                    tx,
                    state: state.clone(),
                };
                let gone = || Err((503, "the VMM is shutting down".to_string()));
                if !deliver((req, reply, written_rx)) {
                    gone()
                } else {
                    match rx.recv_timeout(PICKUP_TIMEOUT) {
                        Ok(r) => r,
                        Err(mpsc::RecvTimeoutError::Disconnected) => gone(),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let abandoned = state
                                .compare_exchange(
                                    WAITING,
                                    ABANDONED,
                                    Ordering::AcqRel,
                                    Ordering::Acquire,
                                )
                                .is_ok();
                            if abandoned {
                                Err(busy_answer())
                            } else {
                                // Taken up meanwhile: it runs, wait for its answer.
                                rx.recv().unwrap_or_else(|_| gone())
                            }
                        }
                    }
                }
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let r = respond(&mut out, result);
    if let Some(w) = written {
        let _ = w.send(());
    }
    r
}

/// Clients following the notifications at once (each holds a connection).
const MAX_FOLLOWERS: usize = 4;
/// A follower gets an empty line this often while nothing is published: a client that went
/// away is noticed at the next write, and the client can tell a quiet VMM from a gone one.
const FOLLOW_HEARTBEAT: Duration = Duration::from_secs(5);
static FOLLOWERS: AtomicUsize = AtomicUsize::new(0);

/// `Some(follow)` when `path` is `/plugins/notifications[?follow=true]`.
fn notifications_query(path: &str) -> Option<bool> {
    let (base, query) = path.split_once('?').unwrap_or((path, ""));
    (base == "/plugins/notifications").then(|| {
        query
            .split('&')
            .any(|kv| matches!(kv, "follow" | "follow=true" | "follow=1"))
    })
}

/// `GET /plugins/notifications?follow=true`: a chunked stream of JSON lines, each a
/// notification as it is published (`{"seq":…,"service":…,"kind":…,"detail":{…},…}`) or
/// `{"dropped":{"service":N}}` when a service's full queue dropped some since the previous
/// line; an empty line every [`FOLLOW_HEARTBEAT`] while nothing happens. It takes what it
/// streams (a plain `GET` sees it no more), and runs until the client goes away.
fn follow_notifications(
    out: &mut UnixStream,
    manager: &l1_services::ServiceManager,
) -> std::io::Result<()> {
    if FOLLOWERS.fetch_add(1, Ordering::SeqCst) >= MAX_FOLLOWERS {
        FOLLOWERS.fetch_sub(1, Ordering::SeqCst);
        return respond(
            out,
            Err((
                503,
                format!("{MAX_FOLLOWERS} clients follow the notifications already"),
            )),
        );
    }
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            FOLLOWERS.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _leave = Leave;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    loop {
        let batch = manager.wait_notifications(FOLLOW_HEARTBEAT);
        let mut text = String::new();
        if !batch.dropped.is_empty() {
            text += &json!({ "dropped": batch.dropped }).to_string();
            text.push('\n');
        }
        for n in &batch.notifications {
            text += &serde_json::to_string(n).unwrap_or_default();
            text.push('\n');
        }
        if text.is_empty() {
            text.push('\n');
        }
        // One chunk holds whole lines.
        write!(out, "{:x}\r\n{text}\r\n", text.len())?;
        out.flush()?;
    }
}

fn respond(out: &mut impl Write, result: ApiResult) -> std::io::Result<()> {
    let (code, body) = match result {
        Ok(v) => (200, v),
        Err((code, msg)) => (code, json!({ "error": msg })),
    };
    let body = serde_json::to_vec(&body).unwrap_or_default();
    write!(
        out,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        body.len()
    )?;
    out.write_all(&body)
}

/// The OpenMetrics content type of a scrape.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn respond_text(out: &mut impl Write, text: &str) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: {OPENMETRICS}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    )?;
    out.write_all(text.as_bytes())
}

/// Binds the `--metrics-addr` listener (before the VM exists: a busy address fails start-up).
pub fn bind_metrics(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))
}

/// Serves `GET /metrics` over plain HTTP on `listener` on a thread of its own until told to
/// stop (a live update's old process, whose successor serves the same listener); returns the
/// address it is bound to.
pub fn serve_metrics(
    metrics: &Arc<Metrics>,
    listener: TcpListener,
) -> anyhow::Result<(SocketAddr, Accepting)> {
    let bound = listener.local_addr()?;
    let me = metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (stopped_tx, stopped) = mpsc::channel();
    let stopping = stop.clone();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            base_vmm::seccomp::enter_or_log(base_vmm::seccomp::Role::Metrics);
            for stream in listener.incoming().flatten() {
                if stopping.load(Ordering::SeqCst) {
                    let _ = stopped_tx.send(());
                    return;
                }
                serve_metrics_tcp(stream, &me);
            }
        })?;
    Ok((bound, Accepting { stop, stopped }))
}

/// Serves one plain-HTTP connection of the `--metrics-addr` listener: `GET /metrics` only.
fn serve_metrics_tcp(stream: TcpStream, metrics: &Arc<Metrics>) {
    let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let request = read_request(DeadlineReader {
        stream,
        deadline: Instant::now() + CLIENT_TIMEOUT,
    });
    let _ = match request {
        Ok((method, path, _)) if path == "/metrics" && method == "GET" => {
            respond_text(&mut out, &metrics.scrape())
        }
        Ok((_, path, _)) => respond(
            &mut out,
            Err((404, format!("only GET /metrics here, not {path}"))),
        ),
        Err(e) => respond(&mut out, Err(e)),
    };
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        408 => "Request Timeout",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A socket that can bound each read.
trait TimedRead: Read {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}

impl TimedRead for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
}

impl TimedRead for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
}

/// A socket read against one deadline for the whole request.
struct DeadlineReader<S> {
    stream: S,
    deadline: Instant,
}

impl<S: TimedRead> Read for DeadlineReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// An I/O error while reading a request: a missed deadline is the client's slowness.
fn read_error(e: std::io::Error) -> (u16, String) {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => (
            408,
            format!(
                "the request was not complete within {} s",
                CLIENT_TIMEOUT.as_secs()
            ),
        ),
        _ => (400, format!("cannot read request: {e}")),
    }
}

/// Parses one whole request (head and body) from `bytes` into an [`ApiRequest`], or the HTTP
/// error the server would answer: exactly what the server does with the bytes a client sends
/// (less the socket's deadline and peer check). The fuzz target `api_request` feeds it.
pub fn parse_request(bytes: &[u8]) -> Result<ApiRequest, (u16, String)> {
    let (method, path, body) = read_request(bytes)?;
    route(&method, &path, &body)
}

/// Reads one request: (method, path, body), enforcing size limits (and, through the reader,
/// the deadline).
fn read_request(stream: impl Read) -> Result<(String, String, Vec<u8>), (u16, String)> {
    let bad = |m: &str| (400, m.to_string());
    let mut reader = BufReader::new(stream);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(read_error)?;
        if n == 0 {
            return Err(bad("connection closed before the request was complete"));
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err((413, format!("request head exceeds {MAX_HEAD} bytes")));
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let head = String::from_utf8(head).map_err(|_| bad("request head is not UTF-8"))?;
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (method, path, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v)) => (m, p, v),
        _ => return Err(bad("malformed request line")),
    };
    if !version.starts_with("HTTP/1.") {
        return Err(bad("only HTTP/1.x is spoken here"));
    }
    let mut content_length = 0usize;
    for h in lines {
        if let Some((name, value)) = h.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                content_length = value
                    .trim()
                    .parse()
                    .map_err(|_| bad("invalid Content-Length"))?;
            }
            if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("chunked bodies are not supported; send Content-Length"));
            }
        }
    }
    if content_length > MAX_BODY {
        return Err((413, format!("body exceeds {MAX_BODY} bytes")));
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => bad(&format!("body shorter than Content-Length: {e}")),
        _ => read_error(e),
    })?;
    Ok((method.to_string(), path.to_string(), body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_requests_and_refuses_broken_ones() {
        let ok = b"PUT /vm/save HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"dir\":\"/x\"}";
        assert!(matches!(parse_request(ok), Ok(ApiRequest::Save(_))));
        assert!(matches!(
            parse_request(b"GET /vm HTTP/1.0\n\n"),
            Ok(ApiRequest::Status)
        ));
        let code = |b: &[u8]| parse_request(b).unwrap_err().0;
        assert_eq!(code(b""), 400);
        assert_eq!(code(b"GET /vm HTTP/1.1\r\n"), 400); // no end of head
        assert_eq!(code(b"GET /vm\r\n\r\n"), 400);
        assert_eq!(code(b"GET /vm SPDY/3\r\n\r\n"), 400);
        assert_eq!(code(b"GET /vm HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            code(b"PUT /vm/save HTTP/1.1\r\nContent-Length: 99\r\n\r\n{}"),
            400
        );
        assert_eq!(
            code(b"PUT /vm/save HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            code(b"PUT /vm/save HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            413
        );
        let mut long = b"GET /vm HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 10, b'a');
        assert_eq!(code(&long), 413);
        assert_eq!(code(b"GET /vm HTTP/1.1\r\nX: \xff\r\n\r\n"), 400);
    }
}
