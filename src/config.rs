//! The machinery of settings, layered: defaults < TOML file < environment < command-line flags.
//!
//! A setting is declared **once**, as a typed [`Setting`] constant in the options module of the
//! stage that uses it (`ingress/options.rs`, `store/options.rs`, …): its file key, environment
//! variable, whether it has a flag, its default, its help line and its parser. Everything else
//! follows from that declaration: the merge of the layers, the `serve` flags, the start-up
//! errors and the README's settings table ([`crate::settings`] collects the declarations).
//!
//! Every layer is reduced to the same shape (setting key → text) before anything is parsed,
//! so one parser per setting validates a value whatever layer it came from, and a bad value
//! stops the start with one line naming the setting, the value and what was expected. Secret
//! values never reach that line, a log or a `Debug` print: they live in [`Secret`].
//!
//! This module is a leaf: it knows no stage. A typo in a setting's name fails to compile,
//! because stages read values through their constants, never through strings.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the TOML configuration file (same as `--config`).
pub const CONFIG_FILE_ENV: &str = "KALLINA_RELAY_CONFIG";

/// The longest duration any setting takes: a hundred years. Anything longer would overflow
/// clock arithmetic somewhere (an `Instant` plus an interval, a receive time in milliseconds
/// minus a retention), and none is useful.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What is known about a setting besides its type: where it can be set and how it is shown.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Key in the TOML file; also the flag's name (`data_dir` → `--data-dir`).
    pub key: &'static str,
    /// Environment variable; `None` for tables only the file can hold (`[[queues]]`).
    pub env: Option<&'static str>,
    /// Has a `serve` flag.
    pub flag: bool,
    /// Default, in the same text form as every layer (parsed by the same parser).
    pub default: Option<&'static str>,
    /// Never printed: errors show `[redacted]` instead of the value.
    pub secret: bool,
    /// In the file, an array of strings is accepted and read as a comma-separated list.
    pub list: bool,
    /// One line: what it is. The flag's help and the README's table use it.
    pub help: &'static str,
    /// What the README says about the default, when the value alone does not tell it.
    pub note: &'static str,
}

impl Spec {
    pub const fn new(key: &'static str, env: &'static str, help: &'static str) -> Self {
        Self {
            key,
            env: Some(env),
            flag: false,
            default: None,
            secret: false,
            list: false,
            help,
            note: "",
        }
    }
    /// A table only the file can hold.
    pub const fn file_only(key: &'static str, help: &'static str) -> Self {
        Self {
            env: None,
            ..Self::new(key, "", help)
        }
    }
    pub const fn default(self, value: &'static str) -> Self {
        Self {
            default: Some(value),
            ..self
        }
    }
    pub const fn flag(self) -> Self {
        Self { flag: true, ..self }
    }
    pub const fn secret(self) -> Self {
        Self {
            secret: true,
            ..self
        }
    }
    pub const fn list(self) -> Self {
        Self { list: true, ..self }
    }
    pub const fn note(self, note: &'static str) -> Self {
        Self { note, ..self }
    }
    /// The flag: `--data-dir` for `data_dir`.
    pub fn flag_name(&self) -> String {
        self.key.replace('_', "-")
    }
}

