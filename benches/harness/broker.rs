//! RabbitMQ side: the plain lapin publisher baseline, purging and cleaning up.

use super::*;

pub(crate) async fn broker() -> Result<Connection> {
    Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .context("RabbitMQ at 127.0.0.1:5672 (scripts/ensure-rabbitmq.sh)")
}

/// A durable topic exchange and a durable queue bound to every key, so that the broker
/// stores what is published to it, as it does for the relay.
pub(crate) async fn declare_bound(
    channel: &lapin::Channel,
    exchange: &str,
    queue: &str,
) -> Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Baseline for the drain: `count` messages with the relay's properties and window, confirmed.
pub(crate) async fn plain_publisher(count: u64) -> Result<f64> {
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    let exchange = format!("bench.baseline.{}", fastrand::u32(..));
    let queue = format!("{exchange}.q");
    declare_bound(&channel, &exchange, &queue).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = body("baseline");
    let signature = sign(SECRET.as_bytes(), &body);
    let started = Instant::now();
    let mut pending = futures_util::stream::FuturesOrdered::new();
    for i in 0..count {
        if pending.len() >= WINDOW {
            let confirmation: Confirmation = pending.next().await.unwrap()?;
            anyhow::ensure!(
                matches!(confirmation, Confirmation::Ack(None)),
                "baseline publish not acked"
            );
        }
        let mut headers = FieldTable::default();
        headers.insert(
            "x-kallina-signature".into(),
            AMQPValue::LongString(LongString::from(signature.as_str())),
        );
        headers.insert(
            "x-received-at".into(),
            AMQPValue::LongString(LongString::from("2025-01-23T10:30:00.000Z")),
        );
        headers.insert(
            "x-source".into(),
            AMQPValue::LongString(LongString::from("kallina-relay")),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(format!("baseline-{i}").into())
            .with_type("call.ended".into())
            .with_timestamp(unix_millis(SystemTime::now()) / 1000)
            .with_app_id("kallina-relay".into())
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                "call.ended".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?;
        pending.push_back(confirm);
    }
    while let Some(c) = pending.next().await {
        c?;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    println!("  plain lapin publisher: {count} messages, {rate:.0}/s");
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await?;
    Ok(rate)
}

pub(crate) async fn purge(queue: &str) -> Result<()> {
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(queue.into(), Default::default())
        .await?;
    Ok(())
}

pub(crate) async fn cleanup(queue: &str, exchange: &str) {
    if let Ok(connection) = broker().await {
        if let Ok(channel) = connection.create_channel().await {
            for q in [queue.to_string(), format!("{exchange}.unrouted")] {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for e in [exchange.to_string(), format!("{exchange}.unrouted")] {
                let _ = channel
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
    }
}
