//! `POST /webhooks/kallina`: the public door.
//!
//! A request goes through the checks in the order the contract lists them, each failing fast:
//! size, encoding, signature (over the raw bytes, before any parsing), envelope, timestamp
//! window; only then does it reach the [store](crate::store), and the answer is 2xx only once
//! the store says the event is on disk.

mod body;
mod budget;
mod connection;
mod envelope;
mod error;
pub mod options;
mod retries;
pub mod sources;
mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_ENCODING, CONTENT_TYPE};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tracing::Instrument;

use budget::{BodyBudget, Held};
pub use connection::remember as remember_connection;
pub use envelope::{parse as parse_envelope, Envelope, PayloadError};
pub use error::IngressError;
pub use options::{IngressOptions, TlsFiles};
use retries::{Retries, Verification};
pub use sources::Source;
pub use tls::server_config as tls_server_config;

use crate::http::{request_id, respond, ApiError};
use crate::metrics::{event_label_index, Metrics, PerThread, EVENT_LABELS};
use crate::shutdown::Shutdown;
use crate::signature;
use crate::store::{delivery_dedup_key, unix_millis, OutboxRecord, Store, StoreError, Stored};
use crate::telemetry::{FinishedSpan, Spans};
use crate::trace::TraceContext;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

/// The webhook path the platform posts to (the default source's).
pub const WEBHOOK_PATH: &str = "/webhooks/kallina";
/// Every source's path: `/webhooks/<segment>` (the route named in traces).
const SOURCE_PATH: &str = "/webhooks/{source}";
/// Header names looked up on every request, parsed once here rather than at each lookup.
const SIGNATURE: HeaderName = HeaderName::from_static(signature::HEADER);
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// Longest delivery id accepted as a dedup key.
const MAX_ID_LEN: usize = 200;
/// How long a sender should wait before retrying when the outbox is full (broker away).
const RETRY_AFTER_FULL: u32 = 30;
/// … and when the disk failed or the process is stopping (a restart or recovery is quick).
const RETRY_AFTER_BRIEF: u32 = 5;

/// What the webhook handler needs, shared by every worker.
pub struct Ingress {
    /// By their path ([`Source::path`]), which is also their route.
    sources: HashMap<String, Served>,
    pub max_body: usize,
    pub body_timeout: Duration,
    pub future_skew: Duration,
    /// Parsed once: a name given as `&str` is parsed again at every lookup (perf, README).
    id_header: Option<HeaderName>,
    /// Bytes of request bodies held at once, across every connection.
    pub budget: BodyBudget,
    pub store: Store,
    pub metrics: Metrics,
    /// Where the receive and store spans go (nowhere unless OTLP is set).
    spans: Spans,
    /// Fired when shutdown begins: new requests get 503 while in-flight ones finish.
    pub shutdown: Shutdown,
}

/// A source as the handler serves it, with its metrics resolved once.
struct Served {
    source: Source,
    /// `kallina_relay_signature_matches_total{source, secret}`, one per secret.
    signature_matches: Vec<PerThread<prometheus::IntCounter>>,
    /// `kallina_relay_webhooks_total{source, event, outcome}` of the two 2xx outcomes
    /// (`accepted`, `duplicate`), by event label (see [`EVENT_LABELS`]; never `none`: a 2xx
    /// answer has read its envelope). Resolved once: looking the labels up took ≈ 1.4 % of the
    /// relay's CPU answering duplicates (perf, README). Their zeros show from the start.
    answered: Vec<[PerThread<prometheus::IntCounter>; 2]>,
    /// Requests of this source verified lately, whose retries are not verified again.
    retries: Retries,
}

