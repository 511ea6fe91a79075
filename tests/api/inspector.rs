//! The event inspector (`/ui/`) in a real browser: Debian's headless Chromium, driven through
//! WebDriver (chromedriver) with fantoccini. The test signs in, sees the events it posted,
//! filters by type, opens one and redelivers it (the copy arrives at a bound queue), runs a
//! dry-run redrive, and checks that an event whose body holds markup and script runs nothing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::helpers::*;

const TOKEN: &str = "admin-token-for-tests-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// chromedriver on a port of its own, and a headless Chromium session through it. Dropping it
/// ends both.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Self {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: the inspector test runs Debian's headless Chromium \
                 (`apt-get install chromium chromium-driver`; scripts/test.sh installs them)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        wait_until(
            Duration::from_secs(30),
            "chromedriver to listen",
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
        let profile = tempfile::tempdir().unwrap();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session through chromedriver");
        Self {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn text(&self, css: &str) -> String {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    /// Waits until the element's text satisfies `ok`; returns it.
    async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = element.text().await {
                    if ok(&text) {
                        return text;
                    }
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what} ({css}): {:?}",
                self.text_or_empty(css).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text_or_empty(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn fill(&self, css: &str, value: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    async fn script(&self, source: &str) -> Value {
        self.client.execute(source, vec![]).await.unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn body_with(event: &str, marker: &str, transcript: &str) -> String {
    json!({
        "event": event,
        "timestamp": now_rfc3339(),
        "data": {
            "call_id": format!("call_{marker}"),
            "agent_id": "agent_456",
            "transcript": transcript,
        }
    })
    .to_string()
}

const HOSTILE: &str = "<img src=x onerror=\"window.__pwned='img'\"></script>\
                       <script>window.__pwned='script'</script>";

#[tokio::test]
async fn the_inspector_shows_filters_redelivers_and_redrives_and_runs_nothing_from_a_body() {
    let connection = broker().await;
    let queue = random_name("test.inspector");
    let app = spawn_app(
        Config::default()
            .with_broker(BROKER_URL)
            .set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)
            .file(&queue_file(&queue, "#")),
    )
    .await;
    let mut ids = Vec::new();
    for (i, event) in ["call.ended", "call.ended", "call.started"]
        .iter()
        .enumerate()
    {
        let body = body_with(event, &format!("inspect-{i}"), "hello");
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
        ids.push(sha256_hex(body.as_bytes()));
    }
    let hostile = body_with("conversation.updated", "hostile", HOSTILE);
    assert_eq!(app.post_signed(hostile.clone()).await.status(), 202);
    let hostile_id = sha256_hex(hostile.as_bytes());
    app.wait_outbox_empty().await;
    assert_eq!(drain_queue(&connection, &queue).await.len(), 4);

    // The page's own headers: no inline script, no framing, no sniffing.
    let page = app
        .client
        .get(format!("{}/ui/", app.admin_address))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert!(page.headers().get("set-cookie").is_none());

    let browser = Browser::start().await;
    browser
        .client
        .goto(&format!("{}/ui/", app.admin_address))
        .await
        .unwrap();
    // A wrong token is refused and says so; the right one gets in.
    browser.fill("#token", "not-the-token-0000000000").await;
    browser.click("#sign-in-form button").await;
    browser
        .wait_text("#sign-in-error", "the refusal", |t| t.contains("refused"))
        .await;
    browser.fill("#token", TOKEN).await;
    browser.click("#sign-in-form button").await;
    let list = browser
        .wait_text("#event-table tbody", "the posted events", |t| {
            ids.iter().all(|id| t.contains(id.as_str()))
        })
        .await;
    assert!(list.contains("call_inspect-0"), "{list}");
    // Newest first: the hostile event, posted last, is on top.
    let first_row = browser.text("#event-table tbody tr").await;
    assert!(first_row.contains(&hostile_id), "{first_row}");
    let token_kept = browser
        .script("return [document.cookie, localStorage.length, sessionStorage.length]")
        .await;
    assert_eq!(
        token_kept,
        json!(["", 0, 1]),
        "the token lives in sessionStorage only"
    );

    // Filter by type.
    browser
        .fill("#filters input[name=event]", "call.started")
        .await;
    browser.click("#filters button[type=submit]").await;
    browser
        .wait_text("#list-status", "the filtered list", |t| {
            t.contains("1 shown")
        })
        .await;
    let filtered = browser.text("#event-table tbody").await;
    assert!(
        filtered.contains(&ids[2]) && !filtered.contains(&ids[0]),
        "{filtered}"
    );

    // Open it and redeliver it, with the confirmation step.
    browser.click("#event-table tbody tr").await;
    browser
        .wait_text("#detail-title", "the event's detail", |t| {
            t.contains(&ids[2])
        })
        .await;
    let publish = browser.text("#publish").await;
    assert!(
        publish.contains("\"routing_key\": \"call.started\""),
        "{publish}"
    );
    assert!(browser
        .text("#reproduce")
        .await
        .contains("kallina-relay replay"));
    browser.click("#redeliver").await;
    browser.click("#redeliver-yes").await;
    browser
        .wait_text("#redeliver-result", "the redelivery", |t| {
            t.contains("outbox")
        })
        .await;
    app.wait_outbox_empty().await;
    let copies = drain_queue(&connection, &queue).await;
    assert_eq!(copies.len(), 1);
    assert_eq!(message_id(&copies[0]), ids[2]);

    // A dry-run redrive over the last hour counts the four published events.
    browser.click("#tabs button[data-tab=redrive]").await;
    browser
        .script(
            "const pad = (d) => new Date(d - new Date().getTimezoneOffset() * 60000)\
               .toISOString().slice(0, 19);\
             const f = document.getElementById('redrive-form');\
             f.since.value = pad(Date.now() - 3600000); f.until.value = pad(Date.now() + 60000);\
             return true",
        )
        .await;
    browser.click("#redrive-form button[type=submit]").await;
    let counted = browser
        .wait_text("#redrive-count", "the dry-run count", |t| {
            t.contains("match")
        })
        .await;
    assert!(counted.starts_with("4 published events match"), "{counted}");
    assert!(
        drain_queue(&connection, &queue).await.is_empty(),
        "a dry run publishes nothing"
    );

    // The hostile body is shown as text and runs nothing.
    browser.click("#tabs button[data-tab=events]").await;
    browser.fill("#filters input[name=event]", "").await;
    browser.fill("#filters input[name=id]", &hostile_id).await;
    browser.click("#filters button[type=submit]").await;
    browser
        .wait_text("#event-table tbody", "the hostile event", |t| {
            t.contains(&hostile_id)
        })
        .await;
    browser.click("#event-table tbody tr").await;
    let shown = browser
        .wait_text("#body", "the hostile body", |t| t.contains("onerror"))
        .await;
    assert!(shown.contains("<img src=x onerror="), "{shown}");
    assert!(shown.contains("<script>window.__pwned"), "{shown}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pwned = browser
        .script("return [typeof window.__pwned, document.querySelectorAll('#body img, #body script').length]")
        .await;
    assert_eq!(
        pwned,
        json!(["undefined", 0]),
        "the body's markup ran or was parsed"
    );

    // The overview reads the broker and the store from /readyz and /metrics.
    browser.click("#tabs button[data-tab=overview]").await;
    browser
        .wait_text("#ov-broker", "the broker's state", |t| {
            t.contains("connected")
        })
        .await;
    assert_eq!(browser.text("#ov-store").await, "writable");

    // The README's picture: the whole list, newest first.
    browser.click("#tabs button[data-tab=events]").await;
    browser.fill("#filters input[name=id]", "").await;
    browser.click("#filters button[type=submit]").await;
    browser
        .wait_text("#event-table tbody", "every event again", |t| {
            t.contains(&hostile_id) && t.contains(ids[0].as_str())
        })
        .await;
    let png = browser.client.screenshot().await.unwrap();
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("inspector.png");
    std::fs::write(&path, &png).unwrap();
    if std::env::var_os("KALLINA_UPDATE_SCREENSHOT").is_some() {
        std::fs::write(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/inspector.png"),
            &png,
        )
        .unwrap();
    }
    browser.client.clone().close().await.unwrap();
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}

#[tokio::test]
async fn without_a_token_the_inspector_is_not_there() {
    let app = spawn_app(Config::default()).await;
    for path in ["/ui/", "/ui/app.js", "/ui"] {
        let response = app
            .client
            .get(format!("{}{path}", app.admin_address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_list_pages_newest_first_and_searches_bodies() {
    let app = spawn_app(Config::default().set("KALLINA_RELAY_ADMIN_TOKEN", TOKEN)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let body = body_with(
            "call.ended",
            &format!("page-{i}"),
            &format!("said marker-{i}"),
        );
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
        ids.push(sha256_hex(body.as_bytes()));
    }
    let page = app
        .admin_json("/admin/events?order=desc&limit=2", TOKEN)
        .await;
    let listed: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[2].as_str(), ids[1].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let rest = app
        .admin_json(&format!("/admin/events?order=desc&cursor={cursor}"), TOKEN)
        .await;
    assert_eq!(rest["events"].as_array().unwrap().len(), 1);
    assert_eq!(rest["events"][0]["id"], ids[0].as_str());
    assert_eq!(rest["next_cursor"], Value::Null);
    let found = app.admin_json("/admin/events?q=marker-1", TOKEN).await;
    assert_eq!(found["events"].as_array().unwrap().len(), 1);
    assert_eq!(found["events"][0]["id"], ids[1].as_str());
    assert_eq!(
        found["events"][0]["about"],
        "call_id=call_page-1 agent_id=agent_456"
    );
    let refused = app
        .admin_json(&format!("/admin/events?q={}", "x".repeat(201)), TOKEN)
        .await;
    assert_eq!(refused["error"]["code"], "invalid_query");
    app.stop().await;
}
