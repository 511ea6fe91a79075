//! TLS to the broker: a RabbitMQ node of the test's own with a TLS listener that requires a
//! client certificate, and certificates made here (a CA, the node's for `localhost`, the
//! relay's). Publishes are confirmed over TLS; a relay trusting another CA, or offering no
//! client certificate, is refused and says why.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::helpers::*;
use crate::own_broker::OwnBroker;

struct Authority {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: PathBuf,
}

impl Authority {
    fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Self { cert, key, pem }
    }

    /// A certificate for `names` signed by this authority: its PEM and key files.
    fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, file);
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn publishes_are_confirmed_over_tls_and_a_wrong_ca_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Authority::new(dir.path(), "test-ca");
    let (server_cert, server_key) = ca.issue(dir.path(), "server", &["localhost"]);
    let (client_cert, client_key) = ca.issue(dir.path(), "relay", &["kallina-relay"]);
    let tls_port = free_port();
    let broker = OwnBroker::start_with(&format!(
        "listeners.ssl.default = {tls_port}\n\
         ssl_options.cacertfile = {}\n\
         ssl_options.certfile = {}\n\
         ssl_options.keyfile = {}\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n",
        path(&ca.pem),
        path(&server_cert),
        path(&server_key),
    ))
    .await;
    // The URL names the address; the certificate names `localhost`: the server name setting
    // says which name to check.
    let url = format!("amqps://guest:guest@127.0.0.1:{tls_port}/%2f");
    let tls = |ca: &Path| {
        Config::default()
            .with_broker(&url)
            .set("KALLINA_RELAY_BROKER_TLS_CA", path(ca))
            .set("KALLINA_RELAY_BROKER_TLS_SERVER_NAME", "localhost")
            .set("KALLINA_RELAY_CONFIRM_TIMEOUT", "5s")
    };
    let queue = random_name("test.tls");
    let app = spawn_app(
        tls(&ca.pem)
            .set("KALLINA_RELAY_BROKER_TLS_CERT", path(&client_cert))
            .set("KALLINA_RELAY_BROKER_TLS_KEY", path(&client_key))
            .file(&queue_file(&queue, "#")),
    )
    .await;
    app.wait_broker_connected().await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let body = event_body("call.ended", &format!("tls-{i}"));
        assert_eq!(app.post_signed(body.clone()).await.status(), 202);
        sent.push(sha256_hex(body.as_bytes()));
    }
    app.wait_outbox_empty().await;
    let plain = lapin::Connection::connect(&broker.url(), Default::default())
        .await
        .unwrap();
    let counts = arrivals(&drain_queue(&plain, &queue).await);
    assert_eq!(counts, arrivals_of_ids(&sent));

    // Another CA: the broker's certificate is not trusted, and the relay says so.
    let other = Authority::new(dir.path(), "other-ca");
    let untrusting = spawn_app(tls(&other.pem)).await;
    // No client certificate: the broker refuses the handshake.
    let anonymous = spawn_app(tls(&ca.pem)).await;
    // Without a client certificate the broker's alert and its closing the socket race: the
    // relay sees one or the other, never a session.
    let refusals: [(&TestApp, &[&str]); 2] = [
        (&untrusting, &["invalid peer certificate"]),
        (&anonymous, &["certificaterequired", "connection reset"]),
    ];
    for (relay, expected) in refusals {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let reason = loop {
            let (_, ready) = relay.readyz().await;
            if ready["broker"]["state"] == "disconnected" {
                break ready["broker"]["reason"].as_str().unwrap_or("").to_string();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay did not report a refused handshake: {ready}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let lower = reason.to_lowercase();
        assert!(expected.iter().any(|e| lower.contains(e)), "{reason}");
        assert!(!reason.contains("guest:guest"), "{reason}");
        println!("refused: {reason}");
    }
    untrusting.stop().await;
    anonymous.stop().await;
    app.stop().await;
}
