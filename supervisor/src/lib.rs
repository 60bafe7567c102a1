//! Baton's supervisor: holds the listening sockets, runs generations of `baton-worker`
//! processes on them, and replaces one generation with the next without dropping a
//! connection. The binary `baton` is a thin wrapper around [`commands::main`].
//!
//! No `unsafe` here: the system calls that need it are `baton_sys`'s.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod commands;
pub mod config;
pub mod control;
pub mod core;
pub mod events;
pub mod fuzzing;
pub mod generation;
pub mod listeners;
pub mod notify;
pub mod plugins;
pub mod spawn;
pub mod status;
pub mod supervisor;
pub mod trust;
pub mod watch;
