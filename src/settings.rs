//! The settings the service runs with: one option struct per stage, each built from the
//! declarations in that stage's `options` module, plus the two that concern the whole process
//! (log format, shutdown grace).
//!
//! This is the only place that knows every setting: it merges the layers for all of them
//! ([`crate::config`]), checks the rules that span two stages, gives `serve` its flags
//! ([`crate::cli`]) and renders the README's settings table (a test keeps the two equal).

use std::fmt::Write;
use std::time::Duration;

use crate::admin::options::{self as admin, AdminOptions};
use crate::config::{format_duration, ConfigError, Layers, Setting, Spec};
use crate::ingress::options::{self as ingress, IngressOptions};
use crate::relay::options::{self as relay, RelayOptions};
use crate::store::options::{self as store, StoreOptions};
use crate::telemetry::{self, LogFormat, OtlpOptions};

pub const SHUTDOWN_GRACE: Setting<Duration> = Setting::new(
    Spec::new(
        "shutdown_grace",
        "KALLINA_RELAY_SHUTDOWN_GRACE",
        "how long stopping waits for in-flight requests and confirms",
    )
    .default("10s")
    .flag(),
    |f| f.duration(),
);

/// Every declared setting, stage by stage: what the file may hold, what the flags are, and the
/// rows of the README's table.
pub fn all() -> impl Iterator<Item = &'static Spec> {
    let process: &'static [&'static Spec] = &[&SHUTDOWN_GRACE.spec];
    [
        ingress::SETTINGS,
        store::SETTINGS,
        relay::SETTINGS,
        admin::SETTINGS,
        telemetry::SETTINGS,
        process,
    ]
    .into_iter()
    .flatten()
    .copied()
}

/// The validated settings, by the stage that uses them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ingress: IngressOptions,
    pub store: StoreOptions,
    pub relay: RelayOptions,
    pub admin: AdminOptions,
    pub log_format: Option<LogFormat>,
    /// Where spans are exported; `None`: nowhere.
    pub otlp: Option<OtlpOptions>,
    pub shutdown_grace: Duration,
}

impl Settings {
    /// Merge the layers and validate every value.
    pub fn load(layers: &Layers) -> Result<Self, ConfigError> {
        let specs: Vec<&'static Spec> = all().collect();
        let values = layers.merge(&specs)?;
        let ingress = IngressOptions::from_values(&values)?;
        let store = StoreOptions::from_values(&values)?;
        // Saturating: durations near u64::MAX seconds are valid input and must not overflow.
        let window = ingress.max_tolerance().saturating_add(ingress.future_skew);
        if store.dedup_retention < window {
            return Err(values.field(&store::DEDUP_RETENTION.spec).invalid(format!(
                "a duration of at least tolerance + future skew ({}), so that a replay inside \
                 the tolerance window is always recognised as a duplicate",
                format_duration(window)
            )));
        }
        let shutdown_grace = values.get(&SHUTDOWN_GRACE)?;
        Ok(Self {
            relay: RelayOptions::from_values(&values, shutdown_grace)?,
            admin: AdminOptions::from_values(&values)?,
            log_format: values.get(&telemetry::LOG_FORMAT)?,
            otlp: telemetry::otlp_options(&values)?,
            shutdown_grace,
            ingress,
            store,
        })
    }

    /// A copy safe to log at start: what the operator configured, secrets left out.
    pub fn summary(&self) -> String {
        let (i, s, r) = (&self.ingress, &self.store, &self.relay);
        let on = |yes: bool| if yes { "on" } else { "off" };
        format!(
            "listen={} admin_listen={} data_dir={} secrets={} sources={} max_body={} tolerance={} \
             future_skew={} dedup_retention={} outbox_max={} id_header={} amqp={} exchange={} \
             unrouted_exchange={} publish_window={} queues={} archive_retention={} admin_api={} \
             tls={}",
            i.listen,
            self.admin.listen,
            s.data_dir.display(),
            i.default_source().map_or(0, |s| s.secrets.len()),
            i.sources
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            i.max_body,
            format_duration(i.tolerance),
            format_duration(i.future_skew),
            format_duration(s.dedup_retention),
            s.outbox_max,
            i.id_header.as_deref().unwrap_or("-"),
            r.brokers.redacted(),
            r.topology.exchange,
            r.topology.unrouted_exchange,
            r.window,
            r.topology.queues.len(),
            format_duration(s.archive_retention),
            on(self.admin.token.is_some()),
            on(i.tls.is_some()),
        )
    }
}

