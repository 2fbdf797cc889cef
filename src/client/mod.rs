//! `coriolis-ovm-exporter client ...`: a command-line client that does what
//! Coriolis does with the exporter: log in, list VMs, take and drop
//! snapshots, and download full or incremental copies of their disks into
//! sparse local files, resumable and verifiable.
//!
//! Layout: this file holds the command line (clap derive) and the
//! commands; [`http`] the HTTPS agent and paths, [`token`] the token cache,
//! [`download`] the copy engine over [`replica`] files and [`ranges`],
//! [`verify`] the checksum comparison, [`progress`] and [`output`] what is
//! printed. It talks to the server only through its public API; it shares
//! the JSON types of [`crate::wire::json`] and the stream decoder of
//! [`crate::wire::stream`] so both ends read the same contract.
//!
//! It never prints the password or the token. Exit statuses: [`exit`].

pub mod download;
pub mod error;
pub mod http;
pub mod output;
pub mod progress;
pub mod ranges;
pub mod replica;
pub mod token;
pub mod verify;

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::wire::{Health, Snapshot, Vm};
pub use error::exit;
use error::{ClientError, Result};
use http::{paths, seg, Api, TlsOptions};
use output::{print_json, Table};
use progress::{human_bytes, parse_size};
use token::TokenCache;

const EXIT_HELP: &str = "\
Exit status: 0 ok, 1 error, 2 usage, 3 authentication (no credentials or \
refused), 4 not found, 5 --verify found differences, 6 conflict (server 409, \
or the local replica is not a copy of the --diff-from snapshot).

Credentials: --url/COE_URL, --user/COE_USER, --password/COE_PASSWORD (or a \
prompt on a terminal); the token of a login is cached (0600) under \
$XDG_CACHE_HOME/coriolis-ovm-exporter and reused until it expires.";

/// A VM, snapshot or disk id from the command line: never empty. An empty
/// id would make a path of another route (`.../snapshots/` is the list,
/// whose array would be read as one snapshot).
fn parse_id(s: &str) -> std::result::Result<String, String> {
    if s.trim().is_empty() {
        return Err("an id cannot be empty".to_owned());
    }
    Ok(s.to_owned())
}

/// Client of a coriolis-ovm-exporter node.
#[derive(Parser, Debug)]
#[command(
    name = "coriolis-ovm-exporter client",
    version,
    after_help = EXIT_HELP,
    disable_help_subcommand = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Connection and output options, accepted before or after the command.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Server URL, e.g. https://node:5544
    #[arg(long, env = "COE_URL", global = true)]
    pub url: Option<String>,
    /// User name to log in with.
    #[arg(long, short = 'u', env = "COE_USER", global = true)]
    pub user: Option<String>,
    /// Password (prefer COE_PASSWORD or the prompt: a flag is visible in ps).
    #[arg(long, env = "COE_PASSWORD", global = true, hide_env_values = true)]
    pub password: Option<String>,
    /// PEM file of the CA (or self-signed certificate) to trust.
    #[arg(long, env = "COE_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// Do not verify the server's certificate (a warning is printed).
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Client certificate (PEM) for servers that require mTLS.
    #[arg(long, env = "COE_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Key of --client-cert (PEM).
    #[arg(long, env = "COE_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress output.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check that the server answers (no credentials needed).
    Health,
    /// Log in and cache the token for later commands.
    Login,
    /// Forget the cached token of this server.
    Logout,
    /// List and show VMs.
    #[command(subcommand)]
    Vms(VmsCmd),
    /// Create, list, show and delete snapshots.
    #[command(subcommand)]
    Snapshots(SnapCmd),
    /// Download a snapshot's disks into sparse files (full or incremental).
    Download(DownloadArgs),
    /// Compare local replicas with a snapshot by block checksums.
    Verify(VerifyArgs),
}