impl Ingress {
    pub fn new(
        options: &IngressOptions,
        store: Store,
        metrics: Metrics,
        spans: Spans,
        shutdown: Shutdown,
    ) -> Self {
        let sources = options
            .sources
            .iter()
            .map(|source| {
                let signature_matches = (0..source.secrets.len())
                    .map(|i| {
                        metrics
                            .signature_matches
                            .map(|c| c.with_label_values(&[&source.name, &i.to_string()]))
                    })
                    .collect();
                let answered = EVENT_LABELS
                    .iter()
                    .filter(|event| **event != "none")
                    .map(|event| {
                        ["accepted", "duplicate"].map(|outcome| {
                            metrics.webhooks.map(|c| {
                                c.with_label_values(&[source.name.as_str(), event, outcome])
                            })
                        })
                    })
                    .collect();
                let served = Served {
                    source: source.clone(),
                    signature_matches,
                    answered,
                    retries: Retries::default(),
                };
                (source.path(), served)
            })
            .collect();
        Self {
            sources,
            max_body: options.max_body,
            body_timeout: options.body_timeout,
            future_skew: options.future_skew,
            // A name that does not parse is in no request, as before.
            id_header: options
                .id_header
                .as_deref()
                .and_then(|name| HeaderName::from_str(name).ok()),
            budget: BodyBudget::new(options.max_inflight_body),
            spans,
            store,
            metrics,
            shutdown,
        }
    }
}

impl Ingress {
    /// Routes of the public listener: one static path per source. Not one resource on
    /// `/webhooks/{source}`: actix-router matches a dynamic segment with a regex, and that
    /// took ≈ 5 % of the relay's CPU answering duplicates (perf).
    pub fn routes(&self, cfg: &mut web::ServiceConfig) {
        for path in self.sources.keys() {
            cfg.service(
                web::resource(path.as_str())
                    .route(web::post().to(receive))
                    .default_service(web::to(
                        |req: HttpRequest, ingress: web::Data<Ingress>| async move {
                            answer_error(&req, &ingress, IngressError::MethodNotAllowed)
                        },
                    )),
            );
        }
        cfg.default_service(web::to(
            |req: HttpRequest, ingress: web::Data<Ingress>| async move {
                answer_error(&req, &ingress, IngressError::NotFound)
            },
        ));
    }

    /// The source whose path the request was posted to.
    fn source_of(&self, req: &HttpRequest) -> Option<&Served> {
        self.sources.get(req.match_info().as_str())
    }
}

/// An answer before any source is known: the `source` label is `none`, as the `event` one.
fn answer_error(req: &HttpRequest, ingress: &Ingress, error: IngressError) -> HttpResponse {
    let source = ingress
        .source_of(req)
        .map_or("none", |s| s.source.name.as_str());
    ingress
        .metrics
        .webhooks
        .local()
        .with_label_values(&[source, "none", error.code()])
        .inc();
    let request_id = request_id::choose(req.headers());
    with_request_id(respond(&error, id_str(&request_id)), request_id)
}

/// Every answer of the public listener carries its `X-Request-Id`, set here rather than by a
/// middleware: the `from_fn` layer boxed a future and cloned an `Rc` per request (perf, README).
fn with_request_id(mut response: HttpResponse, id: HeaderValue) -> HttpResponse {
    response.headers_mut().insert(request_id::HEADER, id);
    response
}

fn id_str(id: &HeaderValue) -> &str {
    // Chosen ids are printable ASCII (see `request_id::choose`).
    id.to_str().unwrap_or_default()
}

/// The content type of a 2xx answer, set before `json` so that it does not spell it from a
/// `mime` at every request.
const JSON: (HeaderName, HeaderValue) =
    (CONTENT_TYPE, HeaderValue::from_static("application/json"));

/// The body of a 2xx answer: `{"status":"accepted","id":"<key>"}`.
#[derive(serde::Serialize)]
struct Answer<'a> {
    status: &'static str,
    id: &'a str,
}

/// [`Answer`] spelt directly: a key is hex digits after an optional source name (letters,
/// digits, `-`, `_`) and `:`, with nothing JSON would escape. serde's escaping scan of it was
/// ≈ 0.6 % of the relay's CPU answering duplicates (perf, README). Anything else goes through
/// serde.
fn answer_body(status: &'static str, key: &str) -> String {
    let plain = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':'))
    };
    if !(plain(status) && plain(key)) {
        return serde_json::to_string(&Answer { status, id: key }).unwrap_or_default();
    }
    let mut body = String::with_capacity(status.len() + key.len() + 24);
    for part in [r#"{"status":""#, status, r#"","id":""#, key, r#""}"#] {
        body.push_str(part);
    }
    body
}

