//! The server: listener, TLS, HTTP/1.1 and HTTP/2 connections, limits,
//! signals, graceful shutdown, readiness, logging.
//!
//! It owns sockets and the runtime, and nothing about what a request means
//! (that is `api`). The protocol is chosen by ALPN right after the TLS
//! handshake: `h2` gets hyper's HTTP/2 server, anything else HTTP/1.1, so a
//! connection never waits in a protocol-sniffing phase that no header
//! timeout covers. Limits in force on every connection: TLS handshake
//! timeout, header read timeout (with a `Timer`, without which hyper ignores
//! it), header count and size, HTTP/2 streams per connection, and
//! `max_connections` connections in all.

pub mod config;
pub mod logging;
pub mod notify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::api::{self, Backend, Login, Tokens};
use crate::tls;

pub use config::{Config, ConfigError, ListenerConfig};

/// HTTP/2 streams one connection may run at once (RFC 9113 recommends no
/// less than 100).
const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 ping interval, to find dead peers on long idle connections.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// Pause after a failed accept (EMFILE and the like) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
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
    let state = api::State::from_parts(backend, tokens, login, config.metrics.clone(), engine);
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
    let connections = Arc::new(Semaphore::new(config.api.max_connections));
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            state.metrics.connection_refused();
            tracing::warn!(%peer, "connection refused: api.max_connections reached");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let (acceptor, state, limits) = (acceptor.clone(), state.clone(), limits.clone());
        tokio::spawn(async move {
            let _permit = permit;
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
            let svc_state = state.clone();
            let svc = service_fn(move |req| api::handle(svc_state.clone(), peer, req));
            let io = TokioIo::new(tls);
            let result = if h2 {
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new())
                    .max_header_list_size(limits.header_bytes)
                    .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
                    .keep_alive_interval(H2_KEEPALIVE_INTERVAL);
                watcher.watch(b.serve_connection(io, svc)).await
            } else {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read)
                    .max_headers(limits.headers)
                    .max_header_size(limits.header_bytes as usize);
                watcher.watch(b.serve_connection(io, svc)).await
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
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

/// Per-connection limits, copied out of the config once.
struct Limits {
    handshake: Duration,
    header_read: Duration,
    headers: usize,
    header_bytes: u32,
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        Limits {
            handshake: c.api.tls_handshake_timeout,
            header_read: c.api.header_read_timeout,
            headers: c.api.max_headers,
            header_bytes: u32::try_from(c.api.max_header_bytes).unwrap_or(u32::MAX),
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
    if config.manager.ca_certificate.is_none() {
        tracing::warn!(
            "manager.ca_certificate is not set: the OVM Manager's TLS identity is NOT verified \
             at login (as the old service did); set it to verify the Manager"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("coe-worker")
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
