//! The `coriolis-ovm-exporter` binary: a thin shell over the library.

fn main() {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        Some("-version" | "--version") => {
            println!("coriolis-ovm-exporter {}", env!("CARGO_PKG_VERSION"));
        }
        // Snapshot administration (src/snapshot/admin.rs).
        Some(cmd @ ("reconcile" | "rebuild-db" | "snapshot")) => {
            let rest: Vec<String> = args.collect();
            std::process::exit(coriolis_ovm_exporter::snapshot::admin::run(cmd, &rest));
        }
        _ => {
            eprintln!("coriolis-ovm-exporter: the server is not built yet; try --version");
            std::process::exit(2);
        }
    }
}