/// The event as it came in and was checked, before the store.
struct Verified {
    /// What verifying the request found (or an earlier request of the same bytes did).
    verification: Verification,
    /// The delivery-id header's value, where configured and present: a second dedup key.
    delivery_id: Option<String>,
}

async fn receive(req: HttpRequest, payload: web::Payload) -> HttpResponse {
    let started = Instant::now();
    let request_id = request_id::choose(req.headers());
    // Borrowed, not extracted: the `Data` extractor clones an `Arc` that every worker shares,
    // two writes to one cache line per request from both cores (perf, README).
    let Some(ingress) = req.app_data::<web::Data<Ingress>>() else {
        return with_request_id(HttpResponse::InternalServerError().finish(), request_id);
    };
    let Some(served) = ingress.source_of(&req) else {
        // Before the body is read: nobody is expected at this path.
        connection::stop_reading(&req);
        return answer_error(&req, ingress, IngressError::NotFound);
    };
    // Every log line of the request carries its request and trace ids.
    let span = tracing::info_span!(
        "webhook",
        request_id = tracing::field::Empty,
        trace_id = tracing::field::Empty
    );
    // The trace context is made here only if a span is recorded (a log line's or an exported
    // one); a new event's record makes it otherwise. Two random ids spelt in hex for every
    // retry that nothing reads were ≈ 1 % of the relay's CPU answering duplicates (perf).
    let trace = (!span.is_disabled() || ingress.spans.enabled()).then(|| trace_of(&req));
    if !span.is_disabled() {
        span.record("request_id", id_str(&request_id));
        if let Some(trace) = &trace {
            span.record("trace_id", trace.trace_id.as_str());
        }
    }
    let response = receive_in(&req, payload, ingress, served, &request_id, trace, started)
        .instrument(span)
        .await;
    with_request_id(response, request_id)
}

async fn receive_in(
    req: &HttpRequest,
    payload: web::Payload,
    ingress: &Ingress,
    served: &Served,
    request_id: &HeaderValue,
    trace: Option<TraceContext>,
    started: Instant,
) -> HttpResponse {
    let received_at = SystemTime::now();
    let reading = body::read(req, payload, ingress.max_body, &ingress.budget);
    let body = within_deadline(reading, started, ingress.body_timeout).await;
    // What the body holds of the budget is given back once the request is answered.
    let (Handled { event, result }, _held) = match body {
        Ok((body, held)) => (
            handle(req, body, received_at, served, trace.as_ref(), ingress).await,
            held,
        ),
        Err(e) => (Handled::refused(None, e), Held::default()),
    };
    let response = match &result {
        Ok(Taken {
            stored: Stored::New,
            key,
        }) => HttpResponse::Accepted()
            .insert_header(JSON)
            .body(answer_body("accepted", key)),
        Ok(Taken {
            stored: Stored::Duplicate,
            key,
        }) => HttpResponse::Ok()
            .insert_header(JSON)
            .body(answer_body("duplicate", key)),
        Err(e) => {
            if matches!(
                e,
                IngressError::PayloadTooLarge { .. }
                    | IngressError::RequestTimeout { .. }
                    | IngressError::BodyBudgetFull { .. }
            ) {
                connection::stop_reading(req);
            }
            respond(e, id_str(request_id))
        }
    };
    let outcome = match &result {
        Ok(Taken {
            stored: Stored::New,
            ..
        }) => "accepted",
        Ok(Taken {
            stored: Stored::Duplicate,
            ..
        }) => "duplicate",
        Err(e) => e.code(),
    };
    let metrics = &ingress.metrics;
    let event_index = event_label_index(event.as_deref());
    match (&result, served.answered.get(event_index)) {
        (Ok(taken), Some([accepted, duplicate])) => match taken.stored {
            Stored::New => accepted.local().inc(),
            Stored::Duplicate => duplicate.local().inc(),
        },
        _ => metrics
            .webhooks
            .local()
            .with_label_values(&[&served.source.name, EVENT_LABELS[event_index], outcome])
            .inc(),
    }
    metrics
        .request_duration
        .local()
        .observe(started.elapsed().as_secs_f64());
    if let (true, Some(trace)) = (ingress.spans.enabled(), &trace) {
        export_receive_span(
            ingress,
            served,
            trace,
            received_at,
            event.as_deref(),
            &result,
        );
    }
    // Refusals of bad input stay at debug: on a public port they are the internet's noise, and
    // the metrics count them. Our own failures (5xx) are worth a warning.
    match &result {
        Err(e) if e.status().is_server_error() => {
            tracing::warn!(code = e.code(), "webhook not stored")
        }
        Err(e) => tracing::debug!(code = e.code(), "webhook refused"),
        Ok(_) => {}
    }
    response
}

