//! Sends sd_notify datagrams to `NOTIFY_SOCKET` (the supervisor's socket, or systemd's when
//! the worker runs on its own). Without `NOTIFY_SOCKET` every send is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<Arc<(UnixDatagram, SocketAddr)>>,
}

impl Notifier {
    pub fn new(path: Option<PathBuf>) -> Self {
        let target = path.and_then(|path| {
            let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
                None => SocketAddr::from_pathname(&path),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(sock), Ok(addr)) => Some(Arc::new((sock, addr))),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!("cannot use NOTIFY_SOCKET {}: {e}", path.display());
                    None
                }
            }
        });
        Self { target }
    }

    /// Sends one datagram. Failures are logged, never fatal: the supervisor judges a worker
    /// by what it receives, and a worker that cannot report readiness is rolled back.
    pub fn send(&self, message: &str) {
        if let Some(target) = &self.target {
            let (sock, addr) = &**target;
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!("notify {message:?} failed: {e}");
            }
        }
    }
}
