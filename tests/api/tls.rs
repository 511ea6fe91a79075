//! The public listener over TLS (KALLINA_RELAY_TLS_CERT / KALLINA_RELAY_TLS_KEY), with a
//! self-signed certificate made here.

use std::path::Path;
use std::time::Duration;

use kallina_relay::signature::sign;

use crate::helpers::*;

/// A self-signed certificate for `localhost`, written as PEM files under `dir`.
fn self_signed(dir: &Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    (cert.pem(), cert_path, key_path)
}

#[tokio::test]
async fn with_a_certificate_the_public_listener_speaks_tls_only() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, cert, key) = self_signed(dir.path());
    let app = spawn_app(
        Config::default()
            .set("KALLINA_RELAY_TLS_CERT", cert.to_str().unwrap())
            .set("KALLINA_RELAY_TLS_KEY", key.to_str().unwrap()),
    )
    .await;
    let port = app.address.rsplit(':').next().unwrap();
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let body = event_body("call.ended", "over-tls");
    let response = client
        .post(format!("https://localhost:{port}/webhooks/kallina"))
        .header(
            "X-Kallina-Signature",
            sign(SECRET.as_bytes(), body.as_bytes()),
        )
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);

    // Plain HTTP on the TLS port gets no answer that a client could take for one.
    let plain = app
        .client
        .post(format!("{}/webhooks/kallina", app.address))
        .body(event_body("call.ended", "plain"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that does not trust the certificate refuses the handshake.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .no_proxy()
        .build()
        .unwrap();
    let refused = untrusting
        .get(format!("https://localhost:{port}/webhooks/kallina"))
        .send()
        .await;
    assert!(refused.is_err());
    app.stop().await;
}

#[test]
fn an_unreadable_certificate_stops_the_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, key) = self_signed(dir.path());
    let run = |cert: &Path, key: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kallina-relay"))
            .env_clear()
            .env("KALLINA_WEBHOOK_SECRET", SECRET)
            .env("KALLINA_RELAY_DATA_DIR", dir.path().join("data"))
            .env("KALLINA_RELAY_LISTEN", "127.0.0.1:0")
            .env("KALLINA_RELAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("KALLINA_RELAY_AMQP_URL", NO_BROKER_URL)
            .env("KALLINA_RELAY_TLS_CERT", cert)
            .env("KALLINA_RELAY_TLS_KEY", key)
            .output()
            .unwrap()
    };
    let missing = run(&dir.path().join("nope.pem"), &key);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("KALLINA_RELAY_TLS_CERT"), "{stderr}");

    // The key in place of the certificate: no certificate in the file.
    let swapped = run(&key, &key);
    assert_eq!(swapped.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&swapped.stderr);
    assert!(stderr.contains("KALLINA_RELAY_TLS_CERT"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}
