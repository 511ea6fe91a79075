//! The whole request path: bytes → request → the real ingress app (request-id middleware,
//! `ingress::routes`, a sled store in a temporary directory) → response.
//!
//! Every answer must be one of the README's, in the platform's error shape or the success
//! shape, and it must be the answer the README's table predicts for that request, in the order
//! the table lists the checks. Above all: nothing without a valid signature is ever answered
//! 2xx.
//!
//! Input layout (so that seeds are a readable header plus a fixture body):
//!
//! ```text
//! byte 0     method: POST, GET, PUT, DELETE, HEAD, OPTIONS, PATCH, PROPFIND (mod 8)
//! byte 1     path: webhook, webhook?query, webhook/, /, upper-case webhook, extras (mod 6)
//! byte 2     X-Kallina-Signature: valid (secret 0), valid (secret 1, a rotation), valid in
//!            upper case, absent, valid with one bit flipped (bit = byte 3), signed with an
//!            unknown secret, two valid headers, extras (mod 8)
//! byte 3     the bit to flip
//! byte 4     timestamp: as in the body, or rewritten to now + offset in seconds, minutes or
//!            hours (mod 4), so that the window check and the store are reached
//! bytes 5-6  the offset, i16 little-endian
//! byte 7     Content-Encoding: none, identity, " IDENTITY ", gzip, extras (mod 5)
//! byte 8     X-Kallina-Delivery: none, a fixed id, extras, none (mod 4)
//! byte 9     X-Request-Id: none, a sane one, extras (mod 3)
//! byte 10    bit 0: Content-Length from extras; bit 1: the service is shutting down
//! byte 11    length of the extras
//! extras     newline-separated: signature, path, encoding, delivery id, request id, length
//! the rest   the body
//! ```

#![no_main]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::str::FromStr;

use actix_http::Request;
use actix_service::boxed::{self, BoxService};
use actix_service::{Service, ServiceExt};
use actix_web::body::BoxBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use actix_web::http::{Method, Uri};
use actix_web::middleware::from_fn;
use actix_web::rt::{System, SystemRunner};
use actix_web::{test, web, App};
use kallina_relay::config::{Layers, Secret};
use kallina_relay::settings::Settings;
use kallina_relay::http::assign_request_id;
use kallina_relay::ingress::{self, parse_envelope, Ingress, WEBHOOK_PATH};
use kallina_relay::metrics::Metrics;
use kallina_relay::shutdown;
use kallina_relay::signature::{self, SignatureError};
use kallina_relay::store::{Store, StoreOptions};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const SECRETS: [&str; 2] = ["fuzz-secret-new", "fuzz-secret-old"];
const DELIVERY_HEADER: &str = "x-kallina-delivery";
/// Small, so that the fuzzer reaches 413 and, once this many events are stored, 503.
const MAX_BODY: usize = 4096;
const OUTBOX_MAX: u64 = 2000;
const TOLERANCE_SECS: i64 = 24 * 3600;
const FUTURE_SKEW_SECS: i64 = 300;
/// Offsets this close to an edge of the window may fall either side of it (the handler reads
/// the clock a moment after this harness does).
const CLOCK_SLACK_SECS: i64 = 2;
const HEAD_LEN: usize = 12;

/// The app and its state, built once per process. actix's services are `!Send` (they hold
/// `Rc`s), so the runtime and the service live in a thread-local rather than a `OnceLock`:
/// libFuzzer calls the target from one thread.
type FuzzApp = BoxService<Request, ServiceResponse<BoxBody>, actix_web::Error>;

struct Harness {
    runner: SystemRunner,
    app: FuzzApp,
    /// The same app over the same store, with its shutdown fired (a signal fires only once).
    stopping_app: FuzzApp,
    secrets: Vec<Secret>,
    /// Dedup keys of the events answered 202 so far: the store's expected content.
    stored: RefCell<HashSet<String>>,
    /// Events answered 202 so far (each has one or two keys in `stored`).
    accepted: Cell<u64>,
    /// `KALLINA_FUZZ_REPORT=1`: one line per answer on stderr, to see which answers a corpus
    /// reaches (`-runs=0` over it, then `grep ^outcome | sort | uniq -c`).
    report: bool,
}

