//! Several sources on one relay, routing keys from a template, and trace context from the
//! request to the queue (and, when configured, to an OTLP collector of the test's own).

use std::sync::{Arc, Mutex};

use actix_web::{web, App, HttpResponse, HttpServer};
use kallina_relay::signature::sign;
use lapin::message::BasicGetMessage;
use lapin::types::AMQPValue;
use serde_json::{json, Value};

use crate::helpers::*;

const STAGING_SECRET: &str = "staging-secret-of-another-workspace";
const TOKEN: &str = "admin-token-for-tests-0123456789";

fn string_header(message: &BasicGetMessage, name: &str) -> Option<String> {
    match message
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(name)?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => panic!("header {name}: {other:?}"),
    }
}

async fn post_to(app: &TestApp, path: &str, body: &str, secret: &str) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}{path}", app.address))
        .header("Content-Type", "application/json")
        .header(
            "X-Kallina-Signature",
            sign(secret.as_bytes(), body.as_bytes()),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

fn sources_file(queue: &str, pattern: &str) -> String {
    format!(
        "[[sources]]\nname = \"staging\"\nsecrets = [\"{STAGING_SECRET}\"]\n\n{}",
        queue_file(queue, pattern)
    )
}

#[tokio::test]
async fn each_source_has_its_own_path_secrets_and_events() {
    let connection = broker().await;
    let queue = random_name("test.sources");
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)
            .file(&sources_file(&queue, "#")),
    )
    .await;
    let body = event_body("call.ended", "two-workspaces");

    // One source's signature is refused on the other's path.
    let (status, answer) = post_to(&app, "/webhooks/staging", &body, SECRET).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (401, Some("invalid_signature"))
    );
    let (status, _) = post_to(&app, "/webhooks/kallina", &body, STAGING_SECRET).await;
    assert_eq!(status, 401);
    // The same bytes from both workspaces are two events, each answered under its own key.
    let (status, staging) = post_to(&app, "/webhooks/staging", &body, STAGING_SECRET).await;
    assert_eq!(status, 202, "{staging}");
    let (status, default) = post_to(&app, "/webhooks/kallina", &body, SECRET).await;
    assert_eq!(status, 202, "{default}");
    let digest = sha256_hex(body.as_bytes());
    assert_eq!(default["id"], digest.as_str());
    assert_eq!(staging["id"], format!("staging:{digest}").as_str());
    // … and each is a duplicate only of itself.
    let (status, _) = post_to(&app, "/webhooks/staging", &body, STAGING_SECRET).await;
    assert_eq!(status, 200);

    // Unknown sources and other methods.
    let (status, answer) = post_to(&app, "/webhooks/nope", &body, SECRET).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let get = app
        .client
        .get(format!("{}/webhooks/staging", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405);

    app.wait_outbox_empty().await;
    let messages = drain_queue(&connection, &queue).await;
    let mut seen: Vec<(String, String)> = messages
        .iter()
        .map(|m| (message_id(m), string_header(m, "x-source").unwrap()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (digest.clone(), "kallina-relay".to_string()),
            (format!("staging:{digest}"), "staging".to_string()),
        ]
    );

    let metrics = app.metrics().await;
    for line in [
        r#"kallina_relay_webhooks_total{event="call.ended",outcome="accepted",source="staging"} 1"#,
        r#"kallina_relay_webhooks_total{event="call.ended",outcome="duplicate",source="staging"} 1"#,
        r#"kallina_relay_webhooks_total{event="none",outcome="not_found",source="none"} 1"#,
        r#"kallina_relay_signature_matches_total{secret="0",source="staging"} 2"#,
        r#"kallina_relay_published_total{event="call.ended",source="staging"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    let listed = app.admin_json("/admin/events?source=staging", TOKEN).await;
    let ids: Vec<&str> = listed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![format!("staging:{digest}")]);
    assert_eq!(listed["events"][0]["source"], "staging");
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[test]
fn a_source_clashing_with_the_default_or_without_a_secret_stops_the_start() {
    for (file, expected) in [
        (
            "[[sources]]\nname = \"kallina\"\nsecrets = [\"x\"]\n",
            "clashes with the default source",
        ),
        (
            "[[sources]]\nname = \"a.b\"\nsecrets = [\"x\"]\n",
            "letters, digits",
        ),
        ("[[sources]]\nname = \"staging\"\n", "no secret"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, file).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
            .env_clear()
            .env("KALLINA_WEBHOOK_SECRET", "s")
            .env("KALLINA_RELAY_CONFIG", &config)
            .env("KALLINA_RELAY_DATA_DIR", dir.path().join("data"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{file}: {stderr}");
        assert!(stderr.contains(expected), "{file}: {stderr}");
    }
}

#[tokio::test]
async fn routing_keys_follow_the_template_and_a_payload_cannot_inject_words_or_wildcards() {
    let connection = broker().await;
    let queue = random_name("test.routing");
    // Bound to one agent's ended calls from staging only.
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set(
                "KALLINA_RELAY_ROUTING_KEY",
                "{source}.{event}.{data.agent_id}",
            )
            .file(&sources_file(&queue, "staging.call.ended.*")),
    )
    .await;
    let envelope = |agent: Value| {
        json!({
            "event": "call.ended",
            "timestamp": now_rfc3339(),
            "data": {"call_id": format!("call_{}", fastrand::u64(..)), "agent_id": agent},
        })
        .to_string()
    };
    let cases = [
        (json!("agent_42"), "staging.call.ended.agent_42"),
        (json!("agent_1.billing"), "staging.call.ended._"),
        (json!("#"), "staging.call.ended._"),
        (json!("*"), "staging.call.ended._"),
        (json!(42), "staging.call.ended._"),
        (Value::Null, "staging.call.ended._"),
    ];
    let mut expected = Vec::new();
    for (agent, key) in &cases {
        let body = envelope(agent.clone());
        let (status, answer) = post_to(&app, "/webhooks/staging", &body, STAGING_SECRET).await;
        assert_eq!(status, 202, "{answer}");
        expected.push((
            format!("staging:{}", sha256_hex(body.as_bytes())),
            key.to_string(),
        ));
    }
    // The default source's events route as `kallina-relay.call.ended.…`: not bound here.
    let (status, _) = post_to(
        &app,
        "/webhooks/kallina",
        &envelope(json!("agent_42")),
        SECRET,
    )
    .await;
    assert_eq!(status, 202);
    app.wait_outbox_empty().await;
    let mut arrived: Vec<(String, String)> = drain_queue(&connection, &queue)
        .await
        .iter()
        .map(|m| (message_id(m), m.delivery.routing_key.to_string()))
        .collect();
    arrived.sort();
    expected.sort();
    assert_eq!(arrived, expected);
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

/// `(trace id, span id)` of a valid version-00 `traceparent`.
fn parse_traceparent(header: &str) -> (String, String) {
    let fields: Vec<&str> = header.split('-').collect();
    assert_eq!(fields.len(), 4, "{header}");
    assert_eq!(fields[0], "00", "{header}");
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    assert!(
        hex(fields[1], 32) && fields[1] != "0".repeat(32),
        "{header}"
    );
    assert!(
        hex(fields[2], 16) && fields[2] != "0".repeat(16),
        "{header}"
    );
    (fields[1].to_string(), fields[2].to_string())
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP collector of the test's own: every span of every JSON export it receives.
struct Collector {
    address: String,
    spans: Arc<Mutex<Vec<Value>>>,
    server: actix_web::dev::ServerHandle,
}

impl Collector {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<Value>>> = Arc::default();
        let received = spans.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let server = HttpServer::new(move || {
            let received = received.clone();
            App::new().route(
                "/v1/traces",
                web::post().to(move |body: web::Bytes| {
                    let received = received.clone();
                    async move {
                        let export: Value = serde_json::from_slice(&body).unwrap_or_default();
                        for resource in export["resourceSpans"].as_array().into_iter().flatten() {
                            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                                for span in scope["spans"].as_array().into_iter().flatten() {
                                    received.lock().unwrap().push(span.clone());
                                }
                            }
                        }
                        HttpResponse::Ok().json(json!({}))
                    }
                }),
            )
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            address,
            spans,
            server: handle,
        }
    }

    fn span(&self, name: &str) -> Option<Value> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }
}

#[tokio::test]
async fn a_traceparent_is_carried_to_the_queue_and_the_spans_to_the_collector() {
    let connection = broker().await;
    let queue = random_name("test.trace");
    let collector = Collector::start().await;
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_OTLP_ENDPOINT", &collector.address)
            .set("KALLINA_RELAY_OTLP_PROTOCOL", "http/json")
            .file(&queue_file(&queue, "#")),
    )
    .await;
    let traced = event_body("call.ended", "traced");
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    let response = app
        .post(
            traced.clone().into_bytes(),
            &[
                (
                    "X-Kallina-Signature",
                    &sign(SECRET.as_bytes(), traced.as_bytes()),
                ),
                ("traceparent", &caller),
                ("tracestate", "kallina=t61rcWkgMzE"),
            ],
        )
        .await;
    assert_eq!(response.status(), 202);
    let untraced = event_body("call.ended", "untraced");
    assert_eq!(app.post_signed(untraced.clone()).await.status(), 202);
    let invalid = event_body("call.ended", "invalid-traceparent");
    let response = app
        .post(
            invalid.clone().into_bytes(),
            &[
                (
                    "X-Kallina-Signature",
                    &sign(SECRET.as_bytes(), invalid.as_bytes()),
                ),
                ("traceparent", "00-not-a-trace-01"),
            ],
        )
        .await;
    assert_eq!(response.status(), 202);
    app.wait_outbox_empty().await;

    let messages = drain_queue(&connection, &queue).await;
    let find = |body: &str| {
        let id = sha256_hex(body.as_bytes());
        messages
            .iter()
            .find(|m| message_id(m) == id)
            .unwrap_or_else(|| panic!("{id} arrived"))
    };
    // Continued: the caller's trace, our publish span, the caller's tracestate.
    let message = find(&traced);
    let (trace, publish_span) =
        parse_traceparent(&string_header(message, "traceparent").expect("traceparent"));
    assert_eq!(trace, CALLER_TRACE);
    assert_ne!(publish_span, CALLER_SPAN);
    assert_eq!(
        string_header(message, "tracestate").as_deref(),
        Some("kallina=t61rcWkgMzE")
    );
    // Started by the relay: a valid traceparent of a new trace, for both.
    let mut new_traces = Vec::new();
    for body in [&untraced, &invalid] {
        let message = find(body);
        let (trace, _) = parse_traceparent(&string_header(message, "traceparent").unwrap());
        assert_ne!(trace, CALLER_TRACE);
        assert_eq!(string_header(message, "tracestate"), None);
        new_traces.push(trace);
    }
    assert_ne!(new_traces[0], new_traces[1]);

    // The spans, once the batch exporter has sent them (it is flushed at stop).
    let names = app.names.clone();
    app.stop().await;
    let receive = collector.span("receive").expect("a receive span");
    let store = collector.span("store").expect("a store span");
    let publish = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "publish" && s["traceId"] == CALLER_TRACE)
        .cloned()
        .expect("a publish span in the caller's trace");
    let receive = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "receive" && s["traceId"] == CALLER_TRACE)
        .cloned()
        .unwrap_or(receive);
    assert_eq!(receive["parentSpanId"], CALLER_SPAN, "{receive}");
    assert_eq!(publish["spanId"], publish_span.as_str(), "{publish}");
    assert_eq!(publish["parentSpanId"], receive["spanId"], "{publish}");
    assert_eq!(store["traceId"].as_str().map(str::len), Some(32), "{store}");
    collector.server.stop(true).await;
    delete_topology(&connection, &names, &[&queue]).await;
}
