//! A broker that accepts connections but not publishes: a memory alarm (`connection.blocked`)
//! on a node of the test's own, and a queue that refuses publishes (`reject-publish`, nacks).
//! The relay waits rather than reconnecting, retries nacks with backoff, and loses nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::helpers::*;
use crate::own_broker::OwnBroker;

#[tokio::test]
async fn a_memory_alarm_blocks_publishing_without_reconnects_and_nothing_is_lost() {
    let broker = OwnBroker::start().await;
    let connection = lapin::Connection::connect(&broker.url(), Default::default())
        .await
        .unwrap();
    let queue = random_name("test.blocked");
    let app = spawn_app(
        Config::default()
            .with_broker(&broker.url())
            .set("KALLINA_RELAY_CONFIRM_TIMEOUT", "2s")
            .file(&queue_file(&queue, "#")),
    )
    .await;
    app.wait_broker_connected().await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let body = event_body("call.ended", &format!("before-{i}"));
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
        sent.push(sha256_hex(body.as_bytes()));
    }
    app.wait_outbox_empty().await;
    // Counted here, not assumed to be 1: on a loaded machine a confirm of the first events
    // may outlast the 2-s timeout on this fresh node, and that reconnect is not the point.
    let connections_before = metric(
        &app.metrics().await,
        "kallina_relay_broker_connections_total",
    );

    // The alarm blocks a connection when it next publishes: events are still accepted. Sent
    // at once, so that the relay publishes a burst: lapin holds back every publish after the
    // block, and the relay once timed those out and reconnected instead of waiting.
    broker.memory_alarm(true);
    let during: Vec<String> = (0..10)
        .map(|i| event_body("call.ended", &format!("during-{i}")))
        .collect();
    let answers =
        futures_util::future::join_all(during.iter().map(|body| app.post_signed(body.clone())))
            .await;
    for (body, answer) in during.iter().zip(answers) {
        assert_eq!(answer.status(), 202);
        sent.push(sha256_hex(body.as_bytes()));
    }
    wait_until(
        Duration::from_secs(30),
        "the relay to see the block",
        || async { app.readyz().await.1["broker"]["state"] == "blocked" },
    )
    .await;
    assert_eq!(
        metric(&app.metrics().await, "kallina_relay_broker_blocked"),
        1.0
    );
    // Several confirm timeouts long: a relay that timed its confirms out would reconnect now.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let metrics = app.metrics().await;
    assert_eq!(
        metric(&metrics, "kallina_relay_broker_connections_total"),
        connections_before,
        "reconnected while blocked"
    );
    assert_eq!(app.readyz().await.1["broker"]["state"], "blocked");

    broker.memory_alarm(false);
    app.wait_outbox_empty().await;
    assert_eq!(app.readyz().await.1["broker"]["state"], "connected");
    let counts = arrivals(&drain_queue(&connection, &queue).await);
    let lost: Vec<_> = sent.iter().filter(|id| !counts.contains_key(*id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "memory alarm: {} sent, {} lost, {duplicates} duplicates",
        sent.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {lost:?}");
    app.stop().await;
}

#[tokio::test]
async fn nacks_from_a_queue_refusing_publishes_are_retried_with_backoff_and_nothing_is_lost() {
    let connection = broker().await;
    let queue = random_name("test.reject");
    let app = spawn_app(Config::default().with_broker(BROKER_URL)).await;
    app.wait_broker_connected().await;
    // A queue that holds three messages and refuses the rest with a nack.
    let channel = connection.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(3));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            arguments,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            app.names.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let mut sent = Vec::new();
    for i in 0..12 {
        let body = event_body("call.ended", &format!("reject-{i}"));
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
        sent.push(sha256_hex(body.as_bytes()));
    }
    // A slow consumer: a few messages at a time, while the relay retries the refused ones.
    let mut messages = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while arrivals(&messages).len() < 12 {
        assert!(
            std::time::Instant::now() < deadline,
            "not every event arrived within 90 s: {} of 12",
            arrivals(&messages).len()
        );
        messages.extend(drain_queue(&connection, &queue).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    app.wait_outbox_empty().await;
    messages.extend(drain_queue(&connection, &queue).await);
    let counts = arrivals(&messages);
    let lost: Vec<_> = sent.iter().filter(|id| !counts.contains_key(*id)).collect();
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    let metrics = app.metrics().await;
    let nacks = metric(
        &metrics,
        "kallina_relay_publish_errors_total{reason=\"nack\"}",
    );
    println!(
        "reject-publish: 12 sent, {} lost, {duplicates} duplicates, {nacks} nacks",
        lost.len()
    );
    assert!(
        nacks > 0.0,
        "the queue never refused a publish: the test proves nothing"
    );
    assert!(lost.is_empty(), "lost {lost:?}");
    assert_eq!(
        metric(&metrics, "kallina_relay_broker_connections_total"),
        1.0,
        "nacks are not a reason to reconnect"
    );
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn a_record_the_broker_refuses_for_good_is_quarantined_and_the_rest_published() {
    // A broker whose messages may be at most 4 KiB: a bigger event can never be published.
    let broker = OwnBroker::start_with("max_message_size = 4096\n").await;
    let connection = lapin::Connection::connect(&broker.url(), Default::default())
        .await
        .unwrap();
    let queue = random_name("test.refused");
    let token = "admin-token-for-tests-0123456789";
    let app = spawn_app(
        Config::default()
            .with_broker(&broker.url())
            .set("KALLINA_RELAY_ADMIN_TOKEN", token)
            .file(&queue_file(&queue, "#")),
    )
    .await;
    app.wait_broker_connected().await;
    let bodies = [
        event_body("call.ended", "small-before"),
        event_body("call.ended", &"big".repeat(3000)),
        event_body("call.ended", "small-after"),
    ];
    for body in &bodies {
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
    }
    app.wait_outbox_empty().await;
    let published: Vec<String> = drain_queue(&connection, &queue)
        .await
        .iter()
        .map(message_id)
        .collect();
    // At least once: a publish in flight when the broker closed the channel is sent again.
    let small: BTreeMap<String, usize> = [&bodies[0], &bodies[2]]
        .iter()
        .map(|b| (sha256_hex(b.as_bytes()), 1))
        .collect();
    let counts = arrivals_of_ids(&published);
    println!("refused for good: the others arrived {counts:?}");
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        small.keys().collect::<Vec<_>>(),
        "the events around the refused one are published, and it is not"
    );
    let list = app.admin_json("/admin/quarantine", token).await;
    let events = list["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{list}");
    assert_eq!(events[0]["id"], sha256_hex(bodies[1].as_bytes()).as_str());
    let reason = events[0]["reason"].as_str().unwrap();
    println!("refused for good: {reason}");
    assert!(reason.starts_with("refused by the broker"), "{reason}");
    app.stop().await;
}
