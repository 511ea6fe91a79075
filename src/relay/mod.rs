//! The relay: drains the outbox onto the RabbitMQ topic exchange, in order, with publisher
//! confirms, and deletes an event from the outbox only after the broker confirmed it.
//!
//! One session = one connection + one confirm-mode channel. A session reads the outbox from
//! its start (everything there is unconfirmed by definition), keeps up to `publish_window`
//! publishes outstanding, and ends on any network failure or confirm timeout; the relay then
//! reconnects with capped, jittered exponential backoff and starts the next session from the
//! outbox's start again. That re-publishes whatever was in flight, which is the "at least once"
//! consumers are promised, keyed by `message_id`.
//!
//! A nacked or returned message is not a session failure: it is counted, set aside for a pause,
//! and published again; the outbox keeps it meanwhile.

pub mod options;
mod status;
mod topology;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{FuturesOrdered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Event};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::time::{sleep, timeout};

pub use options::RelayOptions;
pub use status::{BrokerState, BrokerStatus};
pub use topology::{refused_with, QueueSpec, QueueType, Topology, TopologyError};

use crate::config::redact_url;
use crate::metrics::{event_label, Metrics};
use crate::shutdown::Shutdown;
use crate::store::{
    unix_millis, Confirmed, OutboxEntry, OutboxRead, OutboxRecord, Store, StoreError, Unreadable,
};

/// How long a nacked or returned message waits before it is published again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Outbox records read at once into the relay's read-ahead buffer.
const READ_AHEAD: usize = 1024;
/// Confirmed sequence numbers are deleted from the outbox in batches of up to this many.
const DELETE_BATCH: usize = 256;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
const APP_ID: &str = "kallina-relay";

/// Why a session ended early; the relay reconnects after each of these.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connection to the broker failed: {0}")]
    Connection(String),
    #[error("channel error: {0}")]
    Channel(String),
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("outbox: {0}")]
    Store(#[from] StoreError),
    #[error("outbox task failed: {0}")]
    StoreTask(#[from] tokio::task::JoinError),
}

impl SessionError {
    /// The `reason` label of `kallina_relay_publish_errors_total`.
    fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Connection(_) => Some("connection"),
            Self::Channel(_) => Some("channel"),
            Self::Timeout(_) => Some("timeout"),
            Self::Topology(_) | Self::Store(_) | Self::StoreTask(_) => None,
        }
    }
}

/// The relay task. Build it, then `run` it until shutdown.
pub struct Relay {
    store: Store,
    options: RelayOptions,
    metrics: Metrics,
    status: BrokerStatus,
    /// Publishes per outbox record so far (across sessions), until it is confirmed: the
    /// archive keeps the total for the admin API.
    attempts: Mutex<HashMap<u64, u32>>,
}

/// A publish waiting for its confirm: resolves to the record and what the broker said.
type PendingConfirm = Pin<Box<dyn Future<Output = ConfirmOutcome> + Send>>;

/// A record the broker nacked or returned, published again once `due`.
struct Retry {
    due: Instant,
    entry: OutboxEntry,
}

struct ConfirmOutcome {
    entry: OutboxEntry,
    published_at: Instant,
    result: Result<Confirmation, SessionError>,
}

impl Relay {
    pub fn new(
        store: Store,
        options: RelayOptions,
        metrics: Metrics,
        status: BrokerStatus,
    ) -> Self {
        Self {
            store,
            options,
            metrics,
            status,
            attempts: Mutex::default(),
        }
    }

    /// Publishes until `shutdown` fires, reconnecting as often as needed.
    pub async fn run(self, mut shutdown: Shutdown) {
        let url = redact_url(self.options.amqp_url.expose());
        let mut failures: u32 = 0;
        while !shutdown.is_triggered() {
            self.status.set(BrokerState::Connecting);
            let result = self.session(&mut shutdown, &mut failures).await;
            self.metrics.broker_connected.set(0);
            let error = match result {
                Ok(()) => break,
                Err(error) => error,
            };
            if let Some(reason) = error.reason() {
                self.metrics
                    .publish_errors
                    .with_label_values(&[reason])
                    .inc();
            }
            let state = match &error {
                SessionError::Topology(TopologyError::Clash { .. }) => BrokerState::TopologyError {
                    reason: error.to_string(),
                },
                _ => BrokerState::Disconnected {
                    reason: error.to_string(),
                },
            };
            self.status.set(state);
            failures = failures.saturating_add(1);
            let pause = backoff(failures);
            tracing::warn!(broker = %url, error = %error, retry_in_ms = pause.as_millis() as u64, "relay session ended");
            tokio::select! {
                _ = sleep(pause) => {}
                _ = shutdown.recv() => break,
            }
        }
        self.status.set(BrokerState::Stopped);
        tracing::info!("relay stopped");
    }

