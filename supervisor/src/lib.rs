//! Baton's supervisor: holds the listening sockets, runs generations of `baton-worker`
//! processes on them, and replaces one generation with the next without dropping a
//! connection. The binary `baton` is a thin wrapper around [`commands::main`].
//!
//! No `unsafe` here: the system calls that need it are `baton_sys`'s.
//!
//! Errors: each concern returns its own `thiserror` enum (`config::ConfigError`,
//! `listeners::ListenerError`, `trust::TrustError`, `artifacts::CacheError` and
//! `WorkerBinaryError`, `plugins::PluginError`, `spawn::SpawnError`, `tls::TlsError`) whose variants carry
//! the data and whose `#[error]` is the whole message a user reads, cause included. So a
//! cause is kept as a field, never also as `source()`: `{:#}` prints it once. Only the
//! commands use `anyhow`; the supervisor hands the core a message where it crosses into it.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod commands;
pub mod config;
pub mod control;
pub mod core;
pub mod events;
pub mod fuzzing;
pub mod generation;
pub mod handover;
pub mod listeners;
pub mod metrics;
pub mod notify;
pub mod plugins;
pub mod release;
pub mod spawn;
pub mod status;
pub mod supervisor;
pub mod tls;
pub mod trust;
pub mod watch;
