//! The status document (`baton status --json`) and upgrade outcomes.
//!
//! These types are the stable, documented output of the control socket (see
//! `docs/status.md`): fields are only ever added, never renamed or removed, and
//! [`STATUS_VERSION`] changes only if that promise has to be broken.

use serde::{Deserialize, Serialize};

/// The schema version of [`StatusReport`].
pub const STATUS_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: u32,
    pub supervisor: SupervisorInfo,
    pub listeners: Vec<ListenerInfo>,
    pub generations: Vec<GenerationInfo>,
    pub last_upgrade: Option<UpgradeOutcome>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SupervisorInfo {
    pub pid: u32,
    pub config: String,
    pub started_at: String,
    /// `running` or `stopping`.
    pub state: String,
    /// An upgrade requested while another was starting (or its canary was being
    /// judged), to run when it ends.
    pub upgrade_pending: bool,
    /// The running image's release (it follows the binary across self-upgrades).
    #[serde(default)]
    pub version: String,
    /// The SHA-256 of the running image's binary.
    #[serde(default)]
    pub sha256: String,
    /// The baton binary on disk that a self-upgrade runs.
    #[serde(default)]
    pub binary: String,
    /// When the running image took over (`started_at` is the service's start: the pid's).
    #[serde(default)]
    pub image_started_at: String,
    /// Self-upgrades (re-execs in place) since the service started.
    #[serde(default)]
    pub reexecs: u64,
    /// The worker protocol this supervisor speaks.
    #[serde(default)]
    pub worker_protocol: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerInfo {
    pub name: String,
    pub address: String,
    /// `systemd` (socket activation) or `config` (bound by the supervisor).
    pub origin: String,
    pub fds: usize,
    /// With TLS: the certificates the serving generation serves on it, the default first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<ServedCertificate>,
}

/// A TLS certificate served.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServedCertificate {
    pub chain: String,
    pub subject: String,
    /// Subject alternative names (DNS names, IP addresses): what SNI picks it by.
    pub names: Vec<String>,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    pub days_left: i64,
    /// Fewer than `tls::EXPIRY_WARNING_DAYS` days left.
    pub expires_soon: bool,
    /// SHA-256 fingerprint of the certificate (DER), hex.
    pub sha256: String,
}

impl ServedCertificate {
    pub fn of(c: &crate::tls::CertificateInfo, now: std::time::SystemTime) -> Self {
        let days_left = c.days_left(now);
        Self {
            chain: c.chain.clone(),
            subject: c.subject.clone(),
            names: c.names.clone(),
            not_before: crate::tls::time_text(c.not_before),
            not_after: crate::tls::time_text(c.not_after),
            days_left,
            expires_soon: days_left < crate::tls::EXPIRY_WARNING_DAYS,
            sha256: c.sha256.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerationInfo {
    pub number: u64,
    /// `starting`, `canary`, `serving`, `draining` or `failed`.
    pub state: String,
    pub started_at: String,
    pub uptime_secs: u64,
    pub pids: Vec<u32>,
    /// Workers of this generation replaced after an unexpected exit.
    pub restarts: u64,
    /// Open connections, as last reported by the workers (at most a second old).
    pub connections: u64,
    /// Of those, idle keep-alive connections and quiet WebSockets waiting in the workers'
    /// idle sets.
    #[serde(default)]
    pub idle: u64,
    /// Requests served by the generation's workers, including exited ones.
    pub requests: u64,
    /// Requests answered with a 5xx status, including those of exited workers.
    #[serde(default)]
    pub errors: u64,
    /// Open WebSocket connections, as last reported by the workers.
    #[serde(default)]
    pub websockets: u64,
    /// Streamed (deferred) answers under way, as last reported by the workers.
    #[serde(default)]
    pub streams: u64,
    pub workers: Vec<WorkerInfo>,
    /// The plugin files the generation loaded, with their SHA-256.
    pub plugins: Vec<PluginInfo>,
    /// Why a `failed` generation failed.
    pub failure: Option<String>,
    /// The worker binary the generation runs.
    #[serde(default)]
    pub worker: Option<BinaryInfo>,
    /// This generation runs the exact artifacts of that earlier generation, started
    /// after the generation that replaced it crash-looped.
    #[serde(default)]
    pub restored_from: Option<u64>,
    /// The generation whose artifacts are started again if this one crash-loops after
    /// its promotion.
    #[serde(default)]
    pub rollback_to: Option<u64>,
    /// While this generation is the `canary`: its window and the figures it is judged by.
    #[serde(default)]
    pub canary: Option<CanaryInfo>,
}

/// What one generation did during a canary window: the figures a canary is judged by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowCounts {
    pub generation: u64,
    /// Requests answered during the window (as the workers last reported them).
    pub requests: u64,
    /// Of those, answers with a 5xx status.
    pub errors: u64,
    /// Worker exits during the window.
    pub exits: u64,
    /// `(errors + exits) / requests`; 0 with neither requests nor errors, 1 with errors
    /// but no requests.
    pub error_ratio: f64,
}

impl WindowCounts {
    /// "3.10% (31 5xx + 0 exit(s) in 1000 request(s))".
    pub fn describe(&self) -> String {
        format!(
            "{:.2}% ({} 5xx + {} exit(s) in {} request(s))",
            self.error_ratio * 100.0,
            self.errors,
            self.exits,
            self.requests
        )
    }
}

/// A canary in progress: the generation it is compared with, its window, and the figures
/// of both generations since the window began.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryInfo {
    pub since: String,
    /// When the canary is judged.
    pub ends_at: String,
    pub ends_in_ms: u64,
    /// The window was run a second time because the canary had answered fewer than
    /// `upgrade.canary_min_requests` requests.
    pub extended: bool,
    pub canary: WindowCounts,
    /// The serving generation, over the same window.
    pub baseline: WindowCounts,
    pub min_requests: u64,
    pub max_error_ratio_increase: f64,
}

/// How a canary ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryDecision {
    /// It serves; the generation it was compared with drains.
    Promoted,
    /// It drains; the generation it was compared with goes on serving.
    RolledBack,
}

