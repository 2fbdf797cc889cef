//! The server: listener, TLS, HTTP/1.1 and HTTP/2 connections, limits,
//! signals, graceful shutdown, readiness, logging.
//!
//! It owns sockets and the runtime, and nothing about what a request means
//! (that is `api`). The protocol is chosen by ALPN right after the TLS
//! handshake: `h2` gets hyper's HTTP/2 server, anything else HTTP/1.1, so a
//! connection never waits in a protocol-sniffing phase that no header
//! timeout covers.
//! An HTTP/2 connection writes through [`coalesce`], which gathers its
//! 16 KiB frames into full TLS records and 64 KiB writes. Limits in force on every connection:
//!
//! - the connection budget ([`budget`]): `max_connections` in all,
//!   `max_connections_per_address`, and a reserved share for addresses that
//!   are not flooding, checked at accept before any TLS work;
//! - TLS handshake timeout, header read timeout (with a `Timer`, without
//!   which hyper ignores it), header count and size;
//! - the request body read timeout (`api.body_read_timeout`, applied by the
//!   handlers that read a body: the login);
//! - the watchdog ([`watch`]): a connection whose writes wait on the
//!   client for `send_timeout` is cut, an HTTP/2 stream whose client keeps
//!   its window shut for `send_timeout` reset alone (the connection's other
//!   streams go on), an HTTP/2 connection with no request for
//!   `http2_idle_timeout` closed;
//! - HTTP/2: concurrent streams, and the reset-flood limits of the
//!   CVE-2023-44487 class (streams the client opens and resets at once, and
//!   streams the server has to reset for the client's errors) set
//!   explicitly rather than left to hyper's and h2's defaults.

pub mod budget;
pub mod coalesce;
pub mod config;
pub mod logging;
pub mod notify;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::api::{self, Backend, Login, Tokens};
use crate::tls;

pub use config::{Config, ConfigError, ListenerConfig};

/// HTTP/2 ping interval, to find dead peers on long idle connections.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// HTTP/2: streams a client may open and reset before the server has
/// accepted them (the "rapid reset" of CVE-2023-44487); past it the
/// connection gets a GOAWAY. h2's default, stated.
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2: streams the server may reset because of the client's errors
/// before it sends a GOAWAY (RUSTSEC-2024-0003). Lower than hyper's 1024:
/// no honest client of this API causes more than a handful.
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 64;
/// HTTP/2: bytes hyper buffers per stream for sending, at least. A disk
/// body's frames are the io core's own buffers (no copy), already bounded by
/// `io.read_ahead`: the limit is raised to that read-ahead
/// ([`Limits::h2_send_buf`]) so a stream's task can hand h2 every frame the
/// io core has ready, instead of waiting for h2 to write out one before it
/// may queue the next (a wake-up of the stream task per frame, and on busy
/// cores a connection left idle until that task runs).
const H2_MIN_SEND_BUF_SIZE: usize = 1 << 20;
/// How often a connection's watchdog looks at it, at most; shorter
/// timeouts are looked at in a quarter of their length.
const WATCHDOG_TICK: Duration = Duration::from_secs(1);
/// Refusals by the connection budget are logged at most once per this
/// period (a flood would otherwise write a log line per connection).
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE and the like) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How often the memory trimmer looks at the connections.
const TRIM_TICK: Duration = Duration::from_secs(1);
/// Connections that must have closed since the last peak before the
/// allocator is trimmed ([`crate::sys::memory::trim`]).
const TRIM_AFTER_CLOSED: i64 = 64;
/// How long the runtime keeps an idle blocking-pool thread (tokio's
/// default, stated: [`IDLE_TRIM_AFTER`] is counted from it).
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// No new connection and no disk stream for this long, after some
/// activity, and the allocator is trimmed once more: past the blocking
/// pool's keep-alive, so the threads the last requests used have exited
/// and their caches are back in the arenas ([`trim_memory`]).
const IDLE_TRIM_AFTER: Duration = Duration::from_secs(12);
/// Time the runtime gives blocking tasks (disk readers) at exit; they stop
/// on their own once their answer is dropped.
const RUNTIME_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the io engine ([io]): {0}")]
    Io(#[source] crate::io::IoError),
}

