//! The integration tests: one binary, one module per area (ripgrep style).
//!
//! Tests that need reflink filesystems read `COE_TEST_XFS` and
//! `COE_TEST_BTRFS` (folders on loop-mounted XFS with reflink and btrfs);
//! `scripts/test.sh` makes them. Without them those tests fail, saying how
//! to run them: they never pass silently.

mod api;
mod common;
mod datapath;
mod e2e;
mod fs_core;
mod heal;
mod hostile;
mod io;
mod ovm;
mod snapshot;
mod snapshot_crash;
