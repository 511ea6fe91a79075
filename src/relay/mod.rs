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
//! A nacked or returned message is not a session failure: it is counted, set aside for a pause
//! that grows with the times it was sent (a queue refusing publishes is not sent the whole
//! window every second), and published again; the outbox keeps it meanwhile. A record that
//! does not decode is quarantined, so that nothing behind it waits.
//!
//! The backoff between sessions starts again only at a confirm (or after a session that lived a
//! minute), not at a successful connect: a broker that accepts connections but not publishes is
//! not reconnected to every few seconds. A `connection.blocked` (memory or disk alarm) pauses
//! the session with the connection kept ([`session`]). A record the broker refuses for good
//! (`PRECONDITION_FAILED` on its publish) is found by sending one at a time, and quarantined.

mod connect;
mod message;
pub mod options;
mod routing;
mod session;
mod status;
mod tls;
mod topology;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use tokio::time::{sleep, timeout};

pub use connect::{Brokers, Node};
pub use message::preview as publication_preview;
pub use options::RelayOptions;
pub use routing::RoutingKey;
pub use status::{BrokerState, BrokerStatus};
pub use topology::{refused_with, QueueSpec, QueueType, Topology, TopologyError};

use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::store::{OutboxEntry, Store, StoreError};
use crate::telemetry::Spans;

/// How long a nacked or returned message waits before it is published again.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(500);
/// A session that lived this long was healthy: the next reconnect starts the backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// Outbox records read at once into the relay's read-ahead buffer.
const READ_AHEAD: usize = 1024;
/// Confirmed sequence numbers are deleted from the outbox in batches of up to this many.
const DELETE_BATCH: usize = 256;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

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
    /// The broker closed the channel with `PRECONDITION_FAILED` (a message above its
    /// `max_message_size`, say) while this record's confirm was the oldest awaited. Only when it
    /// was the one publish in flight (`alone`) is it surely the one refused: with several in
    /// flight the broker may close the channel before it acks the ones it took.
    #[error("the broker refused outbox record {seq}: {reason}")]
    Refused {
        seq: u64,
        reason: String,
        alone: bool,
    },
}

impl SessionError {
    /// The node itself failed (its connection, its confirms, or an answer to a declaration
    /// that never came, as from a node whose quorum queues have lost their leader): another
    /// node may do better. A refusal, a topology clash or an outbox error would follow the
    /// relay to any node.
    fn is_node_failure(&self) -> bool {
        matches!(
            self,
            Self::Connection(_) | Self::Timeout(_) | Self::Topology(TopologyError::Timeout { .. })
        )
    }

    /// The `reason` label of `kallina_relay_publish_errors_total`.
    fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Connection(_) => Some("connection"),
            Self::Channel(_) => Some("channel"),
            Self::Timeout(_) => Some("timeout"),
            Self::Refused { .. } => Some("refused"),
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
    /// Where publish spans go (nowhere unless OTLP is set).
    spans: Spans,
    /// Publishes per outbox record so far (across sessions), until it is confirmed: the
    /// archive keeps the total for the admin API.
    attempts: Mutex<HashMap<u64, u32>>,
}

/// A publish waiting for its confirm: resolves to the record and what the broker said.
type PendingConfirm = Pin<Box<dyn Future<Output = ConfirmOutcome> + Send>>;

/// What the relay carries from one session to the next.
struct Course {
    /// The node to connect to (from 0).
    node: usize,
    /// Nodes not yet failed since the last pause, or since a node last took a connection.
    untried: usize,
    /// Sessions failed since the last confirm (or the last session that lived a minute).
    failures: u32,
    /// After a refusal with several publishes in flight, the next session sends one at a
    /// time until this many were confirmed, to find the record at fault.
    one_by_one: usize,
}

impl Course {
    /// After a failed session: the node to try next and how long to wait first. A failed node
    /// hands over to the next one at once; the backoff pause comes when every node failed in
    /// turn, or when the failure would follow the relay to any node.
    fn next(&mut self, node_failed: bool, nodes: usize) -> Duration {
        if node_failed {
            self.node = (self.node + 1) % nodes;
            self.untried = self.untried.saturating_sub(1);
            if self.untried > 0 {
                return Duration::ZERO;
            }
        }
        self.untried = nodes;
        backoff(self.failures)
    }
}

/// A record the broker nacked or returned, published again once `due`.
struct Retry {
    due: Instant,
    entry: OutboxEntry,
}

struct ConfirmOutcome {
    entry: OutboxEntry,
    published_at: Instant,
    /// The publish span, when the record belongs to a trace: its context (the message's
    /// `traceparent`), when it started, and the routing key.
    span: Option<PublishSpan>,
    result: Result<Confirmation, SessionError>,
}