impl Harness {
    fn new() -> Self {
        // Kept, not deleted: libFuzzer leaves through `exit()`, which runs no destructor.
        // scripts/fuzz.sh points TMPDIR at a directory it removes afterwards.
        let dir: PathBuf = tempfile::Builder::new()
            .prefix("kallina-relay-fuzz.")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let env: BTreeMap<String, String> = [
            ("KALLINA_WEBHOOK_SECRET", SECRETS.join(",")),
            ("KALLINA_RELAY_DATA_DIR", dir.display().to_string()),
            ("KALLINA_RELAY_MAX_BODY", MAX_BODY.to_string()),
            ("KALLINA_RELAY_ID_HEADER", "X-Kallina-Delivery".into()),
            ("KALLINA_RELAY_OUTBOX_MAX", OUTBOX_MAX.to_string()),
            ("KALLINA_RELAY_CACHE_SIZE", "1MiB".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let settings = Settings::load(&Layers {
            env,
            ..Layers::default()
        })
        .expect("the harness's settings are valid");
        assert_eq!(settings.ingress.max_body, MAX_BODY);
        assert_eq!(settings.ingress.tolerance.as_secs() as i64, TOLERANCE_SECS);
        assert_eq!(settings.ingress.future_skew.as_secs() as i64, FUTURE_SKEW_SECS);

        let runner = System::new();
        let store = Store::open(&StoreOptions {
            archive_retention: std::time::Duration::ZERO,
            ..settings.store.clone()
        })
        .expect("the store opens in a fresh directory");
        let metrics = Metrics::new();
        let build = |stopping: bool| {
            let (trigger, signal) = shutdown::channel();
            if stopping {
                trigger.trigger();
            }
            let state = web::Data::new(Ingress::new(
                &settings.ingress,
                store.clone(),
                metrics.clone(),
                signal,
            ));
            // As startup.rs builds the public listener's app.
            let app = runner.block_on(test::init_service(
                App::new()
                    .wrap(from_fn(assign_request_id))
                    .app_data(state)
                    .configure(ingress::routes),
            ));
            boxed::service(app.map(ServiceResponse::map_into_boxed_body))
        };
        let (app, stopping_app) = (build(false), build(true));
        Self {
            runner,
            app,
            stopping_app,
            secrets: settings.ingress.secrets.clone(),
            stored: RefCell::new(HashSet::new()),
            accepted: Cell::new(0),
            report: std::env::var_os("KALLINA_FUZZ_REPORT").is_some(),
        }
    }
}

thread_local! {
    // Leaked: dropped at exit, actix's request pool would reach for a thread-local that is
    // already gone, and panic.
    static HARNESS: &'static Harness = Box::leak(Box::new(Harness::new()));
}

/// A request as the input describes it, plus what the harness knows about how it was made.
struct Case {
    method: Method,
    path: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
    /// How the signature header was made: to verify, to fail, or from the fuzzer's bytes.
    signature: SignatureIntent,
    /// Seconds from now, when the harness wrote the timestamp.
    timestamp_offset: Option<i64>,
    shutting_down: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum SignatureIntent {
    Valid(usize),
    Invalid,
    Unknown,
}

fn decode(data: &[u8]) -> Option<Case> {
    let (head, rest) = data.split_at_checked(HEAD_LEN)?;
    let extras_len = usize::from(head[11]).min(rest.len());
    let (extras, body) = rest.split_at(extras_len);
    let mut extras = extras.split(|b| *b == b'\n');
    let mut extra = || extras.next().unwrap_or_default();
    let (raw_signature, raw_path, raw_encoding, raw_delivery, raw_request_id, raw_length) =
        (extra(), extra(), extra(), extra(), extra(), extra());

    let method = match head[0] % 8 {
        0 => Method::POST,
        1 => Method::GET,
        2 => Method::PUT,
        3 => Method::DELETE,
        4 => Method::HEAD,
        5 => Method::OPTIONS,
        6 => Method::PATCH,
        _ => Method::from_bytes(b"PROPFIND").unwrap(),
    };
    let path = match head[1] % 6 {
        0 => WEBHOOK_PATH.to_string(),
        1 => format!("{WEBHOOK_PATH}?source=fuzz"),
        2 => format!("{WEBHOOK_PATH}/"),
        3 => "/".to_string(),
        4 => WEBHOOK_PATH.to_ascii_uppercase(),
        _ => String::from_utf8_lossy(raw_path).into_owned(),
    };
    // TestRequest::uri panics on what is not a URI; no HTTP request line could carry one.
    let path = match Uri::from_str(&path) {
        Ok(uri) if uri.scheme().is_none() && path.starts_with('/') => path,
        _ => "/".to_string(),
    };

    let mut body = body.to_vec();
    let timestamp_offset = match head[4] % 4 {
        0 => None,
        scale => {
            let offset = i64::from(i16::from_le_bytes([head[5], head[6]]))
                * [1, 60, 3600][scale as usize - 1];
            let at = OffsetDateTime::now_utc() + time::Duration::seconds(offset);
            let written = at.format(&Rfc3339).expect("now ± 4 years is RFC 3339");
            match set_timestamp(&body, &written) {
                Some(rewritten) => {
                    body = rewritten;
                    Some(offset)
                }
                None => None,
            }
        }
    };

    let mut headers = Vec::new();
    let mut header = |name: &str, value: &[u8]| {
        // What no HTTP/1.1 parser would pass on is not a request the app can see.
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.push((HeaderName::from_str(name).unwrap(), value));
        }
    };
    let sign = |secret: &str| signature::sign(secret.as_bytes(), &body);
    let signature_intent = match head[2] % 8 {
        0 => {
            header(signature::HEADER, sign(SECRETS[0]).as_bytes());
            SignatureIntent::Valid(0)
        }
        1 => {
            header(signature::HEADER, sign(SECRETS[1]).as_bytes());
            SignatureIntent::Valid(1)
        }
        2 => {
            let valid = sign(SECRETS[0]);
            let upper = format!("sha256={}", valid[7..].to_ascii_uppercase());
            header(signature::HEADER, upper.as_bytes());
            SignatureIntent::Valid(0)
        }
        3 => SignatureIntent::Invalid,
        4 => {
            let valid = sign(SECRETS[0]);
            let mut digest = signature::parse_header(valid.as_bytes()).unwrap();
            let bit = usize::from(head[3]);
            digest[bit / 8] ^= 1 << (bit % 8);
            header(
                signature::HEADER,
                format!("sha256={}", hex::encode(digest)).as_bytes(),
            );
            SignatureIntent::Invalid
        }
        5 => {
            header(
                signature::HEADER,
                sign("not-a-configured-secret").as_bytes(),
            );
            SignatureIntent::Invalid
        }
        6 => {
            header(signature::HEADER, sign(SECRETS[0]).as_bytes());
            header(signature::HEADER, sign(SECRETS[0]).as_bytes());
            SignatureIntent::Invalid
        }
        _ => {
            header(signature::HEADER, raw_signature);
            SignatureIntent::Unknown
        }
    };
    match head[7] % 5 {
        0 => {}
        1 => header("content-encoding", b"identity"),
        2 => header("content-encoding", b" IDENTITY "),
        3 => header("content-encoding", b"gzip"),
        _ => header("content-encoding", raw_encoding),
    }
    match head[8] % 4 {
        1 => header(DELIVERY_HEADER, b"dlv-fixed"),
        2 => header(DELIVERY_HEADER, raw_delivery),
        _ => {}
    }
    match head[9] % 3 {
        0 => {}
        1 => header("x-request-id", b"req-fuzz:1.a_b"),
        _ => header("x-request-id", raw_request_id),
    }
    if head[10] & 1 != 0 {
        header(CONTENT_LENGTH.as_str(), raw_length);
    }
    Some(Case {
        method,
        path,
        headers,
        body,
        signature: signature_intent,
        timestamp_offset,
        shutting_down: head[10] & 2 != 0,
    })
}

/// Rewrites the value of the first `"timestamp": "…"` in the body.
fn set_timestamp(body: &[u8], value: &str) -> Option<Vec<u8>> {
    let key = b"\"timestamp\"";
    let mut i = body.windows(key.len()).position(|w| w == key)? + key.len();
    let skip_space = |i: &mut usize| {
        while matches!(body.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            *i += 1;
        }
    };
    skip_space(&mut i);
    (body.get(i) == Some(&b':')).then_some(())?;
    i += 1;
    skip_space(&mut i);
    (body.get(i) == Some(&b'"')).then_some(())?;
    let start = i + 1;
    let mut end = start;
    loop {
        match body.get(end)? {
            b'\\' => end += 2,
            b'"' => break,
            _ => end += 1,
        }
    }
    let mut out = body[..start].to_vec();
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// What the README's table says the answer is.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// An error: status, `error.code`, and the detail that names why (key, value).
    Error(u16, &'static str, Option<(&'static str, String)>),
    /// Reached the store with these dedup keys, the first (the body's hash) its id: 202, 200 or
    /// 503, by what was stored before. An answer carries only the id.
    Store(Vec<String>),
}

fn error(status: u16, code: &'static str) -> Outcome {
    Outcome::Error(status, code, None)
}

fn error_with(status: u16, code: &'static str, key: &'static str, value: &str) -> Outcome {
    Outcome::Error(status, code, Some((key, value.to_string())))
}

fn header_values<'c>(case: &'c Case, name: &str) -> Vec<&'c HeaderValue> {
    case.headers
        .iter()
        .filter(|(n, _)| n.as_str() == name)
        .map(|(_, v)| v)
        .collect()
}

