//! The duration and size parsers of the settings (`90s`, `5m`, `24h`, `7d`; `262144`,
//! `256KiB`, `1MiB`): any text gives an answer, never a panic, and the answers agree with what
//! the README documents.

#![no_main]

use std::time::Duration;

use kallina_relay::config::{format_duration, parse_duration, parse_size};
use libfuzzer_sys::fuzz_target;

/// The documented size units and a few obvious relatives.
const UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1000),
    ("MB", 1000 * 1000),
    ("GB", 1000 * 1000 * 1000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// `<whole number><optional space><unit>` → (number, unit factor).
fn whole_with_unit(text: &str) -> Option<(u64, u64)> {
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let n = text[..digits].parse::<u64>().ok()?;
    let unit = text[digits..].trim_start_matches(' ');
    UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, factor)| (n, *factor))
}

fuzz_target!(|text: &str| {
    let duration = parse_duration(text);
    let size = parse_size(text);

    // Values are trimmed: surrounding whitespace never changes the answer.
    let padded = format!(" \t{text}\n ");
    assert_eq!(parse_duration(&padded), duration);
    assert_eq!(parse_size(&padded), size);

    // A bare number is seconds, or bytes, exactly.
    if let Ok(n) = text.trim().parse::<u64>() {
        assert_eq!(duration, Some(Duration::from_secs(n)));
        assert_eq!(size, Some(n));
    }

    // What the service prints (its start line, its messages) reads back, to the second.
    if let Some(d) = duration {
        let printed = format_duration(d);
        assert_eq!(
            parse_duration(&printed).map(|p| p.as_secs()),
            Some(d.as_secs()),
            "{printed:?}"
        );
    }

    // `<n><unit>` is n × unit exactly; past 64 bits it is refused or saturates (then the
    // setting's own range refuses it), it never wraps around to a small value.
    if let Some((n, factor)) = whole_with_unit(text.trim()) {
        match n.checked_mul(factor) {
            Some(exact) => assert_eq!(size, Some(exact)),
            None => assert!(matches!(size, None | Some(u64::MAX)), "{size:?}"),
        }
    }
});