#[derive(Subcommand, Debug)]
pub enum VmsCmd {
    /// Every VM of the node.
    List,
    /// One VM: its disks and snapshots.
    Show {
        /// VM id (the 32-hex name).
        #[arg(value_parser = parse_id)]
        vm: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapCmd {
    /// Snapshot every disk of a VM (crash-consistent, one id).
    Create {
        /// VM id (the 32-hex name).
        #[arg(value_parser = parse_id)]
        vm: String,
    },
    /// The VM's snapshots, oldest first.
    List {
        /// VM id (the 32-hex name).
        #[arg(value_parser = parse_id)]
        vm: String,
    },
    /// One snapshot; with --compare-to, the diff from an older one.
    Show {
        /// VM id (the 32-hex name).
        #[arg(value_parser = parse_id)]
        vm: String,
        /// Snapshot id.
        #[arg(value_parser = parse_id)]
        snap: String,
        /// Older snapshot to diff against.
        #[arg(long, value_parser = parse_id)]
        compare_to: Option<String>,
        /// List every chunk (and zeroed range) in the table.
        #[arg(long)]
        chunks: bool,
    },
    /// Delete one snapshot.
    Delete {
        /// VM id (the 32-hex name).
        #[arg(value_parser = parse_id)]
        vm: String,
        /// Snapshot id.
        #[arg(value_parser = parse_id)]
        snap: String,
    },
    /// Delete every snapshot of a VM.
    Purge {
        /// VM id (the 32-hex name).
        #[arg(value_parser = parse_id)]
        vm: String,
        /// Confirm: every snapshot of the VM is deleted.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// VM id (the 32-hex name).
    #[arg(value_parser = parse_id)]
    pub vm: String,
    /// Snapshot to copy.
    #[arg(value_parser = parse_id)]
    pub snap: String,
    /// Folder of the replicas (one sparse file per disk, named by disk).
    #[arg(long)]
    pub out: PathBuf,
    /// Apply the diff from this older snapshot onto replicas of it in --out.
    #[arg(long, value_parser = parse_id)]
    pub diff_from: Option<String>,
    /// With --diff-from: when the server says that base cannot be used (it
    /// was deleted, its clone changed, or the disk was replaced), make a
    /// full copy instead of failing.
    #[arg(long, requires = "diff_from")]
    pub full_if_needed: bool,
    /// Requests in flight.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub jobs: u16,
    /// After the download, compare per-block CRC-32s with the server's.
    #[arg(long)]
    pub verify: bool,
    /// What --verify compares: per-block CRC-32s, or a strong digest per
    /// block and over the whole disk (blake3, sha256).
    #[arg(long, value_enum, default_value_t = verify::VerifyWith::Crc32)]
    pub verify_with: verify::VerifyWith,
    /// Only these disks (repeatable).
    #[arg(long = "disk", value_parser = parse_id)]
    pub disks: Vec<String>,
    /// How to fetch the bytes.
    #[arg(long, value_enum, default_value_t = download::Transport::Auto)]
    pub transport: download::Transport,
    /// Bandwidth cap, bytes per second (e.g. 50M).
    #[arg(long, value_parser = parse_size)]
    pub limit_rate: Option<u64>,
    /// Compress stream transfers (`zstd`: each record on its own, by the
    /// server; worth it over links slower than the server's cores).
    #[arg(long, value_enum, default_value_t = download::Compress::None)]
    pub compress: download::Compress,
    /// zstd level with --compress zstd (1 fastest .. 19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub compress_level: i32,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// VM id (the 32-hex name).
    #[arg(value_parser = parse_id)]
    pub vm: String,
    /// Snapshot the replicas should equal.
    #[arg(value_parser = parse_id)]
    pub snap: String,
    /// Folder of the replicas.
    #[arg(long)]
    pub out: PathBuf,
    /// Only these disks (repeatable).
    #[arg(long = "disk", value_parser = parse_id)]
    pub disks: Vec<String>,
    /// What to compare: per-block CRC-32s, or a strong digest per block and
    /// over the whole disk.
    #[arg(long, value_enum, default_value_t = verify::VerifyWith::Crc32)]
    pub verify_with: verify::VerifyWith,
}

/// Runs the client with `args` (after `client`); the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let argv = std::iter::once(OsString::from("coriolis-ovm-exporter client")).chain(args);
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run(cli) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("coriolis-ovm-exporter client: {}", e.chain());
            e.exit_code()
        }
    }
}

