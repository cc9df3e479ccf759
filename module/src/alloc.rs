//! The module's global allocator: the server's allocator (RedisModule_Alloc
//! and friends), so the index is counted in `used_memory` and `maxmemory`.
//!
//! The crate's `RedisAlloc` only implements alloc and free; Rust's defaults
//! then zero a `calloc`-style request by writing every byte, and grow by
//! alloc + copy + free. For a slot's bucket array of millions of entries
//! that zeroing is tens of milliseconds of touched pages on the main
//! thread, where the server's calloc (jemalloc) hands out fresh zero pages
//! for free. So zeroed allocation and realloc go to the server too.

use std::alloc::{GlobalAlloc, Layout};
use std::os::raw::c_void;

use redis_module::raw;

pub struct ServerAlloc;

/// Both allocators the server can be built with (jemalloc, libc) return
/// memory aligned to at least 16 bytes for every request.
const SERVER_ALIGN: usize = 16;

fn rounded(layout: Layout) -> usize {
    // As the crate does: a size that is a multiple of the alignment gets an
    // aligned block from jemalloc's size classes.
    (layout.size() + layout.align() - 1) & !(layout.align() - 1)
}

fn api<T>(f: Option<T>) -> T {
    match f {
        Some(f) => f,
        // Only possible before RedisModule_Init; nothing allocates then.
        None => std::process::abort(),
    }
}

unsafe impl GlobalAlloc for ServerAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the API pointer is set by RedisModule_Init before any of
        // our code runs; the size is non-zero (GlobalAlloc contract).
        unsafe { api(raw::RedisModule_Alloc)(rounded(layout)).cast() }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe { api(raw::RedisModule_Calloc)(1, rounded(layout)).cast() }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from one of the functions above.
        unsafe { api(raw::RedisModule_Free)(ptr.cast::<c_void>()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() > SERVER_ALIGN {
            // SAFETY: the default implementation keeps the alignment.
            let new =
                unsafe { self.alloc(Layout::from_size_align_unchecked(new_size, layout.align())) };
            if !new.is_null() {
                // SAFETY: both blocks are valid for min(old, new) bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
            }
            return new;
        }
        // SAFETY: `ptr` came from this allocator; the server's realloc keeps
        // its (16-byte) alignment.
        unsafe { api(raw::RedisModule_Realloc)(ptr.cast::<c_void>(), new_size).cast() }
    }
}
