//! The admin API (`/admin/`): look stored events up, and publish archived ones again when a
//! consumer lost them. The contract is in `docs/admin-api.md`.
//!
//! Every route needs `Authorization: Bearer <admin_token>`, compared in constant time. Without
//! a configured token the whole tree answers 404, as if it did not exist: an admin API nobody
//! turned on should not even be discoverable. Errors use the platform's error shape, mapped
//! from [`AdminError`] in one place.

use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder, Scope};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod quarantine;

use super::contract::{EventDetail, EventList, EventSummary, Redelivered, RedriveStarted};
use super::Admin;
use crate::http::{assign_request_id, respond, ApiError, Failure, RequestId};
use crate::relay::publication_preview;
use crate::shutdown::Shutdown;
use crate::store::{EventQuery, EventStatus, Redelivery, Shelf, StoreError};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Events a redrive puts back per store write, at most.
const REDRIVE_CHUNK: usize = 256;

/// Everything the admin API can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "a valid admin token is required: send `Authorization: Bearer <KALLINA_RELAY_ADMIN_TOKEN>`"
    )]
    Unauthorized,
    #[error("no such event or endpoint")]
    NotFound,
    #[error("`{field}` is invalid: {reason}")]
    InvalidQuery { field: String, reason: String },
    #[error("the event is still waiting for the broker; it will be published without help")]
    EventPending,
    #[error("the store cannot take this now: {reason}")]
    Unavailable {
        reason: String,
        retry_after_seconds: u32,
    },
}

impl ApiError for AdminError {
    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::InvalidQuery { .. } => "invalid_query",
            Self::EventPending => "event_pending",
            Self::Unavailable { .. } => "unavailable",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::InvalidQuery { .. } => StatusCode::BAD_REQUEST,
            Self::EventPending => StatusCode::CONFLICT,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn details(&self) -> Value {
        match self {
            Self::InvalidQuery { field, reason } => json!({ "field": field, "reason": reason }),
            Self::Unavailable {
                reason,
                retry_after_seconds,
            } => json!({ "reason": reason, "retry_after_seconds": retry_after_seconds }),
            _ => json!({}),
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Unavailable {
                retry_after_seconds,
                ..
            } => Some(*retry_after_seconds),
            _ => None,
        }
    }

    fn decorate(&self, response: &mut HttpResponseBuilder) {
        if let Self::Unauthorized = self {
            response.insert_header((WWW_AUTHENTICATE, "Bearer"));
        }
    }
}

impl AdminError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::InvalidQuery {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        let retry_after_seconds = match e {
            StoreError::Full { .. } => 30,
            _ => 5,
        };
        Self::Unavailable {
            reason: e.to_string(),
            retry_after_seconds,
        }
    }
}

/// Handlers answer `Result<HttpResponse, Failure<AdminError>>`: the error with the request's id.
type Answer = Result<HttpResponse, Failure<AdminError>>;

/// Longest text `q` searches bodies for.
const MAX_SEARCH: usize = 200;

trait WithRequest<T> {
    fn for_request(self, req: &HttpRequest) -> Result<T, Failure<AdminError>>;
}

impl<T, E: Into<AdminError>> WithRequest<T> for Result<T, E> {
    fn for_request(self, req: &HttpRequest) -> Result<T, Failure<AdminError>> {
        self.map_err(|e| Failure(e.into(), RequestId::of(req)))
    }
}

pub fn scope() -> Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::scope("/admin")
        .wrap(from_fn(require_token))
        .wrap(from_fn(assign_request_id))
        .route("/events", web::get().to(list_events))
        .route("/events/{id}", web::get().to(show_event))
        .route("/events/{id}/redeliver", web::post().to(redeliver))
        .route("/redrive", web::post().to(redrive))
        .route("/quarantine", web::get().to(quarantine::list))
        .route(
            "/quarantine/{seq}/redeliver",
            web::post().to(quarantine::redeliver),
        )
        .default_service(web::to(|req: HttpRequest| async move {
            respond(&AdminError::NotFound, &RequestId::of(&req))
        }))
}

/// 404 while no token is configured; 401 unless the bearer token matches.
async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let admin = req
        .app_data::<web::Data<Admin>>()
        .expect("the admin state is registered");
    let refusal = match &admin.options.token {
        None => Some(AdminError::NotFound),
        Some(token) => {
            let offered = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            (!tokens_match(offered, token.expose())).then_some(AdminError::Unauthorized)
        }
    };
    match refusal {
        Some(error) => {
            let response = respond(&error, &RequestId::of(req.request()));
            Ok(req.into_response(response))
        }
        None => Ok(next.call(req).await?.map_into_boxed_body()),
    }
}

