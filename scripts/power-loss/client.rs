//! The load and the check of `scripts/power-loss.sh`, run inside the VM whose power is cut.
//!
//! `write` sends signed events until it is killed and prints `SENT <i>` before and
//! `ACK <i> <status>` after each 2xx; stdout is the serial console, the only channel that
//! outlives the power cut, so each line is flushed at once. `check`, after the reboot, looks up
//! every event up to the highest index the host saw and sends it again: the host counts an event
//! that was acknowledged but is not found, or is answered 202 (new) instead of 200 (duplicate), as
//! lost.
//!
//! Event `i` is rebuilt from `(seed, i)` alone, byte for byte, so its dedup key (the SHA-256 of
//! the body) is known in the check phase without anything having been saved. Its timestamp is
//! the trial's start time from the host, which the relay accepts in both phases because the
//! campaign runs it with a tolerance of an hour.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Args {
    /// Trial seed: with the index, it decides every byte of an event.
    #[arg(long)]
    seed: u64,
    /// Trial start time, Unix seconds: the signed timestamp of every event.
    #[arg(long)]
    start: i64,
    #[arg(long)]
    secret: String,
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    admin_url: String,
    /// The relay's max_body: bodies stay a little below it.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    #[arg(long, default_value_t = 4)]
    senders: usize,
    #[command(subcommand)]
    phase: Phase,
}

#[derive(Subcommand)]
enum Phase {
    /// Send events until killed.
    Write,
    /// Look up and resend events 0..=upto, then send one new event.
    Check {
        #[arg(long)]
        upto: u64,
        #[arg(long)]
        token: String,
    },
}

/// Stays off the index range of the write phase: the brand-new event of the check phase.
const NEW_EVENT: u64 = u64::MAX;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn between(r: u64, lo: usize, hi: usize) -> usize {
    lo + (r % (hi - lo + 1) as u64) as usize
}

/// Target body size of event `i`. Events come in blocks of 8 of one kind, so that runs of
/// 10–30 KB events (many per sled leaf, which sled rewrites as a blob file above ~128 KiB) occur
/// as well as bodies over 128 KiB.
fn size_of(seed: u64, i: u64, max_body: usize) -> usize {
    let top = max_body.saturating_sub(8 << 10).max(2 << 10);
    let kind = splitmix(seed ^ splitmix(i / 8)) % 100;
    let r = splitmix(seed.rotate_left(17) ^ splitmix(i));
    let size = match kind {
        0..=34 => between(r, 1 << 10, 4 << 10),
        35..=69 => between(r, 10_000, 30_000),
        70..=84 => between(r, (128 << 10) + 1, top.max((128 << 10) + 2)),
        _ => between(r, 1 << 10, top),
    };
    size.min(top)
}

fn body_of(seed: u64, i: u64, start: &str, max_body: usize) -> Vec<u8> {
    let size = if i == NEW_EVENT {
        2 << 10
    } else {
        size_of(seed, i, max_body)
    };
    let mut envelope = json!({
        "event": "conversation.updated",
        "timestamp": start,
        "data": {
            "call_id": format!("call_{seed}_{i}"),
            "agent_id": "agent_456",
            "turns": [{"role": "caller", "text": "", "at": start}],
            "sentiment": "neutral",
        }
    });
    let bare = serde_json::to_vec(&envelope).expect("json").len();
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ";
    let mut state = splitmix(seed ^ i.rotate_left(32));
    let text: String = (0..size.saturating_sub(bare))
        .map(|_| {
            state = splitmix(state);
            ALPHABET[(state % ALPHABET.len() as u64) as usize] as char
        })
        .collect();
    envelope["data"]["turns"][0]["text"] = Value::String(text);
    serde_json::to_vec(&envelope).expect("json")
}

