//! The plugin ABI, version 1: `#[repr(C)]` types mirrored one to one by
//! `include/baton_plugin.h`.
//!
//! Rules that keep it stable:
//! - A plugin exports one symbol, [`ENTRY_POINT`], an [`EntryFn`] returning a pointer to a
//!   [`BatonPluginV1`] that lives as long as the library is loaded.
//! - The descriptor starts with `magic`, `abi_major`, `abi_minor`, `struct_size`; the host
//!   checks them before it reads anything else. `abi_major` must equal the host's,
//!   `abi_minor` must not exceed it, and the host never reads past `struct_size`.
//! - Minor versions only ever append fields (to the descriptor, [`BatonRequest`],
//!   [`BatonHostApi`] and [`BatonInit`]); every appended-to struct carries its own
//!   `struct_size` for that reason.
//! - Nothing Rust-specific crosses: strings and bytes are borrowed pointer + length views
//!   ([`BatonStr`]), valid only during the call they are passed to; responses are built
//!   through the host's function table, so no memory is ever freed by the other side's
//!   allocator; a panic never unwinds across the boundary.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};

/// The descriptor's magic number: the bytes `BATONPL1` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BATONPL1");
/// The ABI major version; a plugin built for another major is refused.
pub const ABI_MAJOR: u32 = 1;
/// The ABI minor version; a plugin built for a newer minor is refused.
pub const ABI_MINOR: u32 = 0;
/// The exported symbol's name, NUL-terminated.
pub const ENTRY_POINT: &[u8] = b"baton_plugin_v1\0";

/// `flags` bit: every handler of the plugin returns quickly without blocking, so the host
/// runs it inline on its async runtime. Without it, handlers run on a bounded blocking pool.
pub const FLAG_NONBLOCKING: u32 = 1;

/// HTTP method bits for [`BatonRoute::methods`].
pub mod method {
    /// `GET` (a route with `GET` also answers `HEAD`).
    pub const GET: u32 = 1 << 0;
    /// `HEAD`.
    pub const HEAD: u32 = 1 << 1;
    /// `POST`.
    pub const POST: u32 = 1 << 2;
    /// `PUT`.
    pub const PUT: u32 = 1 << 3;
    /// `DELETE`.
    pub const DELETE: u32 = 1 << 4;
    /// `PATCH`.
    pub const PATCH: u32 = 1 << 5;
    /// `OPTIONS`.
    pub const OPTIONS: u32 = 1 << 6;
    /// Every method above.
    pub const ALL: u32 = (1 << 7) - 1;

    /// The methods and their names, in bit order.
    pub const NAMES: [(u32, &str); 7] = [
        (GET, "GET"),
        (HEAD, "HEAD"),
        (POST, "POST"),
        (PUT, "PUT"),
        (DELETE, "DELETE"),
        (PATCH, "PATCH"),
        (OPTIONS, "OPTIONS"),
    ];

    /// The bit for a method name, if it is one of the above.
    pub fn bit(name: &str) -> Option<u32> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }
}

/// A borrowed view of bytes (UTF-8 where the field says so). `ptr` may be null only when
/// `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonStr {
    /// First byte.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl BatonStr {
    /// A view of `bytes`, valid as long as they are.
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// The bytes viewed.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`
    /// (or `len` must be 0).
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// One request header: lower-case name (UTF-8) and value (bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonHeader {
    /// Lower-case header name.
    pub name: BatonStr,
    /// Header value, as received.
    pub value: BatonStr,
}

/// One named path parameter, e.g. `name` in `/hello/{name}` (both UTF-8).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonParam {
    /// Parameter name, as in the route pattern.
    pub name: BatonStr,
    /// The matched, still percent-encoded, path segment.
    pub value: BatonStr,
}

/// A route a plugin serves.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonRoute {
    /// [`method`] bits.
    pub methods: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// NUL-terminated UTF-8 path pattern: `/hello`, `/hello/{name}`, `/files/{*rest}`.
    pub path: *const c_char,
}

/// A request, borrowed for the duration of one `handle` call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonRequest {
    /// `size_of::<BatonRequest>()` as the host built it.
    pub struct_size: u32,
    /// Index of the matched route in the plugin's route table.
    pub route: u32,
    /// Method (UTF-8, upper case).
    pub method: BatonStr,
    /// Path, without the query (UTF-8, still percent-encoded).
    pub path: BatonStr,
    /// Query string without `?`, empty if none.
    pub query: BatonStr,
    /// Headers, in the order received.
    pub headers: *const BatonHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// Path parameters of the matched route.
    pub params: *const BatonParam,
    /// Number of path parameters.
    pub params_len: usize,
    /// The whole request body (at most `http.max_body_bytes`).
    pub body: BatonStr,
    /// The generation of the worker serving the request.
    pub generation: u64,
    /// The pid of the worker serving the request.
    pub worker_pid: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// Opaque: a response under construction, owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct BatonResponse {
    _private: [u8; 0],
}

/// Opaque: where `init` reports why it failed, owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct BatonError {
    _private: [u8; 0],
}

