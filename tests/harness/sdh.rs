//! A real systemd for a test, booted with the repository's copy of the systemd harness
//! (`tests/systemd-harness/sdh`, with every guard of the original), running Baton's own
//! unit files from `systemd/` with only paths and ports substituted.
//!
//! Each instance has its own name, port, share directory (`/srv/baton-sdh/NAME`, outside
//! `/tmp` and `/var/tmp` because the unit's PrivateTmp= hides those) and units directory;
//! `Drop` takes it down.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::{bins, free_port};

/// Why the real-systemd tests cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (CI runs as root)".into());
    }
    if !Path::new("/proc/self/ns/pid").exists() || !Path::new("/sys/fs/cgroup").exists() {
        return Some("needs pid namespaces and a cgroup2 hierarchy".into());
    }
    None
}

fn sdh_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd-harness/sdh")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One systemd instance with baton.service and baton.socket installed.
#[derive(Debug)]
pub struct Instance {
    pub name: String,
    pub version: &'static str,
    pub share: PathBuf,
    pub units: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    /// baton.socket is installed and started at boot.
    socket_unit: bool,
    up: bool,
}

impl Instance {
    /// Prepares the share (binaries, plugins, config) and the units; `notify_reload`
    /// adds the systemd ≥ 253 drop-in.
    pub fn prepare(name: &str, version: &'static str, notify_reload: bool) -> Instance {
        use std::os::unix::fs::PermissionsExt;
        let name = format!("{name}-{}", std::process::id());
        let share = PathBuf::from("/srv/baton-sdh").join(&name);
        let units = PathBuf::from("/var/tmp/baton-sdh-units").join(&name);
        let _ = std::fs::remove_dir_all(&share);
        let _ = std::fs::remove_dir_all(&units);
        for dir in [
            &share.join("bin"),
            &share.join("plugins.d"),
            &share.join("run"),
            &units.join("baton.service.d"),
        ] {
            std::fs::create_dir_all(dir).unwrap();
        }
        for dir in [
            Path::new("/srv/baton-sdh"),
            &share,
            &share.join("bin"),
            &share.join("plugins.d"),
        ] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The service's dynamic user writes its control socket here.
        std::fs::set_permissions(share.join("run"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        let b = bins();
        for (from, to) in [
            (&b.baton, "baton"),
            (&b.worker, "baton-worker"),
            (&b.fake_worker, "baton-fake-worker"),
        ] {
            std::fs::copy(from, share.join("bin").join(to)).unwrap();
        }
        for p in ["hello", "slow"] {
            let file = format!("libbaton_{p}.so");
            std::fs::copy(b.dir.join(&file), share.join("plugins.d").join(&file)).unwrap();
        }
        let script = |name: &str, body: String| {
            let path = share.join("bin").join(name);
            std::fs::write(&path, body).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // Every generation takes a moment to become ready, so that "returns only when
        // the new generation serves" is observable.
        script(
            "slow-start-worker",
            format!(
                "#!/bin/sh\nsleep 1.5\nexec {}/bin/baton-worker \"$@\"\n",
                share.display()
            ),
        );
        script(
            "failing-worker",
            format!(
                "#!/bin/sh\nexec {}/bin/baton-fake-worker exit\n",
                share.display()
            ),
        );

        let port = free_port();
        let instance = Instance {
            name,
            version,
            config: share.join("baton.toml"),
            share,
            units: units.clone(),
            port,
            socket_unit: true,
            up: false,
        };
        instance.write_config("slow-start-worker");

        let shipped =
            |file: &str| std::fs::read_to_string(repo().join("systemd").join(file)).unwrap();
        let bin = format!("{}/bin/", instance.share.display());
        let service = shipped("baton.service")
            .replace("/usr/local/bin/", &bin)
            .replace(
                "/etc/baton/baton.toml",
                &instance.config.display().to_string(),
            );
        std::fs::write(units.join("baton.service"), service).unwrap();
        let socket = shipped("baton.socket")
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("[Unit]\n", "[Unit]\nDefaultDependencies=no\n");
        std::fs::write(units.join("baton.socket"), socket).unwrap();
        // Test-only settings: no default dependencies (the harness's advice), a share the
        // service may write its control socket to, and a quick watchdog.
        std::fs::write(
            units.join("baton.service.d/test.conf"),
            format!(
                "[Unit]\nDefaultDependencies=no\n[Service]\nReadWritePaths={}/run\nWatchdogSec=2s\nTimeoutAbortSec=2s\nRestartSec=500ms\n",
                instance.share.display()
            ),
        )
        .unwrap();
        if notify_reload {
            std::fs::copy(
                repo().join("systemd/notify-reload.conf"),
                units.join("baton.service.d/notify-reload.conf"),
            )
            .unwrap();
        }
        instance
    }

    /// Writes the config with `worker` (a file in the share's bin/) as the worker.
    pub fn write_config(&self, worker: &str) {
        let s = self.share.display();
        std::fs::write(
            &self.config,
            format!(
                "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:{}\"\n\n[worker]\npath = \"{s}/bin/{worker}\"\nprocesses = 2\nthreads = 1\nready_timeout = \"10s\"\ndrain_timeout = \"10s\"\ndrain_idle_grace = \"500ms\"\n\n[plugins]\ndir = \"{s}/plugins.d\"\n\n[control]\nsocket = \"{s}/run/baton/baton.sock\"\n",
                self.port
            ),
        )
        .unwrap();
    }

    /// No baton.socket: baton binds its listeners itself. sdh.target wants baton.service,
    /// as multi-user.target does once it is enabled, so it starts at boot and stays loaded
    /// (with its fd store, if preserved) while it is stopped.
    pub fn without_socket_unit(&mut self) {
        std::fs::remove_file(self.units.join("baton.socket")).unwrap();
        std::fs::write(
            self.units.join("sdh.target"),
            "[Unit]\nDefaultDependencies=no\nWants=systemd-journald.socket systemd-journald.service baton.service\n",
        )
        .unwrap();
        self.socket_unit = false;
    }

    /// Adds `text` as the drop-in `baton.service.d/NAME` (after test.conf when NAME sorts
    /// after it).
    pub fn drop_in(&self, name: &str, text: &str) {
        std::fs::write(self.units.join("baton.service.d").join(name), text).unwrap();
    }

    /// Boots systemd with the units; only baton.socket is started (if there is one).
    pub async fn up(&mut self) {
        if self.version == "254" {
            let out = sdh(&["fetch-254"]).await;
            assert!(
                out.status.success(),
                "sdh fetch-254: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut up = vec![
            "up",
            "--version",
            self.version,
            "--units",
            self.units.to_str().unwrap(),
            "--share",
            self.share.to_str().unwrap(),
            "--name",
            &self.name,
        ];
        if self.socket_unit {
            up.extend(["--want", "baton.socket"]);
        }
        let mut out = sdh(&up).await;
        // Now and then systemd's PID 1 exits while it boots, before Baton is involved, with
        // nothing on its console (seen in full test runs, never when this test runs alone).
        // `sdh up` has taken the instance down again then: boot once more.
        if !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("exited during boot")
        {
            eprintln!(
                "sdh up: {}; booting once more",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            out = sdh(&up).await;
        }
        assert!(
            out.status.success(),
            "sdh up: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.up = true;
    }

    /// Runs a command inside the instance.
    pub async fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", "--name", &self.name, "--"];
        all.extend_from_slice(args);
        sdh(&all).await
    }

    pub async fn systemctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all).await
    }

    /// `systemctl show -p PROPERTY --value baton.service`.
    pub async fn property(&self, property: &str) -> String {
        let out = self
            .systemctl(&["show", "-p", property, "--value", "baton.service"])
            .await;
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub async fn journal(&self) -> String {
        let out = self
            .exec(&[
                "journalctl",
                "--no-pager",
                "-o",
                "short-precise",
                "-u",
                "baton.service",
                "-u",
                "baton.socket",
            ])
            .await;
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.up {
            let _ = std::process::Command::new(sdh_path())
                .args(["down", "--name", &self.name])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.share);
        let _ = std::fs::remove_dir_all(&self.units);
        // The parents go with the last instance (removing a directory that another
        // test's instance still uses fails, as it should).
        for parent in [self.share.parent(), self.units.parent()]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

async fn sdh(args: &[&str]) -> Output {
    tokio::process::Command::new(sdh_path())
        .args(args)
        .output()
        .await
        .expect("run sdh")
}

/// Output as text, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
