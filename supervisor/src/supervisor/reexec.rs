//! The supervisor upgrading itself in place: [`Supervisor::re_exec`] checks the baton
//! binary on disk, copies it (and the running image) into the artifact cache, writes the
//! state ([`crate::handover`]) into a sealed memfd, proves the new binary starts and reads
//! that state (`baton handover-check` in a child), then `exec`s it in this process: same
//! pid, the same sockets, pipes and cache files (close-on-exec cleared), the same worker
//! children. [`resume`] is the other side: the new image reads the state, checks it
//! before it takes anything, takes every fd, adopts the workers and goes on. An image that
//! cannot take over executes the previous binary from the cache with the same state and
//! the reason (`BATON_HANDOVER_REJECTED`), which then reports the failure.
//!
//! Nothing here decides when: the core does (`core/self_upgrade.rs`), and only while no
//! generation is being prepared or started.

use super::{Launched, Set, Supervisor};
use crate::artifacts::{Artifact, WorkerBinary};
use crate::config::Config;
use crate::control::ControlSocket;
use crate::core::{Core, Input, SelfUpgrade};
use crate::events::{Event, UpgradeReply};
use crate::generation::Artifacts;
use crate::handover::MetricsState;
use crate::handover::{
    self, ArtifactState, Build, Handover, LaunchedState, SetState, ShellState, SocketState,
    WaiterState, WorkerState,
};
use crate::listeners::ListenerSet;
use crate::metrics::MetricsListener;
use crate::notify::{Systemd, WorkerSocket};
use crate::plugins::CachedPlugin;
use nix::sys::signal::{SigSet, Signal};
use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// How long the new binary has to prove it reads the state.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Signals held back across the `exec` (pending ones are delivered to the new image once
/// it has its handlers): without this, a SIGUSR2 or SIGTERM in between would kill the
/// process, whose default action for them is to terminate.
const HELD_SIGNALS: [Signal; 6] = [
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
];

/// The supervisor's own binary: which image runs, and where its successor comes from.
#[derive(Debug)]
pub struct Image {
    /// The baton binary on disk, compared with the running one at each upgrade.
    pub path: PathBuf,
    pub build: Build,
    /// When this image took over.
    pub started_at: SystemTime,
    /// When the service (the pid) started.
    pub service_started_at: SystemTime,
    /// Images before this one.
    pub reexecs: u64,
    /// Cache copies held: this image's and the previous one's, once known.
    pub held: Vec<Arc<Artifact>>,
    /// `path`'s stamp when it last hashed the same as the running image.
    same_on_disk: Option<Stamp>,
}

use crate::handover::Stamp;

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        (meta.mtime(), meta.mtime_nsec()),
        (meta.ctime(), meta.ctime_nsec()),
    )
}

impl Image {
    /// The image of a supervisor that started from `path` (this process's binary).
    pub fn first(path: PathBuf) -> Self {
        let running = Path::new("/proc/self/exe");
        let sha256 = crate::trust::sha256_file(running).unwrap_or_else(|e| {
            tracing::warn!("cannot hash the running baton binary: {e}");
            String::new()
        });
        // The file on disk is the running one if it is the same inode: no second hash at
        // start (a binary replaced since is hashed at the next upgrade).
        let same_on_disk = match (std::fs::metadata(&path), std::fs::metadata(running)) {
            (Ok(disk), Ok(exe)) => {
                use std::os::unix::fs::MetadataExt;
                (disk.dev() == exe.dev() && disk.ino() == exe.ino()).then(|| stamp(&disk))
            }
            _ => None,
        };
        let now = SystemTime::now();
        Self {
            path,
            build: Build {
                version: crate::release::version(),
                sha256,
            },
            started_at: now,
            service_started_at: now,
            reexecs: 0,
            held: Vec::new(),
            same_on_disk,
        }
    }

    /// Whether the baton binary on disk is another one than the running image (hashed
    /// only when its stamp changed). A missing or unreadable file is no new binary.
    pub fn changed_on_disk(&mut self) -> bool {
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return false;
        };
        let now = stamp(&meta);
        if self.same_on_disk == Some(now) {
            return false;
        }
        match crate::trust::sha256_file(&self.path) {
            Ok(hash) if hash == self.build.sha256 => {
                self.same_on_disk = Some(now);
                false
            }
            Ok(hash) => {
                tracing::info!(
                    "the baton binary {} changed (sha256 {}): the supervisor upgrades itself first",
                    self.path.display(),
                    handover::short(&hash)
                );
                true
            }
            Err(_) => false,
        }
    }
}

