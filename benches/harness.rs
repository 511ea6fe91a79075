//! The benchmark harness: the release binary under load next to baselines measured in the same
//! run, printed as one table. Run it with `scripts/bench.sh` (it prepares RabbitMQ and wrk).
//!
//! Scenarios, in order (each load run ≤ 20 s):
//! 1. ingest: distinct signed events (unique delivery ids), 64 connections, broker cut,
//!    against a bare actix-web endpoint answering 200 to the same requests;
//! 2. duplicates: the same event re-sent, against the same baseline;
//! 3. drain: the outbox left by ingest, broker restored, against a plain lapin publisher with
//!    the same properties, window and broker;
//! 4. sustained: a fixed offered rate with the relay publishing and a consumer reading, then
//!    rising rates until the targets are missed;
//! 5. memory with 1M events in the outbox, and disk per stored event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use kallina_relay::signature::sign;
use kallina_relay::store::{unix_millis, OutboxRecord, Store, StoreOptions};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "whsec_bench";
const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const CONNECTIONS: u32 = 64;
const WINDOW: usize = 256;

fn main() -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run())
}

struct Row {
    scenario: &'static str,
    figure: String,
    baseline: String,
    ratio: String,
    target: &'static str,
}

/// The memory scenario alone (`KALLINA_BENCH_ONLY=memory`), for iterating on memory use.
async fn memory_only() -> Result<()> {
    let work = tempfile::tempdir()?;
    let forwarder = Forwarder::start().await?;
    let config = work.path().join("relay.toml");
    std::fs::write(&config, "")?;
    let (filled, disk, peak) = million(work.path(), &config, "bench.memory", &forwarder).await?;
    println!(
        "1M in outbox: peak RSS {peak} MB, {} B/event on disk",
        disk / filled.max(1)
    );
    Ok(())
}

/// 1M events written straight into a store, then the relay started on it (broker cut) under
/// 5 s of ingest: returns (events, bytes on disk before the relay started, peak RSS in MB).
async fn million(
    work: &Path,
    config: &Path,
    exchange: &str,
    forwarder: &Forwarder,
) -> Result<(u64, u64, u64)> {
    let million_dir = work.join("million");
    let filled = prefill(&million_dir, 1_000_000).await?;
    let disk = du(&million_dir);
    forwarder.cut();
    let mut relay = Relay::start(&million_dir, config, exchange, &forwarder.url())?;
    relay.wait_healthy().await?;
    println!(
        "  relay started on 1M events: RSS peak so far {} MB",
        relay.peak_rss_mb()
    );
    let _ = wrk(work, relay.port, true, "million", 5)?;
    let peak = relay.peak_rss_mb();
    relay.stop()?;
    Ok((filled, disk, peak))
}

