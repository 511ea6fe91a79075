//! What the outbox holds for one event: everything the relay needs to publish it, so that the
//! relay never has to look anywhere else (and a restarted process has all it needs).

use serde::{Deserialize, Serialize};

use crate::trace::TraceContext;

/// Bumped when the layout changes, so that an unknown layout is refused, not misread. Versions 1
/// (before redelivery), 2 (before the delivery id) and 3 (before the trace context) are still
/// read.
const FORMAT_VERSION: u8 = 4;
const FORMAT_VERSION_1: u8 = 1;
const FORMAT_VERSION_2: u8 = 2;
const FORMAT_VERSION_3: u8 = 3;

/// Prefix of a delivery id's dedup key, so that an id can never equal a body's hash.
const DELIVERY_ID_PREFIX: &str = "id:";

/// One accepted event waiting in the outbox for the broker's confirm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecord {
    /// The SHA-256 of the body (hex): always a dedup key, because the signature covers the body.
    /// Becomes `message_id`.
    pub key: String,
    /// The envelope's `event`, the routing key.
    pub event: String,
    /// `X-Kallina-Signature` as received, passed on so consumers can re-verify.
    pub signature: String,
    /// Receive time, Unix milliseconds.
    pub received_at_ms: u64,
    /// The configured source name (`x-source`).
    pub source: String,
    /// The request body, byte for byte.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Put back by an operator (redeliver or redrive): published with `x-redelivered: true`.
    pub redelivered: bool,
    /// Publish attempts made before this record was put back, so the admin API can count all.
    pub attempts_before: u32,
    /// The delivery-id header's value, where `id_header` is configured and the request had one:
    /// a second dedup key (a request is a duplicate if either was seen), sent as
    /// `x-delivery-id`.
    pub delivery_id: Option<String>,
    /// The trace the event belongs to and the relay's receive span in it; `None` for events
    /// stored before trace context was kept (they are published without `traceparent`).
    pub trace: Option<TraceContext>,
}

/// The version-3 layout: no trace context.
#[derive(Deserialize)]
struct OutboxRecordV3 {
    key: String,
    event: String,
    signature: String,
    received_at_ms: u64,
    source: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    redelivered: bool,
    attempts_before: u32,
    delivery_id: Option<String>,
}

impl From<OutboxRecordV3> for OutboxRecord {
    fn from(v3: OutboxRecordV3) -> Self {
        Self {
            key: v3.key,
            event: v3.event,
            signature: v3.signature,
            received_at_ms: v3.received_at_ms,
            source: v3.source,
            body: v3.body,
            redelivered: v3.redelivered,
            attempts_before: v3.attempts_before,
            delivery_id: v3.delivery_id,
            trace: None,
        }
    }
}

/// The version-2 layout: no delivery id (its key was the id when one was configured).
#[derive(Deserialize)]
struct OutboxRecordV2 {
    key: String,
    event: String,
    signature: String,
    received_at_ms: u64,
    source: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    redelivered: bool,
    attempts_before: u32,
}

impl From<OutboxRecordV2> for OutboxRecord {
    fn from(v2: OutboxRecordV2) -> Self {
        Self {
            key: v2.key,
            event: v2.event,
            signature: v2.signature,
            received_at_ms: v2.received_at_ms,
            source: v2.source,
            body: v2.body,
            redelivered: v2.redelivered,
            attempts_before: v2.attempts_before,
            delivery_id: None,
            trace: None,
        }
    }
}

/// The version-1 layout: no redelivery fields.
#[derive(Deserialize)]
struct OutboxRecordV1 {
    key: String,
    event: String,
    signature: String,
    received_at_ms: u64,
    source: String,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
}

impl From<OutboxRecordV1> for OutboxRecord {
    fn from(v1: OutboxRecordV1) -> Self {
        Self {
            key: v1.key,
            event: v1.event,
            signature: v1.signature,
            received_at_ms: v1.received_at_ms,
            source: v1.source,
            body: v1.body,
            redelivered: false,
            attempts_before: 0,
            delivery_id: None,
            trace: None,
        }
    }
}

