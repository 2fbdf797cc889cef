//! The run: plan every disk, then per disk prepare the replica, move the
//! bytes (stream or ranges), checkpoint, verify, and report.

use std::os::unix::fs::DirBuilderExt;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use super::apply::{apply_ranges, apply_stream, StreamOutcome};
use super::fetch::{monitored, Ctx, Tracker};
use super::options::{Options, Transport};
use super::plan::{minus, plan_full, plan_incremental, Plan};
use crate::client::error::{ClientError, Result};
use crate::client::http::Api;
use crate::client::progress::Progress;
use crate::client::replica::Replica;
use crate::client::verify::VerifyOutcome;

/// What happened to one disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    pub disk: String,
    pub path: String,
    pub size: u64,
    /// `full`, `incremental`, or `full (new disk)` for a disk the base did
    /// not have.
    pub mode: &'static str,
    /// `ranges`, `stream`, or `none` (nothing to do).
    pub transport: &'static str,
    /// Data bytes fetched in this run.
    pub bytes: u64,
    /// Bytes made zero locally (punched) in this run.
    pub zeroed: u64,
    /// Continued an interrupted download.
    pub resumed: bool,
    /// Already a complete copy of the snapshot: nothing done.
    pub up_to_date: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyOutcome>,
}

/// What `download` did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub vm: String,
    pub snapshot: String,
    pub base: Option<String>,
    pub out: String,
    pub disks: Vec<DiskReport>,
    pub bytes: u64,
    pub seconds: f64,
}

/// Mode of an output folder the client creates.
pub(super) const OUT_DIR_MODE: u32 = 0o700;

pub(super) fn run_plan(
    api: &Api,
    o: &Options,
    plan: Plan,
    progress: &Progress,
) -> Result<DiskReport> {
    let mut report = DiskReport {
        disk: plan.disk.clone(),
        path: plan.path.display().to_string(),
        size: plan.size,
        mode: plan.mode,
        transport: "none",
        bytes: 0,
        zeroed: 0,
        resumed: plan.resumed,
        up_to_date: plan.up_to_date,
        verify: None,
    };
    if plan.up_to_date {
        return Ok(report);
    }
    // The state goes first: from the next line on, the replica is no longer
    // a copy of the base, and a rerun must know it.
    plan.state.save(&plan.state_path)?;
    let replica = if plan.fresh {
        Replica::create(&plan.path, plan.size)?
    } else {
        let r = Replica::open(&plan.path, plan.zeros)?;
        r.set_len(plan.size)?;
        r
    };
    let tracker = Tracker {
        replica: &replica,
        state: Mutex::new(plan.state.clone()),
        path: &plan.state_path,
    };
    let c = Ctx {
        api,
        o,
        disk: &plan.disk,
        replica: &replica,
        tracker: &tracker,
        progress,
    };
    let before = progress.done();
    let result = monitored(progress, &tracker, || -> Result<(&'static str, u64)> {
        let (mut data, mut zero) = (plan.data.clone(), plan.zero.clone());
        let mut zeroed = 0;
        if plan.stream {
            match apply_stream(&c, o.diff_from.as_deref(), plan.size)? {
                StreamOutcome::Done { zeroed } => return Ok(("stream", zeroed)),
                StreamOutcome::Unavailable if o.transport == Transport::Stream => {
                    return Err(ClientError::Http {
                        what: format!("incremental stream of disk {}", plan.disk),
                        status: 404,
                        short: "Not Found".to_owned(),
                        details: "the server has no incremental stream endpoint; use \
                                  --transport auto or ranges"
                            .to_owned(),
                    })
                }
                StreamOutcome::Unavailable => {}
                StreamOutcome::Broken { why, zeroed: z } => {
                    eprintln!(
                        "warning: disk {}: {why}; fetching the rest by ranges",
                        plan.disk
                    );
                    zeroed = z;
                    let done = tracker.done();
                    data = minus(&data, &done);
                    zero = minus(&zero, &done);
                }
            }
        }
        zeroed += apply_ranges(&c, &data, &zero)?;
        Ok(("ranges", zeroed))
    });
    match result {
        Ok((transport, zeroed)) => {
            tracker.finish()?;
            report.transport = transport;
            report.zeroed = zeroed;
            report.bytes = progress.done() - before;
            Ok(report)
        }
        Err(e) => {
            // Keep what is done for the rerun.
            let _ = tracker.checkpoint();
            Err(e)
        }
    }
}

/// Runs a download to the end; verification is the caller's.
pub fn download(api: &Api, o: &Options) -> Result<Report> {
    // Folders made here are private: they hold VM disks.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(OUT_DIR_MODE)
        .create(&o.out)
        .map_err(|source| ClientError::Local {
            what: "cannot create the output folder",
            path: o.out.clone(),
            source,
        })?;
    let t0 = Instant::now();
    let plans = match &o.diff_from {
        None => plan_full(api, o)?,
        Some(base) => plan_incremental(api, o, base)?,
    };
    let total: u64 = plans
        .iter()
        .flat_map(|p| p.data.iter())
        .map(|(s, e)| e - s)
        .sum();
    let progress = Progress::new(total, o.limit_rate, o.progress);
    let mut disks = Vec::new();
    let mut failure = None;
    for plan in plans {
        match run_plan(api, o, plan, &progress) {
            Ok(r) => disks.push(r),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    progress.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Report {
        vm: o.vm.clone(),
        snapshot: o.snap.clone(),
        base: o.diff_from.clone(),
        out: o.out.display().to_string(),
        bytes: disks.iter().map(|d| d.bytes).sum(),
        disks,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
