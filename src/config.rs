//! Settings, layered: defaults < TOML file < environment < command-line flags.
//!
//! Every layer is reduced to the same shape (setting name → text) before anything is parsed,
//! so one parser per setting validates a value whatever layer it came from, and a bad value
//! stops the start with one line naming the setting, the value and what was expected. Secret
//! values never reach that line, a log or a `Debug` print: they live in [`Secret`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Environment variable naming the TOML configuration file (same as `--config`).
pub const CONFIG_FILE_ENV: &str = "KALLINA_RELAY_CONFIG";

/// One setting: its name in the TOML file, its environment variable, and its default.
struct Spec {
    key: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    secret: bool,
}

const SPECS: &[Spec] = &[
    spec("webhook_secret", "KALLINA_WEBHOOK_SECRET", None, true),
    spec(
        "webhook_secret_file",
        "KALLINA_WEBHOOK_SECRET_FILE",
        None,
        false,
    ),
    spec(
        "listen",
        "KALLINA_RELAY_LISTEN",
        Some("0.0.0.0:8080"),
        false,
    ),
    spec(
        "admin_listen",
        "KALLINA_RELAY_ADMIN_LISTEN",
        Some("127.0.0.1:9090"),
        false,
    ),
    spec("data_dir", "KALLINA_RELAY_DATA_DIR", Some("./data"), false),
    spec("max_body", "KALLINA_RELAY_MAX_BODY", Some("1MiB"), false),
    spec(
        "body_timeout",
        "KALLINA_RELAY_BODY_TIMEOUT",
        Some("10s"),
        false,
    ),
    spec(
        "max_connections",
        "KALLINA_RELAY_MAX_CONNECTIONS",
        Some("10000"),
        false,
    ),
    spec("tolerance", "KALLINA_RELAY_TOLERANCE", Some("24h"), false),
    spec(
        "future_skew",
        "KALLINA_RELAY_FUTURE_SKEW",
        Some("5m"),
        false,
    ),
    spec(
        "dedup_retention",
        "KALLINA_RELAY_DEDUP_RETENTION",
        Some("72h"),
        false,
    ),
    spec(
        "outbox_max",
        "KALLINA_RELAY_OUTBOX_MAX",
        Some("1000000"),
        false,
    ),
    spec("id_header", "KALLINA_RELAY_ID_HEADER", None, false),
    spec("log_format", "KALLINA_RELAY_LOG_FORMAT", None, false),
    spec(
        "cache_size",
        "KALLINA_RELAY_CACHE_SIZE",
        Some("64MiB"),
        false,
    ),
    spec(
        "sweep_interval",
        "KALLINA_RELAY_SWEEP_INTERVAL",
        Some("60s"),
        false,
    ),
    spec(
        "source",
        "KALLINA_RELAY_SOURCE",
        Some("kallina-relay"),
        false,
    ),
    spec(
        "amqp_url",
        "KALLINA_RELAY_AMQP_URL",
        Some("amqp://guest:guest@127.0.0.1:5672/%2f"),
        true,
    ),
    spec(
        "exchange",
        "KALLINA_RELAY_EXCHANGE",
        Some("kallina.events"),
        false,
    ),
    spec(
        "unrouted_exchange",
        "KALLINA_RELAY_UNROUTED_EXCHANGE",
        Some("kallina.unrouted"),
        false,
    ),
    spec(
        "publish_window",
        "KALLINA_RELAY_PUBLISH_WINDOW",
        Some("256"),
        false,
    ),
    spec(
        "confirm_timeout",
        "KALLINA_RELAY_CONFIRM_TIMEOUT",
        Some("30s"),
        false,
    ),
    spec(
        "shutdown_grace",
        "KALLINA_RELAY_SHUTDOWN_GRACE",
        Some("10s"),
        false,
    ),
    spec(
        "archive_retention",
        "KALLINA_RELAY_ARCHIVE_RETENTION",
        None,
        false,
    ),
    spec("admin_token", "KALLINA_RELAY_ADMIN_TOKEN", None, true),
    spec(
        "redrive_rate",
        "KALLINA_RELAY_REDRIVE_RATE",
        Some("500"),
        false,
    ),
    spec("tls_cert", "KALLINA_RELAY_TLS_CERT", None, false),
    spec("tls_key", "KALLINA_RELAY_TLS_KEY", None, false),
];

const fn spec(
    key: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    secret: bool,
) -> Spec {
    Spec {
        key,
        env,
        default,
        secret,
    }
}