/// A setting: its [`Spec`] and the parser that turns its text into the value a stage uses.
pub struct Setting<T> {
    pub spec: Spec,
    pub parse: fn(&Field<'_>) -> Result<T, ConfigError>,
}

impl<T> Setting<T> {
    pub const fn new(spec: Spec, parse: fn(&Field<'_>) -> Result<T, ConfigError>) -> Self {
        Self { spec, parse }
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
    /// Command-line flags, by setting key (`listen`, `data_dir`, …).
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

    /// Merges the layers for the declared settings; a file key nobody declared is refused.
    pub fn merge(&self, specs: &[&'static Spec]) -> Result<Values, ConfigError> {
        let mut values = Values {
            text: specs
                .iter()
                .filter_map(|s| s.default.map(|d| (s.key, d.to_string())))
                .collect(),
            tables: BTreeMap::new(),
            file: self.file.as_ref().map(|(p, _)| p.display().to_string()),
        };
        if let Some((path, text)) = &self.file {
            let file_error = |reason: String| ConfigError::File {
                path: path.display().to_string(),
                reason,
            };
            let parsed: toml::Table =
                toml::from_str(text).map_err(|e| file_error(e.message().to_string()))?;
            for (key, value) in parsed {
                let Some(spec) = specs.iter().find(|s| s.key == key) else {
                    return Err(file_error(format!("unknown setting `{key}`")));
                };
                if spec.env.is_none() {
                    values.tables.insert(spec.key, value);
                    continue;
                }
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Array(items) if spec.list => items
                        .iter()
                        .map(|v| v.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| file_error(format!("`{key}` must be strings")))?
                        .join(","),
                    other => {
                        return Err(file_error(format!(
                            "`{key}` must be a string, not {}",
                            other.type_str()
                        )))
                    }
                };
                values.text.insert(spec.key, text);
            }
        }
        for spec in specs {
            if let Some(value) = spec.env.and_then(|env| self.env.get(env)) {
                values.text.insert(spec.key, value.clone());
            }
        }
        for (key, value) in &self.flags {
            if let Some(spec) = specs.iter().find(|s| s.key == *key) {
                values.text.insert(spec.key, value.clone());
            }
        }
        Ok(values)
    }
}

/// The merged layers: each setting's text (or, for file-only tables, its TOML value), read
/// through the settings' own constants.
#[derive(Debug, Clone)]
pub struct Values {
    text: BTreeMap<&'static str, String>,
    tables: BTreeMap<&'static str, toml::Value>,
    /// The file's path, for messages about its tables.
    file: Option<String>,
}

impl Values {
    /// The setting's value, parsed and checked by its own parser.
    pub fn get<T>(&self, setting: &Setting<T>) -> Result<T, ConfigError> {
        (setting.parse)(&self.field(&setting.spec))
    }

    /// True if a layer (not the default) gave the setting a value.
    pub fn is_set<T>(&self, setting: &Setting<T>) -> bool {
        setting.spec.default.is_none() && self.text.contains_key(setting.spec.key)
    }

    /// The setting's raw text, for checks that involve two settings.
    /// Two optional settings that only make sense together (a certificate and its key): both
    /// or neither; the one missing is named, with what it should hold.
    pub fn both_or_neither<A, B>(
        &self,
        first: (&Setting<Option<A>>, &str),
        second: (&Setting<Option<B>>, &str),
    ) -> Result<Option<(A, B)>, ConfigError> {
        match (self.get(first.0)?, self.get(second.0)?) {
            (None, None) => Ok(None),
            (Some(a), Some(b)) => Ok(Some((a, b))),
            (Some(_), None) => Err(self
                .field(&second.0.spec)
                .invalid(format!("{}, since {} is set", second.1, first.0.spec.key))),
            (None, Some(_)) => Err(self
                .field(&first.0.spec)
                .invalid(format!("{}, since {} is set", first.1, second.0.spec.key))),
        }
    }

    pub fn field<'a>(&'a self, spec: &'a Spec) -> Field<'a> {
        Field {
            spec,
            value: self.text.get(spec.key).map(String::as_str),
            table: self.tables.get(spec.key),
            file: self.file.as_deref(),
        }
    }
}

/// One raw value on its way to a typed one; knows how to say what is wrong with it.
pub struct Field<'a> {
    spec: &'a Spec,
    value: Option<&'a str>,
    table: Option<&'a toml::Value>,
    file: Option<&'a str>,
}

impl<'a> Field<'a> {
    /// For tests and for values that do not come from the layers (a secret file's path).
    pub fn of(spec: &'a Spec, value: Option<&'a str>) -> Self {
        Self {
            spec,
            value,
            table: None,
            file: None,
        }
    }

