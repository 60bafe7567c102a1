//! The test harness: start a real `baton` with a config written for the test, drive it
//! with its own CLI and real signals, and load it with real HTTP clients that count every
//! answer.
//!
//! Each test gets its own temp dir, control socket and free port. Nothing sleeps where an
//! event can be awaited: waits poll an observable condition with a deadline.
#![forbid(unsafe_code)]

pub mod load;
pub mod procfs;
pub mod scrape;
pub mod sdh;
pub mod tls;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use load::{Counts, Load, LoadSpec, PerGeneration};

/// Default deadline for a condition a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// Paths of the binaries under test, built once per test process.
#[derive(Debug)]
pub struct Bins {
    pub baton: PathBuf,
    pub worker: PathBuf,
    pub fake_worker: PathBuf,
    /// Where the plugin libraries are (`libbaton_hello.so`, …).
    pub dir: PathBuf,
}

/// Builds the binaries and plugins under test (same profile as the tests) once, and
/// finds them.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        // Test binaries run from target/<profile>/deps.
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_owned();
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet"]);
        for package in [
            "baton",
            "baton-worker",
            "baton-tests",
            "baton-hello",
            "baton-echo",
            "baton-slow",
            "baton-ticker",
            "baton-chat",
            "baton-files",
            "baton-faulty",
        ] {
            cmd.args(["-p", package]);
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of baton and baton-worker failed"
        );
        Bins {
            baton: dir.join("baton"),
            worker: dir.join("baton-worker"),
            fake_worker: dir.join("baton-fake-worker"),
            dir,
        }
    })
}

/// Writes to `out` (mode 0755) a copy of the built `baton` that reports release
/// `<version><suffix>` and reads handover formats up to `handover` (default: its own):
/// another build as far as a supervisor self-upgrade can tell (another hash, another
/// version). The binary holds one marker `BATON-RELEASE:<version>;handover=<n>` padded
/// with NULs; the patched marker takes its extra bytes from that padding.
pub fn patched_baton(out: &Path, suffix: &str, handover: Option<u32>) -> PathBuf {
    let bytes = std::fs::read(&bins().baton).expect("read baton");
    let prefix = b"BATON-RELEASE:";
    let at = bytes
        .windows(prefix.len() + 1)
        .position(|w| w.starts_with(prefix) && w[prefix.len()].is_ascii_digit())
        .expect("the release marker");
    assert_eq!(
        bytes
            .windows(prefix.len() + 1)
            .filter(|w| w.starts_with(prefix) && w[prefix.len()].is_ascii_digit())
            .count(),
        1,
        "one release marker"
    );
    let end = at
        + bytes[at..]
            .iter()
            .position(|&b| b == 0)
            .expect("NUL padding");
    let marker = std::str::from_utf8(&bytes[at + prefix.len()..end]).expect("marker text");
    let (version, format) = marker.split_once(";handover=").expect("marker shape");
    let format = handover.map_or(format.to_owned(), |h| h.to_string());
    let new = format!("BATON-RELEASE:{version}{suffix};handover={format}");
    assert!(
        bytes[end..end + (new.len().saturating_sub(end - at)) + 1]
            .iter()
            .all(|&b| b == 0),
        "room in the padding"
    );
    let mut patched = bytes.clone();
    patched[at..at + new.len()].copy_from_slice(new.as_bytes());
    for b in &mut patched[at + new.len()..end.max(at + new.len())] {
        *b = 0;
    }
    std::fs::write(out, patched).expect("write patched baton");
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    out.to_owned()
}

/// Puts `from` at `to` the way a package manager does: a new file renamed over the old
/// one (writing into a running binary fails with ETXTBSY).
pub fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("installing");
    std::fs::copy(from, &tmp).expect("copy binary");
    std::fs::rename(&tmp, to).expect("rename binary into place");
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// The knobs tests turn; everything else keeps Baton's defaults.
#[derive(Debug, Clone)]
pub struct TestConfig {
    pub port: u16,
    pub worker_path: Option<PathBuf>,
    pub processes: usize,
    pub threads: usize,
    pub ready_timeout: &'static str,
    pub drain_timeout: &'static str,
    pub drain_idle_grace: &'static str,
    pub max_generations: usize,
    /// `[plugins] dir` (none: no plugins).
    pub plugins_dir: Option<PathBuf>,
    /// `[plugins] watch`.
    pub watch: bool,
    /// Extra TOML appended verbatim.
    pub extra: String,
    /// The `baton` binary to run (default: the one built); a self-upgrade test runs a
    /// copy it can replace.
    pub baton: Option<PathBuf>,
}

impl Default for TestConfig {
    fn default() -> Self {
        Self {
            port: free_port(),
            worker_path: None,
            processes: 2,
            threads: 1,
            ready_timeout: "5s",
            drain_timeout: "10s",
            drain_idle_grace: "500ms",
            max_generations: 4,
            plugins_dir: None,
            watch: false,
            extra: String::new(),
            baton: None,
        }
    }
}