/// Constant time whatever the inputs: both sides are hashed first, so neither the position of
/// the first difference nor the token's length shows in the timing.
fn tokens_match(offered: &str, expected: &str) -> bool {
    let a = Sha256::digest(offered.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    a.ct_eq(&b).into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    since: Option<String>,
    until: Option<String>,
    event: Option<String>,
    source: Option<String>,
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    /// `asc` (default, oldest first) or `desc` (newest first).
    order: Option<String>,
    /// Text the body must hold.
    q: Option<String>,
}

async fn list_events(req: HttpRequest, admin: web::Data<Admin>) -> Answer {
    let params: ListParams = serde_urlencoded::from_str(req.query_string())
        .map_err(|e| AdminError::invalid("query", e.to_string()))
        .for_request(&req)?;
    let query = list_query(params).for_request(&req)?;
    let store = admin.store.clone();
    let page = web::block(move || store.list_events(&query))
        .await
        .map_err(|e| StoreError::Unwritable(e.to_string()))
        .for_request(&req)?
        .for_request(&req)?;
    Ok(HttpResponse::Ok().json(EventList {
        events: page.events.iter().map(EventSummary::from).collect(),
        next_cursor: page.next_cursor.map(|c| c.to_string()),
    }))
}

fn list_query(params: ListParams) -> Result<EventQuery, AdminError> {
    let status = match params.status.as_deref() {
        None | Some("") => None,
        Some("pending") => Some(EventStatus::Pending),
        Some("published") => Some(EventStatus::Published),
        Some(_) => return Err(AdminError::invalid("status", "`pending` or `published`")),
    };
    let limit = parse_limit(params.limit.as_deref())?;
    let cursor = parse_cursor(params.cursor)?;
    let newest_first = match params.order.as_deref() {
        None | Some("") | Some("asc") => false,
        Some("desc") => true,
        Some(_) => return Err(AdminError::invalid("order", "`asc` or `desc`")),
    };
    let text = params.q.filter(|q| !q.is_empty());
    if text.as_ref().is_some_and(|q| q.len() > MAX_SEARCH) {
        return Err(AdminError::invalid(
            "q",
            format!("at most {MAX_SEARCH} bytes of text to search for"),
        ));
    }
    Ok(EventQuery {
        since_ms: params
            .since
            .as_deref()
            .map(|t| time_ms("since", t))
            .transpose()?,
        until_ms: params
            .until
            .as_deref()
            .map(|t| time_ms("until", t))
            .transpose()?,
        event: params.event.filter(|e| !e.is_empty()),
        source: params.source.filter(|s| !s.is_empty()),
        status,
        limit,
        after: cursor.filter(|_| !newest_first),
        before: cursor.filter(|_| newest_first),
        newest_first,
        text,
    })
}

async fn show_event(req: HttpRequest, admin: web::Data<Admin>, id: web::Path<String>) -> Answer {
    let store = admin.store.clone();
    let view = web::block(move || store.find_event(&id))
        .await
        .map_err(|e| StoreError::Unwritable(e.to_string()))
        .for_request(&req)?
        .for_request(&req)?
        .ok_or(AdminError::NotFound)
        .for_request(&req)?;
    let publishing = &admin.publishing;
    let publish = publication_preview(&view.record, &publishing.exchange, &publishing.routing_key);
    Ok(HttpResponse::Ok().json(EventDetail::of(&view, publish)))
}

async fn redeliver(req: HttpRequest, admin: web::Data<Admin>, id: web::Path<String>) -> Answer {
    let outcome = admin.store.redeliver_event(&id).await.for_request(&req)?;
    match outcome {
        Redelivery::Queued(_) => {
            admin
                .metrics
                .redelivered
                .with_label_values(&["redeliver"])
                .inc();
            tracing::info!(id = %id, "event put back for redelivery");
            Ok(HttpResponse::Accepted().json(Redelivered {
                id: id.into_inner(),
                status: "pending".into(),
            }))
        }
        Redelivery::Pending => Err(AdminError::EventPending).for_request(&req),
        Redelivery::Missing => Err(AdminError::NotFound).for_request(&req),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    since: Value,
    until: Value,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

async fn redrive(req: HttpRequest, admin: web::Data<Admin>, body: web::Bytes) -> Answer {
    let request: RedriveRequest = serde_json::from_slice(&body)
        .map_err(|e| AdminError::invalid("body", e.to_string()))
        .for_request(&req)?;
    let query = EventQuery {
        since_ms: Some(json_time_ms("since", &request.since).for_request(&req)?),
        until_ms: Some(json_time_ms("until", &request.until).for_request(&req)?),
        event: request.event.filter(|e| !e.is_empty()),
        source: request.source.filter(|s| !s.is_empty()),
        status: Some(EventStatus::Published),
        ..EventQuery::default()
    };
    let store = admin.store.clone();
    let seqs = web::block(move || store.archived_matching(&query))
        .await
        .map_err(|e| StoreError::Unwritable(e.to_string()))
        .for_request(&req)?
        .for_request(&req)?;
    let matched = seqs.len();
    if request.dry_run {
        return Ok(HttpResponse::Ok().json(RedriveStarted {
            matched,
            dry_run: true,
        }));
    }
    tracing::info!(
        matched,
        rate = admin.options.redrive_rate,
        "redrive started"
    );
    admin.metrics.redrive_pending.add(matched as i64);
    actix_web::rt::spawn(admin.tasks.track_future(run_redrive(admin.clone(), seqs)));
    Ok(HttpResponse::Accepted().json(RedriveStarted {
        matched,
        dry_run: false,
    }))
}

/// Puts the matched events back, a chunk at a time, at most `redrive_rate` per second; waits
/// while the outbox is full, and stops (saying how many were left) when the service stops.
async fn run_redrive(admin: web::Data<Admin>, seqs: Vec<u64>) {
    let mut shutdown = admin.shutdown.clone();
    let rate = admin.options.redrive_rate.max(1) as usize;
    let chunk_size = REDRIVE_CHUNK.min(rate);
    let pause = Duration::from_secs_f64(chunk_size as f64 / rate as f64);
    let mut left = seqs.len();
    let mut put_back = 0u64;
    for chunk in seqs.chunks(chunk_size) {
        loop {
            if shutdown.is_triggered() {
                tracing::warn!(
                    left,
                    "redrive stopped by shutdown; run it again after the restart"
                );
                admin.metrics.redrive_pending.sub(left as i64);
                return;
            }
            match admin.store.redeliver(chunk.to_vec(), Shelf::Archive).await {
                Ok(outcomes) => {
                    let queued = outcomes
                        .iter()
                        .filter(|o| matches!(o, Redelivery::Queued(_)))
                        .count() as u64;
                    put_back += queued;
                    admin
                        .metrics
                        .redelivered
                        .with_label_values(&["redrive"])
                        .inc_by(queued);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, left, "redrive waiting for the store");
                    pause_unless_stopped(&mut shutdown, Duration::from_secs(1)).await;
                }
            }
        }
        left -= chunk.len();
        admin.metrics.redrive_pending.sub(chunk.len() as i64);
        pause_unless_stopped(&mut shutdown, pause).await;
    }
    tracing::info!(put_back, "redrive finished");
}

/// Sleeps for `pause`, or less if the service starts stopping meanwhile.
async fn pause_unless_stopped(shutdown: &mut Shutdown, pause: Duration) {
    tokio::select! {
        _ = actix_web::rt::time::sleep(pause) => {}
        _ = shutdown.recv() => {}
    }
}

fn parse_limit(limit: Option<&str>) -> Result<usize, AdminError> {
    match limit {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(AdminError::invalid(
                "limit",
                format!("a whole number from 1 to {MAX_LIMIT}"),
            )),
        },
    }
}

fn parse_cursor(cursor: Option<String>) -> Result<Option<u64>, AdminError> {
    cursor
        .map(|c| {
            c.parse::<u64>()
                .map_err(|_| AdminError::invalid("cursor", "the `next_cursor` of a page"))
        })
        .transpose()
}

/// RFC 3339, or Unix seconds.
fn time_ms(field: &str, text: &str) -> Result<u64, AdminError> {
    let invalid = || AdminError::invalid(field, "an RFC 3339 time or Unix seconds");
    if let Ok(seconds) = text.parse::<u64>() {
        return seconds.checked_mul(1000).ok_or_else(invalid);
    }
    let time = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| invalid())?;
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).map_err(|_| invalid())
}