    pub fn value(&self) -> Option<&'a str> {
        self.value
    }

    pub fn invalid(&self, expected: impl Into<String>) -> ConfigError {
        let value = match (self.spec.secret, self.value) {
            (true, _) => "[redacted]".to_string(),
            (false, Some(v)) => v.to_string(),
            (false, None) => String::new(),
        };
        ConfigError::Invalid {
            setting: self.spec.key,
            env: self.spec.env.unwrap_or("file only"),
            value,
            expected: expected.into(),
        }
    }

    pub fn required(&self) -> Result<&'a str, ConfigError> {
        self.value.ok_or_else(|| self.invalid("a value"))
    }

    pub fn non_empty(&self) -> Result<&'a str, ConfigError> {
        match self.value.map(str::trim) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.invalid("a non-empty value")),
        }
    }

    /// `None` when unset or blank.
    pub fn optional(&self) -> Option<&'a str> {
        self.value.map(str::trim).filter(|v| !v.is_empty())
    }

    pub fn path(&self) -> Result<PathBuf, ConfigError> {
        self.non_empty().map(PathBuf::from)
    }

    /// A path, or `None` when unset or blank.
    pub fn optional_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        self.optional().map(|_| self.path()).transpose()
    }

    pub fn duration(&self) -> Result<Duration, ConfigError> {
        match parse_duration(self.non_empty()?) {
            None => Err(self.invalid("a duration such as 90s, 5m, 24h or 7d")),
            Some(d) if d > MAX_DURATION => Err(self.invalid(
                "a duration of at most 100 years (36500d): longer ones overflow the clock \
                 arithmetic and none is useful",
            )),
            Some(d) => Ok(d),
        }
    }

    /// A duration that must not be zero (an interval, a timeout).
    pub fn positive_duration(&self) -> Result<Duration, ConfigError> {
        match self.duration()? {
            d if d.is_zero() => Err(self.invalid("a duration above zero")),
            d => Ok(d),
        }
    }

    pub fn bytes(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        match parse_size(self.non_empty()?) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(format!(
                "a size in bytes between {min} and {max}, such as 262144, 256KiB or 1MiB"
            ))),
        }
    }

    pub fn integer(&self, min: u64, max: u64) -> Result<u64, ConfigError> {
        match self.non_empty()?.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.invalid(format!("a whole number between {min} and {max}"))),
        }
    }

    pub fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.non_empty()?
            .parse()
            .map_err(|_| self.invalid("an address and port such as 0.0.0.0:8080"))
    }

    /// Exchange names and the source name go into AMQP short strings: ≤ 255 bytes.
    pub fn short_string(&self) -> Result<String, ConfigError> {
        let v = self.non_empty()?;
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(self.invalid("a name of at most 255 bytes without control characters"));
        }
        Ok(v.to_string())
    }

    /// A file-only table's error, naming the file.
    pub fn file_error(&self, reason: impl Into<String>) -> ConfigError {
        ConfigError::File {
            path: self.file.unwrap_or("-").to_string(),
            reason: reason.into(),
        }
    }

    /// A file-only table as the file holds it, for a stage that checks it against other
    /// settings; `None` when absent.
    pub fn raw_table(&self) -> Option<toml::Value> {
        self.table.cloned()
    }

    /// A file-only table, deserialized; absent means the type's default.
    pub fn table<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, ConfigError> {
        match self.table {
            None => Ok(T::default()),
            Some(value) => {
                value
                    .clone()
                    .try_into()
                    .map_err(|e: toml::de::Error| ConfigError::File {
                        path: self.file.unwrap_or("-").to_string(),
                        reason: format!("[[{}]]: {}", self.spec.key, e.message()),
                    })
            }
        }
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

    #[test]
    fn the_password_of_an_amqp_url_is_redacted() {
        assert_eq!(
            redact_url("amqp://user:hunter2@host:5672/%2f"),
            "amqp://user:***@host:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host"), "amqp://host");
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
