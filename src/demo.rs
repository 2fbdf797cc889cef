//! `coriolis-ovm-exporter demo`: the whole service on a fresh machine in one
//! command, for a newcomer to see it work.
//!
//! It makes a reflink-capable filesystem (a loop-mounted XFS image made
//! with `mkfs.xfs -m reflink=1`, or a folder given with `--dir` after a probe
//! clone proves it can clone), a sample repository in the Oracle VM layout
//! (`VirtualMachines/<id>/vm.cfg`, `VirtualDisks/<id>.img`, `.ovsmeta`) with
//! two VMs on sparse disks holding some data, a self-signed certificate
//! (rcgen, no openssl needed), a local user with a random password, and a
//! config on the static inventory; then it runs the normal server
//! ([`crate::server::run`] on a [`crate::node::Node`], exactly what the
//! service runs) and prints the URL, the credentials and client commands.
//! SIGINT/SIGTERM stop the server; then everything made is removed
//! (unmount, loop detach, files) unless `--keep`.
//!
//! It owns only what it creates under its own work folder; it never touches
//! anything else in `--dir`. The database, config and certificates always
//! live in a local folder under the temporary folder, whatever `--dir` is:
//! LMDB belongs on local storage, and the store refuses OCFS2 and NFS (an
//! Oracle VM repository is OCFS2).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::Engine;
use clap::Parser;

use crate::api::Backend;
use crate::client::progress::{human_bytes, parse_size};
use crate::node::Node;
use crate::server::Config;

/// Exit statuses of `demo`.
const EXIT_OK: i32 = 0;
const EXIT_FAILED: i32 = 1;
/// The demo's local user.
const DEMO_USER: &str = "demo";
/// Smallest loop image: mkfs.xfs refuses filesystems under 300 MiB.
const MIN_IMAGE: u64 = 512 << 20;
/// Random bytes in the password (base64url: 24 characters, 144 bits).
const PASSWORD_BYTES: usize = 18;
/// Random bytes of the JWT secret (RFC 7518 wants at least 32 for HS256).
const SECRET_BYTES: usize = 48;
/// Server drain time on Ctrl-C: a demo should stop promptly.
const DEMO_SHUTDOWN_GRACE: &str = "2s";
/// Umount attempts while something still holds the mount (the server's
/// files are closed by then; a shell `cd`'d into it is the usual culprit).
const UMOUNT_ATTEMPTS: u32 = 5;

