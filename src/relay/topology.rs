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
use tokio::time::timeout;

use super::options::{QueueSpec, QueueType};

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
    pub queues: Vec<QueueSpec>,
}

impl Topology {
    pub async fn declare(&self, channel: &Channel, limit: Duration) -> Result<(), TopologyError> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };

        let unrouted = &self.unrouted_exchange;
        let what = format!("fanout exchange `{unrouted}`");
        run(
            &what,
            limit,
            channel.exchange_declare(
                unrouted.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            ),
        )
        .await?;
        let what = format!("queue `{unrouted}`");
        run(
            &what,
            limit,
            channel.queue_declare(
                unrouted.as_str().into(),
                durable_queue,
                FieldTable::default(),
            ),
        )
        .await?;
        run(
            &what,
            limit,
            channel.queue_bind(
                unrouted.as_str().into(),
                unrouted.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;

        let mut arguments = FieldTable::default();
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(LongString::from(unrouted.as_str())),
        );
        let what = format!("topic exchange `{}`", self.exchange);
        run(
            &what,
            limit,
            channel.exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange,
                arguments,
            ),
        )
        .await?;

        for queue in &self.queues {
            let mut arguments = FieldTable::default();
            let kind = match queue.queue_type {
                QueueType::Classic => "classic",
                QueueType::Quorum => "quorum",
            };
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(kind)),
            );
            let what = format!("queue `{}`", queue.name);
            run(
                &what,
                limit,
                channel.queue_declare(queue.name.as_str().into(), durable_queue, arguments),
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
        }
        Ok(())
    }
}

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
