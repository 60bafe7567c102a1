//! The control socket: a Unix stream socket (mode 0600) where `baton upgrade`, `status`
//! and `stop` send one JSON request per connection and read one or more JSON replies,
//! one per line.
//!
//! The server turns requests into [`Event`]s and never touches supervisor state itself.
//! Peers are checked by their kernel-reported uid: root or the supervisor's own uid.

use crate::core::CanaryCall;
use crate::events::Event;
use crate::status::{StatusReport, UpgradeOutcome, UpgradeResult};
use nix::sys::socket::{getsockopt, sockopt};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// How long a client has to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A request, as the client sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Upgrade {
        wait: bool,
        /// Only upgrade the supervisor itself (re-exec the baton binary on disk); never
        /// written when false, so a client of this release can still ask a supervisor of
        /// the previous one for an ordinary upgrade.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        supervisor: bool,
    },
    Stop {
        wait: bool,
    },
    /// Decide the running canary now (`baton upgrade --promote` / `--abort`); answered
    /// with the upgrade's outcome, or an error when no canary runs.
    Canary {
        decision: CanaryCall,
    },
}

/// One reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status {
        status: Box<StatusReport>,
    },
    /// The request was taken; with `wait`, a final reply follows.
    Accepted {
        message: String,
    },
    Upgrade {
        outcome: UpgradeOutcome,
    },
    Stopped,
    Error {
        message: String,
    },
}

/// The listening control socket; removes its file when dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

/// Why the control socket cannot be set up; each message is written once, here.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control socket {} is in use: another baton supervisor is running with this config",
        .path.display()
    )]
    InUse { path: PathBuf },
    #[error("control socket directory {}: {error}", .dir.display())]
    Dir { dir: PathBuf, error: std::io::Error },
    #[error("control socket directory {} is not a directory (control.socket)", .dir.display())]
    NotDir { dir: PathBuf },
    #[error(
        "control socket directory {} belongs to uid {uid}, not to uid {me} that baton runs as; \
         give it to uid {me} or point control.socket elsewhere",
        .dir.display()
    )]
    Owner { dir: PathBuf, uid: u32, me: u32 },
    #[error(
        "control socket directory {} has mode {mode:04o}: other users could reach the \
         control socket; chmod 700 it, or point control.socket at a directory only baton's \
         user can enter",
        .dir.display()
    )]
    Open { dir: PathBuf, mode: u32 },
    #[error("control socket {}: cannot {what}: {error}", .path.display())]
    Socket {
        path: PathBuf,
        what: &'static str,
        error: std::io::Error,
    },
}

impl ControlSocket {
    /// Binds at `path` with mode 0600. A live socket there means another supervisor runs
    /// with this config: that is an error, never a takeover.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse {
                path: path.to_owned(),
            });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_dir(dir)?;
        }
        let _ = std::fs::remove_file(path);
        let socket = |what, error| ControlError::Socket {
            path: path.to_owned(),
            what,
            error,
        };
        let listener = UnixListener::bind(path).map_err(|e| socket("bind", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| socket("chmod 0600", e))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// The listening socket a previous supervisor image bound at `path` (inherited
    /// across `exec`, with its backlog of waiting clients).
    pub fn inherited(fd: std::os::fd::OwnedFd, path: PathBuf) -> std::io::Result<Self> {
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: UnixListener::from_std(listener)?,
            path,
        })
    }

    /// A duplicate of the listening fd, and the path: what a re-exec hands over.
    pub fn handover(&self) -> std::io::Result<(std::os::fd::OwnedFd, PathBuf)> {
        use std::os::fd::AsFd;
        Ok((
            self.listener.as_fd().try_clone_to_owned()?,
            self.path.clone(),
        ))
    }

    /// Serves connections until the process ends.
    pub async fn serve(self, events: mpsc::UnboundedSender<Event>) {
        let me = nix::unistd::geteuid().as_raw();
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let allowed = match getsockopt(&stream, sockopt::PeerCredentials) {
                Ok(cred) if cred.uid() == 0 || cred.uid() == me => true,
                Ok(cred) => {
                    tracing::warn!(
                        "control connection from uid {} (pid {}) refused: only root and uid {me} may control baton",
                        cred.uid(),
                        cred.pid()
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!("control connection refused: cannot read peer credentials: {e}");
                    continue;
                }
            };
            tokio::spawn(handle(stream, allowed, events.clone()));
        }
    }
}

