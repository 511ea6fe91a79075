//! `X-Request-Id` on every answer: a sane incoming id is echoed (so the platform's own ids
//! follow the event through our logs), anything else is replaced by a fresh `req_…`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpRequest;

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
const MAX_LEN: usize = 128;

/// The id of the request being served: its `X-Request-Id` header once [`assign`] has seen it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The request's id, as set by [`assign`]; empty on a request it did not see.
    pub fn of(req: &HttpRequest) -> String {
        req.headers()
            .get(&HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// The id an answer to a request with these headers carries: the sender's own when it is
/// acceptable, else a fresh one.
pub fn choose(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(&HEADER)
        .filter(|v| v.to_str().is_ok_and(is_acceptable))
        .cloned()
        .unwrap_or_else(generate)
}

/// Middleware (for `actix_web::middleware::from_fn`) that assigns the id and echoes it: the
/// admin listener's. The webhook handler does the same itself (see `ingress`), without the
/// layer a middleware adds to every request.
///
/// The id lives in the request's own header, replaced there when it is missing or not
/// acceptable: nothing is allocated for a request that brings a good one, and a handler reads
/// it only when it needs it (an error's body).
pub async fn assign(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = choose(req.headers());
    req.headers_mut().insert(HEADER, id.clone());
    let mut response = next.call(req).await?;
    response.headers_mut().insert(HEADER, id);
    Ok(response)
}

fn is_acceptable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn generate() -> HeaderValue {
    const ALPHANUMERIC: &[u8; 62] =
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut id = *b"req_000000000000000000000000";
    // Eight letters from each random u64 (62^8 < 2^48: the bias is below one in 2^16).
    for chunk in id[4..].chunks_mut(8) {
        let mut bits = fastrand::u64(..);
        for b in chunk {
            *b = ALPHANUMERIC[(bits % 62) as usize];
            bits /= 62;
        }
    }
    HeaderValue::from_bytes(&id).expect("letters, digits and `_` are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_echoed() {
        assert!(is_acceptable("req_abc-123"));
        assert!(!is_acceptable(""));
        assert!(!is_acceptable("a b"));
        assert!(!is_acceptable(&"x".repeat(129)));
        let id = generate();
        assert!(id.to_str().unwrap().starts_with("req_"));
        assert!(is_acceptable(id.to_str().unwrap()));
        assert_eq!(id.len(), 28);
    }
}
