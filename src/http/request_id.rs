//! `X-Request-Id` on every answer: a sane incoming id is echoed (so the platform's own ids
//! follow the event through our logs), anything else is replaced by a fresh `req_…`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
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

/// Middleware (for `actix_web::middleware::from_fn`) that assigns the id and echoes it.
///
/// The id lives in the request's own header, replaced there when it is missing or not
/// acceptable: nothing is allocated for a request that brings a good one, and a handler reads
/// it only when it needs it (an error's body, a log line). Kept in the request's extensions,
/// it cost a map, a box and two copies of the string per request (perf, README).
pub async fn assign(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let incoming = req
        .headers()
        .get(&HEADER)
        .filter(|v| v.to_str().is_ok_and(is_acceptable))
        .cloned();
    let id = match incoming {
        Some(id) => id,
        None => {
            let id = generate();
            req.headers_mut().insert(HEADER, id.clone());
            id
        }
    };
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
    for b in &mut id[4..] {
        *b = ALPHANUMERIC[fastrand::usize(..ALPHANUMERIC.len())];
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
