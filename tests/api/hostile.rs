//! Hostile HTTP against the real binary: bodies that never end, floods of repeated headers,
//! garbage, all at once, while the process's memory is watched. Each gets a defined answer,
//! the server stays up, and its resident memory stays bounded by the limits, not by what the
//! attackers send.

use std::time::Duration;

use futures_util::future::join_all;
use kallina_relay::signature::sign;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// What each never-ending body tries to send: far beyond any limit.
const ENDLESS_BYTES: usize = 32 << 20;
const ENDLESS_CLIENTS: usize = 24;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmRSS:")
}

/// The most resident memory the process has had since it started.
fn peak_rss_bytes(pid: i32) -> u64 {
    proc_status_bytes(pid, "VmHWM:")
}

fn proc_status_bytes(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"));
    kib * 1024
}

fn host_port(address: &str) -> &str {
    address.trim_start_matches("http://")
}

/// A chunked body that never ends: returns what the server answered and how much it let
/// through before it stopped reading.
async fn endless_chunked_body(address: &str) -> (String, usize) {
    let mut stream = TcpStream::connect(host_port(address)).await.unwrap();
    let head = format!(
        "POST /webhooks/kallina HTTP/1.1\r\nHost: relay\r\nTransfer-Encoding: chunked\r\n\
         X-Kallina-Signature: {}\r\n\r\n",
        sign(SECRET.as_bytes(), b"never")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
    let mut sent = 0;
    while sent < ENDLESS_BYTES {
        match tokio::time::timeout(Duration::from_secs(10), stream.write_all(chunk.as_bytes()))
            .await
        {
            Ok(Ok(())) => sent += chunk.len(),
            // Reset, or the server stopped reading: either way it is not taking more.
            _ => break,
        }
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    (String::from_utf8_lossy(&answer).into_owned(), sent)
}

/// One request carrying the same header `count` times.
async fn repeated_headers(address: &str, count: usize) -> String {
    let body = event_body("call.ended", &format!("repeated-{count}"));
    let mut request = format!(
        "POST /webhooks/kallina HTTP/1.1\r\nHost: relay\r\nContent-Length: {}\r\n\
         X-Kallina-Signature: {}\r\n",
        body.len(),
        sign(SECRET.as_bytes(), body.as_bytes())
    );
    for _ in 0..count {
        request.push_str("X-Repeat: again\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    request.push_str(&body);
    let mut stream = TcpStream::connect(host_port(address)).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn floods_of_hostile_requests_get_answers_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::random();
    let relay = ChildRelay::start(
        &dir.path().join("data"),
        &names,
        &[
            ("KALLINA_RELAY_AMQP_URL", NO_BROKER_URL),
            ("KALLINA_RELAY_MAX_BODY", "1MiB"),
            ("RUST_LOG", "error"),
        ],
    )
    .await;
    let relay = KillOnDrop(relay);
    let client = http_client();
    let post = |body: Vec<u8>| {
        let signature = sign(SECRET.as_bytes(), &body);
        client
            .post(format!("{}/webhooks/kallina", relay.address))
            .header("X-Kallina-Signature", signature)
            .body(body)
            .send()
    };
    assert_eq!(
        post(event_body("call.ended", "warm-up").into())
            .await
            .unwrap()
            .status(),
        202
    );
    let baseline = rss_bytes(relay.pid());

    // Never-ending bodies, all at once: each is cut off at the limit with 413.
    let endless =
        join_all((0..ENDLESS_CLIENTS).map(|_| endless_chunked_body(&relay.address))).await;
    let peak_after_endless = rss_bytes(relay.pid());
    for (answer, sent) in &endless {
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "{}",
            &answer[..answer.len().min(120)]
        );
        assert!(
            *sent < ENDLESS_BYTES,
            "the server kept reading a body past its limit"
        );
    }

    // The same header over and over: refused as too large, never stored.
    let few = repeated_headers(&relay.address, 20).await;
    assert!(
        few.starts_with("HTTP/1.1 202"),
        "{}",
        &few[..few.len().min(120)]
    );
    let many = repeated_headers(&relay.address, 5_000).await;
    assert!(
        many.starts_with("HTTP/1.1 431"),
        "{}",
        &many[..many.len().min(120)]
    );

    // Deeply nested JSON and JSON of the wrong kind, signed, many at once.
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let shapes: Vec<Vec<u8>> = (0..200)
        .map(|i| match i % 4 {
            0 => nested.clone(),
            1 => b"12345".to_vec(),
            2 => b"\"a string\"".to_vec(),
            _ => b"[1,2,3]".to_vec(),
        })
        .collect();
    let answers = join_all(shapes.into_iter().map(&post)).await;
    for answer in answers {
        assert_eq!(answer.unwrap().status(), 400);
    }

    let after = rss_bytes(relay.pid());
    let attempted = (ENDLESS_CLIENTS * ENDLESS_BYTES) as u64;
    println!(
        "hostile flood: {} MB attempted; RSS baseline {} MB, after the endless bodies {} MB, at the end {} MB",
        attempted >> 20,
        baseline >> 20,
        peak_after_endless >> 20,
        after >> 20
    );
    // The limits bound memory: 24 bodies of at most 1 MiB each, plus what the allocator
    // keeps. Unbounded reading would have taken hundreds of megabytes.
    let bound = baseline + (128 << 20);
    assert!(
        peak_after_endless.max(after) < bound,
        "memory grew with the attack"
    );
    assert_eq!(
        post(event_body("call.ended", "still-up").into())
            .await
            .unwrap()
            .status(),
        202
    );
}

/// What each flooding connection declares and sends: just under the 1 MiB limit, a little
/// short of what it declared, so that the relay keeps waiting for the rest.
const FLOOD_DECLARED: usize = 1_048_000;
const FLOOD_SENT: usize = 1_038_000;
const FLOOD_CLIENTS: usize = 500;
const BUDGET_MIB: u64 = 48;
/// What actix-http may buffer of one connection before a handler reads it: its read buffer
/// (up to 128 KiB) and its payload queue (32 KiB).
const HTTP_LAYER_PER_CONNECTION: usize = 160 * 1024;

/// One flooding connection (the attack of issue 11; `KALLINA_TEST_FLOOD_CLIENTS` and
/// `KALLINA_TEST_FLOOD_BUDGET` change its size and the relay's budget, for a control run: with
/// a budget of 16GiB the test fails at +824 MB): declares a body it never finishes, with a wrong signature, and
/// holds until `release` fires. Returns the status line the relay answered, if any.
async fn unfinished_body(
    address: String,
    payload: std::sync::Arc<Vec<u8>>,
    mut release: tokio::sync::watch::Receiver<bool>,
) -> String {
    let Ok(mut stream) = TcpStream::connect(host_port(&address)).await else {
        return "connect failed".into();
    };
    let head = format!(
        "POST /webhooks/kallina HTTP/1.1\r\nHost: relay\r\nContent-Length: {FLOOD_DECLARED}\r\n\
         X-Kallina-Signature: sha256={}\r\n\r\n",
        "0".repeat(64)
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return "head not sent".into();
    }
    for piece in payload.chunks(64 * 1024) {
        // Refused bodies are not read any further: the write fails or stalls.
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(piece)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    let mut answer = Vec::new();
    let mut buffer = [0u8; 512];
    loop {
        tokio::select! {
            read = stream.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            },
            _ = release.wait_for(|go| *go) => break,
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    answer.lines().next().unwrap_or("no answer").to_string()
}

#[tokio::test]
async fn a_flood_of_unfinished_bodies_is_held_to_the_budget_and_real_events_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let names = Names::random();
    let budget = std::env::var("KALLINA_TEST_FLOOD_BUDGET").unwrap_or(format!("{BUDGET_MIB}MiB"));
    let relay = ChildRelay::start(
        &dir.path().join("data"),
        &names,
        &[
            ("KALLINA_RELAY_AMQP_URL", NO_BROKER_URL),
            ("KALLINA_RELAY_MAX_BODY", "1MiB"),
            ("KALLINA_RELAY_MAX_INFLIGHT_BODY", &budget),
            ("RUST_LOG", "error"),
        ],
    )
    .await;
    let relay = KillOnDrop(relay);
    let client = http_client();
    let post = |marker: String| {
        let body = event_body("call.ended", &marker);
        let signature = sign(SECRET.as_bytes(), body.as_bytes());
        client
            .post(format!("{}/webhooks/kallina", relay.address))
            .header("X-Kallina-Signature", signature)
            .body(body)
            .send()
    };
    assert_eq!(post("warm-up".into()).await.unwrap().status(), 202);
    let baseline = rss_bytes(relay.pid());

    let payload = std::sync::Arc::new(vec![b'x'; FLOOD_SENT]);
    let (release, held) = tokio::sync::watch::channel(false);
    let clients: usize = std::env::var("KALLINA_TEST_FLOOD_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(FLOOD_CLIENTS);
    let flood: Vec<_> = (0..clients)
        .map(|_| {
            tokio::spawn(unfinished_body(
                relay.address.clone(),
                payload.clone(),
                held.clone(),
            ))
        })
        .collect();
    // While the flood holds its bodies: a small signed event gets in, or is told when to retry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let holding = rss_bytes(relay.pid());
    let during = post("during".into()).await.unwrap();
    let status = during.status().as_u16();
    let retry_after = during.headers().get("retry-after").is_some();
    assert!(
        status == 202 || (status == 503 && retry_after),
        "a small event during the flood: {status}"
    );
    release.send(true).unwrap();
    let mut answers: std::collections::BTreeMap<String, usize> = Default::default();
    for client in flood {
        *answers.entry(client.await.unwrap()).or_default() += 1;
    }
    let peak = peak_rss_bytes(relay.pid());
    println!(
        "flood of {clients} unfinished bodies: RSS baseline {} MB, while held {} MB, peak {} \
         MB; small event during it {status}; answers {answers:?}",
        baseline >> 20,
        holding >> 20,
        peak >> 20
    );
    // The budget bounds the bodies the relay holds; what the HTTP layer buffers of each open
    // connection (up to HTTP_LAYER_PER_CONNECTION) and the allocator's overhead come on top.
    // Measured with the default 48 MiB: peaks of baseline + 102..166 MB over 11 runs, under the
    // issue's baseline + budget + 128 MiB each time but with as little as 10 MB to spare, hence
    // the per-connection allowance here; without the budget the same flood took +824 MB.
    let bound =
        baseline + ((BUDGET_MIB + 128) << 20) + (clients * HTTP_LAYER_PER_CONNECTION) as u64;
    assert!(
        peak < bound,
        "peak RSS {} MB is above baseline + budget + 128 MiB + what the HTTP layer buffers for \
         {clients} connections ({} MB)",
        peak >> 20,
        bound >> 20
    );
    assert!(
        answers.keys().any(|a| a.starts_with("HTTP/1.1 503")),
        "no flooding connection was refused: {answers:?}"
    );
    // Once it ends, events are taken again.
    assert_eq!(post("after".into()).await.unwrap().status(), 202);
}

/// Kills the child relay when the test ends, also when it fails.
struct KillOnDrop(ChildRelay);

impl std::ops::Deref for KillOnDrop {
    type Target = ChildRelay;
    fn deref(&self) -> &ChildRelay {
        &self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}