async fn run() -> Result<()> {
    if std::env::var("KALLINA_BENCH_ONLY").as_deref() == Ok("memory") {
        return memory_only().await;
    }
    let work = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let machine = format!("{} cores, {}", num_cpus(), kernel());
    println!("kallina-relay benchmark harness — {machine}");

    // Baseline: a bare actix-web endpoint answering 200 to the same requests.
    let baseline_port = spawn_bare_endpoint().await?;
    let forwarder = Forwarder::start().await?;
    forwarder.cut();
    let queue = format!("bench.q.{}", fastrand::u32(..));
    let exchange = format!("bench.events.{}", fastrand::u32(..));
    let config = work.path().join("relay.toml");
    std::fs::write(
        &config,
        format!("[[queues]]\nname = \"{queue}\"\nbindings = [\"#\"]\n"),
    )?;
    let data_dir = work.path().join("data");
    let mut relay = Relay::start(&data_dir, &config, &exchange, &forwarder.url())?;
    relay.wait_healthy().await?;

    // 1. ingest
    let base = wrk(work.path(), baseline_port, true, "base", 10)?;
    let ingest = wrk(work.path(), relay.port, true, "ingest", 8)?;
    let peak_ingest = relay.peak_rss_mb();
    rows.push(Row {
        scenario: "ingest: distinct events, 64 conns, broker cut",
        figure: format!(
            "{:.0}/s p50 {:.2} ms p99 {:.2} ms, non-2xx {}",
            ingest.rps, ingest.p50_ms, ingest.p99_ms, ingest.non_2xx
        ),
        baseline: format!(
            "{:.0}/s p50 {:.2} ms p99 {:.2} ms",
            base.rps, base.p50_ms, base.p99_ms
        ),
        ratio: pct(ingest.rps, base.rps),
        target: "≥ 30k/s, ≥ 35 %, p99 ≤ 10 ms",
    });

    // 2. duplicates
    let dup = wrk(work.path(), relay.port, false, "dup", 8)?;
    rows.push(Row {
        scenario: "duplicates: the same event re-sent",
        figure: format!("{:.0}/s p99 {:.2} ms", dup.rps, dup.p99_ms),
        baseline: format!("{:.0}/s", base.rps),
        ratio: pct(dup.rps, base.rps),
        target: "≥ 60 %",
    });

    // 3. drain: the relay restarted with the broker reachable directly (as the baseline is:
    //    the forwarder's extra hop would cost CPU that RabbitMQ needs on this machine).
    let backlog = relay.outbox().await?;
    relay.stop()?;
    let started = Instant::now();
    let mut relay = Relay::start(&data_dir, &config, &exchange, BROKER)?;
    relay.wait_healthy().await?;
    relay
        .wait_outbox_at_most(0, Duration::from_secs(120))
        .await?;
    let drain_rate = backlog as f64 / started.elapsed().as_secs_f64();
    let lapin_rate = plain_publisher(backlog).await?;
    rows.push(Row {
        scenario: "drain: outbox backlog, broker restored",
        figure: format!("{backlog} events, {drain_rate:.0}/s"),
        baseline: format!("plain lapin publisher {lapin_rate:.0}/s"),
        ratio: pct(drain_rate, lapin_rate),
        target: "≥ 90 %",
    });
    purge(&queue).await?;

    // 4. sustained, then rising rates
    let sustained = sustained(&relay, &queue, 5_000, 20).await?;
    rows.push(Row {
        scenario: "sustained: 5k/s offered for 20 s, consumer reading",
        figure: sustained.describe(),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "p99 accept ≤ 10 ms, p99 lag ≤ 250 ms, 0 errors",
    });
    let mut best = if sustained.meets_targets() { 5_000 } else { 0 };
    for rate in [6_000, 7_000, 8_000, 9_000, 10_000, 12_000] {
        purge(&queue).await?;
        let run = sustained_run(&relay, &queue, rate, 6).await?;
        println!("  offered {rate}/s: {}", run.describe());
        if !run.meets_targets() {
            break;
        }
        best = rate;
    }
    rows.push(Row {
        scenario: "max sustained rate (steps of 1-2k/s, 6 s each)",
        figure: format!("{best}/s"),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "report",
    });
    let peak_all = relay.peak_rss_mb();
    relay.stop()?;

    // 5. memory with 1M events in the outbox, and disk
    let stored_total = Store::open(&store_options(&data_dir))?.stats().dedup_keys;
    let disk_before = du(&data_dir);
    let swept = {
        let store = Store::open(&store_options(&data_dir))?;
        let swept = store.sweep_expired(Duration::ZERO)?;
        store.close();
        swept
    };
    let disk_after = du(&data_dir);
    let (filled, disk_million, peak_million) =
        million(work.path(), &config, &exchange, &forwarder).await?;
    rows.push(Row {
        scenario: "memory: peak RSS",
        figure: format!(
            "ingest {peak_ingest} MB; drain + sustained {peak_all} MB; 1M events in the outbox + 5 s ingest {peak_million} MB"
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "≤ 150 MB",
    });
    rows.push(Row {
        scenario: "disk per stored event (600-byte body)",
        figure: format!(
            "1M in outbox: {} B/event; after drain: {} B/event before sweep, {} B/event after sweeping {swept} keys",
            disk_million / filled.max(1),
            disk_before / stored_total.max(1),
            disk_after / stored_total.max(1)
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "report",
    });

    print_table(&machine, &rows);
    cleanup(&queue, &exchange).await;
    Ok(())
}

fn pct(a: f64, b: f64) -> String {
    format!("{:.0} %", 100.0 * a / b)
}

fn print_table(machine: &str, rows: &[Row]) {
    println!("\n## Benchmark ({machine})\n");
    println!("| scenario | kallina-relay | baseline (same run) | ratio | target |");
    println!("| --- | --- | --- | --- | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.scenario, r.figure, r.baseline, r.ratio, r.target
        );
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
        |_| "unknown kernel".into(),
        |s| format!("Linux {}", s.trim()),
    )
}

/// A ~600-byte call.ended body with a fresh timestamp.
fn body(marker: &str) -> Vec<u8> {
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut body = format!(
        r#"{{"event":"call.ended","timestamp":"{ts}","data":{{"call_id":"call_{marker}","agent_id":"agent_456","duration":180,"outcome":"appointment_booked","actions":[{{"type":"calendar_booking","status":"completed","data":{{"date":"2025-01-25","time":"14:00"}}}}],"notes":""#
    );
    while body.len() < 596 {
        body.push('x');
    }
    body.push_str("\"}}");
    body.into_bytes()
}

struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

/// Runs wrk for `seconds` with 64 connections; `unique` gives every request its own delivery id.
fn wrk(dir: &Path, port: u16, unique: bool, run: &str, seconds: u32) -> Result<WrkResult> {
    let body = body(run);
    let body_file = dir.join(format!("body-{run}.json"));
    std::fs::write(&body_file, &body)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/wrk/post.lua");
    let output = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/webhooks/kallina"))
        .env("KALLINA_BENCH_BODY_FILE", &body_file)
        .env("KALLINA_BENCH_SIGNATURE", sign(SECRET.as_bytes(), &body))
        .env("KALLINA_BENCH_UNIQUE", if unique { "1" } else { "0" })
        .env("KALLINA_BENCH_RUN", run)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
    };
    let rps: f64 = field("Requests/sec:")
        .context("wrk printed no Requests/sec")?
        .parse()?;
    let non_2xx = field("Non-2xx or 3xx responses:").map_or(0, |v| v.parse().unwrap_or(0));
    let result = WrkResult {
        rps,
        p50_ms: latency(&field("50%"))?,
        p99_ms: latency(&field("99%"))?,
        non_2xx,
    };
    println!(
        "  wrk {run}: {:.0}/s p50 {:.2} ms p99 {:.2} ms non-2xx {}",
        result.rps, result.p50_ms, result.p99_ms, result.non_2xx
    );
    Ok(result)
}