impl Supervisor {
    /// Replaces this process's image with the baton binary on disk, handing the state
    /// over. Returns only if that could not be done, with the reason; nothing changed
    /// then.
    pub(super) fn re_exec(&mut self, request: &SelfUpgrade) -> String {
        let started = Instant::now();
        match self.try_re_exec(request) {
            Ok(never) => match never {},
            Err(reason) => {
                tracing::error!(
                    "supervisor upgrade refused after {:?}: {reason}",
                    started.elapsed()
                );
                reason
            }
        }
    }

    fn try_re_exec(&mut self, request: &SelfUpgrade) -> Result<std::convert::Infallible, String> {
        // The event loop does not run until the `exec` (or the refusal): the steps below
        // ping systemd's watchdog themselves, so that hashing and copying the binaries and
        // the check do not add up to a watchdog timeout.
        self.systemd.watchdog();
        let dir = self
            .core
            .generations()
            .next_back()
            .map(|g| g.artifacts.config.plugins.cache_dir.clone())
            .ok_or("no generation is running")?;
        let before = std::fs::metadata(&self.image.path).ok().map(|m| stamp(&m));
        let new = self
            .cache
            .supervisor_binary(&self.image.path, &dir)
            .map_err(|e| e.to_string())?;
        // The file on disk is the new image as long as this stamp holds: the next image
        // need not hash it again.
        let on_disk =
            before.filter(|b| std::fs::metadata(&self.image.path).is_ok_and(|m| stamp(&m) == *b));
        self.systemd.watchdog();
        let current = match self
            .image
            .held
            .iter()
            .find(|a| a.hash() == self.image.build.sha256)
        {
            Some(a) => a.clone(),
            None => {
                let a = self
                    .cache
                    .running_binary(&dir)
                    .map_err(|e| format!("cannot keep the running image to return to: {e}"))?;
                self.image.held.push(a.clone());
                a
            }
        };
        if new.hash() == self.image.build.sha256 {
            tracing::info!(
                "the baton binary on disk is the running one ({}): re-executing it anyway",
                self.image.build
            );
        }
        let mut fds = Vec::new();
        let mut state = self
            .handover_state(request, &new, &current, &mut fds)
            .map_err(|e| e.to_string())?;
        state.shell.binary_stamp = on_disk;
        let memfd = handover::seal(&state.encode())
            .map_err(|e| format!("cannot write the state to a memfd: {e}"))?;
        let build = check_image(&new, memfd.as_fd(), &self.systemd)?;
        tracing::info!(
            "supervisor upgrade: {} → {} ({}): handing over {} generation(s), {} fd(s)",
            self.image.build,
            build.version,
            new.path().display(),
            self.core.generations().count(),
            fds.len() + 3
        );
        fds.push(memfd.as_raw_fd());
        fds.push(new.fd().as_raw_fd());
        fds.push(current.fd().as_raw_fd());
        let env = [
            (handover::ENV_FD, memfd.as_raw_fd().to_string()),
            (
                handover::ENV_FALLBACK_FD,
                current.fd().as_raw_fd().to_string(),
            ),
        ];
        let args = run_args(&self.image.path, &self.config_path);
        // The new image pings again as soon as it has taken over.
        self.systemd.watchdog();
        let error = exec(new.fd(), &args, &env, &[], &fds);
        Err(format!("cannot execute {}: {error}", new.path().display()))
    }

