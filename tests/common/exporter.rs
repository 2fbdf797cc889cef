//! The exporter under test: the real binary started on a config written
//! here, ready when it says `READY=1` on its `NOTIFY_SOCKET`, and a TLS
//! client of its API that trusts the test CA.

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};

use super::http::{http_request, read_answer, Answer};
use super::pki::{provider, Pki};
use super::{free_port, Scratch, WAIT};

pub const BIN: &str = env!("CARGO_BIN_EXE_coriolis-ovm-exporter");
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
pub const LOCAL_USER: &str = "backup";
pub const LOCAL_PASS: &str = "local-pass-42";

#[derive(Default)]
pub struct Options {
    pub manager: Option<String>,
    pub manager_ca: Option<PathBuf>,
    pub local_users: bool,
    pub mtls: bool,
    pub metrics_token: Option<String>,
}

/// An HTTPS client of the API that trusts the test CA.
pub struct Client {
    pub port: u16,
    pub ca: Vec<CertificateDer<'static>>,
}

pub struct Exporter {
    pub child: Child,
    pub notify: UnixDatagram,
    pub dir: Scratch,
    pub client: Client,
}

impl std::ops::Deref for Exporter {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

pub fn local_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8 * 1024, 1, 1, None).unwrap();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    a.hash_password(
        password.as_bytes(),
        &SaltString::encode_b64(b"integration salt").unwrap(),
    )
    .unwrap()
    .to_string()
}

/// `api.header_read_timeout` and `api.tls_handshake_timeout`: short on
/// the host, where tests check that they cut slow clients (api.rs); in the
/// OCFS2 guests (`COE_OCFS2_NODE` set) generous, since there every
/// handshake runs on an emulated CPU shared with the host's jobs, and one
/// took over 2 s (a login cut by EPIPE right after the handshake).
fn client_timeouts() -> (&'static str, &'static str) {
    if std::env::var_os("COE_OCFS2_NODE").is_some() {
        ("60s", "60s")
    } else {
        ("1s", "2s")
    }
}

impl Exporter {
    pub fn config(pki: &Pki, dir: &Scratch, port: u16, o: &Options) -> String {
        let mut c = format!(
            "db_file = {db:?}\nlog_file = {log:?}\n",
            db = dir.path("exporter.db"),
            log = dir.path("exporter.log")
        );
        if let Some(m) = &o.manager {
            c += &format!("ovm_endpoint = {m:?}\n");
        }
        c += &format!("\n[jwt]\nsecret = {SECRET:?}\ntime_to_live = \"1h\"\n");
        let (header, handshake) = client_timeouts();
        c += &format!(
            "\n[api]\nbind = \"127.0.0.1\"\nport = {port}\nheader_read_timeout = \"{header}\"\ntls_handshake_timeout = \"{handshake}\"\nshutdown_grace = \"10s\"\n"
        );
        c += &format!(
            "\n[api.tls]\ncertificate = {:?}\nkey = {:?}\nca_certificate = {:?}\nrequire_client_certificate = {}\n",
            pki.path("srv.pem"),
            pki.path("srv.key"),
            pki.path("ca.pem"),
            o.mtls
        );
        c += "\n[manager]\ntimeout = \"5s\"\n";
        if let Some(ca) = &o.manager_ca {
            c += &format!("ca_certificate = {ca:?}\n");
        }
        c += "\n[auth]\nlogin_max_failures = 3\nlogin_window = \"10m\"\n";
        if o.local_users {
            c += &format!(
                "\n[[auth.users]]\nusername = {LOCAL_USER:?}\npassword_hash = {:?}\n",
                local_hash(LOCAL_PASS)
            );
        }
        if let Some(t) = &o.metrics_token {
            c += &format!("\n[metrics]\nauth = \"token\"\ntoken = {t:?}\n");
        }
        c
    }

    pub fn start(pki: &Pki, o: Options) -> Exporter {
        Self::start_with(pki, 0o600, |dir, port| Self::config(pki, dir, port, &o))
    }

    /// Start with the config text `make(dir, port)` returns, in a file of
    /// permissions `mode`.
    pub fn start_with(
        pki: &Pki,
        mode: u32,
        make: impl FnOnce(&Scratch, u16) -> String,
    ) -> Exporter {
        Self::start_with_env(pki, mode, &[], make)
    }