fn json_time_ms(field: &str, value: &Value) -> Result<u64, AdminError> {
    match value {
        Value::String(text) => time_ms(field, text),
        Value::Number(n) => n
            .as_u64()
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(|| AdminError::invalid(field, "an RFC 3339 time or Unix seconds")),
        _ => Err(AdminError::invalid(
            field,
            "an RFC 3339 time or Unix seconds",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(tokens_match("s3cret-token-123456", "s3cret-token-123456"));
        assert!(!tokens_match("s3cret-token-123457", "s3cret-token-123456"));
        assert!(!tokens_match("", "s3cret-token-123456"));
        assert!(!tokens_match("s3cret-token-1234567", "s3cret-token-123456"));
    }

    #[test]
    fn times_are_rfc3339_or_unix_seconds() {
        assert_eq!(time_ms("since", "1700000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            time_ms("since", "2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500
        );
        assert!(matches!(
            time_ms("until", "yesterday"),
            Err(AdminError::InvalidQuery { field, .. }) if field == "until"
        ));
        assert_eq!(
            crate::admin::contract::rfc3339_ms(1_700_000_000_500),
            "2023-11-14T22:13:20.5Z"
        );
    }

    #[test]
    fn list_parameters_are_checked() {
        let params = |limit: Option<&str>, status: Option<&str>| ListParams {
            since: None,
            until: None,
            source: None,
            event: None,
            status: status.map(str::to_string),
            limit: limit.map(str::to_string),
            cursor: None,
            order: None,
            q: None,
        };
        assert_eq!(list_query(params(None, None)).unwrap().limit, DEFAULT_LIMIT);
        assert!(list_query(params(Some("0"), None)).is_err());
        assert!(list_query(params(Some("1001"), None)).is_err());
        assert!(list_query(params(None, Some("lost"))).is_err());
        assert_eq!(
            list_query(params(None, Some("pending"))).unwrap().status,
            Some(EventStatus::Pending)
        );
    }
}
