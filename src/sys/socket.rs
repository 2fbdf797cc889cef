//! TCP socket options the standard library and tokio do not offer.
//!
//! `TCP_NOTSENT_LOWAT` bounds the bytes a socket takes beyond what the peer
//! has room for: with it, a write waits (and epoll reports the socket not
//! writable) while more than that many bytes sit unsent in the kernel.
//! Without it, a sender ahead of its reader fills the whole send buffer
//! (autotuned up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default), and
//! those bytes are then sent from wherever the ACKs that open the window
//! are processed: on one machine, over loopback, that is the reader's own
//! `recv` calls, which then pay for the sender's transmit path and the
//! loopback delivery (see `docs/profile.md`). Bounded, the sender's own
//! writes transmit, and a connection's unsent kernel memory is bounded too.

use std::io;
use std::os::fd::AsRawFd;

/// A socket's `TCP_NOTSENT_LOWAT` (the kernel's default, from
/// `net.ipv4.tcp_notsent_lowat`, is `u32::MAX`: no limit).
pub fn notsent_lowat(socket: &impl AsRawFd) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one c_int) through a
    // pointer to a live c_int on this stack frame and stores the length it
    // wrote in `len`, also live; the descriptor is borrowed for the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets `TCP_NOTSENT_LOWAT` on a TCP socket (Linux 3.12 and later).
pub fn set_notsent_lowat(socket: &impl AsRawFd, bytes: u32) -> io::Result<()> {
    let value =
        libc::c_int::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a pointer to
    // a live c_int on this stack frame; the descriptor is borrowed for the
    // call (an invalid one is refused by the kernel with EBADF).
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn the_limit_is_set_on_a_tcp_socket_and_refused_elsewhere() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        set_notsent_lowat(&tcp, 65536).unwrap();
        assert_eq!(notsent_lowat(&tcp).unwrap(), 65536);
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(set_notsent_lowat(&file, 65536).is_err(), "not a socket");
    }
}
