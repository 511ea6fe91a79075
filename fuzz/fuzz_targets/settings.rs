//! The settings as a whole, built from fuzzed values of the durations, sizes and numbers: a
//! bad value stops the start with an error naming it (exit code 2), never a panic.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use kallina_relay::config::Layers;
use kallina_relay::settings::Settings;
use libfuzzer_sys::fuzz_target;

/// The environment variables of the settings that go through the duration, size and number
/// parsers.
const VARIABLES: &[&str] = &[
    "KALLINA_RELAY_TOLERANCE",
    "KALLINA_RELAY_FUTURE_SKEW",
    "KALLINA_RELAY_DEDUP_RETENTION",
    "KALLINA_RELAY_BODY_TIMEOUT",
    "KALLINA_RELAY_SWEEP_INTERVAL",
    "KALLINA_RELAY_CONFIRM_TIMEOUT",
    "KALLINA_RELAY_SHUTDOWN_GRACE",
    "KALLINA_RELAY_MAX_BODY",
    "KALLINA_RELAY_CACHE_SIZE",
    "KALLINA_RELAY_MAX_CONNECTIONS",
    "KALLINA_RELAY_OUTBOX_MAX",
    "KALLINA_RELAY_PUBLISH_WINDOW",
];

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    values: Vec<(u8, &'a str)>,
}

fuzz_target!(|input: Input<'_>| {
    let mut env = BTreeMap::from([(
        "KALLINA_WEBHOOK_SECRET".to_string(),
        "fuzz-secret".to_string(),
    )]);
    for (which, value) in input.values {
        let name = VARIABLES[usize::from(which) % VARIABLES.len()];
        env.insert(name.to_string(), value.to_string());
    }
    let layers = Layers {
        env,
        ..Layers::default()
    };
    match Settings::load(&layers) {
        Ok(settings) => {
            let (ingress, store) = (&settings.ingress, &settings.store);
            assert!(store.dedup_retention >= ingress.tolerance + ingress.future_skew);
            assert!((1..=64 << 20).contains(&ingress.max_body));
            let _ = settings.summary();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
