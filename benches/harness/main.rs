//! The benchmark harness: the release binary under load next to baselines measured in the same
//! run, printed as one table. Run it with `scripts/bench.sh` (it prepares RabbitMQ and wrk).
//!
//! Scenarios, in order (each load run ≤ 20 s):
//! 1. ingest: new signed events (every body different: the dedup key is the body's hash),
//!    64 connections, broker cut, against a bare actix-web endpoint answering 200 to the same
//!    requests;
//! 2. duplicates: the same event re-sent, against the bare endpoint under the same requests;
//! 3. drain: the outbox left by ingest, broker restored, against a plain lapin publisher with
//!    the same properties, window and broker;
//! 4. Node: the receiver a customer would write (express + amqplib, 2xx after the broker's
//!    confirm) under the ingest load, against which the relay's ingest is a multiple;
//! 5. sustained: 5k/s offered with the relay publishing and a consumer reading, five times
//!    (each run's p99 printed), then rising rates until the targets are missed;
//! 6. memory with 1M events in the outbox, and disk per stored event;
//! 7. large: distinct signed 100 KB events, 16 connections, broker cut, against the disk's
//!    own bandwidth for 100 KB appends with an fdatasync each (and one per 16), on the
//!    filesystem of the relay's data dir.
//!
//! Environment:
//! - `KALLINA_BENCH_RELAY_BIN=<path>`: measure that relay binary (say one built at an earlier
//!   commit) instead of this build's; the heading names the binary that ran.
//! - `KALLINA_BENCH_ONLY=<names, comma-separated>`: only these scenarios, from `ingest`
//!   (scenario 1 with its baseline), `duplicates` (2, after one new event), `drain` (3, on
//!   the backlog an ingest run leaves), `node` (ingest and the Node receiver), `sustained`
//!   (the five 5k/s runs and the climb of rates), `large` (7) and `memory` (the 1M-event
//!   figure alone).
//! - `KALLINA_BENCH_SECONDS=<n>`: cap every wrk run and disk baseline at n seconds, for a
//!   quick check that the harness works; the figures it gives are not the benchmark's.

// The imports below are the harness's shared prelude: its modules `use super::*`.
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

mod broker;
mod large;
mod load;
mod node;
mod processes;
mod signed;
mod store_fill;

use broker::*;
use large::*;
use load::*;
use node::*;
use processes::*;
use signed::*;
use store_fill::*;

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

/// The scenarios `KALLINA_BENCH_ONLY` can pick.
const SELECTABLE: [&str; 7] = [
    "ingest",
    "duplicates",
    "drain",
    "node",
    "sustained",
    "large",
    "memory",
];

/// `KALLINA_BENCH_ONLY` as a list of known names; `None` when unset or empty (every scenario).
fn selection() -> Result<Option<Vec<String>>> {
    let Ok(value) = std::env::var("KALLINA_BENCH_ONLY") else {
        return Ok(None);
    };
    let names: Vec<String> = value
        .split(',')
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    if let Some(unknown) = names.iter().find(|n| !SELECTABLE.contains(&n.as_str())) {
        bail!(
            "KALLINA_BENCH_ONLY: unknown scenario `{unknown}` (known: {})",
            SELECTABLE.join(", ")
        );
    }
    Ok((!names.is_empty()).then_some(names))
}

