//! Spawning the service for tests: in process on port 0 ([`spawn_app`]) or as the real binary
//! ([`ChildRelay`]), signing requests as the platform would, reading RabbitMQ, and cutting the
//! network between the relay and the broker ([`Forwarder`]).

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kallina_relay::config::Layers;
use kallina_relay::settings::Settings;
use kallina_relay::shutdown::ShutdownTrigger;
use kallina_relay::signature::sign;
use kallina_relay::startup::Application;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const SECRET: &str = "whsec_test_secret";
pub const BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Nothing listens on port 1: the relay retries forever, the receiver keeps working.
pub const NO_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

pub fn random_name(prefix: &str) -> String {
    let suffix: String = std::iter::repeat_with(fastrand::lowercase)
        .take(12)
        .collect();
    format!("{prefix}.{suffix}")
}

/// What a test wants different from the defaults, as environment variables of the service.
#[derive(Clone, Default)]
pub struct Config {
    pub env: BTreeMap<String, String>,
    pub file: Option<String>,
}

impl Config {
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.insert(key.to_string(), value.into());
        self
    }
    /// Use the real broker (default: an address where nothing answers).
    pub fn with_broker(self, url: &str) -> Self {
        self.set("KALLINA_RELAY_AMQP_URL", url)
    }
    pub fn file(mut self, toml: &str) -> Self {
        self.file = Some(toml.to_string());
        self
    }
}

/// The names a test's service uses; random so that tests never see each other's messages.
#[derive(Clone)]
pub struct Names {
    pub exchange: String,
    pub unrouted: String,
}

impl Names {
    pub fn random() -> Self {
        let exchange = random_name("test.events");
        Self {
            unrouted: format!("{exchange}.unrouted"),
            exchange,
        }
    }
}

