//! Every way a webhook request can fail, and what each means on the wire; the platform's
//! error shape itself is [`crate::http::error`]'s.

use actix_web::http::header::ALLOW;
use actix_web::http::StatusCode;
use actix_web::HttpResponseBuilder;
use serde_json::{json, Value};

use crate::http::ApiError;
use crate::signature::SignatureError;

use super::envelope::PayloadError;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the body did not arrive within {seconds} s")]
    RequestTimeout { seconds: u64 },
    #[error("Content-Encoding `{encoding}` is not supported: send the body uncompressed")]
    UnsupportedEncoding { encoding: String },
    #[error("{0}")]
    Signature(SignatureError),
    #[error("the payload is invalid: {}", .0.reason)]
    InvalidPayload(PayloadError),
    #[error("the signed timestamp is outside the accepted window")]
    TimestampOutOfTolerance { details: Value },
    #[error("the service cannot store events right now: {reason}")]
    Unavailable {
        reason: String,
        retry_after_seconds: u32,
    },
    #[error(
        "too many request bodies are arriving at once (more than {budget_bytes} bytes in all); \
         retry shortly"
    )]
    BodyBudgetFull {
        budget_bytes: usize,
        retry_after_seconds: u32,
    },
    #[error("only POST is allowed here")]
    MethodNotAllowed,
    #[error("no such endpoint: webhooks are received at POST /webhooks/<source>, for the sources this relay is configured with")]
    NotFound,
}

impl ApiError for IngressError {
    /// Also the `outcome` label of `kallina_relay_webhooks_total`.
    fn code(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::RequestTimeout { .. } => "request_timeout",
            Self::UnsupportedEncoding { .. } => "unsupported_encoding",
            Self::Signature(SignatureError::Missing) => "missing_signature",
            Self::Signature(_) => "invalid_signature",
            Self::InvalidPayload(_) => "invalid_payload",
            Self::TimestampOutOfTolerance { .. } => "timestamp_out_of_tolerance",
            Self::Unavailable { .. } | Self::BodyBudgetFull { .. } => "unavailable",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotFound => "not_found",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedEncoding { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::InvalidPayload(_) | Self::TimestampOutOfTolerance { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::Unavailable { .. } | Self::BodyBudgetFull { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound => StatusCode::NOT_FOUND,
        }
    }

    fn details(&self) -> Value {
        match self {
            Self::PayloadTooLarge { limit } => json!({ "limit_bytes": limit }),
            Self::RequestTimeout { seconds } => json!({ "timeout_seconds": seconds }),
            Self::UnsupportedEncoding { encoding } => json!({ "content_encoding": encoding }),
            Self::Signature(e) => json!({ "reason": e.reason() }),
            Self::InvalidPayload(e) => json!({ "field": e.field, "reason": e.reason }),
            Self::TimestampOutOfTolerance { details } => details.clone(),
            Self::Unavailable {
                reason,
                retry_after_seconds,
            } => {
                json!({ "reason": reason, "retry_after_seconds": retry_after_seconds })
            }
            Self::BodyBudgetFull {
                budget_bytes,
                retry_after_seconds,
            } => json!({
                "reason": "body_budget_full",
                "max_inflight_body_bytes": budget_bytes,
                "retry_after_seconds": retry_after_seconds,
            }),
            Self::MethodNotAllowed => json!({ "allowed": ["POST"] }),
            Self::NotFound => json!({}),
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Unavailable {
                retry_after_seconds,
                ..
            }
            | Self::BodyBudgetFull {
                retry_after_seconds,
                ..
            } => Some(*retry_after_seconds),
            _ => None,
        }
    }

    fn decorate(&self, response: &mut HttpResponseBuilder) {
        match self {
            Self::MethodNotAllowed => {
                response.insert_header((ALLOW, "POST"));
            }
            // The rest of the body is still on the wire: the connection cannot be reused.
            Self::PayloadTooLarge { .. }
            | Self::RequestTimeout { .. }
            | Self::BodyBudgetFull { .. } => {
                response.force_close();
            }
            _ => {}
        }
    }
}