/// Reads the body within `timeout` of `started` (the request's start, so that no clock is read
/// again), arming a timer only for a body that is not complete by the handler's second poll.
///
/// **Why two polls.** actix-http polls a handler once as it calls it, before it has passed on
/// the rest of what it read with the head, and again right after, in the same turn (its h1
/// dispatcher's `handle_request`, then `poll_response`). A body that came with its head, as an
/// event of a few KB does, is complete at the second poll and needs no deadline; arming and
/// clearing a timer for every request was ≈ 1 % of the relay's CPU answering duplicates (perf,
/// README). The deadline still counts from the start. If a later actix stopped polling twice,
/// a body that never comes would wait for more bytes: the test of a head with no body
/// (`a_head_whose_body_never_comes_is_cut_off`) is there to catch that.
async fn within_deadline<T>(
    reading: impl Future<Output = Result<T, IngressError>>,
    started: Instant,
    timeout: Duration,
) -> Result<T, IngressError> {
    let deadline = tokio::time::Instant::from_std(started).checked_add(timeout);
    let mut reading = std::pin::pin!(reading);
    let mut timer = None;
    let mut polls = 0;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(body) = reading.as_mut().poll(cx) {
            return Poll::Ready(body);
        }
        polls += 1;
        // No deadline past the end of time (a setting with no upper bound): no timer.
        let (2.., Some(deadline)) = (polls, deadline) else {
            return Poll::Pending;
        };
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().poll(cx).map(|()| {
            Err(IngressError::RequestTimeout {
                seconds: timeout.as_secs(),
            })
        })
    })
    .await
}

/// The request's span: a server span, a child of the caller's when it sent a `traceparent`.
fn export_receive_span(
    ingress: &Ingress,
    served: &Served,
    trace: &TraceContext,
    start: SystemTime,
    event: Option<&str>,
    result: &Result<Taken, IngressError>,
) {
    let (status, outcome) = match result {
        Ok(Taken {
            stored: Stored::New,
            ..
        }) => (202, "accepted"),
        Ok(Taken {
            stored: Stored::Duplicate,
            ..
        }) => (200, "duplicate"),
        Err(e) => (e.status().as_u16(), e.code()),
    };
    let mut attributes = vec![
        KeyValue::new("http.request.method", "POST"),
        KeyValue::new("http.route", SOURCE_PATH),
        KeyValue::new("http.response.status_code", i64::from(status)),
        KeyValue::new("kallina.source", served.source.name.clone()),
        KeyValue::new("kallina.outcome", outcome),
    ];
    if let Some(event) = event {
        attributes.push(KeyValue::new("kallina.event", event.to_string()));
    }
    if let Ok(taken) = result {
        attributes.push(KeyValue::new("messaging.message.id", taken.key.clone()));
    }
    ingress.spans.export(FinishedSpan {
        name: "receive",
        kind: SpanKind::Server,
        context: trace,
        start,
        end: SystemTime::now(),
        attributes,
        error: (status >= 500).then(|| outcome.to_string()),
    });
}

/// What became of one request: the event type once the envelope was read (the metrics'
/// label), and the outcome.
struct Handled {
    event: Option<String>,
    result: Result<Taken, IngressError>,
}

