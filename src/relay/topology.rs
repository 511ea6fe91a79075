//! What the relay declares on the broker at every (re)connect: the topic exchange with its
//! alternate exchange, the `unrouted` queue that catches what no consumer is bound for yet, and
//! the consumer queues of the configuration file. Declarations are idempotent, so repeating
//! them after a reconnect is harmless; a clash with an existing declaration
//! (`PRECONDITION_FAILED`) is reported as [`TopologyError::Clash`], not retried in a tight loop.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use serde::Deserialize;
use tokio::time::timeout;

/// RabbitMQ queue type of a consumer queue declared from the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// One node's queue (mirrored by nothing): for a single broker.
    Classic,
    /// Replicated by Raft across the cluster; a confirm means a majority has the message.
    Quorum,
    /// A replicated append-only log: consumers read from an offset, and may read it again.
    Stream,
}

impl QueueType {
    fn name(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
            Self::Stream => "stream",
        }
    }
}

/// A consumer queue the relay declares and binds at start: `[[queues]]` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub name: String,
    #[serde(default)]
    pub bindings: Vec<String>,
    #[serde(default = "classic", rename = "type")]
    pub queue_type: QueueType,
    /// Streams only: the retention by size (`x-max-length-bytes`); the oldest segments go.
    #[serde(default)]
    pub max_length_bytes: Option<u64>,
    /// Streams only: the retention by age (`x-max-age`), in RabbitMQ's form: `7D`, `12h`.
    #[serde(default)]
    pub max_age: Option<String>,
}

impl QueueSpec {
    /// What is wrong with this declaration, before the broker is asked.
    pub fn check(&self) -> Result<(), String> {
        let retention = self.max_length_bytes.is_some() || self.max_age.is_some();
        if retention && self.queue_type != QueueType::Stream {
            return Err(format!(
                "queue `{}`: max_length_bytes and max_age are retention settings of a stream; \
                 on a {} queue they would drop undelivered events",
                self.name,
                self.queue_type.name()
            ));
        }
        if let Some(age) = &self.max_age {
            let (digits, unit) = age.split_at(age.len().saturating_sub(1));
            let valid = !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s");
            if !valid {
                return Err(format!(
                    "queue `{}`: max_age = {age:?} is not a RabbitMQ age such as 7D, 12h or 30m",
                    self.name
                ));
            }
        }
        Ok(())
    }

    /// The declaration's arguments: the type, and a stream's retention.
    fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from(self.queue_type.name())),
        );
        if let Some(bytes) = self.max_length_bytes {
            arguments.insert(
                "x-max-length-bytes".into(),
                AMQPValue::LongLongInt(bytes.min(i64::MAX as u64) as i64),
            );
        }
        if let Some(age) = &self.max_age {
            arguments.insert(
                "x-max-age".into(),
                AMQPValue::LongString(LongString::from(age.as_str())),
            );
        }
        arguments
    }
}

fn classic() -> QueueType {
    QueueType::Classic
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{what} clashes with an existing declaration on the broker: {reason}")]
    Clash { what: String, reason: String },
    #[error("declaring {what} failed: {reason}")]
    Failed { what: String, reason: String },
    #[error("declaring {what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
}

/// Names the relay declares.
#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub unrouted_exchange: String,
    /// Type of the `unrouted` queue: quorum on a cluster, so that it outlives any one node.
    pub unrouted_queue_type: QueueType,
    pub queues: Vec<QueueSpec>,
}

impl Topology {
    pub async fn declare(&self, channel: &Channel, limit: Duration) -> Result<(), TopologyError> {
        self.declare_unrouted(channel, limit).await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(LongString::from(self.unrouted_exchange.as_str())),
        );
        let what = format!("topic exchange `{}`", self.exchange);
        run(
            &what,
            limit,
            channel.exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                DURABLE_EXCHANGE,
                arguments,
            ),
        )
        .await?;
        for queue in &self.queues {
            self.declare_queue(channel, limit, queue).await?;
        }
        Ok(())
    }

    /// The fanout exchange and its queue that catch what no binding routes.
    async fn declare_unrouted(
        &self,
        channel: &Channel,
        limit: Duration,
    ) -> Result<(), TopologyError> {
        let unrouted = self.unrouted_exchange.as_str();
        let what = format!("fanout exchange `{unrouted}`");
        run(
            &what,
            limit,
            channel.exchange_declare(
                unrouted.into(),
                ExchangeKind::Fanout,
                DURABLE_EXCHANGE,
                FieldTable::default(),
            ),
        )
        .await?;
        let what = format!("queue `{unrouted}`");
        run(
            &what,
            limit,
            channel.queue_declare(
                unrouted.into(),
                DURABLE_QUEUE,
                self.unrouted_queue_arguments(),
            ),
        )
        .await?;
        run(
            &what,
            limit,
            channel.queue_bind(
                unrouted.into(),
                unrouted.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(())
    }

    /// A classic `unrouted` queue is declared without arguments, as it always was, so that a
    /// queue declared by an earlier version stays equivalent.
    fn unrouted_queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.unrouted_queue_type != QueueType::Classic {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(self.unrouted_queue_type.name())),
            );
        }
        arguments
    }

    /// A consumer queue of the file, of its type, with its bindings on the topic exchange.
    async fn declare_queue(
        &self,
        channel: &Channel,
        limit: Duration,
        queue: &QueueSpec,
    ) -> Result<(), TopologyError> {
        let what = format!("queue `{}`", queue.name);
        run(
            &what,
            limit,
            channel.queue_declare(queue.name.as_str().into(), DURABLE_QUEUE, queue.arguments()),
        )
        .await?;
        for binding in &queue.bindings {
            run(
                &what,
                limit,
                channel.queue_bind(
                    queue.name.as_str().into(),
                    self.exchange.as_str().into(),
                    binding.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
        Ok(())
    }
}

const DURABLE_EXCHANGE: ExchangeDeclareOptions = ExchangeDeclareOptions {
    passive: false,
    durable: true,
    auto_delete: false,
    internal: false,
    nowait: false,
};
const DURABLE_QUEUE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// The broker's reason when it refused an operation by closing the channel (404 not found,
/// 406 precondition failed, …), read from the error's kind rather than its text.
pub fn refused_with(error: &lapin::Error) -> Option<&AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

async fn run<T>(
    what: &str,
    limit: Duration,
    declaration: impl std::future::Future<Output = lapin::Result<T>>,
) -> Result<T, TopologyError> {
    match timeout(limit, declaration).await {
        Err(_) => Err(TopologyError::Timeout {
            what: what.into(),
            after: limit,
        }),
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            let clash = refused_with(&e) == Some(&AMQPSoftError::PRECONDITIONFAILED);
            let reason = e.to_string();
            if clash {
                Err(TopologyError::Clash {
                    what: what.into(),
                    reason,
                })
            } else {
                Err(TopologyError::Failed {
                    what: what.into(),
                    reason,
                })
            }
        }
    }
}
