//! `kallina-relay replay`: sends payload files to a receiver, signed as the platform would, to
//! try a deployment, feed captured events again, or put it under load.
//!
//! Every payload is read and signed before the first request: a file that cannot be read stops
//! the run before anything is sent, and the copies `--repeat` sends are the very same bytes, so
//! that the receiver must answer them as duplicates, which is what they are there to check.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio::time::MissedTickBehavior;

use super::{client_settings, connectable, error_chain, progress_bar, Failure, ServeArgs};
use crate::ingress::WEBHOOK_PATH;
use crate::signature;

#[derive(Debug, Args)]
#[command(after_help = "\
Exit status: 0 when every request was answered 2xx, 1 when one was not (or got no answer), \
2 when the command line or a payload file is wrong.

Examples:
  kallina-relay replay fixtures/events --fresh-timestamp
  kallina-relay replay captured.jsonl --url https://relay.example.com/webhooks/kallina --rate 50
  kallina-relay replay - --repeat 2 < event.json")]
pub struct ReplayArgs {
    /// Payload files, folders (every *.json and *.jsonl inside, in name order), or `-` for
    /// standard input. A *.jsonl file, or input that is not one JSON document but one per
    /// line, is JSON Lines: one event per line.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Webhook endpoint [default: http://<listen>/webhooks/kallina, from the settings]
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Secret to sign with [default: the first configured webhook secret]
    #[arg(long, env = "KALLINA_WEBHOOK_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Rewrite each envelope's `timestamp` to now (RFC 3339) before signing, every other byte
    /// left as it is; captured events are otherwise refused as too old.
    #[arg(long)]
    pub fresh_timestamp: bool,
    /// Requests started per second at most [default: no limit but --concurrency]
    #[arg(long, value_name = "N", value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Send each payload N times, byte for byte: every copy after the first should be
    /// answered as a duplicate. All payloads are sent once before any is sent again.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub repeat: u32,
    /// Give up on a request after this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = duration)]
    pub timeout: Duration,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a number of requests per second above zero, e.g. 50 or 0.5".into()),
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    crate::config::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| "expected a duration above zero, such as 500ms, 30s or 2m".into())
}

/// One request's body, ready to send: where it came from (for messages), the bytes, and the
/// signature header made over exactly those bytes.
struct Payload {
    origin: String,
    body: Bytes,
    signature: String,
}

