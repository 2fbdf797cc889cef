//! `GET /health`: whether the service can do its job now, checked, not
//! assumed.
//!
//! The answer is 200 `ok` when every check passes and 503 `unavailable`
//! otherwise, with the checks either way: the store writable (a failed
//! write makes the store probe with a small write until one commits), the
//! io core up (one small read through it), each repository of the
//! inventory readable and cloneable (skipped ones included, with their
//! reason). `/metrics` runs the same checks and shows them as the
//! `coe_up` and `coe_health_check` gauges, so the two never disagree.
//! Reasons are error texts without paths or secrets: the route is public.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use super::state::State;
use crate::wire::{Health, HealthCheck};

/// The io check's read must come back within this (a stuck io core is down).
const IO_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const IO_CHECK_LEN: usize = 4096;

/// Health with `status` `ok` or `unavailable`. `/health` is public, so a
/// flood of it must not become a flood of checks (each one a blocking-pool
/// trip, a memfd and an io-core buffer): one check runs at a time, and a
/// request answers the first check that started after it arrived (never an
/// older one), so waiters that piled up behind a check share the next.
pub async fn check(state: &State) -> Health {
    let arrived = tokio::time::Instant::now();
    let mut last = state.last_health.lock().await;
    if let Some((started, health)) = &*last {
        if *started >= arrived {
            return health.clone();
        }
    }
    let started = tokio::time::Instant::now();
    let health = run_checks(state).await;
    *last = Some((started, health.clone()));
    health
}

/// Runs every check. The checks are kept for the metrics gauges.
async fn run_checks(state: &State) -> Health {
    let be = state.backend.clone();
    let mut checks = match tokio::task::spawn_blocking(move || be.health()).await {
        Ok(c) => c,
        Err(e) => vec![HealthCheck::new(
            "backend",
            None,
            "up",
            false,
            Some(format!("the check failed: {e}")),
        )],
    };
    let io = check_io(state).await;
    checks.insert(0, HealthCheck::new("io", None, "up", io.is_ok(), io.err()));
    state.metrics.set_health(&checks);
    let ok = checks.iter().all(|c| c.ok);
    Health {
        status: if ok { "ok" } else { "unavailable" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        checks,
    }
}

/// One page read through the io core from an anonymous memory file.
async fn check_io(state: &State) -> Result<(), String> {
    let pattern: Vec<u8> = (0..IO_CHECK_LEN).map(|i| (i % 251) as u8).collect();
    let file = tokio::task::spawn_blocking({
        let pattern = pattern.clone();
        move || -> std::io::Result<std::fs::File> {
            let fd = rustix::fs::memfd_create("coe-health", rustix::fs::MemfdFlags::CLOEXEC)?;
            let mut f = std::fs::File::from(fd);
            f.write_all(&pattern)?;
            Ok(f)
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot make the test file: {e}"))?;
    let disk = state
        .engine
        .open_file(file, Path::new("health check"))
        .map_err(|e| crate::error::chain(&e))?;
    let mut stream = state
        .engine
        .read(&disk, 0..IO_CHECK_LEN as u64)
        .map_err(|e| crate::error::chain(&e))?;
    let read = async {
        let mut got = Vec::with_capacity(IO_CHECK_LEN);
        while let Some(frame) = stream.next().await {
            got.extend_from_slice(&frame.map_err(|e| crate::error::chain(&e))?);
        }
        Ok::<_, String>(got)
    };
    match tokio::time::timeout(IO_CHECK_TIMEOUT, read).await {
        Ok(Ok(got)) if got == pattern => Ok(()),
        Ok(Ok(_)) => Err("a read through the io core returned other bytes".into()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "a read through the io core took more than {IO_CHECK_TIMEOUT:?}"
        )),
    }
}
