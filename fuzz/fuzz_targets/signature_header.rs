//! `X-Kallina-Signature` header parser: any bytes give an answer, never a panic, and the answer
//! is the one the contract states (`sha256=` + exactly 64 lowercase hex digits).

#![no_main]

use kallina_relay::config::Secret;
use kallina_relay::signature::{parse_header, sign, verify, SignatureError};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";
const BODY: &[u8] = b"{\"event\":\"call.ended\",\"timestamp\":\"2025-01-23T10:30:00Z\"}";

fuzz_target!(|header: &[u8]| {
    let parsed = parse_header(header);
    match header.strip_prefix(b"sha256=") {
        None => assert_eq!(parsed, Err(SignatureError::WrongScheme)),
        Some(digits) => {
            let well_formed = digits.len() == 64
                && digits.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            match parsed {
                Ok(digest) => {
                    assert!(well_formed, "accepted a malformed digest");
                    assert_eq!(hex::encode(digest).as_bytes(), digits);
                }
                Err(e) => {
                    assert!(!well_formed, "refused a well-formed digest");
                    assert_eq!(e, SignatureError::Malformed);
                }
            }
        }
    }

    // The full check agrees with the parser, and only the one real MAC passes.
    let secrets = [Secret::new(SECRET)];
    let verified = verify(&secrets, Some(header), BODY);
    match parsed {
        Err(e) => assert_eq!(verified, Err(e)),
        Ok(_) => {
            let genuine = header == sign(SECRET.as_bytes(), BODY).as_bytes();
            assert_eq!(verified.is_ok(), genuine);
            if !genuine {
                assert_eq!(verified, Err(SignatureError::Mismatch));
            }
        }
    }
});