/// The possible answers, in the order of the README's table. Several when the harness cannot
/// know (a path from the fuzzer, a timestamp on the edge of the window).
fn predict(case: &Case, secrets: &[Secret]) -> Vec<Outcome> {
    let uri = Uri::from_str(&case.path).expect("decode() keeps only valid URIs");
    let path = uri.path();
    if path != WEBHOOK_PATH {
        // actix matches a percent-decoded path: `%6B` may well be `k`.
        if path.contains('%') {
            return vec![];
        }
        return vec![error(404, "not_found")];
    }
    if case.method != Method::POST {
        return vec![error(405, "method_not_allowed")];
    }
    // The last Content-Length wins in TestRequest, as it replaces the header.
    let declared = header_values(case, CONTENT_LENGTH.as_str())
        .last()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) || case.body.len() > MAX_BODY {
        return vec![error(413, "payload_too_large")];
    }
    if let Some(encoding) = header_values(case, "content-encoding").first() {
        let encoding = String::from_utf8_lossy(encoding.as_bytes())
            .trim()
            .to_ascii_lowercase();
        if encoding != "identity" {
            return vec![error(415, "unsupported_encoding")];
        }
    }
    let signatures = header_values(case, signature::HEADER);
    let verified = match (signatures.as_slice(), case.signature) {
        ([], _) => Err(SignatureError::Missing),
        ([_, _, ..], _) => Err(SignatureError::Malformed),
        ([_], SignatureIntent::Valid(index)) => Ok(index),
        ([_], SignatureIntent::Invalid) => Err(SignatureError::Mismatch),
        ([one], SignatureIntent::Unknown) => {
            signature::verify(secrets, Some(one.as_bytes()), &case.body)
        }
    };
    match verified {
        Err(SignatureError::Missing) => return vec![error(401, "missing_signature")],
        Err(e) => return vec![error_with(401, "invalid_signature", "reason", e.reason())],
        Ok(_) => {}
    }
    let envelope = match parse_envelope(&case.body) {
        Ok(envelope) => envelope,
        Err(e) => return vec![error_with(400, "invalid_payload", "field", e.field)],
    };
    // The body's hash is always a key; a delivery id is a second one, stored as `id:…`.
    let mut keys = vec![hex::encode(Sha256::digest(&case.body))];
    if let Some(id) = header_values(case, DELIVERY_HEADER).first() {
        let id = id.as_bytes();
        if id.is_empty() || id.len() > 200 || !id.iter().all(|b| (0x20..0x7f).contains(b)) {
            return vec![error_with(400, "invalid_payload", "field", "id_header")];
        }
        keys.push(format!("id:{}", String::from_utf8(id.to_vec()).unwrap()));
    }
    let offset = case
        .timestamp_offset
        .unwrap_or_else(|| (envelope.timestamp - OffsetDateTime::now_utc()).whole_seconds());
    let too_old = error_with(400, "timestamp_out_of_tolerance", "reason", "too_old");
    let too_new = error_with(400, "timestamp_out_of_tolerance", "reason", "in_the_future");
    let inside = if case.shutting_down {
        error(503, "unavailable")
    } else {
        Outcome::Store(keys)
    };
    let near = |edge: i64| (offset - edge).abs() <= CLOCK_SLACK_SECS;
    if near(-TOLERANCE_SECS) {
        vec![too_old, inside]
    } else if near(FUTURE_SKEW_SECS) {
        vec![too_new, inside]
    } else if offset < -TOLERANCE_SECS {
        vec![too_old]
    } else if offset > FUTURE_SKEW_SECS {
        vec![too_new]
    } else {
        vec![inside]
    }
}

