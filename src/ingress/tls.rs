//! TLS on the public listener, for deployments without a terminating proxy.

use std::sync::Arc;

use anyhow::Context;

use super::options::TlsFiles;

/// The public listener's TLS: the certificate chain and key read once, at start, so that a
/// missing or unreadable file stops the start instead of failing every handshake. ring is the
/// crypto provider (no C toolchain needed to build); TLS 1.2 and 1.3 with rustls's defaults.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the TLS certificate chain {} (KALLINA_RELAY_TLS_CERT)",
                files.cert.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {} (KALLINA_RELAY_TLS_CERT)",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key).with_context(|| {
        format!(
            "cannot read the TLS private key {} (KALLINA_RELAY_TLS_KEY)",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS key does not match the certificate (KALLINA_RELAY_TLS_CERT/KEY)")
}
