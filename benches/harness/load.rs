//! Load: the signed ~600-byte body, wrk runs (closed loop), and the open-loop generator
//! with a consumer for the sustained scenarios.

use super::*;

/// A call.ended envelope with a fresh timestamp, open inside its `notes` string: callers pad
/// the notes to the size they need and close it.
pub(crate) fn envelope_prefix(marker: &str) -> String {
    let ts = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    format!(
        r#"{{"event":"call.ended","timestamp":"{ts}","data":{{"call_id":"call_{marker}","agent_id":"agent_456","duration":180,"outcome":"appointment_booked","actions":[{{"type":"calendar_booking","status":"completed","data":{{"date":"2025-01-25","time":"14:00"}}}}],"notes":""#
    )
}

/// A ~600-byte call.ended body with a fresh timestamp.
pub(crate) fn body(marker: &str) -> Vec<u8> {
    let mut body = envelope_prefix(marker);
    while body.len() < 596 {
        body.push('x');
    }
    body.push_str("\"}}");
    body.into_bytes()
}

pub(crate) struct WrkResult {
    pub(crate) rps: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) non_2xx: u64,
    /// Requests answered in the run.
    pub(crate) requests: u64,
    /// wrk's "Socket errors" line when it printed one (timeouts are not in the latencies).
    pub(crate) socket_errors: Option<String>,
}

/// Runs wrk for `seconds` with 64 connections; `unique` gives every request its own delivery id.
pub(crate) fn wrk(
    dir: &Path,
    port: u16,
    unique: bool,
    run: &str,
    seconds: u32,
) -> Result<WrkResult> {
    let body = body(run);
    let body_file = dir.join(format!("body-{run}.json"));
    std::fs::write(&body_file, &body)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/wrk/post.lua");
    let mut command = Command::new("wrk");
    command
        .args([
            "-t2",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/webhooks/kallina"))
        .env("KALLINA_BENCH_BODY_FILE", &body_file)
        .env("KALLINA_BENCH_SIGNATURE", sign(SECRET.as_bytes(), &body))
        .env("KALLINA_BENCH_UNIQUE", if unique { "1" } else { "0" })
        .env("KALLINA_BENCH_RUN", run);
    run_wrk(command, run)
}

/// Runs a prepared wrk command and reads its summary.
pub(crate) fn run_wrk(mut command: Command, run: &str) -> Result<WrkResult> {
    let output = command
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let field = |prefix: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
    };
    let rps: f64 = field("Requests/sec:")
        .with_context(|| {
            format!(
                "wrk printed no Requests/sec: {}{}",
                text,
                String::from_utf8_lossy(&output.stderr)
            )
        })?
        .parse()?;
    let non_2xx = field("Non-2xx or 3xx responses:").map_or(0, |v| v.parse().unwrap_or(0));
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let result = WrkResult {
        rps,
        p50_ms: latency(&field("50%"))?,
        p99_ms: latency(&field("99%"))?,
        non_2xx,
        requests,
        socket_errors: field("Socket errors:"),
    };
    println!(
        "  wrk {run}: {:.0}/s p50 {:.2} ms p99 {:.2} ms non-2xx {}",
        result.rps, result.p50_ms, result.p99_ms, result.non_2xx
    );
    Ok(result)
}

pub(crate) fn latency(value: &Option<String>) -> Result<f64> {
    let v = value
        .as_deref()
        .context("wrk printed no latency distribution")?;
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unexpected wrk latency {v}")
    };
    Ok(number.parse::<f64>()? * factor)
}

pub(crate) struct Sustained {
    pub(crate) offered: u64,
    pub(crate) seconds: u64,
    pub(crate) accepted: u64,
    pub(crate) errors: u64,
    pub(crate) accept_p99_ms: f64,
    pub(crate) lag_p99_ms: f64,
    pub(crate) consumed: u64,
}

impl Sustained {
    pub(crate) fn meets_targets(&self) -> bool {
        self.errors == 0
            && self.accept_p99_ms <= 10.0
            && self.lag_p99_ms <= 250.0
            && self.consumed >= self.accepted
    }
    pub(crate) fn describe(&self) -> String {
        format!(
            "{}/s for {} s: {} accepted, {} errors, p99 accept {:.2} ms, {} consumed, p99 receive→consume {:.1} ms",
            self.offered, self.seconds, self.accepted, self.errors, self.accept_p99_ms, self.consumed, self.lag_p99_ms
        )
    }
}

pub(crate) async fn sustained(
    relay: &Relay,
    queue: &str,
    rate: u64,
    seconds: u64,
) -> Result<Sustained> {
    let run = sustained_run(relay, queue, rate, seconds).await?;
    println!("  sustained: {}", run.describe());
    Ok(run)
}

/// Open loop: requests are sent on a fixed schedule whatever the answers do, and latency is
/// counted from the scheduled time (no coordinated omission). A consumer reads the queue and
/// records receive→consume lag from `x-received-at`.
pub(crate) async fn sustained_run(
    relay: &Relay,
    queue: &str,
    rate: u64,
    seconds: u64,
) -> Result<Sustained> {
    let connection = broker().await?;
    let channel = connection.create_channel().await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("bench-{}", fastrand::u32(..)).as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let lags = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let consumed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let consumer_task = {
        let (lags, consumed) = (lags.clone(), consumed.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let received = delivery.properties.headers().as_ref().and_then(|h| {
                    match h.inner().get("x-received-at") {
                        Some(AMQPValue::LongString(s)) => time::OffsetDateTime::parse(
                            &s.to_string(),
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok(),
                        _ => None,
                    }
                });
                if let Some(received) = received {
                    let lag = time::OffsetDateTime::now_utc() - received;
                    let _ = lags
                        .lock()
                        .unwrap()
                        .record(lag.whole_microseconds().max(0) as u64);
                }
                consumed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()?;
    let url = format!("http://127.0.0.1:{}/webhooks/kallina", relay.port);
    let body = Arc::new(body(&format!("sustained-{rate}")));
    let signature = Arc::new(sign(SECRET.as_bytes(), &body));
    let accept = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let results: Arc<Mutex<BTreeMap<bool, u64>>> = Arc::default();
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let prefix = fastrand::u64(..);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        let (client, url, body, signature, accept, results) = (
            client.clone(),
            url.clone(),
            body.clone(),
            signature.clone(),
            accept.clone(),
            results.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(url)
                .header("X-Kallina-Signature", signature.as_str())
                .header("X-Kallina-Delivery", format!("sustained-{prefix}-{i}"))
                .header("Content-Type", "application/json")
                .timeout(Duration::from_secs(10))
                .body(body.as_ref().clone())
                .send()
                .await;
            let ok = response.is_ok_and(|r| r.status().as_u16() == 202);
            let _ = accept
                .lock()
                .unwrap()
                .record(scheduled.elapsed().as_micros() as u64);
            *results.lock().unwrap().entry(ok).or_default() += 1;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let results = results.lock().unwrap().clone();
    let accepted = results.get(&true).copied().unwrap_or(0);
    // Let the last events through the relay before reading the lag.
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumed.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer_task.abort();
    let accept_p99_ms = accept.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
    let lag_p99_ms = lags.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
    Ok(Sustained {
        offered: rate,
        seconds,
        accepted,
        errors: results.get(&false).copied().unwrap_or(0),
        accept_p99_ms,
        lag_p99_ms,
        consumed: consumed.load(Ordering::Relaxed),
    })
}
