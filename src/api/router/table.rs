//! The route table: every route's method, path template, access and
//! handler, in one static list.

use http::Method;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No credentials (login, health).
    Public,
    /// `Authorization: Bearer <jwt>`.
    Bearer,
    /// As `[metrics] auth` says.
    Metrics,
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Login,
    Health,
    Metrics,
    ListVms,
    GetVm,
    ListSnapshots,
    CreateSnapshot,
    PurgeSnapshots,
    GetSnapshot,
    DeleteSnapshot,
    Disk,
    /// Extension (`docs/incremental-stream.md`): a disk's changes as one
    /// incremental stream.
    Incremental,
    /// Extension (`docs/checksums.md`): CRC-32 per block of a disk.
    Checksums,
}

/// One route: method, path template (`{name}` segments are ids), access.
#[derive(Debug)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub handler: Handler,
}

const VM: &str = "/api/v1/vms/{vm}";
const SNAPS: &str = "/api/v1/vms/{vm}/snapshots";
const SNAP: &str = "/api/v1/vms/{vm}/snapshots/{snap}";
const DISK: &str = "/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk}";
const INCREMENTAL: &str = "/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk}/incremental";
const CHECKSUMS: &str = "/api/v1/vms/{vm}/snapshots/{snap}/disks/{disk}/checksums";

/// Every route of the service (API.md). `docs/openapi.yaml` lists exactly
/// these; a test keeps the two in step.
pub static ROUTES: &[Route] = &[
    Route {
        method: Method::POST,
        path: "/api/v1/auth/login",
        access: Access::Public,
        handler: Handler::Login,
    },
    Route {
        method: Method::GET,
        path: "/api/v1/health",
        access: Access::Public,
        handler: Handler::Health,
    },
    Route {
        method: Method::GET,
        path: "/metrics",
        access: Access::Metrics,
        handler: Handler::Metrics,
    },
    Route {
        method: Method::GET,
        path: "/api/v1/vms",
        access: Access::Bearer,
        handler: Handler::ListVms,
    },
    Route {
        method: Method::GET,
        path: VM,
        access: Access::Bearer,
        handler: Handler::GetVm,
    },
    Route {
        method: Method::GET,
        path: SNAPS,
        access: Access::Bearer,
        handler: Handler::ListSnapshots,
    },
    Route {
        method: Method::POST,
        path: SNAPS,
        access: Access::Bearer,
        handler: Handler::CreateSnapshot,
    },
    Route {
        method: Method::DELETE,
        path: SNAPS,
        access: Access::Bearer,
        handler: Handler::PurgeSnapshots,
    },
    Route {
        method: Method::GET,
        path: SNAP,
        access: Access::Bearer,
        handler: Handler::GetSnapshot,
    },
    Route {
        method: Method::DELETE,
        path: SNAP,
        access: Access::Bearer,
        handler: Handler::DeleteSnapshot,
    },
    Route {
        method: Method::GET,
        path: DISK,
        access: Access::Bearer,
        handler: Handler::Disk,
    },
    Route {
        method: Method::HEAD,
        path: DISK,
        access: Access::Bearer,
        handler: Handler::Disk,
    },
    Route {
        method: Method::GET,
        path: INCREMENTAL,
        access: Access::Bearer,
        handler: Handler::Incremental,
    },
    Route {
        method: Method::GET,
        path: CHECKSUMS,
        access: Access::Bearer,
        handler: Handler::Checksums,
    },
];
