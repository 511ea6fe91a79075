//! The public listener's settings: who may post (secrets), how much and how fast, which
//! timestamps count, and TLS. Each is declared once, here; see [`crate::config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::sources::{named_sources, Source, DEFAULT_SEGMENT};
use crate::config::{ConfigError, Secret, Setting, Spec, Values};

pub const WEBHOOK_SECRET: Setting<Vec<Secret>> = Setting::new(
    Spec::new(
        "webhook_secret",
        "KALLINA_WEBHOOK_SECRET",
        "webhook secrets, newest first (several: comma-separated, during a rotation)",
    )
    .secret()
    .list()
    .note("required, here or in `webhook_secret_file`"),
    |f| {
        Ok(f.optional()
            .into_iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect())
    },
);
pub const WEBHOOK_SECRET_FILE: Setting<Option<PathBuf>> = Setting::new(
    Spec::new(
        "webhook_secret_file",
        "KALLINA_WEBHOOK_SECRET_FILE",
        "file of webhook secrets, one per line, newest first",
    ),
    |f| f.optional_path(),
);
pub const LISTEN: Setting<SocketAddr> = Setting::new(
    Spec::new("listen", "KALLINA_RELAY_LISTEN", "public listener address")
        .default("0.0.0.0:8080")
        .flag(),
    |f| f.socket_addr(),
);
pub const MAX_BODY: Setting<usize> = Setting::new(
    Spec::new(
        "max_body",
        "KALLINA_RELAY_MAX_BODY",
        "largest accepted body",
    )
    .default("1MiB")
    .flag(),
    |f| f.bytes(1, 64 << 20).map(|n| n as usize),
);
pub const MAX_INFLIGHT_BODY: Setting<usize> = Setting::new(
    Spec::new(
        "max_inflight_body",
        "KALLINA_RELAY_MAX_INFLIGHT_BODY",
        "bytes of request bodies held at once across all connections; past it, 503",
    )
    .default("48MiB")
    .note("at least `max_body`; an eighth is kept for bodies of at most 64 KiB"),
    |f| f.bytes(1 << 20, 16 << 30).map(|n| n as usize),
);
pub const BODY_TIMEOUT: Setting<Duration> = Setting::new(
    Spec::new(
        "body_timeout",
        "KALLINA_RELAY_BODY_TIMEOUT",
        "time a client may take to send its whole body",
    )
    .default("10s"),
    |f| f.positive_duration(),
);
pub const MAX_CONNECTIONS: Setting<usize> = Setting::new(
    Spec::new(
        "max_connections",
        "KALLINA_RELAY_MAX_CONNECTIONS",
        "open public connections at most; more wait in the listen backlog",
    )
    .default("10000"),
    |f| f.integer(2, 1_000_000).map(|n| n as usize),
);
pub const TOLERANCE: Setting<Duration> = Setting::new(
    Spec::new(
        "tolerance",
        "KALLINA_RELAY_TOLERANCE",
        "how old a signed `timestamp` may be",
    )
    .default("24h")
    .flag(),
    |f| f.duration(),
);
pub const FUTURE_SKEW: Setting<Duration> = Setting::new(
    Spec::new(
        "future_skew",
        "KALLINA_RELAY_FUTURE_SKEW",
        "how far in the future a signed `timestamp` may be",
    )
    .default("5m")
    .flag(),
    |f| f.duration(),
);
pub const ID_HEADER: Setting<Option<String>> = Setting::new(
    Spec::new(
        "id_header",
        "KALLINA_RELAY_ID_HEADER",
        "header whose value is a second dedup key beside the body's SHA-256",
    )
    .flag()
    .note("unset: the SHA-256 of the body is the only key"),
    |f| match f.optional() {
        None => Ok(None),
        Some(v) if actix_web::http::header::HeaderName::try_from(v).is_ok() => {
            Ok(Some(v.to_ascii_lowercase()))
        }
        Some(_) => Err(f.invalid("an HTTP header name such as X-Kallina-Delivery")),
    },
);
pub const SOURCE: Setting<String> = Setting::new(
    Spec::new(
        "source",
        "KALLINA_RELAY_SOURCE",
        "source name, sent as the `x-source` header",
    )
    .default("kallina-relay")
    .flag(),
    |f| f.short_string(),
);
pub const SOURCES: Setting<Option<toml::Value>> = Setting::new(
    Spec::file_only(
        "sources",
        "more sources, each at `POST /webhooks/<name>`: `[[sources]]` with `name`, `secrets` \
         (newest first) or `secret_file`, and optionally `tolerance`",
    )
    .note("none: only `/webhooks/kallina`"),
    |f| Ok(f.raw_table()),
);
pub const TLS_CERT: Setting<Option<PathBuf>> = Setting::new(
    Spec::new(
        "tls_cert",
        "KALLINA_RELAY_TLS_CERT",
        "PEM certificate chain for TLS on the public listener",
    )
    .note("unset: plain HTTP (for a terminating proxy); both `tls_cert` and `tls_key` or neither"),
    |f| f.optional_path(),
);
pub const TLS_KEY: Setting<Option<PathBuf>> = Setting::new(
    Spec::new(
        "tls_key",
        "KALLINA_RELAY_TLS_KEY",
        "PEM private key for TLS on the public listener",
    )
    .note("unset: plain HTTP; both or neither"),
    |f| f.optional_path(),
);

