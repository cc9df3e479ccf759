//! Turning one key into migration records (MIGRATION.md), in steps that
//! stay within the step budget whatever the size of the key.
//!
//! A small key is one `DUMP` record: the server's own serialization, exact
//! for every type (module types included) and checked by the target's
//! RESTORE. A key with more than MAXBULKS elements or MAXBYTES bytes would
//! take the main thread too long to DUMP (and the target too long to
//! RESTORE), so it becomes a [`BigKey`] cursor that reads a bounded range of
//! elements per step and emits `CHUNK` records, then, for streams, the
//! consumer groups, their consumers and pending entries, the stream's
//! counters, and finally a `COMMIT` that makes the target publish the value
//! under its real name.
//!
//! A big key must not change while it is read: the job restarts it when
//! tracking (tracking.rs) reports a write, so the cursor only has to handle a
//! key that is stable between steps, or gone.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::call::{call, call_ok, Propagate};
use crate::ffi::{Ctx, Key, KeyType, ScanCursor};
use crate::wire::{BatchBuilder, ChunkArgs, Kind, Lru, StreamId, Target};

/// Per-job size limits (SLOTS.MIGRATE's MAXBULKS and MAXBYTES).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_bulks: u64,
    pub max_bytes: u64,
}

/// The result of starting a key.
pub enum Start {
    /// The key is gone (deleted or expired): nothing was written.
    Gone,
    /// The whole key was written as one DUMP record of `bytes`.
    Whole { bytes: u64 },
    /// The key is big: a cursor that writes it in chunks.
    Big(Box<BigKey>),
}

fn lru_of(k: &Key) -> Lru {
    if let Some(f) = k.lfu() {
        Lru::Freq(f.clamp(0, 255) as u8)
    } else if let Some(ms) = k.lru_idle_ms() {
        Lru::Idle((ms / 1000) as u64)
    } else {
        Lru::None
    }
}

/// The chunkable kind of a stored value (None: module types and others).
pub fn kind_of(t: KeyType) -> Option<Kind> {
    Some(match t {
        KeyType::String => Kind::String,
        KeyType::List => Kind::List,
        KeyType::Set => Kind::Set,
        KeyType::Zset => Kind::Zset,
        KeyType::Hash => Kind::Hash,
        KeyType::Stream => Kind::Stream,
        _ => return None,
    })
}

/// Memory the value uses, as MEMORY USAGE estimates it (sampled, O(1)-ish).
fn memory_usage(ctx: Ctx, key: &[u8]) -> u64 {
    call(
        ctx,
        Propagate::No,
        "MEMORY",
        &[b"USAGE", key, b"SAMPLES", b"5"],
    )
    .map(|r| r.view().integer().max(0) as u64)
    .unwrap_or(0)
}

/// Starts serializing `key` of the selected database: a small key is
/// written to `out` whole; a big one returns a cursor.
pub fn start(
    ctx: Ctx,
    key: &[u8],
    limits: Limits,
    out: &mut BatchBuilder,
) -> Result<Start, String> {
    let (kind, len, expire_ms, lru) = {
        let k = Key::open(ctx, key, false);
        let t = k.key_type();
        if t == KeyType::Empty {
            return Ok(Start::Gone);
        }
        (kind_of(t), k.len(), k.abs_expire(), lru_of(&k))
    };
    let big = match kind {
        Some(Kind::String) => len > limits.max_bytes,
        Some(kind) => {
            // Streams are chunked by entries; an entry-light stream with
            // groups is sent whole.
            // (MEMORY USAGE only when the count alone does not decide: the
            // value is then small in elements, so it is cheap.)
            len > limits.max_bulks
                || (len > 1 && kind != Kind::Stream && memory_usage(ctx, key) > limits.max_bytes)
        }
        // Other modules' types: only the server's DUMP knows them.
        None => false,
    };
    if let (true, Some(kind)) = (big, kind) {
        // No MEMORY USAGE here: on a big dict it can take milliseconds (it
        // walks emptied buckets of a half-rehashed table, measured 5-9 ms on
        // a 5M-field hash). Range reads start with one element per chunk
        // and adapt to the element size they see (note_size).
        let avg = limits.max_bytes.max(1);
        return Ok(Start::Big(Box::new(BigKey {
            key: key.to_vec(),
            kind,
            length: len,
            expire_ms,
            lru,
            sent: 0,
            avg_elem_bytes: avg,
            scan: None,
            last_id: None,
            phase: if kind == Kind::Stream {
                Phase::FindGhosts { i: 0, after: None }
            } else {
                Phase::Elements
            },
            groups: Vec::new(),
            ghosts: BTreeSet::new(),
            ghosts_sent: None,
            field_ttls: Vec::new(),
        })));
    }
    if kind == Some(Kind::String) {
        // Read the value and build DUMP's payload ourselves (no LZF attempt;
        // see BatchBuilder::dump_string).
        let reply = call(ctx, Propagate::No, "GET", &[key])?;
        let v = reply.view();
        match v.kind() {
            crate::call::Kind::Null => return Ok(Start::Gone),
            crate::call::Kind::String => {}
            _ => return Err(format!("GET failed: {}", v.text())),
        }
        let value = v.bytes();
        out.dump_string(key, expire_ms, lru, value, STRING_PAYLOAD_RDB_VERSION);
        return Ok(Start::Whole {
            bytes: (value.len() + key.len()) as u64,
        });
    }
    let reply = call(ctx, Propagate::No, "DUMP", &[key])?;
    let v = reply.view();
    if v.is_error() {
        return Err(format!("DUMP failed: {}", v.text()));
    }
    if v.kind() == crate::call::Kind::Null {
        return Ok(Start::Gone);
    }
    let payload = v.bytes();
    out.dump(key, expire_ms, lru, payload);
    Ok(Start::Whole {
        bytes: (payload.len() + key.len()) as u64,
    })
}