    /// The document for the next image; `fds` collects every fd number it names.
    fn handover_state(
        &self,
        request: &SelfUpgrade,
        new: &Arc<Artifact>,
        current: &Arc<Artifact>,
        fds: &mut Vec<RawFd>,
    ) -> Result<Handover, crate::core::snapshot::Busy> {
        let mut artifacts: Vec<Arc<Artifact>> = Vec::new();
        let mut artifact_index =
            |a: &Arc<Artifact>| match artifacts.iter().position(|b| b.path() == a.path()) {
                Some(i) => i,
                None => {
                    artifacts.push(a.clone());
                    artifacts.len() - 1
                }
            };
        let images = vec![artifact_index(new), artifact_index(current)];
        let mut sets: Vec<Set> = Vec::new();
        let core = self.core.snapshot(|set: &Set| {
            let i = match sets.iter().position(|s| Arc::ptr_eq(s, set)) {
                Some(i) => i,
                None => {
                    sets.push(set.clone());
                    sets.len() - 1
                }
            };
            i as u32
        })?;
        let sets: Vec<SetState> = sets
            .iter()
            .map(|set| SetState {
                config_path: set.config.file.clone(),
                config_text: set.config.text.clone(),
                binary_source: set.binary.source.clone(),
                binary: artifact_index(&set.binary.artifact),
                plugins: set
                    .plugins
                    .iter()
                    .map(|p| (p.spec.clone(), artifact_index(&p.artifact)))
                    .collect(),
                tls: set.tls.as_ref().map(|t| t.memfd.as_raw_fd()),
            })
            .collect();
        fds.extend(sets.iter().filter_map(|s| s.tls));
        let (listeners, all) = self.listeners.export();
        for l in &all {
            fds.extend(l.fds().map(|fd| fd.as_raw_fd()));
        }
        let launched = self
            .launched
            .iter()
            .map(|(&generation, l)| LaunchedState {
                generation,
                listeners: l
                    .listeners
                    .iter()
                    .filter_map(|mine| all.iter().position(|a| Arc::ptr_eq(a, mine)))
                    .collect(),
                settings_json: l.settings_json.clone(),
                workers: l
                    .processes
                    .values()
                    .map(|p| WorkerState {
                        pid: p.pid,
                        stderr: p.stderr.as_ref().map(|fd| fd.as_raw_fd()),
                    })
                    .collect(),
            })
            .collect::<Vec<_>>();
        for l in &launched {
            fds.extend(l.workers.iter().filter_map(|w| w.stderr));
        }
        let waiters: Vec<WaiterState> = self
            .upgrade_waiters
            .iter()
            .filter_map(|(&id, r)| {
                r.conn.as_ref().map(|c| WaiterState {
                    id,
                    conn: c.as_raw_fd(),
                })
            })
            .collect();
        fds.extend(waiters.iter().map(|w| w.conn));
        let artifacts: Vec<ArtifactState> = artifacts
            .iter()
            .map(|a| ArtifactState {
                path: a.path().to_owned(),
                sha256: a.hash().to_owned(),
                fd: a.fd().as_raw_fd(),
            })
            .collect();
        fds.extend(artifacts.iter().map(|a| a.fd));
        let control = SocketState {
            fd: self.control.0.as_raw_fd(),
            path: self.control.1.clone(),
        };
        let notify = SocketState {
            fd: self.notify.fd().as_raw_fd(),
            path: self.notify.path().to_owned(),
        };
        let metrics = self.metrics.as_ref().map(|(fd, address)| MetricsState {
            fd: fd.as_raw_fd(),
            address: address.clone(),
        });
        fds.extend(metrics.as_ref().map(|m| m.fd));
        fds.extend([
            control.fd,
            notify.fd,
            self.lifeline.as_raw_fd(),
            self.lifeline_write.as_raw_fd(),
        ]);
        Ok(Handover {
            format: crate::release::HANDOVER_FORMAT,
            written_by: self.image.build.clone(),
            shell: ShellState {
                config_path: self.config_path.clone(),
                ctx: self.ctx.clone(),
                binary_path: self.image.path.clone(),
                binary_stamp: None,
                started_at: self.image.service_started_at,
                reexecs: self.image.reexecs,
                control,
                metrics,
                notify,
                lifeline_read: self.lifeline.as_raw_fd(),
                lifeline_write: self.lifeline_write.as_raw_fd(),
                listeners,
                artifacts,
                images,
                sets,
                launched,
                waiters,
                next_waiter: self.next_waiter,
                request: request.clone(),
                tickets: Some(self.tickets.clone()),
            },
            core,
        })
    }
}

/// `baton run -c CONFIG`, as the next image is started.
fn run_args(binary: &Path, config: &Path) -> Vec<OsString> {
    vec![
        binary.as_os_str().to_owned(),
        "run".into(),
        "-c".into(),
        config.as_os_str().to_owned(),
    ]
}