/// `default` seconds, or fewer when `KALLINA_BENCH_SECONDS` asks for a quick run.
fn seconds(default: u32) -> u32 {
    std::env::var("KALLINA_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(default, |cap| cap.clamp(1, default))
}

/// The selected scenarios alone, in the order given; `memory` prints its line as it always
/// has, the others make rows of the usual table.
async fn run_only(names: &[String]) -> Result<()> {
    let work = tempfile::tempdir()?;
    let machine = machine()?;
    println!("kallina-relay benchmark harness — {machine}");
    let mut rows = Vec::new();
    for name in names {
        match name.as_str() {
            "memory" => memory_only().await?,
            "ingest" => rows.push(ingest_only(work.path()).await?.0),
            "duplicates" => rows.push(duplicates_only(work.path()).await?),
            "drain" => rows.push(drain_only(work.path()).await?),
            "node" => {
                let (row, ingest) = ingest_only(work.path()).await?;
                rows.push(row);
                let node = node_receiver(work.path()).await?;
                rows.push(node_row(&ingest, &node));
            }
            "sustained" => rows.extend(sustained_only(work.path()).await?),
            "large" => {
                let forwarder = Forwarder::start().await?;
                let config = work.path().join("relay-large.toml");
                std::fs::write(&config, "")?;
                let exchange = format!("bench.events.{}", fastrand::u32(..));
                rows.push(large_ingest(work.path(), &config, &exchange, &forwarder).await?);
            }
            _ => unreachable!("selection() lets only known names through"),
        }
    }
    if !rows.is_empty() {
        print_table(&machine, &rows);
    }
    Ok(())
}

/// A relay with the full harness's settings whose broker is cut (its forwarder drops every
/// connection), started and healthy: it stores and answers, and publishes nothing. The
/// forwarder must outlive the run.
struct CutRelay {
    relay: Relay,
    _forwarder: Forwarder,
    queue: String,
    exchange: String,
    config: PathBuf,
    data_dir: PathBuf,
}

async fn relay_broker_cut(work: &Path, name: &str) -> Result<CutRelay> {
    let forwarder = Forwarder::start().await?;
    forwarder.cut();
    let queue = format!("bench.q.{}", fastrand::u32(..));
    let exchange = format!("bench.events.{}", fastrand::u32(..));
    let config = work.join(format!("relay-{name}.toml"));
    std::fs::write(
        &config,
        format!("[[queues]]\nname = \"{queue}\"\nbindings = [\"#\"]\n"),
    )?;
    let data_dir = work.join(format!("{name}-data"));
    let relay = Relay::start(&data_dir, &config, &exchange, &forwarder.url())?;
    relay.wait_healthy().await?;
    Ok(CutRelay {
        relay,
        _forwarder: forwarder,
        queue,
        exchange,
        config,
        data_dir,
    })
}

/// Scenario 3: the relay restarted on `data_dir` with the broker reachable directly (as the
/// baseline is: the forwarder's extra hop would cost CPU that RabbitMQ needs on this machine),
/// timed until its outbox is empty, against a plain lapin publisher sending as many.
async fn drain_row(
    mut relay: Relay,
    data_dir: &Path,
    config: &Path,
    exchange: &str,
) -> Result<(Row, Relay)> {
    let backlog = relay.outbox().await?;
    relay.stop()?;
    let started = Instant::now();
    let relay = Relay::start(data_dir, config, exchange, BROKER)?;
    relay.wait_healthy().await?;
    relay
        .wait_outbox_at_most(0, Duration::from_secs(120))
        .await?;
    let drain_rate = backlog as f64 / started.elapsed().as_secs_f64();
    // The drain is the broker's pace on this machine: the relay's CPU per event is its cost.
    let cpu_us = relay.cpu_seconds()? * 1e6 / backlog.max(1) as f64;
    let lapin_rate = plain_publisher(backlog).await?;
    let row = Row {
        scenario: "drain: outbox backlog, broker restored",
        figure: format!(
            "{backlog} events, {drain_rate:.0}/s, the relay's CPU {cpu_us:.0} µs/event"
        ),
        baseline: format!("plain lapin publisher {lapin_rate:.0}/s"),
        ratio: pct(drain_rate, lapin_rate),
        target: "≥ 90 %",
    };
    Ok((row, relay))
}

/// Scenario 3 on its own: an ingest run (broker cut) leaves the backlog the relay drains.
async fn drain_only(work: &Path) -> Result<Row> {
    let cut = relay_broker_cut(work, "drain").await?;
    let _ = wrk_new(work, cut.relay.port, "drain-backlog", seconds(8))?;
    let (row, mut relay) = drain_row(cut.relay, &cut.data_dir, &cut.config, &cut.exchange).await?;
    relay.stop()?;
    purge(&cut.queue).await?;
    Ok(row)
}

/// Scenario 1 on its own: the same baseline, relay settings and runs as in the full harness.
async fn ingest_only(work: &Path) -> Result<(Row, WrkResult)> {
    let baseline_port = spawn_bare_endpoint().await?;
    let CutRelay {
        mut relay,
        _forwarder,
        ..
    } = relay_broker_cut(work, "ingest").await?;
    let base = wrk_new(work, baseline_port, "base", seconds(10))?;
    let before = relay.durations().await?;
    let ingest = wrk_new(work, relay.port, "ingest", seconds(8))?;
    print_split(&before, &relay.durations().await?);
    println!(
        "  relay peak RSS while ingesting: {} MB",
        relay.peak_rss_mb()
    );
    relay.stop()?;
    Ok((ingest_row(&ingest, &base), ingest))
}

/// Where an ingest run's requests spent their time by the relay's own histograms: answering
/// in all, and waiting for the store (the writer's queue, batch and fdatasync).
fn print_split(before: &[Vec<(f64, u64)>; 2], after: &[Vec<(f64, u64)>; 2]) {
    let bound = |i: usize, q: f64| quantile_bound(&before[i], &after[i], q) * 1000.0;
    println!(
        "  relay's own histograms: answer p50 ≤ {} ms, p99 ≤ {} ms; waiting for the store p50 ≤ {} ms, p99 ≤ {} ms",
        bound(0, 0.5),
        bound(0, 0.99),
        bound(1, 0.5),
        bound(1, 0.99)
    );
}

/// Scenario 2: the same event re-sent, to the relay and to the bare endpoint.
fn duplicates_row(work: &Path, baseline_port: u16, relay_port: u16) -> Result<Row> {
    // Against the bare endpoint under the same requests: one body over and over costs wrk
    // less than signing a new one each time, so the baseline is measured again.
    let base_same = wrk_same(work, baseline_port, "base-same", seconds(10))?;
    let dup = wrk_same(work, relay_port, "dup", seconds(8))?;
    Ok(Row {
        scenario: "duplicates: the same event re-sent",
        figure: format!(
            "{:.0}/s p99 {:.2} ms (wrk used {:.2} cores)",
            dup.rps, dup.p99_ms, dup.generator_cores
        ),
        baseline: format!(
            "bare endpoint, same requests {:.0}/s p99 {:.2} ms (wrk used {:.2} cores)",
            base_same.rps, base_same.p99_ms, base_same.generator_cores
        ),
        ratio: pct(dup.rps, base_same.rps),
        target: "≥ 80 %",
    })
}

/// Scenario 2 on its own, on a fresh relay with the broker cut: its first request stores the
/// event, every other is a duplicate of it.
async fn duplicates_only(work: &Path) -> Result<Row> {
    let baseline_port = spawn_bare_endpoint().await?;
    let CutRelay {
        mut relay,
        _forwarder,
        ..
    } = relay_broker_cut(work, "duplicates").await?;
    let row = duplicates_row(work, baseline_port, relay.port);
    relay.stop()?;
    row
}

/// The five 5k/s runs and the climb of rates on their own, with a relay publishing straight
/// to the broker.
async fn sustained_only(work: &Path) -> Result<Vec<Row>> {
    let queue = format!("bench.q.{}", fastrand::u32(..));
    let exchange = format!("bench.events.{}", fastrand::u32(..));
    let config = work.join("relay-sustained.toml");
    std::fs::write(
        &config,
        format!("[[queues]]\nname = \"{queue}\"\nbindings = [\"#\"]\n"),
    )?;
    let mut relay = Relay::start(&work.join("sustained-data"), &config, &exchange, BROKER)?;
    relay.wait_connected().await?;
    let rows = match sustained_row(&relay, &queue).await {
        Ok(row) => max_rate_row(&relay, &queue)
            .await
            .map(|climb| vec![row, climb]),
        Err(e) => Err(e),
    };
    relay.stop()?;
    cleanup(&queue, &exchange).await;
    rows
}

/// Rising rates from well below the 5k/s row, so that one noisy run there does not hide
/// what the relay can hold; the first rate that misses a target ends the climb.
async fn max_rate_row(relay: &Relay, queue: &str) -> Result<Row> {
    let mut best = None;
    let mut first_miss = String::from("none up to 10000/s");
    for rate in [1_000, 2_000, 3_000, 4_000, 5_000, 6_000, 8_000, 10_000] {
        purge(queue).await?;
        let run = sustained_run(relay, queue, rate, u64::from(seconds(6))).await?;
        println!("  offered {rate}/s: {}", run.describe());
        if !run.meets_targets() {
            first_miss = run.describe();
            break;
        }
        best = Some(rate);
    }
    Ok(Row {
        scenario: "max sustained rate (6 s per step)",
        figure: format!(
            "{} (first miss: {first_miss})",
            best.map_or("below 1000/s".to_string(), |b| format!("{b}/s"))
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "report",
    })
}

/// How many times the 5k/s run is repeated: one good run proves little about a p99.
const SUSTAINED_RUNS: usize = 5;

/// 5k/s for 20 s, `SUSTAINED_RUNS` times, the queue purged between runs; every p99 printed.
async fn sustained_row(relay: &Relay, queue: &str) -> Result<Row> {
    let mut runs = Vec::new();
    for i in 0..SUSTAINED_RUNS {
        purge(queue).await?;
        let run = sustained_run(relay, queue, 5_000, u64::from(seconds(20))).await?;
        println!("  sustained {}/{SUSTAINED_RUNS}: {}", i + 1, run.describe());
        runs.push(run);
    }
    let met = runs.iter().filter(|r| r.meets_targets()).count();
    let list = |f: fn(&Sustained) -> f64| {
        runs.iter()
            .map(|r| format!("{:.1}", f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let accepted: u64 = runs.iter().map(|r| r.accepted).sum();
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    let consumed: u64 = runs.iter().map(|r| r.consumed).sum();
    let generator = runs.iter().map(|r| r.generator_cores).fold(0.0, f64::max);
    Ok(Row {
        scenario: "sustained: 5k/s offered for 20 s, consumer reading, 5 runs",
        figure: format!(
            "{met} of {SUSTAINED_RUNS} runs meet the targets; p99 accept (ms) {} (the relay's own p99 at most {}); p99 receive→consume (ms) {}; the relay's CPU per event (µs) {}; {accepted} accepted, {errors} errors, {consumed} consumed; generator and consumer used ≤ {generator:.2} cores",
            list(|r| r.accept_p99_ms),
            list(|r| r.relay_p99_at_most_ms),
            list(|r| r.lag_p99_ms),
            list(|r| r.relay_cpu_us_per_event),
        ),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "p99 accept ≤ 10 ms and p99 lag ≤ 250 ms in 5 of 5, 0 errors",
    })
}

/// The relay's ingest as a multiple of the Node receiver's rate, both under the same load.
fn node_row(ingest: &WrkResult, node: &WrkResult) -> Row {
    Row {
        scenario: "a customer's own receiver: Node express + amqplib, 2xx after the broker's confirm, 64 conns",
        figure: format!(
            "relay ingest {:.0}/s p99 {:.2} ms",
            ingest.rps, ingest.p99_ms
        ),
        baseline: format!(
            "Node {:.0}/s p50 {:.2} ms p99 {:.2} ms, non-2xx {}",
            node.rps, node.p50_ms, node.p99_ms, node.non_2xx
        ),
        ratio: format!("{:.1}×", ingest.rps / node.rps),
        target: "≥ 7×, at lower p99",
    }
}

fn ingest_row(ingest: &WrkResult, base: &WrkResult) -> Row {
    Row {
        scenario: "ingest: distinct events, 64 conns, broker cut",
        figure: format!(
            "{:.0}/s p50 {:.2} ms p99 {:.2} ms, non-2xx {} (wrk used {:.2} cores)",
            ingest.rps, ingest.p50_ms, ingest.p99_ms, ingest.non_2xx, ingest.generator_cores
        ),
        baseline: format!(
            "bare actix-web endpoint {:.0}/s p50 {:.2} ms p99 {:.2} ms (wrk used {:.2} cores)",
            base.rps, base.p50_ms, base.p99_ms, base.generator_cores
        ),
        ratio: pct(ingest.rps, base.rps),
        target: "≥ 35 %, p99 ≤ 10 ms",
    }
}

/// The machine and the relay binary under test, for the headings.
fn machine() -> Result<String> {
    Ok(format!(
        "{} cores, {}; relay {}",
        num_cpus(),
        kernel(),
        relay_bin()?.display()
    ))
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
    let _ = wrk_new(work, relay.port, "million", seconds(5))?;
    let peak = relay.peak_rss_mb();
    relay.stop()?;
    Ok((filled, disk, peak))
}

async fn run() -> Result<()> {
    if let Some(names) = selection()? {
        if names == ["memory"] {
            println!("relay {}", relay_bin()?.display());
            return memory_only().await;
        }
        return run_only(&names).await;
    }
    let work = tempfile::tempdir()?;
    let mut rows = Vec::new();
    let machine = machine()?;
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
    let relay = Relay::start(&data_dir, &config, &exchange, &forwarder.url())?;
    relay.wait_healthy().await?;

    // 1. ingest
    let base = wrk_new(work.path(), baseline_port, "base", seconds(10))?;
    let before = relay.durations().await?;
    let ingest = wrk_new(work.path(), relay.port, "ingest", seconds(8))?;
    print_split(&before, &relay.durations().await?);
    let peak_ingest = relay.peak_rss_mb();
    rows.push(ingest_row(&ingest, &base));

    // 2. duplicates
    rows.push(duplicates_row(work.path(), baseline_port, relay.port)?);

    // 3. drain
    let (drain, mut relay) = drain_row(relay, &data_dir, &config, &exchange).await?;
    rows.push(drain);
    purge(&queue).await?;

    // 4. the Node receiver, with the broker up, before the sustained runs fill the cores' caches
    // with the relay's publishing.
    let node = node_receiver(work.path()).await?;
    rows.push(node_row(&ingest, &node));

    // 5. sustained, five times, then rising rates
    rows.push(sustained_row(&relay, &queue).await?);
    rows.push(max_rate_row(&relay, &queue).await?);
    let peak_all = relay.peak_rss_mb();
    relay.stop()?;

    // 6. memory with 1M events in the outbox, and disk
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
        target: "≤ 150 MB; ≤ 300 MB with 1M waiting",
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

    // 7. large bodies: last, with a data dir of its own, so that the scenarios above run on
    //    the same disk and data as they did before it existed.
    rows.push(large_ingest(work.path(), &config, &exchange, &forwarder).await?);

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
