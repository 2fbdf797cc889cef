//! The handlers of the matched, authorized routes: each calls the backend
//! on the blocking pool, or streams disk bytes through the io core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};

use super::login::login;
use super::matcher::{compare_to_param, exact_param, query_param, squash_param, Params};
use super::table::{Handler, Route};
use crate::api::backend::{Backend, BackendError};
use crate::api::body::{json_response, ApiBody};
use crate::api::disk;
use crate::api::error::ApiError;
use crate::api::state::State;
use crate::io::IoEngine;
use crate::snapshot::Cancel;
use crate::wire::GetOptions;

/// Time a snapshot operation into the metrics.
async fn timed<T, F>(state: &State, op: &'static str, f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
    T: Send + 'static,
{
    let start = Instant::now();
    let r = blocking(f).await;
    state.metrics.snapshot_op(op, r.is_ok(), start.elapsed());
    r
}

/// Run a blocking backend call on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::Internal(format!("backend task failed: {e}"))),
    }
}

fn empty_ok() -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::empty());
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, http::HeaderValue::from(0u64));
    r
}

/// Run the handler of a matched, authorized route. The bool says whether the
/// answer is a disk stream.
pub(super) async fn dispatch<B>(
    state: &Arc<State>,
    route: &Route,
    params: Params,
    peer: SocketAddr,
    req: Request<B>,
    user: &mut Option<String>,
) -> Result<(Response<ApiBody>, bool), ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let be = state.backend.clone();
    let query = req.uri().query().map(str::to_owned);
    let q = query.as_deref();
    let p = |i: usize| params.get(i).cloned().unwrap_or_default();
    let ok = |v: Response<ApiBody>| Ok((v, false));
    // Disk reads count against the client's address (an IPv6 client's
    // /64): one address's streams hold at most `io.owner_buffers`.
    let engine = state
        .engine
        .for_owner(crate::api::auth::io_owner(peer.ip()));
    match route.handler {
        Handler::Login => login(state, peer, req, user).await.map(|r| (r, false)),
        Handler::Health => {
            let h = crate::api::health::check(state).await;
            let status = if h.status == "ok" {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            ok(json_response(status, &h))
        }
        Handler::Metrics => {
            // The gauges show the health checks as of now.
            crate::api::health::check(state).await;
            let mut r = Response::new(ApiBody::full(state.metrics.render(
                state.engine.prefetch_stats(),
                crate::snapshot::exact::stats(),
            )));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            ok(r)
        }
        Handler::ListVms => ok(json_response(
            StatusCode::OK,
            &blocking(move || be.list_vms()).await?,
        )),
        Handler::GetVm => {
            let vm = p(0);
            ok(json_response(
                StatusCode::OK,
                &blocking(move || be.get_vm(&vm)).await?,
            ))
        }
        Handler::ListSnapshots => {
            let (vm, squash) = (p(0), squash_param(q));
            let snaps = timed(state, "list", move || be.list_snapshots(&vm, squash)).await?;
            ok(json_response(StatusCode::OK, &snaps))
        }
        Handler::CreateSnapshot => {
            let vm = p(0);
            let key = idempotency_key(req.headers())?;
            let (snap, replayed) = timed(state, "create", move || match key {
                Some(k) => be.create_snapshot_keyed(&vm, &k),
                None => be.create_snapshot(&vm).map(|s| (s, false)),
            })
            .await?;
            tracing::info!(vm = %snap.vm_id, snapshot = %snap.id, replayed, "snapshot created");
            let mut r = json_response(StatusCode::OK, &snap);
            if replayed {
                r.headers_mut()
                    .insert(IDEMPOTENT_REPLAYED, http::HeaderValue::from_static("true"));
            }
            ok(r)
        }
        Handler::PurgeSnapshots => {
            let vm = p(0);
            timed(state, "purge", move || be.purge_snapshots(&vm)).await?;
            state.engine.drop_prefetched(); // as for a delete, below
            ok(empty_ok())
        }
        Handler::GetSnapshot => {
            let (vm, snap, squash) = (p(0), p(1), squash_param(q));
            let compare_to = compare_to_param(q)?;
            let zeroed_separate = match query_param(q, "zeroed").as_deref() {
                None | Some("" | "include") => false,
                Some("separate") => true,
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "zeroed={other:?}: expected \"separate\" or \"include\""
                    )))
                }
            };
            let exact = exact_param(q)?;
            let op = if compare_to.is_some() { "diff" } else { "get" };
            let cancel = CancelOnDrop(Cancel::default());
            let flag = cancel.0.clone();
            let s = timed(state, op, move || {
                let options = GetOptions {
                    squash,
                    compare_to,
                    zeroed_separate,
                    exact,
                    only_disk: None,
                };
                be.get_snapshot(&vm, &snap, &options, &flag)
            })
            .await?;
            drop(cancel);
            ok(json_response(StatusCode::OK, &s))
        }
        Handler::DeleteSnapshot => {
            let (vm, snap) = (p(0), p(1));
            timed(state, "delete", move || be.delete_snapshot(&vm, &snap)).await?;
            // Reads started ahead hold their files open: let go of them so
            // the deleted snapshot's space is freed now, not when they
            // would have expired.
            state.engine.drop_prefetched();
            ok(empty_ok())
        }
        Handler::Disk => {
            let (vm, snap, disk) = (p(0), p(1), p(2));
            let owned = engine.clone();
            // One trip to the blocking pool: the backend's open, then the
            // engine's O_DIRECT open of the same file.
            let file = blocking(move || {
                let (file, size) = be.open_disk(&vm, &snap, &disk)?;
                disk::open(&owned, file, size, &format!("{vm}/{snap}/{disk}"))
            })
            .await?;
            let head = req.method() == Method::HEAD;
            disk::respond(&engine, &file, req.headers().get(header::RANGE), head)
        }
        Handler::Incremental => {
            let (vm, snap, disk) = (p(0), p(1), p(2));
            let compare_to = compare_to_param(q)?;
            let v2 = disk::stream_params(|name| query_param(q, name))?;
            let exact = exact_param(q)?;
            let owned = engine.clone();
            let op = if compare_to.is_some() { "diff" } else { "get" };
            let cancel = CancelOnDrop(Cancel::default());
            let flag = cancel.0.clone();
            let (d, file) = timed(state, op, move || {
                let diff = DiffAsked {
                    compare_to,
                    exact,
                    cancel: flag,
                };
                snapshot_disk(&*be, &owned, &vm, &snap, &disk, diff)
            })
            .await?;
            drop(cancel);
            disk::incremental(&engine, &file, &d, v2)
        }
        Handler::Checksums => {
            let (vm, snap, disk) = (p(0), p(1), p(2));
            let block = disk::checksum_block(query_param(q, "blockSize").as_deref())?;
            let alg = disk::checksum_algorithm(query_param(q, "algorithm").as_deref())?;
            let owned = engine.clone();
            let (d, file) = blocking(move || {
                snapshot_disk(&*be, &owned, &vm, &snap, &disk, DiffAsked::default())
            })
            .await?;
            let data = disk::data_ranges(&d, file.size());
            if let Some(alg) = alg {
                let sums = disk::digests(&engine, &file, &data, block, alg).await?;
                return ok(json_response(StatusCode::OK, &sums));
            }
            ok(disk::checksums(&engine, &file, &data, block)?)
        }
    }
}