/// A value that must never be printed: webhook secrets, the AMQP URL (it holds a password).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The only way to read the value: callers that need it say so by name.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Log output: human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// RabbitMQ queue type of a consumer queue declared from the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Classic,
    Quorum,
}

/// A consumer queue the relay declares and binds at start: `[[queues]]` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub name: String,
    #[serde(default)]
    pub bindings: Vec<String>,
    #[serde(default = "classic", rename = "type")]
    pub queue_type: QueueType,
}

fn classic() -> QueueType {
    QueueType::Classic
}

/// The validated settings the service runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Webhook secrets, tried in order; several at once during a rotation.
    pub secrets: Vec<Secret>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub max_body: usize,
    /// How long a client may take to send its whole body.
    pub body_timeout: Duration,
    /// Open connections on the public listener at most (new ones wait in the backlog).
    pub max_connections: usize,
    pub tolerance: Duration,
    pub future_skew: Duration,
    pub dedup_retention: Duration,
    pub outbox_max: u64,
    pub id_header: Option<String>,
    pub log_format: Option<LogFormat>,
    pub cache_size: u64,
    pub sweep_interval: Duration,
    pub source: String,
    pub amqp_url: Secret,
    pub exchange: String,
    pub unrouted_exchange: String,
    pub publish_window: usize,
    pub confirm_timeout: Duration,
    pub shutdown_grace: Duration,
    pub queues: Vec<QueueSpec>,
    /// How long published events stay in the archive for the admin API (zero: not kept).
    pub archive_retention: Duration,
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub admin_token: Option<Secret>,
    /// Events per second a redrive republishes at most.
    pub redrive_rate: u32,
    /// Certificate chain and private key (PEM) to serve the public listener over TLS.
    pub tls: Option<TlsFiles>,
}

/// PEM files for the public listener's TLS; read at start so that a bad file stops the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the settings were refused: one line for the operator.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("setting `{setting}` ({env}) = {value:?} is invalid: expected {expected}")]
    Invalid {
        setting: &'static str,
        env: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "no webhook secret is configured: set KALLINA_WEBHOOK_SECRET (several: comma-separated) \
         or KALLINA_WEBHOOK_SECRET_FILE (one secret per line), or `webhook_secret` in the file"
    )]
    MissingSecret,
    #[error("configuration file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Where the values come from, lowest precedence first. Tests build one by hand.
#[derive(Debug, Default, Clone)]
pub struct Layers {
    /// Contents of the TOML file, if any, and its path (for messages).
    pub file: Option<(PathBuf, String)>,
    /// Environment variables (name → value).
    pub env: BTreeMap<String, String>,
    /// Command-line flags, by setting name (`listen`, `data_dir`, …).
    pub flags: BTreeMap<&'static str, String>,
}

impl Layers {
    /// The process environment, with the file named by `--config` or `KALLINA_RELAY_CONFIG`.
    pub fn from_process(
        config_path: Option<&Path>,
        flags: BTreeMap<&'static str, String>,
    ) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("KALLINA_"))
            .collect();
        let path = config_path
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Some((path, text))
            }
            None => None,
        };
        Ok(Self { file, env, flags })
    }
}