/// An event the store took, how, under which dedup key.
struct Taken {
    stored: Stored,
    key: String,
}

impl Handled {
    fn refused(event: Option<String>, error: IngressError) -> Self {
        Self {
            event,
            result: Err(error),
        }
    }
}

/// Everything after the body is read.
async fn handle(
    req: &HttpRequest,
    body: Vec<u8>,
    received_at: SystemTime,
    served: &Served,
    trace: Option<&TraceContext>,
    ingress: &Ingress,
) -> Handled {
    let verified = match verify(req, &body, received_at, served, ingress) {
        Ok(v) => v,
        Err((event, e)) => return Handled::refused(event, e),
    };
    let Verified {
        verification:
            Verification {
                event,
                timestamp,
                key,
                ..
            },
        delivery_id,
    } = verified;
    let age = received_at
        .duration_since(SystemTime::from(timestamp))
        .unwrap_or_default();
    ingress.metrics.event_age.local().observe(age.as_secs_f64());

    if ingress.shutdown.is_triggered() {
        let e = unavailable("the service is shutting down".into(), RETRY_AFTER_BRIEF);
        return Handled::refused(Some(event), e);
    }
    // A platform retry of something already on disk: answered before any copy is made.
    // The keys as borrowed strings: no copy for the lookup most retries end with.
    let delivery_key = delivery_id
        .as_deref()
        .map(|id| delivery_dedup_key(&key, id));
    let durable_duplicate = match &delivery_key {
        Some(delivery_key) => ingress.store.is_durable_duplicate(&[&key, delivery_key]),
        None => ingress.store.is_durable_duplicate(&[&key]),
    };
    match durable_duplicate {
        Ok(true) => {
            return Handled {
                event: Some(event),
                result: Ok(Taken {
                    stored: Stored::Duplicate,
                    key,
                }),
            }
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(error = %e, "store lookup failed");
            let e = unavailable("the event store cannot be read".into(), RETRY_AFTER_BRIEF);
            return Handled::refused(Some(event), e);
        }
    }
    // The request's trace, if its span made one, so that what the event's spans and logs name
    // is one trace.
    let trace = trace.cloned().unwrap_or_else(|| trace_of(req));
    let record = OutboxRecord {
        key,
        event: event.clone(),
        signature: header_str(req, &SIGNATURE).unwrap_or_default().to_string(),
        received_at_ms: unix_millis(received_at),
        source: served.source.name.clone(),
        // The buffer the body was read into, moved: no copy.
        body,
        redelivered: false,
        attempts_before: 0,
        delivery_id,
        trace: Some(trace.clone()),
    };
    let commit_started = Instant::now();
    let commit_start_time = SystemTime::now();
    let key = record.key.clone();
    let stored = ingress.store.accept(record).await;
    ingress
        .metrics
        .store_commit_duration
        .local()
        .observe(commit_started.elapsed().as_secs_f64());
    if ingress.spans.enabled() {
        ingress.spans.export(FinishedSpan {
            name: "store",
            kind: SpanKind::Internal,
            context: &trace.child(),
            start: commit_start_time,
            end: SystemTime::now(),
            attributes: vec![KeyValue::new("messaging.message.id", key.clone())],
            error: stored.as_ref().err().map(|e| e.to_string()),
        });
    }
    let result = match stored {
        Ok(stored) => Ok(Taken { stored, key }),
        Err(StoreError::Full { capacity }) => Err(unavailable(
            format!("the outbox is full ({capacity} events wait for the broker)"),
            RETRY_AFTER_FULL,
        )),
        Err(e) => {
            tracing::error!(error = %e, "store refused an event");
            Err(unavailable(
                "the event store cannot write".into(),
                RETRY_AFTER_BRIEF,
            ))
        }
    };
    Handled {
        event: Some(event),
        result,
    }
}

