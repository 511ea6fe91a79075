//! TLS to the broker (`amqps://`): the client configuration, built once at start from the PEM
//! files the settings name, so that a missing or bad file stops the start naming its setting
//! instead of failing every reconnect. ring is the crypto provider, as on the public listener.
//!
//! Trust is the CA bundle when one is set, else the system's roots (`/etc/ssl/certs`, for
//! managed brokers with public certificates). A client certificate and key, when set, are
//! offered for mutual TLS.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The PEM files TLS to the broker uses, as the settings give them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerTlsFiles {
    /// CA bundle to trust instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key, for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Which file was bad and why; the options turn it into an error naming the setting.
#[derive(Debug)]
pub enum TlsFileError {
    Ca(String),
    Cert(String),
    Key(String),
}

pub fn client_config(files: &BrokerTlsFiles) -> Result<ClientConfig, TlsFileError> {
    let roots = match &files.ca {
        Some(path) => ca_bundle(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::Ca(e.to_string()))?
        .with_root_certificates(roots);
    match &files.identity {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certificates(cert).map_err(TlsFileError::Cert)?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| TlsFileError::Key(format!("a PEM private key ({e})")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsFileError::Key(format!("the key of the client certificate ({e})")))
        }
    }
}

fn ca_bundle(path: &Path) -> Result<RootCertStore, TlsFileError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path).map_err(TlsFileError::Ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsFileError::Ca(format!("CA certificates rustls accepts ({e})")))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, TlsFileError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(TlsFileError::Ca(
            "a CA bundle: amqps:// is used and the system has no CA certificates (install \
             Debian's ca-certificates, or name the broker's CA)"
                .into(),
        ));
    }
    Ok(roots)
}

/// At least one certificate from a PEM file.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("a readable PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err("a PEM file holding at least one certificate".into());
    }
    Ok(certs)
}
