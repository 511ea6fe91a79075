//! The chaos soak: for a set time, distinct events stream in while the real binary is killed
//! with SIGKILL and RabbitMQ is restarted at random moments; at the end, every event answered
//! 2xx must be found on the queue. Not in the default suite (`#[ignore]`): it runs for minutes.
//! Run it with `scripts/chaos-soak.sh [SECONDS]`; `scripts/chaos-soak.sh --cluster [SECONDS]`
//! runs it on a three-node cluster with quorum queues, restarting one node at a time.
//!
//! It starts its own RabbitMQ node (own name, ports, data and cookie in a temporary directory),
//! so that restarting it disturbs no other test or process using the shared broker. A broker
//! restart is always the whole node going away and coming back, never `stop_app`/`start_app`
//! (which keeps the Erlang VM and its memory): half of them an orderly `rabbitmqctl stop`, half
//! a SIGKILL of the VM, as a crash or an OOM kill would, the harder case for publisher confirms.
//! Queues and messages survive both, since the queue is durable, the messages persistent, and a
//! confirm is sent only once they are on disk.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;

use crate::helpers::*;

const EVENTS: [&str; 4] = [
    "call.started",
    "call.ended",
    "agent.action_completed",
    "conversation.updated",
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

fn wall_clock() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:02}:{:02}:{:02}Z", now.hour(), now.minute(), now.second())
}

/// Log lines carry both the test's clock (to line up with the counts) and the wall clock (to
/// line up with the relay's and the broker's own logs).
fn log(start: Instant, line: impl std::fmt::Display) {
    println!(
        "[{:7.1}s {}] {line}",
        start.elapsed().as_secs_f64(),
        wall_clock()
    );
}

/// A RabbitMQ node of this test's own. Dropping it stops the node, also when the test fails.
struct BrokerNode {
    dir: PathBuf,
    name: String,
    port: u16,
    dist_port: u16,
    bin: PathBuf,
}

