//! A stand-in OVM Manager: a small HTTPS server speaking the Manager's real
//! login endpoint with basic auth, counting the requests it gets.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use base64::Engine;

use super::pki::{provider, Pki};
use super::WAIT;

pub const MGR_USER: &str = "admin";
pub const MGR_PASS: &str = "Welcome1-pw";
/// A Manager user whose check the stand-in holds until the test calls
/// [`StandInManager::release_slow`] (shutdown test).
pub const SLOW_USER: &str = "slowpoke";

/// An HTTPS server answering `GET /ovm/core/wsapi/rest/Repository/id` like
/// the Manager: 200 and a JSON list for the right basic-auth pair, 401
/// otherwise. Counts the requests it gets.
pub struct StandInManager {
    pub port: u16,
    pub hits: Arc<AtomicUsize>,
    released: Arc<(Mutex<bool>, Condvar)>,
}

impl StandInManager {
    pub fn start(pki: &Pki) -> StandInManager {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(pki.certs("mgr.pem"), pki.key("mgr.key"))
            .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let released = Arc::new((Mutex::new(false), Condvar::new()));
        let gate = released.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let (config, h, gate) = (config.clone(), h.clone(), gate.clone());
                std::thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(WAIT));
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let Some(head) = read_head(&mut tls) else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let good = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{MGR_USER}:{MGR_PASS}"))
                    );
                    let slow = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD
                            .encode(format!("{SLOW_USER}:{MGR_PASS}"))
                    );
                    let lines: Vec<&str> = head.split("\r\n").collect();
                    let header = |name: &str| {
                        lines.iter().find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                        })
                    };
                    let auth = header("authorization").unwrap_or_default();
                    let right_request = lines[0]
                        == "GET /ovm/core/wsapi/rest/Repository/id HTTP/1.1"
                        && header("accept").as_deref() == Some("application/json");
                    if auth == slow {
                        let (lock, cv) = &*gate;
                        let open = cv
                            .wait_timeout_while(lock.lock().unwrap(), WAIT, |r| !*r)
                            .unwrap();
                        assert!(*open.0, "the slow login was never released");
                    }
                    let resp = if right_request && (auth == good || auth == slow) {
                        let body = r#"[{"name":"repo1","type":"com.oracle.ovm.mgr.ws.model.Repository","uri":"https://m/ovm/core/wsapi/rest/Repository/0004fb0000030000","value":"0004fb0000030000"}]"#;
                        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                    } else {
                        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
                    };
                    let _ = tls.write_all(resp.as_bytes());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        StandInManager {
            port,
            hits,
            released,
        }
    }
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    /// Lets the held logins of [`SLOW_USER`] be answered.
    pub fn release_slow(&self) {
        let (lock, cv) = &*self.released;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// Read an HTTP head (up to the blank line), bounded.
pub fn read_head(r: &mut impl Read) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if buf.len() > 64 * 1024 || r.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    String::from_utf8(buf).ok()
}