/// Functions the host provides. Each returns 0 on success and a negative number when the
/// arguments were refused (the response is then answered with 500).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonHostApi {
    /// `size_of::<BatonHostApi>()` as the host built it.
    pub struct_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Sets the status code (100–999; default 200).
    pub set_status: unsafe extern "C" fn(response: *mut BatonResponse, status: u16) -> i32,
    /// Appends a header (the name must be a valid header name, the value a valid value).
    pub add_header:
        unsafe extern "C" fn(response: *mut BatonResponse, name: BatonStr, value: BatonStr) -> i32,
    /// Appends bytes to the body.
    pub write_body: unsafe extern "C" fn(response: *mut BatonResponse, data: BatonStr) -> i32,
    /// Fails the request: the host answers 500 and logs `message`.
    pub fail: unsafe extern "C" fn(response: *mut BatonResponse, message: BatonStr),
    /// Reports why `init` failed (call before returning non-zero from `init`).
    pub set_error: unsafe extern "C" fn(error: *mut BatonError, message: BatonStr),
}

/// What `init` gets.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonInit {
    /// `size_of::<BatonInit>()` as the host built it.
    pub struct_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The host's functions (also passed to every `handle` call).
    pub host: *const BatonHostApi,
    /// The plugin's `[plugins.settings.NAME]` table as a JSON object (`{}` if none).
    pub settings_json: BatonStr,
    /// The generation being started.
    pub generation: u64,
    /// The worker's pid.
    pub worker_pid: u32,
    /// Reserved, zero.
    pub reserved2: u32,
    /// Pass to `host->set_error`.
    pub error: *mut BatonError,
}

/// Called once per worker, before it serves. Returns 0 and sets `*state` (passed to
/// `handle` and `shutdown`; may be null), or non-zero after `host->set_error`.
pub type InitFn = unsafe extern "C" fn(init: *const BatonInit, state: *mut *mut c_void) -> i32;
/// Handles one request. May be called from several threads at once. Returns 0, or
/// non-zero for a 500.
pub type HandleFn = unsafe extern "C" fn(
    state: *mut c_void,
    request: *const BatonRequest,
    host: *const BatonHostApi,
    response: *mut BatonResponse,
) -> i32;
/// Called once when the worker has drained, before it exits.
pub type ShutdownFn = unsafe extern "C" fn(state: *mut c_void);

/// The plugin descriptor, version 1.0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonPluginV1 {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`ABI_MAJOR`] the plugin was built for.
    pub abi_major: u32,
    /// [`ABI_MINOR`] the plugin was built for.
    pub abi_minor: u32,
    /// `size_of::<BatonPluginV1>()` as the plugin built it.
    pub struct_size: u32,
    /// [`FLAG_NONBLOCKING`] or 0.
    pub flags: u32,
    /// NUL-terminated UTF-8 name: `[A-Za-z0-9_-]+`; `[plugins.settings.NAME]` is its table.
    pub name: *const c_char,
    /// NUL-terminated UTF-8 version.
    pub version: *const c_char,
    /// The route table.
    pub routes: *const BatonRoute,
    /// Number of routes.
    pub routes_len: usize,
    /// Required.
    pub init: Option<InitFn>,
    /// Required.
    pub handle: Option<HandleFn>,
    /// Required (may do nothing).
    pub shutdown: Option<ShutdownFn>,
}

/// The type of [`ENTRY_POINT`].
pub type EntryFn = unsafe extern "C" fn() -> *const BatonPluginV1;

/// The fields every version has, read before anything else.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonPluginHead {
    /// See [`BatonPluginV1::magic`].
    pub magic: u64,
    /// See [`BatonPluginV1::abi_major`].
    pub abi_major: u32,
    /// See [`BatonPluginV1::abi_minor`].
    pub abi_minor: u32,
    /// See [`BatonPluginV1::struct_size`].
    pub struct_size: u32,
}

// Layout assertions: these sizes and offsets are the ABI (x86_64 and aarch64 Linux); the
// C header asserts the same numbers, and a test compiles it to prove they agree.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<BatonStr>() == 16);
    assert!(size_of::<BatonHeader>() == 32);
    assert!(size_of::<BatonParam>() == 32);
    assert!(size_of::<BatonRoute>() == 16);
    assert!(offset_of!(BatonRoute, path) == 8);
    assert!(size_of::<BatonRequest>() == 120);
    assert!(offset_of!(BatonRequest, method) == 8);
    assert!(offset_of!(BatonRequest, headers) == 56);
    assert!(offset_of!(BatonRequest, params) == 72);
    assert!(offset_of!(BatonRequest, body) == 88);
    assert!(offset_of!(BatonRequest, generation) == 104);
    assert!(offset_of!(BatonRequest, worker_pid) == 112);
    assert!(size_of::<BatonHostApi>() == 48);
    assert!(offset_of!(BatonHostApi, set_error) == 40);
    assert!(size_of::<BatonInit>() == 56);
    assert!(offset_of!(BatonInit, settings_json) == 16);
    assert!(offset_of!(BatonInit, error) == 48);
    assert!(size_of::<BatonPluginHead>() == 24);
    assert!(offset_of!(BatonPluginV1, struct_size) == 16);
    assert!(offset_of!(BatonPluginV1, name) == 24);
    assert!(offset_of!(BatonPluginV1, routes_len) == 48);
    assert!(offset_of!(BatonPluginV1, init) == 56);
    assert!(offset_of!(BatonPluginV1, shutdown) == 72);
    assert!(size_of::<BatonPluginV1>() == 80);
};
