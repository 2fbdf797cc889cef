//! systemd readiness notification (`sd_notify(3)` protocol), by hand.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket named
//! by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). No
//! libsystemd: a dom0 without systemd (upstart) simply has no variable and
//! nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Environment variable systemd sets for `Type=notify` services.
const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Send `state` (e.g. `READY=1`) to systemd if it is listening. Errors are
/// returned for logging; they never stop the service.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = target.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &target)?;
    }
    Ok(true)
}
