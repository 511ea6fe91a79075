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

/// The per-request part of a body: exactly one SHA-256 block, so that wrk signs each body
/// from the state after the shared prefix (see benches/wrk/post-large.lua).
const TAIL: usize = 64;
/// What post-large.lua appends after the fill: "-TT-CCCCCCCCCC" and the closing `"}}`.
const TAIL_TAG: usize = 14 + 3;

const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// SHA-256's compression over whole 64-byte blocks (the hash state after a shared prefix is
/// what wrk starts each request's signature from); `LargeBody::check` holds it to `sign`.
fn compress256(state: &mut [u32; 8], data: &[u8]) {
    assert!(data.len().is_multiple_of(64));
    let blocks: Vec<_> = data
        .chunks_exact(64)
        .map(|block| *sha2::digest::generic_array::GenericArray::from_slice(block))
        .collect();
    sha2::compress256(state, &blocks);
}

/// A large body's shared prefix and the HMAC-SHA256 states wrk needs to sign each request.
pub(crate) struct LargeBody {
    pub(crate) prefix: Vec<u8>,
    pub(crate) tail_fill: String,
    inner: [u32; 8],
    outer: [u32; 8],
}

/// Random letters and digits: a real 100 KB body does not compress to nothing, and the disk
/// baseline writes these same bytes, so nothing below us can make either side cheaper.
fn filler(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

fn words_hex(words: &[u32; 8]) -> String {
    words.iter().map(|w| format!("{w:08x}")).collect()
}

fn digest_bytes(words: &[u32; 8]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// The last block of a message whose whole blocks are hashed: `rest`, 0x80, zeros, bit length.
fn padding(rest: &[u8], message_len: usize) -> [u8; 64] {
    let mut block = [0u8; 64];
    block[..rest.len()].copy_from_slice(rest);
    block[rest.len()] = 0x80;
    block[56..].copy_from_slice(&((message_len as u64) * 8).to_be_bytes());
    block
}

impl LargeBody {
    pub(crate) fn new(marker: &str) -> Result<Self> {
        let mut prefix = envelope_prefix(marker);
        prefix.push_str(&filler(LARGE_BODY - TAIL - prefix.len()));
        let body = Self::keyed(prefix.into_bytes(), filler(TAIL - TAIL_TAG));
        body.check()?;
        Ok(body)
    }

    fn keyed(prefix: Vec<u8>, tail_fill: String) -> Self {
        let key = SECRET.as_bytes();
        // HMAC hashes a key longer than a block first; ours is short enough to pad.
        assert!(key.len() <= 64);
        let pad = |byte: u8| {
            let mut block = [byte; 64];
            for (b, k) in block.iter_mut().zip(key) {
                *b ^= k;
            }
            block
        };
        let mut inner = SHA256_IV;
        compress256(&mut inner, &pad(0x36));
        compress256(&mut inner, &prefix);
        let mut outer = SHA256_IV;
        compress256(&mut outer, &pad(0x5c));
        Self {
            prefix,
            tail_fill,
            inner,
            outer,
        }
    }

    /// The signature of prefix ‖ `tail`, from the saved states, the way post-large.lua does it.
    fn signature(&self, tail: &[u8]) -> String {
        let mut inner = self.inner;
        compress256(&mut inner, tail);
        let inner_len = 64 + self.prefix.len() + TAIL;
        compress256(&mut inner, &padding(&[], inner_len));
        let mut outer = self.outer;
        compress256(&mut outer, &padding(&digest_bytes(&inner), 64 + 32));
        format!("sha256={}", hex::encode(digest_bytes(&outer)))
    }

    /// One whole body as wrk sends it, for the checks and the disk baseline.
    pub(crate) fn sample(&self) -> Vec<u8> {
        let mut body = self.prefix.clone();
        body.extend_from_slice(format!("{}-00-{:010}\"}}}}", self.tail_fill, 1).as_bytes());
        body
    }

    /// The split signature is the relay's signature, and the body is an envelope it accepts.
    fn check(&self) -> Result<()> {
        let body = self.sample();
        anyhow::ensure!(
            body.len() == LARGE_BODY,
            "large body is {} bytes",
            body.len()
        );
        anyhow::ensure!(
            self.signature(&body[self.prefix.len()..]) == sign(SECRET.as_bytes(), &body),
            "the large body's split signature does not match"
        );
        kallina_relay::ingress::parse_envelope(&body)
            .map_err(|e| anyhow::anyhow!("the large body is not an envelope: {}", e.reason))?;
        Ok(())
    }
}

/// wrk with post-large.lua: every request a different body and delivery id.
pub(crate) fn wrk_large(
    dir: &Path,
    port: u16,
    body: &LargeBody,
    run: &str,
    seconds: u32,
) -> Result<WrkResult> {
    let prefix_file = dir.join(format!("body-{run}.prefix"));
    std::fs::write(&prefix_file, &body.prefix)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/wrk/post-large.lua");
    let mut command = Command::new("wrk");
    command
        .args([
            "-t2",
            &format!("-c{LARGE_CONNECTIONS}"),
            &format!("-d{seconds}s"),
            // A slow fsync should show in p99, not vanish as a timeout (wrk's default is 2 s
            // and timed-out requests are left out of its latencies).
            "--timeout",
            "10s",
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/webhooks/kallina"))
        .env("KALLINA_BENCH_BODY_FILE", &prefix_file)
        .env("KALLINA_BENCH_TAIL_FILL", &body.tail_fill)
        .env("KALLINA_BENCH_INNER_STATE", words_hex(&body.inner))
        .env("KALLINA_BENCH_OUTER_STATE", words_hex(&body.outer))
        .env("KALLINA_BENCH_RUN", run);
    let result = run_wrk(command, run);
    let _ = std::fs::remove_file(&prefix_file);
    result
}

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
    let body = LargeBody::new("large")?;
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
    let large = wrk_large(work, relay.port, &body, "large", seconds(8))?;
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