impl Settings {
    /// Merge the layers and validate every value.
    pub fn load(layers: &Layers) -> Result<Self, ConfigError> {
        let (merged, queues) = merge(layers)?;
        let get = |key: &str| merged.get(key).map(String::as_str);
        let parse = |key: &'static str| Field::new(key, get(key));

        let secrets = secrets(get("webhook_secret"), get("webhook_secret_file"))?;
        let tolerance = parse("tolerance").duration()?;
        let future_skew = parse("future_skew").duration()?;
        let dedup_retention = parse("dedup_retention").duration()?;
        // Saturating: durations near u64::MAX seconds are valid input and must not overflow.
        let window = tolerance.saturating_add(future_skew);
        if dedup_retention < window {
            return Err(parse("dedup_retention").invalid(format!(
                "a duration of at least tolerance + future skew ({}), so that a replay inside \
                 the tolerance window is always recognised as a duplicate",
                format_duration(window)
            )));
        }
        let amqp_url = parse("amqp_url").required()?;
        if let Err(reason) = amqp_url.parse::<lapin::uri::AMQPUri>() {
            return Err(parse("amqp_url").invalid(format!("an amqp:// or amqps:// URL ({reason})")));
        }
        let archive_retention = match get("archive_retention") {
            None => dedup_retention,
            Some(_) => parse("archive_retention").duration()?,
        };
        // An archived event is found by its id through its dedup key.
        if archive_retention > dedup_retention {
            return Err(parse("archive_retention").invalid(format!(
                "a duration of at most the dedup retention ({}): events are looked up by \
                 their dedup key",
                format_duration(dedup_retention)
            )));
        }
        let admin_token = match get("admin_token").map(str::trim) {
            None | Some("") => None,
            Some(token) if token.len() < 16 => {
                return Err(parse("admin_token").invalid("a token of at least 16 characters".into()))
            }
            Some(token) => Some(Secret::new(token)),
        };
        let tls = match (get("tls_cert"), get("tls_key")) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: PathBuf::from(parse("tls_cert").non_empty().map(|_| cert)?),
                key: PathBuf::from(parse("tls_key").non_empty().map(|_| key)?),
            }),
            (Some(_), None) => {
                return Err(parse("tls_key")
                    .invalid("a PEM private key file, since tls_cert is set".into()))
            }
            (None, Some(_)) => {
                return Err(parse("tls_cert")
                    .invalid("a PEM certificate file, since tls_key is set".into()))
            }
        };
        let settings = Settings {
            archive_retention,
            admin_token,
            redrive_rate: parse("redrive_rate").integer(1, 1_000_000)? as u32,
            tls,
            secrets,
            listen: parse("listen").socket_addr()?,
            admin_listen: parse("admin_listen").socket_addr()?,
            data_dir: PathBuf::from(parse("data_dir").non_empty()?),
            max_body: parse("max_body").bytes(1, 64 << 20)? as usize,
            body_timeout: parse("body_timeout").duration()?,
            max_connections: parse("max_connections").integer(2, 1_000_000)? as usize,
            tolerance,
            future_skew,
            dedup_retention,
            outbox_max: parse("outbox_max").integer(1, u64::MAX)?,
            id_header: parse("id_header").optional_header_name()?,
            log_format: parse("log_format").log_format()?,
            cache_size: parse("cache_size").bytes(1 << 20, 1 << 40)?,
            sweep_interval: parse("sweep_interval").duration()?,
            source: parse("source").short_string()?,
            amqp_url: Secret::new(amqp_url),
            exchange: parse("exchange").short_string()?,
            unrouted_exchange: parse("unrouted_exchange").short_string()?,
            publish_window: parse("publish_window").integer(1, 65_535)? as usize,
            confirm_timeout: parse("confirm_timeout").duration()?,
            shutdown_grace: parse("shutdown_grace").duration()?,
            queues,
        };
        let zero = [
            ("sweep_interval", settings.sweep_interval),
            ("confirm_timeout", settings.confirm_timeout),
            ("body_timeout", settings.body_timeout),
        ]
        .into_iter()
        .find(|(_, d)| d.is_zero());
        if let Some((key, _)) = zero {
            return Err(parse(key).invalid("a duration above zero".into()));
        }
        Ok(settings)
    }

    /// A copy safe to log at start: what the operator configured, secrets left out.
    pub fn summary(&self) -> String {
        format!(
            "listen={} admin_listen={} data_dir={} secrets={} max_body={} tolerance={} \
             future_skew={} dedup_retention={} outbox_max={} id_header={} amqp={} exchange={} \
             unrouted_exchange={} publish_window={} queues={} archive_retention={} admin_api={} \
             tls={}",
            self.listen,
            self.admin_listen,
            self.data_dir.display(),
            self.secrets.len(),
            self.max_body,
            format_duration(self.tolerance),
            format_duration(self.future_skew),
            format_duration(self.dedup_retention),
            self.outbox_max,
            self.id_header.as_deref().unwrap_or("-"),
            redact_url(self.amqp_url.expose()),
            self.exchange,
            self.unrouted_exchange,
            self.publish_window,
            self.queues.len(),
            format_duration(self.archive_retention),
            if self.admin_token.is_some() {
                "on"
            } else {
                "off"
            },
            if self.tls.is_some() { "on" } else { "off" },
        )
    }
}

/// The AMQP URL with its password replaced, for logs and `/readyz`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

type Merged = (BTreeMap<String, String>, Vec<QueueSpec>);