/// The RDB version stamped on string payloads built here. A raw string
/// (type 0, length, bytes) reads the same in every RDB version, and servers
/// refuse only versions newer than their own, so the oldest version any
/// supported target loads is stamped rather than this server's: that lets a
/// string move to an older server too (Redis 8 -> 7.0), and does not depend
/// on knowing this server's own version (Valkey 8.1 writes RDB 11 but
/// reports its own version number to modules, which the version table
/// would read as Redis 8's RDB 12, and Valkey then refused the payload).
const STRING_PAYLOAD_RDB_VERSION: u16 = 9;

enum Phase {
    /// Streams, first: pending entries of group `i` (after `after`) whose
    /// stream entry was deleted. XCLAIM cannot create a pending entry for a
    /// missing id, so such ids travel as placeholder entries ("ghosts")
    /// among the real ones, get claimed, and are deleted again (XDEL
    /// record) before the stream's counters are set.
    FindGhosts {
        i: usize,
        after: Option<StreamId>,
    },
    Elements,
    /// Streams: consumer group `i`, then its consumers and PEL.
    Groups {
        i: usize,
        pel_after: Option<StreamId>,
    },
    /// Streams: XDEL of the placeholders, MAXBULKS ids per record.
    DropGhosts,
    Meta,
    Commit,
    Done,
}

/// Field of a placeholder entry (see Phase::FindGhosts).
const GHOST_FIELD: &[u8] = b"slotfork-deleted-entry";

struct Group {
    name: Vec<u8>,
    last_id: StreamId,
    entries_read: i64,
}

/// A big key being sent in chunks.
pub struct BigKey {
    pub key: Vec<u8>,
    pub kind: Kind,
    /// Elements when started (COMMIT checks the target has as many).
    pub length: u64,
    expire_ms: i64,
    lru: Lru,
    /// Elements (bytes for strings) written so far: the next chunk's offset.
    sent: u64,
    avg_elem_bytes: u64,
    scan: Option<ScanCursor>,
    last_id: Option<StreamId>,
    phase: Phase,
    groups: Vec<Group>,
    /// Deleted entries some group still has pending.
    ghosts: BTreeSet<StreamId>,
    /// The last placeholder written so far.
    ghosts_sent: Option<StreamId>,
    /// Hashes: expiry times of the fields of the chunk being built.
    field_ttls: Vec<(Vec<u8>, i64)>,
}

/// Whether this server has hash field expiry (HPEXPIRETIME), which DUMP
/// carries for a whole hash and chunks must carry as FIELDTTL records.
fn has_field_ttl() -> bool {
    Target::for_server(crate::call::server_version(), crate::call::is_valkey()).field_ttl
}

/// What a cursor step produced.
pub struct StepResult {
    /// Bytes written to the batch.
    pub bytes: u64,
    /// Chunk records written.
    pub chunks: u64,
    /// The COMMIT was written: the cursor is finished.
    pub done: bool,
}

impl BigKey {
    /// Elements per chunk for range reads (lists, streams): MAXBULKS, fewer
    /// when elements are large, so one chunk stays near MAXBYTES.
    fn range_count(&self, limits: Limits) -> u64 {
        (limits.max_bytes / self.avg_elem_bytes.max(1)).clamp(1, limits.max_bulks.max(1))
    }

