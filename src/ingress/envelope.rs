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
/// cannot hurt us, but it would reach consumers whose parsers recurse: serde_json's own reader
/// (a Rust consumer's, with its default limit) refuses the 128th level, Python's stops near
/// 1000. Refuse what one of them cannot read and no real event needs.
pub const MAX_DEPTH: usize = 127;

/// What serde_json skips unchecked in an unknown field but refuses when a consumer reads it:
/// nesting deeper than [`MAX_DEPTH`], unpaired UTF-16 surrogate escapes (`"\udbab"` alone),
/// and numbers beyond the range of an `f64` (`4e444`). One linear scan.
fn check_readable(body: &[u8]) -> Result<(), PayloadError> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'"' => i = skip_string(body, i + 1)?,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(PayloadError::new(
                        "body",
                        format!("the body is nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => i = skip_number(body, i)?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// From just after a string's opening quote to just after its closing one (or to the end: an
/// unterminated string is serde_json's to refuse).
fn skip_string(body: &[u8], mut i: usize) -> Result<usize, PayloadError> {
    let lone = || {
        PayloadError::new(
            "body",
            "the body has an unpaired UTF-16 surrogate escape (\\uD800 to \\uDFFF), which \
             JSON readers refuse",
        )
    };
    while i < body.len() {
        match body[i] {
            b'"' => return Ok(i + 1),
            b'\\' if body.get(i + 1) == Some(&b'u') => match hex4(body, i + 2) {
                Some(0xD800..=0xDBFF) => {
                    let low = body.get(i + 6..i + 8) == Some(&b"\\u"[..])
                        && matches!(hex4(body, i + 8), Some(0xDC00..=0xDFFF));
                    if !low {
                        return Err(lone());
                    }
                    i += 12;
                }
                Some(0xDC00..=0xDFFF) => return Err(lone()),
                _ => i += 6,
            },
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// From the start of a number to just after it. serde_json refuses one that reads as an
/// infinite `f64` (Python and JavaScript make it infinity); the bound leaves room for serde_json's
/// rounding, and no event carries a number near 1e308.
fn skip_number(body: &[u8], start: usize) -> Result<usize, PayloadError> {
    let len = body[start..]
        .iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .unwrap_or(body.len() - start);
    let token = &body[start..start + len];
    // Only an exponent or more than 308 digits can leave the range of an f64.
    if len > 308 || token.iter().any(|b| matches!(b, b'e' | b'E')) {
        let value = std::str::from_utf8(token)
            .ok()
            .and_then(|t| t.parse::<f64>().ok());
        if value.is_some_and(|v| v.abs() > 1e308) {
            return Err(PayloadError::new(
                "body",
                "the body has a number beyond the range of a 64-bit float, which JSON readers \
                 refuse or read as infinity",
            ));
        }
    }
    Ok(start + len)
}

fn hex4(body: &[u8], at: usize) -> Option<u16> {
    let digits = body.get(at..at + 4)?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
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
    check_readable(body)?;
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
    fn nesting_stops_where_serde_json_stops() {
        let nested = |levels: usize| {
            let inner = levels - 1;
            format!(
                "{{\"event\":\"a\",\"timestamp\":\"2025-01-23T10:30:00Z\",\"d\":{}{}}}",
                "[".repeat(inner),
                "]".repeat(inner)
            )
        };
        let deepest = nested(MAX_DEPTH);
        assert!(parse(deepest.as_bytes()).is_ok());
        assert!(serde_json::from_str::<serde_json::Value>(&deepest).is_ok());
        // Caught by the envelope fuzz target's invariant: 128 levels were accepted, which
        // serde_json refuses.
        let deeper = nested(MAX_DEPTH + 1);
        assert!(serde_json::from_str::<serde_json::Value>(&deeper).is_err());
        assert_eq!(parse(deeper.as_bytes()).unwrap_err().field, "body");
    }

    #[test]
    fn unpaired_surrogate_escapes_are_refused_anywhere() {
        // The envelope fuzz target's minimised input: accepted, then unreadable by consumers.
        let found = br#"{ "event":"p","timestamp":"2025-01-23T10:28:41Z","":{"":[{"":[ {"":"\udBaB"}],"": ""}]}}"#;
        assert_eq!(parse(found).unwrap_err().field, "body");
        let with = |text: &str| {
            format!(
                r#"{{"event":"a","timestamp":"2025-01-23T10:30:00Z","data":{{"{text}":"{text}"}}}}"#
            )
        };
        for lone in [
            r"\ud800",
            r"\uDBFFx",
            r"\udc00",
            r"\ud800\u0041",
            r"\ud800\ud800",
            r"\\\ud800",
        ] {
            let body = with(lone);
            assert!(
                serde_json::from_str::<serde_json::Value>(&body).is_err(),
                "{body}"
            );
            assert_eq!(parse(body.as_bytes()).unwrap_err().field, "body", "{body}");
        }
        for fine in [
            r"\ud83d\ude00",
            r"\u00e9",
            r"\\ud800",
            r"\\\\ud800",
            r#"\"\ud83d\uDE00"#,
        ] {
            let body = with(fine);
            assert!(
                serde_json::from_str::<serde_json::Value>(&body).is_ok(),
                "{body}"
            );
            assert!(parse(body.as_bytes()).is_ok(), "{body}");
        }
    }

    #[test]
    fn numbers_beyond_a_64_bit_float_are_refused_anywhere() {
        // The envelope fuzz target's minimised input: accepted, then unreadable by serde_json.
        let found =
            b"{\"event\":\"9\",\n\"timestamp\":\"2025-01-23T10:28:41Z\",\"\":{\"\":[4e444]}\n}";
        assert_eq!(parse(found).unwrap_err().field, "body");
        let with = |number: &str| {
            format!(r#"{{"event":"a","timestamp":"2025-01-23T10:30:00Z","data":[{number}]}}"#)
        };
        let digits_400 = format!("1{}", "0".repeat(400));
        for huge in [
            "1e309",
            "-1E+309",
            "4e444444444444",
            "0.1e310",
            digits_400.as_str(),
        ] {
            let body = with(huge);
            assert!(
                serde_json::from_str::<serde_json::Value>(&body).is_err(),
                "{huge}"
            );
            assert_eq!(parse(body.as_bytes()).unwrap_err().field, "body", "{huge}");
        }
        let digits_300 = format!("1{}", "0".repeat(300));
        for fine in [
            "1e308",
            "-1.5e-400",
            "123456789012345678901234567890",
            "0",
            digits_300.as_str(),
        ] {
            let body = with(fine);
            assert!(
                serde_json::from_str::<serde_json::Value>(&body).is_ok(),
                "{fine}"
            );
            assert!(parse(body.as_bytes()).is_ok(), "{fine}");
        }
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