pub async fn run(args: ReplayArgs, global: &ServeArgs) -> Result<(), Failure> {
    let (url, secret) = target(&args, global)?;
    let sources = load(&args.paths)?;
    if sources.is_empty() {
        return Err(Failure::Usage("no payloads: the input is empty".into()));
    }
    // One instant for the whole run: the same file given twice stays the same bytes.
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("the current time formats as RFC 3339");
    let payloads: Vec<Arc<Payload>> = sources
        .into_iter()
        .map(|(origin, body)| {
            let body = match args.fresh_timestamp {
                false => body,
                true => with_timestamp(&body, &now).unwrap_or_else(|| {
                    eprintln!(
                        "kallina-relay replay: warning: {origin}: no top-level string \
                         `timestamp` to rewrite; sent unchanged"
                    );
                    body
                }),
            };
            let signature = signature::sign(secret.as_bytes(), &body);
            Arc::new(Payload {
                origin,
                body: Bytes::from(body),
                signature,
            })
        })
        .collect();

    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .pool_max_idle_per_host(args.concurrency as usize)
        .user_agent(concat!(
            "kallina-relay/",
            env!("CARGO_PKG_VERSION"),
            " replay"
        ))
        .build()
        .map_err(|e| Failure::Work(format!("cannot build the HTTP client: {}", error_chain(&e))))?;
    let total = payloads.len() as u64 * u64::from(args.repeat);
    let bar = progress_bar(
        Some(total),
        "{spinner} {pos}/{len} requests {wide_bar} {per_sec} {elapsed_precise}",
    );
    let semaphore = Arc::new(Semaphore::new(args.concurrency as usize));
    let mut ticker = args.rate.map(|rate| {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        // After a wait for a free slot, go on at the rate rather than catching up in a burst.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker
    });
    let url = Arc::new(url);
    let mut summary = Summary::new();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..args.repeat {
        for payload in &payloads {
            let permit = semaphore
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            if let Some(ticker) = ticker.as_mut() {
                ticker.tick().await;
            }
            let (client, url, payload, bar) =
                (client.clone(), url.clone(), payload.clone(), bar.clone());
            tasks.spawn(async move {
                let outcome = send(&client, &url, &payload).await;
                drop(permit);
                bar.inc(1);
                outcome
            });
            // Collect as we go so that a long run does not keep every finished task around.
            while let Some(done) = tasks.try_join_next() {
                summary.add(done);
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        summary.add(done);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    let run = Run {
        url: &url,
        payloads: payloads.len(),
        repeat: args.repeat,
        elapsed,
    };
    if args.json {
        out!("{}", summary.to_json(&run))?;
    } else {
        out!("{}", summary.to_text(&run).trim_end())?;
    }
    summary.print_hints(args.fresh_timestamp);
    match summary.not_2xx() {
        0 => Ok(()),
        bad => Err(Failure::Work(format!(
            "{bad} of {} requests were not answered 2xx",
            summary.requests
        ))),
    }
}

/// The endpoint and the secret: flags first, then the settings of the service on this host.
fn target(args: &ReplayArgs, global: &ServeArgs) -> Result<(String, String), Failure> {
    // The environment may hold a rotation list; the platform signs with the first (newest).
    let secret = args
        .secret
        .as_deref()
        .map(|list| list.split(',').map(str::trim).next().unwrap_or_default());
    if secret == Some("") {
        return Err(Failure::Usage(
            "the secret is empty: pass --secret or set KALLINA_WEBHOOK_SECRET".into(),
        ));
    }
    let settings = match (&args.url, secret) {
        (Some(_), Some(_)) => None,
        _ => Some(client_settings(global, secret.is_none())?),
    };
    let url = match (&args.url, &settings) {
        (Some(url), _) => url.clone(),
        (None, Some(settings)) => {
            let scheme = if settings.ingress.tls.is_some() {
                "https"
            } else {
                "http"
            };
            format!(
                "{scheme}://{}{WEBHOOK_PATH}",
                connectable(settings.ingress.listen)
            )
        }
        (None, None) => unreachable!("settings are loaded when --url is absent"),
    };
    match reqwest::Url::parse(&url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
        Ok(_) => return Err(Failure::Usage(format!("--url {url}: not an http(s) URL"))),
        Err(e) => return Err(Failure::Usage(format!("--url {url}: {e}"))),
    }
    let secret = match (secret, &settings) {
        (Some(secret), _) => secret.to_string(),
        (None, Some(settings)) => settings.ingress.secrets[0].expose().to_string(),
        (None, None) => unreachable!("settings are loaded when --secret is absent"),
    };
    Ok((url, secret))
}

/// Every payload of every path, in order, with where it came from.
fn load(paths: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let mut payloads = Vec::new();
    for path in paths {
        if path.as_os_str() == "-" {
            let mut input = Vec::new();
            std::io::stdin()
                .read_to_end(&mut input)
                .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
            payloads.extend(split("stdin", input, false));
        } else if path.is_dir() {
            let files = payload_files(path)?;
            if files.is_empty() {
                return Err(Failure::Usage(format!(
                    "{}: no *.json or *.jsonl files in this folder",
                    path.display()
                )));
            }
            for file in files {
                payloads.extend(read_file(&file)?);
            }
        } else {
            payloads.extend(read_file(path)?);
        }
    }
    Ok(payloads)
}

fn payload_files(dir: &Path) -> Result<Vec<PathBuf>, Failure> {
    let unreadable =
        |e: std::io::Error| Failure::Usage(format!("cannot read {}: {e}", dir.display()));
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let wanted = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "jsonl")
        );
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    Ok(split(&path.display().to_string(), bytes, jsonl))
}

/// One payload, or one per line for JSON Lines. A whole document is sent with its bytes as
/// they are (trailing newline included); input that is neither JSON nor JSON Lines is sent
/// as it is too, for the receiver to say what is wrong with it: that is a test worth running.
fn split(origin: &str, bytes: Vec<u8>, jsonl: bool) -> Vec<(String, Vec<u8>)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    if !jsonl && serde_json::from_slice::<IgnoredAny>(&bytes).is_ok() {
        return vec![(origin.to_string(), bytes)];
    }
    let lines: Vec<(usize, &[u8])> = bytes
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .collect();
    let is_lines = jsonl
        || (lines.len() > 1
            && lines
                .iter()
                .all(|(_, line)| serde_json::from_slice::<IgnoredAny>(line).is_ok()));
    if !is_lines {
        return vec![(origin.to_string(), bytes)];
    }
    lines
        .into_iter()
        .map(|(i, line)| (format!("{origin}:{}", i + 1), line.to_vec()))
        .collect()
}

#[derive(Deserialize)]
struct TimestampField<'a> {
    #[serde(borrow)]
    timestamp: Option<&'a RawValue>,
}

