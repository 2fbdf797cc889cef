//! The JSON shapes of the API, exactly as API.md fixes them: what the
//! server answers and the client reads.
//!
//! Field names are the wire contract with existing clients (Coriolis,
//! `python-ovmexporterclient`): they must not be renamed. Arrays are plain
//! `Vec`s so they serialize as `[]`, never `null`. Extension fields (`size`,
//! `zeroed`) are optional and left out of answers that do not carry them, so
//! an old client sees exactly what it saw before.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::range;
use crate::extent::ByteRange;

/// One disk of a VM (`VM.disks[]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The disk's file name: the `{disk}` of the API.
    pub name: String,
    pub path: String,
    pub device_name: String,
    pub snapshot_compatible: bool,
    pub mode: String,
}

/// A VM (`GET /vms`, `GET /vms/{vm}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub friendly_name: String,
    /// The VM id (32 hex on Oracle VM): the `{vm}` of the API.
    pub name: String,
    pub uuid: String,
    pub disks: Vec<Disk>,
    pub snapshot_compatible: bool,
    /// Snapshot ids, oldest first.
    pub snapshots: Vec<String>,
}

/// One chunk (API.md, Snapshot): an allocated extent of a snapshot file,
/// or a range to copy in a diff, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub start: u64,
    pub length: u64,
    pub physical_start: u64,
}

/// One disk of a snapshot (API.md's Snapshot disk object); `size` and
/// `zeroed` (extensions) only in diff answers, so an old client sees
/// exactly the old fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    pub parent_path: String,
    pub path: String,
    pub snapshot_id: String,
    pub chunks: Vec<Chunk>,
    pub name: String,
    pub repo_mountpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zeroed: Option<Vec<ByteRange>>,
    /// Size of the snapshot file in bytes (always known to the server; not
    /// sent: `size` is the wire field of diff answers).
    #[serde(skip)]
    pub file_size: u64,
}

impl SnapshotDisk {
    /// The `chunks` as half-open ranges inside a disk of `size` bytes,
    /// sorted and merged.
    pub fn chunk_ranges(&self, size: u64) -> Vec<Range<u64>> {
        range::clipped(self.chunks.iter().map(|c| (c.start, c.length)), size)
    }

    /// The `zeroed` ranges likewise (none when the answer has none).
    pub fn zeroed_ranges(&self, size: u64) -> Vec<Range<u64>> {
        range::clipped(
            self.zeroed.iter().flatten().map(|r| (r.start, r.length)),
            size,
        )
    }
}

/// A snapshot (API.md, Snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub vm_id: String,
    pub disks: Vec<SnapshotDisk>,
    /// Creation time (ordering on the server; not sent).
    #[serde(skip)]
    pub created_at_ns: u64,
}

/// Body of `POST /auth/login`. Unknown fields are ignored, as the old
/// service did; both fields are required.
#[derive(Deserialize)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

// The password must never reach a log line, even through `{:?}`.
impl std::fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Answer of `POST /auth/login`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoginResponse {
    pub token: String,
}

/// The error body of every failed request.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The old service's short: `Not Found`, `Not Authorized`, ...
    pub error: String,
    pub details: String,
    /// A stable machine-readable code for failures a client can act on
    /// (`CODE_*`); absent otherwise. Old clients ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

/// `code`: the `compareTo` base is unknown to the repository's catalog, or
/// its clone is gone. A full copy is needed.
pub const CODE_BASE_UNAVAILABLE: &str = "base_unavailable";
/// `code`: the base's clone changed since it was recorded. A full copy is
/// needed.
pub const CODE_BASE_CHANGED: &str = "base_changed";
/// `code`: the VM's disk is another file than the one the base cloned. A
/// full copy is needed.
pub const CODE_DISK_REPLACED: &str = "disk_replaced";

/// Whether an error body's `code` says the `compareTo` base cannot be used
/// and a full copy is needed.
pub fn needs_full_copy(code: &str) -> bool {
    [CODE_BASE_UNAVAILABLE, CODE_BASE_CHANGED, CODE_DISK_REPLACED].contains(&code)
}

/// Answer of `GET /api/v1/health`: `status` is `ok` (HTTP 200) when every
/// check passes, `unavailable` (HTTP 503) otherwise.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// What was checked (absent from old servers' answers).
    #[serde(default)]
    pub checks: Vec<HealthCheck>,
}

/// One check of `GET /health`, also a `coe_health_check` gauge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// `store`, `io` or `repository`.
    pub component: String,
    /// The repository's id, for repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `writable` (store), `up` (io), `readable` or `cloneable`
    /// (repository).
    pub check: String,
    pub ok: bool,
    /// Why not, when not: an error text, no secret, no path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl HealthCheck {
    pub fn new(
        component: &str,
        id: Option<&str>,
        check: &str,
        ok: bool,
        reason: Option<String>,
    ) -> Self {
        HealthCheck {
            component: component.to_owned(),
            id: id.map(str::to_owned),
            check: check.to_owned(),
            ok,
            reason: if ok { None } else { reason },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_without_extensions_has_exactly_the_old_fields() {
        let s = Snapshot {
            id: "9633d114-8270-41eb-bffc-67cc342957d9".into(),
            vm_id: "0004fb0000060000ccaf98a0baa2c186".into(),
            disks: vec![SnapshotDisk {
                parent_path: "/r/VirtualDisks/d.img".into(),
                path: "/r/CoriolisSnapshots/s/d.img".into(),
                snapshot_id: "9633d114-8270-41eb-bffc-67cc342957d9".into(),
                chunks: vec![],
                name: "d.img".into(),
                repo_mountpoint: "/r".into(),
                size: None,
                zeroed: None,
                file_size: 0,
            }],
            created_at_ns: 0,
        };
        let v = serde_json::to_value(&s).unwrap();
        let disk = v["disks"][0].as_object().unwrap();
        let mut keys: Vec<&str> = disk.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "chunks",
                "name",
                "parent_path",
                "path",
                "repo_mountpoint",
                "snapshot_id"
            ]
        );
        assert_eq!(disk["chunks"], serde_json::json!([]));
    }

    #[test]
    fn big_offsets_are_plain_numbers() {
        let c = Chunk {
            start: 1 << 40,
            length: 643_825_664,
            physical_start: 103_910_735_872,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"start":1099511627776,"length":643825664,"physical_start":103910735872}"#
        );
    }

    #[test]
    fn login_request_debug_hides_the_password() {
        let r: LoginRequest =
            serde_json::from_str(r#"{"username":"admin","password":"hunter2"}"#).unwrap();
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