fn latency(value: &Option<String>) -> Result<f64> {
    let v = value
        .as_deref()
        .context("wrk printed no latency distribution")?;
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unexpected wrk latency {v}")
    };
    Ok(number.parse::<f64>()? * factor)
}

async fn spawn_bare_endpoint() -> Result<u16> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = HttpServer::new(|| {
        App::new().route(
            "/webhooks/kallina",
            web::post().to(|body: web::Bytes| async move {
                std::hint::black_box(&body);
                HttpResponse::Ok().json(serde_json::json!({"status": "accepted"}))
            }),
        )
    })
    .workers(2)
    .disable_signals()
    .listen(listener)?
    .run();
    tokio::spawn(server);
    Ok(port)
}

/// The release binary as a child process.
struct Relay {
    child: Child,
    port: u16,
    admin: u16,
    client: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Relay {
    fn start(data_dir: &Path, config: &Path, exchange: &str, amqp: &str) -> Result<Self> {
        let (port, admin) = (free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_kallina-relay"));
        command.env_clear();
        // Knobs to experiment with, passed through when set.
        for name in [
            "KALLINA_RELAY_CACHE_SIZE",
            "MIMALLOC_PURGE_DELAY",
            "MIMALLOC_ARENA_EAGER_COMMIT",
        ] {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        let child = command
            .env("KALLINA_WEBHOOK_SECRET", SECRET)
            .env("KALLINA_RELAY_CONFIG", config)
            .env("KALLINA_RELAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("KALLINA_RELAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("KALLINA_RELAY_DATA_DIR", data_dir)
            .env("KALLINA_RELAY_AMQP_URL", amqp)
            .env("KALLINA_RELAY_EXCHANGE", exchange)
            .env(
                "KALLINA_RELAY_UNROUTED_EXCHANGE",
                format!("{exchange}.unrouted"),
            )
            .env("KALLINA_RELAY_ID_HEADER", "X-Kallina-Delivery")
            .env("KALLINA_RELAY_OUTBOX_MAX", "2000000")
            .env("KALLINA_RELAY_PUBLISH_WINDOW", WINDOW.to_string())
            .env("KALLINA_RELAY_LOG_FORMAT", "json")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the relay")?;
        let client = reqwest::Client::builder().no_proxy().build()?;
        Ok(Self {
            child,
            port,
            admin,
            client,
        })
    }

    async fn wait_healthy(&self) -> Result<()> {
        for _ in 0..600 {
            if let Ok(r) = self
                .client
                .get(format!("http://127.0.0.1:{}/healthz", self.admin))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the relay did not start")
    }

    async fn outbox(&self) -> Result<u64> {
        let ready: serde_json::Value = self
            .client
            .get(format!("http://127.0.0.1:{}/readyz", self.admin))
            .send()
            .await?
            .json()
            .await?;
        ready["store"]["outbox_events"]
            .as_u64()
            .context("outbox_events")
    }

    async fn wait_outbox_at_most(&self, n: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.outbox().await? > n {
            if Instant::now() > deadline {
                bail!("the outbox did not drain within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn peak_rss_mb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    }

    fn stop(&mut self) -> Result<()> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the relay exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder to RabbitMQ that can be cut (the relay's "broker down").
struct Forwarder {
    port: u16,
    cut: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, t) = (cut.clone(), tasks.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                t.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Ok(Self { port, cut, tasks })
    }
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

async fn broker() -> Result<Connection> {
    Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .context("RabbitMQ at 127.0.0.1:5672 (scripts/ensure-rabbitmq.sh)")
}

/// Baseline for the drain: `count` messages with the relay's properties and window, confirmed.
async fn plain_publisher(count: u64) -> Result<f64> {
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    let exchange = format!("bench.baseline.{}", fastrand::u32(..));
    let queue = format!("{exchange}.q");
    channel
        .exchange_declare(
            exchange.as_str().into(),
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
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
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

async fn purge(queue: &str) -> Result<()> {
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_purge(queue.into(), Default::default())
        .await?;
    Ok(())
}

async fn cleanup(queue: &str, exchange: &str) {
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

struct Sustained {
    offered: u64,
    seconds: u64,
    accepted: u64,
    errors: u64,
    accept_p99_ms: f64,
    lag_p99_ms: f64,
    consumed: u64,
}

impl Sustained {
    fn meets_targets(&self) -> bool {
        self.errors == 0
            && self.accept_p99_ms <= 10.0
            && self.lag_p99_ms <= 250.0
            && self.consumed >= self.accepted
    }
    fn describe(&self) -> String {
        format!(
            "{}/s for {} s: {} accepted, {} errors, p99 accept {:.2} ms, {} consumed, p99 receive→consume {:.1} ms",
            self.offered, self.seconds, self.accepted, self.errors, self.accept_p99_ms, self.consumed, self.lag_p99_ms
        )
    }
}

async fn sustained(relay: &Relay, queue: &str, rate: u64, seconds: u64) -> Result<Sustained> {
    let run = sustained_run(relay, queue, rate, seconds).await?;
    println!("  sustained: {}", run.describe());
    Ok(run)
}

/// Open loop: requests are sent on a fixed schedule whatever the answers do, and latency is
/// counted from the scheduled time (no coordinated omission). A consumer reads the queue and
/// records receive→consume lag from `x-received-at`.
async fn sustained_run(relay: &Relay, queue: &str, rate: u64, seconds: u64) -> Result<Sustained> {
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("bench-{}", fastrand::u32(..)).as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let lags = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let consumed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let consumer_task = {
        let (lags, consumed) = (lags.clone(), consumed.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let received = delivery.properties.headers().as_ref().and_then(|h| {
                    match h.inner().get("x-received-at") {
                        Some(AMQPValue::LongString(s)) => time::OffsetDateTime::parse(
                            &s.to_string(),
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok(),
                        _ => None,
                    }
                });
                if let Some(received) = received {
                    let lag = time::OffsetDateTime::now_utc() - received;
                    let _ = lags
                        .lock()
                        .unwrap()
                        .record(lag.whole_microseconds().max(0) as u64);
                }
                consumed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()?;
    let url = format!("http://127.0.0.1:{}/webhooks/kallina", relay.port);
    let body = Arc::new(body(&format!("sustained-{rate}")));
    let signature = Arc::new(sign(SECRET.as_bytes(), &body));
    let accept = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let results: Arc<Mutex<BTreeMap<bool, u64>>> = Arc::default();
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let prefix = fastrand::u64(..);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        let (client, url, body, signature, accept, results) = (
            client.clone(),
            url.clone(),
            body.clone(),
            signature.clone(),
            accept.clone(),
            results.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .header("X-Kallina-Signature", signature.as_str())
                .header("X-Kallina-Delivery", format!("sustained-{prefix}-{i}"))
                .header("Content-Type", "application/json")
                .timeout(Duration::from_secs(10))
                .body(body.as_ref().clone())
                .send()
                .await;
            let ok = response.is_ok_and(|r| r.status().as_u16() == 202);
            let _ = accept
                .lock()
                .unwrap()
                .record(scheduled.elapsed().as_micros() as u64);
            *results.lock().unwrap().entry(ok).or_default() += 1;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let results = results.lock().unwrap().clone();
    let accepted = results.get(&true).copied().unwrap_or(0);
    // Let the last events through the relay before reading the lag.
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumed.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer_task.abort();
    let accept_p99_ms = accept.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
    let lag_p99_ms = lags.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
    Ok(Sustained {
        offered: rate,
        seconds,
        accepted,
        errors: results.get(&false).copied().unwrap_or(0),
        accept_p99_ms,
        lag_p99_ms,
        consumed: consumed.load(Ordering::Relaxed),
    })
}

fn store_options(dir: &Path) -> StoreOptions {
    StoreOptions {
        data_dir: dir.to_path_buf(),
        cache_size: 32 << 20,
        outbox_max: u64::MAX,
    }
}

/// Writes `count` events straight into a store (as 256 concurrent writers would).
async fn prefill(dir: &Path, count: u64) -> Result<u64> {
    let store = Store::open(&store_options(dir))?;
    let body = body("prefill");
    let signature = sign(SECRET.as_bytes(), &body);
    let started = Instant::now();
    let writers = 256;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, body, signature) = (store.clone(), body.clone(), signature.clone());
            tokio::spawn(async move {
                for i in (w..count).step_by(writers as usize) {
                    let record = OutboxRecord {
                        key: format!("prefill-{i}"),
                        event: "call.ended".into(),
                        signature: signature.clone(),
                        received_at_ms: unix_millis(SystemTime::now()),
                        source: "bench".into(),
                        body: body.clone(),
                    };
                    store.accept(record).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    println!("  prefill: {count} durable events straight into the store at {rate:.0}/s");
    store.close();
    Ok(count)
}

fn du(dir: &Path) -> u64 {
    fn walk(p: &PathBuf) -> u64 {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::read_dir(p).map_or(0, |it| {
                it.filter_map(|e| e.ok()).map(|e| walk(&e.path())).sum()
            }),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        }
    }
    walk(&dir.to_path_buf())
}
