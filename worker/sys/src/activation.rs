//! systemd's socket-activation protocol, receiving side: `LISTEN_FDS` fds from fd 3 on,
//! named by `LISTEN_FDNAMES`, each taken once ([`crate::inherit::adopt`]) and verified to
//! be a listening stream socket before anything serves on it.
//!
//! The supervisor (started by systemd) and the worker (started by the supervisor, or by
//! systemd directly) both take their listeners through [`ListenFds`]. Whether `LISTEN_PID`
//! must name this process is the caller's rule, because theirs differ; so is any limit on
//! the count.
#![forbid(unsafe_code)]

use crate::inherit::{AdoptError, adopt};
use baton_proto::LISTEN_FDS_START;
use nix::errno::Errno;
use nix::sys::socket::{SockType, getsockopt, sockopt};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use thiserror::Error;

/// Why the socket-activation fds could not be taken.
#[derive(Debug, Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number")]
    Count(String),
    #[error("LISTEN_FDNAMES names {names} fds but LISTEN_FDS is {count}")]
    Names { names: usize, count: usize },
    #[error("LISTEN_FDS={count}: listener {name:?}: {source}")]
    Adopt {
        count: usize,
        name: String,
        source: AdoptError,
    },
    #[error("listener {name:?}: fd {fd}: {reason}")]
    NotListening {
        name: String,
        fd: RawFd,
        reason: NotListening,
    },
}

/// Why an fd cannot be served on.
#[derive(Debug, Error)]
pub enum NotListening {
    #[error("not a socket ({0})")]
    NotSocket(Errno),
    #[error("not a stream socket ({0:?})")]
    NotStream(SockType),
    #[error("socket is not listening")]
    Idle,
    #[error("SO_ACCEPTCONN: {0}")]
    AcceptConn(Errno),
}

/// The fds `LISTEN_FDS` and `LISTEN_FDNAMES` announce, not taken yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenFds {
    /// One name per fd, in fd order (`unknown` when `LISTEN_FDNAMES` is unset).
    names: Vec<String>,
}

impl ListenFds {
    /// Reads the two variables' values; takes nothing yet.
    pub fn parse(listen_fds: &str, listen_fdnames: Option<&str>) -> Result<Self, ActivationError> {
        let count: usize = listen_fds
            .parse()
            .map_err(|_| ActivationError::Count(listen_fds.to_owned()))?;
        let names: Vec<String> = match listen_fdnames {
            Some(names) => names.split(':').map(str::to_owned).collect(),
            None => vec!["unknown".to_owned(); count],
        };
        if names.len() != count {
            return Err(ActivationError::Names {
                names: names.len(),
                count,
            });
        }
        Ok(Self { names })
    }

    /// How many fds are announced.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Takes the fds at `3..3+LISTEN_FDS` with their names, each verified to be a
    /// listening stream socket. Fails on the first that is not open or not listening;
    /// those taken before it are closed again.
    pub fn adopt(self) -> Result<Vec<(String, OwnedFd)>, ActivationError> {
        self.adopt_from(LISTEN_FDS_START)
    }

    fn adopt_from(self, first: RawFd) -> Result<Vec<(String, OwnedFd)>, ActivationError> {
        let count = self.names.len();
        let mut fds = Vec::with_capacity(count);
        for (i, name) in self.names.into_iter().enumerate() {
            let raw = first + i as RawFd;
            let fd = match adopt(raw) {
                Ok(fd) => fd,
                Err(source) => {
                    return Err(ActivationError::Adopt {
                        count,
                        name,
                        source,
                    });
                }
            };
            if let Err(reason) = verify_listening(fd.as_fd()) {
                return Err(ActivationError::NotListening {
                    name,
                    fd: raw,
                    reason,
                });
            }
            fds.push((name, fd));
        }
        Ok(fds)
    }
}

/// Checks that `fd` is a listening stream socket.
pub fn verify_listening(fd: BorrowedFd<'_>) -> Result<(), NotListening> {
    let ty = getsockopt(&fd, sockopt::SockType).map_err(NotListening::NotSocket)?;
    if ty != SockType::Stream {
        return Err(NotListening::NotStream(ty));
    }
    match getsockopt(&fd, sockopt::AcceptConn) {
        Ok(true) => Ok(()),
        Ok(false) => Err(NotListening::Idle),
        Err(e) => Err(NotListening::AcceptConn(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fd`, as if a parent had placed it, taken as the one fd of a socket-activation set.
    fn adopt_one(fd: impl AsFd) -> Result<Vec<(String, OwnedFd)>, ActivationError> {
        let raw = crate::inherited(fd);
        ListenFds::parse("1", Some("web")).unwrap().adopt_from(raw)
    }

    #[test]
    fn the_variables_must_agree() {
        assert_eq!(ListenFds::parse("2", Some("a:b")).unwrap().len(), 2);
        assert_eq!(ListenFds::parse("2", None).unwrap().len(), 2);
        assert!(ListenFds::parse("0", None).unwrap().is_empty());
        assert!(matches!(
            ListenFds::parse("two", None),
            Err(ActivationError::Count(c)) if c == "two"
        ));
        assert!(matches!(
            ListenFds::parse("2", Some("a")),
            Err(ActivationError::Names { names: 1, count: 2 })
        ));
    }

    #[test]
    fn a_listening_stream_socket_is_adopted_with_its_name() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fds = adopt_one(&listener).unwrap();
        assert_eq!(fds.len(), 1);
        assert_eq!(fds[0].0, "web");
        let back = std::net::TcpListener::from(fds.into_iter().next().unwrap().1);
        assert_eq!(back.local_addr().unwrap(), addr);
    }

    #[test]
    fn a_pipe_a_datagram_socket_and_an_idle_socket_are_refused() {
        let (read, _write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let err = adopt_one(&read).unwrap_err();
        assert!(
            matches!(
                err,
                ActivationError::NotListening {
                    reason: NotListening::NotSocket(Errno::ENOTSOCK),
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("listener \"web\": fd "),
            "{err}"
        );

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = adopt_one(&udp).unwrap_err();
        assert!(
            matches!(
                err,
                ActivationError::NotListening {
                    reason: NotListening::NotStream(SockType::Datagram),
                    ..
                }
            ),
            "{err}"
        );

        // A connected stream socket: a stream, but not listening.
        let (idle, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = adopt_one(&idle).unwrap_err();
        assert!(
            matches!(
                err,
                ActivationError::NotListening {
                    reason: NotListening::Idle,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_number_that_is_not_open_is_refused() {
        let err = ListenFds::parse("1", None)
            .unwrap()
            .adopt_from(i32::MAX - 8)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ActivationError::Adopt {
                    source: AdoptError::NotOpen(_),
                    ..
                }
            ),
            "{err}"
        );
    }
}
