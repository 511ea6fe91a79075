//! The admin API: token handling, looking events up, redeliver and redrive against the real
//! broker.

use std::time::Duration;

use lapin::types::AMQPValue;
use serde_json::Value;

use crate::helpers::*;

const TOKEN: &str = "admin-token-for-tests-0123456789";

impl TestApp {
    fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let request = self
            .client
            .request(method, format!("{}/admin{path}", self.admin_address));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn admin_get(&self, path: &str) -> (u16, Value) {
        answer(self.admin(reqwest::Method::GET, path, Some(TOKEN))).await
    }

    async fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        answer(
            self.admin(reqwest::Method::POST, path, Some(TOKEN))
                .json(&body),
        )
        .await
    }
}

/// Status and JSON body of an admin API answer.
async fn answer(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn without_a_token_the_admin_api_does_not_exist_and_health_stays_open() {
    let app = spawn_app(Config::default()).await;
    for token in [None, Some(TOKEN)] {
        let response = app
            .admin(reqwest::Method::GET, "/events", token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 404);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
    }
    let health = app
        .client
        .get(format!("{}/healthz", app.admin_address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401_and_the_right_one_gets_in() {
    let app = spawn_app(Config::default().set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)).await;
    for token in [None, Some("admin-token-for-tests-0123456788"), Some("")] {
        let response = app
            .admin(reqwest::Method::GET, "/events", token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401, "token {token:?}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(body["error"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("req_"));
    }
    let (status, page) = app.admin_get("/events").await;
    assert_eq!(status, 200);
    assert_eq!(
        page,
        serde_json::json!({ "events": [], "next_cursor": null })
    );
    // Metrics need no token.
    assert!(app
        .metrics()
        .await
        .contains("kallina_relay_archive_events 0"));

    let (status, body) = app.admin_get("/events?limit=5000").await;
    assert_eq!(
        (status, body["error"]["details"]["field"].as_str()),
        (400, Some("limit"))
    );
    let (status, body) = app.admin_get("/events?colour=blue").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (status, body) = app.admin_get("/events/no-such-id").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = app
        .admin_post("/redrive", serde_json::json!({ "since": "soon" }))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    app.stop().await;
}

#[tokio::test]
async fn published_events_can_be_listed_shown_redelivered_and_redriven() {
    let connection = broker().await;
    let queue = random_name("test.admin");
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)
            .file(&queue_file(&queue, "#")),
    )
    .await;
    app.wait_broker_connected().await;
    let bodies = [
        event_body("call.ended", "admin-1"),
        event_body("call.started", "admin-2"),
        event_body("call.ended", "admin-3"),
    ];
    for body in &bodies {
        assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    }
    app.wait_outbox_empty().await;
    assert_eq!(drain_queue(&connection, &queue).await.len(), 3);

    // Listed in acceptance order, a page at a time.
    let (status, first) = app.admin_get("/events?limit=2").await;
    assert_eq!(status, 200);
    let ids: Vec<String> = bodies.iter().map(|b| sha256_hex(b.as_bytes())).collect();
    let listed: Vec<&str> = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[0].as_str(), ids[1].as_str()]);
    let cursor = first["next_cursor"].as_str().unwrap();
    let (_, second) = app
        .admin_get(&format!("/events?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(second["events"][0]["id"], ids[2].as_str());
    let summary = &first["events"][0];
    assert_eq!(summary["status"], "published");
    assert_eq!(summary["event"], "call.ended");
    assert_eq!(summary["attempts"], 1);
    assert_eq!(summary["redelivered"], false);
    assert!(summary["published"].as_str().is_some());
    let (_, only_started) = app.admin_get("/events?event=call.started").await;
    assert_eq!(only_started["events"].as_array().unwrap().len(), 1);

    // One event in full, its body as received.
    let (status, shown) = app.admin_get(&format!("/events/{}", ids[1])).await;
    assert_eq!(status, 200);
    assert_eq!(
        shown["body"],
        serde_json::from_str::<Value>(&bodies[1]).unwrap()
    );

    // Redeliver: the same message_id again, marked, and counted.
    let (status, answer) = app
        .admin_post(&format!("/events/{}/redeliver", ids[1]), Value::Null)
        .await;
    assert_eq!((status, answer["status"].as_str()), (202, Some("pending")));
    app.wait_outbox_empty().await;
    let again = drain_queue(&connection, &queue).await;
    assert_eq!(again.len(), 1);
    assert_eq!(message_id(&again[0]), ids[1]);
    assert_eq!(again[0].delivery.data, bodies[1].as_bytes());
    let headers = again[0].delivery.properties.headers().as_ref().unwrap();
    assert_eq!(
        headers.inner().get("x-redelivered"),
        Some(&AMQPValue::Boolean(true))
    );
    let (_, shown) = app.admin_get(&format!("/events/{}", ids[1])).await;
    assert_eq!(
        (shown["redelivered"].as_bool(), shown["attempts"].as_u64()),
        (Some(true), Some(2))
    );

    // Redrive: a dry run counts, the real one republishes at the configured rate.
    let window = serde_json::json!({
        "since": "2000-01-01T00:00:00Z",
        "until": 4_000_000_000u64,
        "event": "call.ended",
    });
    let mut dry = window.clone();
    dry["dry_run"] = true.into();
    let (status, counted) = app.admin_post("/redrive", dry).await;
    assert_eq!((status, counted["matched"].as_u64()), (200, Some(2)));
    assert!(
        drain_queue(&connection, &queue).await.is_empty(),
        "a dry run publishes nothing"
    );
    let (status, started) = app.admin_post("/redrive", window).await;
    assert_eq!((status, started["matched"].as_u64()), (202, Some(2)));
    wait_until(Duration::from_secs(30), "the redrive to finish", || async {
        app.metrics()
            .await
            .contains(r#"kallina_relay_redelivered_events_total{trigger="redrive"} 2"#)
    })
    .await;
    app.wait_outbox_empty().await;
    let mut redriven: Vec<String> = drain_queue(&connection, &queue)
        .await
        .iter()
        .map(message_id)
        .collect();
    redriven.sort();
    let mut expected = vec![ids[0].clone(), ids[2].clone()];
    expected.sort();
    assert_eq!(redriven, expected);
    assert!(app
        .metrics()
        .await
        .contains("kallina_relay_redrive_pending_events 0"));

    // Still a duplicate for the platform: a retry is answered, not republished.
    assert_eq!(
        app.post_signed(bodies[0].clone()).await.status().as_u16(),
        200
    );
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn redelivering_an_event_still_waiting_for_the_broker_is_a_conflict() {
    // No broker: the event stays pending.
    let app = spawn_app(Config::default().set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)).await;
    let body = event_body("call.ended", "pending");
    assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    let id = sha256_hex(body.as_bytes());
    let (status, shown) = app.admin_get(&format!("/events/{id}")).await;
    assert_eq!((status, shown["status"].as_str()), (200, Some("pending")));
    assert_eq!(shown["published"], Value::Null);
    let (status, answer) = app
        .admin_post(&format!("/events/{id}/redeliver"), Value::Null)
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("event_pending"))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_record_that_cannot_be_decoded_is_quarantined_and_everything_behind_it_is_published() {
    let connection = broker().await;
    let queue = random_name("test.quarantine");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let names = Names::random();
    let config = Config::default()
        .set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)
        .file(&queue_file(&queue, "#"));

    // Three events stored while the broker is away; then, with the relay stopped, the second
    // record is overwritten by bytes no version of this relay reads.
    let app = spawn_app_at(config.clone(), &data_dir, names.clone(), None).await;
    let bodies: Vec<String> = (0..3)
        .map(|i| event_body("call.ended", &format!("quarantine-{i}")))
        .collect();
    for body in &bodies {
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
    }
    app.stop().await;
    {
        let db = sled::Config::new().path(&data_dir).open().unwrap();
        let outbox = db.open_tree("outbox").unwrap();
        // New events are stored in runs (a 9-byte key: the first number and 0xFF; members of
        // an 8-byte number and a 25-byte reference each). Rewritten as one entry per event,
        // the layout of a database from before runs, the second can be overwritten alone.
        for entry in outbox.iter().collect::<Vec<_>>() {
            let (key, run) = entry.unwrap();
            if key.len() == 9 {
                for member in run.chunks_exact(33) {
                    outbox.insert(&member[..8], &member[8..]).unwrap();
                }
                outbox.remove(key).unwrap();
            }
        }
        assert_eq!(outbox.len(), 3);
        let (second, _) = outbox.iter().nth(1).unwrap().unwrap();
        outbox.insert(second, &b"\x09not a record"[..]).unwrap();
        db.flush().unwrap();
    }

    let app = spawn_app_at(config.with_broker(BROKER_URL), &data_dir, names, None).await;
    app.wait_outbox_empty().await;
    let published: Vec<String> = drain_queue(&connection, &queue)
        .await
        .iter()
        .map(message_id)
        .collect();
    assert_eq!(
        published,
        [
            sha256_hex(bodies[0].as_bytes()),
            sha256_hex(bodies[2].as_bytes())
        ],
        "the events around the bad record are published, in order"
    );
    assert!(app
        .metrics()
        .await
        .contains("kallina_relay_quarantined_events 1"));
    assert_eq!(app.readyz().await.1["store"]["quarantined_events"], 1);

    let (status, list) = app.admin_get("/quarantine").await;
    assert_eq!(status, 200, "{list}");
    let events = list["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{list}");
    let reason = events[0]["reason"].as_str().unwrap();
    assert!(reason.contains("unknown format version 9"), "{reason}");
    assert_eq!(
        events[0]["id"],
        Value::Null,
        "a record that does not decode has no id"
    );
    let seq = events[0]["seq"].as_str().unwrap().to_string();

    // The CLI shows the same list.
    let cli = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .args([
            "events",
            "quarantine",
            "list",
            "--admin-url",
            &app.admin_address,
        ])
        .env_clear()
        .env("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(
        stdout.contains(&seq) && stdout.contains("unknown format version 9"),
        "{stdout}"
    );

    // Put back, it is tried again; still unreadable, it returns to the quarantine under a new
    // number, and nothing else is published.
    let (status, answer) = app
        .admin_post(&format!("/quarantine/{seq}/redeliver"), Value::Null)
        .await;
    assert_eq!(status, 202, "{answer}");
    wait_until(Duration::from_secs(30), "the record to return", || async {
        let (_, list) = app.admin_get("/quarantine").await;
        let events = list["events"].as_array().cloned().unwrap_or_default();
        events.len() == 1 && events[0]["seq"].as_str() != Some(seq.as_str())
    })
    .await;
    assert_eq!(
        app.admin_post("/quarantine/999999/redeliver", Value::Null)
            .await
            .0,
        404
    );
    assert!(drain_queue(&connection, &queue).await.is_empty());
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}