/// Serve the API until `shutdown` resolves, then drain: stop accepting, let
/// in-flight requests finish for `api.shutdown_grace`, and cut the rest.
/// `on_ready` is called with the bound address once the listener is up.
pub async fn serve(
    config: Arc<Config>,
    backend: Arc<dyn Backend>,
    shutdown: impl Future<Output = ()> + Send,
    on_ready: impl FnOnce(SocketAddr) + Send,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(tls::server_config(&config.api.tls)?);
    // One engine for the process: its buffer pool bounds all disk reads.
    let engine = crate::io::IoEngine::start(&config.io).map_err(ServerError::Io)?;
    tracing::info!(
        backend = %engine.backend(),
        direct_io = config.io.direct_io,
        buffer_size = config.io.buffer_size,
        read_ahead = config.io.read_ahead,
        "io engine started"
    );
    let login = Login::from_config(&config.auth, &config.manager, config.ovm_endpoint.clone())?;
    let tokens = Tokens::new(&config.jwt.secret, config.jwt.time_to_live);
    let mut state = api::State::from_parts(backend, tokens, login, config.metrics.clone(), engine);
    if let Some(s) = Arc::get_mut(&mut state) {
        s.body_read_timeout = config.api.body_read_timeout;
    }
    let addr = SocketAddr::new(config.api.bind, config.api.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    tracing::info!(address = %local, "listening (HTTPS, HTTP/1.1 and HTTP/2)");
    on_ready(local);

    let limits = Arc::new(Limits::from(&*config));
    let budget = budget::Budget::new(budget::Limits {
        max: config.api.max_connections,
        per_address: config.api.max_connections_per_address,
        reserved: config.api.reserved_connections,
    });
    tokio::spawn(trim_memory(state.clone()));
    let mut last_refusal_log: Option<std::time::Instant> = None;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let ticket = match budget.admit(peer.ip()) {
            Ok(t) => t,
            Err(refusal) => {
                state.metrics.connection_refused(refusal.label());
                if last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_PERIOD) {
                    last_refusal_log = Some(std::time::Instant::now());
                    let (total, mine) = budget.held_by(peer.ip());
                    tracing::warn!(
                        %peer,
                        reason = refusal.label(),
                        open = total,
                        open_from_address = mine,
                        "connection refused by the connection budget (logged once per {}s; \
                         coe_connections_refused_total counts them all)",
                        REFUSAL_LOG_PERIOD.as_secs()
                    );
                }
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let lowat = config.api.tcp_notsent_lowat;
        if lowat > 0 {
            if let Err(e) = crate::sys::socket::set_notsent_lowat(&tcp, lowat) {
                tracing::debug!(%peer, error = %e, "cannot set TCP_NOTSENT_LOWAT");
            }
        }
        let watcher = graceful.watcher();
        let (acceptor, state, limits) = (acceptor.clone(), state.clone(), limits.clone());
        tokio::spawn(async move {
            let _ticket = ticket;
            state.metrics.connection_opened();
            let _open = OpenGuard(state.clone());
            let tls = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let activity = watch::Activity::new();
            let svc_state = state.clone();
            let svc_activity = activity.clone();
            let svc = service_fn(move |req| {
                let guard = svc_activity.request();
                let state = svc_state.clone();
                async move {
                    let mut resp = api::handle(state, peer, req).await?;
                    guard.body_starts();
                    resp.body_mut().attach(guard);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let idle = h2.then_some(limits.h2_idle);
            // Streams the watchdog reset alone (HTTP/2 only: an HTTP/1.1
            // connection has none, it is cut whole).
            let on_reset = |n: usize| {
                for _ in 0..n {
                    state.metrics.stream_reset();
                }
                tracing::warn!(
                    %peer,
                    streams = n,
                    timeout_secs = limits.send.as_secs_f64(),
                    "HTTP/2 stream reset: the client took nothing of it for \
                     api.send_timeout (the connection goes on)"
                );
            };
            // The connection of either protocol (one box per connection, so
            // that both run under the one watchdog call below).
            let conn: Pin<Box<dyn Future<Output = Result<(), hyper::Error>> + Send>> = if h2 {
                // Frames gathered into full TLS records ([`coalesce`]).
                let io = TokioIo::new(watch::Watched::new(
                    coalesce::Coalesce::new(tls),
                    activity.clone(),
                ));
                let mut b = hyper::server::conn::http2::Builder::new(watch::StreamExec);
                b.timer(TokioTimer::new())
                    .max_header_list_size(limits.header_bytes)
                    .max_concurrent_streams(limits.h2_streams)
                    .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
                    .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
                    .max_send_buf_size(limits.h2_send_buf)
                    .keep_alive_interval(H2_KEEPALIVE_INTERVAL);
                Box::pin(watcher.watch(b.serve_connection(io, svc)))
            } else {
                let io = TokioIo::new(watch::Watched::new(tls, activity.clone()));
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read)
                    .max_headers(limits.headers)
                    .max_header_size(limits.header_bytes as usize);
                Box::pin(watcher.watch(b.serve_connection(io, svc)))
            };
            let result = watched(conn, &activity, &limits, idle, on_reset).await;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
                Err(cut) => {
                    let reason = match cut {
                        watch::Cut::SendTimeout => "send_timeout",
                        watch::Cut::Idle => "idle",
                    };
                    state.metrics.connection_cut(reason);
                    match cut {
                        watch::Cut::SendTimeout => tracing::warn!(
                            %peer,
                            timeout_secs = limits.send.as_secs_f64(),
                            "connection cut: the client read nothing for api.send_timeout"
                        ),
                        watch::Cut::Idle => {
                            tracing::debug!(%peer, "idle HTTP/2 connection closed")
                        }
                    }
                }
            }
        });
    }

    drop(listener);
    if let Err(e) = notify::notify("STOPPING=1") {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
    let grace = config.api.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: draining connections"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: cutting the remaining connections");
    }
    Ok(())
}

/// Hands the allocator's free memory back to the kernel (`sys::memory`:
/// glibc keeps it resident otherwise) at two moments. After a burst: at
/// least [`TRIM_AFTER_CLOSED`] connections closed since the highest count
/// seen and the count is below half of it, so the memory of their TLS and
/// HTTP state goes back while the service is still busy. When idle: no
/// new connection and no disk stream for [`IDLE_TRIM_AFTER`] after any
/// activity since the last idle trim. The burst trim alone came too
/// early: what is freed after it (connections that close later, the
/// per-thread caches of blocking-pool threads that exit 10 s after their
/// last task) stayed resident, and the soak's idle RSS grew with the
/// length of the storm (issue 11: RssAnon 9.4 -> 12.2 MiB after 9 minutes
/// of storm). A long-lived connection (a metrics scraper's keep-alive)
/// does not hold the idle trim off; a new connection every few seconds
/// does, and then the burst trim is what runs. Ends with the runtime.
async fn trim_memory(state: Arc<api::State>) {
    let mut tick = tokio::time::interval(TRIM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut peak = 0i64;
    let mut accepted = state.metrics.connections_accepted();
    let mut quiet_since = tokio::time::Instant::now();
    // Activity since the last idle trim: nothing to give back at start.
    let mut active = false;
    loop {
        tick.tick().await;
        let open = state.metrics.connections_open();
        let now_accepted = state.metrics.connections_accepted();
        if now_accepted != accepted || state.metrics.streams_in_flight() > 0 {
            accepted = now_accepted;
            quiet_since = tokio::time::Instant::now();
            active = true;
        }
        peak = peak.max(open);
        let reason = if peak - open >= TRIM_AFTER_CLOSED && open * 2 <= peak {
            peak = open;
            "burst"
        } else if active && quiet_since.elapsed() >= IDLE_TRIM_AFTER {
            active = false;
            "idle"
        } else {
            continue;
        };
        let released = tokio::task::spawn_blocking(crate::sys::memory::trim)
            .await
            .unwrap_or(false);
        state.metrics.allocator_trimmed(reason);
        tracing::debug!(open, released, reason, "allocator trimmed");
    }
}

/// Run a connection beside its watchdog: `Err` when the watchdog cut it
/// (the connection future, and with it every response body, is dropped).
/// `on_reset` is told of HTTP/2 streams the watchdog reset.
async fn watched<F: Future>(
    conn: F,
    activity: &watch::Activity,
    limits: &Limits,
    idle: Option<Duration>,
    on_reset: impl Fn(usize),
) -> Result<F::Output, watch::Cut> {
    let shortest = idle.map_or(limits.send, |i| i.min(limits.send));
    let mut tick =
        tokio::time::interval((shortest / 4).clamp(Duration::from_millis(10), WATCHDOG_TICK));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            out = &mut conn => return Ok(out),
            _ = tick.tick() => {
                let v = activity.verdict(limits.send, idle);
                if v.streams_reset > 0 {
                    on_reset(v.streams_reset);
                }
                if let Some(cut) = v.cut {
                    return Err(cut);
                }
            }
        }
    }
}

