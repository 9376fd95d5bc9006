//! The VMM's log: `tracing` events from every crate (targets `vmm` (this crate), `base_vmm`,
//! `l1_services`, and `spanvmm::service` with a `service` field for what services log through
//! `host::log`), written as text or JSON lines to stderr or a file. The main loop's events
//! carry the VM's id (a `vm` span). A live update's new process gets the same settings.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (fields, span, target, level, timestamp).
    Json,
}

/// `spanvmm run`'s logging options.
#[derive(Args, Clone, Debug, Default)]
pub struct LogOptions {
    /// The VM's name in the log (default: the API socket's file name, else `vm-PID`).
    #[arg(long)]
    pub id: Option<String>,
    /// What to log: a level (error, warn, info, debug, trace) or filter directives, e.g.
    /// `info,spanvmm::service=debug` (default: $SPANVMM_LOG, else info).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Append the log to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

/// The options in force, for a live update's new process.
static IN_FORCE: OnceLock<LogOptions> = OnceLock::new();

/// Installs the subscriber once per process. Fails on a bad filter or an unwritable file,
/// before anything else happens.
pub fn init(opts: &LogOptions) -> anyhow::Result<()> {
    let directives = opts
        .log_level
        .clone()
        .or_else(|| std::env::var("SPANVMM_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = EnvFilter::builder()
        .parse(&directives)
        .with_context(|| format!("--log-level {directives:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_thread_names(true);
    let installed = match (&opts.log_file, opts.log_format) {
        (Some(path), format) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--log-file {}", path.display()))?;
            let b = builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file));
            match format {
                LogFormat::Text => b.try_init(),
                LogFormat::Json => b.json().try_init(),
            }
        }
        (None, LogFormat::Text) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .try_init(),
        (None, LogFormat::Json) => builder.with_writer(std::io::stderr).json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    let _ = IN_FORCE.set(opts.clone());
    Ok(())
}

/// The command-line arguments that give another spanvmm process the same log.
pub fn args() -> Vec<String> {
    let Some(o) = IN_FORCE.get() else {
        return Vec::new();
    };
    let mut a = Vec::new();
    if let Some(id) = &o.id {
        a.extend(["--id".to_string(), id.clone()]);
    }
    if let Some(l) = &o.log_level {
        a.extend(["--log-level".to_string(), l.clone()]);
    }
    if o.log_format == LogFormat::Json {
        a.extend(["--log-format".to_string(), "json".to_string()]);
    }
    if let Some(f) = &o.log_file {
        a.extend(["--log-file".to_string(), f.display().to_string()]);
    }
    a
}