impl TestConfig {
    pub fn render(&self) -> String {
        let worker = self.worker_path.as_ref().unwrap_or(&bins().worker);
        let plugins = match &self.plugins_dir {
            Some(dir) => format!(
                "\n[plugins]\ndir = \"{}\"\ncache_dir = \"{}\"\nwatch = {}\nwatch_debounce = \"200ms\"\n",
                dir.display(),
                dir.with_extension("cache").display(),
                self.watch
            ),
            None => String::new(),
        };
        let text = format!(
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:{}\"\n\n\
             [worker]\npath = \"{}\"\nprocesses = {}\nthreads = {}\nready_timeout = \"{}\"\n\
             drain_timeout = \"{}\"\ndrain_idle_grace = \"{}\"\nmax_generations = {}\n{}",
            self.port,
            worker.display(),
            self.processes,
            self.threads,
            self.ready_timeout,
            self.drain_timeout,
            self.drain_idle_grace,
            self.max_generations,
            self.extra
        );
        text + &plugins
    }
}

/// Output of a `baton` CLI command.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// A running `baton run` under test.
#[derive(Debug)]
pub struct Baton {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub config: TestConfig,
    pub child: Option<tokio::process::Child>,
    pub pid: u32,
    log_path: PathBuf,
}

impl Baton {
    /// Starts `baton run` and waits until generation 1 serves.
    pub async fn start(config: TestConfig) -> Baton {
        let baton = Baton::spawn(config, &[]).await;
        baton.wait_serving(1).await;
        baton
    }

