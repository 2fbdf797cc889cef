//! The `coriolis-ovm-exporter` binary: a thin shell over the library.
//!
//! Dispatch on the first argument: `-version`, `client ...` (the
//! command-line client), `demo ...` (the self-contained demo), the snapshot
//! administration commands, and the server (the default, with `-config PATH`
//! / `--config PATH`). Other subcommands are added here as one match arm
//! each.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use coriolis_ovm_exporter::api::Backend;
use coriolis_ovm_exporter::node::{self, Node};
use coriolis_ovm_exporter::server;
use coriolis_ovm_exporter::server::config::{Config, DEFAULT_CONFIG_PATH};

/// Exit status for a usage or config error (sysexits' EX_USAGE/EX_CONFIG
/// are not worth a dependency; systemd only needs non-zero).
const EXIT_BAD_START: u8 = 2;
/// Exit status when the server stops on an error.
const EXIT_FAILED: u8 = 1;

fn main() -> ExitCode {
    // Before any thread: the read buffers' memory goes back to the OS when
    // the pool lets them go (sys::memory).
    coriolis_ovm_exporter::sys::memory::tune_allocator();
    // The client and the demo take their arguments as OS strings (paths
    // need not be UTF-8): dispatch them before anything reads `args()`.
    let first = std::env::args_os().nth(1);
    match first.as_deref().and_then(|a| a.to_str()) {
        // The command-line client (src/client/).
        Some("client") => {
            let rest = std::env::args_os().skip(2).collect();
            std::process::exit(coriolis_ovm_exporter::client::main(rest));
        }
        // The self-contained demo (src/demo.rs).
        Some("demo") => {
            let rest = std::env::args_os().skip(2).collect();
            std::process::exit(coriolis_ovm_exporter::demo::main(rest));
        }
        _ => {}
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("-version" | "--version") => {
            println!("coriolis-ovm-exporter {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        // With the config file: the node's own database and repositories.
        Some(cmd @ ("reconcile" | "rebuild-db"))
            if args[1..]
                .iter()
                .any(|a| a.starts_with("-config") || a.starts_with("--config")) =>
        {
            node_admin(cmd, &args[1..])
        }
        // Snapshot administration by flags (src/snapshot/admin.rs).
        Some(cmd @ ("reconcile" | "rebuild-db" | "snapshot")) => {
            let rest: Vec<String> = args[1..].to_vec();
            std::process::exit(coriolis_ovm_exporter::snapshot::admin::run(cmd, &rest));
        }
        Some("-h" | "-help" | "--help") => {
            println!(
                "usage: coriolis-ovm-exporter [-config PATH] | -version\n\
                 \x20      coriolis-ovm-exporter client --help   (the command-line client)\n\
                 \x20      coriolis-ovm-exporter demo [--dir DIR] [--port N] [--keep]   (try it out)\n\
                 \x20      coriolis-ovm-exporter reconcile | rebuild-db | snapshot ...   (administration)"
            );
            ExitCode::SUCCESS
        }
        _ => serve(&args),
    }
}

/// The umask of the server and the administration commands: files they
/// create (log, database, lock, snapshot folders) are the service's own.
const SERVICE_UMASK: u32 = 0o077;

/// Set [`SERVICE_UMASK`], whatever the caller's (a shell's 022, an init
/// system without `UMask=`).
fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(SERVICE_UMASK));
}

/// `coriolis-ovm-exporter [-config PATH]`: run the API server.
fn serve(args: &[String]) -> ExitCode {
    private_umask();
    let path = match config_path(args) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("coriolis-ovm-exporter: {msg}");
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("coriolis-ovm-exporter: {e}");
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    if let Err(e) = server::logging::init(config.log_file.as_deref()) {
        eprintln!(
            "coriolis-ovm-exporter: config {}: log_file: {e}",
            config.path.display()
        );
        return ExitCode::from(EXIT_BAD_START);
    }
    let backend: Arc<dyn Backend> = match Node::open(&config) {
        Ok(node) => Arc::new(node),
        Err(e) => {
            let msg = node::error_chain(&e);
            tracing::error!(error = %msg, "cannot open the node");
            eprintln!("coriolis-ovm-exporter: {msg}");
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    match server::run(config, backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server stopped");
            eprintln!("coriolis-ovm-exporter: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// `reconcile -config PATH` / `rebuild-db -config PATH`: reconcile or
/// rebuild the node's snapshot database against the repositories of its
/// inventory, printing each action. Run with the service stopped.
fn node_admin(cmd: &str, args: &[String]) -> ExitCode {
    private_umask();
    let config = match config_path(args).and_then(|p| Config::load(&p).map_err(|e| e.to_string())) {
        Ok(c) => c,
        Err(msg) => {
            eprintln!("coriolis-ovm-exporter {cmd}: {msg}");
            return ExitCode::from(EXIT_BAD_START);
        }
    };
    let _ = server::logging::init(None);
    let result = Node::open_only(&config)
        .map_err(|e| node::error_chain(&e))
        .and_then(|node| {
            let r = if cmd == "rebuild-db" {
                node.rebuild()
            } else {
                node.reconcile()
            };
            r.map_err(|e| node::error_chain(&e))
        });
    match result {
        Ok(report) => {
            for a in &report.actions {
                println!("{a}");
            }
            println!(
                "{cmd}: {} kept, {} actions",
                report.kept,
                report.actions.len()
            );
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("coriolis-ovm-exporter {cmd}: {msg}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The server's and the node commands' command line: the config file.
#[derive(clap::Parser)]
#[command(no_binary_name = true, disable_help_flag = true)]
struct ConfigLine {
    #[arg(long)]
    config: Option<PathBuf>,
}

/// `-config PATH`, `--config PATH`, `-config=PATH` or `--config=PATH`;
/// the default path otherwise. The one-dash spelling is Go's `flag`
/// package's, the old service's contract; clap reads the two-dash one.
fn config_path(args: &[String]) -> Result<PathBuf, String> {
    use clap::Parser;
    let args = args.iter().map(|a| match a.strip_prefix("-config") {
        Some(rest) if rest.is_empty() || rest.starts_with('=') => format!("-{a}"),
        _ => a.clone(),
    });
    let line = ConfigLine::try_parse_from(args).map_err(|e| {
        format!(
            "{}; usage: coriolis-ovm-exporter [-config PATH]",
            e.to_string().lines().next().unwrap_or_default()
        )
    })?;
    Ok(line
        .config
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)))
}