/// What decided a canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CanaryDecidedBy {
    /// The error ratios at the window's end.
    ErrorRatio,
    /// Fewer than `upgrade.canary_min_requests` requests in two windows.
    TooFewRequests,
    /// Its workers crash-looped or all exited during the window.
    Crashed,
    /// `baton upgrade --promote` or `--abort`.
    Operator,
}

/// The canary's part of an upgrade's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CanaryVerdict {
    pub decision: CanaryDecision,
    pub decided_by: CanaryDecidedBy,
    /// How long the canary served beside the baseline.
    pub window_ms: u64,
    pub canary: WindowCounts,
    pub baseline: WindowCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinaryInfo {
    /// `worker.path` as configured.
    pub path: String,
    /// The copy in the artifact cache that the workers exec.
    pub cached: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginInfo {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub slot: usize,
    pub pid: Option<u32>,
    /// `starting`, `ready`, `restarting` (waiting out a back-off) or `exited`.
    pub state: String,
    pub restarts: u64,
    /// The back-off before the next restart, while `restarting`.
    pub restart_in_ms: Option<u64>,
    pub connections: u64,
    pub requests: u64,
    /// How old `connections` and `requests` are: workers report them when they change,
    /// at most once a second. `None` before the first report.
    #[serde(default)]
    pub stats_age_ms: Option<u64>,
    /// The worker's release and protocol, as it reported them when ready.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub protocol: Option<u32>,
}

/// How an upgrade ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeResult {
    /// The new generation is serving.
    Succeeded,
    /// The new generation failed; the previous one keeps serving.
    RolledBack,
    /// Nothing was started (invalid config, listener unavailable, stopping).
    Refused,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeOutcome {
    /// The generation that was started, if one was.
    pub generation: Option<u64>,
    pub result: UpgradeResult,
    pub reason: Option<String>,
    pub at: String,
    /// Set when the upgrade ran a canary: how it was decided, with both generations'
    /// figures over the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryVerdict>,
}

impl UpgradeOutcome {
    pub fn describe(&self) -> String {
        match (self.result, self.generation, &self.reason) {
            (UpgradeResult::Succeeded, Some(n), Some(r)) => {
                format!("succeeded: {r}; generation {n} is serving")
            }
            (UpgradeResult::Succeeded, Some(n), None) => {
                format!("succeeded: generation {n} is serving")
            }
            (UpgradeResult::RolledBack, Some(n), Some(r)) => {
                format!("failed: generation {n} was rolled back: {r}")
            }
            (UpgradeResult::Refused, _, Some(r)) => format!("refused: {r}"),
            (result, n, r) => format!(
                "{result:?} (generation {n:?}): {}",
                r.as_deref().unwrap_or("")
            ),
        }
    }
}

/// RFC 3339 time of `t`, to the second.
pub fn timestamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl StatusReport {
    /// The human-readable form printed by `baton status`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let s = &self.supervisor;
        let _ = writeln!(
            out,
            "baton supervisor pid {} ({}), since {}, config {}",
            s.pid, s.state, s.started_at, s.config
        );
        if !s.version.is_empty() {
            let _ = writeln!(
                out,
                "supervisor {} (sha256 {}) from {}, image since {}{}",
                s.version,
                &s.sha256[..s.sha256.len().min(12)],
                s.binary,
                s.image_started_at,
                match s.reexecs {
                    0 => String::new(),
                    n => format!(", upgraded in place {n} time(s)"),
                }
            );
        }
        for l in &self.listeners {
            let _ = writeln!(
                out,
                "listener {:<12} {} ({}, {} fd{})",
                l.name,
                l.address,
                l.origin,
                l.fds,
                if l.certificates.is_empty() {
                    ""
                } else {
                    ", TLS"
                }
            );
            for c in &l.certificates {
                let _ = writeln!(
                    out,
                    "  certificate {} [{}] sha256 {} until {} ({} day(s) left{})",
                    c.subject,
                    c.names.join(", "),
                    &c.sha256[..c.sha256.len().min(16)],
                    c.not_after,
                    c.days_left,
                    if c.expires_soon { ", EXPIRES SOON" } else { "" }
                );
            }
        }
        for g in &self.generations {
            let _ = writeln!(
                out,
                "generation {:<4} {:<9} since {} ({}s)  pids {:?}  restarts {}  connections {} ({} idle)  requests {}{}",
                g.number,
                g.state,
                g.started_at,
                g.uptime_secs,
                g.pids,
                g.restarts,
                g.connections,
                g.idle,
                g.requests,
                if g.websockets + g.streams > 0 {
                    format!("  websockets {}  streams {}", g.websockets, g.streams)
                } else {
                    String::new()
                }
            );
            for w in &g.workers {
                let backoff = w
                    .restart_in_ms
                    .map(|ms| format!(" in {ms}ms"))
                    .unwrap_or_default();
                let pid = w.pid.map_or("-".into(), |p| p.to_string());
                let figures = w
                    .stats_age_ms
                    .map(|ms| {
                        format!(
                            "  connections {} requests {} (reported {ms} ms ago)",
                            w.connections, w.requests
                        )
                    })
                    .unwrap_or_default();
                let build = match (&w.version, w.protocol) {
                    (Some(v), Some(p)) => format!("  baton-worker {v} (protocol {p})"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  worker {} pid {pid:<8} {}{backoff}  restarts {}{figures}{build}",
                    w.slot, w.state, w.restarts
                );
            }
            for p in &g.plugins {
                let _ = writeln!(
                    out,
                    "  plugin {} sha256 {}",
                    p.file,
                    &p.sha256[..p.sha256.len().min(16)]
                );
            }
            if let Some(c) = &g.canary {
                let _ = writeln!(
                    out,
                    "  canary until {} (in {} ms{}): {} against {} for generation {}",
                    c.ends_at,
                    c.ends_in_ms,
                    if c.extended { ", extended" } else { "" },
                    c.canary.describe(),
                    c.baseline.describe(),
                    c.baseline.generation
                );
            }
            if let Some(f) = &g.failure {
                let _ = writeln!(out, "  failure: {f}");
            }
        }
        if s.upgrade_pending {
            let _ = writeln!(out, "an upgrade is pending");
        }
        match &self.last_upgrade {
            Some(u) => {
                let _ = writeln!(out, "last upgrade at {}: {}", u.at, u.describe());
            }
            None => {
                let _ = writeln!(out, "no upgrade yet");
            }
        }
        out
    }
}