    /// [`Exporter::start_with`] with `env` added to the process environment
    /// (e.g. `COE_FAULT`).
    pub fn start_with_env(
        pki: &Pki,
        mode: u32,
        env: &[(&str, &str)],
        make: impl FnOnce(&Scratch, u16) -> String,
    ) -> Exporter {
        let dir = Scratch::temp("exporter");
        let port = free_port();
        std::fs::write(dir.path("config.toml"), make(&dir, port)).unwrap();
        // The config holds the secret: the service warns unless it is private.
        std::fs::set_permissions(
            dir.path("config.toml"),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
        let notify_path = dir.path("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(WAIT)).unwrap();
        let stderr = std::fs::File::create(dir.path("stderr.log")).unwrap();
        let child = Command::new(BIN)
            .arg("--config")
            .arg(dir.path("config.toml"))
            .env("NOTIFY_SOCKET", &notify_path)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut e = Exporter {
            child,
            notify,
            dir,
            client: Client {
                port,
                ca: pki.certs("ca.pem"),
            },
        };
        let msg = e.notification();
        assert_eq!(msg, "READY=1", "first notification; log:\n{}", e.log());
        e
    }

    /// Creates a snapshot of `vm` as the holder of `token` (asserting 200):
    /// its id, and its first disk's name and path.
    pub fn create_snapshot(&self, vm: &str, token: &str) -> (String, String, PathBuf) {
        let snaps = format!("/api/v1/vms/{vm}/snapshots");
        let a = self.request("POST", &snaps, Some(token), "");
        assert_eq!(a.status, 200, "create: {}\n{}", a.text(), self.log());
        let v = a.json();
        (
            v["id"].as_str().unwrap().to_owned(),
            v["disks"][0]["name"].as_str().unwrap().to_owned(),
            PathBuf::from(v["disks"][0]["path"].as_str().unwrap()),
        )
    }

    pub fn notification(&mut self) -> String {
        let mut buf = [0u8; 256];
        match self.notify.recv(&mut buf) {
            Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
            Err(e) => {
                let _ = self.child.kill();
                panic!("no sd_notify message ({e}); log:\n{}", self.log())
            }
        }
    }

    pub fn log(&self) -> String {
        let a = std::fs::read_to_string(self.dir.path("exporter.log")).unwrap_or_default();
        let b = std::fs::read_to_string(self.dir.path("stderr.log")).unwrap_or_default();
        a + &b
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < WAIT,
                "the exporter did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Client {
    pub fn client_config(
        &self,
        client_cert: Option<&Pki>,
        alpn: &[&[u8]],
        tls12_only: bool,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).unwrap();
        }
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots);
        let mut c = match client_cert {
            Some(pki) => b
                .with_client_auth_cert(pki.certs("client.pem"), pki.key("client.key"))
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    }

    /// A TLS connection to the exporter, handshake done.
    pub fn connect_with(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let tcp = TcpStream::connect(("127.0.0.1", self.port))?;
        tcp.set_read_timeout(Some(WAIT))?;
        let conn =
            rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(tls)
    }

    pub fn connect(&self) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
        self.connect_with(self.client_config(None, &[b"http/1.1"], false))
            .expect("TLS handshake")
    }

    /// Send raw request bytes on a fresh connection and read the answer.
    pub fn raw(&self, request: &[u8]) -> Answer {
        let mut tls = self.connect();
        tls.write_all(request).unwrap();
        tls.flush().unwrap();
        read_answer(&mut tls)
    }

    pub fn request(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> Answer {
        self.raw(&http_request(method, path, token, &[], body))
    }

    pub fn login(&self, user: &str, pass: &str) -> Answer {
        let body = serde_json::json!({"username": user, "password": pass}).to_string();
        self.request("POST", "/api/v1/auth/login", None, &body)
    }

    pub fn token(&self, user: &str, pass: &str) -> String {
        let a = self.login(user, pass);
        assert_eq!(a.status, 200, "login: {}", a.text());
        a.json()["token"].as_str().unwrap().to_owned()
    }

    /// The value of the `/metrics` line `<name> <value>` (asked with
    /// `token`); panics when there is none.
    pub fn metric(&self, token: &str, name: &str) -> u64 {
        let text = self.request("GET", "/metrics", Some(token), "").text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }
}

/// The config's static inventory: the repository `repo` (id `repo`, not
/// checked for a mount) and `vms`, each a name and its disks, which become
/// `xvda`, `xvdb`, ... in order.
pub fn static_inventory(repo: &Path, vms: &[(&str, Vec<&Path>)]) -> String {
    let mut c = format!(
        "\n[inventory]\nsource = \"static\"\novs_agent_db_dir = \"/nonexistent/db\"\n\
         check_mounted = false\n\n[[inventory.repositories]]\nid = \"repo\"\n\
         mount_point = {repo:?}\n"
    );
    for (vm, disks) in vms {
        let disks: Vec<String> = disks
            .iter()
            .zip(b'a'..)
            .map(|(d, letter)| {
                format!(
                    "{{ path = {d:?}, device_name = \"xvd{}\" }}",
                    letter as char
                )
            })
            .collect();
        c += &format!(
            "\n[[inventory.vms]]\nname = {vm:?}\ndisks = [ {} ]\n",
            disks.join(", ")
        );
    }
    c
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
