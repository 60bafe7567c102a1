//! The supervisor's few system calls that `nix` does not wrap, from `baton_sys`: whether a
//! file has writers (a read lease) and handing free heap memory back to the kernel. The
//! `unsafe` they need lives in `baton_sys`, not here.

pub use baton_sys::lease::{Writers, writers};
pub use baton_sys::memory::release_free_memory;
