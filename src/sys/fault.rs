//! The fault-point mechanism: with `COE_FAULT=<point>` in the environment,
//! reaching that point sends SIGKILL to the process itself: no destructor,
//! no flush, exactly what a power cut or `kill -9` leaves behind.
//!
//! The points are named by the layers that have them (`snapshot::fault`
//! lists create's and delete's, `store` its own); this module only knows
//! whether one is armed. Why always compiled in rather than behind a cargo
//! feature: see `snapshot::fault`.

use std::sync::OnceLock;

/// The environment variable naming the point to die at.
pub const ENV: &str = "COE_FAULT";

fn armed() -> Option<&'static str> {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Whether a fault point is armed (the service warns at start if so).
pub fn armed_point() -> Option<&'static str> {
    armed()
}

/// Dies here, by SIGKILL, if `point` is the armed one.
pub fn point(point: &str) {
    if armed() == Some(point) {
        eprintln!("fault point {point}: killing the process");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; should it somehow be, abort anyway.
        std::process::abort();
    }
}

/// True the first time `point` is reached when it is the armed one: for
/// fault points that make a step fail instead of killing the process.
pub fn once(point: &str) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    static FIRED: AtomicBool = AtomicBool::new(false);
    armed() == Some(point) && !FIRED.swap(true, Ordering::AcqRel)
}
