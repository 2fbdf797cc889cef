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
//!
//! Session resumption uses stateless tickets only: the session's state goes
//! to the client encrypted under a key the server rotates every 6 hours
//! (rustls' `Ticketer`, AES-256 and HMAC-SHA256, RFC 5077's construction),
//! and the server keeps nothing per session. rustls' default kept up to 256
//! sessions in memory, two new ones written by every TLS 1.3 handshake:
//! under a flood of connections that table is rewritten some hundred times
//! a second (no client could resume from it anyway), and the entries alive
//! when the flood ends are a few hundred small blocks scattered over the
//! heap that the storm grew, each holding a page the allocator cannot give
//! back (issue 11: the soak's idle RSS grew with the length of its storm;
//! heaptrack found these the live blocks left from it). TLS 1.3 resumption
//! is PSK with a fresh (EC)DHE here (rustls offers no other mode), so a
//! ticket key alone does not open recorded traffic; a TLS 1.2 resumption
//! has no such exchange, which is what a cached session gave too.

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
    #[error("cannot make the session ticket key: {0}")]
    Tickets(#[source] rustls::Error),
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
            TlsError::Build(_) | TlsError::Tickets(_) => "api.tls",
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
    // Stateless resumption, no per-session state (see the module's essay).
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Tickets)?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConnection};

    use super::*;

    /// A self-signed certificate for `localhost` in `dir`: `[api.tls]` with it.
    fn self_signed(dir: &Path) -> (TlsConfig, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("srv.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("srv.key"), key.serialize_pem()).unwrap();
        let cfg = TlsConfig {
            certificate: dir.join("srv.pem"),
            key: dir.join("srv.key"),
            ca_certificate: None,
            require_client_certificate: false,
        };
        (cfg, cert.der().clone())
    }

    /// Moves what `from` has to send into `to`, which processes it.
    fn pump<A, B>(
        from: &mut rustls::ConnectionCommon<A>,
        to: &mut rustls::ConnectionCommon<B>,
        wire: &mut Vec<u8>,
    ) {
        wire.clear();
        while from.wants_write() {
            from.write_tls(wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
        }
        to.process_new_packets().unwrap();
    }

    /// One handshake in memory (and the tickets the server sends after it):
    /// how it went.
    fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> HandshakeKind {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = ClientConnection::new(client.clone(), name).unwrap();
        let mut s = ServerConnection::new(server.clone()).unwrap();
        let mut wire = Vec::new();
        for _ in 0..10 {
            pump(&mut c, &mut s, &mut wire);
            pump(&mut s, &mut c, &mut wire);
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind().unwrap()
    }

    /// Resumption works, and the server keeps no session for it: tickets
    /// are stateless (see the module's essay). Fails with rustls' default
    /// in-memory session table.
    #[test]
    fn sessions_resume_from_stateless_tickets_only() {
        let dir = std::env::temp_dir().join(format!("coe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cfg, cert) = self_signed(&dir);
        let server = server_config(&cfg).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(server.ticketer.enabled(), "no stateless tickets");
        assert!(
            !server.session_storage.can_cache(),
            "the server keeps sessions in memory"
        );
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        for versions in [&[&rustls::version::TLS13], &[&rustls::version::TLS12]] {
            let client = Arc::new(
                ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(versions)
                    .unwrap()
                    .with_root_certificates(roots.clone())
                    .with_no_client_auth(),
            );
            assert_eq!(handshake(&server, &client), HandshakeKind::Full);
            assert_eq!(
                handshake(&server, &client),
                HandshakeKind::Resumed,
                "{versions:?}"
            );
        }
    }
}
