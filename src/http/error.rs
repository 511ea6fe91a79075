//! The platform's error shape, `{"error":{"code","message","details","request_id"}}`, and the
//! mapping of an error to a response, for every listener.

use actix_web::body::BoxBody;
use actix_web::http::header::RETRY_AFTER;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, HttpResponseBuilder, ResponseError};
use serde_json::{json, Value};

/// An error a listener answers with. The listener's own enum says which errors exist; this
/// says how each one is put on the wire.
pub trait ApiError: std::fmt::Display {
    /// `error.code` in the body; also the `outcome` label wherever the error is counted.
    fn code(&self) -> &'static str;
    fn status(&self) -> StatusCode;
    /// `error.details`: what a client needs to act on the error.
    fn details(&self) -> Value {
        json!({})
    }
    /// Seconds to wait before retrying, sent as `Retry-After`: every 503 has one.
    fn retry_after(&self) -> Option<u32> {
        None
    }
    /// Anything else the answer needs: `Allow`, `WWW-Authenticate`, closing the connection.
    fn decorate(&self, _response: &mut HttpResponseBuilder) {}
}

/// The answer to `error` for the request `request_id`.
pub fn respond(error: &impl ApiError, request_id: &str) -> HttpResponse {
    let mut response = HttpResponse::build(error.status());
    if let Some(seconds) = error.retry_after() {
        response.insert_header((RETRY_AFTER, seconds.to_string()));
    }
    error.decorate(&mut response);
    response.json(error_body(
        error.code(),
        &error.to_string(),
        error.details(),
        request_id,
    ))
}

/// The platform's error shape.
pub fn error_body(code: &str, message: &str, details: Value, request_id: &str) -> Value {
    json!({
        "error": {
            "code": code,
            "message": message,
            "details": details,
            "request_id": request_id,
        }
    })
}

/// A handler's error: the error and the id of the request it answers, so that handlers can
/// return `Result<HttpResponse, Failure<E>>` and use `?`.
pub struct Failure<E>(pub E, pub String);

impl<E: ApiError> std::fmt::Debug for Failure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.0.code(), self.0)
    }
}

impl<E: ApiError> std::fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: ApiError> ResponseError for Failure<E> {
    fn status_code(&self) -> StatusCode {
        self.0.status()
    }
    fn error_response(&self) -> HttpResponse<BoxBody> {
        respond(&self.0, &self.1)
    }
}
