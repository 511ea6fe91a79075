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

/// One signed event of the ingest scenarios' size, for those that send the same body over
/// and over (duplicates, the plain publisher, store filling).
pub(crate) fn body(marker: &str) -> Vec<u8> {
    let mut body = envelope_prefix(marker);
    while body.len() < SMALL_BODY - 3 {
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
    /// wrk's own CPU time over the run's wall time: how much of the 2 shared cores the load
    /// generator took from what it measured.
    pub(crate) generator_cores: f64,
}

/// New events: `CONNECTIONS` connections, every request a different signed body.
pub(crate) fn wrk_new(dir: &Path, port: u16, run: &str, seconds: u32) -> Result<WrkResult> {
    let body = SignedBody::new(run, SMALL_BODY)?;
    wrk_signed(dir, port, &body, CONNECTIONS, run, seconds)
}

/// Duplicates: `CONNECTIONS` connections sending one signed body over and over.
pub(crate) fn wrk_same(dir: &Path, port: u16, run: &str, seconds: u32) -> Result<WrkResult> {
    let body = body(run);
    let body_file = dir.join(format!("body-{run}.json"));
    std::fs::write(&body_file, &body)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/wrk/post.lua");
    let mut command = wrk_command(CONNECTIONS, seconds, &script, port);
    command
        .env("KALLINA_BENCH_BODY_FILE", &body_file)
        .env("KALLINA_BENCH_SIGNATURE", sign(SECRET.as_bytes(), &body));
    run_wrk(command, run)
}

/// wrk with two threads (one per core), `connections`, a script and the webhook URL.
pub(crate) fn wrk_command(connections: u32, seconds: u32, script: &Path, port: u16) -> Command {
    let mut command = Command::new("wrk");
    command
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            // A slow fsync should show in p99, not vanish as a timeout (wrk's default is 2 s
            // and timed-out requests are left out of its latencies).
            "--timeout",
            "10s",
            "--latency",
            "-s",
        ])
        .arg(script)
        .arg(format!("http://127.0.0.1:{port}/webhooks/kallina"));
    command
}

/// CPU seconds used by the children this process has waited for.
fn children_cpu_seconds() -> f64 {
    cpu_seconds(libc::RUSAGE_CHILDREN)
}

/// CPU seconds, user and system, of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`).
pub(crate) fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(who, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Runs a prepared wrk command and reads its summary.
pub(crate) fn run_wrk(mut command: Command, run: &str) -> Result<WrkResult> {
    let cpu_before = children_cpu_seconds();
    let started = Instant::now();
    let output = command
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let generator_cores = (children_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
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
        generator_cores,
    };
    println!(
        "  wrk {run}: {:.0}/s p50 {:.2} ms p99 {:.2} ms non-2xx {}, wrk used {:.2} cores",
        result.rps, result.p50_ms, result.p99_ms, result.non_2xx, result.generator_cores
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
    /// The bucket of the relay's own request-duration histogram that holds the run's 99th
    /// percentile, as its upper bound: how much of `accept_p99_ms` the relay spent answering,
    /// the rest being the generator's (its timer, queueing for a connection, the client).
    pub(crate) relay_p99_at_most_ms: f64,
    /// The same for the time requests waited for the store (the writer's batch and fsync).
    pub(crate) store_p99_at_most_ms: f64,
    pub(crate) lag_p99_ms: f64,
    pub(crate) consumed: u64,
    /// The harness's own CPU (the open-loop generator and the consumer) over the run's wall
    /// time, in cores.
    pub(crate) generator_cores: f64,
    /// The relay's CPU (every thread: HTTP, store, publishing) over the run's wall time, in
    /// cores; and per accepted event, in µs. Far steadier from run to run than a p99 on
    /// shared cores, so it is the figure that compares two builds' cost.
    pub(crate) relay_cores: f64,
    pub(crate) relay_cpu_us_per_event: f64,
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
            "{}/s for {} s: {} accepted, {} errors, p99 accept {:.2} ms (the relay's own ≤ {} ms, its store's ≤ {} ms), {} consumed, p99 receive→consume {:.1} ms; the relay used {:.2} cores, {:.0} µs of CPU per event",
            self.offered, self.seconds, self.accepted, self.errors, self.accept_p99_ms, self.relay_p99_at_most_ms, self.store_p99_at_most_ms, self.consumed, self.lag_p99_ms, self.relay_cores, self.relay_cpu_us_per_event
        )
    }
}

/// The upper bound of the first bucket that holds quantile `q` of what a cumulative
/// histogram counted between two scrapes.
pub(crate) fn quantile_bound(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let counted = |i: usize| after[i].1 - before.get(i).map_or(0, |b| b.1);
    let Some(total) = after.len().checked_sub(1).map(counted) else {
        return f64::NAN;
    };
    let wanted = (total as f64 * q).ceil() as u64;
    (0..after.len())
        .find(|&i| counted(i) >= wanted)
        .map_or(f64::INFINITY, |i| after[i].0)
}