fn key_of(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Status and `status` field of a webhook answer.
async fn post(
    http: &reqwest::Client,
    args: &Args,
    body: Vec<u8>,
) -> Result<(u16, String), reqwest::Error> {
    let signature = kallina_relay::signature::sign(args.secret.as_bytes(), &body);
    let response = http
        .post(format!("{}/webhooks/kallina", args.url))
        .header("X-Kallina-Signature", signature)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await?;
    let code = response.status().as_u16();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    let status = answer["status"]
        .as_str()
        .or(answer["error"]["code"].as_str())
        .unwrap_or("-")
        .to_owned();
    Ok((code, status))
}

async fn wait_ready(http: &reqwest::Client, admin_url: &str) -> bool {
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("{admin_url}/healthz")).send().await {
            if r.status().is_success() {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn write(args: Arc<Args>, http: reqwest::Client, start: String) {
    let next = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for _ in 0..args.senders.max(1) {
        let (args, http, next, start) = (args.clone(), http.clone(), next.clone(), start.clone());
        senders.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let body = body_of(args.seed, i, &start, args.max_body);
                say(format!("SENT {i} {}", body.len()));
                match post(&http, &args, body).await {
                    Ok((code, _)) if (200..300).contains(&code) => say(format!("ACK {i} {code}")),
                    Ok((code, status)) => say(format!("ERR {i} {code} {status}")),
                    Err(e) => {
                        say(format!("ERR {i} - {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    for sender in senders {
        let _ = sender.await;
    }
}

/// One line per event: what the admin API knows of it, and how a resend is answered.
async fn check_one(
    http: &reqwest::Client,
    args: &Args,
    token: &str,
    start: &str,
    i: u64,
) -> String {
    let body = body_of(args.seed, i, start, args.max_body);
    let key = key_of(&body);
    // A request that got no answer at all (a reset or refused connection) says nothing about
    // the store: it is asked again. Only what the relay answers can count an event as kept.
    let url = format!("{}/admin/events/{key}", args.admin_url);
    let mut attempts = 0;
    let answer = loop {
        attempts += 1;
        match http.get(&url).bearer_auth(token).send().await {
            Err(e) if attempts < 3 => {
                say(format!("CHECK-RETRY {i} {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answer => break answer,
        }
    };
    let (get_code, status, same) = match answer {
        Ok(r) => {
            let code = r.status().as_u16();
            let view: Value = r.json().await.unwrap_or(Value::Null);
            let status = view["status"].as_str().unwrap_or("-").to_owned();
            let same = if code != 200 {
                "-"
            } else if view["size_bytes"].as_u64() == Some(body.len() as u64)
                && serde_json::from_slice::<Value>(&body).ok().as_ref() == Some(&view["body"])
            {
                "ok"
            } else {
                "bad"
            };
            (code.to_string(), status, same)
        }
        Err(_) => ("-".to_owned(), "-".to_owned(), "-"),
    };
    let (post_code, post_status) = match post(http, args, body).await {
        Ok((code, status)) => (code.to_string(), status),
        Err(_) => ("-".to_owned(), "-".to_owned()),
    };
    format!("CHECK {i} get={get_code} status={status} body={same} post={post_code} {post_status}")
}

async fn check(args: Arc<Args>, http: reqwest::Client, start: String, upto: u64, token: String) {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.senders.max(1) {
        let (args, http, next, start, token) = (
            args.clone(),
            http.clone(),
            next.clone(),
            start.clone(),
            token.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i > upto {
                    break;
                }
                say(check_one(&http, &args, &token, &start, i).await);
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let body = body_of(args.seed, NEW_EVENT, &start, args.max_body);
    match post(&http, &args, body).await {
        Ok((code, status)) => say(format!("NEW {code} {status}")),
        Err(e) => say(format!("NEW - {e}")),
    }
    say("CHECK-DONE".to_owned());
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let start = time::OffsetDateTime::from_unix_timestamp(args.start)
        .expect("start time")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("rfc3339");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http client");
    if !wait_ready(&http, &args.admin_url).await {
        say("CLIENT relay not ready after 60 s".to_owned());
        std::process::exit(1);
    }
    say("READY".to_owned());
    match &args.phase {
        Phase::Write => write(args.clone(), http, start).await,
        Phase::Check { upto, token } => {
            check(args.clone(), http, start, *upto, token.clone()).await
        }
    }
}
