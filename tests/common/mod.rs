//! Shared test helpers: the reflink filesystems of the run, scratch folders,
//! a log capture, and the harness of the tests that run the real binary over
//! TLS (`pki` makes the certificates, `manager` stands in for the OVM
//! Manager, `exporter` starts the service and talks to it, `http` reads its
//! answers; `server` is the end-to-end tests' server of one repository).
#![allow(dead_code)]

pub mod exporter;
pub mod http;
pub mod manager;
pub mod pki;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use exporter::{
    static_inventory, Client, Exporter, Options, BIN, LOCAL_PASS, LOCAL_USER, SECRET,
};
pub use http::{h2_get, http_request, is_abort, read_answer, Answer};
pub use manager::{StandInManager, MGR_PASS, MGR_USER, SLOW_USER};
pub use pki::Pki;

/// Upper bound of any wait in these tests: nothing legitimate takes longer.
pub const WAIT: Duration = Duration::from_secs(30);

/// A reflink-capable filesystem the test script mounted for this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fs {
    Xfs,
    Btrfs,
    /// OCFS2 in a QEMU guest (`scripts/ocfs2/guest.sh`): only the tests of
    /// the `ocfs2_guest` and `ocfs2_cluster` modules use it, and they run
    /// inside the guest.
    Ocfs2,
    /// The single-node guest's second, small OCFS2 with 128 KiB clusters
    /// (`mkfs.ocfs2 -T vmstore`'s cluster size), for the refined diffs.
    Ocfs2Clusters128k,
}

impl Fs {
    /// The filesystems of the host run (OCFS2 is only in the guests).
    pub const ALL: [Fs; 2] = [Fs::Xfs, Fs::Btrfs];

    pub fn var(self) -> &'static str {
        match self {
            Fs::Xfs => "COE_TEST_XFS",
            Fs::Btrfs => "COE_TEST_BTRFS",
            Fs::Ocfs2 => "COE_TEST_OCFS2",
            Fs::Ocfs2Clusters128k => "COE_TEST_OCFS2_128K",
        }
    }

    /// The root folder of this filesystem for the run. Panics with
    /// instructions when the script did not provide it.
    pub fn root(self) -> PathBuf {
        match std::env::var_os(self.var()) {
            Some(p) if Path::new(&p).is_dir() => PathBuf::from(p),
            _ if matches!(self, Fs::Ocfs2 | Fs::Ocfs2Clusters128k) => panic!(
                "{} is not set to a mounted OCFS2 folder: the tests of the \
                 ocfs2_guest and ocfs2_cluster modules run inside QEMU guests with Debian's \
                 stock kernel. Run them with `./scripts/test.sh` (as root), which boots the \
                 guests with `scripts/ocfs2/guest.sh` and runs them there; a plain `cargo test` \
                 runs them outside and they fail here.",
                self.var()
            ),
            _ => panic!(
                "{} is not set to a mounted {:?} folder: this test needs a real reflink \
                 filesystem. Run the suite as root with `./scripts/test.sh`, which makes and \
                 mounts loop images and sets it.",
                self.var(),
                self
            ),
        }
    }

    /// A fresh, empty folder on this filesystem, removed on drop.
    pub fn scratch(self, tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = self.root().join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
}

pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    /// A fresh, empty folder under the temporary folder (for files whose
    /// filesystem does not matter: configs, certificates, logs), removed on
    /// drop.
    pub fn temp(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "coe-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A repository folder `repo` in `scratch` and the path of its disk
/// `VirtualDisks/disk01.img` (the folders made, the file not).
pub fn repo_and_disk(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let repo = scratch.path("repo");
    let disk = repo.join("VirtualDisks/disk01.img");
    std::fs::create_dir_all(disk.parent().unwrap()).unwrap();
    (repo, disk)
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One captured log event.
#[derive(Clone, Debug)]
pub struct LogEvent {
    pub level: tracing::Level,
    /// The `message` field.
    pub message: String,
    /// Every field as `name=value `, message included.
    pub fields: String,
}

/// A tracing subscriber that keeps every event, to check what the log says
/// (install it with `tracing::subscriber::with_default`).
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<LogEvent>>>);

impl LogCapture {
    pub fn events(&self) -> Vec<LogEvent> {
        self.0.lock().unwrap().clone()
    }

    /// The messages of the WARN events, in order.
    pub fn warnings(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.level == tracing::Level::WARN)
            .map(|e| e.message)
            .collect()
    }
}

struct Fields<'a>(&'a mut LogEvent);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" {
            self.0.message = text.clone();
        }
        self.0.fields.push_str(&format!("{}={text} ", field.name()));
    }
}

impl tracing::Subscriber for LogCapture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut e = LogEvent {
            level: *event.metadata().level(),
            message: String::new(),
            fields: String::new(),
        };
        event.record(&mut Fields(&mut e));
        self.0.lock().unwrap().push(e);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Writes the `vm.cfg` of VM `vm` in `repo` (its folder made), as the
/// ovs-agent writes it: `disks` become `xvda`, `xvdb`, ... in order.
pub fn write_vm_cfg(repo: &Path, vm: &str, uuid: &str, name: &str, disks: &[&Path]) {
    let vmdir = repo.join("VirtualMachines").join(vm);
    std::fs::create_dir_all(&vmdir).unwrap();
    let disks: Vec<String> = disks
        .iter()
        .zip(b'a'..)
        .map(|(d, letter)| format!("'file:{},xvd{},w'", d.display(), letter as char))
        .collect();
    std::fs::write(
        vmdir.join("vm.cfg"),
        format!(
            "name = '{vm}'\nuuid = '{uuid}'\nOVM_simple_name = '{name}'\ndisk = [{}]\n",
            disks.join(", ")
        ),
    )
    .unwrap();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Bytes of `path` in the page cache (`fincore`, util-linux).
pub fn resident_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux) is installed by scripts/deps.sh");
    assert!(out.status.success(), "fincore: {:?}", out);
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Drops the page cache of `path` (after writing back its dirty pages).
pub fn drop_cache(path: &Path) {
    use std::os::fd::AsFd;
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(f.as_fd(), 0, None, rustix::fs::Advice::DontNeed).unwrap();
}
