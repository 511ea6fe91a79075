//! What a published message looks like: the outbound contract's properties and headers
//! (`docs/` and the README's consumer section describe them for consumers).

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::store::OutboxRecord;
use crate::trace::TraceContext;

const APP_ID: &str = "kallina-relay";

/// Message properties as the outbound contract promises them.
/// `span` is the publish span, when the record belongs to a trace: the message carries it as
/// `traceparent` (and the caller's `tracestate`).
pub(super) fn properties(record: &OutboxRecord, span: Option<&TraceContext>) -> BasicProperties {
    let received =
        OffsetDateTime::from_unix_timestamp_nanos(record.received_at_ms as i128 * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let mut headers = FieldTable::default();
    let mut header = |name: &str, value: &str| {
        headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
    };
    header("x-kallina-signature", &record.signature);
    header(
        "x-received-at",
        &received.format(&Rfc3339).unwrap_or_default(),
    );
    header("x-source", &record.source);
    if let Some(id) = &record.delivery_id {
        header("x-delivery-id", id);
    }
    if let Some(span) = span {
        header("traceparent", &span.traceparent());
        if let Some(state) = &span.tracestate {
            header("tracestate", state);
        }
    }
    if record.redelivered {
        headers.insert("x-redelivered".into(), AMQPValue::Boolean(true));
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(record.key.as_str().into())
        .with_type(record.event.as_str().into())
        .with_timestamp(record.received_at_ms / 1000)
        .with_app_id(APP_ID.into())
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_follow_the_contract() {
        let record = OutboxRecord {
            key: "k1".into(),
            event: "call.ended".into(),
            signature: "sha256=ab".into(),
            received_at_ms: 1_737_628_200_500,
            source: "relay-a".into(),
            body: b"{}".to_vec(),
            redelivered: false,
            attempts_before: 0,
            delivery_id: None,
            trace: None,
        };
        let p = properties(&record, None);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("k1"));
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("call.ended"));
        assert_eq!(p.timestamp(), &Some(1_737_628_200));
        let headers = p.headers().as_ref().unwrap().inner();
        let received = headers.get("x-received-at").unwrap();
        assert_eq!(
            received,
            &AMQPValue::LongString("2025-01-23T10:30:00.5Z".into())
        );
    }
}
