//! Large-body ingest: distinct signed 100 KB events under wrk (broker cut), beside the disk's
//! own synced write bandwidth measured in the same run on the same filesystem.

use super::*;
use std::io::Write;

/// Every large body's length, and the disk baseline's chunk.
pub(crate) const LARGE_BODY: usize = 100 * 1024;

/// 16, not ingest's 64: with 100 KB bodies the cost is in bytes, not in requests, so far fewer
/// requests in flight keep the writer busy. Beyond that, more connections only queue more
/// bodies behind the same fsync: p99 grows with the queue, and the relay holds every waiting
/// body in memory (64 × 100 KB is 6.5 MB a batch), for little or no more events/s. A sender of
/// 100 KB events is also unlikely to hold 64 requests open at once.
pub(crate) const LARGE_CONNECTIONS: u32 = 16;

/// MB/s (10^6 bytes) of `chunk` appended to a new file in `dir` for `seconds`, with one
/// fdatasync after every `group` chunks: what the disk itself gives a writer that must have
/// each batch on disk before answering, as the relay must.
pub(crate) fn synced_appends(dir: &Path, chunk: &[u8], group: usize, seconds: u32) -> Result<f64> {
    let path = dir.join(format!("synced-appends-{group}"));
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let limit = Duration::from_secs(seconds.into());
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < limit {
        for _ in 0..group {
            file.write_all(chunk)?;
            written += chunk.len() as u64;
        }
        // fdatasync, as the relay's writer does on sled's log: an append changes the file's
        // size, so this commits metadata too, as it does for the relay.
        file.sync_data()?;
    }
    let rate = written as f64 / started.elapsed().as_secs_f64() / 1e6;
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

/// The large-body scenario: the disk baseline first (on the filesystem of the relay's data
/// dir: both live in `work`), then the relay, broker cut, under wrk.
pub(crate) async fn large_ingest(
    work: &Path,
    config: &Path,
    exchange: &str,
    forwarder: &Forwarder,
) -> Result<Row> {
    let body = SignedBody::new("large", LARGE_BODY)?;
    let chunk = body.sample();
    let disk_dir = work.join("disk-baseline");
    std::fs::create_dir_all(&disk_dir)?;
    let per_chunk = synced_appends(&disk_dir, &chunk, 1, seconds(5))?;
    // The relay's typical batch under this load: every connection waits for its answer, so a
    // batch holds at most one request per connection, and under steady load nearly all.
    let group = LARGE_CONNECTIONS as usize;
    let grouped = synced_appends(&disk_dir, &chunk, group, seconds(5))?;
    std::fs::remove_dir_all(&disk_dir)?;
    println!(
        "  disk, 100 KB appends: {per_chunk:.1} MB/s with an fdatasync each, {grouped:.1} MB/s with one per {group}"
    );

    forwarder.cut();
    let data_dir = work.join("large-data");
    let mut relay = Relay::start(&data_dir, config, exchange, &forwarder.url())?;
    relay.wait_healthy().await?;
    let large = wrk_signed(
        work,
        relay.port,
        &body,
        LARGE_CONNECTIONS,
        "large",
        seconds(8),
    )?;
    let stored = relay.outbox().await?;
    let peak = relay.peak_rss_mb();
    relay.stop()?;
    // Gigabytes of 100 KB events: not left for the scenarios after this one.
    std::fs::remove_dir_all(&data_dir)?;

    let mb_per_s = large.rps * LARGE_BODY as f64 / 1e6;
    let errors = large
        .socket_errors
        .map_or(String::new(), |e| format!(", socket errors: {e}"));
    Ok(Row {
        scenario: "large: distinct 100 KB events, 16 conns, broker cut",
        figure: format!(
            "{:.0}/s = {mb_per_s:.1} MB/s of bodies, p50 {:.2} ms p99 {:.2} ms, non-2xx {}, {stored} stored of {} answered{errors}, peak RSS {peak} MB",
            large.rps, large.p50_ms, large.p99_ms, large.non_2xx, large.requests
        ),
        baseline: format!(
            "disk, 100 KB appends: {per_chunk:.1} MB/s with an fdatasync each; {grouped:.1} MB/s with one per {group}"
        ),
        ratio: pct(mb_per_s, per_chunk),
        target: "report (vs fdatasync each)",
    })
}