impl BrokerNode {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        // No plugins: the management plugin's fixed port 15672 would clash with the shared node.
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // Empty files so that /etc/rabbitmq's settings (port, node name) do not leak in.
        std::fs::write(dir.join("rabbitmq-env.conf"), "").unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), "").unwrap();
        // The CLI tools take their own distribution ports at dist_port + 10000..=10010.
        let dist_port = loop {
            let port = free_port();
            if port < 55000 {
                break port;
            }
        };
        // Debian's /usr/sbin wrappers switch to the `rabbitmq` user, who cannot write here.
        let debian = Path::new("/usr/lib/rabbitmq/bin");
        let bin = if debian.join("rabbitmq-server").exists() {
            debian.to_path_buf()
        } else {
            PathBuf::new()
        };
        Self {
            dir: dir.to_path_buf(),
            name: format!(
                "{}@localhost",
                random_name("kallina-chaos").replace('.', "-")
            ),
            port: free_port(),
            dist_port,
            bin,
        }
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang cookie of a cluster: nodes (and their CLI tools) that share it may join.
    fn share_cookie(&self, cookie: &str) {
        let path = self.dir.join(".erlang.cookie");
        std::fs::write(&path, cookie).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .unwrap();
    }

    /// `rabbitmqctl`/`rabbitmq-queues ARGS` on this node; panics with its output on failure.
    async fn tool(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            self.command(program)
                .arg("-n")
                .arg(&self.name)
                .args(args)
                .output(),
        )
        .await
        .map_err(|_| format!("{program} {args:?}: no answer within 120 s"))?
        .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// Joins the cluster of `first` (a node already running).
    async fn join(&self, first: &BrokerNode) {
        for step in [
            vec!["stop_app"],
            vec!["join_cluster", first.name.as_str()],
            vec!["start_app"],
        ] {
            self.tool("rabbitmqctl", &step).await.unwrap();
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("rabbitmq.pid")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let d = &self.dir;
        let mut command = tokio::process::Command::new(self.bin.join(program));
        command
            .env_clear()
            .env(
                "PATH",
                format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()),
            )
            // The Erlang cookie is made in and read from $HOME: this node's own.
            .env("HOME", d)
            .env("LC_ALL", "C.UTF-8")
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        command
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts the node and waits until it takes AMQP connections (its listener opens only
    /// once queues and bindings are recovered); returns how long that took.
    async fn start(&self) -> Duration {
        let started = Instant::now();
        let status = self
            .command("rabbitmq-server")
            .arg("-detached")
            .status()
            .await
            .expect("rabbitmq-server runs (is the rabbitmq-server package installed?)");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        let url = self.url();
        let limit = Duration::from_secs(180);
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await;
            if let Ok(Ok(connection)) = attempt {
                let _ = connection.close(200, "ready".into()).await;
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "the chaos RabbitMQ node {} did not take connections within {limit:?}; see {}",
                self.name,
                self.log_file().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The orderly stop an operator would do; returns once the Erlang VM has exited.
    async fn stop(&self) {
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            self.command("rabbitmqctl")
                .args(["-n", &self.name, "stop"])
                .arg(self.pid_file())
                .output(),
        )
        .await
        .expect("rabbitmqctl stop returns within 120 s")
        .expect("rabbitmqctl runs");
        assert!(
            output.status.success(),
            "rabbitmqctl stop: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.wait_gone().await;
    }

    /// A crash: SIGKILL to the Erlang VM, so the node recovers from an unclean shutdown.
    async fn crash(&self) {
        let pid = self.pid().expect("the chaos node wrote its pid file");
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGKILL) },
            0,
            "SIGKILL {pid}"
        );
        self.wait_gone().await;
    }

    async fn wait_gone(&self) {
        let Some(pid) = self.pid() else { return };
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) {
            assert!(Instant::now() < deadline, "RabbitMQ pid {pid} still alive");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Running, as opposed to gone or a zombie waiting for init to reap it.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        let Some(pid) = self.pid() else { return };
        if !alive(pid) {
            return;
        }
        // The Erlang VM treats SIGTERM as an orderly stop; SIGKILL if it does not go in time.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The real binary, restarted on the same data directory after every kill. Dropping it kills
/// the process, so that a failing test leaves nothing running.
struct Relay {
    setup: ChildSetup,
    amqp_url: String,
    log: PathBuf,
    current: Option<ChildRelay>,
}

impl Relay {
    async fn start(&mut self) -> Duration {
        assert!(self.current.is_none());
        let started = Instant::now();
        let (port, admin_port) = (free_port(), free_port());
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_kallina-relay"));
        let child = child_relay_env(&mut command, &self.setup.data_dir, port, admin_port)
            .env("KALLINA_RELAY_EXCHANGE", &self.setup.names.exchange)
            .env(
                "KALLINA_RELAY_UNROUTED_EXCHANGE",
                &self.setup.names.unrouted,
            )
            .env("KALLINA_RELAY_CONFIG", &self.setup.config_file)
            .env("KALLINA_RELAY_AMQP_URL", &self.amqp_url)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the kallina-relay binary starts");
        let relay = ChildRelay {
            child,
            address: format!("http://127.0.0.1:{port}"),
            admin_address: format!("http://127.0.0.1:{admin_port}"),
        };
        let (client, healthz) = (http_client(), format!("{}/healthz", relay.admin_address));
        self.current = Some(relay);
        // Generous: the machine is shared, and a start after SIGKILL replays sled's log.
        let limit = Duration::from_secs(120);
        loop {
            let served = client
                .get(&healthz)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if served {
                return started.elapsed();
            }
            if let Some(status) = self.exited() {
                panic!(
                    "the relay exited while starting ({status}); see {}",
                    self.log.display()
                );
            }
            assert!(
                started.elapsed() < limit,
                "the relay did not serve within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn address(&self) -> String {
        self.current.as_ref().unwrap().address.clone()
    }

    fn admin_address(&self) -> String {
        self.current.as_ref().unwrap().admin_address.clone()
    }

    fn pid(&self) -> i32 {
        self.current.as_ref().unwrap().pid()
    }

    /// Set when the process ended without being killed by this test.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let relay = self.current.as_mut()?;
        let status = relay.child.try_wait().unwrap()?;
        self.current = None;
        Some(status)
    }

    fn kill(&mut self) {
        if let Some(mut relay) = self.current.take() {
            let _ = relay.child.kill();
            let _ = relay.child.wait();
        }
    }

    async fn readyz(&self) -> Option<Value> {
        http_client()
            .get(format!("{}/readyz", self.admin_address()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the senders know: every event posted, and which were answered 2xx.
#[derive(Default)]
struct Ledger {
    sent: Mutex<HashSet<String>>,
    accepted: Mutex<HashSet<String>>,
    requests: AtomicU64,
    /// Answered 200 `duplicate`: a retry whose first attempt was stored although its answer
    /// never came back (the relay died in between).
    duplicate_answers: AtomicU64,
    failed_requests: AtomicU64,
    gave_up: AtomicU64,
}

/// Posts distinct events at `rate` per second. A request that fails is retried with the same
/// bytes (the platform's behaviour) for up to `RETRY_FOR`; after that the event counts as sent
/// but not accepted. A 2xx on any attempt makes it accepted.
fn sender(
    id: usize,
    rate: f64,
    address: Arc<RwLock<String>>,
    stop: Arc<AtomicBool>,
    ledger: Arc<Ledger>,
) -> tokio::task::JoinHandle<()> {
    const RETRY_FOR: Duration = Duration::from_secs(15);
    tokio::spawn(async move {
        let client = http_client();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            i += 1;
            let event = EVENTS[(i as usize + id) % EVENTS.len()];
            let marker = format!("chaos-{id}-{i}-{:016x}", fastrand::u64(..));
            let body = event_body(event, &marker);
            let key = sha256_hex(body.as_bytes());
            let signature = kallina_relay::signature::sign(SECRET.as_bytes(), body.as_bytes());
            ledger.sent.lock().unwrap().insert(key.clone());
            let first = Instant::now();
            loop {
                ledger.requests.fetch_add(1, Ordering::Relaxed);
                let url = format!("{}/webhooks/kallina", address.read().unwrap());
                let answer = client
                    .post(url)
                    .header("Content-Type", "application/json")
                    .header("X-Kallina-Signature", &signature)
                    .timeout(Duration::from_secs(10))
                    .body(body.clone())
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().is_success() => {
                        if r.status().as_u16() == 200 {
                            ledger.duplicate_answers.fetch_add(1, Ordering::Relaxed);
                        }
                        ledger.accepted.lock().unwrap().insert(key);
                        break;
                    }
                    _ => {
                        ledger.failed_requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if first.elapsed() > RETRY_FOR {
                    ledger.gave_up.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    })
}

/// Every message on `queue`, taken off it with a consumer (basic.get would take minutes for a
/// soak's worth of messages): the count is read first, then exactly that many are received.
async fn consume_all(connection: &Connection, queue: &str) -> Vec<lapin::message::Delivery> {
    let channel = connection.create_channel().await.unwrap();
    let expected = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"))
        .message_count() as usize;
    let mut messages = Vec::with_capacity(expected);
    if expected == 0 {
        return messages;
    }
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "chaos-check".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    while messages.len() < expected {
        let next = tokio::time::timeout(Duration::from_secs(60), consumer.next()).await;
        match next {
            Ok(Some(Ok(delivery))) => messages.push(delivery),
            other => panic!(
                "consuming {queue}: got {} of {expected}, then {:?}",
                messages.len(),
                other.map(|o| o.map(|r| r.map(|_| ())))
            ),
        }
    }
    messages
}

/// The soak's files (relay data and log, broker data and log), removed at the end unless the
/// soak failed: then they are what the investigation starts from.
struct KeptOnPanic(Option<tempfile::TempDir>);

impl KeptOnPanic {
    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }

    fn keep(&mut self) {
        if let Some(dir) = self.0.take() {
            println!("kept for inspection: {}", dir.keep().display());
        }
    }
}

impl Drop for KeptOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.keep();
        }
    }
}

#[derive(Default)]
struct Chaos {
    relay_kills: u32,
    relay_kills_broker_down: u32,
    broker_stops: u32,
    broker_crashes: u32,
    /// Relay exits this test did not cause: each one a bug.
    relay_exits: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run with scripts/chaos-soak.sh [SECONDS]"]
async fn chaos_soak() {
    let secs: u64 = env_or("KALLINA_RELAY_CHAOS_SECS", 60);
    // Modest on purpose: the soak measures correctness, not throughput, on shared cores.
    let rate: f64 = env_or("KALLINA_RELAY_CHAOS_RATE", 250.0);
    let senders: usize = env_or("KALLINA_RELAY_CHAOS_SENDERS", 4);
    let duration = Duration::from_secs(secs);
    let start = Instant::now();

    let mut root = KeptOnPanic(Some(
        tempfile::Builder::new()
            .prefix("kallina-chaos.")
            .tempdir()
            .unwrap(),
    ));
    // Cluster mode: that many nodes joined in one cluster, quorum queues, every URL to the relay.
    let cluster: usize = env_or("KALLINA_RELAY_CHAOS_CLUSTER", 1).max(1);
    let nodes: Vec<BrokerNode> = (0..cluster)
        .map(|i| BrokerNode::new(&root.path().join(format!("rabbitmq-{i}"))))
        .collect();
    let relay_dir = root.path().join("relay");
    std::fs::create_dir_all(&relay_dir).unwrap();
    let setup = ChildSetup::new(&relay_dir, "chaos.all");
    if cluster > 1 {
        std::fs::write(
            &setup.config_file,
            format!(
                "unrouted_queue_type = \"quorum\"\n[[queues]]\nname = \"{}\"\n\
                 bindings = [\"#\"]\ntype = \"quorum\"\n",
                setup.queue
            ),
        )
        .unwrap();
    }
    let queue = setup.queue.clone();
    let unrouted = setup.names.unrouted.clone();
    let node_list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{} on port {}", n.name, n.port))
        .collect();
    log(
        start,
        format!(
            "chaos soak for {secs} s at {rate}/s ({senders} senders); RabbitMQ {}; files in {}",
            node_list.join(", "),
            root.path().display()
        ),
    );
    let cookie = random_name("chaos-cookie").replace('.', "");
    for node in &nodes {
        if cluster > 1 {
            node.share_cookie(&cookie);
        }
        let took = node.start().await;
        log(
            start,
            format!(
                "RabbitMQ node {} up in {:.1} s",
                node.name,
                took.as_secs_f64()
            ),
        );
    }
    for node in &nodes[1..] {
        node.join(&nodes[0]).await;
        log(start, format!("{} joined {}", node.name, nodes[0].name));
    }
    let urls: Vec<String> = nodes.iter().map(BrokerNode::url).collect();

    let mut relay = Relay {
        amqp_url: urls.join(","),
        log: relay_dir.join("relay.log"),
        setup,
        current: None,
    };
    relay.start().await;
    let (client, admin) = (http_client(), relay.admin_address());
    wait_until(Duration::from_secs(60), "the relay to connect", || async {
        readyz_at(&client, &admin).await.1["broker"]["state"] == "connected"
    })
    .await;
    log(
        start,
        format!("relay up (pid {}), queue {queue} bound to '#'", relay.pid()),
    );

    let address = Arc::new(RwLock::new(relay.address()));
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Ledger::default());
    let streams: Vec<_> = (0..senders)
        .map(|id| {
            sender(
                id,
                rate / senders as f64,
                address.clone(),
                stop.clone(),
                ledger.clone(),
            )
        })
        .collect();

    let mut chaos = Chaos::default();
    let mut next_action = Instant::now() + Duration::from_secs_f64(fastrand::f64() * 15.0 + 5.0);
    let mut next_progress = Instant::now() + Duration::from_secs(30);
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(status) = relay.exited() {
            log(
                start,
                format!("relay exited on its own: {status}; restarting"),
            );
            chaos
                .relay_exits
                .push(format!("{:.1}s: {status}", start.elapsed().as_secs_f64()));
            relay.start().await;
            *address.write().unwrap() = relay.address();
        }
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(30);
            let outbox = relay
                .readyz()
                .await
                .map(|r| r["store"]["outbox_events"].clone());
            log(
                start,
                format!(
                    "progress: sent {}, accepted {}, outbox {}, relay kills {}, broker restarts {}",
                    ledger.sent.lock().unwrap().len(),
                    ledger.accepted.lock().unwrap().len(),
                    outbox.map_or("?".into(), |o| o.to_string()),
                    chaos.relay_kills,
                    chaos.broker_stops + chaos.broker_crashes
                ),
            );
        }
        if Instant::now() < next_action {
            continue;
        }
        next_action = Instant::now() + Duration::from_secs_f64(fastrand::f64() * 15.0 + 5.0);
        // Relay kills more often than broker restarts: they are the cheaper action, and the
        // one the durability promise is about.
        if fastrand::f64() < 0.6 {
            let pid = relay.pid();
            relay.kill();
            chaos.relay_kills += 1;
            let took = relay.start().await;
            *address.write().unwrap() = relay.address();
            log(
                start,
                format!(
                    "relay SIGKILL #{} (pid {pid}); new pid {} serving after {:.2} s",
                    chaos.relay_kills,
                    relay.pid(),
                    took.as_secs_f64()
                ),
            );
        } else {
            let node = &nodes[fastrand::usize(..nodes.len())];
            // On a cluster, never take down the node a quorum queue's majority still needs (a
            // member restarted a moment ago may still be catching up).
            if cluster > 1 {
                let critical = node
                    .tool("rabbitmq-queues", &["check_if_node_is_quorum_critical"])
                    .await;
                if critical.is_err() {
                    log(
                        start,
                        format!("{} is quorum critical: not restarted now", node.name),
                    );
                    continue;
                }
            }
            let stopping = Instant::now();
            // Half orderly stops (connections closed by the broker, queues saved), half
            // crashes (TCP reset, recovery from an unclean shutdown).
            let how = if fastrand::bool() {
                node.stop().await;
                chaos.broker_stops += 1;
                "rabbitmqctl stop"
            } else {
                node.crash().await;
                chaos.broker_crashes += 1;
                "SIGKILL"
            };
            let down = stopping.elapsed();
            // Now and then the relay dies too while the broker is away, with events accepted
            // since then only in its outbox.
            let mut also = String::new();
            if fastrand::u8(..3) == 0 {
                tokio::time::sleep(Duration::from_secs_f64(fastrand::f64() * 2.0)).await;
                let pid = relay.pid();
                relay.kill();
                chaos.relay_kills += 1;
                chaos.relay_kills_broker_down += 1;
                relay.start().await;
                *address.write().unwrap() = relay.address();
                also = format!(
                    "; meanwhile relay SIGKILL #{} (pid {pid}), new pid {}",
                    chaos.relay_kills,
                    relay.pid()
                );
            }
            let took = node.start().await;
            log(
                start,
                format!(
                    "broker restart #{} of {} ({how}): down after {:.2} s, up again after {:.1} s{also}",
                    chaos.broker_stops + chaos.broker_crashes,
                    node.name,
                    down.as_secs_f64(),
                    took.as_secs_f64()
                ),
            );
        }
    }

    stop.store(true, Ordering::SeqCst);
    for s in streams {
        s.await.unwrap();
    }
    let soaked = start.elapsed();
    log(
        start,
        "chaos over; waiting for the relay to drain its outbox",
    );
    let draining = Instant::now();
    let drain_limit = Duration::from_secs(600);
    loop {
        if let Some(status) = relay.exited() {
            panic!("the relay exited while draining: {status}");
        }
        if let Some(ready) = relay.readyz().await {
            if ready["store"]["outbox_events"] == 0 && ready["broker"]["state"] == "connected" {
                break;
            }
        }
        assert!(
            draining.elapsed() < drain_limit,
            "the outbox did not drain within {drain_limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    log(
        start,
        format!(
            "outbox empty after {:.1} s",
            draining.elapsed().as_secs_f64()
        ),
    );
    relay.kill();

    let connection = Connection::connect(&nodes[0].url(), ConnectionProperties::default())
        .await
        .expect("the chaos node takes a connection");
    let mut messages = consume_all(&connection, &queue).await;
    let unrouted_messages = consume_all(&connection, &unrouted).await;
    let unrouted_count = unrouted_messages.len();
    messages.extend(unrouted_messages);
    let _ = connection.close(200, "done".into()).await;
    log(start, format!("consumed {} messages", messages.len()));

    let sent = ledger.sent.lock().unwrap().clone();
    let accepted = ledger.accepted.lock().unwrap().clone();
    let mut copies: HashMap<String, u32> = HashMap::new();
    let mut altered = 0;
    for m in &messages {
        let id = m
            .properties
            .message_id()
            .as_ref()
            .expect("message_id is set")
            .to_string();
        // Without an id header the key is the body's SHA-256: a body changed on the way shows.
        if sha256_hex(&m.data) != id {
            altered += 1;
        }
        *copies.entry(id).or_default() += 1;
    }
    let arrived = accepted.iter().filter(|k| copies.contains_key(*k)).count();
    let mut lost: Vec<&String> = accepted
        .iter()
        .filter(|k| !copies.contains_key(*k))
        .collect();
    lost.sort();
    let unexpected: Vec<&String> = copies.keys().filter(|k| !sent.contains(*k)).collect();
    let duplicated = messages.len() - copies.len();
    let arrived_unanswered = copies
        .keys()
        .filter(|k| sent.contains(*k) && !accepted.contains(*k))
        .count();

    println!(
        "chaos soak: {} s, {} broker node(s), relay kills {}, broker restarts {} ({} rabbitmqctl stop, \
         {} SIGKILL) | sent {}, accepted {}, arrived {} (distinct accepted), duplicated {}, lost {}, \
         unexpected {}",
        soaked.as_secs(),
        nodes.len(),
        chaos.relay_kills,
        chaos.broker_stops + chaos.broker_crashes,
        chaos.broker_stops,
        chaos.broker_crashes,
        sent.len(),
        accepted.len(),
        arrived,
        duplicated,
        lost.len(),
        unexpected.len()
    );
    println!(
        "  details: offered {rate}/s by {senders} senders; {} relay kills while the broker was down; \
         {} requests ({} failed, retried with the same bytes), {} answered 200 duplicate, \
         {} given up after 15 s, {} arrived although never answered 2xx, {} messages in all \
         ({} via the unrouted queue), {} ids arrived more than once, {} bodies not matching their id, \
         relay exits not caused by the test: {}",
        chaos.relay_kills_broker_down,
        ledger.requests.load(Ordering::Relaxed),
        ledger.failed_requests.load(Ordering::Relaxed),
        ledger.duplicate_answers.load(Ordering::Relaxed),
        ledger.gave_up.load(Ordering::Relaxed),
        arrived_unanswered,
        messages.len(),
        unrouted_count,
        copies.values().filter(|n| **n > 1).count(),
        altered,
        chaos.relay_exits.len()
    );

    let failed =
        !lost.is_empty() || !unexpected.is_empty() || altered > 0 || !chaos.relay_exits.is_empty();
    if failed {
        root.keep();
    }
    assert!(
        lost.is_empty(),
        "{} events answered 2xx never arrived, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        unexpected.is_empty(),
        "messages that were never sent: {:?}",
        &unexpected[..unexpected.len().min(10)]
    );
    assert_eq!(
        altered, 0,
        "messages whose body does not hash to their message_id"
    );
    assert!(
        chaos.relay_exits.is_empty(),
        "the relay exited on its own: {:?}",
        chaos.relay_exits
    );
    assert!(!accepted.is_empty(), "the stream got going");
    for node in nodes.iter().rev() {
        node.stop().await;
    }
}
