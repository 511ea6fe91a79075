//! Replicas behind the shipped proxy config (`deploy/nginx/kallina-relay.conf`, nginx from
//! Debian). The proxy routes by hashing `X-Kallina-Signature` as sent:
//!
//! - three relays take events and the platform's retries of them (same bytes), some after the
//!   replica that took the original restarted: each event is published once; then a replica
//!   is removed by the README's procedure, and the events that change publishes twice are
//!   counted (exactly the removed replica's share: the ring moves nothing else);
//! - a digest that is re-cased would reach a replica without the original's dedup key; the
//!   relay refuses every spelling but the platform's lowercase one, so such a replay is never
//!   published twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kallina_relay::signature::sign;

use crate::helpers::*;

/// nginx on the shipped config, with the given replicas as its upstream servers.
struct Proxy {
    process: Child,
    address: String,
    port: u16,
    nginx: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(replicas: &[u16]) -> Self {
        let nginx = std::env::var("KALLINA_TEST_NGINX")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                panic!(
                    "KALLINA_TEST_NGINX is not set: run the suite with `scripts/test.sh`, which \
                 fetches Debian's nginx (or set it to an nginx binary: scripts/ensure-nginx.sh \
                 prints one)"
                )
            });
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let shipped = std::fs::read_to_string("deploy/nginx/kallina-relay.conf").unwrap();
        std::fs::write(
            dir.path().join("kallina-relay.conf"),
            local(&shipped, port, replicas),
        )
        .unwrap();
        let conf = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "pid {conf}/nginx.pid;\nerror_log {conf}/error.log notice;\ndaemon off;\n\
                 events {{}}\n\
                 http {{\n    client_body_temp_path {conf}/tmp/body;\n    \
                 proxy_temp_path {conf}/tmp/proxy;\n    fastcgi_temp_path {conf}/tmp/fastcgi;\n    \
                 uwsgi_temp_path {conf}/tmp/uwsgi;\n    scgi_temp_path {conf}/tmp/scgi;\n    \
                 access_log off;\n    include {conf}/kallina-relay.conf;\n}}\n"
            ),
        )
        .unwrap();
        let process = Command::new(&nginx)
            .args([
                "-p",
                &conf,
                "-c",
                &format!("{conf}/nginx.conf"),
                "-e",
                &format!("{conf}/error.log"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", nginx.display()));
        let proxy = Self {
            process,
            address: format!("http://127.0.0.1:{port}"),
            port,
            nginx,
            _dir: dir,
        };
        proxy.wait_listening(port).await;
        proxy
    }

    async fn wait_listening(&self, port: u16) {
        let log = self._dir.path().join("error.log");
        wait_until(Duration::from_secs(10), "nginx to listen", || async {
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            assert!(
                up || !std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("[emerg]"),
                "nginx refused the config: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            up
        })
        .await;
    }

    /// The shipped config with another set of replicas, as an operator's reload: returns once
    /// the old workers have exited, so that every later request sees the new ring.
    async fn reload(&self, replicas: &[u16]) {
        let dir = self._dir.path();
        let shipped = std::fs::read_to_string("deploy/nginx/kallina-relay.conf").unwrap();
        std::fs::write(
            dir.join("kallina-relay.conf"),
            local(&shipped, self.port, replicas),
        )
        .unwrap();
        let log = dir.join("error.log");
        let exits = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .matches("exited with code")
                .count()
        };
        let before = exits();
        let conf = dir.display().to_string();
        let status = Command::new(&self.nginx)
            .args([
                "-p",
                &conf,
                "-c",
                &format!("{conf}/nginx.conf"),
                "-s",
                "reload",
            ])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nginx -s reload");
        wait_until(
            Duration::from_secs(20),
            "nginx's old workers to exit",
            || async { exits() > before },
        )
        .await;
    }

    /// Posts `body` with `signature` through the proxy: the status, the error's reason (if
    /// any), and which replica answered.
    async fn post(&self, body: &str, signature: &str) -> (u16, Option<String>, String) {
        let response = http_client()
            .post(format!("{}/webhooks/kallina", self.address))
            .header("Content-Type", "application/json")
            .header("X-Kallina-Signature", signature)
            .body(body.to_string())
            .send()
            .await
            .expect("the proxy answers");
        let status = response.status().as_u16();
        let replica = response
            .headers()
            .get("x-test-replica")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        let reason = answer["error"]["details"]["reason"]
            .as_str()
            .map(str::to_string);
        (status, reason, replica)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The shipped config on loopback: plain HTTP on `port`, the replicas as its servers, and a
/// header saying which replica answered (for the test only). Everything else stays as shipped.
fn local(shipped: &str, port: u16, replicas: &[u16]) -> String {
    let mut out = String::new();
    let mut servers_written = false;
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("server 192.0.2.") {
            if !servers_written {
                for replica in replicas {
                    out.push_str(&format!(
                        "    server 127.0.0.1:{replica} max_fails=3 fail_timeout=10s;\n"
                    ));
                }
                servers_written = true;
            }
            continue;
        }
        if trimmed.starts_with("ssl_") {
            continue;
        }
        if trimmed.starts_with("listen 443 ssl;") {
            out.push_str(&format!("    listen 127.0.0.1:{port};\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if trimmed.starts_with("location = /webhooks/kallina {") {
            out.push_str("        add_header X-Test-Replica $upstream_addr always;\n");
        }
    }
    assert!(
        servers_written,
        "the shipped config has no upstream servers to replace"
    );
    out
}

/// The digest with its first letter upper-cased: the same MAC, another header.
fn mixed_case(signature: &str) -> String {
    let at = 7 + signature[7..]
        .find(|c: char| c.is_ascii_alphabetic())
        .expect("64 hex digits hold a letter");
    let mut recased = signature.to_string();
    recased.replace_range(at..=at, &signature[at..=at].to_ascii_uppercase());
    recased
}

fn port_of(app: &TestApp) -> u16 {
    app.address.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_recased_digest_through_the_shipped_proxy_is_refused_and_published_once() {
    let connection = broker().await;
    let names = Names::random();
    let queue = random_name("test.replicas");
    let config = Config::default()
        .with_broker(BROKER_URL)
        .file(&queue_file(&queue, "#"));
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let data = |dir: &tempfile::TempDir| -> PathBuf { Path::new(dir.path()).join("data") };
    let a = spawn_app_at(config.clone(), &data(&dirs[0]), names.clone(), None).await;
    let b = spawn_app_at(config, &data(&dirs[1]), names.clone(), None).await;
    let proxy = Proxy::start(&[port_of(&a), port_of(&b)]).await;

    // Until a few events had their re-cased digest routed to the other replica: the case this
    // is about (with a digest of either case accepted, that replica would take it as new).
    let mut crossed = 0;
    let mut sent = Vec::new();
    let mut accepted = Vec::new();
    for i in 0..64 {
        let body = event_body("call.ended", &format!("recased-{i}"));
        let signature = sign(SECRET.as_bytes(), body.as_bytes());
        let (status, _, first) = proxy.post(&body, &signature).await;
        assert_eq!(status, 202, "the original through the proxy");
        sent.push(sha256_hex(body.as_bytes()));
        for recased in [
            format!("sha256={}", signature[7..].to_ascii_uppercase()),
            mixed_case(&signature),
        ] {
            let (status, reason, replica) = proxy.post(&body, &recased).await;
            if (status, reason.as_deref()) != (401, Some("malformed_digest")) {
                accepted.push(format!("{recased}: {status} from {replica}"));
            }
            if replica != first {
                crossed += 1;
            }
        }
        if crossed >= 3 {
            break;
        }
    }
    assert!(
        crossed >= 3,
        "no re-cased digest reached the other replica: the test proves nothing"
    );

    a.wait_outbox_empty().await;
    b.wait_outbox_empty().await;
    let mut published: BTreeMap<String, usize> = BTreeMap::new();
    for message in drain_queue(&connection, &queue).await {
        *published.entry(message_id(&message)).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = sent.into_iter().map(|id| (id, 1)).collect();
    // Publishes first: what a consumer would see if a re-cased replay got through.
    assert_eq!(published, expected, "each event published once");
    assert!(
        accepted.is_empty(),
        "re-cased digests not refused as malformed_digest: {accepted:#?}"
    );
    drop(proxy);
    a.stop().await;
    b.stop_and_clean_broker(&connection, &[&queue]).await;
}

/// One replica of the three: a relay on a port of its own (the proxy's upstream address) and
/// a data directory of its own, which a restart keeps.
struct Replica {
    app: Option<TestApp>,
    port: u16,
    config: Config,
    names: Names,
    dir: tempfile::TempDir,
}

impl Replica {
    async fn start(config: &Config, names: &Names) -> Self {
        let port = free_port();
        let config = config
            .clone()
            .set("KALLINA_RELAY_LISTEN", format!("127.0.0.1:{port}"));
        let dir = tempfile::tempdir().unwrap();
        let app = spawn_app_at(
            config.clone(),
            &dir.path().join("data"),
            names.clone(),
            None,
        )
        .await;
        Self {
            app: Some(app),
            port,
            config,
            names: names.clone(),
            dir,
        }
    }

    fn app(&self) -> &TestApp {
        self.app.as_ref().expect("running")
    }

    fn upstream(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        self.app.take().expect("running").stop().await;
        let data = self.dir.path().join("data");
        self.app = Some(spawn_app_at(self.config.clone(), &data, self.names.clone(), None).await);
    }

    async fn stop(mut self) {
        if let Some(app) = self.app.take() {
            app.stop().await;
        }
    }
}

/// Posts the original of every body through the proxy, then its retry: each retry must be
/// answered `duplicate` by the replica that took the original. Returns that replica per body.
async fn originals(proxy: &Proxy, bodies: &[String]) -> Vec<String> {
    let mut took = Vec::new();
    for body in bodies {
        let (status, _, replica) = proxy
            .post(body, &sign(SECRET.as_bytes(), body.as_bytes()))
            .await;
        assert_eq!(status, 202, "the original through the proxy");
        took.push(replica);
    }
    took
}

/// The platform's retries (same bytes) of every body: the status each was answered with.
async fn retries(proxy: &Proxy, bodies: &[String]) -> Vec<(u16, String)> {
    let mut answers = Vec::new();
    for body in bodies {
        let (status, _, replica) = proxy
            .post(body, &sign(SECRET.as_bytes(), body.as_bytes()))
            .await;
        answers.push((status, replica));
    }
    answers
}

#[tokio::test]
async fn three_replicas_publish_each_event_once_through_retries_and_a_restart() {
    let connection = broker().await;
    let names = Names::random();
    let queue = random_name("test.replicas");
    let config = Config::default()
        .with_broker(BROKER_URL)
        .file(&queue_file(&queue, "#"));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(&config, &names).await);
    }
    let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    let proxy = Proxy::start(&ports).await;
    let bodies: Vec<String> = (0..90)
        .map(|i| event_body("call.ended", &format!("replicated-{i}")))
        .collect();
    let took = originals(&proxy, &bodies).await;
    for replica in &replicas {
        let share = took.iter().filter(|t| **t == replica.upstream()).count();
        assert!(
            share > 0,
            "the ring gave {} nothing: {took:?}",
            replica.upstream()
        );
    }

    // The replica that took the first event restarts; then every event is retried.
    let restarted = replicas
        .iter()
        .position(|r| r.upstream() == took[0])
        .unwrap();
    replicas[restarted].restart().await;
    let answers = retries(&proxy, &bodies).await;
    for ((status, replica), first) in answers.iter().zip(&took) {
        assert_eq!(
            (*status, replica),
            (200, first),
            "a retry, answered duplicate where stored"
        );
    }
    for replica in &replicas {
        replica.app().wait_outbox_empty().await;
    }
    let once: BTreeMap<String, usize> = bodies
        .iter()
        .map(|b| (sha256_hex(b.as_bytes()), 1))
        .collect();
    let published = arrivals(&drain_queue(&connection, &queue).await);
    assert_eq!(published, once, "each event published once");

    // Removing a replica, as the README says: out of the proxy's ring, drained, stopped. The
    // platform then retries every event once more (the worst case: every answer was lost).
    let removed = replicas.remove((restarted + 1) % 3);
    let kept: Vec<u16> = replicas.iter().map(|r| r.port).collect();
    proxy.reload(&kept).await;
    removed.app().wait_outbox_empty().await;
    let removed_upstream = removed.upstream();
    removed.stop().await;
    let answers = retries(&proxy, &bodies).await;
    for replica in &replicas {
        replica.app().wait_outbox_empty().await;
    }
    let published = arrivals(&drain_queue(&connection, &queue).await);
    let moved: Vec<&String> = bodies
        .iter()
        .zip(&took)
        .filter(|(_, t)| **t == removed_upstream)
        .map(|(b, _)| b)
        .collect();
    let twice: BTreeMap<String, usize> = moved
        .iter()
        .map(|b| (sha256_hex(b.as_bytes()), 1))
        .collect();
    println!(
        "replica removal: {} of {} events had been taken by the removed replica; their retries \
         after the removal published {} events a second time; {} retries answered duplicate",
        moved.len(),
        bodies.len(),
        published.len(),
        answers.iter().filter(|(status, _)| *status == 200).count()
    );
    // Only the removed replica's share moved: those events are published a second time (same
    // message_id), every other retry is answered duplicate where it was stored.
    assert_eq!(published, twice, "what the removal publishes again");
    for ((status, replica), first) in answers.iter().zip(&took) {
        if *first != removed_upstream {
            assert_eq!((*status, replica), (200, first));
        }
    }
    drop(proxy);
    let last = replicas.pop().unwrap();
    for replica in replicas {
        replica.stop().await;
    }
    let app = last.app.expect("running");
    app.stop_and_clean_broker(&connection, &[&queue]).await;
}
