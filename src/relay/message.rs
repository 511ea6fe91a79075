//! What a published message looks like: the outbound contract's properties and headers
//! (`docs/` and the README's consumer section describe them for consumers).

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use serde_json::{json, Value};

use super::routing::RoutingKey;
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

/// How `record` is (or will be) published, as JSON for the admin API: the exchange, the routing
/// key, the properties and the headers. The `traceparent` names a publish span that is made
/// anew at each publish, so its span id here is a placeholder.
pub fn preview(record: &OutboxRecord, exchange: &str, routing_key: &RoutingKey) -> Value {
    let span = record.trace.as_ref().map(|trace| TraceContext {
        span_id: "<publish span>".into(),
        ..trace.clone()
    });
    let p = properties(record, span.as_ref());
    let text = |s: &Option<lapin::types::ShortString>| s.as_ref().map(|s| s.to_string());
    let headers: serde_json::Map<String, Value> = p
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        AMQPValue::LongString(s) => Value::String(s.to_string()),
                        AMQPValue::Boolean(b) => Value::Bool(*b),
                        other => Value::String(format!("{other:?}")),
                    };
                    (k.to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "exchange": exchange,
        "routing_key": routing_key.render(record),
        "properties": {
            "delivery_mode": p.delivery_mode(),
            "content_type": text(p.content_type()),
            "message_id": text(p.message_id()),
            "type": text(p.kind()),
            "timestamp": p.timestamp(),
            "app_id": text(p.app_id()),
        },
        "headers": headers,
    })
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