    /// Starts `baton run` without waiting; `env` is added to its environment.
    pub async fn spawn(config: TestConfig, env: &[(&str, &str)]) -> Baton {
        // Traversable by every user, so that workers running as `worker.user` reach the
        // notify socket and the plugin cache.
        let dir = traversable_tempdir("baton-test");
        let config_path = dir.path().join("baton.toml");
        std::fs::write(&config_path, config.render()).expect("write config");
        let log_path = dir.path().join("baton.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = tokio::process::Command::new(config.baton.as_ref().unwrap_or(&bins().baton));
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .env("BATON_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn baton");
        let pid = child.id().expect("pid");
        Baton {
            dir,
            config_path,
            config,
            child: Some(child),
            pid,
            log_path,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.config.port).into()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Rewrites the config file (an upgrade re-reads it).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// Runs `baton ARGS -c <config>`.
    pub async fn cli(&self, args: &[&str]) -> CliOutput {
        run_cli(args, &self.config_path).await
    }

    pub async fn upgrade_wait(&self) -> CliOutput {
        self.cli(&["upgrade", "--wait", "--timeout", "60s"]).await
    }

    pub async fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]).await;
        assert_eq!(
            out.code,
            Some(0),
            "baton status failed: {}\nlog:\n{}",
            out.text(),
            self.log()
        );
        serde_json::from_str(&out.stdout).expect("status is JSON")
    }

    /// A number `baton status --json` shows for generation `number` (`"idle"`,
    /// `"websockets"`, ...); `None` while it has no such generation.
    pub async fn generation_count(&self, number: u64, field: &str) -> Option<u64> {
        let status = self.status().await;
        status["generations"]
            .as_array()?
            .iter()
            .find(|g| g["number"].as_u64() == Some(number))?[field]
            .as_u64()
    }

    /// Waits until [`Baton::generation_count`] of `field` is `n` (counts are reported once
    /// a second), at most [`WAIT`].
    pub async fn wait_count(&self, number: u64, field: &str, n: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.generation_count(number, field).await;
            if now == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "generation {number}: {field} {now:?}, not {n}; status: {:#}",
                self.status().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Pids of the serving generation (number, pids).
    pub async fn serving(&self) -> Option<(u64, Vec<u32>)> {
        let status = self.status().await;
        status["generations"].as_array()?.iter().find_map(|g| {
            (g["state"] == "serving").then(|| {
                (
                    g["number"].as_u64().unwrap_or(0),
                    g["pids"]
                        .as_array()
                        .map(|p| {
                            p.iter()
                                .filter_map(|p| p.as_u64().map(|p| p as u32))
                                .collect()
                        })
                        .unwrap_or_default(),
                )
            })
        })
    }

    /// Waits until generation `n` (or a later one) serves with all its workers.
    pub async fn wait_serving(&self, n: u64) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(out) = self.try_status().await {
                let serving = out["generations"].as_array().and_then(|gs| {
                    gs.iter()
                        .find(|g| g["state"] == "serving" && g["number"].as_u64() >= Some(n))
                });
                if let Some(g) = serving
                    && g["pids"].as_array().map(Vec::len) == Some(self.config.processes)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "generation {n} did not serve within {WAIT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]).await;
        (out.code == Some(0))
            .then(|| serde_json::from_str(&out.stdout).ok())
            .flatten()
    }

    /// Waits until exactly one generation is alive and no upgrade is pending.
    pub async fn wait_settled(&self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.status().await;
            let gens = s["generations"].as_array().map(Vec::len).unwrap_or(0);
            if gens == 1
                && s["supervisor"]["upgrade_pending"] == false
                && s["generations"][0]["state"] == "serving"
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "baton did not settle: {s:#}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal)
            .expect("signal baton");
    }

    /// Waits for `baton run` to exit and returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("baton is running");
        let status = tokio::time::timeout(within, child.wait())
            .await
            .unwrap_or_else(|_| {
                panic!("baton did not exit within {within:?}; log:\n{}", self.log())
            })
            .expect("wait baton");
        self.child = None;
        status.code()
    }

    /// Worker processes alive now (children of the supervisor).
    pub fn worker_pids(&self) -> Vec<u32> {
        procfs::children(self.pid)
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let workers = procfs::children(self.pid);
            let _ = child.start_kill();
            for pid in workers {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Runs the `baton` CLI with `-c config`.
pub async fn run_cli(args: &[&str], config: &Path) -> CliOutput {
    let out = tokio::process::Command::new(&bins().baton)
        .args(args)
        .arg("-c")
        .arg(config)
        .env_remove("BATON_CONFIG")
        .output()
        .await
        .expect("run baton");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends SIGTERM to a child the test started and returns its exit code.
pub async fn terminate(child: &mut tokio::process::Child) -> Option<i32> {
    let pid = child.id().expect("the child is running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the child");
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the child did not exit within WAIT")
        .expect("wait for the child")
        .code()
}

/// Polls `cond` until it holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes an executable wrapper script that runs the fake worker in `mode`.
pub fn fake_worker_script(dir: &Path, mode: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("fake-worker-{mode}"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec '{}' {mode}\n",
            bins().fake_worker.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    path
}

/// Writes an executable wrapper that waits `delay` before exec'ing the real worker, so
/// that a generation takes that long to become ready.
pub fn slow_start_worker_script(dir: &Path, delay: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("slow-start-worker");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nsleep {delay}\nexec '{}' \"$@\"\n",
            bins().worker.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    path
}

/// A temporary directory every user may enter (mode 0755), for files a worker running
/// as `worker.user` must reach, or that Baton checks like its own (parents not writable
/// by others).
/// A Python with `packages` installed (pip, from PyPI), in a virtual environment of its
/// own under the target directory: made on first use, shared by the tests after. For
/// clients nobody here wrote (httpx with Python's h2).
pub fn python_with(name: &str, packages: &[&str], imports: &str) -> PathBuf {
    static MADE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let target = bins()
        .baton
        .parent()
        .and_then(Path::parent)
        .expect("target dir");
    let venv = target.join("test-venvs").join(name);
    let python = venv.join("bin").join("python");
    let ready = || {
        std::process::Command::new(&python)
            .args(["-c", &format!("import {imports}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ready() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 (Debian packages python3, python3-venv)");
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let pip = std::process::Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .args(packages)
            .status()
            .expect("pip");
        assert!(
            pip.success(),
            "pip install {packages:?} (PyPI) into {}",
            venv.display()
        );
        assert!(
            ready(),
            "{imports} not importable after pip install {packages:?}"
        );
    }
    python
}

pub fn traversable_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod temp dir");
    dir
}

/// Serialises tests that put the machine under load, so that two of them never compete
/// for the same two cores.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// One GET over a fresh connection to `addr`; returns the status and body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    request_on(stream, path).await
}

/// One GET over a fresh connection to the Unix socket at `socket`.
pub async fn get_unix(socket: &Path, path: &str) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    request_on(stream, path).await
}

pub async fn request_on<S>(stream: S, path: &str) -> anyhow::Result<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response =
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Compiles a C plugin with `cc` against the checked-in header; `defines` are `-D` flags
/// without the `-D`.
pub fn compile_c_plugin(source: &Path, out: &Path, defines: &[&str]) -> PathBuf {
    compile_c_plugin_with(Path::new("plugins/api/include"), source, out, defines)
}

/// Compiles a C plugin against the `baton_plugin.h` in `include` (relative to the
/// repository, like `source`): the frozen 1.0 header is `tests/harness/abi-1.0`.
pub fn compile_c_plugin_with(
    include: &Path,
    source: &Path,
    out: &Path,
    defines: &[&str],
) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let mut cmd = std::process::Command::new(&cc);
    cmd.args([
        "-std=c11", "-O1", "-fPIC", "-shared", "-Wall", "-Werror", "-I",
    ])
    .arg(root.join(include));
    for d in defines {
        cmd.arg(format!("-D{d}"));
    }
    let status = cmd
        .arg(root.join(source))
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?}: {e}"));
    assert!(status.success(), "compiling {} failed", source.display());
    out.to_owned()
}

/// A plugin directory for one test: mode 0755, holding copies of the named example
/// plugins (`"hello"` → `libbaton_hello.so`).
pub fn plugin_dir(parent: &Path, name: &str, plugins: &[&str]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("plugin dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod plugin dir");
    for p in plugins {
        let file = format!("libbaton_{p}.so");
        std::fs::copy(bins().dir.join(&file), dir.join(&file)).expect("copy plugin");
    }
    dir
}
