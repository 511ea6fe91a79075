//! The endpoint table of the contract, row by row, as the platform (or an attacker) sees it.

use std::time::Duration;

use kallina_relay::signature::sign;
use serde_json::Value;

use crate::helpers::*;

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .expect("every answer has X-Request-Id")
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert_eq!(body["error"]["request_id"], request_id.as_str(), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, body["error"].clone())
}

#[tokio::test]
async fn a_new_event_is_accepted_and_a_resend_is_a_duplicate() {
    let app = spawn_app(Config::default()).await;
    let body = event_body("call.ended", "accept");
    let response = app.post_signed(body.clone()).await;
    assert_eq!(response.status().as_u16(), 202);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"status": "accepted", "id": sha256_hex(body.as_bytes())})
    );

    let response = app.post_signed(body.clone()).await;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"status": "duplicate", "id": sha256_hex(body.as_bytes())})
    );

    assert_eq!(
        app.outbox_depth().await,
        1,
        "the duplicate was not stored again"
    );
    let metrics = app.metrics().await;
    assert!(
        metrics
            .contains(r#"kallina_relay_webhooks_total{event="call.ended",outcome="accepted",source="kallina-relay"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"kallina_relay_webhooks_total{event="call.ended",outcome="duplicate",source="kallina-relay"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"kallina_relay_signature_matches_total{secret="0",source="kallina-relay"} 2"#
        ),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn every_fixture_event_is_accepted_including_unknown_types() {
    let app = spawn_app(Config::default()).await;
    let mut files: Vec<_> = std::fs::read_dir(fixtures_dir().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 5);
    for file in &files {
        let response = app.post_signed(fixture_with_fresh_timestamp(file)).await;
        assert_eq!(response.status().as_u16(), 202, "{}", file.display());
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"kallina_relay_webhooks_total{event="other",outcome="accepted",source="kallina-relay"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        r#"kallina_relay_webhooks_total{event="conversation.updated",outcome="accepted",source="kallina-relay"} 1"#
    ));
    app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_whether_or_not_its_length_is_declared() {
    let app = spawn_app(Config::default().set("KALLINA_RELAY_MAX_BODY", "1KiB")).await;
    let big = format!(
        "{{\"event\":\"call.ended\",\"timestamp\":\"{}\",\"pad\":\"{}\"}}",
        now_rfc3339(),
        "x".repeat(2000)
    );

    let (status, error) = error_of(app.post_signed(big.clone()).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert_eq!(error["details"]["limit_bytes"], 1024);

    // Chunked, no Content-Length: refused once the limit is passed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(100)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let response = app
        .client
        .post(format!("{}/webhooks/kallina", app.address))
        .header("X-Kallina-Signature", sign(SECRET.as_bytes(), b"whatever"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert_eq!(app.outbox_depth().await, 0);
    app.stop().await;
}

#[tokio::test]
async fn compressed_bodies_are_refused() {
    let app = spawn_app(Config::default()).await;
    let body = event_body("call.ended", "gzip");
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let response = app
        .post(
            body.into_bytes(),
            &[
                ("X-Kallina-Signature", &signature),
                ("Content-Encoding", "gzip"),
            ],
        )
        .await;
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (415, Some("unsupported_encoding"))
    );
    assert_eq!(error["details"]["content_encoding"], "gzip");
    app.stop().await;
}

#[tokio::test]
async fn signature_failures_say_why() {
    let app = spawn_app(Config::default()).await;
    let body = event_body("call.ended", "sig");
    let good = sign(SECRET.as_bytes(), body.as_bytes());

    let (status, error) = error_of(app.post(body.clone().into_bytes(), &[]).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("missing_signature"))
    );

    let wrong_secret = sign(b"not-the-secret", body.as_bytes());
    let cases = [
        (wrong_secret.as_str(), "mismatch"),
        ("sha1=0123", "wrong_scheme"),
        ("sha256=abc", "malformed_digest"),
        (&good[7..], "wrong_scheme"),
    ];
    for (header, reason) in cases {
        let (status, error) = error_of(
            app.post(
                body.clone().into_bytes(),
                &[("X-Kallina-Signature", header)],
            )
            .await,
        )
        .await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("invalid_signature")),
            "{header}"
        );
        assert_eq!(error["details"]["reason"], reason, "{header}");
    }

    // The digest re-cased is refused: a proxy hashing the header would route it to a replica
    // that never saw the original.
    let upper = format!("sha256={}", good[7..].to_ascii_uppercase());
    let (status, error) = error_of(
        app.post(
            body.clone().into_bytes(),
            &[("X-Kallina-Signature", &upper)],
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_signature"))
    );
    assert_eq!(error["details"]["reason"], "malformed_digest");

    // Two signature headers are ambiguous, even if one is right.
    let response = app
        .post(
            body.into_bytes(),
            &[
                ("X-Kallina-Signature", &good),
                ("X-Kallina-Signature", &wrong_secret),
            ],
        )
        .await;
    let (status, _) = error_of(response).await;
    assert_eq!(status, 401);
    app.stop().await;
}

#[tokio::test]
async fn each_hostile_fixture_gets_invalid_payload_naming_the_field() {
    let app = spawn_app(Config::default()).await;
    let hostile = fixtures_dir().join("hostile");
    let expectations: serde_json::Map<String, Value> =
        serde_json::from_slice(&std::fs::read(hostile.join("expectations.json")).unwrap()).unwrap();
    assert!(expectations.len() >= 14);
    for (file, field) in &expectations {
        let body = std::fs::read(hostile.join(file)).unwrap();
        let (status, error) = error_of(app.post_signed(body).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("invalid_payload")),
            "{file}: {error}"
        );
        assert_eq!(&error["details"]["field"], field, "{file}: {error}");
    }
    assert_eq!(app.outbox_depth().await, 0);
    let metrics = app.metrics().await;
    let line = format!(
        "kallina_relay_webhooks_total{{event=\"none\",outcome=\"invalid_payload\",source=\"kallina-relay\"}} {}",
        expectations.len()
    );
    assert!(metrics.contains(&line), "{metrics}");
    app.stop().await;
}