    /// Writes the next record(s) of this key to `out`: one chunk (or a
    /// group's records), or the COMMIT. Returns `Err` when the key vanished
    /// or changed type, in which case the job restarts it.
    pub fn step(
        &mut self,
        ctx: Ctx,
        limits: Limits,
        out: &mut BatchBuilder,
        deadline: Instant,
    ) -> Result<StepResult, String> {
        let before = out.bytes();
        let mut chunks = 0;
        match self.phase {
            Phase::Elements => {
                let mut c = ChunkArgs::default();
                let finished = match self.kind {
                    Kind::Hash | Kind::Set | Kind::Zset => {
                        self.read_scan(ctx, limits, &mut c, deadline)?
                    }
                    Kind::List => self.read_list(ctx, limits, &mut c)?,
                    Kind::String => self.read_string(ctx, limits, &mut c)?,
                    Kind::Stream => self.read_stream(ctx, limits, &mut c)?,
                };
                if !c.is_empty() {
                    out.chunk(&self.key, self.kind, self.sent, &c);
                    if !self.field_ttls.is_empty() {
                        out.field_ttl(&self.key, &self.field_ttls);
                        self.field_ttls.clear();
                    }
                    chunks += 1;
                    self.sent += match self.kind {
                        Kind::String => c.string_len,
                        _ => c.count,
                    };
                }
                if finished {
                    self.phase = if self.kind == Kind::Stream {
                        Phase::Groups {
                            i: 0,
                            pel_after: None,
                        }
                    } else {
                        Phase::Commit
                    };
                }
            }
            Phase::FindGhosts { i, after } => {
                if i == 0 && after.is_none() {
                    self.load_groups(ctx)?;
                }
                self.phase = if i >= self.groups.len() {
                    Phase::Elements
                } else {
                    self.find_ghosts(ctx, limits, i, after)?
                };
            }
            Phase::DropGhosts => {
                let n = limits.max_bulks.max(1) as usize;
                let ids: Vec<StreamId> = self.ghosts.iter().take(n).copied().collect();
                if ids.is_empty() {
                    self.phase = Phase::Meta;
                } else {
                    out.xdel(&self.key, &ids);
                    for id in &ids {
                        self.ghosts.remove(id);
                    }
                }
            }
            Phase::Groups { i, pel_after } => {
                if i >= self.groups.len() {
                    self.phase = Phase::DropGhosts;
                } else {
                    self.phase = self.write_group(ctx, limits, out, i, pel_after)?;
                }
            }
            Phase::Meta => {
                let r = call_ok(ctx, Propagate::No, "XINFO", &[b"STREAM", &self.key])?;
                let v = r.view();
                let id = |f: &str| {
                    v.field(f)
                        .and_then(|x| StreamId::parse(x.bytes()))
                        .unwrap_or_default()
                };
                let added = v.field("entries-added").map(|x| x.integer()).unwrap_or(0);
                out.stream_meta(
                    &self.key,
                    id("last-generated-id"),
                    added.max(0) as u64,
                    id("max-deleted-entry-id"),
                );
                self.phase = Phase::Commit;
            }
            Phase::Commit => {
                out.commit(&self.key, self.kind, self.length, self.expire_ms, self.lru);
                self.phase = Phase::Done;
            }
            Phase::Done => {}
        }
        Ok(StepResult {
            bytes: (out.bytes() - before) as u64,
            chunks,
            done: matches!(self.phase, Phase::Done),
        })
    }

    fn open_checked(&self, ctx: Ctx) -> Result<Key, String> {
        let k = Key::open(ctx, &self.key, false);
        if kind_of(k.key_type()) != Some(self.kind) {
            return Err("key changed while it was being sent".into());
        }
        Ok(k)
    }

    fn read_scan(
        &mut self,
        ctx: Ctx,
        limits: Limits,
        c: &mut ChunkArgs,
        deadline: Instant,
    ) -> Result<bool, String> {
        let k = self.open_checked(ctx)?;
        let cursor = self.scan.get_or_insert_with(ScanCursor::new);
        let kind = self.kind;
        let ttls = kind == Kind::Hash && has_field_ttl();
        let mut fields: Vec<Vec<u8>> = Vec::new();
        let finished = loop {
            let more = cursor.scan_key(&k, &mut |field, value| {
                match kind {
                    // ZADD takes score then member.
                    Kind::Zset => {
                        c.push(value.unwrap_or(b"0"));
                        c.push(field);
                    }
                    Kind::Hash => {
                        c.push(field);
                        c.push(value.unwrap_or(b""));
                        if ttls {
                            fields.push(field.to_vec());
                        }
                    }
                    _ => c.push(field),
                }
                c.count += 1;
            });
            if !more {
                break true;
            }
            if c.count >= limits.max_bulks
                || c.bytes() as u64 >= limits.max_bytes
                || Instant::now() >= deadline
            {
                break false;
            }
        };
        drop(k);
        if !fields.is_empty() {
            self.field_ttls = self.read_field_ttls(ctx, &fields)?;
        }
        Ok(finished)
    }

