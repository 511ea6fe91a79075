//! Envelope parser: arbitrary bytes never panic; what is refused names one of the documented
//! fields; what is accepted is what the contract says it is, read the way a consumer would
//! read it (a plain `serde_json::Value`).

#![no_main]

use kallina_relay::ingress::parse_envelope;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The envelope module's limit: serde_json's default reader refuses the 128th level.
const MAX_DEPTH: usize = 127;

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fuzz_target!(|body: &[u8]| {
    let envelope = match parse_envelope(body) {
        Ok(envelope) => envelope,
        Err(e) => {
            assert!(
                matches!(e.field, "body" | "event" | "timestamp"),
                "undocumented field {:?}",
                e.field
            );
            assert!(!e.reason.is_empty());
            return;
        }
    };

    // Consumers receive these bytes verbatim: they must be one UTF-8 JSON object that a
    // default serde_json reader (the README's consumer is Rust) accepts.
    let text = std::str::from_utf8(body).expect("an accepted body is UTF-8");
    let value: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("an accepted body does not read as JSON: {e}"));
    let object = value.as_object().expect("an accepted body is an object");
    assert!(
        depth(&value) <= MAX_DEPTH,
        "accepted a body nested too deep"
    );

    // `event`: a string of 1 to 255 bytes without control characters, the one in the body.
    let event = &*envelope.event;
    assert!(!event.is_empty() && event.len() <= 255);
    assert!(!event.chars().any(char::is_control));
    assert_eq!(object.get("event").and_then(Value::as_str), Some(event));

    // `timestamp`: the body's RFC 3339 string, to the nanosecond, and it reads back as itself.
    let written = object
        .get("timestamp")
        .and_then(Value::as_str)
        .expect("an accepted body has a string timestamp");
    assert_eq!(
        OffsetDateTime::parse(written, &Rfc3339).ok(),
        Some(envelope.timestamp)
    );
    let formatted = envelope
        .timestamp
        .format(&Rfc3339)
        .expect("an accepted timestamp can be written back as RFC 3339");
    assert_eq!(
        OffsetDateTime::parse(&formatted, &Rfc3339).ok(),
        Some(envelope.timestamp)
    );

    // Deterministic, and blind to what surrounds the two fields.
    let again = parse_envelope(body).expect("the same body parses twice");
    assert_eq!(again, envelope);
    let minimal = serde_json::json!({ "event": event, "timestamp": written }).to_string();
    assert_eq!(parse_envelope(minimal.as_bytes()).ok(), Some(envelope));
});
