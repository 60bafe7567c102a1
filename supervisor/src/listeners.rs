//! The listening sockets the supervisor holds for its whole life and hands to every
//! generation.
//!
//! A listener is adopted from systemd socket activation (by `LISTEN_FDNAMES` name) or bound
//! from the config; either way it is verified to be a listening stream socket. Generations
//! hold `Arc<Listener>`s, so a listener dropped from the config stays open until the last
//! generation that serves on it has exited. This module never closes and rebinds a socket
//! that is still in use: a connection waiting in the backlog is never lost. Taking
//! systemd's fds and the verification are `baton_sys::activation`'s, which the worker
//! uses too.
//!
//! Under systemd the listeners baton binds itself are also kept in systemd's file
//! descriptor store ([`FdStore`], by listener name), so that they outlive a crash or a
//! restart of the supervisor with their backlog; they come back as socket activation.

use crate::config::{Address, Config};
use baton_sys::activation::{ActivationError, ListenFds, NotListening, verify_listening};
use socket2::{Domain, Socket, Type};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use thiserror::Error;

/// Accept backlog for sockets we bind: as long as the kernel allows, which is
/// `net.core.somaxconn` (Linux caps a larger value at it, silently; 4096 by default since
/// Linux 5.4), so that an operator raises it with that sysctl alone, as for a socket unit's
/// `Backlog=`. Read when the socket is bound: a later change takes a new listener.
const BACKLOG: i32 = 65_535;

#[derive(Debug, Error)]
pub enum ListenerError {
    #[error("listener {name:?}: cannot listen on {address}: {error}")]
    Bind {
        name: String,
        address: Address,
        error: std::io::Error,
    },
    #[error("listener {name:?}: has no address and systemd passed no fd of that name")]
    NoAddress { name: String },
    /// A socket bound from the config is not one that can be served on.
    #[error("listener {name:?}: {reason}")]
    NotListening { name: String, reason: NotListening },
    /// An fd systemd passed is not a listening stream socket.
    #[error("listener {name:?}: fd {fd} from systemd: {reason}")]
    Adopted {
        name: String,
        fd: RawFd,
        reason: NotListening,
    },
    /// A listener taken over under a new name could not be duplicated.
    #[error("listener {name:?}: dup: {error}")]
    Dup { name: String, error: std::io::Error },
    /// What `baton check` finds: `run` would refuse to start.
    #[error(
        "listener {name:?} (line {line}): {address} is in use by another process ({by}); \
         baton run would refuse to start"
    )]
    InUse {
        name: String,
        line: usize,
        address: Address,
        by: Occupied,
    },
    #[error("socket activation: {0}")]
    Activation(ActivationError),
}

/// What holds an address that [`probe`] found in use.
#[derive(Debug, Error)]
pub enum Occupied {
    /// Binding it failed with `EADDRINUSE`.
    #[error("{0}")]
    Bound(std::io::Error),
    /// A Unix socket that accepts a connection.
    #[error("a process is accepting connections on it")]
    Accepting,
}

/// Where a listener came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Systemd,
    Config,
}

/// One named listener: one or more fds (systemd may pass several under one name).
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub origin: Origin,
    /// What it listens on, for messages and status.
    pub description: String,
    address: Option<Address>,
    /// We created the Unix socket file and remove it with the socket.
    owns_file: bool,
    /// systemd's fd store holds the socket: its file stays when we drop it, for the
    /// supervisor systemd starts next.
    stored: AtomicBool,
    fds: Vec<OwnedFd>,
}

