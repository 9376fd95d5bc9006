//! WASI Preview 2 for Wasm services, deny-by-default: what standard toolchains (wasm32-wasip2,
//! componentize-py, ComponentizeJS) import, with nothing that reaches past the service.
//!
//! Granted: clocks, random, stdout/stderr (into the VMM's log, line by line, under the
//! service's name). Refused with an error the guest code sees: files (no preopened
//! directories), sockets and name lookup, environment variables, arguments (none), stdin
//! (closed). The capability manifest stays the only way to reach the VM.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use spanvmm_sdk::LogLevel;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use crate::ctx::{lock, ServiceCtx};

/// Longest line kept before it is logged in pieces: a service printing without a newline
/// must not grow the VMM's memory.
pub(crate) const MAX_LINE: usize = 4096;

/// The WASI state of one service's store.
pub(crate) struct WasiState {
    pub(crate) ctx: WasiCtx,
    pub(crate) table: ResourceTable,
}

/// A fresh deny-by-default WASI context whose stdout and stderr log as `ctx`'s service.
pub(crate) fn deny_by_default(ctx: &Arc<ServiceCtx>) -> WasiState {
    let mut b = WasiCtxBuilder::new();
    // These are the builder's defaults too; stated so that a default changing upstream does
    // not open anything.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .stdout(LogStream::new(ctx, LogLevel::Info))
        .stderr(LogStream::new(ctx, LogLevel::Warn));
    WasiState {
        ctx: b.build(),
        table: ResourceTable::new(),
    }
}

/// stdout or stderr of a service: complete lines go to the service log (as `host::log`).
#[derive(Clone)]
pub(crate) struct LogStream {
    ctx: Arc<ServiceCtx>,
    level: LogLevel,
    /// The unfinished line, at most `MAX_LINE` bytes. Shared by every stream handle of the
    /// same output, as WASI asks (they write to one logical place).
    line: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    fn new(ctx: &Arc<ServiceCtx>, level: LogLevel) -> Self {
        LogStream {
            ctx: ctx.clone(),
            level,
            line: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn emit(&self, bytes: &[u8]) {
        let s = String::from_utf8_lossy(bytes);
        self.ctx.log(self.level, s.trim_end_matches('\r'));
    }

    /// Appends `bytes`, logging each complete line and each `MAX_LINE` piece of a longer one.
    pub(crate) fn push(&self, mut bytes: &[u8]) {
        let mut line = lock(&self.line);
        while !bytes.is_empty() {
            let room = MAX_LINE - line.len();
            let take = bytes.len().min(room);
            match memchr::memchr(b'\n', &bytes[..take]) {
                Some(i) => {
                    line.extend_from_slice(&bytes[..i]);
                    self.emit(&line);
                    line.clear();
                    bytes = &bytes[i + 1..];
                }
                None => {
                    line.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if line.len() == MAX_LINE {
                        self.emit(&line);
                        line.clear();
                    }
                }
            }
        }
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        // The last handle gone (the store dropped): log what is left of an unfinished line.
        if Arc::strong_count(&self.line) == 1 {
            let line = std::mem::take(&mut *lock(&self.line));
            if !line.is_empty() {
                self.emit(&line);
            }
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always writable: every write is consumed at once (logged or kept in a bounded line).
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
