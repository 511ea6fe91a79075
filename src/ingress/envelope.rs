//! The envelope fields the receiver must understand: `event` and `timestamp`. Everything else
//! (`data` above all) is skipped, not built into a tree: the body is kept as raw bytes for the
//! relay, and a typed parse of two fields costs a fraction of a `serde_json::Value`.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The verified request body's envelope.
#[derive(Debug, PartialEq)]
pub struct Envelope<'a> {
    pub event: Cow<'a, str>,
    pub timestamp: OffsetDateTime,
}

/// Which field is wrong, and how; becomes `details` of an `invalid_payload` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError {
    pub field: &'static str,
    pub reason: String,
}

impl PayloadError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
}

/// Deepest nesting accepted. serde_json skips unknown fields without recursing, so depth
/// cannot hurt us, but it would reach consumers whose parsers recurse (Python's stops near
/// 1000): refuse what no real event needs.
pub const MAX_DEPTH: usize = 128;

/// Linear scan of brackets outside strings.
fn check_depth(body: &[u8]) -> Result<(), PayloadError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(PayloadError::new(
                        "body",
                        format!("the body is nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Longest event type accepted: it becomes the AMQP routing key, a short string.
const MAX_EVENT_LEN: usize = 255;

pub fn parse(body: &[u8]) -> Result<Envelope<'_>, PayloadError> {
    // serde would also read a JSON array into a struct, field by position: refuse it first.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(PayloadError::new("body", "the body must be a JSON object"));
    }
    // serde_json skips unknown fields without checking their UTF-8; consumers parse it all.
    std::str::from_utf8(body)
        .map_err(|e| PayloadError::new("body", format!("the body is not valid UTF-8: {e}")))?;
    check_depth(body)?;
    let fields: Fields<'_> = serde_json::from_slice(body)
        .map_err(|e| PayloadError::new("body", format!("the body is not valid JSON: {e}")))?;

    let event = fields
        .event
        .ok_or_else(|| PayloadError::new("event", "`event` is missing"))?;
    let event: Cow<'_, str> = serde_json::from_str(event.get())
        .map_err(|_| PayloadError::new("event", "`event` must be a string"))?;
    if event.is_empty() || event.len() > MAX_EVENT_LEN || event.chars().any(char::is_control) {
        return Err(PayloadError::new(
            "event",
            format!("`event` must be 1 to {MAX_EVENT_LEN} bytes without control characters"),
        ));
    }

    let timestamp = fields
        .timestamp
        .ok_or_else(|| PayloadError::new("timestamp", "`timestamp` is missing"))?;
    let timestamp: Cow<'_, str> = serde_json::from_str(timestamp.get())
        .map_err(|_| PayloadError::new("timestamp", "`timestamp` must be a string"))?;
    let timestamp = OffsetDateTime::parse(&timestamp, &Rfc3339).map_err(|_| {
        PayloadError::new(
            "timestamp",
            "`timestamp` must be an RFC 3339 time such as 2025-01-23T10:30:00Z",
        )
    })?;
    Ok(Envelope { event, timestamp })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_platform_example_parses() {
        let body = br#"{"event":"call.ended","timestamp":"2025-01-23T10:30:00Z","data":{"call_id":"call_789","actions":[{"type":"calendar_booking"}]}}"#;
        let envelope = parse(body).unwrap();
        assert_eq!(envelope.event, "call.ended");
        assert_eq!(envelope.timestamp.unix_timestamp(), 1_737_628_200);
    }

    #[test]
    fn each_bad_body_names_its_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"[1,2]", "body"),
            (b"\"call.ended\"", "body"),
            (b"{\"event\":", "body"),
            (b"", "body"),
            (b"{\"timestamp\":\"2025-01-23T10:30:00Z\"}", "event"),
            (
                b"{\"event\":42,\"timestamp\":\"2025-01-23T10:30:00Z\"}",
                "event",
            ),
            (
                b"{\"event\":\"\",\"timestamp\":\"2025-01-23T10:30:00Z\"}",
                "event",
            ),
            (b"{\"event\":\"call.ended\"}", "timestamp"),
            (
                b"{\"event\":\"call.ended\",\"timestamp\":1737628200}",
                "timestamp",
            ),
            (
                b"{\"event\":\"call.ended\",\"timestamp\":\"yesterday\"}",
                "timestamp",
            ),
            (
                b"{\"event\":\"a\",\"event\":\"b\",\"timestamp\":\"2025-01-23T10:30:00Z\"}",
                "body",
            ),
        ];
        for (body, field) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(
                err.field,
                *field,
                "{}: {}",
                String::from_utf8_lossy(body),
                err.reason
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut body = String::from(
            "{\"event\":\"call.ended\",\"timestamp\":\"2025-01-23T10:30:00Z\",\"data\":",
        );
        body.push_str(&"[".repeat(10_000));
        body.push_str(&"]".repeat(10_000));
        body.push('}');
        assert_eq!(parse(body.as_bytes()).unwrap_err().field, "body");
    }

    #[test]
    fn escaped_event_names_are_decoded() {
        let body = br#"{"event":"call\u002eended","timestamp":"2025-01-23T12:30:00+02:00"}"#;
        let envelope = parse(body).unwrap();
        assert_eq!(envelope.event, "call.ended");
        assert_eq!(envelope.timestamp.unix_timestamp(), 1_737_628_200);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..1024)) {
                let _ = parse(&body);
            }

            #[test]
            fn arbitrary_json_shapes_never_panic(body in r#"[\[\]{}",:0-9a-z \\]{0,300}"#) {
                let _ = parse(body.as_bytes());
            }

            #[test]
            fn any_event_name_and_time_round_trip(event in "[a-z_]{1,20}\\.[a-z_]{1,20}", secs in 0i64..4_000_000_000) {
                let t = OffsetDateTime::from_unix_timestamp(secs).unwrap();
                let body = format!(r#"{{"event":"{event}","timestamp":"{}","data":{{}}}}"#, t.format(&Rfc3339).unwrap());
                let parsed = parse(body.as_bytes()).unwrap();
                prop_assert_eq!(parsed.event, event.as_str());
                prop_assert_eq!(parsed.timestamp, t);
            }
        }
    }
}
