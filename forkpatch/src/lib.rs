//! forkpatch: an async-fork engine for a stock Linux kernel.
//!
//! The heap lives in a memfd mapped shared at a 1 GiB-aligned reserve. A
//! snapshot ("fork") moves the heap's page tables away in O(1), maps the
//! memfd privately in their place and forks: the child sees the frozen
//! memfd, the parent copies-on-write into private pages (the overlay).
//! After the child exits, a background fold copies the overlay back into
//! the memfd while tracking concurrent writes with userfaultfd
//! write-protection, and flips the heap back to a shared mapping in a short
//! final step. See `DESIGN.md`.
//!
//! The C ABI lives in [`ffi`] and is declared in `include/forkpatch.h`.

mod engine;
pub mod ffi;
mod sys;

pub use engine::{
    Config, Disabled, Engine, FaultInjection, Forked, Stats, STATE_DEGRADED, STATE_FOLDING,
    STATE_IDLE, STATE_SNAPSHOT, STATE_STOCK, STATE_SWITCHING,
};