/// Per-connection limits, copied out of the config once.
struct Limits {
    handshake: Duration,
    header_read: Duration,
    headers: usize,
    header_bytes: u32,
    send: Duration,
    h2_idle: Duration,
    h2_streams: u32,
    /// Bytes h2 may buffer per stream for sending (see
    /// [`H2_MIN_SEND_BUF_SIZE`]).
    h2_send_buf: usize,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Limits {
            handshake: c.api.tls_handshake_timeout,
            header_read: c.api.header_read_timeout,
            headers: c.api.max_headers,
            header_bytes: u32::try_from(c.api.max_header_bytes).unwrap_or(u32::MAX),
            send: c.api.send_timeout,
            h2_idle: c.api.http2_idle_timeout,
            h2_streams: c.api.http2_max_concurrent_streams,
            h2_send_buf: (c.io.read_ahead * c.io.buffer_size).max(H2_MIN_SEND_BUF_SIZE),
        }
    }
}

/// Counts a connection as closed whichever way its task ends.
struct OpenGuard(Arc<api::State>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.metrics.connection_closed();
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub fn shutdown_signal() -> Result<impl Future<Output = ()> + Send, ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signals)?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}

/// Reopen the log file on every SIGHUP (logrotate's `postrotate`).
fn reopen_logs_on_sighup() -> Result<(), ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(ServerError::Signals)?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = logging::reopen() {
                tracing::error!(error = %e, "cannot reopen the log file");
            }
        }
    });
    Ok(())
}

