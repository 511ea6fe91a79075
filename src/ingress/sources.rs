//! Sources: the workspaces (or accounts) that post to this relay, each with its own secrets.
//!
//! The **default source** is today's single one: `POST /webhooks/kallina`, verified with
//! `webhook_secret`, named by the `source` setting (the `x-source` header), with dedup keys as
//! they always were (the body's SHA-256, `id:<delivery id>`), so a relay that declares no
//! `[[sources]]` behaves exactly as before. Each `[[sources]]` table adds a **named source**:
//! `POST /webhooks/<name>`, verified only with its own secrets, optionally with its own
//! tolerance, its name sent as `x-source`, and its dedup keys prefixed with its name
//! (`<name>:<sha256>`, `<name>:id:<delivery id>`), so the same bytes from two workspaces are
//! two events. Names hold letters, digits, `-` and `_` only: they are path segments, metric
//! labels and key prefixes, and can never contain the `:` that separates the prefix.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{parse_duration, Secret, MAX_DURATION};

/// The path segment of the default source: `/webhooks/kallina`.
pub const DEFAULT_SEGMENT: &str = "kallina";
/// Longest source name: a path segment, a metric label and a key prefix.
const MAX_NAME_LEN: usize = 64;

/// One source the relay takes webhooks from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Sent as `x-source`; the metrics' `source` label; the filter of the admin API.
    pub name: String,
    /// Tried in order, newest first; several during a rotation.
    pub secrets: Vec<Secret>,
    /// How old a signed timestamp may be for this source.
    pub tolerance: Duration,
    /// The default source: served at `/webhooks/kallina`, its keys unprefixed.
    pub default: bool,
}

impl Source {
    /// The last segment of its path: `/webhooks/<segment>`.
    pub fn segment(&self) -> &str {
        if self.default {
            DEFAULT_SEGMENT
        } else {
            &self.name
        }
    }

    pub fn path(&self) -> String {
        format!("/webhooks/{}", self.segment())
    }

    /// The `message_id` and first dedup key of a body whose SHA-256 is `digest`.
    pub fn key(&self, digest: &str) -> String {
        if self.default {
            digest.to_string()
        } else {
            format!("{}:{digest}", self.name)
        }
    }
}

/// A `[[sources]]` table as the file holds it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceTable {
    name: String,
    #[serde(default)]
    secrets: Vec<String>,
    secret_file: Option<PathBuf>,
    tolerance: Option<String>,
}

// Never printed: it holds secrets.
impl std::fmt::Debug for SourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceTable")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a `[[sources]]` table; the options put it into the setting's error.
pub type SourceError = String;

/// The named sources of the file's `[[sources]]` tables, checked: names valid and distinct,
/// at least one secret each, the tolerance a duration.
pub fn named_sources(
    tables: toml::Value,
    default_tolerance: Duration,
) -> Result<Vec<Source>, SourceError> {
    let tables: Vec<SourceTable> = tables
        .try_into()
        .map_err(|e: toml::de::Error| format!("[[sources]]: {}", e.message()))?;
    let mut sources: Vec<Source> = Vec::with_capacity(tables.len());
    for table in tables {
        let name = check_name(&table.name)?;
        if sources.iter().any(|s| s.name == name) {
            return Err(format!("source `{name}` is declared twice"));
        }
        let mut secrets: Vec<Secret> = table
            .secrets
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .collect();
        if let Some(path) = &table.secret_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "source `{name}`: secret_file {} is not readable ({e})",
                    path.display()
                )
            })?;
            secrets.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(Secret::new),
            );
        }
        if secrets.is_empty() {
            return Err(format!(
                "source `{name}` has no secret: give `secrets` (newest first) or `secret_file`"
            ));
        }
        let tolerance = match &table.tolerance {
            None => default_tolerance,
            Some(text) => match parse_duration(text) {
                Some(d) if d <= MAX_DURATION => d,
                _ => {
                    return Err(format!(
                        "source `{name}`: tolerance {text:?} is not a duration such as 5m or \
                         24h (at most 100 years)"
                    ))
                }
            },
        };
        sources.push(Source {
            name,
            secrets,
            tolerance,
            default: false,
        });
    }
    Ok(sources)
}

fn check_name(name: &str) -> Result<String, SourceError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(format!(
            "source name {name:?}: 1 to {MAX_NAME_LEN} letters, digits, `-` or `_` (it is a \
             path segment, a metric label and a key prefix)"
        ));
    }
    // `id:` prefixes the default source's delivery-id keys: a source of that name would share
    // their namespace.
    if name == "id" {
        return Err("source name `id` is reserved (the prefix of delivery-id keys)".into());
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(text: &str) -> toml::Value {
        let doc: toml::Table = text.parse().unwrap();
        doc["sources"].clone()
    }

    #[test]
    fn named_sources_are_read_and_checked() {
        let sources = named_sources(
            tables(
                "[[sources]]\nname = \"staging\"\nsecrets = [\"new\", \"old\"]\ntolerance = \"5m\"\n\
                 [[sources]]\nname = \"client_b\"\nsecrets = [\"b\"]\n",
            ),
            Duration::from_secs(86400),
        )
        .unwrap();
        assert_eq!(sources[0].path(), "/webhooks/staging");
        assert_eq!(sources[0].secrets.len(), 2);
        assert_eq!(sources[0].tolerance, Duration::from_secs(300));
        assert_eq!(sources[1].tolerance, Duration::from_secs(86400));
        assert_eq!(sources[1].key("ab12"), "client_b:ab12");
        for (bad, why) in [
            ("name = \"a.b\"\nsecrets = [\"s\"]", "letters, digits"),
            ("name = \"id\"\nsecrets = [\"s\"]", "reserved"),
            ("name = \"x\"", "no secret"),
            (
                "name = \"x\"\nsecrets = [\"s\"]\ntolerance = \"soon\"",
                "not a duration",
            ),
            ("name = \"x\"\nsecret = \"s\"", "unknown field"),
        ] {
            let err = named_sources(tables(&format!("[[sources]]\n{bad}\n")), Duration::ZERO)
                .unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let twice = "[[sources]]\nname = \"x\"\nsecrets = [\"s\"]\n\
                     [[sources]]\nname = \"x\"\nsecrets = [\"t\"]\n";
        assert!(named_sources(tables(twice), Duration::ZERO)
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn the_default_source_keeps_its_path_and_unprefixed_keys() {
        let default = Source {
            name: "kallina-relay".into(),
            secrets: vec![Secret::new("s")],
            tolerance: Duration::ZERO,
            default: true,
        };
        assert_eq!(default.path(), "/webhooks/kallina");
        assert_eq!(default.key("ab12"), "ab12");
    }
}