/// The checks of the contract, in its order, on a body already read within the size limit.
#[allow(clippy::result_large_err)]
fn verify(
    req: &HttpRequest,
    body: &[u8],
    received_at: SystemTime,
    served: &Served,
    ingress: &Ingress,
) -> Result<Verified, (Option<String>, IngressError)> {
    let fail = |e| (None, e);
    if let Some(encoding) = req.headers().get(CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if encoding != "identity" {
            return Err(fail(IngressError::UnsupportedEncoding { encoding }));
        }
    }
    let mut signature_headers = req.headers().get_all(SIGNATURE);
    // Two signature headers are ambiguous (which one did the platform send?): refuse them.
    let header = match (signature_headers.next(), signature_headers.next()) {
        (None, _) => None,
        (Some(one), None) => Some(one.as_bytes()),
        _ => {
            return Err(fail(IngressError::Signature(
                signature::SignatureError::Malformed,
            )))
        }
    };
    let digest = header
        .ok_or(signature::SignatureError::Missing)
        .and_then(signature::parse_header)
        .map_err(|e| fail(IngressError::Signature(e)))?;
    // A retry of a request verified lately: what the signature covers was verified then.
    let (verification, remembered) = match served.retries.get(&digest, body) {
        Some(verification) => (verification, true),
        None => {
            let secret_index = signature::verify_digest(&served.source.secrets, &digest, body)
                .map_err(|e| fail(IngressError::Signature(e)))?;
            let envelope =
                parse_envelope(body).map_err(|e| fail(IngressError::InvalidPayload(e)))?;
            let verification = Verification {
                secret_index,
                event: envelope.event.into_owned(),
                timestamp: envelope.timestamp,
                key: served
                    .source
                    .key(&signature::lower_hex(&Sha256::digest(body))),
            };
            (verification, false)
        }
    };
    served.signature_matches[verification.secret_index]
        .local()
        .inc();

    let event = || Some(verification.event.clone());
    let delivery_id = delivery_id(req, ingress.id_header.as_ref())
        .map_err(|e| (event(), IngressError::InvalidPayload(e)))?;
    check_window(
        verification.timestamp,
        received_at,
        served.source.tolerance,
        ingress.future_skew,
    )
    .map_err(|e| (event(), e))?;
    if !remembered {
        served.retries.remember(&digest, body, verification.clone());
    }
    Ok(Verified {
        verification,
        delivery_id,
    })
}

fn check_window(
    timestamp: OffsetDateTime,
    received_at: SystemTime,
    tolerance: Duration,
    future_skew: Duration,
) -> Result<(), IngressError> {
    let received = OffsetDateTime::from(received_at);
    // The settings put no upper bound on either duration, and `OffsetDateTime` ends at ±9999
    // years: a window reaching past that has no edge on that side (plain `-`/`+` would panic
    // on every request).
    let edge = |by: Duration, later: bool| {
        let by = time::Duration::try_from(by).ok()?;
        if later {
            received.checked_add(by)
        } else {
            received.checked_sub(by)
        }
    };
    let too_old = edge(tolerance, false).is_some_and(|earliest| timestamp < earliest);
    let too_new = edge(future_skew, true).is_some_and(|latest| timestamp > latest);
    if !(too_old || too_new) {
        return Ok(());
    }
    let format = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    Err(IngressError::TimestampOutOfTolerance {
        details: json!({
            "timestamp": format(timestamp),
            "received_at": format(received),
            "reason": if too_old { "too_old" } else { "in_the_future" },
            "tolerance_seconds": tolerance.as_secs(),
            "future_skew_seconds": future_skew.as_secs(),
        }),
    })
}

/// The delivery-id header's value, where configured and present. It is a second dedup key, never
/// the only one: the signature does not cover it, so a replay with a new id (or none) must still
/// be recognised by its body.
fn delivery_id(
    req: &HttpRequest,
    id_header: Option<&HeaderName>,
) -> Result<Option<String>, PayloadError> {
    let Some(value) = id_header.and_then(|name| req.headers().get(name)) else {
        return Ok(None);
    };
    let value = value.as_bytes();
    let printable = value.iter().all(|b| (0x20..0x7f).contains(b));
    if value.is_empty() || value.len() > MAX_ID_LEN || !printable {
        return Err(PayloadError {
            field: "id_header",
            reason: format!(
                "the `{}` header must be 1 to {MAX_ID_LEN} printable ASCII characters",
                id_header.map_or("", HeaderName::as_str)
            ),
        });
    }
    Ok(Some(String::from_utf8_lossy(value).into_owned()))
}

