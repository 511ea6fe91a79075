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
}

impl From<&EventView> for EventDetail {
    fn from(view: &EventView) -> Self {
        let body = &view.record.body;
        Self {
            summary: view.into(),
            // Bodies were checked to be UTF-8 JSON when they were accepted.
            body: serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned())),
        }
    }
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