/// Runs `image` once in a child as `baton handover-check` on the state in `memfd`: it
/// must start, read the state and say which release it is. While it runs, systemd's
/// watchdog is pinged (the check is bounded by [`CHECK_TIMEOUT`], which may be longer
/// than `WatchdogSec=`).
fn check_image(
    image: &Artifact,
    memfd: BorrowedFd<'_>,
    systemd: &crate::notify::Systemd,
) -> Result<Build, String> {
    let mut cmd = std::process::Command::new("/proc/self/fd/3");
    std::os::unix::process::CommandExt::arg0(&mut cmd, image.path());
    cmd.args(["handover-check", "--fd", "4"])
        .env_remove(handover::ENV_FD)
        .env_remove(handover::ENV_FALLBACK_FD)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    baton_sys::child::prepare(&mut cmd, &[image.fd(), memfd]).map_err(|e| {
        format!(
            "cannot prepare the check of {}: {e}",
            image.path().display()
        )
    })?;
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", image.path().display()))?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    let mut pinged = Instant::now();
    systemd.watchdog();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => {
                if let Some(every) = systemd.watchdog_interval()
                    && pinged.elapsed() >= every / 2
                {
                    systemd.watchdog();
                    pinged = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new binary {} did not read the state within {CHECK_TIMEOUT:?}",
                    image.path().display()
                ));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot read the check's output: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    if !out.status.success() {
        return Err(format!(
            "the new binary {} (sha256 {}) failed its check ({}){}",
            image.path().display(),
            handover::short(image.hash()),
            out.status,
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {}", tail.join(" | "))
            }
        ));
    }
    serde_json::from_slice::<Build>(&out.stdout).map_err(|e| {
        format!(
            "the new binary {} did not say which release it is after reading the state ({e})",
            image.path().display()
        )
    })
}

/// `exec`s the file open at `image` with `args`, this process's environment (without
/// the handover's and socket activation's variables) plus `set`, keeping `keep` open.
/// Returns only on failure, with everything as it was.
fn exec(
    image: BorrowedFd<'_>,
    args: &[OsString],
    set: &[(&str, String)],
    unset: &[&str],
    keep: &[RawFd],
) -> std::io::Error {
    let cstr = |b: &[u8]| CString::new(b).map_err(|_| std::io::Error::other("a NUL byte"));
    let prepared = (|| -> std::io::Result<(Vec<CString>, Vec<CString>)> {
        let argv = args
            .iter()
            .map(|a| cstr(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let dropped = [
            handover::ENV_FD,
            handover::ENV_FALLBACK_FD,
            handover::ENV_REJECTED,
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
        ];
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            let name = k.as_bytes();
            if dropped.iter().chain(unset).any(|d| d.as_bytes() == name)
                || set.iter().any(|(s, _)| s.as_bytes() == name)
            {
                continue;
            }
            envp.push(cstr(&[name, b"=", v.as_bytes()].concat())?);
        }
        for (k, v) in set {
            envp.push(cstr(format!("{k}={v}").as_bytes())?);
        }
        Ok((argv, envp))
    })();
    let (argv, envp) = match prepared {
        Ok(p) => p,
        Err(e) => return e,
    };
    let flags = |cloexec: bool| {
        for &fd in keep {
            let _ = baton_sys::inherit::set_cloexec(fd, cloexec);
        }
    };
    let held = SigSet::from_iter(HELD_SIGNALS);
    let _ = held.thread_block();
    flags(false);
    let error = match nix::unistd::fexecve(image, &argv, &envp) {
        Ok(never) => match never {},
        Err(e) => std::io::Error::from(e),
    };
    flags(true);
    let _ = held.thread_unblock();
    error
}

/// Unblocks the signals held back across a re-exec; called once the new image has its
/// handlers (and harmless when nothing was blocked).
pub fn release_held_signals() {
    let _ = SigSet::from_iter(HELD_SIGNALS).thread_unblock();
}

/// `baton handover-check --fd N`: reads the state in fd `N` as the next image would, and
/// says which release this is. Run by the image before it `exec`s this binary.
pub fn handover_check(fd: RawFd) -> Result<Build, String> {
    let memfd = baton_sys::inherit::adopt(fd).map_err(|e| e.to_string())?;
    let bytes = handover::read_all(&memfd).map_err(|e| e.to_string())?;
    let state = Handover::decode(&bytes).map_err(|e| e.to_string())?;
    validate(&state, false)?;
    // Its hash is the cache file's name, known to the caller: not computed again here.
    Ok(Build {
        version: crate::release::version(),
        sha256: String::new(),
    })
}

/// What can be checked of a state before anything is taken: every config parses; with
/// `fds`, every fd it names is open here and every worker is a child of this process.
fn validate(state: &Handover, fds: bool) -> Result<(), String> {
    let shell = &state.shell;
    for set in &shell.sets {
        Config::parse(&set.config_text, &set.config_path, &shell.ctx).map_err(|e| {
            format!(
                "a running generation's config ({}) does not parse in this release: {e}",
                set.config_path.display()
            )
        })?;
        for i in std::iter::once(set.binary).chain(set.plugins.iter().map(|(_, i)| *i)) {
            if i >= shell.artifacts.len() {
                return Err(format!("artifact {i} is not in the state"));
            }
        }
    }
    if shell.images.iter().any(|&i| i >= shell.artifacts.len()) {
        return Err("a supervisor image is not in the state".into());
    }
    #[cfg(debug_assertions)]
    if std::env::var("BATON_TEST_REFUSE_HANDOVER").is_ok_and(|v| v == crate::release::version())
        && fds
    {
        return Err(format!(
            "refused by BATON_TEST_REFUSE_HANDOVER={} (a test's fault injection)",
            crate::release::version()
        ));
    }
    if !fds {
        return Ok(());
    }
    // The listeners too: every fd the state names.
    for fd in state_fds(state) {
        if !baton_sys::inherit::is_open(fd) {
            return Err(format!("fd {fd} named in the state is not open"));
        }
    }
    Ok(())
}

/// Whether `pid` is a child of this process (not yet reaped).
fn is_my_child(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    rest.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id())
}

