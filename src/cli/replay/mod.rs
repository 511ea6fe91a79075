//! `kallina-relay replay`: sends payload files to a receiver, signed as the platform would, to
//! try a deployment, feed captured events again, or put it under load.
//!
//! Every payload is read and signed before the first request: a file that cannot be read stops
//! the run before anything is sent, and the copies `--repeat` sends are the very same bytes, so
//! that the receiver must answer them as duplicates, which is what they are there to check.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

mod payloads;
mod summary;

use payloads::{load, with_timestamp};
use summary::{Run, Summary};

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
    /// Post as this configured source: to its path, signed with its first secret from the
    /// settings (`--secret` and KALLINA_WEBHOOK_SECRET, the default source's, are not used)
    #[arg(long, value_name = "NAME")]
    pub source: Option<String>,
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
    let payloads = signed(&args, &secret, sources);
    let (summary, elapsed) = send_all(&args, &url, &payloads).await?;
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

/// Every payload with its signature, its timestamp made fresh when asked.
fn signed(args: &ReplayArgs, secret: &str, sources: Vec<(String, Vec<u8>)>) -> Vec<Arc<Payload>> {
    // One instant for the whole run: the same file given twice stays the same bytes.
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .expect("the current time formats as RFC 3339");
    sources
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
        .collect()
}

/// Sends every payload `--repeat` times, at most `--concurrency` at once and at `--rate`.
async fn send_all(
    args: &ReplayArgs,
    url: &str,
    payloads: &[Arc<Payload>],
) -> Result<(Summary, Duration), Failure> {
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
    let url = Arc::new(url.to_string());
    let mut summary = Summary::new();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for _ in 0..args.repeat {
        for payload in payloads {
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
    Ok((summary, elapsed))
}

/// The endpoint and the secret: flags first, then the settings of the service on this host.
fn target(args: &ReplayArgs, global: &ServeArgs) -> Result<(String, String), Failure> {
    if let Some(name) = &args.source {
        return source_target(args, global, name);
    }
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
        (None, Some(settings)) => local_url(settings, WEBHOOK_PATH),
        (None, None) => unreachable!("settings are loaded when --url is absent"),
    };
    check_url(&url)?;
    let secret =
        match (secret, &settings) {
            (Some(secret), _) => secret.to_string(),
            (None, Some(settings)) => match settings.ingress.default_source() {
                Some(source) => source.secrets[0].expose().to_string(),
                None => return Err(Failure::Usage(
                    "no webhook secret for /webhooks/kallina in the settings: pass --source NAME \
                     for one of the [[sources]], or --secret"
                        .into(),
                )),
            },
            (None, None) => unreachable!("settings are loaded when --secret is absent"),
        };
    Ok((url, secret))
}

/// `--source NAME`: that source's path on this host (or `--url`), and its first secret.
fn source_target(
    args: &ReplayArgs,
    global: &ServeArgs,
    name: &str,
) -> Result<(String, String), Failure> {
    let settings = client_settings(global, false)?;
    let ingress = &settings.ingress;
    let Some(source) = ingress.source_named(name) else {
        let names: Vec<&str> = ingress.sources.iter().map(|s| s.name.as_str()).collect();
        return Err(Failure::Usage(format!(
            "--source {name}: no such source in the settings (configured: {})",
            names.join(", ")
        )));
    };
    let url = match &args.url {
        Some(url) => url.clone(),
        None => local_url(&settings, &source.path()),
    };
    check_url(&url)?;
    Ok((url, source.secrets[0].expose().to_string()))
}

/// `path` on the public listener of the service on this host.
fn local_url(settings: &crate::settings::Settings, path: &str) -> String {
    let scheme = if settings.ingress.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}{path}", connectable(settings.ingress.listen))
}

fn check_url(url: &str) -> Result<(), Failure> {
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => Ok(()),
        Ok(_) => Err(Failure::Usage(format!("--url {url}: not an http(s) URL"))),
        Err(e) => Err(Failure::Usage(format!("--url {url}: {e}"))),
    }
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