/// `body` with the value of its top-level `timestamp` replaced by `now`, every other byte
/// unchanged (key order, spacing, escapes): re-serialising the document would change bytes the
/// platform chose, and the signature is made over what is sent. `None` when the body is not a
/// JSON object with one string `timestamp` (duplicate keys make the parse fail, as they do in
/// the receiver).
fn with_timestamp(body: &[u8], now: &str) -> Option<Vec<u8>> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let fields: TimestampField = serde_json::from_slice(body).ok()?;
    let raw = fields.timestamp?.get();
    if !raw.starts_with('"') {
        return None;
    }
    // A borrowed RawValue is a slice of the input: its address gives its place in the body.
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start + raw.len();
    if body.get(start..end)? != raw.as_bytes() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + now.len());
    out.extend_from_slice(&body[..start]);
    out.extend_from_slice(serde_json::to_string(now).ok()?.as_bytes());
    out.extend_from_slice(&body[end..]);
    Some(out)
}

/// How one request ended.
enum Outcome {
    /// An HTTP answer: its status, the `status` (2xx) or `error.code` of its body, its latency.
    Answered {
        status: u16,
        code: Option<String>,
        latency: Duration,
    },
    /// No answer: the kind of failure and the error, for the first of each kind to be shown.
    Failed { kind: &'static str, error: String },
}

async fn send(client: &reqwest::Client, url: &str, payload: &Payload) -> Outcome {
    let started = Instant::now();
    let sent = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(signature::HEADER, &payload.signature)
        .body(payload.body.clone())
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let body = response.bytes().await.unwrap_or_default();
            Outcome::Answered {
                status,
                code: code_of(status, &body),
                latency: started.elapsed(),
            }
        }
        Err(e) => Outcome::Failed {
            kind: if e.is_timeout() {
                "timeout"
            } else if e.is_connect() {
                "connect"
            } else {
                "request"
            },
            error: format!("{}: {}", payload.origin, error_chain(&e)),
        },
    }
}

/// `accepted` / `duplicate` of a 2xx answer, the platform error shape's `error.code` otherwise.
fn code_of(status: u16, body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let code = match status {
        200..=299 => &value["status"],
        _ => &value["error"]["code"],
    };
    code.as_str().map(str::to_string)
}

/// What the summary says about the run besides the answers.
struct Run<'a> {
    url: &'a str,
    payloads: usize,
    repeat: u32,
    elapsed: Duration,
}

/// Counts per status and per code, failures per kind, and the latency of the answers.
struct Summary {
    requests: u64,
    statuses: BTreeMap<u16, (u64, BTreeMap<String, u64>)>,
    failures: BTreeMap<&'static str, (u64, String)>,
    /// Microseconds, from 1 µs to an hour, three significant digits.
    latency: Histogram<u64>,
}