struct PublishSpan {
    context: crate::trace::TraceContext,
    start: std::time::SystemTime,
    routing_key: String,
}

impl Relay {
    pub fn new(
        store: Store,
        options: RelayOptions,
        metrics: Metrics,
        status: BrokerStatus,
        spans: Spans,
    ) -> Self {
        Self {
            store,
            options,
            metrics,
            status,
            spans,
            attempts: Mutex::default(),
        }
    }

    /// Publishes until `shutdown` fires, reconnecting as often as needed.
    ///
    /// The relay stays on a node while it works. When the connection to it fails (or a confirm
    /// times out), the next node in `amqp_url` is tried at once, and so on round the list;
    /// the backoff pause comes only when every node failed in turn. Everything unconfirmed is
    /// published again on the new node, with the same `message_id`.
    pub async fn run(self, mut shutdown: Shutdown) {
        let nodes = self.options.brokers.len();
        let mut course = Course {
            node: 0,
            untried: nodes,
            failures: 0,
            one_by_one: 0,
        };
        while !shutdown.is_triggered() {
            self.status.set(BrokerState::Connecting);
            let started = Instant::now();
            let result = self.session(&mut shutdown, &mut course).await;
            // A session that lived long was healthy, even if it published nothing.
            if started.elapsed() >= HEALTHY_SESSION {
                course.failures = 0;
            }
            self.metrics.broker_connected.set(0);
            self.metrics.broker_node.set(0);
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
            self.status.set(match &error {
                SessionError::Topology(TopologyError::Clash { .. }) => BrokerState::TopologyError {
                    reason: error.to_string(),
                },
                _ => BrokerState::Disconnected {
                    reason: error.to_string(),
                },
            });
            if let SessionError::Refused { seq, reason, alone } = &error {
                if *alone {
                    self.set_aside_refused(*seq, reason).await;
                } else {
                    course.one_by_one = self.options.window;
                }
            }
            course.failures = course.failures.saturating_add(1);
            let failed_node = course.node;
            let pause = course.next(error.is_node_failure(), nodes);
            tracing::warn!(
                node = failed_node + 1,
                broker = %self.options.brokers.node(failed_node).redacted(),
                error = %error,
                next_node = course.node + 1,
                retry_in_ms = pause.as_millis() as u64,
                "relay session ended"
            );
            tokio::select! {
                _ = sleep(pause) => {}
                _ = shutdown.recv() => break,
            }
        }
        self.status.set(BrokerState::Stopped);
        tracing::info!("relay stopped");
    }

    /// A record the broker refused while it was the one publish in flight is quarantined:
    /// sending it again cannot work.
    async fn set_aside_refused(&self, seq: u64, reason: &str) {
        tracing::error!(seq, %reason, "the broker refuses an outbox record; quarantined (see /admin/quarantine)");
        let store = self.store.clone();
        let reason = format!("refused by the broker: {reason}");
        match tokio::task::spawn_blocking(move || store.quarantine(seq, &reason)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(seq, error = %e, "quarantining a refused record failed"),
            Err(e) => tracing::error!(seq, error = %e, "quarantining a refused record failed"),
        }
    }

    async fn connect(&self, node: usize) -> Result<(Connection, Channel), SessionError> {
        let limit = self.options.confirm_timeout;
        let connection = timeout(
            limit,
            self.options
                .brokers
                .connect(node, ConnectionProperties::default()),
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

    fn course(nodes: usize) -> Course {
        Course {
            node: 0,
            untried: nodes,
            failures: 1,
            one_by_one: 0,
        }
    }

    #[test]
    fn a_failed_node_hands_over_at_once_and_a_full_round_pauses() {
        let mut c = course(3);
        assert_eq!(c.next(true, 3), Duration::ZERO);
        assert_eq!(c.node, 1);
        assert_eq!(c.next(true, 3), Duration::ZERO);
        assert_eq!(c.node, 2);
        // The third failure in a row: every node failed, so the backoff pauses.
        assert!(c.next(true, 3) > Duration::ZERO);
        assert_eq!((c.node, c.untried), (0, 3));
    }

    #[test]
    fn a_failure_that_is_not_the_node_keeps_it_and_pauses() {
        let mut c = course(3);
        assert!(c.next(false, 3) > Duration::ZERO);
        assert_eq!(c.node, 0);
        let mut single = course(1);
        assert!(single.next(true, 1) > Duration::ZERO);
        assert_eq!(single.node, 0);
    }
}