/// What the new image needs from `commands::run` besides the state.
#[derive(Debug)]
pub struct Resumed {
    pub supervisor: Supervisor,
    pub control: ControlSocket,
    pub metrics: Option<MetricsListener>,
    pub notify: Arc<WorkerSocket>,
    /// How the image came to run: the request it carries out, or the reason the image it
    /// was handed to refused it.
    pub input: Input<Set>,
}

/// The new image's side: reads the state in the inherited memfd `fd`, checks it, takes
/// every fd and builds the supervisor. If the state cannot be used, executes the previous
/// image (named by `fallback`) with it; returns `Err` only when there is no going back.
pub fn resume(
    fd: RawFd,
    fallback: Option<RawFd>,
    rejected: Option<String>,
    systemd: Systemd,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Resumed, String> {
    let memfd = baton_sys::inherit::adopt(fd).map_err(|e| format!("the state's memfd: {e}"))?;
    let checked = handover::read_all(&memfd)
        .map_err(|e| format!("cannot read the state: {e}"))
        .and_then(|bytes| Handover::decode(&bytes).map_err(|e| e.to_string()))
        .and_then(|state| validate(&state, true).map(|()| state));
    match checked {
        Ok(state) => take_over(state, rejected, systemd, events),
        Err(reason) => Err(go_back(&memfd, fallback, reason)),
    }
}

/// Executes the previous image (the binary open at `fallback`) with the state in
/// `memfd` and `reason` in `BATON_HANDOVER_REJECTED`. Nothing the state names has been
/// taken yet, so the previous image finds every fd as it left it. Returns the reason (and
/// why there is no going back) only when that cannot be done.
fn go_back(memfd: &OwnedFd, fallback: Option<RawFd>, reason: String) -> String {
    let Some(previous) = fallback else {
        return reason;
    };
    tracing::error!("cannot take over: {reason}; returning to the previous image");
    let previous = match baton_sys::inherit::adopt(previous) {
        Ok(fd) => fd,
        Err(e) => return format!("{reason}; and the previous image is not open: {e}"),
    };
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut keep = vec![memfd.as_raw_fd(), previous.as_raw_fd()];
    if let Ok(bytes) = handover::read_all(memfd)
        && let Ok(state) = Handover::decode(&bytes)
    {
        keep.extend(state_fds(&state));
    }
    let error = exec(
        previous.as_fd(),
        &args,
        &[
            (handover::ENV_FD, memfd.as_raw_fd().to_string()),
            (handover::ENV_REJECTED, reason.clone()),
        ],
        &[handover::ENV_FALLBACK_FD],
        &keep,
    );
    format!("{reason}; and the previous image cannot be executed: {error}")
}

/// Every fd a state names.
fn state_fds(state: &Handover) -> Vec<RawFd> {
    let shell = &state.shell;
    let mut fds = vec![
        shell.control.fd,
        shell.notify.fd,
        shell.lifeline_read,
        shell.lifeline_write,
    ];
    fds.extend(shell.metrics.as_ref().map(|m| m.fd));
    fds.extend(shell.artifacts.iter().map(|a| a.fd));
    fds.extend(shell.sets.iter().filter_map(|s| s.tls));
    fds.extend(shell.waiters.iter().map(|w| w.conn));
    fds.extend(
        shell
            .launched
            .iter()
            .flat_map(|l| l.workers.iter().filter_map(|w| w.stderr)),
    );
    fds.extend(shell.listeners.fds());
    fds
}

/// Takes every fd of a checked state and builds the supervisor around them.
fn take_over(
    state: Handover,
    rejected: Option<String>,
    systemd: Systemd,
    events: mpsc::UnboundedSender<Event>,
) -> Result<Resumed, String> {
    let take = |fd: RawFd| baton_sys::inherit::adopt(fd).map_err(|e| e.to_string());
    let shell = state.shell;
    let mut cache = crate::artifacts::ArtifactCache::default();
    let mut artifacts = Vec::new();
    for a in shell.artifacts {
        let artifact = Arc::new(
            Artifact::inherited(a.path, a.sha256, take(a.fd)?).map_err(|e| e.to_string())?,
        );
        cache.hold(artifact.clone());
        artifacts.push(artifact);
    }
    let mut sets: Vec<Set> = Vec::new();
    for set in shell.sets {
        let config = Config::parse(&set.config_text, &set.config_path, &shell.ctx)
            .map_err(|e| e.to_string())?;
        sets.push(Arc::new(Artifacts {
            config: Arc::new(config),
            binary: WorkerBinary {
                source: set.binary_source,
                artifact: artifacts[set.binary].clone(),
            },
            plugins: set
                .plugins
                .into_iter()
                .map(|(spec, i)| CachedPlugin {
                    spec,
                    artifact: artifacts[i].clone(),
                })
                .collect(),
            tls: match set.tls {
                Some(fd) => Some(
                    crate::tls::describe(take(fd)?)
                        .map_err(|e| format!("a generation's TLS material: {e}"))?,
                ),
                None => None,
            },
        }));
    }
    let core: Core<Set> =
        Core::from_snapshot(state.core, Instant::now(), |i| sets[i as usize].clone());
    let (listeners, all) = ListenerSet::import(shell.listeners, take)?;
    // Stored again: systemd keeps one copy of a socket it already holds.
    let listeners = listeners.with_fd_store(systemd.clone());
    let control = ControlSocket::inherited(take(shell.control.fd)?, shell.control.path)
        .map_err(|e| format!("control socket: {e}"))?;
    let control_dup = control.handover().map_err(|e| e.to_string())?;
    let metrics = match shell.metrics {
        Some(m) => Some(
            MetricsListener::inherited(take(m.fd)?, m.address)
                .map_err(|e| format!("metrics listener: {e}"))?,
        ),
        None => None,
    };
    let metrics_dup = match &metrics {
        Some(m) => Some((m.handover().map_err(|e| e.to_string())?, m.address.clone())),
        None => None,
    };
    let notify = Arc::new(
        WorkerSocket::inherited(take(shell.notify.fd)?, shell.notify.path)
            .map_err(|e| format!("worker notify socket: {e}"))?,
    );
    let lifeline = take(shell.lifeline_read)?;
    let lifeline_write = take(shell.lifeline_write)?;
    let mut images: Vec<Arc<Artifact>> =
        shell.images.iter().map(|&i| artifacts[i].clone()).collect();
    if rejected.is_some() {
        // The image the state was written for refused it: this is the one that wrote it.
        images.reverse();
    }
    let running = images
        .first()
        .map(|a| a.hash().to_owned())
        .unwrap_or_default();
    // What the previous image saw on disk when it hashed the new image (only when this
    // image is that one); anything else is hashed again at the next upgrade.
    let same_on_disk = shell.binary_stamp.filter(|_| rejected.is_none());
    let image = Image {
        path: shell.binary_path,
        build: Build {
            version: crate::release::version(),
            sha256: running,
        },
        started_at: SystemTime::now(),
        service_started_at: shell.started_at,
        reexecs: shell.reexecs + u64::from(rejected.is_none()),
        held: images,
        same_on_disk,
    };
    let previous = state.written_by;
    let mut supervisor = Supervisor::new_with_core(
        core,
        shell.config_path,
        shell.ctx,
        listeners,
        (lifeline, lifeline_write),
        control_dup,
        image,
        notify.clone(),
        systemd,
        events.clone(),
    )
    .with_metrics(metrics_dup)
    .with_tickets(shell.tickets);
    supervisor.cache = cache;
    supervisor.next_waiter = shell.next_waiter;
    for l in shell.launched {
        let span = supervisor
            .core
            .generation(l.generation)
            .map(|g| g.span.clone())
            .unwrap_or_else(tracing::Span::none);
        let mut processes = HashMap::new();
        for w in l.workers {
            let stderr = w.stderr.map(take).transpose()?;
            let generation = l.generation;
            let events = events.clone();
            let on_exit = move |exit| {
                let _ = events.send(Event::WorkerExited { generation, exit });
            };
            if !is_my_child(w.pid) {
                // Reaped by the previous image after its last look: report it gone.
                on_exit(crate::core::Exit {
                    pid: w.pid,
                    status: "exited during the supervisor upgrade".into(),
                    stderr_tail: Vec::new(),
                });
                continue;
            }
            match crate::generation::adopt(w.pid, stderr, span.clone(), on_exit) {
                Ok(p) => {
                    processes.insert(w.pid, p);
                }
                Err(e) => return Err(format!("cannot watch worker {}: {e}", w.pid)),
            }
        }
        supervisor.launched.insert(
            l.generation,
            Launched {
                listeners: l
                    .listeners
                    .iter()
                    .filter_map(|&i| all.get(i).cloned())
                    .collect(),
                settings_json: l.settings_json,
                processes,
            },
        );
    }
    for w in shell.waiters {
        let conn = take(w.conn)?;
        let kept = conn.try_clone().ok();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(answer_later(conn, rx));
        supervisor
            .upgrade_waiters
            .insert(w.id, UpgradeReply { tx, conn: kept });
    }
    let newest = supervisor
        .core
        .generations()
        .next_back()
        .map(|g| g.artifacts.config.clone());
    if let Some(config) = newest {
        supervisor.sync_watcher(&config);
    }
    let change = format!("{previous} → {}", supervisor.image.build);
    let input = match rejected {
        Some(reason) => Input::SelfUpgradeFailed {
            request: shell.request,
            reason: format!("the new image refused the state and returned to {previous}: {reason}"),
        },
        None => Input::SelfUpgraded {
            request: shell.request,
            change,
        },
    };
    Ok(Resumed {
        supervisor,
        control,
        metrics,
        notify,
        input,
    })
}

/// Writes an upgrade's outcome to a client the previous image accepted.
async fn answer_later(conn: OwnedFd, rx: oneshot::Receiver<crate::status::UpgradeOutcome>) {
    use tokio::io::AsyncWriteExt;
    let Ok(outcome) = rx.await else { return };
    let std = std::os::unix::net::UnixStream::from(conn);
    if std.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(mut stream) = tokio::net::UnixStream::from_std(std) else {
        return;
    };
    let mut line =
        serde_json::to_vec(&crate::control::Reply::Upgrade { outcome }).expect("replies serialise");
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

impl Supervisor {
    /// Feeds the new image's first input and runs until stopped.
    pub async fn run_resumed(
        mut self,
        input: Input<Set>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), String> {
        self.feed(input);
        self.re_exec_when_idle(&mut events);
        self.event_loop(events).await
    }
}