fn tls_options(g: &Global) -> TlsOptions {
    TlsOptions {
        ca_file: g.ca_file.clone(),
        insecure: g.insecure,
        client_cert: g.client_cert.clone().zip(g.client_key.clone()),
    }
}

fn connect(g: &Global, connections: usize) -> Result<Api> {
    let url = g.url.as_deref().ok_or_else(|| {
        ClientError::Usage("no server: give --url https://HOST:PORT or set COE_URL".to_owned())
    })?;
    if g.insecure {
        eprintln!(
            "warning: --insecure: the server's certificate is NOT verified; anyone on the path \
             can read the credentials and the disks"
        );
    }
    Api::new(url, &tls_options(g), connections)
}

/// Asks for the password on the terminal without echoing it.
fn prompt_password(user: &str) -> Option<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return None;
    }
    eprint!("Password for {user}: ");
    let _ = std::io::stderr().flush();
    let saved = rustix::termios::tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        let mut quiet = t.clone();
        quiet.local_modes -= rustix::termios::LocalModes::ECHO;
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet);
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = &saved {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, t);
    }
    eprintln!();
    read.ok()?;
    Some(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn password(g: &Global, user: &str) -> Option<String> {
    g.password.clone().or_else(|| prompt_password(user))
}

fn fresh_login(g: &Global, api: &mut Api, cache: Option<&TokenCache>) -> Result<()> {
    let user = g.user.as_deref().ok_or_else(|| {
        ClientError::NoCredentials(format!(
            "no valid token cached for {}: give --user (COE_USER) and --password \
             (COE_PASSWORD), or run `client login`",
            api.base()
        ))
    })?;
    let pw = password(g, user).ok_or_else(|| {
        ClientError::NoCredentials(format!(
            "no password for {user}: set COE_PASSWORD, pass --password, or run on a terminal"
        ))
    })?;
    let token = api.login(user, &pw)?;
    if let Some(c) = cache {
        if let Err(e) = c.store(api.base(), user, &token) {
            eprintln!("warning: token not cached: {}", e.chain());
        }
    }
    api.set_token(token);
    Ok(())
}

/// Whether the token in use came from the cache (so a 401 may just mean
/// it went stale, e.g. the server's secret changed).
struct Session {
    api: Api,
    cached: bool,
}

fn session(g: &Global, connections: usize) -> Result<Session> {
    let mut api = connect(g, connections)?;
    let cache = TokenCache::default_location();
    if let Some(e) = cache
        .as_ref()
        .and_then(|c| c.load(api.base(), g.user.as_deref()))
    {
        api.set_token(e.token);
        return Ok(Session { api, cached: true });
    }
    fresh_login(g, &mut api, cache.as_ref())?;
    Ok(Session { api, cached: false })
}

impl Session {
    /// Runs `f`; on a 401 with a cached token, logs in again once (when a
    /// password is at hand) and retries.
    fn call<T>(&mut self, g: &Global, f: impl Fn(&Api) -> Result<T>) -> Result<T> {
        match f(&self.api) {
            Err(e) if e.status() == Some(401) && self.cached && g.password.is_some() => {
                let cache = TokenCache::default_location();
                if let Some(c) = &cache {
                    let _ = c.remove(self.api.base());
                }
                fresh_login(g, &mut self.api, cache.as_ref())?;
                self.cached = false;
                f(&self.api)
            }
            r => r,
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    if std::env::args_os()
        .any(|a| a == "--password" || a.to_string_lossy().starts_with("--password="))
    {
        eprintln!(
            "warning: a password on the command line is visible to other users (ps); prefer \
             COE_PASSWORD or the prompt"
        );
    }
    match cli.command {
        Command::Health => {
            let api = connect(g, 1)?;
            let resp = api.get("health", "/health")?;
            // 503 answers the checks too: show which failed.
            let unavailable = resp.status().as_u16() == 503;
            let resp = if unavailable {
                resp
            } else {
                http::check("health", resp)?
            };
            let h: Health = http::read_json("health", resp)?;
            if g.json {
                print_json(&h);
            } else {
                println!("{}: {} (version {})", api.base(), h.status, h.version);
                for c in h.checks.iter().filter(|c| !c.ok) {
                    let id = c.id.as_deref().map(|i| format!(" {i}")).unwrap_or_default();
                    let why = c.reason.as_deref().unwrap_or("failed");
                    println!("  {}{id} not {}: {why}", c.component, c.check);
                }
            }
            if unavailable {
                let failed: Vec<String> = h
                    .checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("{} {}", c.component, c.check))
                    .collect();
                return Err(ClientError::Http {
                    what: "health".into(),
                    status: 503,
                    short: "Service Unavailable".into(),
                    details: format!("failing: {}", failed.join(", ")),
                });
            }
            Ok(())
        }
        Command::Login => login(g),
        Command::Logout => {
            let api = connect(g, 1)?;
            let removed = match TokenCache::default_location() {
                Some(c) => c.remove(api.base())?,
                None => false,
            };
            if g.json {
                print_json(&serde_json::json!({"url": api.base(), "removed": removed}));
            } else if removed {
                println!("forgot the token for {}", api.base());
            } else {
                println!("no token cached for {}", api.base());
            }
            Ok(())
        }
        Command::Vms(cmd) => vms(g, cmd),
        Command::Snapshots(cmd) => snapshots(g, cmd),
        Command::Download(a) => download_cmd(g, a),
        Command::Verify(a) => verify_cmd(g, a),
    }
}

fn login(g: &Global) -> Result<()> {
    let mut api = connect(g, 1)?;
    let cache = TokenCache::default_location();
    fresh_login(g, &mut api, cache.as_ref())?;
    let user = g.user.clone().unwrap_or_default();
    let entry = cache.as_ref().and_then(|c| c.load(api.base(), Some(&user)));
    let exp = entry.as_ref().map(|e| e.exp);
    let cache_path = cache.as_ref().map(|c| c.path().display().to_string());
    if g.json {
        print_json(&serde_json::json!({
            "url": api.base(),
            "user": user,
            "expires": exp,
            "cache": cache_path,
        }));
    } else {
        match (exp, cache_path) {
            (Some(exp), Some(p)) => println!(
                "logged in to {} as {user}; token valid until {} (cached in {p})",
                api.base(),
                output::utc(exp)
            ),
            _ => println!(
                "logged in to {} as {user}; the token could not be cached",
                api.base()
            ),
        }
    }
    Ok(())
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn vms(g: &Global, cmd: VmsCmd) -> Result<()> {
    let mut s = session(g, 1)?;
    match cmd {
        VmsCmd::List => {
            let vms: Vec<Vm> = s.call(g, |api| api.get_json("VM list", &paths::vms()))?;
            if g.json {
                print_json(&vms);
                return Ok(());
            }
            let mut t = Table::new(&[
                "VM",
                "FRIENDLY NAME",
                "DISKS",
                "SNAPSHOT-COMPATIBLE",
                "SNAPSHOTS",
            ]);
            for v in &vms {
                t.row(vec![
                    v.name.clone(),
                    v.friendly_name.clone(),
                    v.disks.len().to_string(),
                    yes_no(v.snapshot_compatible),
                    v.snapshots.len().to_string(),
                ]);
            }
            t.print();
        }
        VmsCmd::Show { vm } => {
            let v: Vm = s.call(g, |api| api.get_json(&format!("VM {vm}"), &paths::vm(&vm)))?;
            if g.json {
                print_json(&v);
                return Ok(());
            }
            println!("VM:                  {}", v.name);
            println!("friendly name:       {}", v.friendly_name);
            println!("uuid:                {}", v.uuid);
            println!("snapshot-compatible: {}", yes_no(v.snapshot_compatible));
            println!();
            let mut t = Table::new(&["DISK", "DEVICE", "MODE", "SNAPSHOT-COMPATIBLE", "PATH"]);
            for d in &v.disks {
                t.row(vec![
                    d.name.clone(),
                    d.device_name.clone(),
                    d.mode.clone(),
                    yes_no(d.snapshot_compatible),
                    d.path.clone(),
                ]);
            }
            t.print();
            println!();
            if v.snapshots.is_empty() {
                println!("no snapshots");
            } else {
                println!("snapshots (oldest first):");
                for id in &v.snapshots {
                    println!("  {id}");
                }
            }
        }
    }
    Ok(())
}

fn allocated(d: &crate::wire::SnapshotDisk) -> u64 {
    d.chunks.iter().map(|c| c.length).sum()
}

fn snapshot_table(snaps: &[Snapshot]) {
    let mut t = Table::new(&["SNAPSHOT", "DISKS", "ALLOCATED"]);
    for s in snaps {
        t.row(vec![
            s.id.clone(),
            s.disks.len().to_string(),
            human_bytes(s.disks.iter().map(allocated).sum()),
        ]);
    }
    t.print();
}

fn snapshots(g: &Global, cmd: SnapCmd) -> Result<()> {
    let mut s = session(g, 1)?;
    match cmd {
        SnapCmd::Create { vm } => {
            let snap: Snapshot = s.call(g, |api| api.create_snapshot(&vm))?;
            if g.json {
                print_json(&snap);
            } else {
                println!("created snapshot {} of VM {}", snap.id, snap.vm_id);
                snapshot_table(std::slice::from_ref(&snap));
            }
        }
        SnapCmd::List { vm } => {
            let snaps: Vec<Snapshot> = s.call(g, |api| {
                api.get_json(&format!("snapshots of VM {vm}"), &paths::snapshots(&vm))
            })?;
            if g.json {
                print_json(&snaps);
            } else if snaps.is_empty() {
                println!("VM {vm} has no snapshots");
            } else {
                snapshot_table(&snaps);
            }
        }
        SnapCmd::Show {
            vm,
            snap,
            compare_to,
            chunks,
        } => {
            let mut path = paths::snapshot(&vm, &snap);
            if let Some(old) = &compare_to {
                path += &format!("?compareTo={}&zeroed=separate", seg(old));
            }
            let sn: Snapshot = s.call(g, |api| api.get_json(&format!("snapshot {snap}"), &path))?;
            if g.json {
                print_json(&sn);
                return Ok(());
            }
            println!("snapshot {} of VM {}", sn.id, sn.vm_id);
            if let Some(old) = &compare_to {
                println!(
                    "diff from {old}: chunks are the ranges to copy, zeroed the ranges now zero"
                );
            }
            let mut t = Table::new(&["DISK", "SIZE", "CHUNKS", "BYTES", "ZEROED", "PATH"]);
            for d in &sn.disks {
                let zeroed: u64 = d.zeroed.iter().flatten().map(|z| z.length).sum();
                t.row(vec![
                    d.name.clone(),
                    d.size.map(human_bytes).unwrap_or_else(|| "-".to_owned()),
                    d.chunks.len().to_string(),
                    human_bytes(allocated(d)),
                    if d.zeroed.is_some() {
                        human_bytes(zeroed)
                    } else {
                        "-".to_owned()
                    },
                    d.path.clone(),
                ]);
            }
            t.print();
            if chunks {
                for d in &sn.disks {
                    println!();
                    let mut t = Table::new(&["DISK", "KIND", "START", "LENGTH", "PHYSICAL"]);
                    for c in &d.chunks {
                        t.row(vec![
                            d.name.clone(),
                            "data".into(),
                            c.start.to_string(),
                            c.length.to_string(),
                            c.physical_start.to_string(),
                        ]);
                    }
                    for z in d.zeroed.iter().flatten() {
                        t.row(vec![
                            d.name.clone(),
                            "zeroed".into(),
                            z.start.to_string(),
                            z.length.to_string(),
                            "-".into(),
                        ]);
                    }
                    t.print();
                }
            }
        }
        SnapCmd::Delete { vm, snap } => {
            s.call(g, |api| {
                api.delete(
                    &format!("delete snapshot {snap}"),
                    &paths::snapshot(&vm, &snap),
                )
            })?;
            if g.json {
                print_json(&serde_json::json!({"vm": vm, "deleted": snap}));
            } else {
                println!("deleted snapshot {snap} of VM {vm}");
            }
        }
        SnapCmd::Purge { vm, yes } => {
            if !yes {
                return Err(ClientError::Usage(format!(
                    "purge deletes EVERY snapshot of VM {vm}; add --yes to confirm"
                )));
            }
            s.call(g, |api| {
                api.delete(
                    &format!("purge snapshots of VM {vm}"),
                    &paths::snapshots(&vm),
                )
            })?;
            if g.json {
                print_json(&serde_json::json!({"vm": vm, "purged": true}));
            } else {
                println!("deleted every snapshot of VM {vm}");
            }
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct VerifyReport {
    vm: String,
    snapshot: String,
    disks: Vec<verify::VerifyOutcome>,
}

/// Verifies the named replicas; an error when any differs.
fn verify_all(
    api: &Api,
    vm: &str,
    snap: &str,
    out: &std::path::Path,
    disks: &[String],
    with: verify::VerifyWith,
) -> Result<Vec<verify::VerifyOutcome>> {
    let mut v = Vec::new();
    for d in disks {
        replica::check_disk_name(d)?;
        v.push(verify::verify_disk_with(
            api,
            vm,
            snap,
            d,
            &out.join(d),
            verify::DEFAULT_BLOCK,
            with,
        )?);
    }
    Ok(v)
}

fn mismatch_error(outcomes: &[verify::VerifyOutcome]) -> Result<()> {
    let bad: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.ok())
        .map(verify::VerifyOutcome::describe)
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ClientError::VerifyMismatch(bad.join("; ")))
    }
}

fn download_cmd(g: &Global, a: DownloadArgs) -> Result<()> {
    let mut s = session(g, a.jobs as usize)?;
    let o = download::Options {
        vm: a.vm.clone(),
        snap: a.snap.clone(),
        out: a.out.clone(),
        diff_from: a.diff_from.clone(),
        jobs: a.jobs as usize,
        disks: a.disks.clone(),
        transport: a.transport,
        limit_rate: a.limit_rate,
        progress: !g.quiet,
        zstd: (a.compress == download::Compress::Zstd).then_some(a.compress_level),
    };
    let mut report = match s.call(g, |api| download::download(api, &o)) {
        Err(e) if a.full_if_needed && e.needs_full_copy() => {
            eprintln!(
                "warning: {}; making a full copy instead (--full-if-needed)",
                e.chain()
            );
            let full = download::Options {
                diff_from: None,
                ..o.clone()
            };
            s.call(g, |api| download::download(api, &full))?
        }
        r => r?,
    };
    // A verification that cannot run is reported after the download's own
    // report: the replicas are complete either way.
    let mut verify_error = None;
    if a.verify {
        let names: Vec<String> = report.disks.iter().map(|d| d.disk.clone()).collect();
        match verify_all(&s.api, &a.vm, &a.snap, &a.out, &names, a.verify_with) {
            Ok(outcomes) => {
                for (d, v) in report.disks.iter_mut().zip(outcomes) {
                    d.verify = Some(v);
                }
            }
            Err(e) => verify_error = Some(e),
        }
    }
    if g.json {
        print_json(&report);
    } else {
        println!(
            "snapshot {} of VM {}{} into {}: {} in {:.1}s",
            report.snapshot,
            report.vm,
            report
                .base
                .as_deref()
                .map(|b| format!(" (from {b})"))
                .unwrap_or_default(),
            report.out,
            human_bytes(report.bytes),
            report.seconds
        );
        let mut t = Table::new(&["DISK", "MODE", "SIZE", "FETCHED", "ZEROED", "VIA", "STATE"]);
        for d in &report.disks {
            let state = if d.up_to_date {
                "up to date".to_owned()
            } else if d.resumed {
                "resumed, done".to_owned()
            } else {
                "done".to_owned()
            };
            let state = match &d.verify {
                Some(v) if v.ok() => format!("{state}, verified"),
                Some(_) => format!("{state}, VERIFY FAILED"),
                None => state,
            };
            t.row(vec![
                d.disk.clone(),
                d.mode.to_owned(),
                human_bytes(d.size),
                human_bytes(d.bytes),
                human_bytes(d.zeroed),
                d.transport.to_owned(),
                state,
            ]);
        }
        t.print();
    }
    if let Some(e) = verify_error {
        return Err(e);
    }
    let outcomes: Vec<verify::VerifyOutcome> = report
        .disks
        .iter()
        .filter_map(|d| d.verify.clone())
        .collect();
    mismatch_error(&outcomes)
}

fn verify_cmd(g: &Global, a: VerifyArgs) -> Result<()> {
    let mut s = session(g, 1)?;
    let disks = if a.disks.is_empty() {
        let snap: Snapshot = s.call(g, |api| {
            api.get_json("snapshot", &paths::snapshot(&a.vm, &a.snap))
        })?;
        snap.disks.into_iter().map(|d| d.name).collect()
    } else {
        a.disks.clone()
    };
    let outcomes = s.call(g, |api| {
        verify_all(api, &a.vm, &a.snap, &a.out, &disks, a.verify_with)
    })?;
    if g.json {
        print_json(&VerifyReport {
            vm: a.vm.clone(),
            snapshot: a.snap.clone(),
            disks: outcomes.clone(),
        });
    } else {
        for o in &outcomes {
            println!("{}", o.describe());
        }
    }
    mismatch_error(&outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn empty_ids_are_usage_errors() {
        // An empty snapshot id made `.../snapshots/`, the list route, whose
        // array was read as one snapshot ("invalid type: map, expected a
        // string") in a soak that passed a half-written id.
        for args in [
            &["c", "download", "vm1", "", "--out", "/x"][..],
            &["c", "download", "", "s1", "--out", "/x"],
            &[
                "c",
                "download",
                "vm1",
                "s1",
                "--out",
                "/x",
                "--diff-from",
                "",
            ],
            &["c", "download", "vm1", "s1", "--out", "/x", "--disk", " "],
            &["c", "verify", "vm1", "", "--out", "/x"],
            &["c", "snapshots", "show", "vm1", ""],
            &["c", "snapshots", "delete", "vm1", ""],
            &["c", "snapshots", "show", "vm1", "s1", "--compare-to", ""],
            &["c", "vms", "show", ""],
        ] {
            let e = Cli::try_parse_from(args).expect_err(&format!("{args:?}"));
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
    }

    #[test]
    fn download_arguments_parse() {
        let cli = Cli::try_parse_from([
            "c",
            "download",
            "vm1",
            "s2",
            "--out",
            "/tmp/x",
            "--diff-from",
            "s1",
            "--jobs",
            "8",
            "--verify",
            "--json",
            "--limit-rate",
            "10M",
        ])
        .unwrap();
        assert!(cli.global.json);
        match cli.command {
            Command::Download(a) => {
                assert_eq!(a.diff_from.as_deref(), Some("s1"));
                assert_eq!(a.jobs, 8);
                assert!(a.verify);
                assert_eq!(a.limit_rate, Some(10 << 20));
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["c", "download", "vm1", "s2", "--out", "/x", "--jobs", "0"])
            .unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
        let e = Cli::try_parse_from(["c", "snapshots", "frobnicate"]).unwrap_err();
        assert_eq!(e.exit_code(), exit::USAGE);
    }

    /// The long help names the password variable and the exit statuses.
    /// That it never shows the variable's value is checked on the binary,
    /// with the variable set (tests/e2e.rs): clap reads it at start.
    #[test]
    fn help_names_the_password_variable_and_exit_statuses() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("COE_PASSWORD"));
        assert!(help.contains("Exit status"));
    }
}