/// Runs the API on a throw-away sample repository.
#[derive(Parser, Debug)]
#[command(name = "coriolis-ovm-exporter demo", version)]
pub struct DemoArgs {
    /// TCP port of the API.
    #[arg(long, default_value_t = crate::server::config::DEFAULT_PORT)]
    pub port: u16,
    /// Address to listen on (the demo listens on loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: IpAddr,
    /// Use this existing reflink-capable folder (XFS with reflink, btrfs,
    /// OCFS2) instead of a loop-mounted XFS image; no root needed then.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave everything in place on exit.
    #[arg(long)]
    pub keep: bool,
    /// Size of the XFS image (sparse; only what is written uses space).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Refused(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Tool { command: String, detail: String },
    #[error("cannot make the certificate: {0}")]
    Cert(#[source] rcgen::Error),
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("{0}")]
    Config(#[source] crate::server::ConfigError),
    #[error("cannot open the node: {0}")]
    Node(#[source] crate::node::NodeError),
    #[error("the server stopped: {0}")]
    Server(#[source] crate::server::ServerError),
}

type Result<T> = std::result::Result<T, DemoError>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DemoError {
    let path = path.to_owned();
    move |source| DemoError::Io { what, path, source }
}

fn random(n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(io("cannot read", Path::new("/dev/urandom")))?;
    Ok(b)
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Runs a tool, its stdout trimmed; a clear error when it is missing.
fn tool(program: &str, args: &[&str]) -> Result<String> {
    let line = format!("{program} {}", args.join(" "));
    let out = Command::new(program).args(args).output().map_err(|e| {
        let hint = match program {
            "mkfs.xfs" => " (install xfsprogs)",
            "losetup" | "mount" | "umount" => " (install util-linux / mount)",
            _ => "",
        };
        DemoError::Tool {
            command: line.clone(),
            detail: format!("{e}{hint}"),
        }
    })?;
    if !out.status.success() {
        return Err(DemoError::Tool {
            command: line,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Everything the demo made, undone on drop (unless kept).
struct Setup {
    /// The demo's own folder: the image and mount point, or the repository
    /// with `--dir`.
    work: PathBuf,
    /// The local folder of config, certificates and database: `work`
    /// itself without `--dir`, else its own folder under the temporary
    /// folder.
    local: PathBuf,
    mount: Option<PathBuf>,
    loop_dev: Option<String>,
    keep: bool,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("demo: --keep: leaving {} in place", self.work.display());
            if self.local != self.work {
                eprintln!("demo: and {} (rm -r it too)", self.local.display());
            }
            if let (Some(m), Some(l)) = (&self.mount, &self.loop_dev) {
                eprintln!(
                    "demo: to remove it: umount {} && losetup -d {l} && rm -r {}",
                    m.display(),
                    self.work.display()
                );
            } else {
                eprintln!("demo: to remove it: rm -r {}", self.work.display());
            }
            return;
        }
        if let Some(m) = &self.mount {
            let m = m.display().to_string();
            let mut ok = false;
            for _ in 0..UMOUNT_ATTEMPTS {
                if tool("umount", &[&m]).is_ok() {
                    ok = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
            if !ok {
                eprintln!("demo: {m} is busy; detaching it lazily");
                if let Err(e) = tool("umount", &["-l", &m]) {
                    eprintln!("demo: {e}");
                }
            }
        }
        if let Some(l) = &self.loop_dev {
            if let Err(e) = tool("losetup", &["-d", l]) {
                eprintln!("demo: {e}");
            }
        }
        let mut dirs = vec![&self.work];
        if self.local != self.work {
            dirs.push(&self.local);
        }
        for d in dirs {
            match fs::remove_dir_all(d) {
                Ok(()) => eprintln!("demo: removed {}", d.display()),
                Err(e) => eprintln!("demo: cannot remove {}: {e}", d.display()),
            }
        }
    }
}

/// A sample disk: file name, device, apparent size.
struct SampleDisk {
    file: String,
    device: &'static str,
    size: u64,
    label: &'static str,
}

struct SampleVm {
    id: String,
    friendly: &'static str,
    disks: Vec<SampleDisk>,
}

/// A 32-hex id in the Oracle VM style (`0004fb00` + object type + random).
fn ovm_id(kind: &str) -> Result<String> {
    let r = random(10)?;
    let mut s = format!("0004fb0000{kind}");
    for b in r {
        let _ = write!(s, "{b:02x}");
    }
    Ok(s)
}

/// Fills a disk with some data: a few extents of a deterministic pattern
/// (start, middle, end), the rest a hole, so snapshots have chunks and
/// holes to show.
fn fill_disk(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = File::create(path).map_err(io("cannot create", path))?;
    f.set_len(size).map_err(io("cannot size", path))?;
    let mut state = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let extents = [
        (0, 4 << 20),
        (size / 3, 1 << 20),
        (size - (2 << 20), 2 << 20),
    ];
    for (start, len) in extents {
        let mut off = start;
        while off < start + len {
            for b in block.chunks_mut(8) {
                // xorshift64: cheap, deterministic, incompressible-looking.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b.copy_from_slice(&state.to_le_bytes()[..b.len()]);
            }
            f.write_all_at(&block, off)
                .map_err(io("cannot write", path))?;
            off += block.len() as u64;
        }
    }
    f.sync_all().map_err(io("cannot sync", path))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io("cannot write", path))
}

/// The repository: two VMs, three sparse disks, `.ovsmeta`.
fn make_repository(repo: &Path) -> Result<Vec<SampleVm>> {
    let vms = vec![
        SampleVm {
            id: ovm_id("06")?,
            friendly: "demo-web",
            disks: vec![SampleDisk {
                file: format!("{}.img", ovm_id("12")?),
                device: "xvda",
                size: 256 << 20,
                label: "web root",
            }],
        },
        SampleVm {
            id: ovm_id("06")?,
            friendly: "demo-db",
            disks: vec![
                SampleDisk {
                    file: format!("{}.img", ovm_id("12")?),
                    device: "xvda",
                    size: 256 << 20,
                    label: "db root",
                },
                SampleDisk {
                    file: format!("{}.img", ovm_id("12")?),
                    device: "xvdb",
                    size: 1 << 30,
                    label: "db data",
                },
            ],
        },
    ];
    let disks_dir = repo.join("VirtualDisks");
    fs::create_dir_all(&disks_dir).map_err(io("cannot create", &disks_dir))?;
    let mut meta = serde_json::Map::new();
    let mut seed = 0x5eed_0000_0000_0001u64;
    for vm in &vms {
        let dir = repo.join("VirtualMachines").join(&vm.id);
        fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let mut disk_lines = String::new();
        for d in &vm.disks {
            let path = disks_dir.join(&d.file);
            fill_disk(&path, d.size, seed)?;
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let _ = writeln!(disk_lines, "    'file:{},{},w',", path.display(), d.device);
            meta.insert(
                d.file.clone(),
                serde_json::json!({"OBJECT_TYPE": "VIRTUAL_DISK", "SIMPLE_NAME": d.label}),
            );
        }
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &vm.id[0..8],
            &vm.id[8..12],
            &vm.id[12..16],
            &vm.id[16..20],
            &vm.id[20..32]
        );
        // The keys ovs-agent writes that the inventory reads (NODE.md), and
        // a few it ignores, as on a real node.
        let cfg = format!(
            "vif = ['mac=00:21:f6:00:00:01,bridge=0004fb0010']\n\
             OVM_simple_name = '{}'\n\
             disk = [\n{disk_lines}]\n\
             uuid = '{uuid}'\n\
             memory = 1024\n\
             vcpus = 1\n\
             OVM_high_availability = False\n\
             name = '{}'\n",
            vm.friendly, vm.id
        );
        let p = dir.join("vm.cfg");
        fs::write(&p, cfg).map_err(io("cannot write", &p))?;
    }
    // The file name ovs-agent uses (NODE.md).
    let p = repo.join(".ovsmeta");
    let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
    fs::write(&p, text).map_err(io("cannot write", &p))?;
    Ok(vms)
}

/// A self-signed server certificate for loopback and this host's name.
fn make_certificate(work: &Path, bind: IpAddr) -> Result<(PathBuf, PathBuf)> {
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Ok(h) = fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && h != "localhost" {
            names.push(h.to_owned());
        }
    }
    if !bind.is_unspecified() && !bind.is_loopback() {
        names.push(bind.to_string());
    }
    let key = rcgen::KeyPair::generate().map_err(DemoError::Cert)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(DemoError::Cert)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "coriolis-ovm-exporter demo");
    let cert = params.self_signed(&key).map_err(DemoError::Cert)?;
    let cert_path = work.join("srv-pub.pem");
    let key_path = work.join("srv-key.pem");
    fs::write(&cert_path, cert.pem()).map_err(io("cannot write", &cert_path))?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Argon2id PHC string of `password` (the config's `password_hash`).
pub fn hash_password(password: &str) -> Result<String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let salt = SaltString::encode_b64(&random(16)?).map_err(|e| DemoError::Hash(e.to_string()))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DemoError::Hash(e.to_string()))
}

/// TOML basic string literal: quotes, backslashes and control characters
/// escaped (TOML 1.0, "Basic strings").
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Makes the filesystem and work folder.
fn prepare(args: &DemoArgs) -> Result<(Setup, PathBuf, String)> {
    let tag = format!("coe-demo-{}", std::process::id());
    match &args.dir {
        Some(dir) => {
            let meta = fs::metadata(dir).map_err(io("--dir", dir))?;
            if !meta.is_dir() {
                return Err(DemoError::Refused(format!(
                    "--dir {}: not a folder",
                    dir.display()
                )));
            }
            let work = dir.join(&tag);
            fs::create_dir(&work).map_err(io("cannot create", &work))?;
            let local = std::env::temp_dir().join(format!("{tag}-local"));
            if let Err(e) = fs::create_dir(&local) {
                let _ = fs::remove_dir(&work);
                return Err(io("cannot create", &local)(e));
            }
            let setup = Setup {
                work: work.clone(),
                local,
                mount: None,
                loop_dev: None,
                keep: args.keep,
            };
            let repo = work.join("repository");
            fs::create_dir(&repo).map_err(io("cannot create", &repo))?;
            let probe = crate::ovm::probe::probe_clone(&repo);
            if !probe.can_clone {
                return Err(DemoError::Refused(format!(
                    "--dir {}: {}. Use a folder on XFS made with `mkfs.xfs -m reflink=1`, on \
                     btrfs or on OCFS2, or run without --dir as root to get a loop-mounted XFS",
                    dir.display(),
                    probe.describe()
                )));
            }
            let fs_name = probe
                .fs_type
                .map(|t| t.name())
                .unwrap_or_else(|| "?".to_owned());
            Ok((
                setup,
                repo,
                format!("{fs_name} folder in {}", dir.display()),
            ))
        }
        None => {
            if !rustix::process::geteuid().is_root() {
                return Err(DemoError::Refused(
                    "the demo makes and mounts an XFS image and needs root (sudo); or give \
                     --dir DIR on an existing reflink-capable folder (XFS with reflink, btrfs)"
                        .to_owned(),
                ));
            }
            if args.size < MIN_IMAGE {
                return Err(DemoError::Refused(format!(
                    "--size {}: at least {} (mkfs.xfs needs 300 MiB)",
                    human_bytes(args.size),
                    human_bytes(MIN_IMAGE)
                )));
            }
            let work = std::env::temp_dir().join(&tag);
            fs::create_dir(&work).map_err(io("cannot create", &work))?;
            let mut setup = Setup {
                work: work.clone(),
                local: work.clone(),
                mount: None,
                loop_dev: None,
                keep: args.keep,
            };
            let image = work.join("xfs.img");
            File::create(&image)
                .and_then(|f| f.set_len(args.size))
                .map_err(io("cannot create", &image))?;
            let image_s = image.display().to_string();
            tool("mkfs.xfs", &["-q", "-m", "reflink=1", &image_s])?;
            let dev = tool("losetup", &["--find", "--show", &image_s])?;
            setup.loop_dev = Some(dev.clone());
            let mnt = work.join("mnt");
            fs::create_dir(&mnt).map_err(io("cannot create", &mnt))?;
            tool("mount", &[&dev, &mnt.display().to_string()])?;
            setup.mount = Some(mnt.clone());
            Ok((
                setup,
                mnt,
                format!("XFS (reflink) on {dev}, a {} image", human_bytes(args.size)),
            ))
        }
    }
}

/// Catches SIGINT/SIGTERM from now on, so that a Ctrl-C during the setup
/// (mkfs, mount, password hashing) does not kill the process with a mounted
/// image left behind: the setup finishes, then is undone. The flag says
/// whether such a signal came before the server took over.
fn catch_early_signals() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            let _ = ready_tx.send(());
            return;
        };
        rt.block_on(async move {
            let signal = crate::server::shutdown_signal();
            let _ = ready_tx.send(());
            if let Ok(signal) = signal {
                signal.await;
                seen.store(true, Ordering::SeqCst);
            }
        });
    });
    // Handlers are installed once this returns.
    let _ = ready_rx.recv();
    flag
}