fn merge(layers: &Layers) -> Result<Merged, ConfigError> {
    let mut merged: BTreeMap<String, String> = SPECS
        .iter()
        .filter_map(|s| s.default.map(|d| (s.key.to_string(), d.to_string())))
        .collect();
    let mut queues = Vec::new();
    if let Some((path, text)) = &layers.file {
        let file_error = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let parsed: toml::Table =
            toml::from_str(text).map_err(|e| file_error(e.message().to_string()))?;
        for (key, value) in parsed {
            if key == "queues" {
                queues = value
                    .try_into::<Vec<QueueSpec>>()
                    .map_err(|e| file_error(format!("[[queues]]: {}", e.message())))?;
                continue;
            }
            if !SPECS.iter().any(|s| s.key == key) {
                return Err(file_error(format!("unknown setting `{key}`")));
            }
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Array(items) if key == "webhook_secret" => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| file_error("`webhook_secret` must be strings".into()))?
                    .join(","),
                other => {
                    return Err(file_error(format!(
                        "`{key}` must be a string, not {}",
                        other.type_str()
                    )))
                }
            };
            merged.insert(key, text);
        }
    }
    for spec in SPECS {
        if let Some(value) = layers.env.get(spec.env) {
            merged.insert(spec.key.to_string(), value.clone());
        }
    }
    for (key, value) in &layers.flags {
        merged.insert(key.to_string(), value.clone());
    }
    Ok((merged, queues))
}

fn secrets(inline: Option<&str>, file: Option<&str>) -> Result<Vec<Secret>, ConfigError> {
    let mut secrets: Vec<Secret> = Vec::new();
    if let Some(inline) = inline {
        secrets.extend(
            inline
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
        );
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Field::new("webhook_secret_file", Some(path))
                .invalid(format!("a readable file with one secret per line ({e})"))
        })?;
        secrets.extend(
            text.lines()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(Secret::new),
        );
    }
    if secrets.is_empty() {
        return Err(ConfigError::MissingSecret);
    }
    Ok(secrets)
}

/// One raw value on its way to a typed one; knows how to say what is wrong with it.
struct Field<'a> {
    spec: &'static Spec,
    value: Option<&'a str>,
}

impl<'a> Field<'a> {
    fn new(key: &str, value: Option<&'a str>) -> Self {
        let spec = SPECS
            .iter()
            .find(|s| s.key == key)
            .expect("every setting has a spec");
        Self { spec, value }
    }

    fn invalid(&self, expected: String) -> ConfigError {
        let value = match (self.spec.secret, self.value) {
            (true, _) => "[redacted]".to_string(),
            (false, Some(v)) => v.to_string(),
            (false, None) => String::new(),
        };
        ConfigError::Invalid {
            setting: self.spec.key,
            env: self.spec.env,
            value,
            expected,
        }
    }

    fn required(&self) -> Result<&'a str, ConfigError> {
        self.value.ok_or_else(|| self.invalid("a value".into()))
    }

    fn non_empty(&self) -> Result<&'a str, ConfigError> {
        match self.value.map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.invalid("a non-empty value".into())),
        }
    }

    fn duration(&self) -> Result<Duration, ConfigError> {
        parse_duration(self.non_empty()?)
            .ok_or_else(|| self.invalid("a duration such as 90s, 5m, 24h or 7d".into()))
    }

    fn bytes(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        match parse_size(self.non_empty()?) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(format!(
                "a size in bytes between {min} and {max}, such as 262144, 256KiB or 1MiB"
            ))),
        }
    }

    fn integer(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        match self.non_empty()?.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(format!("a whole number between {min} and {max}"))),
        }
    }

    fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.non_empty()?
            .parse()
            .map_err(|_| self.invalid("an address and port such as 0.0.0.0:8080".into()))
    }

    /// Exchange names and the source name go into AMQP short strings: ≤ 255 bytes.
    fn short_string(&self) -> Result<String, ConfigError> {
        let v = self.non_empty()?;
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(
                self.invalid("a name of at most 255 bytes without control characters".into())
            );
        }
        Ok(v.to_string())
    }

    fn optional_header_name(&self) -> Result<Option<String>, ConfigError> {
        match self.value.map(str::trim) {
            None | Some("") => Ok(None),
            Some(v) if actix_web::http::header::HeaderName::try_from(v).is_ok() => {
                Ok(Some(v.to_ascii_lowercase()))
            }
            Some(_) => Err(self.invalid("an HTTP header name such as X-Kallina-Delivery".into())),
        }
    }

    fn log_format(&self) -> Result<Option<LogFormat>, ConfigError> {
        match self.value.map(str::trim) {
            None | Some("") => Ok(None),
            Some("pretty") => Ok(Some(LogFormat::Pretty)),
            Some("json") => Ok(Some(LogFormat::Json)),
            Some(_) => Err(self.invalid("`pretty` or `json`".into())),
        }
    }
}