/// Connections the open-loop generator keeps, as many as the closed-loop scenarios use.
const SUSTAINED_CONNECTIONS: usize = 64;

/// Open loop: requests are due on a fixed schedule whatever the answers do, sent on the next
/// free one of [`SUSTAINED_CONNECTIONS`] connections, and latency is counted from the
/// scheduled time (no coordinated omission). A consumer reads the queue and
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
    // A fixed pool of connections, as a platform's sender keeps: one reqwest client whose
    // pool holds them, and one task per connection taking the next scheduled request when it
    // is free. A task per request opened a new connection whenever none was idle, and after
    // one slow moment thousands of them: the generator then spent 86 % of its CPU looking
    // for a free ephemeral port among the closed ones, not measuring the relay.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(SUSTAINED_CONNECTIONS)
        .build()?;
    let url = format!("http://127.0.0.1:{}/webhooks/kallina", relay.port);
    // Every request a new event: its own body (the dedup key is the body's hash), signed here.
    let bodies = SignedBody::new(&format!("sustained-{rate}"), SMALL_BODY)?;
    let accept = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let results: Arc<Mutex<BTreeMap<bool, u64>>> = Arc::default();
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let prefix = fastrand::u64(..);
    let (schedule, due) = async_channel::unbounded::<(u64, tokio::time::Instant, Vec<u8>)>();
    let connections: Vec<_> = (0..SUSTAINED_CONNECTIONS)
        .map(|_| {
            let (client, url, accept, results, due) = (
                client.clone(),
                url.clone(),
                accept.clone(),
                results.clone(),
                due.clone(),
            );
            tokio::spawn(async move {
                while let Ok((i, scheduled, body)) = due.recv().await {
                    let signature = sign(SECRET.as_bytes(), &body);
                    let response = client
                        .post(&url)
                        .header("X-Kallina-Signature", signature)
                        .header("X-Kallina-Delivery", format!("sustained-{prefix}-{i}"))
                        .header("Content-Type", "application/json")
                        .timeout(Duration::from_secs(10))
                        .body(body)
                        .send()
                        .await;
                    let ok = match response {
                        // Read to the end, so the connection goes back to the pool.
                        Ok(r) => r.status().as_u16() == 202 && r.bytes().await.is_ok(),
                        Err(_) => false,
                    };
                    // From the scheduled time, not the send: time spent waiting for a free
                    // connection counts (no coordinated omission).
                    let _ = accept
                        .lock()
                        .unwrap()
                        .record(scheduled.elapsed().as_micros() as u64);
                    *results.lock().unwrap().entry(ok).or_default() += 1;
                }
            })
        })
        .collect();
    let [answers_before, store_before] = relay.durations().await?;
    let relay_cpu_before = relay.cpu_seconds()?;
    let start = tokio::time::Instant::now();
    let cpu_before = cpu_seconds(libc::RUSAGE_SELF);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        schedule.send((i, scheduled, bodies.nth(0, i))).await?;
    }
    schedule.close();
    for connection in connections {
        connection.await?;
    }
    let [answers, store] = relay.durations().await?;
    let relay_p99_at_most_ms = quantile_bound(&answers_before, &answers, 0.99) * 1000.0;
    let store_p99_at_most_ms = quantile_bound(&store_before, &store, 0.99) * 1000.0;
    let results = results.lock().unwrap().clone();
    let accepted = results.get(&true).copied().unwrap_or(0);
    // Let the last events through the relay before reading the lag.
    let deadline = Instant::now() + Duration::from_secs(10);
    while consumed.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer_task.abort();
    let relay_cpu = relay.cpu_seconds()? - relay_cpu_before;
    let generator_cores =
        (cpu_seconds(libc::RUSAGE_SELF) - cpu_before) / start.elapsed().as_secs_f64();
    let accept_p99_ms = accept.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
    let lag_p99_ms = lags.lock().unwrap().value_at_quantile(0.99) as f64 / 1000.0;
    Ok(Sustained {
        offered: rate,
        seconds,
        accepted,
        errors: results.get(&false).copied().unwrap_or(0),
        accept_p99_ms,
        relay_p99_at_most_ms,
        store_p99_at_most_ms,
        lag_p99_ms,
        consumed: consumed.load(Ordering::Relaxed),
        generator_cores,
        relay_cores: relay_cpu / start.elapsed().as_secs_f64(),
        relay_cpu_us_per_event: relay_cpu * 1e6 / accepted.max(1) as f64,
    })
}