impl OutboxRecord {
    /// Every dedup key of the event: the body's hash, and its delivery id if it has one.
    pub fn dedup_keys(&self) -> Vec<String> {
        dedup_keys(&self.key, self.delivery_id.as_deref())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        postcard::to_io(self, &mut out).expect("writing to a Vec cannot fail");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        match bytes.split_first() {
            Some((&FORMAT_VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| RecordError::Corrupt(e.to_string()))
            }
            Some((&FORMAT_VERSION_3, rest)) => postcard::from_bytes::<OutboxRecordV3>(rest)
                .map(Self::from)
                .map_err(|e| RecordError::Corrupt(e.to_string())),
            Some((&FORMAT_VERSION_2, rest)) => postcard::from_bytes::<OutboxRecordV2>(rest)
                .map(Self::from)
                .map_err(|e| RecordError::Corrupt(e.to_string())),
            Some((&FORMAT_VERSION_1, rest)) => postcard::from_bytes::<OutboxRecordV1>(rest)
                .map(Self::from)
                .map_err(|e| RecordError::Corrupt(e.to_string())),
            Some((&other, _)) => Err(RecordError::UnknownVersion(other)),
            None => Err(RecordError::Corrupt("empty record".into())),
        }
    }
}

/// The dedup keys of an event with this body hash and delivery id.
pub fn dedup_keys(key: &str, delivery_id: Option<&str>) -> Vec<String> {
    std::iter::once(key.to_string())
        .chain(delivery_id.map(|id| delivery_dedup_key(key, id)))
        .collect()
}

/// The second dedup key of an event whose first is `key`: its delivery id, in the namespace of
/// `key`'s source.
pub fn delivery_dedup_key(key: &str, delivery_id: &str) -> String {
    match key.split_once(':') {
        Some((source, _)) => format!("{source}:{}", delivery_key(delivery_id)),
        None => delivery_key(delivery_id),
    }
}

/// The dedup key a delivery id of the default source is stored under. A named source's keys
/// are `<source>:<sha256>` and `<source>:id:<value>` (see `ingress::sources`): source names
/// hold no `:` and `id` is not one, so no two sources' keys can meet.
pub fn delivery_key(delivery_id: &str) -> String {
    format!("{DELIVERY_ID_PREFIX}{delivery_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("outbox record written by an unknown format version {0}")]
    UnknownVersion(u8),
    #[error("outbox record cannot be read: {0}")]
    Corrupt(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_byte_for_byte() {
        let record = OutboxRecord {
            key: "ab".repeat(32),
            event: "call.ended".into(),
            signature: format!("sha256={}", "0".repeat(64)),
            received_at_ms: 1_737_628_200_123,
            source: "relay-a".into(),
            body: b"{\"event\":\"call.ended\",  \"data\":{\"x\":\"\xc8\x99\"}}".to_vec(),
            redelivered: true,
            attempts_before: 3,
            delivery_id: Some("d-1".into()),
            trace: None,
        };
        assert_eq!(OutboxRecord::decode(&record.encode()).unwrap(), record);
        assert_eq!(record.dedup_keys(), ["ab".repeat(32), "id:d-1".to_string()]);
    }

    #[test]
    fn a_version_1_record_is_still_read() {
        #[derive(Serialize)]
        struct V1<'a> {
            key: &'a str,
            event: &'a str,
            signature: &'a str,
            received_at_ms: u64,
            source: &'a str,
            #[serde(with = "serde_bytes")]
            body: &'a [u8],
        }
        let mut bytes = vec![FORMAT_VERSION_1];
        let v1 = V1 {
            key: "k",
            event: "call.started",
            signature: "sha256=00",
            received_at_ms: 7,
            source: "s",
            body: b"{}",
        };
        postcard::to_io(&v1, &mut bytes).unwrap();
        let record = OutboxRecord::decode(&bytes).unwrap();
        assert_eq!(
            (record.key.as_str(), record.body.as_slice()),
            ("k", &b"{}"[..])
        );
        assert!(!record.redelivered);
    }

    #[test]
    fn a_version_2_record_is_still_read() {
        #[derive(Serialize)]
        struct V2<'a> {
            key: &'a str,
            event: &'a str,
            signature: &'a str,
            received_at_ms: u64,
            source: &'a str,
            #[serde(with = "serde_bytes")]
            body: &'a [u8],
            redelivered: bool,
            attempts_before: u32,
        }
        let mut bytes = vec![FORMAT_VERSION_2];
        let v2 = V2 {
            key: "k",
            event: "call.started",
            signature: "sha256=00",
            received_at_ms: 7,
            source: "s",
            body: b"{}",
            redelivered: true,
            attempts_before: 2,
        };
        postcard::to_io(&v2, &mut bytes).unwrap();
        let record = OutboxRecord::decode(&bytes).unwrap();
        assert_eq!((record.redelivered, record.attempts_before), (true, 2));
        assert_eq!(record.delivery_id, None);
    }

    #[test]
    fn an_unknown_version_is_refused() {
        assert!(matches!(
            OutboxRecord::decode(&[9, 1, 2]),
            Err(RecordError::UnknownVersion(9))
        ));
        assert!(OutboxRecord::decode(&[]).is_err());
    }
}