    async fn connect(&self) -> Result<(Connection, Channel), SessionError> {
        let limit = self.options.confirm_timeout;
        let connection = timeout(
            limit,
            Connection::connect(
                self.options.amqp_url.expose(),
                ConnectionProperties::default(),
            ),
        )
        .await
        .map_err(|_| SessionError::Connection(format!("no answer within {limit:?}")))?
        .map_err(|e| SessionError::Connection(e.to_string()))?;
        let channel = timeout(limit, connection.create_channel())
            .await
            .map_err(|_| SessionError::Timeout(limit))?
            .map_err(|e| SessionError::Channel(e.to_string()))?;
        self.options.topology.declare(&channel, limit).await?;
        timeout(
            limit,
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        .map_err(|_| SessionError::Timeout(limit))?
        .map_err(|e| SessionError::Channel(e.to_string()))?;
        Ok((connection, channel))
    }

    /// One connection's life. `Ok` means shutdown was requested and handled.
    async fn session(
        &self,
        shutdown: &mut Shutdown,
        failures: &mut u32,
    ) -> Result<(), SessionError> {
        let (connection, channel) = tokio::select! {
            c = self.connect() => c?,
            _ = shutdown.recv() => return Ok(()),
        };
        *failures = 0;
        self.status.set(BrokerState::Connected);
        self.metrics.broker_connected.set(1);
        tracing::info!(exchange = %self.options.topology.exchange, "relay connected; topology declared");

        let mut events = connection.events_listener();
        let mut durable = self.store.durability();
        let mut pending: FuturesOrdered<PendingConfirm> = FuturesOrdered::new();
        let mut confirmed: Vec<Confirmed> = Vec::new();
        let mut retry: VecDeque<Retry> = VecDeque::new();
        let mut cursor: Option<u64> = None;
        let mut read_ahead: VecDeque<OutboxEntry> = VecDeque::new();

        let result = loop {
            // Fill the window: due retries first, then the outbox in order, read ahead in
            // chunks so that a full window does not cost one outbox scan per publish.
            while pending.len() < self.options.window {
                let next = match retry.front() {
                    Some(r) if r.due <= Instant::now() => retry.pop_front().map(|r| r.entry),
                    _ => None,
                };
                let next = match next {
                    Some(item) => item,
                    None => {
                        // Records that do not decode are set aside, so that nothing behind
                        // them waits; read on until something is publishable or nothing is left.
                        while read_ahead.is_empty() {
                            let read = self.read_outbox(cursor).await?;
                            let Some(last) = read.last_seq() else { break };
                            cursor = Some(last);
                            self.quarantine(read.unreadable).await?;
                            read_ahead.extend(read.entries);
                        }
                        match read_ahead.pop_front() {
                            Some(item) => item,
                            None => break,
                        }
                    }
                };
                pending.push_back(self.publish(&channel, next).await?);
            }
            if confirmed.len() >= DELETE_BATCH || (pending.is_empty() && !confirmed.is_empty()) {
                self.archive(&mut confirmed).await?;
            }
            let retry_due = retry.front().map(|r| r.due);
            tokio::select! {
                Some(outcome) = pending.next(), if !pending.is_empty() => {
                    match self.settle(outcome, &mut confirmed) {
                        Ok(None) => {}
                        Ok(Some(entry)) => retry.push_back(Retry { due: Instant::now() + RETRY_PAUSE, entry }),
                        Err(e) => break Err(e),
                    }
                }
                changed = durable.changed(), if pending.len() < self.options.window => {
                    if changed.is_err() {
                        break Ok(());
                    }
                }
                _ = sleep_until_opt(retry_due), if retry_due.is_some() && pending.len() < self.options.window => {}
                event = events.next() => {
                    if let Some(Event::Error(e)) = event {
                        break Err(SessionError::Connection(e.to_string()));
                    }
                }
                _ = shutdown.recv() => {
                    self.drain(&mut pending, &mut confirmed).await;
                    break Ok(());
                }
            }
        };
        // Whatever the broker confirmed leaves the outbox, even when the session failed.
        let removed = self.archive(&mut confirmed).await;
        let limit = self.options.confirm_timeout.min(Duration::from_secs(5));
        let _ = timeout(limit, channel.close(200, "kallina-relay stopping".into())).await;
        let _ = timeout(
            limit,
            connection.close(200, "kallina-relay stopping".into()),
        )
        .await;
        removed?;
        result
    }

    /// Sends one record; returns the future of its confirm (bounded by the confirm timeout).
    async fn publish(
        &self,
        channel: &Channel,
        entry: OutboxEntry,
    ) -> Result<PendingConfirm, SessionError> {
        let limit = self.options.confirm_timeout;
        let published_at = Instant::now();
        let record = &entry.record;
        *self
            .attempts_of()
            .entry(entry.seq)
            .or_insert(record.attempts_before) += 1;
        let confirm = timeout(
            limit,
            channel.basic_publish(
                self.options.topology.exchange.as_str().into(),
                record.event.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &record.body,
                properties(record),
            ),
        )
        .await
        .map_err(|_| SessionError::Timeout(limit))?
        .map_err(|e| classify(channel, e))?;
        let channel = channel.clone();
        Ok(Box::pin(async move {
            let result = match timeout(limit, confirm).await {
                Err(_) => Err(SessionError::Timeout(limit)),
                Ok(Err(e)) => Err(classify(&channel, e)),
                Ok(Ok(confirmation)) => Ok(confirmation),
            };
            ConfirmOutcome {
                entry,
                published_at,
                result,
            }
        }))
    }

    /// Books one confirm. Returns the record to publish again after a pause, if the broker
    /// nacked or returned it; an error ends the session.
    fn settle(
        &self,
        outcome: ConfirmOutcome,
        confirmed: &mut Vec<Confirmed>,
    ) -> Result<Option<OutboxEntry>, SessionError> {
        let ConfirmOutcome {
            entry,
            published_at,
            result,
        } = outcome;
        let record = &entry.record;
        let failure = match result? {
            Confirmation::Ack(None) => None,
            Confirmation::Ack(Some(_returned)) => Some("returned"),
            Confirmation::Nack(_) => Some("nack"),
            Confirmation::NotRequested => {
                return Err(SessionError::Channel(
                    "the channel is not in confirm mode".into(),
                ));
            }
        };
        if let Some(reason) = failure {
            self.metrics
                .publish_errors
                .with_label_values(&[reason])
                .inc();
            tracing::warn!(id = %record.key, event = %record.event, reason, "broker did not take the event; will retry");
            return Ok(Some(entry));
        }
        let m = &self.metrics;
        m.publish_confirm_duration
            .observe(published_at.elapsed().as_secs_f64());
        m.published
            .with_label_values(&[event_label(Some(&record.event))])
            .inc();
        let lag_ms = unix_millis(SystemTime::now()).saturating_sub(record.received_at_ms);
        m.delivery_lag.observe(lag_ms as f64 / 1000.0);
        let attempts = self.attempts_of().remove(&entry.seq).unwrap_or(1);
        confirmed.push(Confirmed {
            seq: entry.seq,
            attempts,
        });
        Ok(None)
    }

    /// The next durable outbox records after `cursor`, read on the blocking pool: sled may
    /// read from disk, which must not stall the runtime's workers.
    async fn read_outbox(&self, cursor: Option<u64>) -> Result<OutboxRead, SessionError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || store.outbox_after(cursor, READ_AHEAD)).await??)
    }

    /// Sets aside records that cannot be published however often they are tried.
    async fn quarantine(&self, unreadable: Vec<Unreadable>) -> Result<(), SessionError> {
        for record in unreadable {
            tracing::error!(
                seq = record.seq,
                reason = %record.reason,
                "an outbox record cannot be decoded; quarantined (see /admin/quarantine)"
            );
            let store = self.store.clone();
            let reason = format!("cannot be decoded: {}", record.reason);
            tokio::task::spawn_blocking(move || store.quarantine(record.seq, &reason)).await??;
        }
        Ok(())
    }

    /// Moves what the broker confirmed to the archive, on the blocking pool.
    async fn archive(&self, confirmed: &mut Vec<Confirmed>) -> Result<(), SessionError> {
        if confirmed.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        // Kept until the move succeeded: the end of the session tries again.
        let batch = confirmed.clone();
        tokio::task::spawn_blocking(move || store.archive_published(&batch)).await??;
        confirmed.clear();
        Ok(())
    }

    fn attempts_of(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        self.attempts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On shutdown: wait up to the grace period for the confirms still outstanding.
    async fn drain(
        &self,
        pending: &mut FuturesOrdered<PendingConfirm>,
        confirmed: &mut Vec<Confirmed>,
    ) {
        let outstanding = pending.len();
        let deadline = tokio::time::Instant::now() + self.options.shutdown_grace;
        while let Ok(Some(outcome)) = tokio::time::timeout_at(deadline, pending.next()).await {
            if self.settle(outcome, confirmed).is_err() {
                break;
            }
        }
        tracing::info!(
            outstanding,
            confirmed = confirmed.len(),
            left = pending.len(),
            "relay drained"
        );
    }
}

/// Message properties as the outbound contract promises them.
fn properties(record: &OutboxRecord) -> BasicProperties {
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

fn classify(channel: &Channel, error: lapin::Error) -> SessionError {
    if channel.status().connected() {
        SessionError::Channel(error.to_string())
    } else {
        SessionError::Connection(error.to_string())
    }
}

/// Capped exponential backoff with "equal jitter": half fixed, half random.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_FIRST.saturating_mul(1u32 << failures.min(16).saturating_sub(1));
    let ceiling = exp.min(BACKOFF_CAP);
    let half = ceiling / 2;
    half + half.mul_f64(fastrand::f64())
}

async fn sleep_until_opt(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for failures in 1..40 {
            let pause = backoff(failures);
            assert!(pause <= BACKOFF_CAP, "{failures}: {pause:?}");
            let ceiling = BACKOFF_FIRST
                .saturating_mul(1 << (failures.min(16) - 1))
                .min(BACKOFF_CAP);
            assert!(pause >= ceiling / 2, "{failures}: {pause:?}");
        }
        assert!(backoff(1) < Duration::from_millis(201));
    }

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
        };
        let p = properties(&record);
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
