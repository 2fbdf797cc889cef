//! Test certificates made by the `openssl` CLI: a CA, the exporter's server
//! and client certificates it signs, a second CA for the stand-in Manager,
//! and a stray key that matches nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Scratch;

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl CLI is needed (scripts/deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates for one test: a CA, the exporter's server and client
/// certificates signed by it, a second CA signing the stand-in Manager's
/// certificate, and a stray key that matches nothing.
pub struct Pki {
    pub dir: Scratch,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = Scratch::temp("pki");
        let d = &dir.dir;
        for ca in ["ca", "mgr-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=coe test {ca}"),
                ],
            );
        }
        for (name, ca, eku) in [
            ("srv", "ca", "serverAuth"),
            ("client", "ca", "clientAuth"),
            ("mgr", "mgr-ca", "serverAuth"),
        ] {
            std::fs::write(
                d.join(format!("{name}.ext")),
                format!("basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={eku}\n"),
            )
            .unwrap();
            openssl(
                d,
                &[
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            );
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    &format!("{ca}.pem"),
                    "-CAkey",
                    &format!("{ca}.key"),
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            );
        }
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-out",
                "stray.key",
            ],
        );
        Pki { dir }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }
    pub fn certs(&self, name: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(self.path(name))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }
    pub fn key(&self, name: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(self.path(name)).unwrap()
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
