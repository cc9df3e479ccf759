//! The target side of a migration: applying a validated batch
//! (MIGRATION.md, "Wire protocol").
//!
//! Whole keys are restored with RESTORE ... REPLACE ABSTTL, exactly what the
//! source's DUMP produced. A big key arrives in chunks and is assembled under
//! a staging name, `slotfork:staging:<source-id>:<key>`, that carries a safety
//! expiry; COMMIT renames it onto the real name in one step. So the real name
//! never shows a half-built value, and a transfer abandoned for any reason
//! (source gone, job cancelled, target restarted) leaves nothing behind once
//! the staging key expires.
//!
//! Retried batches must give the same result. Whole keys and hash/set/zset
//! chunks are naturally idempotent; list, string and stream chunks carry the
//! offset they start at, and the staging key's length tells whether the
//! chunk is new (length == offset), a duplicate (length == offset + count)
//! or out of step (anything else: the source restarts the key).
//!
//! Every write goes through RM_Call with propagation, so the target's
//! replicas and AOF receive the batch as one MULTI/EXEC. Deletes are
//! UNLINKs: a big value (a staging key of millions of elements) is freed by
//! the lazyfree thread, not inside the batch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::call::{call, call_ok, Propagate, Reply};
use crate::ffi::{Ctx, Key, KeyType};
use crate::serializer::kind_of;
use crate::wire::{Batch, Kind, Lru, Record};

/// How long an untouched staging key lives. Every chunk refreshes it.
pub const STAGING_TTL_MS: i64 = 10 * 60 * 1000;

pub const STAGING_PREFIX: &[u8] = b"slotfork:staging:";

/// Outcome of one record, as replied to the source.
#[derive(Debug, PartialEq, Eq, Clone)]
pub enum Outcome {
    Applied,
    /// Nothing to do: duplicate chunk, or an already expired key.
    Noop,
    /// The staging key is missing or out of step: resend the key.
    Restart,
    /// The server refused a write (e.g. out of memory mid-batch).
    Failed(String),
}

impl Outcome {
    pub fn code(&self) -> i64 {
        match self {
            Outcome::Applied => 1,
            Outcome::Noop => 0,
            Outcome::Restart => -1,
            Outcome::Failed(_) => -2,
        }
    }
}

/// Target-side counters for INFO (main thread only; atomics for Sync).
static BATCHES: AtomicU64 = AtomicU64::new(0);
static RECORDS: AtomicU64 = AtomicU64::new(0);
static REJECTED: AtomicU64 = AtomicU64::new(0);
static RESTARTS: AtomicU64 = AtomicU64::new(0);

/// Counts a batch refused by validation.
pub fn note_rejected() {
    REJECTED.fetch_add(1, Ordering::Relaxed);
}

pub fn info_fields() -> Vec<(&'static str, String)> {
    let v = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
    vec![
        ("restore_batches", v(&BATCHES)),
        ("restore_records", v(&RECORDS)),
        ("restore_rejected_batches", v(&REJECTED)),
        ("restore_restarts", v(&RESTARTS)),
    ]
}

pub fn staging_name(source: &[u8], key: &[u8]) -> Vec<u8> {
    let mut n = Vec::with_capacity(STAGING_PREFIX.len() + source.len() + 1 + key.len());
    n.extend_from_slice(STAGING_PREFIX);
    n.extend_from_slice(source);
    n.push(b':');
    n.extend_from_slice(key);
    n
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The staging key's kind and length, if it exists.
fn staging_state(ctx: Ctx, name: &[u8]) -> Option<(Option<Kind>, u64)> {
    let k = Key::open(ctx, name, false);
    match k.key_type() {
        KeyType::Empty => None,
        t => Some((kind_of(t), k.len())),
    }
}

fn write(ctx: Ctx, cmd: &str, args: &[&[u8]]) -> Result<Reply, String> {
    call_ok(ctx, Propagate::Yes, cmd, args)
}

fn int_arg(v: i64) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// Applies every record of `batch` in order, returning one outcome each.
pub fn apply(ctx: Ctx, batch: &Batch) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(batch.records.len());
    for rec in &batch.records {
        let o = match apply_one(ctx, batch.source, rec) {
            Ok(o) => o,
            Err(e) => Outcome::Failed(e),
        };
        if o == Outcome::Restart {
            RESTARTS.fetch_add(1, Ordering::Relaxed);
        }
        out.push(o);
    }
    BATCHES.fetch_add(1, Ordering::Relaxed);
    RECORDS.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
    out
}