/// The request's trace context: its `traceparent` continued, or a new trace. Several
/// `tracestate` headers are one list, joined with commas.
fn trace_of(req: &HttpRequest) -> TraceContext {
    let state: Vec<&str> = req
        .headers()
        .get_all(TRACESTATE)
        .filter_map(|v| v.to_str().ok())
        .collect();
    let state = (!state.is_empty()).then(|| state.join(","));
    TraceContext::of_request(header_str(req, &TRACEPARENT), state.as_deref())
}

fn header_str<'r>(req: &'r HttpRequest, name: &HeaderName) -> Option<&'r str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

fn unavailable(reason: String, retry_after_seconds: u32) -> IngressError {
    IngressError::Unavailable {
        reason,
        retry_after_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod dedup_key_properties {
        use super::*;
        use actix_web::http::header::HeaderValue;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the header holds, the delivery id is refused or its key fits the store:
            /// the id at most MAX_ID_LEN printable bytes, its key with the prefix at most 255
            /// (the store's key lists prefix each key with one byte of length).
            #[test]
            fn any_delivery_id_gives_a_key_that_fits_or_a_refusal(
                header in proptest::collection::vec(any::<u8>(), 0..300),
            ) {
                let mut req = actix_web::test::TestRequest::default();
                if let Ok(value) = HeaderValue::from_bytes(&header) {
                    req = req.insert_header(("x-delivery", value));
                }
                let req = req.to_http_request();
                match delivery_id(&req, Some(&HeaderName::from_static("x-delivery"))) {
                    Ok(Some(id)) => {
                        prop_assert!(!id.is_empty() && id.len() <= MAX_ID_LEN);
                        prop_assert!(id.bytes().all(|b| (0x20..0x7f).contains(&b)));
                        let keys = crate::store::dedup_keys(&"0".repeat(64), Some(&id));
                        prop_assert!(keys.iter().all(|k| k.len() <= 255));
                    }
                    Ok(None) => prop_assert!(HeaderValue::from_bytes(&header).is_err()),
                    Err(e) => prop_assert_eq!(e.field, "id_header"),
                }
                prop_assert_eq!(delivery_id(&req, None).unwrap(), None);
            }
        }
    }

    #[test]
    fn an_answer_spelt_directly_is_what_serde_would_spell() {
        for key in ["ab".repeat(32), format!("staging_1-b:{}", "0".repeat(64))] {
            for status in ["accepted", "duplicate"] {
                let direct: serde_json::Value =
                    serde_json::from_str(&answer_body(status, &key)).unwrap();
                assert_eq!(direct, json!({"status": status, "id": key}));
            }
        }
        // Anything JSON would escape takes serde's way.
        let odd = "a\"b\\c";
        let answer: serde_json::Value =
            serde_json::from_str(&answer_body("accepted", odd)).unwrap();
        assert_eq!(answer["id"], odd);
    }

    #[test]
    fn a_window_wider_than_the_calendar_has_no_edge_there_instead_of_a_panic() {
        let now = SystemTime::now();
        let received = OffsetDateTime::from(now);
        let day = Duration::from_secs(86_400);
        let skew = Duration::from_secs(300);
        let max = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MIDNIGHT);
        let min = OffsetDateTime::new_utc(time::Date::MIN, time::Time::MIDNIGHT);
        for wide in [
            Duration::MAX,
            Duration::from_secs(u64::MAX),
            20_000 * 366 * day,
        ] {
            assert!(check_window(received, now, wide, wide).is_ok());
            assert!(check_window(min, now, wide, skew).is_ok());
            assert!(check_window(max, now, day, wide).is_ok());
            // The side with an ordinary setting still has its edge.
            assert!(check_window(received - 2 * day, now, day, wide).is_err());
            assert!(check_window(received + day, now, wide, skew).is_err());
        }
    }
}
