//! slotfork's `slots` module: a slot-partitioned keyspace for a stock
//! redis-server (7.0+, Valkey 8), with an exact per-slot key index.
//!
//! Where things live:
//! - `slot.rs`: the slot functions (crc32/1024 and crc16/16384, hash tags)
//! - `keyset.rs`: the compact per-slot key set (incremental rehash, scan)
//! - `index.rs`: the per-database index (full or counts-only)
//! - `events.rs`: keyspace and server events that keep the index exact
//! - `rebuild.rs`: rebuilding the index from the keyspace after a load
//! - `state.rs`: global state and its lock discipline
//! - `commands/`: the SLOTS.* commands
//! - migration (MIGRATION.md): `serializer.rs` (key -> records), `wire.rs`
//!   (batch format, validation), `restore.rs` (target side), `tracking.rs`
//!   (changed keys), `redirect.rs` (-ASK/-TRYAGAIN), `transport.rs`
//!   (connection threads), `migrate_job.rs` (the job)
//! - `call.rs`: calling server commands and reading their replies
//! - `del_job.rs`, `keys_job.rs`, `cron.rs`: incremental background work
//! - `config.rs`, `info.rs`: module configs and the INFO section
//! - `valkey_db_fix.rs`: workaround for Valkey 8.1 leaving clients on the wrong db
//! - `ffi.rs`: safe wrappers over raw module API calls, the panic guard
//! - `registration.rs`: the module's entry point (commands, configs, init)
//! - `alloc.rs`: the global allocator (the server's, including calloc/realloc)

#[cfg(not(test))]
mod alloc;
pub mod call;
pub mod commands;
pub mod config;
pub mod cron;
pub mod del_job;
pub mod events;
pub mod ffi;
pub mod index;
pub mod info;
pub mod keys_job;
pub mod keyset;
pub mod migrate_job;
pub mod rebuild;
pub mod redirect;
// The crate's allocator aborts outside a server, so unit tests (which run
// without one) leave the registration, and with it the allocator, out.
#[cfg(not(test))]
mod registration;
pub mod restore;
pub mod serializer;
pub mod slot;
pub mod state;
pub mod tracking;
pub mod transport;
pub mod valkey_db_fix;
pub mod wire;