    /// The expiry times of those fields that have one (HPEXPIRETIME: -1
    /// no expiry, -2 no such field).
    fn read_field_ttls(&self, ctx: Ctx, fields: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, i64)>, String> {
        let n = fields.len().to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(fields.len() + 3);
        args.extend_from_slice(&[&self.key, b"FIELDS", n.as_bytes()]);
        args.extend(fields.iter().map(|f| f.as_slice()));
        let r = call_ok(ctx, Propagate::No, "HPEXPIRETIME", &args)?;
        Ok(fields
            .iter()
            .zip(r.view().iter())
            .filter_map(|(f, t)| {
                let at = t.integer();
                (at > 0).then(|| (f.clone(), at))
            })
            .collect())
    }

    fn note_size(&mut self, c: &ChunkArgs) {
        if let Some(avg) = (c.bytes() as u64).checked_div(c.count) {
            self.avg_elem_bytes = avg.max(1);
        }
    }

    fn read_list(&mut self, ctx: Ctx, limits: Limits, c: &mut ChunkArgs) -> Result<bool, String> {
        self.open_checked(ctx)?;
        let n = self.range_count(limits);
        let (from, to) = (self.sent.to_string(), (self.sent + n - 1).to_string());
        let r = call_ok(
            ctx,
            Propagate::No,
            "LRANGE",
            &[&self.key, from.as_bytes(), to.as_bytes()],
        )?;
        for e in r.view().iter() {
            c.push(e.bytes());
            c.count += 1;
        }
        self.note_size(c);
        Ok(self.sent + c.count >= self.length)
    }

    fn read_string(&mut self, ctx: Ctx, limits: Limits, c: &mut ChunkArgs) -> Result<bool, String> {
        self.open_checked(ctx)?;
        let (from, to) = (
            self.sent.to_string(),
            (self.sent + limits.max_bytes.max(1) - 1).to_string(),
        );
        let r = call_ok(
            ctx,
            Propagate::No,
            "GETRANGE",
            &[&self.key, from.as_bytes(), to.as_bytes()],
        )?;
        let b = r.view().bytes();
        if !b.is_empty() {
            c.push(b);
            c.count = 1;
            c.string_len = b.len() as u64;
        }
        Ok(self.sent + b.len() as u64 >= self.length)
    }

    /// Writes placeholders for the ghosts before `upto` (all when None).
    fn push_ghosts(&mut self, c: &mut ChunkArgs, upto: Option<StreamId>) {
        let from = self.ghosts_sent;
        let pending: Vec<StreamId> = self
            .ghosts
            .iter()
            .filter(|g| from.is_none_or(|f| **g > f) && upto.is_none_or(|u| **g < u))
            .copied()
            .collect();
        for g in pending {
            c.push(g.to_string().as_bytes());
            c.push(b"1");
            c.push(GHOST_FIELD);
            c.push(b"");
            c.count += 1;
            self.ghosts_sent = Some(g);
        }
    }

    /// One page of group `i`'s pending entries: the ids whose entry is gone.
    fn find_ghosts(
        &mut self,
        ctx: Ctx,
        limits: Limits,
        i: usize,
        after: Option<StreamId>,
    ) -> Result<Phase, String> {
        self.open_checked(ctx)?;
        let start = match after {
            Some(id) => format!("({id}"),
            None => "-".to_string(),
        };
        let n = limits.max_bulks.max(1);
        let r = call_ok(
            ctx,
            Propagate::No,
            "XPENDING",
            &[
                &self.key,
                &self.groups[i].name,
                start.as_bytes(),
                b"+",
                n.to_string().as_bytes(),
            ],
        )?;
        let ids: Vec<StreamId> = r
            .view()
            .iter()
            .filter_map(|p| p.at(0).and_then(|id| StreamId::parse(id.bytes())))
            .collect();
        for id in &ids {
            let s = id.to_string();
            let e = call_ok(
                ctx,
                Propagate::No,
                "XRANGE",
                &[&self.key, s.as_bytes(), s.as_bytes()],
            )?;
            if e.view().is_empty() {
                self.ghosts.insert(*id);
            }
        }
        Ok(match ids.last() {
            Some(last) if ids.len() as u64 >= n => Phase::FindGhosts {
                i,
                after: Some(*last),
            },
            _ => Phase::FindGhosts {
                i: i + 1,
                after: None,
            },
        })
    }