fn run(case: Case, harness: &Harness) {
    let mut request = test::TestRequest::default()
        .method(case.method.clone())
        .uri(&case.path)
        .set_payload(case.body.clone());
    for (name, value) in &case.headers {
        request = if name == CONTENT_LENGTH {
            request.insert_header((name.clone(), value.clone()))
        } else {
            request.append_header((name.clone(), value.clone()))
        };
    }
    let (status, headers, body) = harness.runner.block_on(async {
        let app = if case.shutting_down {
            &harness.stopping_app
        } else {
            &harness.app
        };
        let response = app
            .call(request.to_request())
            .await
            .unwrap_or_else(|e| panic!("the app answered with an actix error, not ours: {e:?}"));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, test::read_body(response).await)
    });

    // Shape, whatever the request.
    assert!(
        [200, 202, 400, 401, 404, 405, 408, 413, 415, 503].contains(&status),
        "undocumented status {status}"
    );
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    assert_eq!(header(CONTENT_TYPE.as_str()), Some("application/json"));
    let request_id = header("x-request-id").expect("every answer has X-Request-Id");
    let sent_id = header_values(&case, "x-request-id")
        .first()
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
        });
    match sent_id {
        Some(id) => assert_eq!(request_id, id, "a sane X-Request-Id is echoed"),
        None => assert!(
            request_id.len() == 28
                && request_id.starts_with("req_")
                && request_id[4..].bytes().all(|b| b.is_ascii_alphanumeric()),
            "a fresh request id looks like req_ + 24 alphanumerics: {request_id:?}"
        ),
    }
    let json: Value = serde_json::from_slice(&body).expect("every answer is JSON");
    let answered = if status == 200 || status == 202 {
        let answer = json.as_object().expect("a 2xx body is an object");
        assert_eq!(answer.len(), 2, "a 2xx body is {{status, id}}: {json}");
        let word = if status == 202 {
            "accepted"
        } else {
            "duplicate"
        };
        assert_eq!(answer["status"], word);
        let id = answer["id"].as_str().expect("id is a string");
        Outcome::Store(vec![id.to_string()])
    } else {
        let outer = json.as_object().expect("an error body is an object");
        assert_eq!(outer.len(), 1, "an error body is {{error}}: {json}");
        let error = outer["error"].as_object().expect("`error` is an object");
        assert_eq!(
            error.len(),
            4,
            "error has code, message, details, request_id: {json}"
        );
        let code = error["code"].as_str().expect("code is a string");
        assert!(!error["message"].as_str().expect("message").is_empty());
        let details = error["details"].as_object().expect("details is an object");
        assert_eq!(error["request_id"], request_id);
        let expected_status = match code {
            "payload_too_large" => 413,
            "request_timeout" => 408,
            "unsupported_encoding" => 415,
            "missing_signature" | "invalid_signature" => 401,
            "invalid_payload" | "timestamp_out_of_tolerance" => 400,
            "unavailable" => 503,
            "method_not_allowed" => 405,
            "not_found" => 404,
            other => panic!("undocumented error code {other:?}"),
        };
        assert_eq!(status, expected_status, "status of {code}");
        match code {
            "invalid_signature" => assert!(matches!(
                details["reason"].as_str(),
                Some("wrong_scheme" | "malformed_digest" | "mismatch")
            )),
            "invalid_payload" => assert!(matches!(
                details["field"].as_str(),
                Some("body" | "event" | "timestamp" | "id_header")
            )),
            "timestamp_out_of_tolerance" => assert!(matches!(
                details["reason"].as_str(),
                Some("too_old" | "in_the_future")
            )),
            "method_not_allowed" => assert_eq!(header("allow"), Some("POST")),
            "unavailable" => assert!(matches!(header("retry-after"), Some("5" | "30"))),
            _ => {}
        }
        let (detail_key, detail_value) = match code {
            "invalid_signature" | "timestamp_out_of_tolerance" => ("reason", &details["reason"]),
            "invalid_payload" => ("field", &details["field"]),
            _ => ("", &Value::Null),
        };
        let detail = detail_value.as_str().map(|v| (detail_key, v.to_string()));
        let code: &'static str = [
            "payload_too_large",
            "unsupported_encoding",
            "missing_signature",
            "invalid_signature",
            "invalid_payload",
            "timestamp_out_of_tolerance",
            "unavailable",
            "method_not_allowed",
            "not_found",
        ]
        .into_iter()
        .find(|c| *c == code)
        .unwrap_or_else(|| panic!("{code} is never expected of a complete body"));
        Outcome::Error(status, code, detail)
    };

    // Nothing unverified is stored: a 2xx needs the one signature of a configured secret.
    if status == 200 || status == 202 {
        let signatures = header_values(&case, signature::HEADER);
        assert_eq!(
            signatures.len(),
            1,
            "2xx with {} signatures",
            signatures.len()
        );
        assert!(
            signature::verify(&harness.secrets, Some(signatures[0].as_bytes()), &case.body).is_ok()
        );
        assert!(matches!(
            case.signature,
            SignatureIntent::Valid(_) | SignatureIntent::Unknown
        ));
    }

    if harness.report {
        match &answered {
            Outcome::Store(_) => eprintln!("outcome {status}"),
            Outcome::Error(_, code, detail) => eprintln!("outcome {status} {code} {detail:?}"),
        }
    }
    let expected = predict(&case, &harness.secrets);
    if expected.is_empty() {
        return;
    }
    // The store's answer depends on what it holds: 200 for a key stored before, else 202 while
    // there is room, else 503 (Retry-After: 30).
    let mut stored = harness.stored.borrow_mut();
    let matches = expected.iter().any(|outcome| match (outcome, &answered) {
        (Outcome::Store(keys), Outcome::Store(id)) => {
            keys[0] == id[0] && (status == 202) == !keys.iter().any(|k| stored.contains(k))
        }
        (Outcome::Store(keys), Outcome::Error(503, "unavailable", _)) => {
            !keys.iter().any(|k| stored.contains(k))
                && harness.accepted.get() >= OUTBOX_MAX
                && header("retry-after") == Some("30")
        }
        (Outcome::Error(503, "unavailable", None), Outcome::Error(503, "unavailable", _)) => {
            case.shutting_down && header("retry-after") == Some("5")
        }
        (Outcome::Error(s, c, None), Outcome::Error(s2, c2, _)) => s == s2 && c == c2,
        (expected, answered) => expected == answered,
    });
    assert!(
        matches,
        "answered {status} {answered:?}, the README says one of {expected:?}; body {}",
        String::from_utf8_lossy(&body)
    );
    if status == 202 {
        let keys = expected
            .iter()
            .find_map(|outcome| match outcome {
                Outcome::Store(keys) => Some(keys.clone()),
                _ => None,
            })
            .expect("a 202 was predicted as a store outcome");
        stored.extend(keys);
        harness.accepted.set(harness.accepted.get() + 1);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = decode(data) else {
        return;
    };
    HARNESS.with(|harness| run(case, harness));
});
