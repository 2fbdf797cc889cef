//! Route-level tests: every route through `handle`, against an in-test
//! backend over real files (the real backend is wired by the glue and
//! tested end to end in `tests/`). They check JSON shapes, status codes,
//! trailing slashes, Go booleans, ids, and ranges over real disk files.
//! Most are tables: a row per request and the answer it must get (status,
//! error body, bytes, and the backend calls that show which handler ran).

use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use super::*;
use crate::api::auth::{Login, LoginLimiter, Manager, Tokens, TOKEN_ISSUER};
use crate::api::backend::{Backend, BackendError};
use crate::api::config::{LocalUser, MetricsAuth};
use crate::api::state::State;
use crate::snapshot::Cancel;
use crate::wire::{ByteRange, Chunk, Disk, GetOptions, Snapshot, SnapshotDisk, Vm};

const VM1: &str = "0004fb0000060000ccaf98a0baa2c186";
const VM2: &str = "0004fb00000600001111111111111111";
const SNAP_OLD: &str = "11111111-8270-41eb-bffc-67cc342957d9";
const SNAP_NEW: &str = "9633d114-8270-41eb-bffc-67cc342957d9";
const SNAP_VM2: &str = "22222222-8270-41eb-bffc-67cc342957d9";
const DISK: &str = "0004fb000012000005bcf25e906ce843.img";
/// Crosses the 1 MiB frame size three times and ends mid-frame.
const DISK_SIZE: usize = 3 * (1 << 20) + 12_345;
const SECRET: &[u8] = b"router-test-secret-of-32-bytes-at-least";
const PEER: &str = "192.0.2.10:40000";

/// What the backend was asked, to check the router passes arguments through.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    List(String, bool),
    Get(String, String, bool, Option<String>, bool),
    Create(String),
    Delete(String, String),
    Purge(String),
    Open(String, String, String),
    ListVms,
    GetVm(String),
}

/// A node of two VMs whose snapshots are real files in a scratch folder.
struct TestNode {
    dir: PathBuf,
    calls: Mutex<Vec<Call>>,
    /// Health checks running now, and the most seen at once.
    health_running: std::sync::atomic::AtomicUsize,
    health_most: std::sync::atomic::AtomicUsize,
}