/// The short human form used in messages: `24h 5m`, `90s`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let parts: Vec<String> = [
        (secs / 3600, "h"),
        (secs % 3600 / 60, "m"),
        (secs % 60, "s"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, unit)| format!("{n}{unit}"))
    .collect();
    if parts.is_empty() {
        "0s".into()
    } else {
        parts.join(" ")
    }
}

/// `90s`, `5m`, `24h`, `7d`, `1h 30m`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).ok()
}

/// `262144`, `256KiB`, `1MiB`, `1 MB`: bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    text.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers(env: &[(&str, &str)]) -> Layers {
        Layers {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Layers::default()
        }
    }

    #[test]
    fn defaults_apply_once_a_secret_is_set() {
        let s = Settings::load(&layers(&[("KALLINA_WEBHOOK_SECRET", "a, b")])).unwrap();
        assert_eq!(s.secrets, vec![Secret::new("a"), Secret::new("b")]);
        assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(s.max_body, 1 << 20);
        assert_eq!(s.tolerance, Duration::from_secs(24 * 3600));
        assert_eq!(s.future_skew, Duration::from_secs(300));
        assert_eq!(s.dedup_retention, Duration::from_secs(72 * 3600));
        assert_eq!(s.outbox_max, 1_000_000);
        assert_eq!(s.id_header, None);
        assert_eq!(s.exchange, "kallina.events");
        assert_eq!(s.unrouted_exchange, "kallina.unrouted");
        assert_eq!(s.publish_window, 256);
        assert_eq!(s.confirm_timeout, Duration::from_secs(30));
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.archive_retention, s.dedup_retention);
        assert!(s.admin_token.is_none(), "the admin API is off by default");
        assert!(s.tls.is_none());
    }

    #[test]
    fn durations_at_the_edge_of_u64_are_refused_not_a_panic() {
        // Found by the `settings` fuzz target: tolerance + future skew overflowed.
        let huge = u64::MAX.to_string();
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            ("KALLINA_RELAY_FUTURE_SKEW", &huge),
            ("KALLINA_RELAY_TOLERANCE", &huge),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("KALLINA_RELAY_DEDUP_RETENTION"),
            "{err}"
        );
    }

    #[test]
    fn the_archive_admin_token_and_tls_settings_are_checked() {
        let with = |pairs: &[(&str, &str)]| {
            let mut all = vec![("KALLINA_WEBHOOK_SECRET", "s")];
            all.extend_from_slice(pairs);
            Settings::load(&layers(&all))
        };
        let setting_of = |e: ConfigError| match e {
            ConfigError::Invalid { setting, .. } => setting,
            other => panic!("{other}"),
        };
        // Longer than the dedup keys would leave archived events nobody can look up.
        let err = with(&[("KALLINA_RELAY_ARCHIVE_RETENTION", "96h")]).unwrap_err();
        assert_eq!(setting_of(err), "archive_retention");
        let s = with(&[("KALLINA_RELAY_ARCHIVE_RETENTION", "0")]).unwrap();
        assert!(s.archive_retention.is_zero());

        let err = with(&[("KALLINA_RELAY_ADMIN_TOKEN", "short-token")]).unwrap_err();
        assert!(!err.to_string().contains("short-token"), "{err}");
        assert_eq!(setting_of(err), "admin_token");
        let s = with(&[("KALLINA_RELAY_ADMIN_TOKEN", "a-long-enough-admin-token")]).unwrap();
        assert_eq!(s.admin_token.unwrap().expose(), "a-long-enough-admin-token");

        let err = with(&[("KALLINA_RELAY_TLS_CERT", "cert.pem")]).unwrap_err();
        assert_eq!(setting_of(err), "tls_key");
        let s = with(&[
            ("KALLINA_RELAY_TLS_CERT", "cert.pem"),
            ("KALLINA_RELAY_TLS_KEY", "key.pem"),
        ])
        .unwrap();
        assert_eq!(s.tls.unwrap().key, PathBuf::from("key.pem"));
        assert_eq!(
            setting_of(with(&[("KALLINA_RELAY_REDRIVE_RATE", "0")]).unwrap_err()),
            "redrive_rate"
        );
    }

    #[test]
    fn a_missing_secret_says_how_to_set_it() {
        let err = Settings::load(&layers(&[])).unwrap_err();
        assert_eq!(err, ConfigError::MissingSecret);
        assert!(err.to_string().contains("KALLINA_WEBHOOK_SECRET"));
    }

    #[test]
    fn secrets_come_from_a_file_one_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        std::fs::write(&path, "new-secret\n\nold-secret\n").unwrap();
        let s = Settings::load(&layers(&[(
            "KALLINA_WEBHOOK_SECRET_FILE",
            path.to_str().unwrap(),
        )]))
        .unwrap();
        assert_eq!(
            s.secrets,
            vec![Secret::new("new-secret"), Secret::new("old-secret")]
        );
    }

    #[test]
    fn flags_beat_environment_which_beats_the_file_which_beats_defaults() {
        let mut l = layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            ("KALLINA_RELAY_LISTEN", "127.0.0.1:2"),
        ]);
        l.file = Some((
            "relay.toml".into(),
            "listen = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:3\"\nmax_body = \"256KiB\"\n\
             [[queues]]\nname = \"calls\"\nbindings = [\"call.*\"]\ntype = \"quorum\"\n"
                .into(),
        ));
        let s = Settings::load(&l).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:2");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:3");
        assert_eq!(s.max_body, 256 * 1024);
        assert_eq!(
            s.queues,
            vec![QueueSpec {
                name: "calls".into(),
                bindings: vec!["call.*".into()],
                queue_type: QueueType::Quorum
            }]
        );
        l.flags.insert("listen", "127.0.0.1:4".into());
        assert_eq!(
            Settings::load(&l).unwrap().listen.to_string(),
            "127.0.0.1:4"
        );
    }

    #[test]
    fn the_example_file_in_deploy_is_valid() {
        let mut l = layers(&[("KALLINA_WEBHOOK_SECRET", "s")]);
        let text = include_str!("../deploy/kallina-relay.example.toml");
        l.file = Some(("kallina-relay.example.toml".into(), text.into()));
        let s = Settings::load(&l).unwrap();
        assert_eq!(s.source, "kallina-relay-eu-1");
        assert_eq!(s.queues.len(), 2);
        assert_eq!(s.queues[0].queue_type, QueueType::Quorum);
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let mut l = layers(&[("KALLINA_WEBHOOK_SECRET", "s")]);
        l.file = Some(("f.toml".into(), "listne = \"127.0.0.1:1\"\n".into()));
        let err = Settings::load(&l).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting `listne`"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_names_the_setting_the_value_and_what_is_expected() {
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            ("KALLINA_RELAY_TOLERANCE", "a day"),
        ]))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "setting `tolerance` (KALLINA_RELAY_TOLERANCE) = \"a day\" is invalid: expected a \
             duration such as 90s, 5m, 24h or 7d"
        );
    }

    #[test]
    fn retention_shorter_than_the_replay_window_is_refused() {
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            ("KALLINA_RELAY_DEDUP_RETENTION", "24h"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("dedup_retention"), "{err}");
        assert!(err.to_string().contains("24h 5m"), "{err}");
    }

    #[test]
    fn the_amqp_password_never_appears_in_errors_or_summaries() {
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            ("KALLINA_RELAY_AMQP_URL", "http://user:hunter2@host"),
        ]))
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let s = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "topsecret"),
            (
                "KALLINA_RELAY_AMQP_URL",
                "amqp://user:hunter2@host:5672/%2f",
            ),
        ]))
        .unwrap();
        let printed = format!("{} {:?}", s.summary(), s);
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("topsecret"), "{printed}");
        assert!(
            printed.contains("amqp://user:***@host:5672/%2f"),
            "{printed}"
        );
    }

    #[test]
    fn durations_and_sizes_read_the_human_forms() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("15"), Some(Duration::from_secs(15)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_size("256KiB"), Some(262_144));
        assert_eq!(parse_size("1MiB"), Some(1_048_576));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("big"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn duration_and_size_parsers_never_panic(text in "\\PC{0,40}") {
                let _ = parse_duration(&text);
                let _ = parse_size(&text);
            }

            #[test]
            fn whole_seconds_parse_in_every_unit(n in 0u64..100_000) {
                prop_assert_eq!(parse_duration(&format!("{n}s")), Some(Duration::from_secs(n)));
                prop_assert_eq!(parse_duration(&format!("{n}m")), Some(Duration::from_secs(n * 60)));
                prop_assert_eq!(parse_size(&format!("{n}KiB")), Some(n * 1024));
            }
        }
    }
}