    fn read_stream(&mut self, ctx: Ctx, limits: Limits, c: &mut ChunkArgs) -> Result<bool, String> {
        self.open_checked(ctx)?;
        let count = self.range_count(limits);
        let n = count.to_string();
        let start = match self.last_id {
            Some(id) => format!("({id}"),
            None => "-".to_string(),
        };
        let r = call_ok(
            ctx,
            Propagate::No,
            "XRANGE",
            &[&self.key, start.as_bytes(), b"+", b"COUNT", n.as_bytes()],
        )?;
        let v = r.view();
        for entry in v.iter() {
            let (Some(id), Some(fields)) = (entry.at(0), entry.at(1)) else {
                continue;
            };
            if !self.ghosts.is_empty() {
                self.push_ghosts(c, StreamId::parse(id.bytes()));
            }
            c.push(id.bytes());
            c.push((fields.len() / 2).to_string().as_bytes());
            for f in fields.iter() {
                c.push(f.bytes());
            }
            c.count += 1;
            self.last_id = StreamId::parse(id.bytes());
        }
        self.note_size(c);
        // Fewer entries than asked for: the end of the stream (the length
        // cannot be used: `sent` counts placeholders too).
        let end = (v.len() as u64) < count;
        if end {
            self.push_ghosts(c, None);
        }
        Ok(end)
    }

    fn load_groups(&mut self, ctx: Ctx) -> Result<(), String> {
        let r = call_ok(ctx, Propagate::No, "XINFO", &[b"GROUPS", &self.key])?;
        self.groups = r
            .view()
            .iter()
            .filter_map(|g| {
                Some(Group {
                    name: g.field("name")?.bytes().to_vec(),
                    last_id: StreamId::parse(g.field("last-delivered-id")?.bytes())?,
                    entries_read: g
                        .field("entries-read")
                        .filter(|x| x.kind() == crate::call::Kind::Integer)
                        .map(|x| x.integer())
                        .unwrap_or(-1),
                })
            })
            .collect();
        Ok(())
    }

    /// Group `i`: on its first step the GROUP record and its consumers, then
    /// its pending entries, MAXBULKS per step.
    fn write_group(
        &mut self,
        ctx: Ctx,
        limits: Limits,
        out: &mut BatchBuilder,
        i: usize,
        pel_after: Option<StreamId>,
    ) -> Result<Phase, String> {
        self.open_checked(ctx)?;
        let g = &self.groups[i];
        if pel_after.is_none() {
            out.group(&self.key, &g.name, g.last_id, g.entries_read);
            let r = call_ok(
                ctx,
                Propagate::No,
                "XINFO",
                &[b"CONSUMERS", &self.key, &g.name],
            )?;
            for c in r.view().iter() {
                if let Some(name) = c.field("name") {
                    out.consumer(&self.key, &g.name, name.bytes());
                }
            }
        }
        let start = match pel_after {
            Some(id) => format!("({id}"),
            None => "-".to_string(),
        };
        let n = limits.max_bulks.max(1).to_string();
        let r = call_ok(
            ctx,
            Propagate::No,
            "XPENDING",
            &[&self.key, &g.name, start.as_bytes(), b"+", n.as_bytes()],
        )?;
        let mut entries = Vec::new();
        for p in r.view().iter() {
            let (Some(id), Some(consumer), Some(idle), Some(n)) =
                (p.at(0), p.at(1), p.at(2), p.at(3))
            else {
                continue;
            };
            if let Some(id) = StreamId::parse(id.bytes()) {
                entries.push((
                    id,
                    consumer.bytes().to_vec(),
                    idle.integer().max(0) as u64,
                    n.integer().max(0) as u64,
                ));
            }
        }
        let last = entries.last().map(|e| e.0);
        if !entries.is_empty() {
            out.pending(&self.key, &g.name, &entries);
        }
        Ok(match last {
            Some(id) if entries.len() as u64 >= limits.max_bulks.max(1) => Phase::Groups {
                i,
                pel_after: Some(id),
            },
            _ => Phase::Groups {
                i: i + 1,
                pel_after: None,
            },
        })
    }
}