/// The README's settings table, rendered from the declarations.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| file key | environment | flag | default | what it is |\n| --- | --- | --- | --- | --- |\n",
    );
    for spec in all() {
        let env = spec
            .env
            .map_or("file only".to_string(), |e| format!("`{e}`"));
        let flag = if spec.flag {
            format!("`--{}`", spec.flag_name())
        } else {
            String::new()
        };
        let default = match (spec.default, spec.note) {
            (Some(d), "") => format!("`{d}`"),
            (Some(d), note) => format!("`{d}`; {note}"),
            (None, note) => note.to_string(),
        };
        let _ = writeln!(
            out,
            "| `{}` | {env} | {flag} | {default} | {} |",
            spec.key, spec.help
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Secret;
    use crate::relay::{QueueSpec, QueueType};

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
    fn the_readme_table_is_the_declarations() {
        let readme = include_str!("../README.md");
        let start =
            "<!-- settings table: rendered from the declarations, see src/settings.rs -->\n";
        let end = "<!-- end of settings table -->";
        let from = readme
            .find(start)
            .expect("the README has the table's start marker")
            + start.len();
        let to = from + readme[from..].find(end).expect("and its end marker");
        let expected = markdown_table();
        assert!(
            readme[from..to] == expected,
            "the README's settings table differs from the declarations; replace it with:\n{expected}"
        );
    }

    #[test]
    fn every_setting_is_declared_once_with_a_distinct_key_env_and_help() {
        let specs: Vec<_> = all().collect();
        for (i, a) in specs.iter().enumerate() {
            assert!(!a.help.is_empty(), "{} has no help line", a.key);
            for b in &specs[i + 1..] {
                assert_ne!(a.key, b.key);
                assert!(a.env.is_none() || a.env != b.env, "{} and {}", a.key, b.key);
            }
        }
    }

    #[test]
    fn defaults_apply_once_a_secret_is_set() {
        let s = Settings::load(&layers(&[("KALLINA_WEBHOOK_SECRET", "a, b")])).unwrap();
        assert_eq!(
            s.ingress.default_source().unwrap().secrets,
            vec![Secret::new("a"), Secret::new("b")]
        );
        assert_eq!(s.ingress.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(s.ingress.max_body, 1 << 20);
        assert_eq!(s.ingress.tolerance, Duration::from_secs(24 * 3600));
        assert_eq!(s.ingress.future_skew, Duration::from_secs(300));
        assert_eq!(s.store.dedup_retention, Duration::from_secs(72 * 3600));
        assert_eq!(s.store.outbox_max, 1_000_000);
        assert_eq!(s.ingress.id_header, None);
        assert_eq!(s.relay.topology.exchange, "kallina.events");
        assert_eq!(s.relay.topology.unrouted_exchange, "kallina.unrouted");
        assert_eq!(s.relay.window, 256);
        assert_eq!(s.relay.confirm_timeout, Duration::from_secs(30));
        assert_eq!(s.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.store.archive_retention, s.store.dedup_retention);
        assert!(s.admin.token.is_none(), "the admin API is off by default");
        assert!(s.ingress.tls.is_none());
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
        assert!(err.to_string().contains("KALLINA_RELAY_TOLERANCE"), "{err}");
        assert!(err.to_string().contains("at most 100 years"), "{err}");
    }

    #[test]
    fn every_duration_is_taken_up_to_a_hundred_years_and_refused_beyond() {
        let at_most = "36500d";
        let beyond = "36500d 1s";
        for setting in [
            "TOLERANCE",
            "FUTURE_SKEW",
            "DEDUP_RETENTION",
            "ARCHIVE_RETENTION",
            "SWEEP_INTERVAL",
            "BODY_TIMEOUT",
            "CONFIRM_TIMEOUT",
            "SHUTDOWN_GRACE",
        ] {
            let env = format!("KALLINA_RELAY_{setting}");
            // The dedup retention must cover the window, so it takes the longest value too.
            let load = |value: &str| {
                Settings::load(&layers(&[
                    ("KALLINA_WEBHOOK_SECRET", "s"),
                    ("KALLINA_RELAY_DEDUP_RETENTION", at_most),
                    (env.as_str(), value),
                ]))
            };
            if setting != "TOLERANCE" && setting != "FUTURE_SKEW" {
                assert!(load(at_most).is_ok(), "{setting} = {at_most}");
            }
            let err = load(beyond).unwrap_err();
            assert!(
                matches!(&err, ConfigError::Invalid { env: e, .. } if *e == env),
                "{setting}: {err}"
            );
        }
        // The window may reach the edge as long as the retention covers it.
        assert!(Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            ("KALLINA_RELAY_TOLERANCE", "18250d"),
            ("KALLINA_RELAY_FUTURE_SKEW", "18250d"),
            ("KALLINA_RELAY_DEDUP_RETENTION", at_most),
        ]))
        .is_ok());
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
        assert!(s.store.archive_retention.is_zero());

        let err = with(&[("KALLINA_RELAY_ADMIN_TOKEN", "short-token")]).unwrap_err();
        assert!(!err.to_string().contains("short-token"), "{err}");
        assert_eq!(setting_of(err), "admin_token");
        let s = with(&[("KALLINA_RELAY_ADMIN_TOKEN", "a-long-enough-admin-token")]).unwrap();
        assert_eq!(s.admin.token.unwrap().expose(), "a-long-enough-admin-token");

        let err = with(&[("KALLINA_RELAY_TLS_CERT", "cert.pem")]).unwrap_err();
        assert_eq!(setting_of(err), "tls_key");
        let s = with(&[
            ("KALLINA_RELAY_TLS_CERT", "cert.pem"),
            ("KALLINA_RELAY_TLS_KEY", "key.pem"),
        ])
        .unwrap();
        assert_eq!(s.ingress.tls.unwrap().key, PathBuf::from("key.pem"));
        assert_eq!(
            setting_of(with(&[("KALLINA_RELAY_REDRIVE_RATE", "0")]).unwrap_err()),
            "redrive_rate"
        );
        for zero in ["SWEEP_INTERVAL", "CONFIRM_TIMEOUT", "BODY_TIMEOUT"] {
            let env = format!("KALLINA_RELAY_{zero}");
            let err = with(&[(env.as_str(), "0s")]).unwrap_err();
            assert!(err.to_string().contains("above zero"), "{err}");
        }
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
            s.ingress.default_source().unwrap().secrets,
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
        assert_eq!(s.ingress.listen.to_string(), "127.0.0.1:2");
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:3");
        assert_eq!(s.ingress.max_body, 256 * 1024);
        assert_eq!(
            s.relay.topology.queues,
            vec![QueueSpec {
                name: "calls".into(),
                bindings: vec!["call.*".into()],
                queue_type: QueueType::Quorum,
                max_length_bytes: None,
                max_age: None,
            }]
        );
        l.flags.insert("listen", "127.0.0.1:4".into());
        assert_eq!(
            Settings::load(&l).unwrap().ingress.listen.to_string(),
            "127.0.0.1:4"
        );
    }

    #[test]
    fn the_example_file_in_deploy_is_valid() {
        let mut l = layers(&[("KALLINA_WEBHOOK_SECRET", "s")]);
        let text = include_str!("../deploy/kallina-relay.example.toml");
        l.file = Some(("kallina-relay.example.toml".into(), text.into()));
        let s = Settings::load(&l).unwrap();
        assert_eq!(s.ingress.source, "kallina-relay-eu-1");
        assert_eq!(s.relay.topology.queues.len(), 3);
        assert_eq!(s.relay.topology.queues[2].queue_type, QueueType::Stream);
        assert_eq!(s.relay.topology.queues[0].queue_type, QueueType::Quorum);
    }

    #[test]
    fn unknown_keys_and_bad_tables_in_the_file_are_refused() {
        let mut l = layers(&[("KALLINA_WEBHOOK_SECRET", "s")]);
        l.file = Some(("f.toml".into(), "listne = \"127.0.0.1:1\"\n".into()));
        let err = Settings::load(&l).unwrap_err();
        assert!(
            err.to_string().contains("unknown setting `listne`"),
            "{err}"
        );
        l.file = Some(("f.toml".into(), "[[queues]]\nnmae = \"calls\"\n".into()));
        let err = Settings::load(&l).unwrap_err().to_string();
        assert!(
            err.starts_with("configuration file f.toml: [[queues]]: "),
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
    fn several_broker_urls_are_kept_in_order_and_shown_without_passwords() {
        let s = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            (
                "KALLINA_RELAY_AMQP_URL",
                "amqp://u:first@a:5672/%2f, amqp://u:second@b:5673/%2f",
            ),
        ]))
        .unwrap();
        assert_eq!(s.relay.brokers.len(), 2);
        assert_eq!(
            s.relay.brokers.node(1).redacted(),
            "amqp://u:***@b:5673/%2f"
        );
        let printed = format!("{} {:?}", s.summary(), s);
        assert!(
            !printed.contains("first") && !printed.contains("second"),
            "{printed}"
        );
        assert!(
            printed.contains("amqp://u:***@a:5672/%2f,amqp://u:***@b:5673/%2f"),
            "{printed}"
        );
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            (
                "KALLINA_RELAY_AMQP_URL",
                "amqp://u:p@a/%2f,http://u:hunter2@b",
            ),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("URL 2"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_bad_broker_tls_file_stops_the_start_naming_its_setting() {
        let amqps = ("KALLINA_RELAY_AMQP_URL", "amqps://u:p@broker:5671/%2f");
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            amqps,
            ("KALLINA_RELAY_BROKER_TLS_CA", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("broker_tls_ca"), "{err}");
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            amqps,
            ("KALLINA_RELAY_BROKER_TLS_CERT", "/nonexistent/client.pem"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("broker_tls_key"), "{err}");
        let err = Settings::load(&layers(&[
            ("KALLINA_WEBHOOK_SECRET", "s"),
            amqps,
            ("KALLINA_RELAY_BROKER_TLS_SERVER_NAME", "not a name"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("broker_tls_server_name"), "{err}");
    }

    #[test]
    fn a_stream_may_set_retention_and_other_queues_may_not() {
        let load = |queue: &str| {
            let mut l = layers(&[("KALLINA_WEBHOOK_SECRET", "s")]);
            l.file = Some(("relay.toml".into(), format!("[[queues]]\n{queue}")));
            Settings::load(&l)
        };
        let s = load(
            "name = \"history\"\ntype = \"stream\"\nmax_age = \"7D\"\n\
                      max_length_bytes = 1000000\n",
        )
        .unwrap();
        let queue = &s.relay.topology.queues[0];
        assert_eq!(queue.queue_type, QueueType::Stream);
        assert_eq!(queue.max_age.as_deref(), Some("7D"));
        let err = load("name = \"calls\"\ntype = \"quorum\"\nmax_age = \"7D\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention settings of a stream"), "{err}");
        let err = load("name = \"history\"\ntype = \"stream\"\nmax_age = \"7 days\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("RabbitMQ age"), "{err}");
    }
}