pub struct TestApp {
    pub address: String,
    pub admin_address: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    pub names: Names,
    trigger: ShutdownTrigger,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: Option<Arc<tempfile::TempDir>>,
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn layers(config: &Config, data_dir: &Path, names: &Names) -> Layers {
    let mut env: BTreeMap<String, String> = [
        ("KALLINA_WEBHOOK_SECRET", SECRET),
        ("KALLINA_RELAY_LISTEN", "127.0.0.1:0"),
        ("KALLINA_RELAY_ADMIN_LISTEN", "127.0.0.1:0"),
        ("KALLINA_RELAY_AMQP_URL", NO_BROKER_URL),
        ("KALLINA_RELAY_CONFIRM_TIMEOUT", "5s"),
        ("KALLINA_RELAY_SHUTDOWN_GRACE", "5s"),
        ("KALLINA_RELAY_CACHE_SIZE", "16MiB"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.insert(
        "KALLINA_RELAY_DATA_DIR".into(),
        data_dir.display().to_string(),
    );
    env.insert("KALLINA_RELAY_EXCHANGE".into(), names.exchange.clone());
    env.insert(
        "KALLINA_RELAY_UNROUTED_EXCHANGE".into(),
        names.unrouted.clone(),
    );
    env.extend(config.env.clone());
    Layers {
        file: config
            .file
            .clone()
            .map(|text| (PathBuf::from("test.toml"), text)),
        env,
        flags: BTreeMap::new(),
    }
}

/// The service in this process, on free ports, with a fresh data directory.
pub async fn spawn_app(config: Config) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let data_dir = dir.path().join("data");
    spawn_app_at(config, &data_dir, Names::random(), Some(dir)).await
}

/// The service on a given data directory (to test restarts).
pub async fn spawn_app_at(
    config: Config,
    data_dir: &Path,
    names: Names,
    dir: Option<Arc<tempfile::TempDir>>,
) -> TestApp {
    // Logs only when asked for (`TEST_LOG=1 cargo test`): they would drown the test output.
    if std::env::var_os("TEST_LOG").is_some() {
        kallina_relay::telemetry::init(None);
    }
    let settings =
        Settings::load(&layers(&config, data_dir, &names)).expect("test settings are valid");
    let app = Application::build(settings).expect("the application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let admin_address = format!("http://127.0.0.1:{}", app.admin_port());
    let trigger = app.shutdown_trigger();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        address,
        admin_address,
        client: http_client(),
        data_dir: data_dir.to_path_buf(),
        names,
        trigger,
        task,
        _dir: dir,
    }
}

/// A payload with a fresh timestamp and a unique marker, as the platform would send it.
pub fn event_body(event: &str, marker: &str) -> String {
    serde_json::json!({
        "event": event,
        "timestamp": now_rfc3339(),
        "data": {"call_id": format!("call_{marker}"), "agent_id": "agent_456", "duration": 180}
    })
    .to_string()
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A fixture with its `timestamp` rewritten to now, everything else byte for byte.
pub fn fixture_with_fresh_timestamp(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let envelope: Value = serde_json::from_str(&text).unwrap();
    let old = envelope["timestamp"].as_str().unwrap();
    text.replacen(old, &now_rfc3339(), 1).into_bytes()
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

impl TestApp {
    pub async fn post_signed(&self, body: impl Into<Vec<u8>>) -> reqwest::Response {
        let body = body.into();
        self.post(
            body.clone(),
            &[("X-Kallina-Signature", &sign(SECRET.as_bytes(), &body))],
        )
        .await
    }

    pub async fn post(&self, body: Vec<u8>, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/webhooks/kallina", self.address))
            .header("Content-Type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).send().await.expect("request sent")
    }

    /// `GET` on the admin listener with the bearer token: the JSON answer.
    pub async fn admin_json(&self, path: &str, token: &str) -> Value {
        self.client
            .get(format!("{}{path}", self.admin_address))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn readyz(&self) -> (u16, Value) {
        readyz_at(&self.client, &self.admin_address).await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.admin_address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn outbox_depth(&self) -> u64 {
        self.readyz().await.1["store"]["outbox_events"]
            .as_u64()
            .unwrap()
    }

    /// Waits until the relay has had every stored event confirmed.
    pub async fn wait_outbox_empty(&self) {
        self.wait_outbox_empty_within(Duration::from_secs(60)).await;
    }

    /// Waits for the outbox to drain; on timeout the panic shows what `/readyz` said.
    pub async fn wait_outbox_empty_within(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.outbox_depth().await != 0 {
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {limit:?} waiting for the outbox to drain: {}",
                    self.readyz().await.1
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_broker_connected(&self) {
        wait_until(Duration::from_secs(30), "the relay to connect", || async {
            self.readyz().await.1["broker"]["state"] == "connected"
        })
        .await;
    }

    /// Stops, then deletes what the test declared on the broker (its queues and our exchanges).
    pub async fn stop_and_clean_broker(self, connection: &Connection, queues: &[&str]) {
        let names = self.names.clone();
        self.stop().await;
        delete_topology(connection, &names, queues).await;
    }

    /// Graceful stop, as SIGTERM does; returns when everything has shut down.
    pub async fn stop(self) {
        self.trigger.trigger();
        self.task
            .await
            .expect("app task")
            .expect("app stopped cleanly");
    }
}

/// Status and body of `/readyz` on the admin listener at `admin_address`.
pub async fn readyz_at(client: &reqwest::Client, admin_address: &str) -> (u16, Value) {
    let response = client
        .get(format!("{admin_address}/readyz"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A connection to the test broker; fails the test with instructions if there is none.
pub async fn broker() -> Connection {
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(BROKER_URL, ConnectionProperties::default())).await {
        Ok(Ok(connection)) => connection,
        other => panic!(
            "RabbitMQ is not reachable at {BROKER_URL} ({}). The integration tests need a real broker: \
             run the suite with `scripts/test.sh` (it installs and starts one), or start one with \
             `rabbitmq-server -detached`.",
            match other {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer within 10s".into(),
            }
        ),
    }
}

/// Every message now in `queue`, taken off it.
pub async fn drain_queue(connection: &Connection, queue: &str) -> Vec<BasicGetMessage> {
    let channel = connection.create_channel().await.unwrap();
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap_or_else(|e| panic!("basic_get on {queue}: {e}"))
    {
        messages.push(message);
    }
    messages
}

/// The `message_id` of a message taken off a queue (the event's dedup key).
pub fn message_id(message: &BasicGetMessage) -> String {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .expect("message_id is set")
        .to_string()
}

/// Deletes what a test declared on the broker.
pub async fn delete_topology(connection: &Connection, names: &Names, queues: &[&str]) {
    let channel = connection.create_channel().await.unwrap();
    for queue in queues.iter().copied().chain([names.unrouted.as_str()]) {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [&names.exchange, &names.unrouted] {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// For tests of the real binary: a data directory, random names, and a configuration file
/// declaring one queue bound to `#`, all under `dir`.
pub struct ChildSetup {
    pub data_dir: PathBuf,
    pub names: Names,
    pub queue: String,
    pub config_file: PathBuf,
}

impl ChildSetup {
    pub fn new(dir: &Path, queue_prefix: &str) -> Self {
        let queue = random_name(queue_prefix);
        let config_file = dir.join("relay.toml");
        std::fs::write(&config_file, queue_file(&queue, "#")).unwrap();
        Self {
            data_dir: dir.join("data"),
            names: Names::random(),
            queue,
            config_file,
        }
    }

    pub fn config_env(&self) -> (&'static str, &str) {
        ("KALLINA_RELAY_CONFIG", self.config_file.to_str().unwrap())
    }
}

/// A configuration file declaring one durable queue bound with `pattern`.
pub fn queue_file(queue: &str, pattern: &str) -> String {
    format!("[[queues]]\nname = \"{queue}\"\nbindings = [\"{pattern}\"]\n")
}

/// A TCP forwarder between the relay and RabbitMQ that a test can cut and restore.
pub struct Forwarder {
    pub port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept_loop: JoinHandle<()>,
}

impl Forwarder {
    pub async fn start(upstream: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept_loop = {
            let (cut, connections) = (cut.clone(), connections.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close at once
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task);
                }
            })
        };
        Self {
            port,
            cut,
            connections,
            accept_loop,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
        self.accept_loop.abort();
    }
}

/// The real binary as a child process, for SIGKILL and SIGTERM tests.
pub struct ChildRelay {
    pub child: Child,
    pub address: String,
    pub admin_address: String,
}

/// A port nothing listens on now, for a child relay's listeners.
///
/// Taken below the kernel's ephemeral range (32768–60999 by default), where every port-0 bind
/// of the tests running alongside lands: a port picked from that range could be handed to one
/// of them between this check and the child's own bind (seen as `Address already in use`).
pub fn free_port() -> u16 {
    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(LAST - FIRST);
    // Spread by process, so that two test runs at once start apart.
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = FIRST + offset as u16;
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {LAST}");
}

/// The environment every relay started as a child process gets: nothing inherited but `PATH`,
/// the test secret, both listeners on the given ports, the data directory, a small cache and
/// JSON logs. Callers add what their test is about.
pub fn child_relay_env<'a>(
    command: &'a mut Command,
    data_dir: &Path,
    port: u16,
    admin_port: u16,
) -> &'a mut Command {
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KALLINA_WEBHOOK_SECRET", SECRET)
        .env("KALLINA_RELAY_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "KALLINA_RELAY_ADMIN_LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )
        .env("KALLINA_RELAY_DATA_DIR", data_dir)
        .env("KALLINA_RELAY_CACHE_SIZE", "16MiB")
        .env("KALLINA_RELAY_LOG_FORMAT", "json")
}

impl ChildRelay {
    pub async fn start(data_dir: &Path, names: &Names, extra_env: &[(&str, &str)]) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_kallina-relay"));
        child_relay_env(&mut command, data_dir, port, admin_port)
            .env("KALLINA_RELAY_EXCHANGE", &names.exchange)
            .env("KALLINA_RELAY_UNROUTED_EXCHANGE", &names.unrouted)
            .env("KALLINA_RELAY_AMQP_URL", BROKER_URL)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            command.env(k, v);
        }
        let child = command.spawn().expect("the kallina-relay binary starts");
        let relay = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            admin_address: format!("http://127.0.0.1:{admin_port}"),
        };
        let client = http_client();
        let healthz = format!("{}/healthz", relay.admin_address);
        wait_until(Duration::from_secs(30), "the child relay to serve", || {
            let (client, healthz) = (client.clone(), healthz.clone());
            async move {
                client
                    .get(healthz)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        relay
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until this process's relay has had every stored event confirmed.
    pub async fn wait_outbox_empty(&self) {
        let client = http_client();
        wait_until(
            Duration::from_secs(60),
            "the child relay's outbox to drain",
            || async {
                readyz_at(&client, &self.admin_address).await.1["store"]["outbox_events"] == 0
            },
        )
        .await;
    }
}

/// Counts of each `message_id` that arrived: lost ones are missing, duplicates above 1.
pub fn arrivals(messages: &[lapin::message::BasicGetMessage]) -> BTreeMap<String, usize> {
    let ids: Vec<String> = messages.iter().map(message_id).collect();
    arrivals_of_ids(&ids)
}

pub fn arrivals_of_ids(ids: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for id in ids {
        *counts.entry(id.clone()).or_default() += 1;
    }
    counts
}

/// A metric's value (one without labels) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}
