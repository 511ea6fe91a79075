//! The relay's settings: which broker, what it declares there, how many publishes wait for a
//! confirm and how long. Each is declared once, here; see [`crate::config`].

use std::path::PathBuf;
use std::time::Duration;

use super::connect::{Brokers, Node};
use super::routing::RoutingKey;
use super::tls::{client_config, BrokerTlsFiles, TlsFileError};
use super::topology::{QueueSpec, QueueType, Topology};
use crate::config::{ConfigError, Setting, Spec, Values};

pub const AMQP_URL: Setting<Vec<Node>> = Setting::new(
    Spec::new(
        "amqp_url",
        "KALLINA_RELAY_AMQP_URL",
        "AMQP URLs of the broker's nodes, in order of preference (several: comma-separated; \
         a comma in a password is written `%2C`)",
    )
    .default("amqp://guest:guest@127.0.0.1:5672/%2f")
    .secret()
    .list(),
    |f| {
        let nodes = f
            .required()?
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .enumerate()
            .map(|(i, url)| {
                Node::parse(url).map_err(|reason| {
                    f.invalid(format!(
                        "amqp:// or amqps:// URLs (URL {}: {reason})",
                        i + 1
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.is_empty() {
            return Err(f.invalid("at least one amqp:// or amqps:// URL"));
        }
        Ok(nodes)
    },
);
pub const BROKER_TLS_CA: Setting<Option<PathBuf>> = Setting::new(
    Spec::new(
        "broker_tls_ca",
        "KALLINA_RELAY_BROKER_TLS_CA",
        "PEM CA bundle trusted for `amqps://` brokers instead of the system's roots",
    )
    .note("the system's roots"),
    |f| f.optional_path(),
);
pub const BROKER_TLS_CERT: Setting<Option<PathBuf>> = Setting::new(
    Spec::new(
        "broker_tls_cert",
        "KALLINA_RELAY_BROKER_TLS_CERT",
        "PEM client certificate chain for mutual TLS with the broker (with `broker_tls_key`)",
    )
    .note("none"),
    |f| f.optional_path(),
);
pub const BROKER_TLS_KEY: Setting<Option<PathBuf>> = Setting::new(
    Spec::new(
        "broker_tls_key",
        "KALLINA_RELAY_BROKER_TLS_KEY",
        "PEM private key of `broker_tls_cert`",
    )
    .note("none"),
    |f| f.optional_path(),
);
pub const BROKER_TLS_SERVER_NAME: Setting<Option<String>> = Setting::new(
    Spec::new(
        "broker_tls_server_name",
        "KALLINA_RELAY_BROKER_TLS_SERVER_NAME",
        "name the broker's certificate must carry",
    )
    .note("each URL's host"),
    |f| {
        f.optional()
            .map(|name| {
                rustls_pki_types::ServerName::try_from(name)
                    .map(|_| name.to_string())
                    .map_err(|_| f.invalid("a DNS name or an IP address"))
            })
            .transpose()
    },
);
pub const EXCHANGE: Setting<String> = Setting::new(
    Spec::new(
        "exchange",
        "KALLINA_RELAY_EXCHANGE",
        "topic exchange events are published to",
    )
    .default("kallina.events")
    .flag(),
    |f| f.short_string(),
);
pub const UNROUTED_EXCHANGE: Setting<String> = Setting::new(
    Spec::new(
        "unrouted_exchange",
        "KALLINA_RELAY_UNROUTED_EXCHANGE",
        "alternate exchange (and queue) for events no queue is bound for",
    )
    .default("kallina.unrouted")
    .flag(),
    |f| f.short_string(),
);
pub const UNROUTED_QUEUE_TYPE: Setting<QueueType> = Setting::new(
    Spec::new(
        "unrouted_queue_type",
        "KALLINA_RELAY_UNROUTED_QUEUE_TYPE",
        "type of the unrouted queue: `classic`, or `quorum` on a cluster (a classic queue is \
         lost with its node)",
    )
    .default("classic")
    .flag(),
    |f| match f.non_empty()? {
        "classic" => Ok(QueueType::Classic),
        "quorum" => Ok(QueueType::Quorum),
        _ => Err(f.invalid("`classic` or `quorum`")),
    },
);
pub const ROUTING_KEY: Setting<RoutingKey> = Setting::new(
    Spec::new(
        "routing_key",
        "KALLINA_RELAY_ROUTING_KEY",
        "routing key template: `{event}`, `{source}`, `{field}`, `{data.field}` and literal \
         text, e.g. `{source}.{event}`; an unsafe or missing field value becomes `_`",
    )
    .default("{event}")
    .flag(),
    |f| RoutingKey::parse(f.non_empty()?).map_err(|why| f.invalid(why)),
);
pub const PUBLISH_WINDOW: Setting<usize> = Setting::new(
    Spec::new(
        "publish_window",
        "KALLINA_RELAY_PUBLISH_WINDOW",
        "most publishes awaiting a confirm at once",
    )
    .default("256")
    .flag(),
    |f| f.integer(1, 65_535).map(|n| n as usize),
);
pub const CONFIRM_TIMEOUT: Setting<Duration> = Setting::new(
    Spec::new(
        "confirm_timeout",
        "KALLINA_RELAY_CONFIRM_TIMEOUT",
        "limit of each broker confirm, and of every other broker await",
    )
    .default("30s")
    .flag(),
    |f| f.positive_duration(),
);
pub const QUEUES: Setting<Vec<QueueSpec>> = Setting::new(
    Spec::file_only(
        "queues",
        "consumer queues declared and bound at start: `[[queues]]` with `name`, `bindings`, \
         `type` = `classic`/`quorum`/`stream` (a stream may set `max_length_bytes`, `max_age`)",
    )
    .note("none"),
    |f| {
        let queues: Vec<QueueSpec> = f.table()?;
        for queue in &queues {
            queue.check().map_err(|why| f.invalid(why))?;
        }
        Ok(queues)
    },
);

/// Every setting of this stage, in the order the README lists them.
pub const SETTINGS: &[&Spec] = &[
    &AMQP_URL.spec,
    &BROKER_TLS_CA.spec,
    &BROKER_TLS_CERT.spec,
    &BROKER_TLS_KEY.spec,
    &BROKER_TLS_SERVER_NAME.spec,
    &EXCHANGE.spec,
    &UNROUTED_EXCHANGE.spec,
    &UNROUTED_QUEUE_TYPE.spec,
    &ROUTING_KEY.spec,
    &PUBLISH_WINDOW.spec,
    &CONFIRM_TIMEOUT.spec,
    &QUEUES.spec,
];

/// How the relay publishes.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The broker's nodes and the TLS to reach them.
    pub brokers: Brokers,
    pub topology: Topology,
    /// How each message's routing key is made.
    pub routing_key: RoutingKey,
    pub window: usize,
    /// Limit for every network await: connect, declare, publish, confirm.
    pub confirm_timeout: Duration,
    /// How long stopping waits for outstanding confirms (the service's grace period).
    pub shutdown_grace: Duration,
}

impl RelayOptions {
    pub fn from_values(values: &Values, shutdown_grace: Duration) -> Result<Self, ConfigError> {
        Ok(Self {
            brokers: brokers(values)?,
            topology: Topology {
                exchange: values.get(&EXCHANGE)?,
                unrouted_exchange: values.get(&UNROUTED_EXCHANGE)?,
                unrouted_queue_type: values.get(&UNROUTED_QUEUE_TYPE)?,
                queues: values.get(&QUEUES)?,
            },
            routing_key: values.get(&ROUTING_KEY)?,
            window: values.get(&PUBLISH_WINDOW)?,
            confirm_timeout: values.get(&CONFIRM_TIMEOUT)?,
            shutdown_grace,
        })
    }
}

/// The URLs, and the TLS configuration when any of them is `amqps://`: its files are read now,
/// so that a bad one stops the start naming its setting.
fn brokers(values: &Values) -> Result<Brokers, ConfigError> {
    let nodes = values.get(&AMQP_URL)?;
    let identity = values.both_or_neither(
        (&BROKER_TLS_CERT, "a PEM certificate file"),
        (&BROKER_TLS_KEY, "a PEM private key file"),
    )?;
    let files = BrokerTlsFiles {
        ca: values.get(&BROKER_TLS_CA)?,
        identity,
    };
    let tls = if nodes.iter().any(Node::is_tls) {
        Some(client_config(&files).map_err(|e| match e {
            TlsFileError::Ca(why) => values.field(&BROKER_TLS_CA.spec).invalid(why),
            TlsFileError::Cert(why) => values.field(&BROKER_TLS_CERT.spec).invalid(why),
            TlsFileError::Key(why) => values.field(&BROKER_TLS_KEY.spec).invalid(why),
        })?)
    } else {
        None
    };
    Ok(Brokers::new(
        nodes,
        tls,
        values.get(&BROKER_TLS_SERVER_NAME)?,
    ))
}