/// Sets its flag when dropped: a handler's future dropped because its
/// client went away stops the blocking work it started (a refining diff).
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What a disk's diff is asked with: the base, `exact`, the cancel flag.
#[derive(Default)]
struct DiffAsked {
    compare_to: Option<String>,
    exact: Option<bool>,
    cancel: Cancel,
}

/// One disk of a snapshot (its extent map, or with `compare_to` the diff
/// with zeroed ranges apart) and its file, open in the engine.
fn snapshot_disk(
    be: &dyn Backend,
    engine: &IoEngine,
    vm: &str,
    snap: &str,
    disk: &str,
    diff: DiffAsked,
) -> Result<(crate::wire::SnapshotDisk, crate::io::DiskFile), BackendError> {
    let options = GetOptions {
        squash: true,
        compare_to: diff.compare_to,
        zeroed_separate: true,
        exact: diff.exact,
        only_disk: Some(disk.to_owned()),
    };
    let s = be.get_snapshot(vm, snap, &options, &diff.cancel)?;
    let d = s
        .disks
        .into_iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| BackendError::NotFound(format!("disk {disk} of snapshot {snap}")))?;
    let (file, size) = be.open_disk(vm, snap, disk)?;
    let file = disk::open(engine, file, size, &format!("{vm}/{snap}/{disk}"))?;
    Ok((d, file))
}

/// Header of a create's answer that replays an earlier create with the same
/// `Idempotency-Key`.
const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// `Idempotency-Key` of a create: absent is none; else 1 to 64 visible
/// ASCII characters (a UUID is the usual), anything else 400.
fn idempotency_key(h: &http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = h.get("idempotency-key") else {
        return Ok(None);
    };
    let max = crate::store::MAX_IDEMPOTENCY_KEY;
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= max && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k.to_owned()))
        }
        _ => Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {max} visible ASCII characters"
        ))),
    }
}