impl Listener {
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.fds.iter().map(|fd| fd.as_fd())
    }

    pub fn fd_count(&self) -> usize {
        self.fds.len()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let owns_file = self.owns_file && !self.stored.load(Ordering::Relaxed);
        if let (true, Some(Address::Unix(path))) = (owns_file, &self.address) {
            // We created this socket file; remove it with the last user of the socket.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Fds passed by systemd, by name, taken once at start-up.
#[derive(Debug, Default)]
pub struct Activated {
    fds: Vec<(String, OwnedFd)>,
}

impl Activated {
    /// Takes the fds of systemd's socket-activation protocol, if `LISTEN_PID` is ours.
    pub fn from_env(
        listen_pid: Option<&str>,
        listen_fds: Option<&str>,
        listen_fdnames: Option<&str>,
    ) -> Result<Self, ListenerError> {
        let (Some(pid), Some(count)) = (listen_pid, listen_fds) else {
            return Ok(Self::default());
        };
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            tracing::info!("ignoring LISTEN_FDS: LISTEN_PID={pid} is not this process");
            return Ok(Self::default());
        }
        let fds = ListenFds::parse(count, listen_fdnames)
            .and_then(ListenFds::adopt)
            .map_err(|e| match e {
                ActivationError::NotListening { name, fd, reason } => {
                    ListenerError::Adopted { name, fd, reason }
                }
                other => ListenerError::Activation(other),
            })?;
        Ok(Self { fds })
    }
}

/// Where listeners are kept while no supervisor holds them: systemd's file descriptor
/// store ([`crate::notify::Systemd`]), or a fake in tests.
pub trait FdStore: std::fmt::Debug + Send {
    /// Keeps `fds` under `name`; `true` when they were handed over.
    fn store(&self, name: &str, fds: &[BorrowedFd<'_>]) -> bool;
    /// Drops every fd kept under `name`.
    fn remove(&self, name: &str);
}

/// The listeners the supervisor holds now, by name.
#[derive(Debug, Default)]
pub struct ListenerSet {
    current: HashMap<String, Arc<Listener>>,
    /// Every listener handed out that some generation may still hold: an upgrade that
    /// was rolled back must not lose the sockets the serving generation uses.
    known: Vec<Weak<Listener>>,
    /// Names systemd passed that no `[[listener]]` takes (closed at start).
    unclaimed: Vec<String>,
    fd_store: Option<Box<dyn FdStore>>,
}

impl ListenerSet {
    /// Builds the first set: systemd's fds by name, the rest bound from the config.
    pub fn open(config: &Config, mut activated: Activated) -> Result<Self, ListenerError> {
        let mut set = ListenerSet::default();
        for l in &config.listeners {
            let fds: Vec<OwnedFd> = {
                let (mine, rest): (Vec<_>, Vec<_>) = activated
                    .fds
                    .drain(..)
                    .partition(|(name, _)| *name == l.name);
                activated.fds = rest;
                mine.into_iter().map(|(_, fd)| fd).collect()
            };
            let listener = if fds.is_empty() {
                bind_listener(&l.name, l.address.as_ref())?
            } else {
                tracing::info!(
                    "listener {:?}: {} fd(s) from systemd socket activation",
                    l.name,
                    fds.len()
                );
                let description = describe_fds(&fds);
                if let Some(address) = &l.address
                    && !fds.iter().any(|fd| listens_on(fd.as_fd(), address))
                {
                    tracing::warn!(
                        "listener {:?}: systemd passed {description}, not the configured {address}; \
                         serving on systemd's socket. A socket unit's address wins over the config; \
                         a socket kept in systemd's fd store from before the address changed goes \
                         with `systemctl stop baton` (or `systemctl clean --what=fdstore baton`)",
                        l.name
                    );
                }
                Listener {
                    name: l.name.clone(),
                    origin: Origin::Systemd,
                    description,
                    address: l.address.clone(),
                    owns_file: false,
                    stored: AtomicBool::new(false),
                    fds,
                }
            };
            let listener = Arc::new(listener);
            set.known.push(Arc::downgrade(&listener));
            set.current.insert(l.name.clone(), listener);
        }
        for (name, fd) in activated.fds {
            tracing::warn!(
                "systemd passed fd {} named {name:?}, which no [[listener]] names; closing it",
                fd.as_raw_fd()
            );
            if !set.unclaimed.contains(&name) {
                set.unclaimed.push(name);
            }
        }
        Ok(set)
    }

    /// Keeps the listeners in `store` from now on: those baton bound itself now, and those
    /// each upgrade binds; a name that the config drops or binds anew is removed from it.
    /// Sockets systemd passed are not stored again (a socket unit or the store holds them).
    pub fn with_fd_store(mut self, store: impl FdStore + 'static) -> Self {
        for name in std::mem::take(&mut self.unclaimed) {
            store.remove(&name);
        }
        sync_fd_store(&store, &HashMap::new(), &self.current);
        self.fd_store = Some(Box::new(store));
        self
    }

    /// The listeners for a generation of `config`, binding any the config added. Nothing
    /// changes unless every listener is available.
    pub fn prepare(&mut self, config: &Config) -> Result<Vec<Arc<Listener>>, ListenerError> {
        self.known.retain(|w| w.strong_count() > 0);
        let alive: Vec<Arc<Listener>> = self
            .current
            .values()
            .cloned()
            .chain(self.known.iter().filter_map(Weak::upgrade))
            .collect();
        let mut next = HashMap::new();
        let mut out = Vec::new();
        for l in &config.listeners {
            let reuse = alive
                .iter()
                .find(|have| {
                    have.name == l.name
                        && (have.origin == Origin::Systemd || have.address == l.address)
                })
                .or_else(|| {
                    alive
                        .iter()
                        .find(|have| have.address.is_some() && have.address == l.address)
                });
            let listener = match reuse {
                Some(have) if have.name == l.name => have.clone(),
                Some(have) => Arc::new(Listener {
                    name: l.name.clone(),
                    origin: have.origin,
                    description: have.description.clone(),
                    address: have.address.clone(),
                    owns_file: false, // the original owns the socket file
                    stored: AtomicBool::new(false),
                    fds: have
                        .fds
                        .iter()
                        .map(|fd| fd.try_clone())
                        .collect::<Result<_, _>>()
                        .map_err(|error| ListenerError::Dup {
                            name: l.name.clone(),
                            error,
                        })?,
                }),
                None => Arc::new(bind_listener(&l.name, l.address.as_ref())?),
            };
            next.insert(l.name.clone(), listener.clone());
            out.push(listener);
        }
        for (name, old) in &self.current {
            if !next.values().any(|n| Arc::ptr_eq(n, old)) {
                tracing::info!(
                    "listener {name:?} ({}) is no longer configured; it closes when its last generation exits",
                    old.description
                );
            }
        }
        for l in &out {
            if !self
                .known
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(l)))
            {
                self.known.push(Arc::downgrade(l));
            }
        }
        if let Some(store) = &self.fd_store {
            sync_fd_store(store.as_ref(), &self.current, &next);
        }
        self.current = next;
        Ok(out)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Listener>> {
        self.current.values()
    }

    /// Every listener some generation may still hold, for a supervisor re-exec: the
    /// state (fds by number) and the listeners in the same order, so that a generation's
    /// listeners can be named by index.
    pub fn export(&self) -> (ListenerSetState, Vec<Arc<Listener>>) {
        let mut all: Vec<Arc<Listener>> = self.current.values().cloned().collect();
        for l in self.known.iter().filter_map(Weak::upgrade) {
            if !all.iter().any(|a| Arc::ptr_eq(a, &l)) {
                all.push(l);
            }
        }
        let state = ListenerSetState {
            listeners: all
                .iter()
                .map(|l| ListenerState {
                    name: l.name.clone(),
                    origin: l.origin,
                    description: l.description.clone(),
                    address: l.address.clone(),
                    owns_file: l.owns_file,
                    stored: l.stored.load(Ordering::Relaxed),
                    fds: l.fds.iter().map(|fd| fd.as_raw_fd()).collect(),
                })
                .collect(),
            current: self
                .current
                .iter()
                .map(|(name, l)| {
                    let index = all.iter().position(|a| Arc::ptr_eq(a, l));
                    (
                        name.clone(),
                        index.expect("current listeners are all listed"),
                    )
                })
                .collect(),
        };
        (state, all)
    }

    /// The set a previous image exported; `take` turns an fd number into the fd.
    pub fn import<E>(
        state: ListenerSetState,
        mut take: impl FnMut(RawFd) -> Result<OwnedFd, E>,
    ) -> Result<(Self, Vec<Arc<Listener>>), E> {
        let mut all = Vec::new();
        for l in state.listeners {
            let fds = l.fds.into_iter().map(&mut take).collect::<Result<_, _>>()?;
            all.push(Arc::new(Listener {
                name: l.name,
                origin: l.origin,
                description: l.description,
                address: l.address,
                owns_file: l.owns_file,
                stored: AtomicBool::new(l.stored),
                fds,
            }));
        }
        let mut set = ListenerSet::default();
        for (name, index) in state.current {
            if let Some(l) = all.get(index) {
                set.current.insert(name, l.clone());
            }
        }
        set.known = all.iter().map(Arc::downgrade).collect();
        Ok((set, all))
    }
}

/// A [`ListenerSet`] as a supervisor re-exec hands it over.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ListenerSetState {
    listeners: Vec<ListenerState>,
    /// Listener name → index in `listeners`.
    current: Vec<(String, usize)>,
}

impl ListenerSetState {
    /// Every fd number it names.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.listeners.iter().flat_map(|l| l.fds.iter().copied())
    }
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ListenerState {
    name: String,
    origin: Origin,
    description: String,
    address: Option<Address>,
    owns_file: bool,
    /// Kept in systemd's fd store.
    #[serde(default)]
    stored: bool,
    fds: Vec<RawFd>,
}

/// Makes `store` hold what `next` holds where `old` held something else. A name whose
/// listener went or changed is removed first: `FDSTOREREMOVE=1` drops every fd of a name,
/// and systemd keeps a socket it already holds under its first name. Then each listener
/// baton bound itself that is new under its name is stored.
fn sync_fd_store(
    store: &dyn FdStore,
    old: &HashMap<String, Arc<Listener>>,
    next: &HashMap<String, Arc<Listener>>,
) {
    let same = |a: Option<&Arc<Listener>>, b: &Arc<Listener>| a.is_some_and(|a| Arc::ptr_eq(a, b));
    let mut names: Vec<&String> = old.keys().collect();
    names.sort();
    for name in names {
        let l = &old[name];
        if !same(next.get(name), l) {
            l.stored.store(false, Ordering::Relaxed);
            store.remove(name);
        }
    }
    let mut names: Vec<&String> = next.keys().collect();
    names.sort();
    for name in names {
        let l = &next[name];
        if l.origin == Origin::Config && !same(old.get(name), l) {
            let fds: Vec<BorrowedFd<'_>> = l.fds().collect();
            if store.store(name, &fds) {
                l.stored.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Whether `fd` is bound to `address`.
fn listens_on(fd: BorrowedFd<'_>, address: &Address) -> bool {
    let Ok(local) = socket2::SockRef::from(&fd).local_addr() else {
        return false;
    };
    match address {
        Address::Tcp(addr) => local.as_socket() == Some(*addr),
        Address::Unix(path) => local.as_pathname() == Some(path.as_path()),
    }
}

fn bind_listener(name: &str, address: Option<&Address>) -> Result<Listener, ListenerError> {
    let Some(address) = address else {
        return Err(ListenerError::NoAddress {
            name: name.to_owned(),
        });
    };
    let fd = bind(address).map_err(|error| ListenerError::Bind {
        name: name.to_owned(),
        address: address.clone(),
        error,
    })?;
    verify_listening(fd.as_fd()).map_err(|reason| ListenerError::NotListening {
        name: name.to_owned(),
        reason,
    })?;
    tracing::info!("listener {name:?}: bound {address} from the config");
    Ok(Listener {
        name: name.to_owned(),
        origin: Origin::Config,
        description: address.to_string(),
        address: Some(address.clone()),
        owns_file: matches!(address, Address::Unix(_)),
        stored: AtomicBool::new(false),
        fds: vec![fd],
    })
}

/// What `baton check` can tell of a listener without keeping it: `Err` when `run` would
/// refuse it (its address is in use), `Ok(Some(note))` when it cannot be checked from
/// here, `Ok(None)` when it can be bound. `activated` lists the names systemd passed;
/// `under_systemd` says a socket unit may hold the address for `run`.
pub fn probe(
    listener: &crate::config::ListenerConfig,
    activated: Option<&str>,
    under_systemd: bool,
) -> Result<Option<String>, ListenerError> {
    let name = &listener.name;
    if activated.is_some_and(|names| names.split(':').any(|n| n == name)) {
        return Ok(None);
    }
    let Some(address) = &listener.address else {
        return Ok(Some(format!(
            "listener {name:?} has no address: baton run takes it from systemd socket activation"
        )));
    };
    let by = match address {
        Address::Tcp(_) => match bind(address) {
            Ok(_) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Occupied::Bound(e),
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                return Ok(Some(format!(
                    "listener {name:?}: binding {address} needs root or CAP_NET_BIND_SERVICE ({e}); \
                     the systemd unit grants it"
                )));
            }
            Err(error) => {
                return Err(ListenerError::Bind {
                    name: name.clone(),
                    address: address.clone(),
                    error,
                });
            }
        },
        Address::Unix(path) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Occupied::Accepting,
            Err(_) => return Ok(None),
        },
    };
    if under_systemd {
        return Ok(Some(format!(
            "listener {name:?}: {address} is in use ({by}); under systemd that is usually \
             the service's socket unit or its fd store, which hand it to baton run"
        )));
    }
    Err(ListenerError::InUse {
        name: name.clone(),
        line: listener.line,
        address: address.clone(),
        by,
    })
}

/// Binds and listens on `address`. The socket is close-on-exec; workers get a duplicate.
pub fn bind(address: &Address) -> std::io::Result<OwnedFd> {
    let socket = match address {
        Address::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            if addr.is_ipv6() {
                socket.set_only_v6(true)?;
            }
            socket.bind(&(*addr).into())?;
            socket
        }
        Address::Unix(path) => {
            remove_stale_socket(path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            socket.bind(&socket2::SockAddr::unix(path)?)?;
            socket
        }
    };
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// A socket file left by a process that is gone is removed; one that still accepts, or a
/// path that is not a socket, is an error.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process is accepting on it",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

fn describe_fds(fds: &[OwnedFd]) -> String {
    fds.iter()
        .map(|fd| {
            let sock = socket2::SockRef::from(fd);
            match sock.local_addr() {
                Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
                    (Some(a), _) => a.to_string(),
                    (None, Some(p)) => format!("unix:{}", p.display()),
                    (None, None) => "unix:(unnamed)".into(),
                },
                Err(_) => "?".into(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PathContext;
    use std::sync::Mutex;

    /// Records what the listener set asks of systemd's fd store.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl FdStore for Recorder {
        fn store(&self, name: &str, fds: &[BorrowedFd<'_>]) -> bool {
            self.0
                .lock()
                .unwrap()
                .push(format!("store {name} {}", fds.len()));
            true
        }
        fn remove(&self, name: &str) {
            self.0.lock().unwrap().push(format!("remove {name}"));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn config(listeners: &[(&str, &str)]) -> Config {
        let text: String = listeners
            .iter()
            .map(|(name, address)| {
                format!("[[listener]]\nname = \"{name}\"\naddress = \"{address}\"\n")
            })
            .collect();
        let ctx = PathContext {
            exe_dir: "/opt/baton/bin".into(),
            runtime_dir: None,
            cache_dir: None,
        };
        Config::parse(&text, Path::new("/etc/baton/baton.toml"), &ctx).unwrap()
    }

    #[test]
    fn the_fd_store_follows_the_configured_listeners() {
        let store = Recorder::default();
        let first = config(&[("http", "127.0.0.1:0"), ("admin", "127.0.0.2:0")]);
        let mut set = ListenerSet::open(&first, Activated::default())
            .unwrap()
            .with_fd_store(store.clone());
        assert_eq!(store.take(), ["store admin 1", "store http 1"]);

        // The same config again: nothing to tell systemd.
        set.prepare(&first).unwrap();
        assert_eq!(store.take(), Vec::<String>::new());

        // A listener dropped and one added.
        let second = config(&[("http", "127.0.0.1:0"), ("api", "127.0.0.3:0")]);
        let kept = set.prepare(&second).unwrap();
        assert_eq!(store.take(), ["remove admin", "store api 1"]);

        // A listener renamed keeps its socket, stored under the new name only.
        let third = config(&[("web", "127.0.0.1:0"), ("api", "127.0.0.3:0")]);
        set.prepare(&third).unwrap();
        assert_eq!(store.take(), ["remove http", "store web 1"]);
        drop(kept);
    }

    #[test]
    fn sockets_systemd_passed_are_not_stored_again() {
        let store = Recorder::default();
        let mut adopted =
            bind_listener("http", Some(&Address::Tcp("127.0.0.1:0".parse().unwrap()))).unwrap();
        adopted.origin = Origin::Systemd;
        let set = ListenerSet {
            current: HashMap::from([("http".to_owned(), Arc::new(adopted))]),
            unclaimed: vec!["gone".to_owned()],
            ..ListenerSet::default()
        }
        .with_fd_store(store.clone());
        // The name no listener takes any more is dropped from the store.
        assert_eq!(store.take(), ["remove gone"]);
        drop(set);
    }

    #[test]
    fn a_stored_unix_socket_keeps_its_file() {
        let dir = std::env::temp_dir().join(format!("baton-fdstore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("http.sock");
        let address = format!("unix:{}", path.display());
        let store = Recorder::default();
        let set = ListenerSet::open(&config(&[("http", &address)]), Activated::default())
            .unwrap()
            .with_fd_store(store.clone());
        drop(set);
        assert!(
            path.exists(),
            "the socket file of a stored listener was removed"
        );

        // Without the store the file goes with the socket, as before.
        let set = ListenerSet::open(&config(&[("http", &address)]), Activated::default()).unwrap();
        drop(set);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
