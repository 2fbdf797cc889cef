//! The integration tests: one binary, one module per area (ripgrep style).
//!
//! Tests that need reflink filesystems read `COE_TEST_XFS` and
//! `COE_TEST_BTRFS` (folders on loop-mounted XFS with reflink and btrfs);
//! `scripts/test.sh` makes them. Without them those tests fail, saying how
//! to run them: they never pass silently. The modules named `ocfs2_*` run
//! inside QEMU guests on OCFS2 (`COE_TEST_OCFS2`, `scripts/ocfs2/guest.sh`);
//! `scripts/test.sh` runs them there and the rest on the host.

mod api;
mod catalog;
mod common;
mod datapath;
mod e2e;
mod fs_core;
mod heal;
mod hostile;
mod io;
mod ocfs2_cluster;
mod ocfs2_guest;
mod ovm;
mod snapshot;
mod snapshot_crash;
mod stream_wan;
