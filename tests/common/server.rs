//! The real binary serving one repository from a static inventory, with a
//! self-signed certificate, one local user and a config written here: the
//! server of the end-to-end and healing tests (they drive it with the real
//! client, as a binary or as the library's `Api`).

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coriolis_ovm_exporter::client::http::{Api, TlsOptions};

use super::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_coriolis-ovm-exporter");
/// The local user of the config.
pub const USER: &str = "tester";
/// The id of the repository in the static inventory.
pub const REPO_ID: &str = "repo";
/// How long a server may take to answer health (debug build, two busy
/// cores).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `p` as a TOML string.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn random_text(rng: &mut fastrand::Rng, n: usize) -> String {
    (0..n).map(|_| rng.alphanumeric()).collect()
}

/// What a [`Server`] is started with, beyond its folder and repository.
#[derive(Clone, Copy, Default)]
pub struct Setup<'a> {
    /// The database file; `exporter.db` in the server's folder when `None`.
    pub db: Option<&'a Path>,
    /// Added to the server's environment (e.g. `COE_FAULT`).
    pub env: &'a [(&'a str, &'a str)],
    /// TOML appended to the config.
    pub extra: &'a str,
}

/// A server with its own config, certificate (`srv-pub.pem`, `srv-key.pem`
/// in its folder), user and repository.
pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub ca: PathBuf,
    pub password: String,
    pub log: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
    /// [`Server::restart`] returns when the new process is killed by a
    /// fault point before it was seen up.
    tolerate_death: bool,
}

impl Server {
    /// Writes a config in `dir` serving `repo` and starts the server; the
    /// password and the JWT secret come from `rng`.
    pub fn start(dir: &Path, repo: &Path, rng: &mut fastrand::Rng) -> Server {
        Server::start_with(dir, repo, rng, Setup::default())
    }

    /// [`Server::start`] with a database, environment or config of `setup`.
    pub fn start_with(
        dir: &Path,
        repo: &Path,
        rng: &mut fastrand::Rng,
        setup: Setup<'_>,
    ) -> Server {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join("srv-pub.pem");
        let key_path = dir.join("srv-key.pem");
        fs::write(&ca, cert.pem()).unwrap();
        fs::write(&key_path, key.serialize_pem()).unwrap();
        let password = random_text(rng, 20);
        let secret = random_text(rng, 48);
        let hash = coriolis_ovm_exporter::demo::hash_password(&password).unwrap();
        let port = free_port();
        let db = match setup.db {
            Some(db) => db.to_owned(),
            None => dir.join("exporter.db"),
        };
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                "db_file = {db}\n\
                 [jwt]\nsecret = \"{secret}\"\n\
                 [api]\nbind = \"127.0.0.1\"\nport = {port}\nshutdown_grace = \"2s\"\n\
                 [api.tls]\ncertificate = {ca}\nkey = {key}\n\
                 [[auth.users]]\nusername = \"{USER}\"\npassword_hash = \"{hash}\"\n\
                 [inventory]\nsource = \"static\"\n\
                 [[inventory.repositories]]\nid = \"{REPO_ID}\"\nmount_point = {repo}\n{extra}",
                db = toml_path(&db),
                ca = toml_path(&ca),
                key = toml_path(&key_path),
                repo = toml_path(repo),
                extra = setup.extra,
            ),
        )
        .unwrap();
        let mut s = Server {
            child: None,
            url: format!("https://127.0.0.1:{port}"),
            ca,
            password,
            log: dir.join("server.log"),
            config,
            env: setup
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            tolerate_death: false,
        };
        s.restart();
        s
    }

    /// Starts the server again (after [`Server::kill`] or a crash), with
    /// the same config (port, database), and waits until `/health` answers
    /// (200, or 503 naming what fails).
    pub fn restart(&mut self) {
        self.stop();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("-config")
            .arg(&self.config)
            .env_remove(coriolis_ovm_exporter::snapshot::fault::ENV)
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let api = self.anonymous();
        let t = Instant::now();
        loop {
            if let Ok(r) = api.get("health", "/health") {
                if r.status().is_success() || r.status().as_u16() == 503 {
                    return;
                }
            }
            assert!(
                t.elapsed() < START_TIMEOUT,
                "server did not come up:\n{}",
                self.log_text()
            );
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    // An armed fault point may kill it at its first
                    // request, before this loop saw it up.
                    if self.tolerate_death && status.signal() == Some(9) {
                        return;
                    }
                    panic!("server exited {status}:\n{}", self.log_text());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Server::restart`] that also returns when the new process is
    /// killed (SIGKILL: a fault point armed with [`Server::set_env`]) before
    /// it was seen up.
    pub fn restart_tolerating_faults(&mut self) {
        self.tolerate_death = true;
        self.restart();
        self.tolerate_death = false;
    }

    /// Whether the server process is running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Whether environment is set for its runs (e.g. a fault point).
    pub fn has_env(&self) -> bool {
        !self.env.is_empty()
    }

    /// The config file it runs with (for the admin subcommands).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Waits until the process ended by itself (a fault point killed it).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server started");
        c.wait().unwrap()
    }

    /// The environment of the next [`Server::restart`].
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// SIGKILL (every connection is lost at once), and waits for the
    /// process to end.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the process to end.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&c),
                rustix::process::Signal::TERM,
            );
            let _ = c.wait();
        }
    }

    pub fn anonymous(&self) -> Api {
        let tls = TlsOptions {
            ca_file: Some(self.ca.clone()),
            ..TlsOptions::default()
        };
        Api::new(&self.url, &tls, 8).unwrap()
    }

    /// A logged-in connection.
    pub fn api(&self) -> Api {
        let mut api = self.anonymous();
        let token = api.login(USER, &self.password).unwrap();
        api.set_token(token);
        api
    }

    /// The environment for the client binary.
    pub fn client_env(&self, cmd: &mut Command) {
        cmd.env("COE_URL", &self.url)
            .env("COE_USER", USER)
            .env("COE_PASSWORD", &self.password)
            .env("COE_CA_FILE", &self.ca);
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
