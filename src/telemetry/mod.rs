//! Structured logs through `tracing`: human-readable on a terminal, JSON lines elsewhere (or
//! as configured), level from `RUST_LOG` (default `info`). Nothing logs a secret or a body.
//! A request's lines carry its `trace_id`; spans go to an OTLP collector when one is set
//! ([`spans`]).

pub mod spans;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub use spans::{FinishedSpan, OtlpOptions, Spans};

use crate::config::{ConfigError, Setting, Spec, Values};

/// Log output: human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

pub const LOG_FORMAT: Setting<Option<LogFormat>> = Setting::new(
    Spec::new(
        "log_format",
        "KALLINA_RELAY_LOG_FORMAT",
        "log format, `pretty` or `json`; the level comes from `RUST_LOG`",
    )
    .flag()
    .note("`pretty` on a terminal, else `json`"),
    |f| match f.optional() {
        None => Ok(None),
        Some("pretty") => Ok(Some(LogFormat::Pretty)),
        Some("json") => Ok(Some(LogFormat::Json)),
        Some(_) => Err(f.invalid("`pretty` or `json`")),
    },
);

/// The process-wide settings of this module, in the README's order.
pub const SETTINGS: &[&Spec] = &[
    &LOG_FORMAT.spec,
    &spans::OTLP_ENDPOINT.spec,
    &spans::OTLP_PROTOCOL.spec,
];

/// Where spans are exported, when `otlp_endpoint` is set.
pub fn otlp_options(values: &Values) -> Result<Option<OtlpOptions>, ConfigError> {
    let protocol = values.get(&spans::OTLP_PROTOCOL)?;
    Ok(values
        .get(&spans::OTLP_ENDPOINT)?
        .map(|endpoint| OtlpOptions { endpoint, protocol }))
}

/// Installs the global subscriber, writing to standard error. Safe to call more than once
/// (later calls are ignored), which tests rely on.
pub fn init(format: Option<LogFormat>) {
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
