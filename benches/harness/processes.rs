//! The processes under test: the relay binary as a child, the bare actix-web baseline, and
//! the TCP forwarder that plays "broker down".

use super::*;

pub(crate) async fn spawn_bare_endpoint() -> Result<u16> {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = HttpServer::new(|| {
        App::new().route(
            "/webhooks/kallina",
            web::post().to(|body: web::Bytes| async move {
                std::hint::black_box(&body);
                HttpResponse::Ok().json(serde_json::json!({"status": "accepted"}))
            }),
        )
    })
    .workers(2)
    .disable_signals()
    .listen(listener)?
    .run();
    tokio::spawn(server);
    Ok(port)
}

/// The relay binary under test: `KALLINA_BENCH_RELAY_BIN` when set (a binary saved from an
/// earlier commit, to measure it beside this one on the same machine in the same hour), else
/// the one cargo built for this harness.
pub(crate) fn relay_bin() -> Result<PathBuf> {
    let Some(path) = std::env::var_os("KALLINA_BENCH_RELAY_BIN") else {
        return Ok(PathBuf::from(env!("CARGO_BIN_EXE_kallina-relay")));
    };
    // Absolute, so that the heading names the file whatever directory cargo ran us from.
    std::fs::canonicalize(&path)
        .with_context(|| format!("KALLINA_BENCH_RELAY_BIN={}", Path::new(&path).display()))
}

/// The release binary as a child process.
pub(crate) struct Relay {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) admin: u16,
    pub(crate) client: reqwest::Client,
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Relay {
    pub(crate) fn start(
        data_dir: &Path,
        config: &Path,
        exchange: &str,
        amqp: &str,
    ) -> Result<Self> {
        let (port, admin) = (free_port(), free_port());
        let mut command = Command::new(relay_bin()?);
        command.env_clear();
        // Knobs to experiment with, passed through when set.
        for name in [
            "KALLINA_RELAY_CACHE_SIZE",
            "KALLINA_RELAY_ARCHIVE_RETENTION",
            "MIMALLOC_PURGE_DELAY",
            "MIMALLOC_ARENA_EAGER_COMMIT",
        ] {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        let child = command
            .env("KALLINA_WEBHOOK_SECRET", SECRET)
            .env("KALLINA_RELAY_CONFIG", config)
            .env("KALLINA_RELAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("KALLINA_RELAY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("KALLINA_RELAY_DATA_DIR", data_dir)
            .env("KALLINA_RELAY_AMQP_URL", amqp)
            .env("KALLINA_RELAY_EXCHANGE", exchange)
            .env(
                "KALLINA_RELAY_UNROUTED_EXCHANGE",
                format!("{exchange}.unrouted"),
            )
            .env("KALLINA_RELAY_ID_HEADER", "X-Kallina-Delivery")
            .env("KALLINA_RELAY_OUTBOX_MAX", "2000000")
            .env("KALLINA_RELAY_PUBLISH_WINDOW", WINDOW.to_string())
            .env("KALLINA_RELAY_LOG_FORMAT", "json")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the relay")?;
        let client = reqwest::Client::builder().no_proxy().build()?;
        Ok(Self {
            child,
            port,
            admin,
            client,
        })
    }

    pub(crate) async fn wait_healthy(&self) -> Result<()> {
        self.wait_for("/healthz", |status, _| status.is_success())
            .await
            .context("the relay did not start")
    }

    /// Waits for `/readyz` to report `broker_connected` (connected, topology declared, the
    /// bench's queue among it), so that a purge or a consumer finds the queue. Readiness alone
    /// does not wait for the broker: events wait in the outbox meanwhile.
    pub(crate) async fn wait_connected(&self) -> Result<()> {
        self.wait_for("/readyz", |_, body| {
            body["broker_connected"] == serde_json::Value::Bool(true)
        })
        .await
        .context("the relay did not connect to the broker and declare its topology")
    }

    /// Polls an admin endpoint every 100 ms, for up to a minute, until `done` holds for its
    /// status and JSON body (`Null` when the body is not JSON).
    async fn wait_for(
        &self,
        path: &str,
        done: fn(reqwest::StatusCode, &serde_json::Value) -> bool,
    ) -> Result<()> {
        for _ in 0..600 {
            if let Ok(r) = self.admin_get(path).await {
                let status = r.status();
                let body = r.json().await.unwrap_or(serde_json::Value::Null);
                if done(status, &body) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{path} did not answer as awaited within a minute")
    }

    /// `GET` on the admin listener.
    async fn admin_get(&self, path: &str) -> Result<reqwest::Response> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin);
        Ok(self.client.get(url).send().await?)
    }

    pub(crate) async fn outbox(&self) -> Result<u64> {
        let ready: serde_json::Value = self.admin_get("/readyz").await?.json().await?;
        ready["store"]["outbox_events"]
            .as_u64()
            .context("outbox_events")
    }

    pub(crate) async fn wait_outbox_at_most(&self, n: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while self.outbox().await? > n {
            if Instant::now() > deadline {
                bail!("the outbox did not drain within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// The relay's own histograms of how long a request took to answer
    /// (`kallina_relay_request_duration_seconds`) and how long it waited for the store
    /// (`kallina_relay_store_commit_duration_seconds`): cumulative counts by upper bound in
    /// seconds, `+Inf` last, as `/metrics` gives them.
    pub(crate) async fn durations(&self) -> Result<[Vec<(f64, u64)>; 2]> {
        let text = self.admin_get("/metrics").await?.text().await?;
        let buckets = |name: &str| -> Result<Vec<(f64, u64)>> {
            let prefix = format!("{name}_bucket{{le=\"");
            let mut buckets = Vec::new();
            for rest in text.lines().filter_map(|l| l.strip_prefix(prefix.as_str())) {
                let (le, count) = rest.split_once("\"} ").context("a bucket line")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()?
                };
                buckets.push((le, count.trim().parse()?));
            }
            Ok(buckets)
        };
        Ok([
            buckets("kallina_relay_request_duration_seconds")?,
            buckets("kallina_relay_store_commit_duration_seconds")?,
        ])
    }

    /// The relay's CPU time so far (user and system, every thread), in seconds.
    pub(crate) fn cpu_seconds(&self) -> Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th of the line, the 12th and 13th after it.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("/proc/<pid>/stat without a command name")?
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(ticks as f64 / per_second)
    }

    pub(crate) fn peak_rss_mb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    }

    pub(crate) fn stop(&mut self) -> Result<()> {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the relay exited with {status}");
        }
        Ok(())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder to RabbitMQ that can be cut (the relay's "broker down").
pub(crate) struct Forwarder {
    pub(crate) port: u16,
    pub(crate) cut: Arc<AtomicBool>,
    pub(crate) tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Forwarder {
    pub(crate) async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, t) = (cut.clone(), tasks.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue;
                }
                t.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Ok(Self { port, cut, tasks })
    }
    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
    pub(crate) fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}
