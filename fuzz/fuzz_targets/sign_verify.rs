//! sign → verify: whatever the key and body, the platform's signature verifies (lower or upper
//! case, with the key anywhere in a rotation list), and one flipped bit of the body or of the
//! digest makes it fail.

#![no_main]

use arbitrary::Arbitrary;
use kallina_relay::config::Secret;
use kallina_relay::signature::{parse_header, sign, verify, SignatureError};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    key: &'a str,
    other_key: &'a str,
    /// Which bit to flip, taken modulo the bits of the body or of the digest.
    bit: u32,
    flip_body: bool,
    upper_case: bool,
    body: &'a [u8],
}

/// The key as HMAC uses it: hashed when longer than a SHA-256 block, then zero-padded. Two keys
/// with the same block (`"k"` and `"k\0"`, say) are the same key to HMAC, by design: they must
/// not be mistaken for a verification bug.
fn key_block(key: &[u8]) -> [u8; 64] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    block
}

fuzz_target!(|input: Input<'_>| {
    let Input {
        key,
        other_key,
        bit,
        flip_body,
        upper_case,
        body,
    } = input;
    let mut header = sign(key.as_bytes(), body);
    assert!(header.starts_with("sha256=") && header.len() == 7 + 64);
    if upper_case {
        header = format!("sha256={}", header[7..].to_ascii_uppercase());
    }
    let secret = Secret::new(key);
    assert_eq!(
        verify(&[secret.clone()], Some(header.as_bytes()), body),
        Ok(0)
    );

    // Rotation: the index of the first secret that matches.
    let rotation = [Secret::new(other_key), secret.clone()];
    let same_key = key_block(other_key.as_bytes()) == key_block(key.as_bytes());
    let expected = if same_key { 0 } else { 1 };
    assert_eq!(
        verify(&rotation, Some(header.as_bytes()), body),
        Ok(expected)
    );
    if !same_key {
        assert_eq!(
            verify(&[Secret::new(other_key)], Some(header.as_bytes()), body),
            Err(SignatureError::Mismatch)
        );
    }

    let mut body = body.to_vec();
    let mut digest = parse_header(header.as_bytes()).expect("sign() makes a valid header");
    if flip_body && !body.is_empty() {
        let i = bit as usize % (body.len() * 8);
        body[i / 8] ^= 1 << (i % 8);
    } else {
        let i = bit as usize % 256;
        digest[i / 8] ^= 1 << (i % 8);
    }
    let altered = format!("sha256={}", hex::encode(digest));
    assert_eq!(
        verify(&[secret], Some(altered.as_bytes()), &body),
        Err(SignatureError::Mismatch)
    );
});
