//! Prefetching a value's cache lines (`prefetcht0`).
#![allow(unsafe_code)]

/// Asks the CPU to bring all of `value`'s cache lines into its caches at once, so that the
/// code about to read them one after another (each read waiting for the last, through
/// pointers) waits for memory once instead of once per line. A hint: it reads nothing,
/// changes nothing, and cannot fault; elsewhere than on x86-64 it does nothing.
#[inline]
pub fn prefetch<T>(value: &T) {
    prefetch_at(std::ptr::from_ref(value).addr(), size_of::<T>());
}

/// Asks the CPU to bring the cache lines of the `len` bytes at `address` into its caches.
/// The address need not be valid (a prefetch never faults), so a buffer that may have
/// been freed since is fine: the hint is then merely wasted.
#[inline]
pub fn prefetch_at(address: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        for offset in (0..len).step_by(64) {
            let line = std::ptr::without_provenance::<i8>(address.wrapping_add(offset));
            // SAFETY: `_mm_prefetch` needs SSE, which every x86-64 CPU has (it is in the
            // target's baseline); a prefetch never faults, whatever the address, and
            // nothing is read or written through it.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (address, len);
}