fn apply_one(ctx: Ctx, source: &[u8], rec: &Record) -> Result<Outcome, String> {
    match rec {
        Record::Dump {
            key,
            expire_ms,
            lru,
            payload,
        } => {
            let ttl = int_arg(*expire_ms);
            let mut args: Vec<&[u8]> = vec![key, &ttl, payload, b"REPLACE", b"ABSTTL"];
            let lru_val;
            match lru {
                Lru::None => {}
                Lru::Idle(s) => {
                    lru_val = int_arg(*s as i64);
                    args.extend_from_slice(&[b"IDLETIME", &lru_val]);
                }
                Lru::Freq(f) => {
                    lru_val = int_arg(*f as i64);
                    args.extend_from_slice(&[b"FREQ", &lru_val]);
                }
            }
            // An expiry in the past: RESTORE deletes an existing key and
            // creates nothing, which is what the source's copy means.
            write(ctx, "RESTORE", &args)?;
            Ok(if *expire_ms != 0 && *expire_ms <= now_ms() {
                Outcome::Noop
            } else {
                Outcome::Applied
            })
        }
        Record::Chunk {
            key,
            kind,
            offset,
            count,
            args,
        } => {
            let stage = staging_name(source, key);
            if *offset == 0 {
                write(ctx, "UNLINK", &[&stage])?;
            } else {
                let Some((k, len)) = staging_state(ctx, &stage) else {
                    return Ok(Outcome::Restart);
                };
                if k != Some(*kind) {
                    return Ok(Outcome::Restart);
                }
                let added = match kind {
                    Kind::String => args[0].len() as u64,
                    _ => *count,
                };
                match kind {
                    Kind::List | Kind::String | Kind::Stream => {
                        if len == offset + added {
                            return Ok(Outcome::Noop);
                        }
                        if len != *offset {
                            return Ok(Outcome::Restart);
                        }
                    }
                    // Set-like: re-adding is harmless; COMMIT checks the size.
                    _ => {}
                }
            }
            let applied = apply_chunk(ctx, &stage, *kind, args);
            // Also when the chunk failed half-way (a stream chunk is one
            // XADD per entry): whatever it created must still expire.
            let ttl = int_arg(STAGING_TTL_MS);
            let expiring = write(ctx, "PEXPIRE", &[&stage, &ttl]);
            applied?;
            expiring?;
            Ok(Outcome::Applied)
        }
        Record::Group {
            key,
            group,
            last_id,
            entries_read,
        } => {
            let stage = staging_name(source, key);
            if staging_state(ctx, &stage).map(|s| s.0) != Some(Some(Kind::Stream)) {
                return Ok(Outcome::Restart);
            }
            let id = last_id.to_string();
            let er = int_arg(*entries_read);
            let r = call(
                ctx,
                Propagate::Yes,
                "XGROUP",
                &[b"CREATE", &stage, group, id.as_bytes(), b"ENTRIESREAD", &er],
            )?;
            if r.view().is_error() {
                // BUSYGROUP on a retried batch: set the same position.
                write(
                    ctx,
                    "XGROUP",
                    &[b"SETID", &stage, group, id.as_bytes(), b"ENTRIESREAD", &er],
                )?;
            }
            Ok(Outcome::Applied)
        }
        Record::Consumer {
            key,
            group,
            consumer,
        } => {
            let stage = staging_name(source, key);
            if staging_state(ctx, &stage).map(|s| s.0) != Some(Some(Kind::Stream)) {
                return Ok(Outcome::Restart);
            }
            write(ctx, "XGROUP", &[b"CREATECONSUMER", &stage, group, consumer])?;
            Ok(Outcome::Applied)
        }
        Record::Pending {
            key,
            group,
            entries,
        } => {
            let stage = staging_name(source, key);
            if staging_state(ctx, &stage).map(|s| s.0) != Some(Some(Kind::Stream)) {
                return Ok(Outcome::Restart);
            }
            for p in entries {
                let id = p.id.to_string();
                let idle = int_arg(p.idle_ms as i64);
                let n = int_arg(p.deliveries as i64);
                // FORCE creates the PEL entry for this consumer; JUSTID keeps
                // the delivery counter at RETRYCOUNT instead of bumping it.
                write(
                    ctx,
                    "XCLAIM",
                    &[
                        &stage,
                        group,
                        p.consumer,
                        b"0",
                        id.as_bytes(),
                        b"IDLE",
                        &idle,
                        b"RETRYCOUNT",
                        &n,
                        b"FORCE",
                        b"JUSTID",
                    ],
                )?;
            }
            Ok(Outcome::Applied)
        }
        Record::StreamMeta {
            key,
            last_id,
            entries_added,
            max_deleted,
        } => {
            let stage = staging_name(source, key);
            if staging_state(ctx, &stage).map(|s| s.0) != Some(Some(Kind::Stream)) {
                return Ok(Outcome::Restart);
            }
            let last = last_id.to_string();
            let added = int_arg(*entries_added as i64);
            let maxdel = max_deleted.to_string();
            write(
                ctx,
                "XSETID",
                &[
                    &stage,
                    last.as_bytes(),
                    b"ENTRIESADDED",
                    &added,
                    b"MAXDELETEDID",
                    maxdel.as_bytes(),
                ],
            )?;
            Ok(Outcome::Applied)
        }
        Record::Commit {
            key,
            kind,
            length,
            expire_ms,
            lru,
        } => {
            let stage = staging_name(source, key);
            match staging_state(ctx, &stage) {
                Some((Some(k), len)) if k == *kind && len == *length => {}
                _ => return Ok(Outcome::Restart),
            }
            // RENAME would free a replaced value inline; a big one (say, an
            // older copy of this key) is handed to the lazyfree thread first.
            write(ctx, "UNLINK", &[key])?;
            write(ctx, "RENAME", &[&stage, key])?;
            if *expire_ms == 0 {
                write(ctx, "PERSIST", &[key])?;
            } else if *expire_ms <= now_ms() {
                write(ctx, "UNLINK", &[key])?;
                return Ok(Outcome::Noop);
            } else {
                write(ctx, "PEXPIREAT", &[key, &int_arg(*expire_ms)])?;
            }
            let k = Key::open(ctx, key, true);
            match lru {
                Lru::None => {}
                Lru::Idle(s) => k.set_lru_idle_ms((*s as i64).saturating_mul(1000)),
                Lru::Freq(f) => k.set_lfu(*f as i64),
            }
            Ok(Outcome::Applied)
        }
        Record::XDel { key, ids } => {
            let stage = staging_name(source, key);
            if staging_state(ctx, &stage).map(|s| s.0) != Some(Some(Kind::Stream)) {
                return Ok(Outcome::Restart);
            }
            let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            let mut args: Vec<&[u8]> = vec![&stage];
            args.extend(ids.iter().map(|i| i.as_bytes()));
            write(ctx, "XDEL", &args)?;
            Ok(Outcome::Applied)
        }
        Record::Del { key } => {
            write(ctx, "UNLINK", &[key])?;
            Ok(Outcome::Applied)
        }
        Record::FieldTtl { key, fields } => {
            let stage = staging_name(source, key);
            if staging_state(ctx, &stage).map(|s| s.0) != Some(Some(Kind::Hash)) {
                return Ok(Outcome::Restart);
            }
            // One HPEXPIREAT per distinct time (fields of one chunk often
            // share it). A time already past deletes the field, as on the
            // source, where its expiry then restarts the key anyway.
            let mut by_time: std::collections::BTreeMap<i64, Vec<&[u8]>> =
                std::collections::BTreeMap::new();
            for (f, at) in fields {
                by_time.entry(*at).or_default().push(f);
            }
            for (at, fs) in by_time {
                let at = int_arg(at);
                let n = int_arg(fs.len() as i64);
                let mut args: Vec<&[u8]> = vec![&stage, &at, b"FIELDS", &n];
                args.extend(fs);
                write(ctx, "HPEXPIREAT", &args)?;
            }
            Ok(Outcome::Applied)
        }
        Record::Abort { key } => {
            let stage = staging_name(source, key);
            write(ctx, "UNLINK", &[&stage])?;
            Ok(Outcome::Applied)
        }
    }
}

