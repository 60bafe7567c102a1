//! The host's function table as the 1.1 types use it: copied once, at `init`, into this
//! plugin's own static, so that a [`crate::Stream`], [`crate::Body`] or
//! [`crate::WsHandle`] holds nothing but a handle number and never points into memory
//! that could go away. Never dereferences a handle: the host checks every number (an
//! ended or unknown one answers [`abi::BATON_E_CLOSED`]).

use crate::abi::{self, BatonHostApi, BatonStr};
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

static HOST: OnceLock<BatonHostApi> = OnceLock::new();

/// Keeps a copy of the host's table if it has every 1.1 function (a host that loaded a
/// 1.1 plugin has them; a smaller table leaves the 1.1 types answering "closed").
///
/// # Safety
/// `host` must be null or point to a host table of at least its `struct_size` bytes.
pub(crate) unsafe fn remember(host: *const BatonHostApi) {
    if host.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `struct_size` is readable (it is the first field).
    let size = unsafe { (*host).struct_size } as usize;
    if size >= std::mem::size_of::<BatonHostApi>() {
        // SAFETY: the table has all of our fields; it is plain data (function pointers).
        let table = unsafe { host.read_unaligned() };
        let _ = HOST.set(table);
    }
}

/// The host's table, once `init` ran on a 1.1 host.
pub(crate) fn table() -> Option<&'static BatonHostApi> {
    HOST.get()
}

/// A borrowed view of `bytes` for one call.
pub(crate) fn view(bytes: &[u8]) -> BatonStr {
    BatonStr::new(bytes)
}

/// The boxed callback of `stream_on_writable` / `body_on_readable`: a thin pointer to a
/// `Box<dyn FnOnce()>`, made by [`into_user`] and freed by [`notify`] (or by
/// [`free_user`] when the host refused it), so exactly once.
type Callback = Box<dyn FnOnce() + Send + 'static>;

pub(crate) fn into_user(f: Callback) -> *mut c_void {
    Box::into_raw(Box::new(f)).cast()
}

/// Frees a callback the host refused to take, without running it.
///
/// # Safety
/// `user` must come from [`into_user`] and not have been passed to the host successfully.
pub(crate) unsafe fn free_user(user: *mut c_void) {
    // SAFETY: per the caller, we still own it.
    drop(unsafe { Box::from_raw(user.cast::<Callback>()) });
}

/// The [`abi::NotifyFn`] the SDK registers: runs the boxed callback once and frees it.
/// A panic in it is caught (and whatever it owned is dropped on the way).
pub(crate) unsafe extern "C" fn notify(user: *mut c_void, _handle: abi::BatonHandle) {
    if user.is_null() {
        return;
    }
    // SAFETY: `user` came from `into_user` and the host calls a notification once.
    let f = unsafe { Box::from_raw(user.cast::<Callback>()) };
    let _ = catch_unwind(AssertUnwindSafe(f));
}
