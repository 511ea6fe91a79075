//! The admin API's answers as types: the server serializes them and the CLI
//! (`kallina-relay events`) deserializes the same types, so the two cannot drift apart.
//! `docs/admin-api.md` describes them for other clients.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::store::{EventView, QuarantinedView};

/// One stored event, as lists show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventSummary {
    /// The dedup key, which is the AMQP `message_id`.
    pub id: String,
    /// Its place in acceptance order: what `cursor` takes.
    #[serde(default)]
    pub seq: u64,
    pub event: String,
    /// The source it came from (`x-source`).
    #[serde(default)]
    pub source: String,
    /// `pending` (in the outbox) or `published` (confirmed, in the archive).
    pub status: String,
    /// RFC 3339, milliseconds.
    pub received: String,
    pub published: Option<String>,
    pub attempts: u32,
    pub redelivered: bool,
    pub size_bytes: usize,
    /// One line of what it is about: `call_id=…`, `conversation_id=…`, `agent_id=…` of `data`.
    #[serde(default)]
    pub about: Option<String>,
}

impl From<&EventView> for EventSummary {
    fn from(view: &EventView) -> Self {
        Self {
            id: view.record.key.clone(),
            event: view.record.event.clone(),
            source: view.record.source.clone(),
            status: view.status.as_str().to_string(),
            received: rfc3339_ms(view.record.received_at_ms),
            published: view.published_at_ms.map(rfc3339_ms),
            attempts: view.attempts,
            redelivered: view.record.redelivered,
            size_bytes: view.record.body.len(),
            about: about(&view.record.body),
            seq: view.seq,
        }
    }
}

/// `GET /admin/events/{id}`: the summary and the body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventDetail {
    #[serde(flatten)]
    pub summary: EventSummary,
    /// The body as JSON, exactly as received; a body that is not JSON comes as a string.
    pub body: Value,
    /// `X-Kallina-Signature` as received.
    #[serde(default)]
    pub signature: String,
    /// Where its source posts: `/webhooks/kallina` or `/webhooks/<source>`.
    #[serde(default)]
    pub source_path: String,
    /// How it is (or will be) published: exchange, routing key, properties, headers.
    #[serde(default)]
    pub publish: Value,
    /// What happened to it, oldest first.
    #[serde(default)]
    pub timeline: Vec<Step>,
}

/// One step of an event's life.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// RFC 3339, milliseconds.
    pub at: String,
    pub what: String,
}

impl EventDetail {
    /// The event, with `publish` from the relay's settings.
    pub fn of(view: &EventView, publish: Value) -> Self {
        let record = &view.record;
        let body = &record.body;
        let received = rfc3339_ms(record.received_at_ms);
        let mut timeline = vec![Step {
            at: received.clone(),
            what: "received; stored durably before the 2xx answer".into(),
        }];
        if record.redelivered {
            timeline.push(Step {
                at: received,
                what: format!(
                    "put back by an operator ({} earlier publish attempts)",
                    record.attempts_before
                ),
            });
        }
        match view.published_at_ms {
            Some(at) => timeline.push(Step {
                at: rfc3339_ms(at),
                what: format!(
                    "published: confirmed by the broker after {} attempt(s)",
                    view.attempts
                ),
            }),
            None => timeline.push(Step {
                at: rfc3339_ms(crate::store::unix_millis(std::time::SystemTime::now())),
                what: format!(
                    "waiting in the outbox ({} attempt(s) so far)",
                    view.attempts
                ),
            }),
        }
        // A named source's keys carry its name (`<source>:<sha256>`).
        let source_path = if record.key.contains(':') {
            format!("/webhooks/{}", record.source)
        } else {
            "/webhooks/kallina".into()
        };
        Self {
            summary: view.into(),
            // Bodies were checked to be UTF-8 JSON when they were accepted.
            body: serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned())),
            signature: record.signature.clone(),
            source_path,
            publish,
            timeline,
        }
    }
}

/// What an event is about, from the ids in its `data`: every one present, in this order.
pub fn about(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let data = value.get("data")?;
    let facts: Vec<String> = ["call_id", "conversation_id", "agent_id"]
        .iter()
        .filter_map(|key| Some(format!("{key}={}", data.get(*key)?.as_str()?)))
        .collect();
    (!facts.is_empty()).then(|| facts.join(" "))
}

/// `GET /admin/events`: one page, and where the next one starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<EventSummary>,
    pub next_cursor: Option<String>,
}

/// `POST /admin/events/{id}/redeliver`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redelivered {
    pub id: String,
    pub status: String,
}

/// `POST /admin/redrive`: how many archived events matched, and whether that was all it did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RedriveStarted {
    pub matched: usize,
    pub dry_run: bool,
}

/// One quarantined outbox record: what can be read of it, and why it was set aside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantinedEvent {
    /// Its place in the outbox; what `POST /admin/quarantine/{seq}/redeliver` takes.
    pub seq: String,
    pub quarantined: String,
    pub reason: String,
    pub size_bytes: usize,
    /// The event's `message_id` and type, when the record decodes.
    pub id: Option<String>,
    pub event: Option<String>,
}

impl From<&QuarantinedView> for QuarantinedEvent {
    fn from(view: &QuarantinedView) -> Self {
        Self {
            seq: view.seq.to_string(),
            quarantined: rfc3339_ms(view.quarantined_at_ms),
            reason: view.reason.clone(),
            size_bytes: view.size_bytes,
            id: view.record.as_ref().map(|r| r.key.clone()),
            event: view.record.as_ref().map(|r| r.event.clone()),
        }
    }
}

/// `GET /admin/quarantine`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineList {
    pub events: Vec<QuarantinedEvent>,
    pub next_cursor: Option<String>,
}

/// Unix milliseconds as RFC 3339, the form every time in the admin API takes.
pub fn rfc3339_ms(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}
