//! The admin listener's settings. Each is declared once, here; see [`crate::config`].

use std::net::SocketAddr;

use crate::config::{ConfigError, Secret, Setting, Spec, Values};

pub const ADMIN_LISTEN: Setting<SocketAddr> = Setting::new(
    Spec::new(
        "admin_listen",
        "KALLINA_RELAY_ADMIN_LISTEN",
        "admin listener address (metrics, health, admin API)",
    )
    .default("127.0.0.1:9090")
    .flag(),
    |f| f.socket_addr(),
);
pub const ADMIN_TOKEN: Setting<Option<Secret>> = Setting::new(
    Spec::new(
        "admin_token",
        "KALLINA_RELAY_ADMIN_TOKEN",
        "bearer token of the admin API, at least 16 characters",
    )
    .secret()
    .note("unset: the admin API answers 404 and the start logs `admin API off`"),
    |f| match f.optional() {
        None => Ok(None),
        Some(token) if token.len() < 16 => Err(f.invalid("a token of at least 16 characters")),
        Some(token) => Ok(Some(Secret::new(token))),
    },
);
pub const REDRIVE_RATE: Setting<u32> = Setting::new(
    Spec::new(
        "redrive_rate",
        "KALLINA_RELAY_REDRIVE_RATE",
        "events per second a redrive republishes at most",
    )
    .default("500"),
    |f| f.integer(1, 1_000_000).map(|n| n as u32),
);

/// Every setting of this stage, in the order the README lists them.
pub const SETTINGS: &[&Spec] = &[&ADMIN_LISTEN.spec, &ADMIN_TOKEN.spec, &REDRIVE_RATE.spec];

/// How the admin listener runs.
#[derive(Debug, Clone)]
pub struct AdminOptions {
    pub listen: SocketAddr,
    /// Bearer token of `/admin/`; `None` turns the admin API off.
    pub token: Option<Secret>,
    /// Events per second a redrive republishes at most.
    pub redrive_rate: u32,
}

impl AdminOptions {
    pub fn from_values(values: &Values) -> Result<Self, ConfigError> {
        Ok(Self {
            listen: values.get(&ADMIN_LISTEN)?,
            token: values.get(&ADMIN_TOKEN)?,
            redrive_rate: values.get(&REDRIVE_RATE)?,
        })
    }
}
