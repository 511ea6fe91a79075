//! One session: one connection and one confirm-mode channel, and what is in flight on it.
//!
//! The session fills the window (due retries first, then the outbox in order), then waits for
//! whichever comes first: a confirm, newly durable events, a retry falling due, a broker event
//! (an error ends the session; `connection.blocked` pauses it), the oldest confirm's deadline,
//! or shutdown. While the broker has blocked the connection nothing is sent and no confirm is
//! timed out: the connection is kept, so a broker in alarm is not hammered with reconnects.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{FuturesOrdered, Stream, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::protocol::AMQPSoftError;
use lapin::{Channel, Confirmation, Connection, ConnectionStatus, Event};
use tokio::sync::watch;
use tokio::time::timeout;

use super::message::properties;
use super::topology::refused_with;
use super::{
    backoff, classify, BrokerState, ConfirmOutcome, Course, PendingConfirm, PublishSpan, Relay,
    Retry, SessionError, DELETE_BATCH, READ_AHEAD, RETRY_PAUSE_MIN,
};
use crate::metrics::event_label;
use crate::shutdown::Shutdown;
use crate::store::{unix_millis, Confirmed, OutboxEntry, OutboxRead, Unreadable};
use crate::telemetry::FinishedSpan;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// What a session has in flight and where it is in the outbox.
struct Session {
    channel: Channel,
    pending: FuturesOrdered<PendingConfirm>,
    /// When each publish still waiting for its confirm was sent, oldest first (confirms come
    /// in order): the oldest bounds how long the session waits.
    sent_at: VecDeque<Instant>,
    confirmed: Vec<Confirmed>,
    /// Nacked or returned records, by when they are due again.
    retry: VecDeque<Retry>,
    cursor: Option<u64>,
    read_ahead: VecDeque<OutboxEntry>,
    blocked: bool,
    /// lapin's view of the connection: it knows of a block (and holds every frame back) a
    /// moment before the session handles the block's event.
    connection_status: ConnectionStatus,
    unblocked_at: Instant,
    /// Confirms still to see with one publish in flight at a time (after a refusal).
    one_by_one: usize,
    /// The node connected to: its position in `amqp_url`, from 1.
    node: usize,
}

/// How often a publish that lapin holds back asks whether the broker blocked the connection.
const BLOCK_CHECK: Duration = Duration::from_millis(100);

/// The connection's events: errors, blocks and unblocks.
type BrokerEvents = Pin<Box<dyn Stream<Item = Event> + Send>>;

impl Session {
    /// Publishes in flight at most: one at a time while looking for a refused record.
    fn window(&self, configured: usize) -> usize {
        if self.one_by_one > 0 {
            1
        } else {
            configured
        }
    }
}

/// What waiting ended with.
enum Step {
    Go,
    Stop,
}