fn run_demo(args: &DemoArgs) -> Result<()> {
    // Refuse a taken port before building anything.
    TcpListener::bind(SocketAddr::new(args.bind, args.port)).map_err(|e| {
        DemoError::Refused(format!(
            "cannot listen on {}:{}: {e}; pick another with --port",
            args.bind, args.port
        ))
    })?;
    let interrupted = catch_early_signals();
    let (setup, repo, fs_desc) = prepare(args)?;
    let vms = make_repository(&repo)?;
    let (cert, key) = make_certificate(&setup.local, args.bind)?;
    let password = b64(&random(PASSWORD_BYTES)?);
    let secret = b64(&random(SECRET_BYTES)?);
    let hash = hash_password(&password)?;
    let config_path = setup.local.join("config.toml");
    let db = setup.local.join("exporter.db");
    let config_text = format!(
        "# Made by `coriolis-ovm-exporter demo`; see config/config.example.toml.\n\
         db_file = {db}\n\n\
         [jwt]\nsecret = {secret}\ntime_to_live = \"12h\"\n\n\
         [api]\nbind = {bind}\nport = {port}\nshutdown_grace = \"{DEMO_SHUTDOWN_GRACE}\"\n\n\
         [api.tls]\ncertificate = {cert}\nkey = {key}\n\n\
         [[auth.users]]\nusername = \"{DEMO_USER}\"\npassword_hash = {hash}\n\n\
         [inventory]\nsource = \"static\"\n\n\
         [[inventory.repositories]]\nid = \"demo\"\nmount_point = {repo}\nalias = \"Demo repository\"\n",
        db = toml_str(&db.display().to_string()),
        secret = toml_str(&secret),
        bind = toml_str(&args.bind.to_string()),
        port = args.port,
        cert = toml_str(&cert.display().to_string()),
        key = toml_str(&key.display().to_string()),
        hash = toml_str(&hash),
        repo = toml_str(&repo.display().to_string()),
    );
    write_private(&config_path, &config_text)?;
    let config = Config::load(&config_path).map_err(DemoError::Config)?;
    if let Err(e) = crate::server::logging::init(None) {
        eprintln!("demo: logging: {e}");
    }
    let backend: Arc<dyn Backend> = Arc::new(Node::open(&config).map_err(DemoError::Node)?);

    let host = match args.bind {
        IpAddr::V4(a) if a.is_unspecified() => "127.0.0.1".to_owned(),
        IpAddr::V6(a) if a.is_unspecified() => "[::1]".to_owned(),
        IpAddr::V6(a) => format!("[{a}]"),
        IpAddr::V4(a) => a.to_string(),
    };
    let url = format!("https://{host}:{}", args.port);
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "coriolis-ovm-exporter".to_owned());
    let first = &vms[0];
    let mut out = String::new();
    let _ = writeln!(out, "coriolis-ovm-exporter demo\n");
    let _ = writeln!(out, "url: {url}");
    let _ = writeln!(out, "user: {DEMO_USER}");
    let _ = writeln!(out, "password: {password}");
    let _ = writeln!(out, "ca-file: {}", cert.display());
    let _ = writeln!(out, "config: {}", config_path.display());
    let _ = writeln!(out, "repository: {} ({fs_desc})", repo.display());
    let _ = writeln!(out, "\nVMs:");
    for vm in &vms {
        let _ = writeln!(
            out,
            "  {}  {:<9} {} disk(s): {}",
            vm.id,
            vm.friendly,
            vm.disks.len(),
            vm.disks
                .iter()
                .map(|d| format!("{} ({})", d.file, human_bytes(d.size)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let disk0 = repo.join("VirtualDisks").join(&first.disks[0].file);
    let disk0 = disk0.display();
    let _ = writeln!(
        out,
        "\nTry, in another shell:\n\
         \x20 export COE_URL={url} COE_USER={DEMO_USER} COE_PASSWORD='{password}' COE_CA_FILE={ca}\n\
         \x20 {exe} client login\n\
         \x20 {exe} client vms list\n\
         \x20 {exe} client snapshots create {vm}          # note the snapshot id: S1\n\
         \x20 {exe} client download {vm} S1 --out /tmp/replica --verify\n\
         \x20 dd if=/dev/urandom of={disk0} bs=64k count=16 seek=100 conv=notrunc   # change the disk\n\
         \x20 {exe} client snapshots create {vm}          # S2\n\
         \x20 {exe} client download {vm} S2 --out /tmp/replica --diff-from S1 --verify\n\
         \x20 curl --cacert {ca} {url}/api/v1/health\n\
         \nCtrl-C stops the server and removes everything{keep}.",
        ca = cert.display(),
        vm = first.id,
        keep = if args.keep {
            " but --keep leaves the files"
        } else {
            ""
        },
    );
    if interrupted.load(Ordering::SeqCst) {
        eprintln!("demo: interrupted during the setup; cleaning up");
        return Ok(());
    }
    println!("{out}");
    crate::server::run(config, backend).map_err(DemoError::Server)?;
    drop(setup);
    Ok(())
}

/// `coriolis-ovm-exporter demo [options]`; the exit status.
pub fn main(args: Vec<std::ffi::OsString>) -> i32 {
    let argv = std::iter::once(std::ffi::OsString::from("coriolis-ovm-exporter demo")).chain(args);
    let args = match DemoArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run_demo(&args) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("coriolis-ovm-exporter demo: {}", crate::error::chain(&e));
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_repository_has_the_ovm_layout_and_sparse_disks() {
        let dir = std::env::temp_dir().join(format!("coe-demo-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let vms = make_repository(&dir).unwrap();
        assert_eq!(vms.len(), 2);
        for vm in &vms {
            assert_eq!(vm.id.len(), 32);
            let cfg = fs::read(dir.join("VirtualMachines").join(&vm.id).join("vm.cfg")).unwrap();
            let parsed = crate::ovm::vmcfg::vm_config(&cfg).unwrap();
            assert_eq!(parsed.name, vm.id);
            assert_eq!(parsed.simple_name.as_deref(), Some(vm.friendly));
            assert_eq!(parsed.disks.len(), vm.disks.len());
            for d in &vm.disks {
                let m = fs::metadata(dir.join("VirtualDisks").join(&d.file)).unwrap();
                assert_eq!(m.len(), d.size);
                // Sparse: 7 MiB of data, not the apparent size.
                use std::os::unix::fs::MetadataExt;
                assert!(m.blocks() * 512 < 16 << 20, "{} blocks", m.blocks());
            }
        }
        let meta =
            crate::ovm::vmcfg::parse_ovsmeta(&fs::read(dir.join(".ovsmeta")).unwrap()).unwrap();
        assert_eq!(meta.len(), 3);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn toml_strings_round_trip() {
        for s in ["/plain/path", "quo\"te", "back\\slash", "tab\tnl\n", "é"] {
            let doc = format!("k = {}", toml_str(s));
            let v: toml::Table = toml::from_str(&doc).unwrap();
            assert_eq!(v["k"].as_str(), Some(s), "{doc}");
        }
    }

    #[test]
    fn password_hashes_verify() {
        use argon2::password_hash::{PasswordHash, PasswordVerifier};
        let h = hash_password("s3cret").unwrap();
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(argon2::Argon2::default()
            .verify_password(b"s3cret", &parsed)
            .is_ok());
        assert!(argon2::Argon2::default()
            .verify_password(b"other", &parsed)
            .is_err());
    }
}
