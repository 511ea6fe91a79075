//! Requests verified lately, so that a sender's retries of them are not verified again.
//!
//! **Why this is the same answer.** The contract says a retry carries the same bytes, so the
//! same signature. Verifying such a request again (the HMAC under each secret, the body's
//! SHA-256, the envelope's parse) gives what it gave the first time: a source's secrets do not
//! change while the relay runs. So a request whose signature digest *and every byte of its
//! body* equal those of a request verified before takes that request's result: a comparison of
//! the bytes, not of a hash, so nothing but the same request matches. What the signature does
//! not cover is checked again on every request, as for any other: the timestamp window (it
//! moves with the clock), the delivery-id header, the encoding, the store's "seen before?".
//! Only verified requests come in here, so a sender without the secret cannot put anything
//! in, nor aim at a slot: the slot is chosen by the digest, an HMAC output.
//!
//! **Why it is worth it.** A retry is a request the relay must answer and never store: the
//! platform's retry after an answer it did not see, a retry storm once the relay is back, a
//! replay of a captured request. Its verification was ≈ 17 % of the relay's CPU answering
//! duplicates (perf, README performance section); a byte comparison costs a fraction of that.
//!
//! **What goes in.** Every request that passed every check, new or duplicate: the retry most
//! worth answering fast is that of a new event whose answer the sender missed. A new event pays
//! one copy of its body for it: in five paired ingest runs −1.7 % on average, inside their
//! spread (−4.9 to +4.3 %).
//!
//! **Bounded.** [`SLOTS`] entries per source, each one request, bodies of at most
//! [`MAX_BODY`] bytes: at most 4 MiB of bodies per source. A slot holds the latest request
//! that landed on it.
//!
//! **Read without writing.** A slot is an `ArcSwap`: reading it writes nothing shared. Behind
//! a mutex, the HTTP workers answering retries of one request took turns at the slot's lock,
//! its cache line crossing between the cores twice a request (perf, README).

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use time::OffsetDateTime;

/// Entries per source.
pub const SLOTS: usize = 512;
/// Largest body remembered: an event of the usual kind is well below it.
pub const MAX_BODY: usize = 8 * 1024;

/// What verifying a request found, which a byte-for-byte retry of it would find again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Which of the source's secrets matched (for `kallina_relay_signature_matches_total`).
    pub secret_index: usize,
    pub event: String,
    pub timestamp: OffsetDateTime,
    /// The dedup key from the body's SHA-256 (the `message_id`).
    pub key: String,
}

struct Entry {
    digest: [u8; 32],
    body: Box<[u8]>,
    verification: Verification,
}

/// One source's remembered requests.
pub struct Retries {
    slots: Box<[ArcSwapOption<Entry>]>,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| ArcSwapOption::empty()).collect(),
        }
    }
}

impl Retries {
    fn slot(&self, digest: &[u8; 32]) -> &ArcSwapOption<Entry> {
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        &self.slots[(u64::from_le_bytes(first) % SLOTS as u64) as usize]
    }

    /// The verification of the request with this signature digest and exactly this body, if
    /// one is remembered.
    pub fn get(&self, digest: &[u8; 32], body: &[u8]) -> Option<Verification> {
        let slot = self.slot(digest).load();
        slot.as_deref()
            .filter(|entry| entry.digest == *digest && *entry.body == *body)
            .map(|entry| entry.verification.clone())
    }

    /// Remembers a verified request (one with a body of at most [`MAX_BODY`] bytes).
    pub fn remember(&self, digest: &[u8; 32], body: &[u8], verification: Verification) {
        if body.len() > MAX_BODY {
            return;
        }
        let entry = Entry {
            digest: *digest,
            body: body.into(),
            verification,
        };
        self.slot(digest).store(Some(Arc::new(entry)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verification(key: &str) -> Verification {
        Verification {
            secret_index: 1,
            event: "call.ended".into(),
            timestamp: OffsetDateTime::UNIX_EPOCH,
            key: key.into(),
        }
    }

    #[test]
    fn only_the_same_digest_with_the_same_body_is_found() {
        let retries = Retries::default();
        let digest = [7u8; 32];
        retries.remember(&digest, b"{\"a\":1}", verification("k"));
        assert_eq!(retries.get(&digest, b"{\"a\":1}"), Some(verification("k")));
        // One byte off, a byte more or less: not the request that was verified.
        assert_eq!(retries.get(&digest, b"{\"a\":2}"), None);
        assert_eq!(retries.get(&digest, b"{\"a\":1} "), None);
        assert_eq!(retries.get(&digest, b"{\"a\":1"), None);
        let mut other = digest;
        other[31] ^= 1;
        assert_eq!(retries.get(&other, b"{\"a\":1}"), None);
    }

    #[test]
    fn a_slot_keeps_the_latest_request_and_large_bodies_are_not_kept() {
        let retries = Retries::default();
        let first = [0u8; 32];
        // The same first eight bytes: the same slot.
        let mut second = first;
        second[20] = 1;
        retries.remember(&first, b"one", verification("1"));
        retries.remember(&second, b"two", verification("2"));
        assert_eq!(retries.get(&first, b"one"), None);
        assert_eq!(retries.get(&second, b"two"), Some(verification("2")));

        let large = vec![b'x'; MAX_BODY + 1];
        retries.remember(&first, &large, verification("large"));
        assert_eq!(retries.get(&first, &large), None);
    }
}
