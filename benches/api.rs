//! API layer benchmarks: the per-request cost of routing, the bearer check
//! and JSON, and the throughput of the simple disk read path (no TLS).
//!
//! `cargo bench --bench api`. The disk path is the baseline the io core's
//! fast path must beat; TLS is measured end to end elsewhere.

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::{BodyExt, Empty};

use coriolis_ovm_exporter::api::auth::{Login, LoginLimiter, Manager, Tokens};
use coriolis_ovm_exporter::api::MetricsAuth;
use coriolis_ovm_exporter::api::{handle, Backend, BackendError, State};
use coriolis_ovm_exporter::wire::{Snapshot, Vm};

const SECRET: &[u8] = b"bench-secret-bench-secret-bench-secret";
/// Size of the disk file streamed by the throughput bench.
const DISK_BYTES: usize = 64 << 20;

struct BenchNode {
    disk: std::path::PathBuf,
}

impl Backend for BenchNode {
    fn list_vms(&self) -> Result<Vec<Vm>, BackendError> {
        Ok(Vec::new())
    }
    fn get_vm(&self, vm: &str) -> Result<Vm, BackendError> {
        Err(BackendError::NotFound(vm.into()))
    }
    fn list_snapshots(&self, vm: &str, _: bool) -> Result<Vec<Snapshot>, BackendError> {
        Err(BackendError::NotFound(vm.into()))
    }
    fn create_snapshot(&self, vm: &str) -> Result<Snapshot, BackendError> {
        Err(BackendError::NotFound(vm.into()))
    }
    fn get_snapshot(
        &self,
        vm: &str,
        _: &str,
        _: &coriolis_ovm_exporter::wire::GetOptions,
        _: &coriolis_ovm_exporter::snapshot::Cancel,
    ) -> Result<Snapshot, BackendError> {
        Err(BackendError::NotFound(vm.into()))
    }
    fn delete_snapshot(&self, _: &str, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    fn purge_snapshots(&self, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    fn open_disk(&self, _: &str, _: &str, _: &str) -> Result<(File, u64), BackendError> {
        let f = File::open(&self.disk).map_err(|e| BackendError::Internal(e.to_string()))?;
        Ok((f, DISK_BYTES as u64))
    }
}

fn bench_api(c: &mut Criterion) {
    let disk = std::env::temp_dir().join(format!("coe-bench-disk-{}", std::process::id()));
    let mut f = File::create(&disk).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
    for _ in 0..DISK_BYTES >> 20 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let tokens = Tokens::new(SECRET, Duration::from_secs(3600));
    let token = tokens.issue("bench").unwrap();
    let login = Arc::new(Login {
        users: Vec::new(),
        endpoint: None,
        manager: Manager::new(None, Duration::from_secs(1)),
        limiter: LoginLimiter::new(5, Duration::from_secs(60)),
    });
    let state = State::from_parts(
        Arc::new(BenchNode { disk: disk.clone() }),
        tokens,
        login,
        MetricsAuth::None,
        coriolis_ovm_exporter::io::IoEngine::start(&Default::default()).unwrap(),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let peer = "127.0.0.1:1".parse().unwrap();
    let request = |path: &str| {
        http::Request::get(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };

    c.bench_function("token_verify", |b| {
        b.iter(|| black_box(state.tokens.verify(black_box(&token)).unwrap()))
    });

    c.bench_function("request_list_vms", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = handle(state.clone(), peer, request("/api/v1/vms"))
                    .await
                    .unwrap();
                // An error answer is no measure of the request path.
                assert_eq!(resp.status(), http::StatusCode::OK);
                black_box(resp.into_body().collect().await.unwrap().to_bytes())
            })
        })
    });

    let mut g = c.benchmark_group("disk_stream");
    g.throughput(Throughput::Bytes(DISK_BYTES as u64));
    g.sample_size(10);
    g.bench_function("whole_64MiB_page_cache", |b| {
        b.iter(|| {
            rt.block_on(async {
                let path = "/api/v1/vms/v/snapshots/s/disks/d.img";
                let resp = handle(state.clone(), peer, request(path)).await.unwrap();
                assert_eq!(resp.status(), http::StatusCode::OK);
                let mut body = resp.into_body();
                let mut n = 0usize;
                while let Some(frame) = body.frame().await {
                    n += frame.unwrap().into_data().map(|d| d.len()).unwrap_or(0);
                }
                assert_eq!(n, DISK_BYTES);
            })
        })
    });
    g.finish();
    let _ = std::fs::remove_file(&disk);
}

criterion_group!(benches, bench_api);
criterion_main!(benches);
