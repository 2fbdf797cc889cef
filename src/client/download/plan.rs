//! Planning: what each disk needs, decided before any byte moves (the
//! snapshot's chunks, or a diff's changed and zeroed ranges, minus what an
//! interrupted run already did).

use std::path::{Path, PathBuf};

use super::options::{Options, Transport};
use crate::client::error::{ClientError, Result};
use crate::client::http::{paths, seg, Api};
use crate::client::ranges::RangeSet;
use crate::client::replica::{check_disk_name, DownloadState, ZeroBlocks};
use crate::wire::{Snapshot, SnapshotDisk};

/// One disk's work, decided before any byte moves.
pub(super) struct Plan {
    pub(super) disk: String,
    pub(super) path: PathBuf,
    pub(super) state_path: PathBuf,
    pub(super) state: DownloadState,
    pub(super) size: u64,
    pub(super) data: Vec<(u64, u64)>,
    pub(super) zero: Vec<(u64, u64)>,
    /// The replica is (re)created empty.
    pub(super) fresh: bool,
    pub(super) zeros: ZeroBlocks,
    pub(super) resumed: bool,
    pub(super) up_to_date: bool,
    /// Try the incremental stream first.
    pub(super) stream: bool,
    pub(super) mode: &'static str,
}

/// `[start, end)` pairs of ranges (the form the resume state keeps).
fn pairs(ranges: Vec<std::ops::Range<u64>>) -> Vec<(u64, u64)> {
    ranges.into_iter().map(|r| (r.start, r.end)).collect()
}

pub(super) fn minus(ranges: &[(u64, u64)], done: &RangeSet) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .flat_map(|&(s, e)| done.missing(s, e))
        .collect()
}

pub(super) fn select<'a>(snap: &'a Snapshot, want: &[String]) -> Result<Vec<&'a SnapshotDisk>> {
    for w in want {
        if !snap.disks.iter().any(|d| &d.name == w) {
            let names: Vec<&str> = snap.disks.iter().map(|d| d.name.as_str()).collect();
            return Err(ClientError::Usage(format!(
                "--disk {w}: not a disk of snapshot {} (its disks: {})",
                snap.id,
                names.join(", ")
            )));
        }
    }
    Ok(snap
        .disks
        .iter()
        .filter(|d| want.is_empty() || want.contains(&d.name))
        .collect())
}

pub(super) fn replica_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

pub(super) fn up_to_date(plan: &mut Plan) {
    plan.up_to_date = true;
    plan.data.clear();
    plan.zero.clear();
}

pub(super) fn plan_full(api: &Api, o: &Options) -> Result<Vec<Plan>> {
    let snap: Snapshot = api.get_json("snapshot", &paths::snapshot(&o.vm, &o.snap))?;
    let mut plans = Vec::new();
    for d in select(&snap, &o.disks)? {
        check_disk_name(&d.name)?;
        let size = api.disk_size(&o.vm, &o.snap, &d.name)?;
        let path = o.out.join(&d.name);
        let state_path = DownloadState::path(&o.out, &d.name);
        let prev = DownloadState::load(&state_path)?;
        let chunks = pairs(d.chunk_ranges(size));
        let mut plan = Plan {
            disk: d.name.clone(),
            path: path.clone(),
            state_path,
            state: DownloadState::new(&o.vm, &o.snap, None, &d.name, size),
            size,
            data: chunks.clone(),
            zero: Vec::new(),
            fresh: true,
            zeros: ZeroBlocks::Skip,
            resumed: false,
            up_to_date: false,
            stream: o.transport == Transport::Stream,
            mode: "full",
        };
        let have = replica_len(&path) == Some(size);
        match prev {
            Some(s) if s.snapshot == o.snap && s.complete && have => up_to_date(&mut plan),
            Some(s) if s.snapshot == o.snap && s.base.is_none() && s.size == size && have => {
                plan.data = minus(&chunks, &s.done);
                plan.state = s;
                plan.fresh = false;
                plan.resumed = true;
                plan.stream = false;
            }
            _ => {}
        }
        plans.push(plan);
    }
    Ok(plans)
}

pub(super) fn plan_incremental(api: &Api, o: &Options, base: &str) -> Result<Vec<Plan>> {
    let diff: Snapshot = api.get_json(
        &format!("diff of {} from {base}", o.snap),
        &format!(
            "{}?compareTo={}&zeroed=separate",
            paths::snapshot(&o.vm, &o.snap),
            seg(base)
        ),
    )?;
    let old: Snapshot = api.get_json("base snapshot", &paths::snapshot(&o.vm, base))?;
    let mut plans = Vec::new();
    for d in select(&diff, &o.disks)? {
        check_disk_name(&d.name)?;
        let size = d.size.ok_or_else(|| ClientError::Protocol {
            what: format!("diff of disk {}", d.name),
            problem: "no `size` in the answer: the server is too old for incremental \
                      downloads"
                .to_owned(),
        })?;
        let path = o.out.join(&d.name);
        let state_path = DownloadState::path(&o.out, &d.name);
        let prev = DownloadState::load(&state_path)?;
        let in_base = old.disks.iter().any(|x| x.name == d.name);
        let data = pairs(d.chunk_ranges(size));
        let zero: Vec<(u64, u64)> = if in_base {
            pairs(d.zeroed_ranges(size))
        } else {
            Vec::new()
        };
        let mut plan = Plan {
            disk: d.name.clone(),
            path: path.clone(),
            state_path: state_path.clone(),
            state: DownloadState::new(&o.vm, &o.snap, Some(base), &d.name, size),
            size,
            data: data.clone(),
            zero: zero.clone(),
            fresh: !in_base,
            zeros: if in_base {
                ZeroBlocks::Punch
            } else {
                ZeroBlocks::Skip
            },
            resumed: false,
            up_to_date: false,
            stream: o.transport != Transport::Ranges,
            mode: if in_base {
                "incremental"
            } else {
                "full (new disk)"
            },
        };
        let len = replica_len(&path);
        let exists = len.is_some();
        match prev {
            Some(s) if s.snapshot == o.snap && s.complete && len == Some(size) => {
                up_to_date(&mut plan)
            }
            Some(s) if s.snapshot == o.snap && s.base.as_deref() == Some(base) && exists => {
                plan.data = minus(&data, &s.done);
                plan.zero = minus(&zero, &s.done);
                plan.state = s;
                plan.fresh = false;
                plan.resumed = true;
                plan.stream = false;
            }
            _ if !in_base => {}
            Some(s) if s.complete && s.snapshot == base && exists => {}
            None if exists => {}
            None => {
                return Err(ClientError::ReplicaConflict(format!(
                    "no replica of disk {} at {}: make a full copy of snapshot {base} first \
                     (download without --diff-from)",
                    d.name,
                    path.display()
                )))
            }
            Some(s) => {
                return Err(ClientError::ReplicaConflict(format!(
                    "{} is {} of snapshot {}{}, not a complete copy of {base}: applying the \
                     diff from {base} would corrupt it. Download {} again (or remove {} if \
                     you know the replica is a copy of {base})",
                    path.display(),
                    if s.complete {
                        "a complete copy"
                    } else {
                        "an unfinished download"
                    },
                    s.snapshot,
                    s.base
                        .as_deref()
                        .map(|b| format!(" (from {b})"))
                        .unwrap_or_default(),
                    if s.complete { &o.snap } else { &s.snapshot },
                    state_path.display()
                )))
            }
        }
        plans.push(plan);
    }
    Ok(plans)
}