fn apply_chunk(ctx: Ctx, stage: &[u8], kind: Kind, args: &[&[u8]]) -> Result<(), String> {
    let mut v: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
    v.push(stage);
    match kind {
        Kind::String => {
            v.push(args[0]);
            write(ctx, "APPEND", &v)?;
        }
        Kind::List => {
            v.extend_from_slice(args);
            write(ctx, "RPUSH", &v)?;
        }
        Kind::Set => {
            v.extend_from_slice(args);
            write(ctx, "SADD", &v)?;
        }
        Kind::Zset => {
            v.extend_from_slice(args);
            write(ctx, "ZADD", &v)?;
        }
        Kind::Hash => {
            v.extend_from_slice(args);
            write(ctx, "HSET", &v)?;
        }
        Kind::Stream => {
            // Entries: id nfields f v ...; validated by the parser.
            let mut i = 0;
            while i < args.len() {
                let n: usize = std::str::from_utf8(args[i + 1])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let mut e: Vec<&[u8]> = Vec::with_capacity(2 + 2 * n);
                e.push(stage);
                e.push(args[i]);
                e.extend_from_slice(&args[i + 2..i + 2 + 2 * n]);
                write(ctx, "XADD", &e)?;
                i += 2 + 2 * n;
            }
        }
    }
    Ok(())
}