/// Every setting of this stage, in the order the README lists them.
pub const SETTINGS: &[&Spec] = &[
    &WEBHOOK_SECRET.spec,
    &WEBHOOK_SECRET_FILE.spec,
    &LISTEN.spec,
    &MAX_BODY.spec,
    &MAX_INFLIGHT_BODY.spec,
    &BODY_TIMEOUT.spec,
    &MAX_CONNECTIONS.spec,
    &TOLERANCE.spec,
    &FUTURE_SKEW.spec,
    &ID_HEADER.spec,
    &SOURCE.spec,
    &SOURCES.spec,
    &TLS_CERT.spec,
    &TLS_KEY.spec,
];

/// How the public listener runs.
#[derive(Debug, Clone)]
pub struct IngressOptions {
    /// Who may post, and where: the default source (when a webhook secret is configured)
    /// first, then the file's `[[sources]]`. At least one.
    pub sources: Vec<Source>,
    pub listen: SocketAddr,
    pub max_body: usize,
    /// Bytes of request bodies held at once, across every connection.
    pub max_inflight_body: usize,
    /// How long a client may take to send its whole body.
    pub body_timeout: Duration,
    /// Open connections on the public listener at most (new ones wait in the backlog).
    pub max_connections: usize,
    /// The default source's tolerance, and that of named sources that set none.
    pub tolerance: Duration,
    pub future_skew: Duration,
    pub id_header: Option<String>,
    /// The default source's name: its `x-source` header on published messages.
    pub source: String,
    /// Certificate chain and private key (PEM) to serve the public listener over TLS.
    pub tls: Option<TlsFiles>,
}

/// PEM files for the public listener's TLS; read at start so that a bad file stops the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl IngressOptions {
    pub fn from_values(values: &Values) -> Result<Self, ConfigError> {
        let max_body = values.get(&MAX_BODY)?;
        let max_inflight_body = values.get(&MAX_INFLIGHT_BODY)?;
        // A body of the largest accepted size must fit the budget with room beside it.
        if max_inflight_body < max_body {
            return Err(values
                .field(&MAX_INFLIGHT_BODY.spec)
                .invalid(format!("a size of at least max_body ({max_body} bytes)")));
        }
        let tolerance = values.get(&TOLERANCE)?;
        let source = values.get(&SOURCE)?;
        Ok(Self {
            sources: sources(values, &source, tolerance)?,
            listen: values.get(&LISTEN)?,
            max_body,
            max_inflight_body,
            body_timeout: values.get(&BODY_TIMEOUT)?,
            max_connections: values.get(&MAX_CONNECTIONS)?,
            tolerance,
            future_skew: values.get(&FUTURE_SKEW)?,
            id_header: values.get(&ID_HEADER)?,
            source,
            tls: tls(values)?,
        })
    }

    /// The longest tolerance of any source: the replay window dedup retention must cover.
    pub fn max_tolerance(&self) -> Duration {
        self.sources
            .iter()
            .map(|s| s.tolerance)
            .max()
            .unwrap_or(self.tolerance)
    }

    /// The source served at `/webhooks/kallina`, if any.
    pub fn default_source(&self) -> Option<&Source> {
        self.sources.iter().find(|s| s.segment() == DEFAULT_SEGMENT)
    }

    /// The source of this name (the default source by its `source` name).
    pub fn source_named(&self, name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| s.name == name)
    }
}

/// Both TLS files or neither.
fn tls(values: &Values) -> Result<Option<TlsFiles>, ConfigError> {
    Ok(values
        .both_or_neither(
            (&TLS_CERT, "a PEM certificate file"),
            (&TLS_KEY, "a PEM private key file"),
        )?
        .map(|(cert, key)| TlsFiles { cert, key }))
}

/// The default source when a webhook secret is configured, then the file's `[[sources]]`;
/// at least one, and no two on one path or of one name.
fn sources(values: &Values, name: &str, tolerance: Duration) -> Result<Vec<Source>, ConfigError> {
    let field = values.field(&SOURCES.spec);
    let named = match values.get(&SOURCES)? {
        None => Vec::new(),
        Some(tables) => named_sources(tables, tolerance).map_err(|e| field.file_error(e))?,
    };
    let secrets = secrets(values)?;
    let mut all = Vec::with_capacity(named.len() + 1);
    if !secrets.is_empty() {
        all.push(Source {
            name: name.to_string(),
            secrets,
            tolerance,
            default: true,
        });
    } else if named.is_empty() {
        return Err(ConfigError::MissingSecret);
    }
    for source in named {
        if let Some(clash) = all
            .iter()
            .find(|s| s.name == source.name || s.segment() == source.segment())
        {
            return Err(field.file_error(format!(
                "[[sources]]: `{}` clashes with the default source (`source` = `{}`, served at \
                 /webhooks/{DEFAULT_SEGMENT}): rename one",
                source.name, clash.name
            )));
        }
        all.push(source);
    }
    Ok(all)
}

/// The default source's secrets: the inline list first, then the file's lines.
fn secrets(values: &Values) -> Result<Vec<Secret>, ConfigError> {
    let mut secrets = values.get(&WEBHOOK_SECRET)?;
    if let Some(path) = values.get(&WEBHOOK_SECRET_FILE)? {
        let text = std::fs::read_to_string(&path).map_err(|e| {
            values
                .field(&WEBHOOK_SECRET_FILE.spec)
                .invalid(format!("a readable file with one secret per line ({e})"))
        })?;
        secrets.extend(
            text.lines()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
        );
    }
    Ok(secrets)
}