/// Run the service to the end: a multi-threaded runtime, the API on the
/// configured address, `READY=1` to systemd once listening, and a graceful
/// stop on SIGTERM/SIGINT. This is what `main` calls; the backend is the
/// only thing the caller chooses.
pub fn run(config: Config, backend: Arc<dyn Backend>) -> Result<(), ServerError> {
    if config.readable_by_others {
        tracing::warn!(
            path = %config.path.display(),
            "the config file holds the JWT secret but group or others can read it; chmod 600 it"
        );
    }
    if let Some(e) = config
        .ovm_endpoint
        .as_deref()
        .filter(|e| e.starts_with("http://"))
    {
        tracing::warn!(
            endpoint = %e,
            "manager.allow_http is set and ovm_endpoint is http://: every login's Manager \
             credentials cross the network in clear text"
        );
    }
    if config.manager.ca_certificate.is_none() {
        tracing::warn!(
            "manager.ca_certificate is not set: the OVM Manager's TLS identity is NOT verified \
             at login (as the old service did); set it to verify the Manager"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("coe-worker")
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
        .map_err(ServerError::Runtime)?;
    let config = Arc::new(config);
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        reopen_logs_on_sighup()?;
        serve(config, backend, shutdown, |_| {
            match notify::notify("READY=1") {
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot notify systemd"),
            }
        })
        .await
    });
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    result
}
