//! The relay against the real RabbitMQ: what consumers receive, through outages, restarts,
//! SIGKILL and SIGTERM.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::Value;

use crate::helpers::*;

fn header<'a>(message: &'a lapin::message::BasicGetMessage, name: &str) -> &'a AMQPValue {
    message
        .delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .get(name)
        .unwrap_or_else(|| panic!("header {name}"))
}

#[tokio::test]
async fn every_fixture_arrives_with_its_exact_body_routing_key_and_properties() {
    let connection = broker().await;
    let queue = random_name("test.all");
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_SOURCE", "relay-under-test")
            .file(&queue_file(&queue, "#")),
    )
    .await;
    app.wait_broker_connected().await;

    let mut sent = BTreeMap::new();
    for entry in std::fs::read_dir(fixtures_dir().join("events")).unwrap() {
        let body = fixture_with_fresh_timestamp(&entry.unwrap().path());
        let event = serde_json::from_slice::<Value>(&body).unwrap()["event"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
        // The platform retries: the same bytes again must not be published twice.
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 200);
        sent.insert(sha256_hex(&body), (event, body));
    }
    app.wait_outbox_empty().await;

    let messages = drain_queue(&connection, &queue).await;
    assert_eq!(
        messages.len(),
        sent.len(),
        "one message per event, duplicates not re-published"
    );
    for message in &messages {
        let p = &message.delivery.properties;
        let id = message_id(message);
        let (event, body) = sent.get(&id).expect("message_id is the dedup key");
        assert_eq!(&message.delivery.data, body, "body byte for byte");
        assert_eq!(message.delivery.routing_key.as_str(), event);
        assert_eq!(message.delivery.exchange.as_str(), app.names.exchange);
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), event);
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "kallina-relay");
        let now = time::OffsetDateTime::now_utc().unix_timestamp() as u64;
        assert!(p.timestamp().is_some_and(|t| t <= now && t + 120 > now));
        let signature = kallina_relay::signature::sign(SECRET.as_bytes(), body);
        assert_eq!(
            header(message, "x-kallina-signature"),
            &AMQPValue::LongString(signature.as_str().into())
        );
        assert_eq!(
            header(message, "x-source"),
            &AMQPValue::LongString("relay-under-test".into())
        );
        match header(message, "x-received-at") {
            AMQPValue::LongString(s) => {
                time::OffsetDateTime::parse(
                    &s.to_string(),
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap();
            }
            other => panic!("x-received-at is {other:?}"),
        }
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(
            r#"kallina_relay_published_total{event="call.ended",source="relay-under-test"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("kallina_relay_broker_connected 1"),
        "{metrics}"
    );
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn an_event_no_queue_is_bound_for_lands_in_the_unrouted_queue() {
    let connection = broker().await;
    let queue = random_name("test.ended-only");
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .file(&queue_file(&queue, "call.ended")),
    )
    .await;
    let body = event_body("call.started", "unrouted");
    assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    app.wait_outbox_empty().await;
    let unrouted = drain_queue(&connection, &app.names.unrouted).await;
    assert_eq!(unrouted.len(), 1);
    assert_eq!(unrouted[0].delivery.data, body.as_bytes());
    assert!(drain_queue(&connection, &queue).await.is_empty());
    assert!(app
        .metrics()
        .await
        .contains(r#"kallina_relay_publish_errors_total{reason="returned"} 0"#));
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn while_the_broker_is_cut_events_are_accepted_and_all_arrive_once_restored() {
    let connection = broker().await;
    let forwarder = Forwarder::start("127.0.0.1:5672").await;
    let queue = random_name("test.outage");
    let app = spawn_app(
        Config::default()
            .with_broker(&forwarder.url())
            .file(&queue_file(&queue, "#")),
    )
    .await;
    app.wait_broker_connected().await;

    forwarder.cut();
    let mut keys = BTreeSet::new();
    for i in 0..200 {
        let body = event_body("call.ended", &format!("outage-{i}"));
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
        keys.insert(sha256_hex(body.as_bytes()));
    }
    assert_eq!(app.outbox_depth().await, 200);
    let (status, ready) = app.readyz().await;
    assert_eq!(status, 200, "still ready while the broker is away: {ready}");
    wait_until(
        Duration::from_secs(10),
        "the relay to notice the cut",
        || async { app.readyz().await.1["broker"]["state"] != "connected" },
    )
    .await;
    assert!(app
        .metrics()
        .await
        .contains("kallina_relay_broker_connected 0"));

    forwarder.restore();
    app.wait_outbox_empty().await;
    let messages = drain_queue(&connection, &queue).await;
    let arrived: Vec<String> = messages.iter().map(message_id).collect();
    assert_eq!(arrived.len(), 200, "each exactly once");
    assert_eq!(arrived.iter().cloned().collect::<BTreeSet<_>>(), keys);
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn events_accepted_while_the_broker_was_away_arrive_after_a_restart() {
    let connection = broker().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data_dir = dir.path().join("data");
    let names = Names::random();
    let queue = random_name("test.restart");
    let config = Config::default().file(&queue_file(&queue, "#"));

    // First life: no broker at all.
    let app = spawn_app_at(config.clone(), &data_dir, names.clone(), Some(dir.clone())).await;
    let bodies: Vec<String> = (0..20)
        .map(|i| event_body("call.started", &format!("restart-{i}")))
        .collect();
    for body in &bodies {
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    }
    app.stop().await;

    // Second life, with the broker.
    let app = spawn_app_at(
        config.with_broker(BROKER_URL),
        &data_dir,
        names.clone(),
        Some(dir),
    )
    .await;
    app.wait_outbox_empty().await;
    let messages = drain_queue(&connection, &queue).await;
    let arrived: BTreeSet<Vec<u8>> = messages.iter().map(|m| m.delivery.data.clone()).collect();
    assert_eq!(
        arrived,
        bodies.iter().map(|b| b.clone().into_bytes()).collect()
    );
    assert_eq!(messages.len(), bodies.len());
    assert_eq!(
        app.post_signed(bodies[3].clone()).await.status().as_u16(),
        200,
        "a resend is a duplicate"
    );
    app.stop().await;
    delete_topology(&connection, &names, &[&queue]).await;
}

#[tokio::test]
async fn a_topology_clash_is_reported_on_readyz_while_events_are_still_accepted() {
    let connection = broker().await;
    let names = Names::random();
    // Someone declared our exchange name as a fanout exchange already.
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let app = spawn_app_at(
        Config::default().with_broker(BROKER_URL),
        &dir.path().join("data"),
        names.clone(),
        Some(dir.clone()),
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "the clash to show on /readyz",
        || async { app.readyz().await.1["broker"]["state"] == "topology_error" },
    )
    .await;
    let (status, ready) = app.readyz().await;
    assert_eq!(status, 200);
    assert!(
        ready["broker"]["reason"]
            .as_str()
            .unwrap()
            .contains(&names.exchange),
        "{ready}"
    );
    assert_eq!(
        app.post_signed(event_body("call.ended", "clash"))
            .await
            .status()
            .as_u16(),
        202
    );
    app.stop().await;
    delete_topology(&connection, &names, &[]).await;
}

/// Posts distinct events until told to stop; records the keys answered 2xx.
fn stream_events(
    address: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<Mutex<BTreeSet<String>>>,
    tag: &'static str,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let client = http_client();
        let mut refused = 0;
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let body = event_body("call.ended", &format!("{tag}-{i}-{}", fastrand::u64(..)));
            let signature = kallina_relay::signature::sign(SECRET.as_bytes(), body.as_bytes());
            let result = client
                .post(format!("{address}/webhooks/kallina"))
                .header("X-Kallina-Signature", signature)
                .timeout(Duration::from_secs(5))
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => {
                    accepted.lock().unwrap().insert(sha256_hex(body.as_bytes()));
                }
                _ => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        refused
    })
}

#[tokio::test]
async fn after_repeated_kill_9_every_accepted_event_arrives() {
    let connection = broker().await;
    let dir = tempfile::tempdir().unwrap();
    let setup = ChildSetup::new(dir.path(), "test.kill9");
    let (data_dir, names, queue) = (&setup.data_dir, &setup.names, &setup.queue);
    let config_env = [setup.config_env()];
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));

    for round in 0..4 {
        let mut relay = ChildRelay::start(data_dir, names, &config_env).await;
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Vec<_> = (0..4)
            .map(|_| {
                stream_events(
                    relay.address.clone(),
                    stop.clone(),
                    accepted.clone(),
                    "kill9",
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700 + round * 150)).await;
        relay.child.kill().unwrap(); // SIGKILL, mid-stream
        relay.child.wait().unwrap();
        stop.store(true, Ordering::SeqCst);
        for s in streams {
            s.await.unwrap();
        }
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.len() > 50,
        "the stream got going: {}",
        accepted.len()
    );

    let mut relay = ChildRelay::start(data_dir, names, &config_env).await;
    relay.wait_outbox_empty().await;
    let messages = drain_queue(&connection, queue).await;
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for m in &messages {
        *seen.entry(message_id(m)).or_default() += 1;
    }
    let lost: Vec<_> = accepted.iter().filter(|k| !seen.contains_key(*k)).collect();
    let twice = seen.values().filter(|n| **n > 1).count();
    println!(
        "kill -9: {} accepted, {} messages, {} distinct, {} arrived more than once, {} lost",
        accepted.len(),
        messages.len(),
        seen.len(),
        twice,
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "events answered 2xx but never published: {lost:?}"
    );
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    delete_topology(&connection, names, &[queue]).await;
}

#[tokio::test]
async fn sigterm_under_load_exits_0_within_the_grace_period_and_loses_nothing() {
    let connection = broker().await;
    let dir = tempfile::tempdir().unwrap();
    let setup = ChildSetup::new(dir.path(), "test.sigterm");
    let (data_dir, names, queue) = (&setup.data_dir, &setup.names, &setup.queue);
    let env = [setup.config_env(), ("KALLINA_RELAY_SHUTDOWN_GRACE", "5s")];
    let accepted = Arc::new(Mutex::new(BTreeSet::new()));

    let mut relay = ChildRelay::start(data_dir, names, &env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|_| {
            stream_events(
                relay.address.clone(),
                stop.clone(),
                accepted.clone(),
                "term",
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let signalled = std::time::Instant::now();
    assert_eq!(unsafe { libc::kill(relay.pid(), libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || relay.child.wait().unwrap())
        .await
        .unwrap();
    let took = signalled.elapsed();
    stop.store(true, Ordering::SeqCst);
    for s in streams {
        s.await.unwrap();
    }
    assert_eq!(status.code(), Some(0), "exit status");
    assert!(
        took < Duration::from_secs(5 + 5 + 5),
        "stopped within request grace + relay grace: {took:?}"
    );

    // Whatever was not confirmed before the exit is still in the outbox: a new process sends it.
    let mut relay = ChildRelay::start(data_dir, names, &env).await;
    relay.wait_outbox_empty().await;
    let arrived: BTreeSet<String> = drain_queue(&connection, queue)
        .await
        .iter()
        .map(message_id)
        .collect();
    let accepted = accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty());
    let lost: Vec<_> = accepted.difference(&arrived).collect();
    assert!(lost.is_empty(), "lost after SIGTERM: {lost:?}");
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    delete_topology(&connection, names, &[queue]).await;
}

#[tokio::test]
async fn a_returned_message_is_counted_kept_and_published_once_the_route_exists() {
    let connection = broker().await;
    let app = spawn_app(Config::default().with_broker(BROKER_URL)).await;
    app.wait_broker_connected().await;
    // The alternate exchange loses its queue: an event bound nowhere now comes back (mandatory).
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            app.names.unrouted.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let body = event_body("call.started", "returned");
    assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    wait_until(
        Duration::from_secs(15),
        "the return to be counted",
        || async {
            !app.metrics()
                .await
                .contains(r#"kallina_relay_publish_errors_total{reason="returned"} 0"#)
        },
    )
    .await;
    assert_eq!(
        app.outbox_depth().await,
        1,
        "a returned event stays in the outbox"
    );

    // The operator puts the queue back: the retry lands there.
    channel
        .queue_declare(
            app.names.unrouted.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            app.names.unrouted.as_str().into(),
            app.names.unrouted.as_str().into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    app.wait_outbox_empty().await;
    let messages = drain_queue(&connection, &app.names.unrouted).await;
    assert_eq!(
        messages.len(),
        1,
        "returned publishes were not enqueued anywhere"
    );
    assert_eq!(messages[0].delivery.data, body.as_bytes());
    app.stop_and_clean_broker(&connection, &[]).await;
}
