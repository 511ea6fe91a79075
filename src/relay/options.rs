//! The relay's settings: which broker, what it declares there, how many publishes wait for a
//! confirm and how long. Each is declared once, here; see [`crate::config`].

use std::time::Duration;

use super::topology::{QueueSpec, Topology};
use crate::config::{ConfigError, Secret, Setting, Spec, Values};

pub const AMQP_URL: Setting<Secret> = Setting::new(
    Spec::new(
        "amqp_url",
        "KALLINA_RELAY_AMQP_URL",
        "AMQP URL of the broker",
    )
    .default("amqp://guest:guest@127.0.0.1:5672/%2f")
    .secret(),
    |f| {
        let url = f.required()?;
        match url.parse::<lapin::uri::AMQPUri>() {
            Ok(_) => Ok(Secret::new(url)),
            Err(reason) => Err(f.invalid(format!("an amqp:// or amqps:// URL ({reason})"))),
        }
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
         `type` = `classic`/`quorum`",
    )
    .note("none"),
    |f| f.table(),
);

/// Every setting of this stage, in the order the README lists them.
pub const SETTINGS: &[&Spec] = &[
    &AMQP_URL.spec,
    &EXCHANGE.spec,
    &UNROUTED_EXCHANGE.spec,
    &PUBLISH_WINDOW.spec,
    &CONFIRM_TIMEOUT.spec,
    &QUEUES.spec,
];

/// How the relay publishes.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub amqp_url: Secret,
    pub topology: Topology,
    pub window: usize,
    /// Limit for every network await: connect, declare, publish, confirm.
    pub confirm_timeout: Duration,
    /// How long stopping waits for outstanding confirms (the service's grace period).
    pub shutdown_grace: Duration,
}

impl RelayOptions {
    pub fn from_values(values: &Values, shutdown_grace: Duration) -> Result<Self, ConfigError> {
        Ok(Self {
            amqp_url: values.get(&AMQP_URL)?,
            topology: Topology {
                exchange: values.get(&EXCHANGE)?,
                unrouted_exchange: values.get(&UNROUTED_EXCHANGE)?,
                queues: values.get(&QUEUES)?,
            },
            window: values.get(&PUBLISH_WINDOW)?,
            confirm_timeout: values.get(&CONFIRM_TIMEOUT)?,
            shutdown_grace,
        })
    }
}
