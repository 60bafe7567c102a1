//! The worker's environment, read once at the top of `main` (before the runtime starts
//! threads, so no later `getenv` races a `setenv`).

use anyhow::Context;
use baton_proto::{
    ENV_EXE_FD, ENV_GENERATION, ENV_LIFELINE_FD, ENV_SETTINGS, ENV_SUPERVISOR_PID, WorkerSettings,
};
use std::path::PathBuf;

/// A snapshot of every variable the worker reads.
#[derive(Debug, Clone)]
pub struct WorkerEnv {
    pub listen_pid: Option<String>,
    pub listen_fds: Option<String>,
    pub listen_fdnames: Option<String>,
    pub notify_socket: Option<PathBuf>,
    pub generation: u64,
    pub settings_json: Option<String>,
    pub lifeline_fd: Option<String>,
    /// The fd of the worker binary's file that the supervisor exec'd.
    pub exe_fd: Option<String>,
    /// `BATON_TLS_FD`: the sealed memfd of the TLS material.
    pub tls_fd: Option<String>,
    pub supervisor_pid: Option<String>,
    /// The worker protocol of the supervisor that started us, if it said.
    pub supervisor_protocol: Option<String>,
    pub journal: bool,
    /// `--check`: load the plugins, report them, exit.
    pub check: bool,
}

impl WorkerEnv {
    pub fn read() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Self {
            listen_pid: var("LISTEN_PID"),
            listen_fds: var("LISTEN_FDS"),
            listen_fdnames: var("LISTEN_FDNAMES"),
            notify_socket: std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from),
            generation: var(ENV_GENERATION)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
            settings_json: var(ENV_SETTINGS),
            lifeline_fd: var(ENV_LIFELINE_FD),
            exe_fd: var(ENV_EXE_FD),
            tls_fd: var(baton_proto::tls::ENV_TLS_FD),
            supervisor_pid: var(ENV_SUPERVISOR_PID),
            supervisor_protocol: var(baton_proto::ENV_WORKER_PROTOCOL),
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
            check: std::env::args().nth(1).as_deref() == Some("--check"),
        }
    }

    pub fn settings(&self) -> anyhow::Result<WorkerSettings> {
        match &self.settings_json {
            None => Ok(WorkerSettings::default()),
            Some(json) => {
                WorkerSettings::from_json(json).with_context(|| format!("bad {ENV_SETTINGS}"))
            }
        }
    }
}
