//! The command line: `serve` (the default) and `sign`.
//!
//! Flags are the top layer of the configuration: each `serve` flag overrides the file and the
//! environment for its one setting (see [`crate::config`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Layers, Settings};
use crate::signature;

#[derive(Debug, Parser)]
#[command(
    name = "kallina-relay",
    version,
    about = "Receives Kallina.ai webhooks, stores them durably and relays them to RabbitMQ"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook receiver and relay (the default).
    Serve(Box<ServeArgs>),
    /// Print the X-Kallina-Signature value for a file (or standard input), as the platform would.
    Sign(SignArgs),
}

/// Settings flags; each overrides the same setting from the file and the environment.
#[derive(Debug, Args, Default, Clone)]
pub struct ServeArgs {
    /// TOML configuration file (also KALLINA_RELAY_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Public listener address, e.g. 0.0.0.0:8080.
    #[arg(long)]
    pub listen: Option<String>,
    /// Admin listener address (metrics, health), e.g. 127.0.0.1:9090.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// Data directory of the store.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Largest accepted body: bytes, or 256KiB, 1MiB.
    #[arg(long)]
    pub max_body: Option<String>,
    /// How old a signed timestamp may be, e.g. 24h.
    #[arg(long)]
    pub tolerance: Option<String>,
    /// How far in the future a signed timestamp may be, e.g. 5m.
    #[arg(long)]
    pub future_skew: Option<String>,
    /// How long dedup keys are kept, e.g. 72h.
    #[arg(long)]
    pub dedup_retention: Option<String>,
    /// Most events waiting for the broker before new ones get 503.
    #[arg(long)]
    pub outbox_max: Option<String>,
    /// Header whose value is the dedup key when present.
    #[arg(long)]
    pub id_header: Option<String>,
    /// `pretty` or `json`.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Topic exchange events are published to.
    #[arg(long)]
    pub exchange: Option<String>,
    /// Alternate exchange (and queue) for events no queue is bound for.
    #[arg(long)]
    pub unrouted_exchange: Option<String>,
    /// Value of the `x-source` header on published messages.
    #[arg(long)]
    pub source: Option<String>,
    /// Most publishes awaiting a confirm at once.
    #[arg(long)]
    pub publish_window: Option<String>,
    /// Limit for each broker confirm (and every other broker await), e.g. 30s.
    #[arg(long)]
    pub confirm_timeout: Option<String>,
    /// How long shutdown waits for in-flight requests and confirms, e.g. 10s.
    #[arg(long)]
    pub shutdown_grace: Option<String>,
}

impl ServeArgs {
    /// The flag layer of the configuration, by setting name.
    pub fn flags(&self) -> BTreeMap<&'static str, String> {
        let pairs = [
            ("listen", &self.listen),
            ("admin_listen", &self.admin_listen),
            ("data_dir", &self.data_dir),
            ("max_body", &self.max_body),
            ("tolerance", &self.tolerance),
            ("future_skew", &self.future_skew),
            ("dedup_retention", &self.dedup_retention),
            ("outbox_max", &self.outbox_max),
            ("id_header", &self.id_header),
            ("log_format", &self.log_format),
            ("exchange", &self.exchange),
            ("unrouted_exchange", &self.unrouted_exchange),
            ("source", &self.source),
            ("publish_window", &self.publish_window),
            ("confirm_timeout", &self.confirm_timeout),
            ("shutdown_grace", &self.shutdown_grace),
        ];
        pairs
            .into_iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
            .collect()
    }

    /// All layers merged and validated.
    pub fn settings(&self) -> Result<Settings, crate::config::ConfigError> {
        Settings::load(&Layers::from_process(self.config.as_deref(), self.flags())?)
    }
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// File to sign; standard input when absent or `-`.
    pub file: Option<PathBuf>,
    /// Webhook secret (else the first of KALLINA_WEBHOOK_SECRET).
    #[arg(long, env = "KALLINA_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: String,
}

/// `kallina-relay sign`: the header value for the given bytes.
pub fn sign(args: &SignArgs) -> anyhow::Result<String> {
    let body = match args.file.as_deref() {
        None => read_stdin()?,
        Some(p) if p.as_os_str() == "-" => read_stdin()?,
        Some(p) => {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?
        }
    };
    // The environment may hold a rotation list; the platform signs with the first (newest).
    let secret = args
        .secret
        .split(',')
        .map(str::trim)
        .next()
        .unwrap_or_default();
    anyhow::ensure!(
        !secret.is_empty(),
        "the secret is empty: pass --secret or set KALLINA_WEBHOOK_SECRET"
    );
    Ok(signature::sign(secret.as_bytes(), &body))
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body)?;
    Ok(body)
}
