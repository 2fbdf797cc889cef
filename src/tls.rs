//! TLS: the crypto provider, certificate loading, and the API listener's
//! server config (certificates, key, client verification, ALPN).
//!
//! A leaf: it imports nothing of the crate, so the server, the login check
//! against the Manager and the client all take their TLS from here.
//!
//! One crypto provider for the whole process, aws-lc-rs (see Cargo.toml for
//! why). TLS 1.2 and 1.3 only (rustls has nothing older, so TLS 1.0/1.1
//! clients are refused with a `protocol_version` alert). With
//! `require_client_certificate`, clients must present a certificate signed
//! by `ca_certificate`; with a CA but no requirement, a certificate is
//! verified when presented. This module reads files only when asked to build
//! or check a config, never per connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// ALPN ids, preferred first: HTTP/2 then HTTP/1.1 (RFC 7301 registry).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// `[api.tls]`: the listener's certificate, key and client verification.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub key: PathBuf,
    pub ca_certificate: Option<PathBuf>,
    /// mTLS: refuse clients without a certificate signed by `ca_certificate`.
    pub require_client_certificate: bool,
}

/// A TLS file or setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificates: {source}")]
    ReadCerts {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: no certificate in the file")]
    NoCert { key: &'static str, path: PathBuf },
    #[error("{path}: cannot read a private key: {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path}: unusable with {cert}: {source}")]
    KeyMismatch {
        path: PathBuf,
        cert: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: unusable as client CA: {source}")]
    ClientCaCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: unusable as client CA: {source}")]
    ClientCaVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("cannot build the TLS config: {0}")]
    Build(#[source] rustls::Error),
}

impl TlsError {
    /// The config key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::ReadCerts { key, .. } | TlsError::NoCert { key, .. } => key,
            TlsError::ReadKey { .. } | TlsError::KeyMismatch { .. } => "api.tls.key",
            TlsError::ClientCaCert { .. } | TlsError::ClientCaVerifier { .. } => {
                "api.tls.ca_certificate"
            }
            TlsError::Build(_) => "api.tls",
        }
    }
}

/// The process-wide crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_certs_for("manager.ca_certificate", path)
}

fn load_certs_for(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::ReadCerts {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Check the files of `[api.tls]` without keeping anything: readable, and a
/// key that matches the certificate.
pub fn check(cfg: &TlsConfig) -> Result<(), TlsError> {
    server_config(cfg).map(drop)
}

/// The rustls server config for the API listener.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let certs = load_certs_for("api.tls.certificate", &cfg.certificate)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|source| TlsError::ReadKey {
        path: cfg.key.clone(),
        source,
    })?;
    // Checked here, not at the first handshake: a mismatched pair must stop
    // the service at start.
    let certified = rustls::sign::CertifiedKey::from_der(certs.clone(), key.clone_key(), &provider)
        .map_err(|source| TlsError::KeyMismatch {
            path: cfg.key.clone(),
            cert: cfg.certificate.clone(),
            source,
        })?;
    certified
        .keys_match()
        .map_err(|source| TlsError::KeyMismatch {
            path: cfg.key.clone(),
            cert: cfg.certificate.clone(),
            source,
        })?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Build)?;
    let builder = match &cfg.ca_certificate {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs_for("api.tls.ca_certificate", ca)? {
                roots.add(cert).map_err(|source| TlsError::ClientCaCert {
                    path: ca.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if cfg.require_client_certificate {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|source| TlsError::ClientCaVerifier {
                    path: ca.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(TlsError::Build)?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