/// A verified request is remembered, so that its retries (the same bytes) are not verified
/// again (`ingress::retries`). They keep their answers, and what the
/// signature does not settle is still checked: a remembered signature over other bytes is
/// refused, and so is a retry that has fallen out of the timestamp window.
#[tokio::test]
async fn retries_of_a_duplicate_keep_their_answers_and_their_checks() {
    let app = spawn_app(Config::default().set("KALLINA_RELAY_TOLERANCE", "2s")).await;
    let body = event_body("call.ended", "retried");
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let headers = [("X-Kallina-Signature", signature.as_str())];
    let post = |body: Vec<u8>| app.post(body, &headers);
    let hash = sha256_hex(body.as_bytes());
    assert_eq!(post(body.clone().into()).await.status().as_u16(), 202);
    for _ in 0..3 {
        let response = post(body.clone().into()).await;
        assert_eq!(response.status().as_u16(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(
            answer,
            serde_json::json!({"status": "duplicate", "id": hash})
        );
    }
    // The remembered signature over bytes it does not sign: one changed, one added, one less.
    let mut changed = body.clone().into_bytes();
    let last = changed.len() - 2;
    changed[last] ^= 1;
    let mut longer = body.clone().into_bytes();
    longer.push(b' ');
    let shorter = body.as_bytes()[..body.len() - 1].to_vec();
    for forged in [changed, longer, shorter] {
        let (status, error) = error_of(post(forged).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (401, Some("invalid_signature"))
        );
    }
    // Past the 2-s tolerance, the same bytes are too old, remembered or not.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let (status, error) = error_of(post(body.clone().into()).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("timestamp_out_of_tolerance"))
    );
    assert_eq!(error["details"]["reason"], "too_old");
    assert_eq!(app.outbox_depth().await, 1, "stored once");
    let metrics = app.metrics().await;
    assert!(
        metrics
            .contains(r#"kallina_relay_webhooks_total{event="call.ended",outcome="duplicate",source="kallina-relay"} 3"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn timestamps_outside_the_window_are_refused_with_both_times() {
    let app = spawn_app(Config::default()).await;
    let now = time::OffsetDateTime::now_utc();
    let format = |t: time::OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    for (timestamp, reason) in [
        (now - time::Duration::hours(25), "too_old"),
        (now + time::Duration::minutes(10), "in_the_future"),
    ] {
        let body = format!(
            r#"{{"event":"call.ended","timestamp":"{}","data":{{}}}}"#,
            format(timestamp)
        );
        let (status, error) = error_of(app.post_signed(body).await).await;
        assert_eq!(
            (status, error["code"].as_str()),
            (400, Some("timestamp_out_of_tolerance"))
        );
        assert_eq!(error["details"]["reason"], reason);
        assert_eq!(error["details"]["timestamp"], format(timestamp).as_str());
        assert!(
            error["details"]["received_at"].as_str().is_some(),
            "{error}"
        );
    }
    // Inside the window on both sides.
    for timestamp in [
        now - time::Duration::hours(23),
        now + time::Duration::minutes(4),
    ] {
        let body = format!(
            r#"{{"event":"call.ended","timestamp":"{}"}}"#,
            format(timestamp)
        );
        assert_eq!(app.post_signed(body).await.status().as_u16(), 202);
    }
    app.stop().await;
}

#[tokio::test]
async fn other_methods_and_paths_get_405_and_404_in_the_error_shape() {
    let app = spawn_app(Config::default()).await;
    let response = app
        .client
        .get(format!("{}/webhooks/kallina", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers().get("allow").unwrap(), "POST");
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (405, Some("method_not_allowed"))
    );

    let response = app
        .client
        .post(format!("{}/webhooks/other", app.address))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!((status, error["code"].as_str()), (404, Some("not_found")));
    assert!(response_has_no_server_header(&app).await);
    app.stop().await;
}

async fn response_has_no_server_header(app: &TestApp) -> bool {
    let response = app
        .client
        .get(format!("{}/", app.address))
        .send()
        .await
        .unwrap();
    response.headers().get("server").is_none()
}

#[tokio::test]
async fn a_valid_request_id_is_echoed_and_others_are_replaced() {
    let app = spawn_app(Config::default()).await;
    let response = app
        .post(b"{}".to_vec(), &[("X-Request-Id", "req_from_platform-1")])
        .await;
    assert_eq!(
        response.headers().get("x-request-id").unwrap(),
        "req_from_platform-1"
    );
    let (_, error) = error_of(response).await;
    assert_eq!(error["request_id"], "req_from_platform-1");

    let response = app
        .post(b"{}".to_vec(), &[("X-Request-Id", "bad id with spaces")])
        .await;
    let id = response
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("req_") && id.len() > 10, "{id}");
    let accepted = app.post_signed(event_body("call.started", "rid")).await;
    assert!(accepted.headers().get("x-request-id").is_some());
    app.stop().await;
}

#[tokio::test]
async fn during_a_rotation_both_secrets_verify_and_the_metric_shows_which() {
    let app =
        spawn_app(Config::default().set("KALLINA_WEBHOOK_SECRET", format!("new-secret,{SECRET}")))
            .await;
    let old = event_body("call.ended", "old");
    assert_eq!(app.post_signed(old).await.status().as_u16(), 202);
    let new = event_body("call.ended", "new");
    let signature = sign(b"new-secret", new.as_bytes());
    assert_eq!(
        app.post(new.into_bytes(), &[("X-Kallina-Signature", &signature)])
            .await
            .status()
            .as_u16(),
        202
    );
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(
            r#"kallina_relay_signature_matches_total{secret="0",source="kallina-relay"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"kallina_relay_signature_matches_total{secret="1",source="kallina-relay"} 1"#
        ),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_identical_requests_store_exactly_one_event() {
    let app = spawn_app(Config::default()).await;
    let body = event_body("call.ended", "race");
    let answers =
        futures_util::future::join_all((0..50).map(|_| app.post_signed(body.clone()))).await;
    let mut statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        49,
        "{statuses:?}"
    );
    assert_eq!(app.outbox_depth().await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_id_is_a_second_dedup_key_and_never_replaces_the_body() {
    let connection = broker().await;
    let queue = random_name("test.delivery");
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_ID_HEADER", "X-Kallina-Delivery")
            .file(&queue_file(&queue, "#")),
    )
    .await;
    let body = event_body("call.ended", "d1");
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    let post = |body: String, signature: String, id: Option<&'static str>| {
        let app = &app;
        async move {
            let mut headers = vec![("X-Kallina-Signature", signature.as_str())];
            headers.extend(id.map(|id| ("X-Kallina-Delivery", id)));
            let response = app.post(body.into_bytes(), &headers).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // The same signed bytes with another id, or with none, are the same event: the signature
    // covers the body, not the header.
    let hash = sha256_hex(body.as_bytes());
    for (id, expected) in [(Some("d-1"), 202), (Some("d-2"), 200), (None, 200)] {
        let (status, answer) = post(body.clone(), signature.clone(), id).await;
        assert_eq!(status, expected, "id {id:?}: {answer}");
        assert_eq!(
            answer["id"],
            hash.as_str(),
            "the answer names the message_id"
        );
    }
    // Another body under a delivery id already seen is a duplicate too.
    let other = event_body("call.ended", "d2");
    let other_signature = sign(SECRET.as_bytes(), other.as_bytes());
    let (status, _) = post(other.clone(), other_signature.clone(), Some("d-1")).await;
    assert_eq!(status, 200);

    app.wait_outbox_empty().await;
    let messages = drain_queue(&connection, &queue).await;
    assert_eq!(messages.len(), 1, "published once");
    assert_eq!(message_id(&messages[0]), hash);
    let headers = messages[0].delivery.properties.headers().clone().unwrap();
    assert_eq!(
        headers
            .inner()
            .get("x-delivery-id")
            .map(|v| format!("{v:?}")),
        Some(format!(
            "{:?}",
            lapin::types::AMQPValue::LongString("d-1".into())
        ))
    );

    let too_long = "d".repeat(201);
    let mut headers = vec![("X-Kallina-Signature", other_signature.as_str())];
    headers.push(("X-Kallina-Delivery", too_long.as_str()));
    let (status, error) = error_of(app.post(other.into_bytes(), &headers).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_payload"))
    );
    assert_eq!(error["details"]["field"], "id_header");
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn a_full_outbox_answers_503_with_retry_after_and_readiness_drops() {
    let app = spawn_app(Config::default().set("KALLINA_RELAY_OUTBOX_MAX", "2")).await;
    assert_eq!(app.readyz().await.0, 200);
    let first = event_body("call.ended", "f1");
    assert_eq!(app.post_signed(first.clone()).await.status().as_u16(), 202);
    assert_eq!(
        app.post_signed(event_body("call.ended", "f2"))
            .await
            .status()
            .as_u16(),
        202
    );

    let response = app.post_signed(event_body("call.ended", "f3")).await;
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);
    let (status, error) = error_of(response).await;
    assert_eq!((status, error["code"].as_str()), (503, Some("unavailable")));

    // A retry of something already stored is still answered: it needs no room.
    assert_eq!(app.post_signed(first).await.status().as_u16(), 200);
    let (status, ready) = app.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(ready["store"]["outbox_events"], 2);
    assert_eq!(ready["status"], "not_ready");
    app.stop().await;
}

#[tokio::test]
async fn dedup_survives_a_restart() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let data_dir = dir.path().join("data");
    let names = Names::random();
    let body = event_body("call.ended", "restart");
    let app = spawn_app_at(
        Config::default(),
        &data_dir,
        names.clone(),
        Some(dir.clone()),
    )
    .await;
    assert_eq!(app.post_signed(body.clone()).await.status().as_u16(), 202);
    app.stop().await;

    let app = spawn_app_at(Config::default(), &data_dir, names, Some(dir)).await;
    assert_eq!(app.post_signed(body).await.status().as_u16(), 200);
    assert_eq!(app.outbox_depth().await, 1);
    app.stop().await;
}

#[tokio::test]
async fn the_sweeper_forgets_keys_after_the_retention() {
    let app = spawn_app(
        Config::default()
            .set("KALLINA_RELAY_TOLERANCE", "1s")
            .set("KALLINA_RELAY_FUTURE_SKEW", "1s")
            .set("KALLINA_RELAY_DEDUP_RETENTION", "2s")
            .set("KALLINA_RELAY_SWEEP_INTERVAL", "1s")
            .set("KALLINA_RELAY_ID_HEADER", "X-Kallina-Delivery"),
    )
    .await;
    let post = |marker: &'static str| {
        let body = event_body("call.ended", marker);
        let signature = sign(SECRET.as_bytes(), body.as_bytes());
        let app = &app;
        async move {
            app.post(
                body.into_bytes(),
                &[
                    ("X-Kallina-Signature", &signature),
                    ("X-Kallina-Delivery", "dlv_sweep"),
                ],
            )
            .await
            .status()
            .as_u16()
        }
    };
    assert_eq!(post("a").await, 202);
    assert_eq!(post("b").await, 200);
    wait_until(
        Duration::from_secs(15),
        "the sweeper to expire the key",
        || async { app.readyz().await.1["store"]["dedup_keys"] == 0 },
    )
    .await;
    assert!(app.metrics().await.contains("kallina_relay_dedup_keys 0"));
    // The key is forgotten: the same delivery id is new again.
    assert_eq!(post("c").await, 202);
    app.stop().await;
}

#[tokio::test]
async fn a_second_process_on_the_same_data_directory_is_refused() {
    let app = spawn_app(Config::default()).await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .env_clear()
        .env("KALLINA_WEBHOOK_SECRET", SECRET)
        .env("KALLINA_RELAY_DATA_DIR", &app.data_dir)
        .env("KALLINA_RELAY_LISTEN", "127.0.0.1:0")
        .env("KALLINA_RELAY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KALLINA_RELAY_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another kallina-relay process"),
        "{stderr}"
    );
    assert_eq!(
        app.post_signed(event_body("call.ended", "still"))
            .await
            .status()
            .as_u16(),
        202
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bad_setting_stops_the_start_with_one_clear_line() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .env_clear()
        .env("KALLINA_WEBHOOK_SECRET", "do-not-print-me")
        .env("KALLINA_RELAY_DEDUP_RETENTION", "1h")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("KALLINA_RELAY_DEDUP_RETENTION"), "{stderr}");
    assert!(!stderr.contains("do-not-print-me"));

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KALLINA_WEBHOOK_SECRET"));
}

#[tokio::test]
async fn the_sign_command_prints_what_the_platform_sends() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, "Hello, World!").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .args([
            "sign",
            file.to_str().unwrap(),
            "--secret",
            "It's a Secret to Everybody",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[tokio::test]
async fn no_secret_token_or_amqp_password_reaches_the_logs_of_a_full_run() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let webhook_secret = "whsec_never_log_me_7f3a";
    let amqp_password = "amqp_never_log_me_91c2";
    let second_amqp_password = "second_node_never_log_me_3b7d";
    let admin_token = "admin_token_never_log_me_5d8e";
    // A file, not a pipe: at trace level the logs would fill a pipe nobody reads yet.
    let log_path = dir.path().join("relay.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
        .env_clear()
        .env(
            "KALLINA_WEBHOOK_SECRET",
            format!("{webhook_secret},older_secret_never_logged"),
        )
        .env(
            "KALLINA_RELAY_AMQP_URL",
            // Two nodes, each with a password: the relay tries and logs both.
            format!(
                "amqp://kallina:{amqp_password}@127.0.0.1:5672/%2f,\
                 amqp://kallina:{second_amqp_password}@127.0.0.1:1/%2f"
            ),
        )
        .env("KALLINA_RELAY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "KALLINA_RELAY_ADMIN_LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("KALLINA_RELAY_DATA_DIR", dir.path().join("data"))
        .env("KALLINA_RELAY_ADMIN_TOKEN", admin_token)
        .env("KALLINA_RELAY_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let client = http_client();
    let admin = format!("http://127.0.0.1:{admin_port}");
    wait_until(Duration::from_secs(30), "the relay to serve", || {
        let (client, admin) = (client.clone(), admin.clone());
        async move { client.get(format!("{admin}/healthz")).send().await.is_ok() }
    })
    .await;
    // Accepted, duplicate, refused; and the relay failing to log in to the broker meanwhile.
    let body = event_body("call.ended", "logs");
    let signature = sign(webhook_secret.as_bytes(), body.as_bytes());
    for header in [signature.as_str(), signature.as_str(), "sha256=00"] {
        client
            .post(format!("http://127.0.0.1:{port}/webhooks/kallina"))
            .header("X-Kallina-Signature", header)
            .body(body.clone())
            .send()
            .await
            .unwrap();
    }
    // The admin API, with the right token and a wrong one.
    for token in [admin_token, "admin_token_wrong_0000000"] {
        client
            .get(format!("{admin}/admin/events"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
    }
    // Both nodes tried and refused (a login refused, a port closed): read from the log, since
    // `/readyz` shows `disconnected` only between attempts.
    wait_until(
        Duration::from_secs(30),
        "both broker nodes to be tried",
        || async {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .matches("relay session ended")
                .count()
                >= 2
        },
    )
    .await;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("kallina-relay serving"),
        "the logs were captured: {logs}"
    );
    assert!(
        logs.contains("relay session ended"),
        "the broker failure was logged"
    );
    // A request's lines carry its trace id (and both broker nodes were tried).
    let refused = logs
        .lines()
        .find(|l| l.contains("webhook refused"))
        .expect("the refused signature was logged");
    assert!(refused.contains("\"trace_id\""), "{refused}");
    assert!(
        logs.contains("\"next_node\":2"),
        "the second node was tried"
    );
    for secret in [
        webhook_secret,
        "older_secret_never_logged",
        amqp_password,
        second_amqp_password,
        admin_token,
    ] {
        assert!(!logs.contains(secret), "{secret} appears in the logs");
    }
    assert!(!logs.contains(&body), "a whole payload appears in the logs");
}

/// Sends raw bytes and reads what comes back until the server closes or `wait` passes.
async fn raw_exchange(address: &str, request: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn raw_post(version: &str, body: &str, extra: &str) -> String {
    let signature = sign(SECRET.as_bytes(), body.as_bytes());
    format!(
        "POST /webhooks/kallina {version}\r\nHost: relay\r\nContent-Length: {}\r\nX-Kallina-Signature: {signature}\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn http_1_0_and_pipelined_requests_get_their_answers_in_order() {
    let app = spawn_app(Config::default()).await;
    let first = event_body("call.ended", "http10");
    let answer = raw_exchange(
        &app.address,
        raw_post("HTTP/1.0", &first, "").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.0 202") || answer.starts_with("HTTP/1.1 202"),
        "{answer}"
    );

    let second = event_body("call.ended", "pipelined");
    let pipelined = format!(
        "{}{}",
        raw_post("HTTP/1.1", &second, ""),
        raw_post("HTTP/1.1", &second, "Connection: close\r\n")
    );
    let answer = raw_exchange(&app.address, pipelined.as_bytes(), Duration::from_secs(5)).await;
    let statuses: Vec<&str> = answer
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answer[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["202", "200"], "{answer}");
    app.stop().await;
}

/// The handler arms its body deadline only at its second poll (see `ingress::within_deadline`):
/// a head whose body never comes must still be cut off, with nothing arriving to poll it again.
#[tokio::test]
async fn a_head_whose_body_never_comes_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(Config::default().set("KALLINA_RELAY_BODY_TIMEOUT", "1s")).await;
    let body = event_body("call.ended", "never");
    let request = raw_post("HTTP/1.1", &body, "");
    let head = &request[..request.len() - body.len()];
    let mut stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn a_client_too_slow_with_its_body_is_cut_off_and_others_are_served() {
    let app = spawn_app(Config::default().set("KALLINA_RELAY_BODY_TIMEOUT", "1s")).await;
    let body = event_body("call.ended", "slow");
    let request = raw_post("HTTP/1.1", &body, "");
    let (head, rest) = request.split_at(request.len() - body.len());
    let slow = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
            .await
            .unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        // One byte a second: far slower than the 1 s the whole body may take.
        for byte in rest.as_bytes().iter().take(3) {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let other = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.post_signed(event_body("call.ended", "fast"))
            .await
            .status()
            .as_u16()
    };
    let (slow_answer, other_status) = tokio::join!(slow, other);
    assert_eq!(other_status, 202, "another client is served meanwhile");
    assert!(slow_answer.starts_with("HTTP/1.1 408"), "{slow_answer}");
    assert!(slow_answer.contains("request_timeout"), "{slow_answer}");
    assert!(
        slow_answer
            .to_ascii_lowercase()
            .contains("connection: close"),
        "{slow_answer}"
    );
    assert_eq!(
        app.outbox_depth().await,
        1,
        "only the fast event was stored"
    );
    app.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_and_the_server_stays_up() {
    let app = spawn_app(Config::default()).await;
    let body = event_body("call.ended", "big-header");
    let huge = format!("X-Padding: {}\r\n", "a".repeat(200_000));
    let answer = raw_exchange(
        &app.address,
        raw_post("HTTP/1.1", &body, &huge).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(app.post_signed(body).await.status().as_u16(), 202);
    app.stop().await;
}

#[tokio::test]
async fn a_thousand_idle_connections_do_not_keep_real_clients_out() {
    let app = spawn_app(Config::default()).await;
    let target = app.address.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        // Connections that never send a byte (dropped by the server after 5 s without a request).
        idle.push(tokio::net::TcpStream::connect(&target).await.unwrap());
    }
    let started = std::time::Instant::now();
    let status = app
        .post_signed(event_body("call.ended", "behind-idle"))
        .await
        .status()
        .as_u16();
    assert_eq!(status, 202, "served after {:?}", started.elapsed());
    drop(idle);
    app.stop().await;
}

#[tokio::test]
async fn a_full_disk_answers_503_loses_nothing_answered_2xx_and_recovers_when_space_returns() {
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: mounting a small tmpfs for the data directory needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("small");
    std::fs::create_dir(&mount_point).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mount_point)
        .status()
        .unwrap();
    if !mounted.success() {
        println!("skipped: this machine refuses to mount a tmpfs (no CAP_SYS_ADMIN)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // Lazy: a failed test may still hold files open in there.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mount_point.clone());
    let filler = mount_point.join("filler");
    std::fs::write(&filler, vec![0u8; 2 << 20]).unwrap();

    let data_dir = mount_point.join("data");
    let names = Names::random();
    let app = spawn_app_at(Config::default(), &data_dir, names.clone(), None).await;
    let mut accepted = Vec::new();
    // Fill until the service refuses and says it is not ready. A refusal while readiness still
    // says 200 can happen when sled frees space by itself; then the next request decides.
    let mut refused = 0;
    let mut not_ready = false;
    for i in 0..20_000 {
        let body = format!(
            r#"{{"event":"call.ended","timestamp":"{}","data":{{"i":{i},"pad":"{}"}}}}"#,
            now_rfc3339(),
            "x".repeat(2000)
        );
        let response = app.post_signed(body.clone()).await;
        match response.status().as_u16() {
            202 => accepted.push(body),
            503 => {
                assert!(response.headers().get("retry-after").is_some());
                refused += 1;
                if app.readyz().await.0 == 503 {
                    not_ready = true;
                    break;
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(not_ready, "never reported not ready ({refused} refusals)");
    assert!(!accepted.is_empty());

    // Space comes back: the service recovers by itself, without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_until(
        Duration::from_secs(30),
        "readiness after space returned",
        || async { app.readyz().await.0 == 200 },
    )
    .await;
    nothing_answered_2xx_is_lost(&app, &accepted).await;
    assert_eq!(
        app.post_signed(event_body("call.ended", "after-recovery"))
            .await
            .status()
            .as_u16(),
        202
    );

    // And a restart finds all of it too.
    app.stop().await;
    let app = spawn_app_at(Config::default(), &data_dir, names, None).await;
    nothing_answered_2xx_is_lost(&app, &accepted).await;
    app.stop().await;
    println!("disk full after {} accepted events", accepted.len());
}

async fn nothing_answered_2xx_is_lost(app: &TestApp, accepted: &[String]) {
    for body in accepted {
        assert_eq!(
            app.post_signed(body.clone()).await.status().as_u16(),
            200,
            "a 2xx'd event was lost"
        );
    }
    // Events of a batch that failed may have reached the disk too: they were answered 503, so
    // the platform sends them again and gets a duplicate. More is fine, fewer is not.
    assert!(app.outbox_depth().await >= accepted.len() as u64);
}
