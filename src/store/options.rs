//! The store's settings: where it lives, how much it holds and for how long. Each is declared
//! once, here; see [`crate::config`].

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{format_duration, ConfigError, Layers, Setting, Spec, Values};

pub const DATA_DIR: Setting<PathBuf> = Setting::new(
    Spec::new(
        "data_dir",
        "KALLINA_RELAY_DATA_DIR",
        "data directory of the store",
    )
    .default("./data")
    .flag(),
    |f| f.path(),
);
pub const DEDUP_RETENTION: Setting<Duration> = Setting::new(
    Spec::new(
        "dedup_retention",
        "KALLINA_RELAY_DEDUP_RETENTION",
        "how long dedup keys are kept",
    )
    .default("72h")
    .flag()
    .note("must be ≥ tolerance + future skew"),
    |f| f.duration(),
);
pub const OUTBOX_MAX: Setting<u64> = Setting::new(
    Spec::new(
        "outbox_max",
        "KALLINA_RELAY_OUTBOX_MAX",
        "most events waiting for the broker before new ones get 503",
    )
    .default("1000000")
    .flag(),
    |f| f.integer(1, u64::MAX),
);
pub const CACHE_SIZE: Setting<u64> = Setting::new(
    Spec::new("cache_size", "KALLINA_RELAY_CACHE_SIZE", "sled page cache")
        .default("32MiB")
        .note("sled's own default is 1 GiB"),
    |f| f.bytes(1 << 20, 1 << 40),
);
pub const SWEEP_INTERVAL: Setting<Duration> = Setting::new(
    Spec::new(
        "sweep_interval",
        "KALLINA_RELAY_SWEEP_INTERVAL",
        "how often expired dedup keys and archived events are swept",
    )
    .default("60s"),
    |f| f.positive_duration(),
);
pub const ARCHIVE_RETENTION: Setting<Option<Duration>> = Setting::new(
    Spec::new(
        "archive_retention",
        "KALLINA_RELAY_ARCHIVE_RETENTION",
        "how long published events stay in the archive; `0` keeps none",
    )
    .note("the dedup retention; at most that (events are found by their dedup key)"),
    |f| f.optional().map(|_| f.duration()).transpose(),
);

/// Every setting of this stage, in the order the README lists them.
pub const SETTINGS: &[&Spec] = &[
    &DATA_DIR.spec,
    &DEDUP_RETENTION.spec,
    &OUTBOX_MAX.spec,
    &CACHE_SIZE.spec,
    &SWEEP_INTERVAL.spec,
    &ARCHIVE_RETENTION.spec,
];

/// How to open the store and keep it.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub cache_size: u64,
    pub outbox_max: u64,
    /// Dedup keys older than this are swept.
    pub dedup_retention: Duration,
    /// Published events stay in the archive this long (zero: deleted once confirmed).
    pub archive_retention: Duration,
    pub sweep_interval: Duration,
}

impl StoreOptions {
    pub fn from_values(values: &Values) -> Result<Self, ConfigError> {
        let dedup_retention = values.get(&DEDUP_RETENTION)?;
        let archive_retention = values.get(&ARCHIVE_RETENTION)?.unwrap_or(dedup_retention);
        // An archived event is found by its id through its dedup key.
        if archive_retention > dedup_retention {
            return Err(values.field(&ARCHIVE_RETENTION.spec).invalid(format!(
                "a duration of at most the dedup retention ({}): events are looked up by \
                 their dedup key",
                format_duration(dedup_retention)
            )));
        }
        Ok(Self {
            data_dir: values.get(&DATA_DIR)?,
            cache_size: values.get(&CACHE_SIZE)?,
            outbox_max: values.get(&OUTBOX_MAX)?,
            dedup_retention,
            archive_retention,
            sweep_interval: values.get(&SWEEP_INTERVAL)?,
        })
    }

    /// The defaults, on `data_dir`: for tests and benchmarks that open a store of their own.
    pub fn at(data_dir: impl Into<PathBuf>) -> Self {
        let defaults = Layers::default()
            .merge(SETTINGS)
            .and_then(|values| Self::from_values(&values))
            .expect("the declared defaults are valid");
        Self {
            data_dir: data_dir.into(),
            ..defaults
        }
    }

    /// Published events are kept in the archive (else deleted once confirmed).
    pub fn keeps_archive(&self) -> bool {
        !self.archive_retention.is_zero()
    }
}
