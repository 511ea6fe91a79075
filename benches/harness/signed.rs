//! Signed bodies that are all different, cheaply: what the load generator sends when every
//! request must be a new event.
//!
//! The relay's dedup key is always the body's hash (a delivery id is a second key, never a
//! replacement), so a load of one body with distinct delivery ids measures duplicates, not
//! ingest. Every body here is one shared prefix (whole 64-byte SHA-256 blocks) and a 64-byte
//! tail that carries the request's tag. The harness hashes the HMAC key block and the prefix
//! once and hands wrk the SHA-256 states after them; per request, `benches/wrk/post-signed.lua`
//! hashes only the tail, its padding and the outer HMAC block (three compressions), whatever
//! the body's size. [`SignedBody::check`] holds that split signature to the relay's own `sign`.

use super::*;

/// The per-request part of a body: exactly one SHA-256 block.
const TAIL: usize = 64;
/// What post-signed.lua appends after the fill: "-TT-CCCCCCCCCC" and the closing `"}}`.
const TAIL_TAG: usize = 14 + 3;

/// The ingest scenarios' body: 9 blocks of prefix and the tail, the nearest whole-block size
/// at or above the ~600 bytes of a typical `call.ended` event.
pub(crate) const SMALL_BODY: usize = 640;

const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// SHA-256's compression over whole 64-byte blocks (the hash state after a shared prefix is
/// what wrk starts each request's signature from).
fn compress256(state: &mut [u32; 8], data: &[u8]) {
    assert!(data.len().is_multiple_of(64));
    let blocks: Vec<_> = data
        .chunks_exact(64)
        .map(|block| *sha2::digest::generic_array::GenericArray::from_slice(block))
        .collect();
    sha2::compress256(state, &blocks);
}

/// A body's shared prefix and the HMAC-SHA256 states wrk needs to sign each request.
pub(crate) struct SignedBody {
    pub(crate) prefix: Vec<u8>,
    pub(crate) tail_fill: String,
    inner: [u32; 8],
    outer: [u32; 8],
}

/// Random letters and digits: a real body does not compress to nothing, and the disk
/// baseline writes these same bytes, so nothing below us can make either side cheaper.
pub(crate) fn filler(len: usize) -> String {
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

impl SignedBody {
    /// Bodies of exactly `len` bytes (a multiple of 64), `marker` in their call id.
    pub(crate) fn new(marker: &str, len: usize) -> Result<Self> {
        anyhow::ensure!(
            len.is_multiple_of(64),
            "a signed body is whole SHA-256 blocks"
        );
        let mut prefix = envelope_prefix(marker);
        prefix.push_str(&filler(len - TAIL - prefix.len()));
        let body = Self::keyed(prefix.into_bytes(), filler(TAIL - TAIL_TAG));
        body.check(len)?;
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

    /// The signature of prefix ‖ `tail`, from the saved states, the way post-signed.lua does it.
    fn signature(&self, tail: &[u8]) -> String {
        let mut inner = self.inner;
        compress256(&mut inner, tail);
        let inner_len = 64 + self.prefix.len() + TAIL;
        compress256(&mut inner, &padding(&[], inner_len));
        let mut outer = self.outer;
        compress256(&mut outer, &padding(&digest_bytes(&inner), 64 + 32));
        format!("sha256={}", hex::encode(digest_bytes(&outer)))
    }

    /// The body post-signed.lua sends as thread `thread`'s request number `n`.
    pub(crate) fn nth(&self, thread: u32, n: u64) -> Vec<u8> {
        let mut body = self.prefix.clone();
        body.extend_from_slice(format!("{}-{thread:02}-{n:010}\"}}}}", self.tail_fill).as_bytes());
        body
    }

    /// One whole body as wrk sends it, for the checks, the disk baseline and duplicates.
    pub(crate) fn sample(&self) -> Vec<u8> {
        self.nth(0, 1)
    }

    /// The split signature is the relay's signature, and the body is an envelope it accepts.
    fn check(&self, len: usize) -> Result<()> {
        let body = self.sample();
        anyhow::ensure!(body.len() == len, "signed body is {} bytes", body.len());
        anyhow::ensure!(
            self.signature(&body[self.prefix.len()..]) == sign(SECRET.as_bytes(), &body),
            "the split signature does not match"
        );
        kallina_relay::ingress::parse_envelope(&body)
            .map_err(|e| anyhow::anyhow!("the signed body is not an envelope: {}", e.reason))?;
        Ok(())
    }
}

/// wrk with post-signed.lua over `connections`: every request a different body and delivery id.
pub(crate) fn wrk_signed(
    dir: &Path,
    port: u16,
    body: &SignedBody,
    connections: u32,
    run: &str,
    seconds: u32,
) -> Result<WrkResult> {
    let prefix_file = dir.join(format!("body-{run}.prefix"));
    std::fs::write(&prefix_file, &body.prefix)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/wrk/post-signed.lua");
    let mut command = wrk_command(connections, seconds, &script, port);
    command
        .env("KALLINA_BENCH_BODY_FILE", &prefix_file)
        .env("KALLINA_BENCH_TAIL_FILL", &body.tail_fill)
        .env("KALLINA_BENCH_INNER_STATE", words_hex(&body.inner))
        .env("KALLINA_BENCH_OUTER_STATE", words_hex(&body.outer))
        .env("KALLINA_BENCH_RUN", run);
    let result = run_wrk(command, run);
    let _ = std::fs::remove_file(&prefix_file);
    result
}