impl Summary {
    fn new() -> Self {
        Self {
            requests: 0,
            statuses: BTreeMap::new(),
            failures: BTreeMap::new(),
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn add(&mut self, done: Result<Outcome, JoinError>) {
        self.requests += 1;
        let outcome = done.unwrap_or_else(|e| Outcome::Failed {
            kind: "panic",
            error: e.to_string(),
        });
        match outcome {
            Outcome::Answered {
                status,
                code,
                latency,
            } => {
                let (count, codes) = self.statuses.entry(status).or_default();
                *count += 1;
                if let Some(code) = code {
                    *codes.entry(code).or_default() += 1;
                }
                self.latency
                    .saturating_record(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            }
            Outcome::Failed { kind, error } => {
                // The first error of each kind is kept: one example says enough.
                self.failures.entry(kind).or_insert((0, error)).0 += 1;
            }
        }
    }

    fn not_2xx(&self) -> u64 {
        let answered_badly: u64 = self
            .statuses
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, (count, _))| count)
            .sum();
        answered_badly + self.failures.values().map(|(count, _)| count).sum::<u64>()
    }

    fn code_count(&self, code: &str) -> u64 {
        self.statuses
            .values()
            .filter_map(|(_, codes)| codes.get(code))
            .sum()
    }

    /// p50, p90, p99 and max in milliseconds; `None` when nothing was answered.
    fn percentiles(&self) -> Option<[(&'static str, f64); 4]> {
        if self.latency.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some([
            ("p50", ms(self.latency.value_at_quantile(0.50))),
            ("p90", ms(self.latency.value_at_quantile(0.90))),
            ("p99", ms(self.latency.value_at_quantile(0.99))),
            ("max", ms(self.latency.max())),
        ])
    }

    fn to_text(&self, run: &Run) -> String {
        let mut text = format!(
            "{} requests ({} payloads x {}) to {} in {:.2}s ({:.1}/s)\n",
            self.requests,
            run.payloads,
            run.repeat,
            run.url,
            run.elapsed.as_secs_f64(),
            self.requests as f64 / run.elapsed.as_secs_f64().max(1e-9),
        );
        for (status, (count, codes)) in &self.statuses {
            let reason = reqwest::StatusCode::from_u16(*status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            let codes = codes
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            text.push_str(&format!(
                "  {:<28}{count:>7}  {codes}\n",
                format!("{status} {reason}")
            ));
        }
        for (kind, (count, error)) in &self.failures {
            text.push_str(&format!(
                "  {:<28}{count:>7}  {error}\n",
                format!("no answer ({kind})")
            ));
        }
        if let Some(percentiles) = self.percentiles() {
            let parts: Vec<String> = percentiles
                .iter()
                .map(|(name, ms)| format!("{name} {}", millis(*ms)))
                .collect();
            text.push_str(&format!("latency  {}\n", parts.join("  ")));
        }
        text
    }

    fn to_json(&self, run: &Run) -> Value {
        let statuses: serde_json::Map<String, Value> = self
            .statuses
            .iter()
            .map(|(status, (count, codes))| {
                (
                    status.to_string(),
                    json!({ "count": count, "codes": codes }),
                )
            })
            .collect();
        let failures: serde_json::Map<String, Value> = self
            .failures
            .iter()
            .map(|(kind, (count, error))| {
                (
                    kind.to_string(),
                    json!({ "count": count, "example": error }),
                )
            })
            .collect();
        let latency = self.percentiles().map(|p| {
            p.iter()
                .map(|(name, ms)| (name.to_string(), json!(ms)))
                .collect::<serde_json::Map<_, _>>()
        });
        json!({
            "url": run.url,
            "payloads": run.payloads,
            "repeat": run.repeat,
            "requests": self.requests,
            "not_2xx": self.not_2xx(),
            "elapsed_seconds": run.elapsed.as_secs_f64(),
            "statuses": statuses,
            "failures": failures,
            "latency_ms": latency,
        })
    }

    /// The two mistakes everyone makes once, said on stderr so that the summary stays clean.
    fn print_hints(&self, fresh_timestamp: bool) {
        if !fresh_timestamp && self.code_count("timestamp_out_of_tolerance") > 0 {
            eprintln!(
                "hint: the payloads' signed timestamps are outside the receiver's tolerance; \
                 --fresh-timestamp rewrites them to now"
            );
        }
        if self.code_count("invalid_signature") > 0 {
            eprintln!(
                "hint: the receiver refused the signature: sign with its secret (--secret or \
                 KALLINA_WEBHOOK_SECRET)"
            );
        }
    }
}

fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        format!("{ms:.1}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_timestamp_value_changes() {
        let body = b"{\n  \"event\": \"call.ended\",\n  \"timestamp\":  \"2025-01-23T10:30:00Z\" ,\n  \"data\": {\"timestamp\": \"keep\"}\n}\n";
        let out = with_timestamp(body, "2026-11-29T06:00:00.5Z").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n  \"event\": \"call.ended\",\n  \"timestamp\":  \"2026-11-29T06:00:00.5Z\" ,\n  \"data\": {\"timestamp\": \"keep\"}\n}\n"
        );
    }

    #[test]
    fn no_rewrite_without_one_string_timestamp() {
        for body in [
            &br#"{"event":"x"}"#[..],
            br#"{"event":"x","timestamp":12}"#,
            br#"{"timestamp":"a","timestamp":"b"}"#,
            br#"["timestamp"]"#,
            b"not json",
        ] {
            assert_eq!(with_timestamp(body, "now"), None, "{body:?}");
        }
    }

    #[test]
    fn json_lines_are_detected_and_documents_are_kept_whole() {
        let pretty = b"{\n  \"event\": \"a\"\n}\n".to_vec();
        assert_eq!(
            split("f", pretty.clone(), false),
            vec![("f".into(), pretty)]
        );
        let lines = b"{\"event\":\"a\"}\r\n\n{\"event\":\"b\"}\n".to_vec();
        assert_eq!(
            split("f", lines, false),
            vec![
                ("f:1".into(), b"{\"event\":\"a\"}".to_vec()),
                ("f:3".into(), b"{\"event\":\"b\"}".to_vec()),
            ]
        );
        assert_eq!(
            split("f", b"{\"event\":\"a\"}\n".to_vec(), true),
            vec![("f:1".into(), b"{\"event\":\"a\"}".to_vec())]
        );
        assert_eq!(split("f", b"not json\nat all".to_vec(), false).len(), 1);
        assert!(split("f", b" \n".to_vec(), false).is_empty());
    }
}