impl Relay {
    /// One connection's life. `Ok` means shutdown was requested and handled.
    pub(super) async fn session(
        &self,
        shutdown: &mut Shutdown,
        course: &mut Course,
    ) -> Result<(), SessionError> {
        let (connection, channel) = tokio::select! {
            c = self.connect(course.node) => c?,
            _ = shutdown.recv() => return Ok(()),
        };
        // This node works: when it fails, every other node is worth a try before a pause.
        course.untried = self.options.brokers.len();
        // The backoff grows on: a broker that accepts connections but not publishes (an alarm,
        // a queue refusing) must not be reconnected to and sent the whole window every few
        // seconds. It starts again at the first confirm.
        let position = course.node + 1;
        self.status.set(BrokerState::Connected { node: position });
        self.metrics.broker_connected.set(1);
        self.metrics.broker_node.set(position as i64);
        self.metrics.broker_connections.inc();
        tracing::info!(node = position, exchange = %self.options.topology.exchange, "relay connected; topology declared");

        let mut events: BrokerEvents = Box::pin(connection.events_listener());
        let mut durable = self.store.durability();
        let mut session = Session {
            channel: channel.clone(),
            pending: FuturesOrdered::new(),
            sent_at: VecDeque::new(),
            confirmed: Vec::new(),
            retry: VecDeque::new(),
            cursor: None,
            read_ahead: VecDeque::new(),
            blocked: false,
            connection_status: connection.status().clone(),
            unblocked_at: Instant::now(),
            one_by_one: course.one_by_one,
            node: position,
        };
        let result = loop {
            if let Err(e) = self.fill(&mut session).await {
                break Err(e);
            }
            let step = self
                .wait(
                    &mut session,
                    &mut events,
                    &mut durable,
                    shutdown,
                    &mut course.failures,
                )
                .await;
            match step {
                Ok(Step::Go) => {}
                Ok(Step::Stop) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        course.one_by_one = session.one_by_one;
        self.metrics.broker_blocked.set(0);
        // Whatever the broker confirmed leaves the outbox, even when the session failed.
        let removed = self.archive(&mut session.confirmed).await;
        close(&connection, &channel, self.options.confirm_timeout).await;
        removed?;
        result
    }

    /// Sends what the window has room for; moves a batch of confirmed records to the archive.
    async fn fill(&self, session: &mut Session) -> Result<(), SessionError> {
        // A burst of publishes right after the broker blocked the connection would otherwise
        // wait in lapin, which sends nothing while blocked, until the publish timed out.
        while !session.blocked
            && !session.connection_status.blocked()
            && session.pending.len() < session.window(self.options.window)
        {
            let Some(next) = self.next_entry(session).await? else {
                break;
            };
            let confirm = self
                .publish(
                    &session.channel,
                    &session.connection_status,
                    session.node,
                    next,
                )
                .await?;
            session.pending.push_back(confirm);
            session.sent_at.push_back(Instant::now());
        }
        let idle = session.pending.is_empty() && !session.confirmed.is_empty();
        if session.confirmed.len() >= DELETE_BATCH || idle {
            self.archive(&mut session.confirmed).await?;
        }
        Ok(())
    }

    /// A due retry, else the next outbox record, read ahead in chunks so that a full window
    /// does not cost one outbox scan per publish. Records that do not decode are set aside, so
    /// that nothing behind them waits.
    async fn next_entry(&self, session: &mut Session) -> Result<Option<OutboxEntry>, SessionError> {
        if session
            .retry
            .front()
            .is_some_and(|r| r.due <= Instant::now())
        {
            return Ok(session.retry.pop_front().map(|r| r.entry));
        }
        while session.read_ahead.is_empty() {
            // Nothing durable past the cursor: the answer is known without a read, which is a
            // round trip to the blocking pool (two thread wake-ups), and the fill asks after
            // every confirm (README, performance).
            if session
                .cursor
                .is_some_and(|read| read >= self.store.durable_through())
            {
                break;
            }
            let read = self.read_outbox(session.cursor).await?;
            let Some(last) = read.last_seq() else { break };
            session.cursor = Some(last);
            self.quarantine(read.unreadable).await?;
            session.read_ahead.extend(read.entries);
        }
        Ok(session.read_ahead.pop_front())
    }

    /// Waits for the next thing to act on, and acts on it.
    async fn wait(
        &self,
        session: &mut Session,
        events: &mut BrokerEvents,
        durable: &mut watch::Receiver<u64>,
        shutdown: &mut Shutdown,
        failures: &mut u32,
    ) -> Result<Step, SessionError> {
        let limit = self.options.confirm_timeout;
        let retry_due = session.retry.front().map(|r| r.due);
        let has_room =
            !session.blocked && session.pending.len() < session.window(self.options.window);
        // Time spent blocked does not count against a confirm.
        let confirm_due = session
            .sent_at
            .front()
            .map(|sent| *sent.max(&session.unblocked_at) + limit);
        tokio::select! {
            Some(outcome) = session.pending.next(), if !session.pending.is_empty() => {
                session.sent_at.pop_front();
                let alone = session.pending.is_empty();
                match self.settle(outcome, &mut session.confirmed, alone)? {
                    None => {
                        *failures = 0;
                        session.one_by_one = session.one_by_one.saturating_sub(1);
                    }
                    Some(entry) => {
                        let due = Instant::now() + self.retry_pause(entry.seq);
                        let at = session.retry.partition_point(|r| r.due <= due);
                        session.retry.insert(at, Retry { due, entry });
                    }
                }
            }
            _ = sleep_until_opt(confirm_due), if !session.blocked && confirm_due.is_some() => {
                return Err(SessionError::Timeout(limit));
            }
            changed = durable.changed(), if has_room => {
                if changed.is_err() {
                    return Ok(Step::Stop);
                }
            }
            _ = sleep_until_opt(retry_due), if retry_due.is_some() && has_room => {}
            event = events.next() => self.on_event(session, event)?,
            _ = shutdown.recv() => {
                self.drain(&mut session.pending, &mut session.confirmed).await;
                return Ok(Step::Stop);
            }
        }
        Ok(Step::Go)
    }

    /// A connection event: an error ends the session; a block pauses it until the unblock.
    fn on_event(&self, session: &mut Session, event: Option<Event>) -> Result<(), SessionError> {
        match event {
            Some(Event::Error(e)) => return Err(SessionError::Connection(e.to_string())),
            Some(Event::ConnectionBlocked(reason)) => {
                tracing::warn!(%reason, "the broker blocked publishing; waiting, connection kept");
                session.blocked = true;
                self.metrics.broker_blocked.set(1);
                self.status.set(BrokerState::Blocked {
                    reason,
                    node: session.node,
                });
            }
            Some(Event::ConnectionUnblocked) => {
                tracing::info!("the broker unblocked publishing");
                session.blocked = false;
                session.unblocked_at = Instant::now();
                self.metrics.broker_blocked.set(0);
                self.status
                    .set(BrokerState::Connected { node: session.node });
            }
            _ => {}
        }
        Ok(())
    }

    /// Sends one record; returns the future of its confirm.
    async fn publish(
        &self,
        channel: &Channel,
        connection_status: &ConnectionStatus,
        node: usize,
        entry: OutboxEntry,
    ) -> Result<PendingConfirm, SessionError> {
        let limit = self.options.confirm_timeout;
        let published_at = Instant::now();
        let record = &entry.record;
        *self
            .attempts_of()
            .entry(entry.seq)
            .or_insert(record.attempts_before) += 1;
        let routing_key = self.options.routing_key.render(record);
        // The publish span is a child of the receive span; its id is the message's
        // `traceparent`, so a consumer's span becomes its child.
        let span = record.trace.as_ref().map(|trace| PublishSpan {
            context: trace.child(),
            start: SystemTime::now(),
            routing_key: routing_key.clone(),
        });
        let sent = {
            let mut sending = std::pin::pin!(channel.basic_publish(
                self.options.topology.exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &record.body,
                properties(record, span.as_ref().map(|s| &s.context)),
            ));
            // lapin holds a publish back while the broker blocks the connection: that wait is the
            // broker's flow control, not a dead connection, and does not count against the limit.
            // It is reported at once, as the block's own event (handled once this returns) would.
            let mut waited = Duration::ZERO;
            loop {
                match timeout(BLOCK_CHECK, &mut sending).await {
                    Ok(sent) => break sent,
                    Err(_) if connection_status.blocked() => {
                        if waited != Duration::MAX {
                            waited = Duration::MAX;
                            tracing::warn!(
                                "the broker blocked publishing; waiting, connection kept"
                            );
                            self.metrics.broker_blocked.set(1);
                            self.status.set(BrokerState::Blocked {
                                reason: "connection.blocked".into(),
                                node,
                            });
                        }
                    }
                    Err(_) => {
                        waited = waited.saturating_add(BLOCK_CHECK);
                        if waited >= limit {
                            return Err(SessionError::Timeout(limit));
                        }
                    }
                }
            }
        };
        let confirm = sent.map_err(|e| classify(channel, e))?;
        let channel = channel.clone();
        // Not timed out here: the session bounds the wait for the oldest confirm, and stops the
        // clock while the broker has blocked the connection.
        Ok(Box::pin(async move {
            let seq = entry.seq;
            let result = confirm.await.map_err(|e| {
                if refused_with(&e) == Some(&AMQPSoftError::PRECONDITIONFAILED) {
                    SessionError::Refused {
                        seq,
                        reason: e.to_string(),
                        alone: false,
                    }
                } else {
                    classify(&channel, e)
                }
            });
            ConfirmOutcome {
                entry,
                published_at,
                span,
                result,
            }
        }))
    }

    fn export_publish_span(
        &self,
        record: &crate::store::OutboxRecord,
        span: PublishSpan,
        result: &Result<Confirmation, SessionError>,
    ) {
        if !self.spans.enabled() {
            return;
        }
        let error = match result {
            Ok(Confirmation::Ack(None)) => None,
            Ok(Confirmation::Ack(Some(_))) => Some("returned by the broker".to_string()),
            Ok(Confirmation::Nack(_)) => Some("nacked by the broker".to_string()),
            Ok(Confirmation::NotRequested) => Some("no confirm".to_string()),
            Err(e) => Some(e.to_string()),
        };
        self.spans.export(FinishedSpan {
            name: "publish",
            kind: SpanKind::Producer,
            context: &span.context,
            start: span.start,
            end: SystemTime::now(),
            attributes: vec![
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "publish"),
                KeyValue::new(
                    "messaging.destination.name",
                    self.options.topology.exchange.clone(),
                ),
                KeyValue::new(
                    "messaging.rabbitmq.destination.routing_key",
                    span.routing_key,
                ),
                KeyValue::new("messaging.message.id", record.key.clone()),
                KeyValue::new("kallina.source", record.source.clone()),
            ],
            error,
        });
    }

    /// Books one confirm. Returns the record to publish again after a pause, if the broker
    /// nacked or returned it; an error ends the session.
    fn settle(
        &self,
        outcome: ConfirmOutcome,
        confirmed: &mut Vec<Confirmed>,
        alone: bool,
    ) -> Result<Option<OutboxEntry>, SessionError> {
        let ConfirmOutcome {
            entry,
            published_at,
            span,
            result,
        } = outcome;
        let result = result.map_err(|e| match e {
            SessionError::Refused { seq, reason, .. } => {
                SessionError::Refused { seq, reason, alone }
            }
            other => other,
        });
        let record = &entry.record;
        if let Some(span) = span {
            self.export_publish_span(record, span, &result);
        }
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
            .with_label_values(&[&record.source, event_label(Some(&record.event))])
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

    /// How long a record the broker nacked or returned waits before it is sent again: growing
    /// with the times it was sent, so that a queue refusing publishes (`reject-publish`) is not
    /// sent the whole window every second.
    fn retry_pause(&self, seq: u64) -> Duration {
        let sent = self.attempts_of().get(&seq).copied().unwrap_or(1);
        backoff(sent).max(RETRY_PAUSE_MIN)
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
            if self.settle(outcome, confirmed, false).is_err() {
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

async fn close(connection: &Connection, channel: &Channel, confirm_timeout: Duration) {
    let limit = confirm_timeout.min(Duration::from_secs(5));
    let _ = timeout(limit, channel.close(200, "kallina-relay stopping".into())).await;
    let _ = timeout(
        limit,
        connection.close(200, "kallina-relay stopping".into()),
    )
    .await;
}

async fn sleep_until_opt(due: Option<Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due.into()).await;
    }
}