/// Makes sure `dir` is a directory only this user can enter: created with mode 0700 if
/// missing; refused if it exists with any access for group or others, or belongs to
/// someone else. Mode 0600 on the socket alone would not be enough: the directory is what
/// keeps other users from even reaching it.
fn private_dir(dir: &Path) -> Result<(), ControlError> {
    use std::os::unix::fs::DirBuilderExt;
    let failed = |dir: &Path| {
        let dir = dir.to_owned();
        move |error| ControlError::Dir { dir, error }
    };
    if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(failed(parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(failed(dir)(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(failed(dir))?;
    judge_private_dir(dir, &meta)
}

/// What [`ControlSocket::bind`] would say of the directory of the control socket `path`,
/// without creating anything (`baton check`): a missing directory is fine, it is created.
pub fn check_private_dir(path: &Path) -> Result<(), ControlError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => judge_private_dir(dir, &meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(ControlError::Dir {
            dir: dir.to_owned(),
            error,
        }),
    }
}

fn judge_private_dir(dir: &Path, meta: &std::fs::Metadata) -> Result<(), ControlError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    let dir = dir.to_owned();
    if !meta.is_dir() {
        return Err(ControlError::NotDir { dir });
    }
    if meta.uid() != me {
        return Err(ControlError::Owner {
            dir,
            uid: meta.uid(),
            me,
        });
    }
    if mode & 0o077 != 0 {
        return Err(ControlError::Open { dir, mode });
    }
    Ok(())
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one request and answers it; a refused peer's request is read too (so that its
/// client sees the refusal rather than a broken pipe) and answered with an error.
async fn handle(stream: UnixStream, allowed: bool, events: mpsc::UnboundedSender<Event>) {
    use std::os::fd::AsFd;
    let conn = stream.as_fd().try_clone_to_owned().ok();
    let (read, write) = stream.into_split();
    answer(read, write, allowed, conn, events).await;
}

/// Reads and discards what a client still sends, for at most [`LINGER_TIME`] or
/// [`LINGER_BYTES`], so that closing does not reset the connection under an answer.
async fn linger(mut read: impl tokio::io::AsyncRead + Unpin) {
    let mut buf = [0u8; 8192];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while left > 0 {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// How long [`linger`] waits for a client to finish sending.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(1);
/// The most [`linger`] reads and discards.
const LINGER_BYTES: usize = 1 << 20;

/// Reads one request from `read` and answers on `write` (the connection of
/// [`handle`], or any byte stream: the fuzz targets drive it directly). `conn`, a
/// duplicate of the connection, goes with an `upgrade --wait` so that a supervisor
/// re-exec can answer it from the next image.
pub async fn answer<R, W>(
    read: R,
    mut write: W,
    allowed: bool,
    conn: Option<std::os::fd::OwnedFd>,
    events: mpsc::UnboundedSender<Event>,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let request = match read {
        Err(_) => Err(format!("no request within {REQUEST_TIMEOUT:?}")),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Err(format!("request longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => {
            serde_json::from_slice::<Request>(&line).map_err(|e| format!("bad request: {e}"))
        }
        Ok(Err(e)) => Err(format!("read failed: {e}")),
    };
    let request = match request {
        Ok(_) if !allowed => {
            let message = "permission denied".to_owned();
            let _ = write_reply(&mut write, &Reply::Error { message }).await;
            return;
        }
        Ok(r) => r,
        Err(message) => {
            tracing::warn!("control: {message}");
            let _ = write_reply(&mut write, &Reply::Error { message }).await;
            // The client may still be sending (an oversized request): closing with its
            // bytes unread would reset the connection and could destroy the answer before
            // it is read. Say we are done, then read and discard what still comes, within
            // bounds, before closing.
            let _ = write.shutdown().await;
            linger(reader.into_inner()).await;
            return;
        }
    };
    let gone = || Reply::Error {
        message: "the supervisor is shutting down".into(),
    };
    match request {
        Request::Status => {
            let (tx, rx) = oneshot::channel();
            let _ = events.send(Event::Status { reply: tx });
            let reply = match rx.await {
                Ok(status) => Reply::Status {
                    status: Box::new(status),
                },
                Err(_) => gone(),
            };
            let _ = write_reply(&mut write, &reply).await;
        }
        Request::Upgrade { wait, supervisor } => {
            // Accepted before the request is passed on: a supervisor re-exec may answer
            // the rest from the next image, on the same connection.
            let accepted = Reply::Accepted {
                message: if supervisor {
                    "supervisor upgrade requested".into()
                } else {
                    "upgrade requested".into()
                },
            };
            let written = write_reply(&mut write, &accepted).await.is_ok();
            let (tx, rx) = oneshot::channel();
            let _ = events.send(Event::Upgrade {
                source: "control socket",
                reply: Some(crate::events::UpgradeReply {
                    tx,
                    conn: conn.filter(|_| wait && written),
                }),
                supervisor,
            });
            if !written || !wait {
                return;
            }
            let reply = match rx.await {
                Ok(outcome) => Reply::Upgrade { outcome },
                Err(_) => Reply::Upgrade {
                    outcome: UpgradeOutcome {
                        generation: None,
                        result: UpgradeResult::Refused,
                        reason: Some("the supervisor is shutting down".into()),
                        at: crate::status::timestamp(std::time::SystemTime::now()),
                        canary: None,
                    },
                },
            };
            let _ = write_reply(&mut write, &reply).await;
        }
        Request::Canary { decision } => {
            let (tx, rx) = oneshot::channel();
            let _ = events.send(Event::DecideCanary {
                decision,
                reply: tx,
            });
            let reply = match rx.await {
                Ok(outcome) if outcome.result == UpgradeResult::Refused => Reply::Error {
                    message: outcome.reason.unwrap_or_default(),
                },
                Ok(outcome) => Reply::Upgrade { outcome },
                Err(_) => gone(),
            };
            let _ = write_reply(&mut write, &reply).await;
        }
        Request::Stop { wait } => {
            let (tx, rx) = oneshot::channel();
            let _ = events.send(Event::Stop {
                fast: false,
                source: "control socket",
                reply: Some(tx),
            });
            let accepted = Reply::Accepted {
                message: "stopping".into(),
            };
            if write_reply(&mut write, &accepted).await.is_err() || !wait {
                return;
            }
            let _ = rx.await;
            let _ = write_reply(&mut write, &Reply::Stopped).await;
        }
    }
}

async fn write_reply<W: AsyncWriteExt + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialise");
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// The client side: sends `request` and returns a reader of reply lines.
pub async fn request(path: &Path, request: &Request) -> std::io::Result<Replies> {
    let mut stream = UnixStream::connect(path).await?;
    let mut line = serde_json::to_vec(request).expect("requests serialise");
    line.push(b'\n');
    stream.write_all(&line).await?;
    Ok(Replies {
        reader: BufReader::new(stream),
    })
}

/// Reply lines from the supervisor.
#[derive(Debug)]
pub struct Replies {
    reader: BufReader<UnixStream>,
}

impl Replies {
    /// The next reply, or `None` when the supervisor closed the connection.
    pub async fn next(&mut self) -> std::io::Result<Option<Reply>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad reply: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_keep_their_wire_form() {
        let json = |r: &Request| serde_json::to_string(r).unwrap();
        // An ordinary upgrade is written as before canaries existed, so a client of this
        // release still talks to a supervisor of the previous one.
        assert_eq!(
            json(&Request::Upgrade {
                wait: true,
                supervisor: false
            }),
            r#"{"command":"upgrade","wait":true}"#
        );
        for (decision, text) in [
            (CanaryCall::Promote, "promote"),
            (CanaryCall::Abort, "abort"),
        ] {
            let wire = format!(r#"{{"command":"canary","decision":"{text}"}}"#);
            assert_eq!(json(&Request::Canary { decision }), wire);
            assert!(matches!(
                serde_json::from_str::<Request>(&wire),
                Ok(Request::Canary { decision: d }) if d == decision
            ));
        }
        assert!(serde_json::from_str::<Request>(r#"{"command":"canary"}"#).is_err());
    }

    #[test]
    fn an_outcome_without_a_canary_reads_and_writes_as_before() {
        let old =
            r#"{"generation":2,"result":"rolled_back","reason":"x","at":"2026-11-23T00:00:00Z"}"#;
        let outcome: UpgradeOutcome = serde_json::from_str(old).unwrap();
        assert!(outcome.canary.is_none());
        assert_eq!(serde_json::to_string(&outcome).unwrap(), old);
    }
}
