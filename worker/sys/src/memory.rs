//! Handing the allocator's free memory back to the kernel.
#![allow(unsafe_code)]

/// Hands the heap memory the allocator holds free back to the kernel (`malloc_trim`), so
/// that a process's resident size is what it needs now rather than what its largest piece
/// of work needed. Does nothing where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns the allocator's own free
    // memory to the kernel, and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