impl TestNode {
    fn new(tag: &str) -> Arc<Self> {
        let dir = std::env::temp_dir().join(format!("coe-router-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = File::create(dir.join(DISK)).unwrap();
        let bytes: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8).collect();
        f.write_all(&bytes).unwrap();
        Arc::new(TestNode {
            dir,
            calls: Mutex::new(Vec::new()),
            health_running: Default::default(),
            health_most: Default::default(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }

    fn vm(name: &str) -> Vm {
        Vm {
            friendly_name: format!("friendly-{name}"),
            name: name.into(),
            uuid: "0004fb00-0006-0000-ccaf-98a0baa2c186".into(),
            disks: vec![Disk {
                name: DISK.into(),
                path: format!("/OVS/Repositories/r/VirtualDisks/{DISK}"),
                device_name: "xvda".into(),
                snapshot_compatible: true,
                mode: "w".into(),
            }],
            snapshot_compatible: true,
            snapshots: if name == VM1 {
                vec![SNAP_OLD.into(), SNAP_NEW.into()]
            } else {
                vec![SNAP_VM2.into()]
            },
        }
    }

    fn owner(snap: &str) -> Option<&'static str> {
        match snap {
            SNAP_OLD | SNAP_NEW => Some(VM1),
            SNAP_VM2 => Some(VM2),
            _ => None,
        }
    }

    fn snapshot(&self, vm: &str, id: &str, squash: bool) -> Snapshot {
        // Two logically contiguous chunks: squashing merges them.
        let chunks = if squash {
            vec![Chunk {
                start: 0,
                length: 8192,
                physical_start: 1 << 33,
            }]
        } else {
            vec![
                Chunk {
                    start: 0,
                    length: 4096,
                    physical_start: 1 << 33,
                },
                Chunk {
                    start: 4096,
                    length: 4096,
                    physical_start: (1 << 33) + 65536,
                },
            ]
        };
        Snapshot {
            id: id.into(),
            vm_id: vm.into(),
            disks: vec![SnapshotDisk {
                parent_path: format!("/OVS/Repositories/r/VirtualDisks/{DISK}"),
                path: self.dir.join(DISK).to_string_lossy().into_owned(),
                snapshot_id: id.into(),
                chunks,
                name: DISK.into(),
                repo_mountpoint: "/OVS/Repositories/r".into(),
                size: None,
                zeroed: None,
                file_size: 0,
            }],
            created_at_ns: 0,
        }
    }

    fn check(vm: &str, snap: &str) -> Result<(), BackendError> {
        if vm != VM1 && vm != VM2 {
            return Err(BackendError::NotFound(format!("VM {vm} not found")));
        }
        match Self::owner(snap) {
            None => Err(BackendError::NotFound(format!("snapshot {snap} not found"))),
            Some(o) if o != vm => Err(BackendError::Conflict(format!(
                "snapshot {snap} belongs to VM {o}"
            ))),
            Some(_) => Ok(()),
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Backend for TestNode {
    /// Slow enough (50 ms) that checks asked at once would overlap.
    fn health(&self) -> Vec<crate::wire::HealthCheck> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.health_running.fetch_add(1, SeqCst) + 1;
        self.health_most.fetch_max(now, SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        self.health_running.fetch_sub(1, SeqCst);
        Vec::new()
    }

    fn list_vms(&self) -> Result<Vec<Vm>, BackendError> {
        self.record(Call::ListVms);
        Ok(vec![Self::vm(VM1), Self::vm(VM2)])
    }
    fn get_vm(&self, vm: &str) -> Result<Vm, BackendError> {
        self.record(Call::GetVm(vm.into()));
        match vm {
            VM1 | VM2 => Ok(Self::vm(vm)),
            _ => Err(BackendError::NotFound(format!("VM {vm} not found"))),
        }
    }
    fn list_snapshots(&self, vm: &str, squash: bool) -> Result<Vec<Snapshot>, BackendError> {
        self.record(Call::List(vm.into(), squash));
        if vm != VM1 && vm != VM2 {
            return Err(BackendError::NotFound(format!("VM {vm} not found")));
        }
        let v = Self::vm(vm);
        Ok(v.snapshots
            .iter()
            .map(|s| self.snapshot(vm, s, squash))
            .collect())
    }
    fn create_snapshot(&self, vm: &str) -> Result<Snapshot, BackendError> {
        self.record(Call::Create(vm.into()));
        self.get_vm(vm)?;
        Ok(self.snapshot(vm, SNAP_NEW, false))
    }
    fn get_snapshot(
        &self,
        vm: &str,
        snap: &str,
        options: &GetOptions,
        _: &Cancel,
    ) -> Result<Snapshot, BackendError> {
        let (squash, compare_to, zeroed_separate) = (
            options.squash,
            options.compare_to.as_deref(),
            options.zeroed_separate,
        );
        self.record(Call::Get(
            vm.into(),
            snap.into(),
            squash,
            compare_to.map(Into::into),
            zeroed_separate,
        ));
        Self::check(vm, snap)?;
        let mut s = self.snapshot(vm, snap, squash);
        if let Some(older) = compare_to {
            Self::check(vm, older)?;
            if !(older == SNAP_OLD && snap == SNAP_NEW) {
                return Err(BackendError::BadRequest(format!(
                    "{older} is not older than {snap}"
                )));
            }
            let d = &mut s.disks[0];
            d.size = Some(DISK_SIZE as u64);
            d.zeroed = Some(vec![ByteRange {
                start: 1 << 20,
                length: 4096,
            }]);
            if !zeroed_separate {
                d.chunks.push(Chunk {
                    start: 1 << 20,
                    length: 4096,
                    physical_start: 0,
                });
            }
        }
        Ok(s)
    }
    fn delete_snapshot(&self, vm: &str, snap: &str) -> Result<(), BackendError> {
        self.record(Call::Delete(vm.into(), snap.into()));
        match Self::check(vm, snap) {
            Err(BackendError::NotFound(_)) if vm == VM1 || vm == VM2 => Ok(()),
            r => r,
        }
    }
    fn purge_snapshots(&self, vm: &str) -> Result<(), BackendError> {
        self.record(Call::Purge(vm.into()));
        match vm {
            VM1 | VM2 => Ok(()),
            _ => Err(BackendError::NotFound(format!("VM {vm} not found"))),
        }
    }
    fn open_disk(&self, vm: &str, snap: &str, disk: &str) -> Result<(File, u64), BackendError> {
        self.record(Call::Open(vm.into(), snap.into(), disk.into()));
        Self::check(vm, snap)?;
        if disk != DISK {
            return Err(BackendError::NotFound(format!("disk {disk} not found")));
        }
        let f =
            File::open(self.dir.join(DISK)).map_err(|e| BackendError::Internal(e.to_string()))?;
        let size = f
            .metadata()
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .len();
        Ok((f, size))
    }
}

/// A cheap Argon2id hash for tests (the real cost is the operator's choice).
fn hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"router test salt").unwrap();
    a.hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn state(node: Arc<TestNode>, metrics_auth: MetricsAuth) -> Arc<State> {
    let login = Arc::new(Login {
        users: vec![LocalUser {
            username: "admin".into(),
            password_hash: hash("s3cret"),
        }],
        endpoint: None,
        manager: Manager::new(None, Duration::from_secs(1)),
        limiter: LoginLimiter::new(3, Duration::from_secs(60)),
    });
    State::from_parts(
        node,
        Tokens::new(SECRET, Duration::from_secs(3600)),
        login,
        metrics_auth,
        crate::io::IoEngine::start(&crate::io::IoConfig {
            backend: crate::io::BackendChoice::Threads,
            ..crate::io::IoConfig::default()
        })
        .unwrap(),
    )
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn header(&self, name: header::HeaderName) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
    /// An error answer: status, JSON error body with the old short.
    fn assert_error(&self, status: StatusCode, short: &str) {
        assert_eq!(self.status, status, "body: {:?}", self.body);
        assert_eq!(self.header(header::CONTENT_TYPE), "application/json");
        let v = self.json();
        assert_eq!(v["error"], short);
        assert!(v["details"].as_str().is_some_and(|d| !d.is_empty()));
    }
}

/// `GET uri` with bearer `token`.
async fn fetch(st: &Arc<State>, uri: &str, token: &str) -> Answer {
    call(st, Method::GET, uri, Some(token), &[], "").await
}

async fn call(
    st: &Arc<State>,
    method: Method,
    uri: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = handle(st.clone(), PEER.parse().unwrap(), req)
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body streams").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn token(st: &Arc<State>) -> String {
    let a = call(
        st,
        Method::POST,
        "/api/v1/auth/login",
        None,
        &[],
        r#"{"username":"admin","password":"s3cret"}"#,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    a.json()["token"].as_str().unwrap().to_owned()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

/// One row of a table of refused requests: method, path and query, the
/// status and the error short of the JSON error body.
type Refused = (Method, String, StatusCode, &'static str);

/// Sends each row (with `token` when given) and checks the error answer.
async fn expect_refused(st: &Arc<State>, token: Option<&str>, rows: &[Refused]) {
    for (method, uri, status, short) in rows {
        let a = call(st, method.clone(), uri, token, &[], "").await;
        assert_eq!(a.status, *status, "{method} {uri}: {:?}", a.body);
        a.assert_error(*status, short);
    }
}

#[tokio::test]
async fn login_issues_a_token_and_refuses_bad_credentials() {
    let st = state(TestNode::new("login"), MetricsAuth::None);
    let t = token(&st).await;
    let claims = st.tokens.verify(&t).unwrap();
    assert_eq!(claims.user, "admin");
    assert_eq!(claims.iss, TOKEN_ISSUER);

    // In order: the limit is 3 failed checks per address (bodies that are
    // no login at all do not count), so the last row is blocked even with
    // the right password.
    let pass = |p: &str| format!(r#"{{"username":"admin","password":"{p}"}}"#);
    let (unauthorized, bad) = (StatusCode::UNAUTHORIZED, StatusCode::BAD_REQUEST);
    let rows: Vec<(&str, String, StatusCode, &str)> = vec![
        (
            "/api/v1/auth/login/",
            pass("nope"),
            unauthorized,
            "Not Authorized",
        ),
        // No Manager configured and no such local user: rejected, not 502.
        (
            "/api/v1/auth/login",
            r#"{"username":"x","password":"y"}"#.into(),
            unauthorized,
            "Not Authorized",
        ),
        ("/api/v1/auth/login", "".into(), bad, "Bad Request"),
        ("/api/v1/auth/login", "{".into(), bad, "Bad Request"),
        ("/api/v1/auth/login", "[]".into(), bad, "Bad Request"),
        (
            "/api/v1/auth/login",
            r#"["admin","s3cret"]"#.into(),
            bad,
            "Bad Request",
        ),
        (
            "/api/v1/auth/login",
            r#"{"username":"admin"}"#.into(),
            bad,
            "Bad Request",
        ),
        (
            "/api/v1/auth/login",
            r#"{"username":1,"password":"s3cret"}"#.into(),
            bad,
            "Bad Request",
        ),
        (
            "/api/v1/auth/login",
            "x".repeat(MAX_LOGIN_BODY + 1),
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload Too Large",
        ),
        (
            "/api/v1/auth/login",
            pass("no"),
            unauthorized,
            "Not Authorized",
        ),
        (
            "/api/v1/auth/login",
            pass("s3cret"),
            StatusCode::TOO_MANY_REQUESTS,
            "Too Many Requests",
        ),
    ];
    let mut blocked = None;
    for (uri, body, status, short) in rows {
        let a = call(&st, Method::POST, uri, None, &[], &body).await;
        assert_eq!(a.status, status, "{uri} {body:.40}: {:?}", a.body);
        a.assert_error(status, short);
        blocked = Some(a);
    }
    let blocked = blocked.unwrap();
    assert!(blocked.header(header::RETRY_AFTER).parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn bearer_is_required_on_every_private_route() {
    let node = TestNode::new("bearer");
    let st = state(node.clone(), MetricsAuth::Jwt);
    let other = Tokens::new(
        b"another-secret-another-secret-32b!",
        Duration::from_secs(60),
    )
    .issue("admin")
    .unwrap();
    for r in ROUTES.iter().filter(|r| r.access != Access::Public) {
        let uri = route_uri(r);
        let a = call(&st, r.method.clone(), &uri, None, &[], "").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{} {uri}", r.method);
        assert_eq!(a.header(header::WWW_AUTHENTICATE), "Bearer");
        let a = call(&st, r.method.clone(), &uri, Some(&other), &[], "").await;
        assert_eq!(
            a.status,
            StatusCode::UNAUTHORIZED,
            "{} {uri} wrong secret",
            r.method
        );
    }
    assert!(
        node.calls().is_empty(),
        "the backend was reached without auth: {:?}",
        node.calls()
    );
}

/// A route's path with the ids these tests use.
fn route_uri(r: &Route) -> String {
    r.path
        .replace("{vm}", VM1)
        .replace("{snap}", SNAP_NEW)
        .replace("{disk}", DISK)
}

/// What each handler asks the backend for, given the ids of [`route_uri`]:
/// a request served by another handler asks for something else.
fn backend_calls(h: Handler) -> Vec<Call> {
    let get = |squash, separate| Call::Get(VM1.into(), SNAP_NEW.into(), squash, None, separate);
    let open = Call::Open(VM1.into(), SNAP_NEW.into(), DISK.into());
    match h {
        Handler::Login | Handler::Health | Handler::Metrics => vec![],
        Handler::ListVms => vec![Call::ListVms],
        Handler::GetVm => vec![Call::GetVm(VM1.into())],
        Handler::ListSnapshots => vec![Call::List(VM1.into(), true)],
        Handler::CreateSnapshot => vec![Call::Create(VM1.into()), Call::GetVm(VM1.into())],
        Handler::PurgeSnapshots => vec![Call::Purge(VM1.into())],
        Handler::GetSnapshot => vec![get(true, false)],
        Handler::DeleteSnapshot => vec![Call::Delete(VM1.into(), SNAP_NEW.into())],
        Handler::Disk => vec![open],
        Handler::Incremental | Handler::Checksums => vec![get(true, true), open],
    }
}

/// The part of an answer that says which handler made it: the body, except
/// for what legitimately changes between two calls (a fresh token, the
/// request counters).
fn answer_shape(h: Handler, a: &Answer) -> Vec<u8> {
    match h {
        Handler::Login => serde_json::to_vec(&keys(&a.json())).unwrap(),
        Handler::Metrics => String::from_utf8(a.body.to_vec())
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("# TYPE"))
            .collect::<Vec<_>>()
            .join("\n")
            .into_bytes(),
        _ => a.body.to_vec(),
    }
}

/// Every route, with and without a trailing slash: the same handler (the
/// same backend calls, the table above), the same status, headers and body.
#[tokio::test]
async fn every_route_answers_with_and_without_trailing_slash() {
    let node = TestNode::new("slash");
    let st = state(node.clone(), MetricsAuth::None);
    let t = token(&st).await;
    let login = r#"{"username":"admin","password":"s3cret"}"#;
    for r in ROUTES {
        let uri = route_uri(r);
        let body = if r.handler == Handler::Login {
            login
        } else {
            ""
        };
        let mut answers = Vec::new();
        for u in [uri.clone(), format!("{uri}/")] {
            node.calls.lock().unwrap().clear();
            let a = call(&st, r.method.clone(), &u, Some(&t), &[], body).await;
            assert!(a.status.is_success(), "{} {u}: {}", r.method, a.status);
            assert_eq!(
                node.calls(),
                backend_calls(r.handler),
                "{} {u}: not the {:?} handler",
                r.method,
                r.handler
            );
            answers.push(a);
        }
        let (plain, slash) = (&answers[0], &answers[1]);
        assert_eq!(plain.status, slash.status, "{} {uri}/", r.method);
        for h in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
            assert_eq!(
                plain.header(h.clone()),
                slash.header(h),
                "{} {uri}/",
                r.method
            );
        }
        assert!(
            answer_shape(r.handler, plain) == answer_shape(r.handler, slash),
            "{} {uri}/: another body",
            r.method
        );
        let shape = answer_shape(r.handler, plain);
        assert!(
            !shape.is_empty()
                || r.method == Method::HEAD
                || r.handler == Handler::DeleteSnapshot
                || r.handler == Handler::PurgeSnapshots,
            "{} {uri}: empty body",
            r.method
        );
    }
}

#[tokio::test]
async fn vm_json_has_the_old_shape() {
    let st = state(TestNode::new("vmjson"), MetricsAuth::None);
    let t = token(&st).await;
    let a = fetch(&st, "/api/v1/vms", &t).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header(header::CONTENT_TYPE), "application/json");
    let v = a.json();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(
        keys(&v[0]),
        [
            "disks",
            "friendly_name",
            "name",
            "snapshot_compatible",
            "snapshots",
            "uuid"
        ]
    );
    assert_eq!(
        keys(&v[0]["disks"][0]),
        ["device_name", "mode", "name", "path", "snapshot_compatible"]
    );
    assert_eq!(v[0]["snapshots"], serde_json::json!([SNAP_OLD, SNAP_NEW]));

    let one = fetch(&st, &format!("/api/v1/vms/{VM1}"), &t).await.json();
    assert_eq!(one["name"], VM1);
    fetch(&st, "/api/v1/vms/0004fb00000600000000000000000000", &t)
        .await
        .assert_error(StatusCode::NOT_FOUND, "Not Found");
}

#[tokio::test]
async fn snapshot_routes_pass_squash_compare_and_zeroed() {
    let node = TestNode::new("snaps");
    let st = state(node.clone(), MetricsAuth::None);
    let t = token(&st).await;
    let base = format!("/api/v1/vms/{VM1}/snapshots/{SNAP_NEW}");
    // (query, squash expected): Go's ParseBool, absent/empty true, junk false.
    let cases = [
        ("", true),
        ("?squashChunks", true),
        ("?squashChunks=", true),
        ("?squashChunks=True", true),
        ("?squashChunks=1", true),
        ("?squashChunks=t", true),
        ("?squashChunks=TRUE", true),
        ("?squashChunks=False", false),
        ("?squashChunks=0", false),
        ("?squashChunks=f", false),
        ("?squashChunks=yes", false),
        ("?squashChunks=tRuE", false),
    ];
    for (q, squash) in cases {
        let a = fetch(&st, &format!("{base}{q}"), &t).await;
        assert_eq!(a.status, StatusCode::OK, "{q}");
        let v = a.json();
        assert_eq!(
            v["disks"][0]["chunks"].as_array().unwrap().len(),
            if squash { 1 } else { 2 },
            "{q}"
        );
        assert_eq!(
            node.calls().last().unwrap(),
            &Call::Get(VM1.into(), SNAP_NEW.into(), squash, None, false),
            "{q}"
        );
        // Without compareTo the extension fields stay out.
        assert_eq!(
            keys(&v["disks"][0]),
            [
                "chunks",
                "name",
                "parent_path",
                "path",
                "repo_mountpoint",
                "snapshot_id"
            ]
        );
        assert_eq!(
            keys(&v["disks"][0]["chunks"][0]),
            ["length", "physical_start", "start"]
        );
    }

    let diff = fetch(
        &st,
        &format!("{base}?compareTo={SNAP_OLD}&squashChunks=false"),
        &t,
    )
    .await;
    assert_eq!(diff.status, StatusCode::OK);
    let d = diff.json();
    assert_eq!(d["disks"][0]["size"], DISK_SIZE as u64);
    assert_eq!(
        d["disks"][0]["zeroed"],
        serde_json::json!([{"start": 1048576, "length": 4096}])
    );
    assert_eq!(d["disks"][0]["chunks"].as_array().unwrap().len(), 3);
    assert_eq!(
        node.calls().last().unwrap(),
        &Call::Get(
            VM1.into(),
            SNAP_NEW.into(),
            false,
            Some(SNAP_OLD.into()),
            false
        )
    );
    let sep = fetch(
        &st,
        &format!("{base}?compareTo={SNAP_OLD}&zeroed=separate"),
        &t,
    )
    .await
    .json();
    assert_eq!(sep["disks"][0]["chunks"].as_array().unwrap().len(), 1);
    assert_eq!(
        node.calls().last().unwrap(),
        &Call::Get(
            VM1.into(),
            SNAP_NEW.into(),
            true,
            Some(SNAP_OLD.into()),
            true
        )
    );

    let get = Method::GET;
    let rows: Vec<Refused> = vec![
        (
            get.clone(),
            format!("{base}?compareTo=33333333-8270-41eb-bffc-67cc342957d9"),
            StatusCode::NOT_FOUND,
            "Not Found",
        ),
        (
            get.clone(),
            format!("{base}?compareTo={SNAP_VM2}"),
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            get.clone(),
            format!("/api/v1/vms/{VM1}/snapshots/{SNAP_OLD}?compareTo={SNAP_NEW}"),
            StatusCode::BAD_REQUEST,
            "Bad Request",
        ),
        (
            get.clone(),
            format!("{base}?compareTo=..%2F..%2Fetc"),
            StatusCode::BAD_REQUEST,
            "Bad Request",
        ),
        (
            get.clone(),
            format!("{base}?zeroed=maybe"),
            StatusCode::BAD_REQUEST,
            "Bad Request",
        ),
        (
            get.clone(),
            format!("{base}?compareTo={SNAP_OLD}&exact=maybe"),
            StatusCode::BAD_REQUEST,
            "Bad Request",
        ),
        (
            get,
            format!("{base}/disks/{DISK}/incremental?compareTo={SNAP_OLD}&exact=2"),
            StatusCode::BAD_REQUEST,
            "Bad Request",
        ),
        (
            Method::DELETE,
            format!("/api/v1/vms/{VM1}/snapshots/{SNAP_VM2}"),
            StatusCode::CONFLICT,
            "Conflict",
        ),
    ];
    expect_refused(&st, Some(&t), &rows).await;

    // List (squashed by default), create, delete (idempotent), purge.
    let list = fetch(&st, &format!("/api/v1/vms/{VM1}/snapshots"), &t)
        .await
        .json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["id"], SNAP_OLD);
    assert_eq!(node.calls().last().unwrap(), &Call::List(VM1.into(), true));
    let created = call(
        &st,
        Method::POST,
        &format!("/api/v1/vms/{VM1}/snapshots"),
        Some(&t),
        &[],
        "",
    )
    .await;
    assert_eq!(created.status, StatusCode::OK);
    assert_eq!(created.json()["vm_id"], VM1);
    let del = call(
        &st,
        Method::DELETE,
        &format!("/api/v1/vms/{VM1}/snapshots/44444444-8270-41eb-bffc-67cc342957d9"),
        Some(&t),
        &[],
        "",
    )
    .await;
    assert_eq!(del.status, StatusCode::OK);
    assert!(del.body.is_empty());
    let purge = call(
        &st,
        Method::DELETE,
        &format!("/api/v1/vms/{VM1}/snapshots/"),
        Some(&t),
        &[],
        "",
    )
    .await;
    assert_eq!(purge.status, StatusCode::OK);
    assert_eq!(node.calls().last().unwrap(), &Call::Purge(VM1.into()));
}

#[tokio::test]
async fn disk_bytes_whole_ranges_and_head() {
    let st = state(TestNode::new("disk"), MetricsAuth::None);
    let t = token(&st).await;
    let uri = format!("/api/v1/vms/{VM1}/snapshots/{SNAP_NEW}/disks/{DISK}");
    let expect =
        |start: usize, end: usize| -> Vec<u8> { (start..end).map(|i| (i % 251) as u8).collect() };

    // (Range header, status, the bytes it must return): the whole disk, the
    // Python client's range per chunk across frame boundaries, a suffix, an
    // open end.
    let (a, b) = ((1 << 20) - 7, 2 * (1 << 20) + 9);
    let rows: Vec<(Option<String>, StatusCode, usize, usize)> = vec![
        (None, StatusCode::OK, 0, DISK_SIZE),
        (
            Some(format!("bytes={a}-{b}")),
            StatusCode::PARTIAL_CONTENT,
            a,
            b + 1,
        ),
        (
            Some("bytes=-100".into()),
            StatusCode::PARTIAL_CONTENT,
            DISK_SIZE - 100,
            DISK_SIZE,
        ),
        (
            Some(format!("bytes={}-", DISK_SIZE - 3)),
            StatusCode::PARTIAL_CONTENT,
            DISK_SIZE - 3,
            DISK_SIZE,
        ),
    ];
    for (range, status, start, end) in rows {
        let headers: Vec<(&str, &str)> = range.iter().map(|r| ("range", r.as_str())).collect();
        let r = call(&st, Method::GET, &uri, Some(&t), &headers, "").await;
        assert_eq!(r.status, status, "{range:?}");
        assert_eq!(r.header(header::CONTENT_LENGTH), (end - start).to_string());
        assert_eq!(r.header(header::ACCEPT_RANGES), "bytes", "{range:?}");
        if status == StatusCode::PARTIAL_CONTENT {
            assert_eq!(
                r.header(header::CONTENT_RANGE),
                format!("bytes {start}-{}/{DISK_SIZE}", end - 1)
            );
        }
        assert!(
            r.body.as_ref() == expect(start, end).as_slice(),
            "{range:?}: other bytes"
        );
    }

    for bad in [
        format!("bytes={DISK_SIZE}-"),
        "bytes=5-1".into(),
        "lines=0-1".into(),
    ] {
        let a = call(&st, Method::GET, &uri, Some(&t), &[("range", &bad)], "").await;
        a.assert_error(StatusCode::RANGE_NOT_SATISFIABLE, "Range Not Satisfiable");
        assert_eq!(
            a.header(header::CONTENT_RANGE),
            format!("bytes */{DISK_SIZE}")
        );
    }

    let head = call(&st, Method::HEAD, &uri, Some(&t), &[], "").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header(header::CONTENT_LENGTH), DISK_SIZE.to_string());
    assert_eq!(head.header(header::ACCEPT_RANGES), "bytes");
    assert!(head.body.is_empty());

    fetch(
        &st,
        &format!("/api/v1/vms/{VM1}/snapshots/{SNAP_NEW}/disks/other.img"),
        &t,
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "Not Found");
}

#[tokio::test]
async fn unknown_routes_bad_methods_and_bad_ids() {
    let node = TestNode::new("ids");
    let st = state(node.clone(), MetricsAuth::None);
    let t = token(&st).await;
    // No route: 404 with or without a token. A route with another method:
    // 405 and the methods it has.
    let mut rows: Vec<Refused> = Vec::new();
    for uri in [
        "/",
        "/api/v1",
        "/api/v1/nothing",
        "/api/v2/vms",
        "/api/v1/vms//snapshots",
        "/api/v1/vms/x/y/z/w/v/u/t",
    ] {
        rows.push((Method::GET, uri.into(), StatusCode::NOT_FOUND, "Not Found"));
    }
    expect_refused(&st, Some(&t), &rows).await;
    expect_refused(&st, None, &rows).await;
    for (method, uri, allow) in [
        (Method::PUT, "/api/v1/vms", "GET"),
        (Method::DELETE, "/api/v1/health", "GET"),
        (Method::GET, "/api/v1/auth/login", "POST"),
        (Method::PUT, "/api/v1/vms/x/snapshots", "GET, POST, DELETE"),
    ] {
        let m = call(&st, method.clone(), uri, Some(&t), &[], "").await;
        m.assert_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
        assert_eq!(m.header(header::ALLOW), allow, "{method} {uri}");
    }
    node.calls.lock().unwrap().clear();
    let long = "a".repeat(MAX_ID_LEN + 1);
    let mut rows: Vec<Refused> = Vec::new();
    for id in [
        "..%2F..%2Fetc%2Fpasswd",
        "..",
        ".hidden",
        "%2e%2e",
        "a%00b",
        "a%zz",
        "a%20b",
        long.as_str(),
    ] {
        for uri in [
            format!("/api/v1/vms/{id}"),
            format!("/api/v1/vms/{VM1}/snapshots/{SNAP_NEW}/disks/{id}"),
        ] {
            rows.push((Method::GET, uri, StatusCode::BAD_REQUEST, "Bad Request"));
        }
    }
    expect_refused(&st, Some(&t), &rows).await;
    assert!(
        node.calls().is_empty(),
        "a bad id reached the backend: {:?}",
        node.calls()
    );
    // The longest allowed id does reach it.
    let ok_len = "a".repeat(MAX_ID_LEN);
    fetch(&st, &format!("/api/v1/vms/{ok_len}"), &t)
        .await
        .assert_error(StatusCode::NOT_FOUND, "Not Found");
}

/// A flood of `/health` (public) runs one check at a time: 32 requests at
/// once all answer, and the backend never saw two checks overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_health_requests_runs_one_check_at_a_time() {
    let node = TestNode::new("health-flood");
    let st = state(node.clone(), MetricsAuth::Token("m".repeat(32)));
    let asks: Vec<_> = (0..32)
        .map(|_| {
            let st = st.clone();
            tokio::spawn(async move {
                call(&st, Method::GET, "/api/v1/health", None, &[], "")
                    .await
                    .status
            })
        })
        .collect();
    for a in asks {
        assert_eq!(a.await.unwrap(), StatusCode::OK);
    }
    let most = node.health_most.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(most, 1, "health checks ran {most} at once");
}

#[tokio::test]
async fn health_and_metrics() {
    let st = state(TestNode::new("metrics"), MetricsAuth::Token("m".repeat(32)));
    let h = call(&st, Method::GET, "/api/v1/health", None, &[], "").await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.json()["status"], "ok");
    call(&st, Method::GET, "/metrics", None, &[], "")
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "Not Authorized");
    let good = format!("Bearer {}", "m".repeat(32));
    let m = call(
        &st,
        Method::GET,
        "/metrics",
        None,
        &[("authorization", &good)],
        "",
    )
    .await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(m
        .header(header::CONTENT_TYPE)
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(
        text.contains(
            "coe_http_requests_total{route=\"/api/v1/health\",method=\"GET\",status=\"200\"} 1"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "coe_http_requests_total{route=\"/metrics\",method=\"GET\",status=\"401\"} 1"
        ),
        "{text}"
    );
}

/// The OpenAPI file lists exactly the routes of [`ROUTES`] (trailing-slash
/// variants are implied), so the document cannot drift from the code.
#[test]
fn openapi_lists_exactly_the_routes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
    let mut in_paths = false;
    let mut current = None;
    let mut documented = std::collections::BTreeSet::new();
    for line in text.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_paths = line.trim_end() == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  ").filter(|l| l.starts_with('/')) {
            current = Some(p.trim_end().trim_end_matches(':').to_owned());
        } else if let Some(m) = line.strip_prefix("    ").filter(|l| !l.starts_with(' ')) {
            let m = m.trim_end().trim_end_matches(':');
            if ["get", "head", "post", "put", "delete", "patch", "options"].contains(&m) {
                documented.insert((
                    m.to_uppercase(),
                    current.clone().expect("method before path"),
                ));
            }
        }
    }
    let routed: std::collections::BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    assert_eq!(documented, routed, "docs/openapi.yaml and ROUTES differ");
}
