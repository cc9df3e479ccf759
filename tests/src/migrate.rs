//! Helpers for the async slot migration tests (`SLOTS.MIGRATE*`,
//! `SLOTS.RESTORE`; the spec is module/MIGRATION.md).
//!
//! - starting jobs and reading `SLOTS.MIGRATE.STATUS` / `WAIT`;
//! - a content snapshot of keys (every data type, compared by content, not
//!   by DUMP bytes, since encodings may differ between source and target),
//!   with absolute expiry (`PEXPIRETIME`);
//! - datasets with every type in small and big encodings;
//! - a routing client that follows `-ASK` and retries `-TRYAGAIN`;
//! - hand-built `SLOTS.RESTORE` batches and Redis' CRC64 (for DUMP payloads).

use std::collections::{BTreeMap, BTreeSet};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{Connection, ErrorKind, RedisResult, Value};

use crate::*;

pub const HOST: &str = "127.0.0.1";

/// Generous bound for anything that should finish "soon".
pub const LONG: Duration = Duration::from_secs(90);

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A loopback port nobody listens on (bound once, then released).
pub fn unused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

/// The server's pid (INFO server process_id).
pub fn server_pid(s: &Server) -> u32 {
    let mut c = s.conn();
    info(&mut c, "server")["process_id"].parse().unwrap()
}

/// SIGKILL a server we started (by its pid), and wait until it refuses
/// connections. `Server::restart(Stop::Kill)` later starts it again.
pub fn kill9(s: &Server) {
    let pid = server_pid(s);
    let st = std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -9 {pid}");
    wait_until(Duration::from_secs(20), "killed server to go away", || {
        std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err()
    });
}

/// A connection that authenticates (requirepass or ACL user).
pub fn conn_auth(s: &Server, user: Option<&str>, pass: &str) -> Connection {
    let url = match user {
        Some(u) => format!("redis://{u}:{pass}@127.0.0.1:{}/", s.port),
        None => format!("redis://:{pass}@127.0.0.1:{}/", s.port),
    };
    let c = redis::Client::open(url).unwrap();
    let c = c
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/// `SLOTS.MIGRATE 127.0.0.1 port <opts> SLOTS <slots>` (raw reply).
pub fn try_migrate_slots(
    c: &mut Connection,
    port: u16,
    opts: &[&str],
    slots: &[u32],
) -> RedisResult<Value> {
    let mut a: Vec<String> = vec!["SLOTS.MIGRATE".into(), HOST.into(), port.to_string()];
    a.extend(opts.iter().map(|s| s.to_string()));
    a.push("SLOTS".into());
    a.extend(slots.iter().map(|s| s.to_string()));
    run(c, &a)
}

/// Start a slot job; returns its id (the reply must be an integer).
pub fn migrate_slots(c: &mut Connection, port: u16, opts: &[&str], slots: &[u32]) -> i64 {
    match try_migrate_slots(c, port, opts, slots) {
        Ok(Value::Int(id)) => id,
        Ok(v) => {
            panic!("SLOTS.MIGRATE ... SLOTS {slots:?} must reply an integer job id, got {v:?}")
        }
        Err(e) => panic!("SLOTS.MIGRATE ... SLOTS {slots:?} failed: {}", err_text(&e)),
    }
}

/// Start a key job; returns its id.
pub fn migrate_keys<K: AsRef<[u8]>>(
    c: &mut Connection,
    port: u16,
    opts: &[&str],
    keys: &[K],
) -> i64 {
    let mut a: Vec<Vec<u8>> = vec![
        b"SLOTS.MIGRATE.KEYS".to_vec(),
        HOST.as_bytes().to_vec(),
        port.to_string().into_bytes(),
    ];
    a.extend(opts.iter().map(|s| s.as_bytes().to_vec()));
    a.push(b"KEYS".to_vec());
    a.extend(keys.iter().map(|k| k.as_ref().to_vec()));
    match run(c, &a) {
        Ok(Value::Int(id)) => id,
        Ok(v) => panic!("SLOTS.MIGRATE.KEYS must reply an integer job id, got {v:?}"),
        Err(e) => panic!("SLOTS.MIGRATE.KEYS failed: {}", err_text(&e)),
    }
}

/// One job's `SLOTS.MIGRATE.STATUS` as field -> text.
#[derive(Clone, Debug, Default)]
pub struct Status(pub BTreeMap<String, String>);

impl Status {
    pub fn get(&self, f: &str) -> &str {
        match self.0.get(f) {
            Some(v) => v,
            None => panic!("SLOTS.MIGRATE.STATUS has no field `{f}`: {self:?}"),
        }
    }
    pub fn num(&self, f: &str) -> i64 {
        let v = self.get(f);
        v.parse()
            .unwrap_or_else(|_| panic!("STATUS field {f}={v:?} is not an integer: {self:?}"))
    }
    pub fn state(&self) -> &str {
        self.get("state")
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Nil => String::new(),
        Value::Double(d) => d.to_string(),
        other => as_string(other),
    }
}

/// Parse a flat field/value array (or a RESP3 map).
pub fn parse_status(v: &Value) -> Status {
    let mut m = BTreeMap::new();
    match v {
        Value::Map(kv) => {
            for (k, x) in kv {
                m.insert(as_string(k), value_text(x));
            }
        }
        _ => {
            let a = as_array(v);
            assert!(
                a.len().is_multiple_of(2),
                "STATUS must be a flat field/value array, got {v:?}"
            );
            for p in a.chunks(2) {
                m.insert(as_string(&p[0]), value_text(&p[1]));
            }
        }
    }
    Status(m)
}

pub fn status(c: &mut Connection, id: i64) -> Status {
    parse_status(&ok(
        c,
        &["SLOTS.MIGRATE.STATUS".to_string(), id.to_string()],
    ))
}

pub fn status_all(c: &mut Connection) -> Vec<Status> {
    let v = ok(c, &["SLOTS.MIGRATE.STATUS"]);
    as_array(&v).iter().map(parse_status).collect()
}

/// `SLOTS.MIGRATE.WAIT id timeout-ms` -> state text.
pub fn wait_job(c: &mut Connection, id: i64, timeout_ms: u64) -> String {
    let v = ok(
        c,
        &[
            "SLOTS.MIGRATE.WAIT".to_string(),
            id.to_string(),
            timeout_ms.to_string(),
        ],
    );
    value_text(&v)
}

/// Wait (bounded by [`LONG`]) until the job has ended; returns its final status.
pub fn finish(src: &Server, id: i64) -> Status {
    let mut c = src.conn();
    let st = wait_job(&mut c, id, LONG.as_millis() as u64);
    let s = status(&mut c, id);
    assert!(
        st != "running",
        "job {id} still running after {LONG:?}: {s:?}\n--- source log ---\n{}",
        src.log_tail(30)
    );
    assert_eq!(st, s.state(), "WAIT reply vs STATUS state: {s:?}");
    s
}

/// Wait for the job and require `done` with no work left.
pub fn finish_done(src: &Server, id: i64) -> Status {
    let s = finish(src, id);
    assert_eq!(
        s.state(),
        "done",
        "job {id} should be done: {s:?}\n--- source log ---\n{}",
        src.log_tail(30)
    );
    assert_eq!(s.num("keys_remaining"), 0, "{s:?}");
    assert_eq!(s.num("keys_in_flight"), 0, "{s:?}");
    s
}

/// Migrate and wait for `done`.
pub fn migrate_slots_done(src: &Server, dst: &Server, opts: &[&str], slots: &[u32]) -> Status {
    let mut c = src.conn();
    let id = migrate_slots(&mut c, dst.port, opts, slots);
    finish_done(src, id)
}

/// Poll STATUS until `pred` holds (panics after [`LONG`]).
pub fn wait_status(
    c: &mut Connection,
    id: i64,
    what: &str,
    mut pred: impl FnMut(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + LONG;
    loop {
        let s = status(c, id);
        if pred(&s) {
            return s;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for job {id}: {what}; last status {s:?}");
        }
        sleep(Duration::from_millis(10));
    }
}

/// `CONFIG SET slots.migrate-max-keys-per-sec` / `-bytes-per-sec` (0 = unlimited).
pub fn throttle(c: &mut Connection, keys_per_sec: u64, bytes_per_sec: u64) {
    ok(
        c,
        &[
            "CONFIG".to_string(),
            "SET".into(),
            "slots.migrate-max-keys-per-sec".into(),
            keys_per_sec.to_string(),
        ],
    );
    ok(
        c,
        &[
            "CONFIG".to_string(),
            "SET".into(),
            "slots.migrate-max-bytes-per-sec".into(),
            bytes_per_sec.to_string(),
        ],
    );
}

pub fn digest(c: &mut Connection) -> String {
    as_string(&ok(c, &["DEBUG", "DIGEST"]))
}

/// `DEBUG DIGEST-VALUE key` (encoding-independent digest of one value).
pub fn digest_value(c: &mut Connection, key: &str) -> String {
    let v = ok(c, &["DEBUG", "DIGEST-VALUE", key]);
    as_string(&as_array(&v)[0])
}

/// Keys named `slotfork:staging:*` (SCAN MATCH).
pub fn staging_keys(c: &mut Connection) -> Vec<Vec<u8>> {
    let mut cur: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cur)
            .arg("MATCH")
            .arg("slotfork:staging:*")
            .arg("COUNT")
            .arg(1000)
            .query(c)
            .unwrap();
        out.extend(keys);
        if next == 0 {
            break;
        }
        cur = next;
    }
    out.sort();
    out.dedup();
    out
}

/// All keys except staging keys.
pub fn user_keys(c: &mut Connection) -> Vec<Vec<u8>> {
    all_keys(c)
        .into_iter()
        .filter(|k| !k.starts_with(b"slotfork:staging:"))
        .collect()
}

// ---------------------------------------------------------------------------
// Content snapshots
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct PendingSnap {
    pub id: String,
    pub consumer: String,
    pub delivery_time: i64,
    pub deliveries: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConsumerSnap {
    pub name: String,
    pub pel_count: i64,
    /// (id, deliveries); delivery times are compared in `pending`.
    pub pending: Vec<(String, i64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupSnap {
    pub name: String,
    pub last_delivered: String,
    /// `entries-read` as text ("" = nil / unknown).
    pub entries_read: String,
    pub lag: String,
    pub pel_count: i64,
    pub pending: Vec<PendingSnap>,
    pub consumers: Vec<ConsumerSnap>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StreamSnap {
    pub entries: Vec<(String, Vec<Vec<u8>>)>,
    pub length: i64,
    pub last_id: String,
    pub max_deleted_id: String,
    pub entries_added: i64,
    pub first_id: String,
    pub groups: Vec<GroupSnap>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    String(Vec<u8>),
    List(Vec<Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    /// (member, score as the server prints it: exact for doubles).
    ZSet(Vec<(Vec<u8>, String)>),
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
    Stream(StreamSnap),
    Other(String),
}

impl Content {
    pub fn len(&self) -> usize {
        match self {
            Content::String(b) => b.len(),
            Content::List(v) => v.len(),
            Content::Set(v) => v.len(),
            Content::ZSet(v) => v.len(),
            Content::Hash(v) => v.len(),
            Content::Stream(s) => s.entries.len(),
            Content::Other(_) => 0,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn type_name(&self) -> &'static str {
        match self {
            Content::String(_) => "string",
            Content::List(_) => "list",
            Content::Set(_) => "set",
            Content::ZSet(_) => "zset",
            Content::Hash(_) => "hash",
            Content::Stream(_) => "stream",
            Content::Other(_) => "other",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KeySnap {
    pub content: Content,
    /// PEXPIRETIME: absolute unix ms, -1 = persistent.
    pub expire_at_ms: i64,
}

fn kv_map(v: &Value) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    match v {
        Value::Map(kv) => {
            for (k, x) in kv {
                m.insert(as_string(k), x.clone());
            }
        }
        _ => {
            for p in as_array(v).chunks(2) {
                m.insert(as_string(&p[0]), p[1].clone());
            }
        }
    }
    m
}

fn field<'a>(m: &'a BTreeMap<String, Value>, f: &str, ctx: &str) -> &'a Value {
    m.get(f)
        .unwrap_or_else(|| panic!("{ctx}: no field {f} in {:?}", m.keys().collect::<Vec<_>>()))
}

fn stream_snap(c: &mut Connection, key: &[u8]) -> StreamSnap {
    let xr = ok(c, &[b"XRANGE".as_slice(), key, b"-", b"+"]);
    let entries: Vec<(String, Vec<Vec<u8>>)> = as_array(&xr)
        .iter()
        .map(|e| {
            let a = as_array(e);
            (
                as_string(&a[0]),
                as_array(&a[1]).iter().map(as_bytes).collect(),
            )
        })
        .collect();
    let full = ok(
        c,
        &[b"XINFO".as_slice(), b"STREAM", key, b"FULL", b"COUNT", b"0"],
    );
    let m = kv_map(&full);
    let ctx = "XINFO STREAM FULL";
    let mut groups = Vec::new();
    for g in as_array(field(&m, "groups", ctx)) {
        let gm = kv_map(g);
        let pending = as_array(field(&gm, "pending", ctx))
            .iter()
            .map(|p| {
                let a = as_array(p);
                PendingSnap {
                    id: as_string(&a[0]),
                    consumer: as_string(&a[1]),
                    delivery_time: as_int(&a[2]),
                    deliveries: as_int(&a[3]),
                }
            })
            .collect();
        let consumers = as_array(field(&gm, "consumers", ctx))
            .iter()
            .map(|x| {
                let cm = kv_map(x);
                ConsumerSnap {
                    name: as_string(field(&cm, "name", ctx)),
                    pel_count: as_int(field(&cm, "pel-count", ctx)),
                    pending: as_array(field(&cm, "pending", ctx))
                        .iter()
                        .map(|p| {
                            let a = as_array(p);
                            (as_string(&a[0]), as_int(&a[2]))
                        })
                        .collect(),
                }
            })
            .collect();
        groups.push(GroupSnap {
            name: as_string(field(&gm, "name", ctx)),
            last_delivered: as_string(field(&gm, "last-delivered-id", ctx)),
            entries_read: value_text(field(&gm, "entries-read", ctx)),
            lag: value_text(field(&gm, "lag", ctx)),
            pel_count: as_int(field(&gm, "pel-count", ctx)),
            pending,
            consumers,
        });
    }
    StreamSnap {
        entries,
        length: as_int(field(&m, "length", ctx)),
        last_id: as_string(field(&m, "last-generated-id", ctx)),
        max_deleted_id: as_string(field(&m, "max-deleted-entry-id", ctx)),
        entries_added: as_int(field(&m, "entries-added", ctx)),
        first_id: as_string(field(&m, "recorded-first-entry-id", ctx)),
        groups,
    }
}

/// Content + expiry of one key; `None` when it does not exist.
pub fn snap_key(c: &mut Connection, key: &[u8]) -> Option<KeySnap> {
    let t = as_string(&ok(c, &[b"TYPE".as_slice(), key]));
    let content = match t.as_str() {
        "none" => return None,
        "string" => Content::String(as_bytes(&ok(c, &[b"GET".as_slice(), key]))),
        "list" => Content::List(
            as_array(&ok(c, &[b"LRANGE".as_slice(), key, b"0", b"-1"]))
                .iter()
                .map(as_bytes)
                .collect(),
        ),
        "set" => Content::Set(
            as_array(&ok(c, &[b"SMEMBERS".as_slice(), key]))
                .iter()
                .map(as_bytes)
                .collect(),
        ),
        "zset" => {
            let v = ok(c, &[b"ZRANGE".as_slice(), key, b"0", b"-1", b"WITHSCORES"]);
            Content::ZSet(
                as_array(&v)
                    .chunks(2)
                    .map(|p| (as_bytes(&p[0]), as_string(&p[1])))
                    .collect(),
            )
        }
        "hash" => {
            let v = ok(c, &[b"HGETALL".as_slice(), key]);
            let a = as_array(&v);
            Content::Hash(
                a.chunks(2)
                    .map(|p| (as_bytes(&p[0]), as_bytes(&p[1])))
                    .collect(),
            )
        }
        "stream" => Content::Stream(stream_snap(c, key)),
        other => Content::Other(other.to_string()),
    };
    let expire_at_ms = as_int(&ok(c, &[b"PEXPIRETIME".as_slice(), key]));
    if expire_at_ms == -2 {
        return None; // expired between the reads
    }
    Some(KeySnap {
        content,
        expire_at_ms,
    })
}

pub type DbSnap = BTreeMap<Vec<u8>, KeySnap>;

/// Snapshot of the given keys (missing ones are left out).
pub fn snap_keys<K: AsRef<[u8]>>(c: &mut Connection, keys: &[K]) -> DbSnap {
    let mut m = BTreeMap::new();
    for k in keys {
        if let Some(s) = snap_key(c, k.as_ref()) {
            m.insert(k.as_ref().to_vec(), s);
        }
    }
    m
}

/// Snapshot of every user key of the selected db (staging keys excluded).
pub fn snap_db(c: &mut Connection) -> DbSnap {
    let keys = user_keys(c);
    snap_keys(c, &keys)
}

pub fn show(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

fn first_diff<T: PartialEq + std::fmt::Debug>(a: &[T], b: &[T]) -> String {
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        if x != y {
            let fx = format!("{x:?}");
            let fy = format!("{y:?}");
            return format!(
                "first difference at index {i}: {} vs {}",
                &fx[..fx.len().min(200)],
                &fy[..fy.len().min(200)]
            );
        }
    }
    format!("lengths {} vs {}", a.len(), b.len())
}

/// Describe how two snapshots of a key differ ("" when equal). Delivery
/// times of pending entries may differ by `time_slack_ms` (the chunked path
/// carries idle times, not absolute times); consumers' seen-times are not
/// compared (the wire protocol does not carry them).
pub fn key_diff(a: &KeySnap, b: &KeySnap, time_slack_ms: i64) -> String {
    if a.expire_at_ms != b.expire_at_ms {
        return format!("PEXPIRETIME {} vs {}", a.expire_at_ms, b.expire_at_ms);
    }
    match (&a.content, &b.content) {
        (Content::String(x), Content::String(y)) => {
            if x != y {
                return format!(
                    "string of {} bytes vs {} bytes: {}",
                    x.len(),
                    y.len(),
                    first_diff(x, y)
                );
            }
        }
        (Content::List(x), Content::List(y)) => {
            if x != y {
                return format!("list: {}", first_diff(x, y));
            }
        }
        (Content::Set(x), Content::Set(y)) => {
            if x != y {
                let only_a: Vec<String> = x.difference(y).take(5).map(|m| show(m)).collect();
                let only_b: Vec<String> = y.difference(x).take(5).map(|m| show(m)).collect();
                return format!(
                    "set of {} vs {} members; only before: {only_a:?}; only after: {only_b:?}",
                    x.len(),
                    y.len()
                );
            }
        }
        (Content::ZSet(x), Content::ZSet(y)) => {
            if x != y {
                return format!("zset: {}", first_diff(x, y));
            }
        }
        (Content::Hash(x), Content::Hash(y)) => {
            if x != y {
                let xs: Vec<_> = x.iter().collect();
                let ys: Vec<_> = y.iter().collect();
                return format!(
                    "hash of {} vs {} fields: {}",
                    x.len(),
                    y.len(),
                    first_diff(&xs, &ys)
                );
            }
        }
        (Content::Stream(x), Content::Stream(y)) => {
            if x.entries != y.entries {
                return format!("stream entries: {}", first_diff(&x.entries, &y.entries));
            }
            let meta = |s: &StreamSnap| {
                (
                    s.length,
                    s.last_id.clone(),
                    s.max_deleted_id.clone(),
                    s.entries_added,
                    s.first_id.clone(),
                )
            };
            if meta(x) != meta(y) {
                return format!(
                    "stream meta (length, last-generated-id, max-deleted-entry-id, entries-added, recorded-first-entry-id): {:?} vs {:?}",
                    meta(x),
                    meta(y)
                );
            }
            if x.groups.len() != y.groups.len() {
                return format!(
                    "stream groups: {:?} vs {:?}",
                    x.groups.iter().map(|g| &g.name).collect::<Vec<_>>(),
                    y.groups.iter().map(|g| &g.name).collect::<Vec<_>>()
                );
            }
            for (g, h) in x.groups.iter().zip(y.groups.iter()) {
                let gm = |g: &GroupSnap| {
                    (
                        g.name.clone(),
                        g.last_delivered.clone(),
                        g.entries_read.clone(),
                        g.lag.clone(),
                        g.pel_count,
                    )
                };
                if gm(g) != gm(h) {
                    return format!(
                        "group (name, last-delivered-id, entries-read, lag, pel-count): {:?} vs {:?}",
                        gm(g),
                        gm(h)
                    );
                }
                if g.consumers != h.consumers {
                    return format!(
                        "group {} consumers: {}",
                        g.name,
                        first_diff(&g.consumers, &h.consumers)
                    );
                }
                if g.pending.len() != h.pending.len() {
                    return format!(
                        "group {} PEL size {} vs {}",
                        g.name,
                        g.pending.len(),
                        h.pending.len()
                    );
                }
                for (p, q) in g.pending.iter().zip(h.pending.iter()) {
                    if p.id != q.id
                        || p.consumer != q.consumer
                        || p.deliveries != q.deliveries
                        || (p.delivery_time - q.delivery_time).abs() > time_slack_ms
                    {
                        return format!("group {} PEL entry {p:?} vs {q:?}", g.name);
                    }
                }
            }
        }
        (x, y) => {
            if x != y {
                return format!("type {} vs {}", x.type_name(), y.type_name());
            }
        }
    }
    String::new()
}

/// Assert that `after` holds exactly the keys and contents of `before`.
pub fn assert_same_data(before: &DbSnap, after: &DbSnap, ctx: &str) {
    let missing: Vec<String> = before
        .keys()
        .filter(|k| !after.contains_key(*k))
        .map(|k| show(k))
        .collect();
    let extra: Vec<String> = after
        .keys()
        .filter(|k| !before.contains_key(*k))
        .map(|k| show(k))
        .collect();
    let mut differ = Vec::new();
    for (k, a) in before {
        if let Some(b) = after.get(k) {
            let d = key_diff(a, b, 10_000);
            if !d.is_empty() {
                differ.push(format!("{}: {d}", show(k)));
            }
        }
    }
    if missing.is_empty() && extra.is_empty() && differ.is_empty() {
        return;
    }
    panic!(
        "{ctx}: data differs ({} keys before, {} after)\n  missing ({}): {:?}\n  extra ({}): {:?}\n  differing ({}):\n    {}",
        before.len(),
        after.len(),
        missing.len(),
        &missing[..missing.len().min(10)],
        extra.len(),
        &extra[..extra.len().min(10)],
        differ.len(),
        differ[..differ.len().min(10)].join("\n    ")
    );
}

/// A copy with the stream groups' `entries-read` and `lag` blanked. Redis
/// 7.0 itself does not replicate a group's entries-read exactly (XREADGROUP
/// and XCLAIM reach the replica without it, which then reports it unknown),
/// so primary/replica comparisons leave these two fields out.
pub fn without_entries_read(s: &DbSnap) -> DbSnap {
    let mut out = s.clone();
    for v in out.values_mut() {
        if let Content::Stream(st) = &mut v.content {
            for g in &mut st.groups {
                g.entries_read.clear();
                g.lag.clear();
            }
        }
    }
    out
}

/// The union of two snapshots, requiring equal content where both hold a key.
pub fn union_consistent(a: &DbSnap, b: &DbSnap, ctx: &str) -> DbSnap {
    let mut out = a.clone();
    for (k, v) in b {
        if let Some(x) = a.get(k) {
            let d = key_diff(x, v, 10_000);
            assert!(
                d.is_empty(),
                "{ctx}: key {} is on both servers with different content: {d}",
                show(k)
            );
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Datasets
// ---------------------------------------------------------------------------

/// Scores that must round-trip exactly.
pub const SPECIAL_SCORES: &[&str] = &[
    "inf",
    "-inf",
    "5e-324",
    "-5e-324",
    "2.2250738585072014e-308",
    "1.7976931348623157e308",
    "-1.7976931348623157e308",
    "0.1",
    "0.30000000000000004",
    "0.3333333333333333",
    "-2.5",
    "0",
    "9007199254740993",
    "123456789.12345679",
    "1e-300",
    "1e300",
];

fn pipe_cmds(c: &mut Connection, cmds: Vec<Vec<Vec<u8>>>) {
    for chunk in cmds.chunks(200) {
        let mut p = redis::pipe();
        for cmd in chunk {
            let mut x = redis::cmd(std::str::from_utf8(&cmd[0]).unwrap());
            for a in &cmd[1..] {
                x.arg(a.as_slice());
            }
            p.add_command(x).ignore();
        }
        let _: () = p.query(c).unwrap();
    }
}

/// `n` pseudo-random (incompressible: DUMP payloads are LZF-compressed)
/// bytes from `seed`.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Build a big hash/set/zset/list with `n` elements using batches of 1000.
pub fn fill_big(c: &mut Connection, key: &str, kind: &str, n: usize) {
    let mut cmds = Vec::new();
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let mut cmd: Vec<Vec<u8>> = Vec::new();
        match kind {
            "hash" => {
                cmd.push(b"HSET".to_vec());
                cmd.push(key.into());
                for j in i..end {
                    cmd.push(format!("field:{j}").into_bytes());
                    cmd.push(format!("value:{j}:{}", "x".repeat(j % 23)).into_bytes());
                }
            }
            "set" => {
                cmd.push(b"SADD".to_vec());
                cmd.push(key.into());
                for j in i..end {
                    cmd.push(format!("member:{j}").into_bytes());
                }
            }
            "intset" => {
                cmd.push(b"SADD".to_vec());
                cmd.push(key.into());
                for j in i..end {
                    cmd.push((j as i64 * 7919 - 1_000_000).to_string().into_bytes());
                }
            }
            "zset" => {
                cmd.push(b"ZADD".to_vec());
                cmd.push(key.into());
                for j in i..end {
                    // Scores with many significant digits.
                    cmd.push(format!("{:.17e}", (j as f64) / 7.0 - 1000.0).into_bytes());
                    cmd.push(format!("m:{j}").into_bytes());
                }
            }
            "list" => {
                cmd.push(b"RPUSH".to_vec());
                cmd.push(key.into());
                for j in i..end {
                    cmd.push(format!("e{j}:{}", "y".repeat(j % 31)).into_bytes());
                }
            }
            "stream" => {
                for j in i..end {
                    cmds.push(vec![
                        b"XADD".to_vec(),
                        key.into(),
                        format!("{}-{}", 1000 + j / 3, j % 3).into_bytes(),
                        b"f".to_vec(),
                        format!("v{j}").into_bytes(),
                        b"g".to_vec(),
                        j.to_string().into_bytes(),
                    ]);
                }
                i = end;
                continue;
            }
            other => panic!("fill_big: unknown kind {other}"),
        }
        cmds.push(cmd);
        i = end;
    }
    pipe_cmds(c, cmds);
}

/// Give a stream consumer groups, consumers, PEL entries (some acked), a
/// deleted entry and raised counters.
/// With `pel_of_deleted`, an entry still pending in g1 is deleted too, so
/// g1's PEL holds an id whose stream entry is gone.
pub fn decorate_stream(c: &mut Connection, key: &str, n_entries: usize, pel_of_deleted: bool) {
    ok(c, &["XGROUP", "CREATE", key, "g1", "0"]);
    ok(c, &["XGROUP", "CREATE", key, "g2", "$"]);
    // A group created in the middle: entries-read unknown.
    let mid = as_array(&ok(
        c,
        &[
            "XRANGE",
            key,
            "-",
            "+",
            "COUNT",
            &(n_entries / 2 + 1).to_string(),
        ],
    ))
    .last()
    .map(|e| as_string(&as_array(e)[0]))
    .unwrap();
    ok(c, &["XGROUP", "CREATE", key, "g3", &mid]);
    ok(c, &["XGROUP", "CREATECONSUMER", key, "g2", "idle-consumer"]);
    let third = (n_entries / 3).max(1).to_string();
    ok(
        c,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "alice",
            "COUNT",
            &third,
            "STREAMS",
            key,
            ">",
        ],
    );
    ok(
        c,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "bob",
            "COUNT",
            &third,
            "STREAMS",
            key,
            ">",
        ],
    );
    ok(
        c,
        &[
            "XREADGROUP",
            "GROUP",
            "g3",
            "carol",
            "COUNT",
            "2",
            "STREAMS",
            key,
            ">",
        ],
    );
    // Ack a few of alice's, claim one of bob's (delivery count 2).
    let pend = ok(c, &["XPENDING", key, "g1", "-", "+", "10", "alice"]);
    for p in as_array(&pend).iter().take(3) {
        let id = as_string(&as_array(p)[0]);
        ok(c, &["XACK", key, "g1", &id]);
    }
    let pend = ok(c, &["XPENDING", key, "g1", "-", "+", "1", "bob"]);
    if let Some(p) = as_array(&pend).first() {
        let id = as_string(&as_array(p)[0]);
        ok(c, &["XCLAIM", key, "g1", "alice", "0", &id]);
    }
    // Delete the first entry (max-deleted-entry-id, recorded-first-entry-id).
    let first = as_array(&ok(c, &["XRANGE", key, "-", "+", "COUNT", "1"]))
        .first()
        .map(|e| as_string(&as_array(e)[0]))
        .unwrap();
    ok(c, &["XDEL", key, &first]);
    // Delete an entry that is still pending in g1: its PEL entry stays (a PEL
    // entry whose stream entry is gone; DUMP/RESTORE keeps it).
    let pend = ok(c, &["XPENDING", key, "g1", "-", "+", "1"]);
    if !pel_of_deleted {
        return;
    }
    if let Some(p) = as_array(&pend).first() {
        let id = as_string(&as_array(p)[0]);
        ok(c, &["XDEL", key, &id]);
    }
}

/// Keys of every type with small and larger encodings, all in the slot of
/// `tag` (names `{tag}:...`). `scale` multiplies the element counts of the
/// "large" keys (1 = a few hundred elements: listpack / intset and
/// hashtable / skiplist / quicklist encodings, still below MAXBULKS 1000).
/// Returns the key names. Some keys get absolute expiries in the future.
pub fn populate_types(c: &mut Connection, tag: &str, scale: usize) -> Vec<String> {
    let k = |n: &str| format!("{{{tag}}}:{n}");
    let mut keys = Vec::new();
    let mut add = |name: String| {
        keys.push(name.clone());
        name
    };
    // Strings.
    ok(c, &["SET", &add(k("str:small")), "hello"]);
    ok(c, &["SET", &add(k("str:int")), "12345"]);
    ok(c, &["SET", &add(k("str:negint")), "-9223372036854775808"]);
    ok(c, &["SET", &add(k("str:empty")), ""]);
    let bin: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    ok(c, &[b"SET".as_slice(), add(k("str:bin")).as_bytes(), &bin]);
    ok(c, &["SET", &add(k("str:raw")), &"r".repeat(100)]);
    ok(c, &["SET", &add(k("str:big")), &"B".repeat(10_000 * scale)]);
    ok(c, &["SETRANGE", &k("str:big"), "5000", "middle\0bytes"]);
    // Incompressible binary string, and a key whose name has binary bytes.
    ok(
        c,
        &[
            b"SET".as_slice(),
            add(k("str:bignoise")).as_bytes(),
            &noise(7, 8_000 * scale),
        ],
    );
    ok(c, &["SET", &add(k("bin\0name\r\n\u{ff} {x}")), "v"]);
    // Lists.
    ok(c, &["RPUSH", &add(k("list:small")), "a", "b", "c", "a", ""]);
    ok(
        c,
        &[
            "RPUSH",
            &add(k("list:ints")),
            "1",
            "-2",
            "300000",
            "9223372036854775807",
        ],
    );
    ok(
        c,
        &[
            b"RPUSH".as_slice(),
            add(k("list:bin")).as_bytes(),
            &bin,
            b"\0",
            &"long".repeat(100).into_bytes(),
        ],
    );
    fill_big(c, &add(k("list:big")), "list", 600 * scale);
    ok(
        c,
        &[
            b"RPUSH".as_slice(),
            k("list:big").as_bytes(),
            b"",
            b"\0",
            b"\r\n",
            &noise(1, 300),
        ],
    );
    // Sets.
    ok(
        c,
        &[
            "SADD",
            &add(k("set:intset")),
            "1",
            "2",
            "3",
            "-5",
            "9223372036854775807",
            "-9223372036854775808",
        ],
    );
    ok(
        c,
        &[
            "SADD",
            &add(k("set:strings")),
            "a",
            "b",
            "c",
            "",
            "with space",
        ],
    );
    fill_big(c, &add(k("set:big-intset")), "intset", 600 * scale);
    fill_big(c, &add(k("set:big")), "set", 700 * scale);
    ok(
        c,
        &[
            b"SADD".as_slice(),
            k("set:big").as_bytes(),
            b"",
            b"\0",
            b"\r\n",
            &noise(2, 300),
        ],
    );
    // Sorted sets.
    let mut z = vec!["ZADD".to_string(), add(k("zset:small"))];
    for (i, s) in SPECIAL_SCORES.iter().enumerate() {
        z.push(s.to_string());
        z.push(format!("sm{i}"));
    }
    ok(c, &z);
    fill_big(c, &add(k("zset:big")), "zset", 300 * scale);
    let mut z = vec!["ZADD".to_string(), k("zset:big")];
    for (i, s) in SPECIAL_SCORES.iter().enumerate() {
        z.push(s.to_string());
        z.push(format!("special{i}"));
    }
    ok(c, &z);
    // Hashes.
    ok(
        c,
        &[
            "HSET",
            &add(k("hash:small")),
            "f1",
            "v1",
            "f2",
            "",
            "",
            "empty-field",
            "n",
            "42",
        ],
    );
    ok(
        c,
        &["HSET", &add(k("hash:bigvalue")), "f", &"v".repeat(200)],
    );
    fill_big(c, &add(k("hash:big")), "hash", 500 * scale);
    ok(
        c,
        &[
            b"HSET".as_slice(),
            k("hash:big").as_bytes(),
            b"",
            b"empty field",
            b"\0",
            b"",
            b"\r\n",
            &noise(3, 300),
            &noise(4, 40),
            b"binary field",
        ],
    );
    // Streams.
    ok(c, &["XADD", &add(k("stream:small")), "1-1", "f", "v"]);
    ok(c, &["XADD", &k("stream:small"), "1-2", "a", "1", "b", "2"]);
    ok(c, &["XADD", &k("stream:small"), "5-0", "x", ""]);
    ok(c, &["XADD", &k("stream:small"), "6-0", "y", "z"]);
    decorate_stream(c, &k("stream:small"), 4, true);
    ok(
        c,
        &[
            "XSETID",
            &k("stream:small"),
            "99-5",
            "ENTRIESADDED",
            "77",
            "MAXDELETEDID",
            "50-0",
        ],
    );
    ok(
        c,
        &[
            "XGROUP",
            "CREATE",
            &add(k("stream:empty")),
            "g",
            "$",
            "MKSTREAM",
        ],
    );
    fill_big(c, &add(k("stream:big")), "stream", 300 * scale);
    decorate_stream(c, &k("stream:big"), 300 * scale, false);
    // Expiries (absolute, odd milliseconds).
    let at = now_ms() + 3_600_000 + 123;
    for n in [
        "str:raw",
        "list:small",
        "set:big",
        "zset:small",
        "hash:big",
        "stream:small",
    ] {
        ok(c, &["PEXPIREAT", &k(n), &at.to_string()]);
    }
    ok(
        c,
        &[
            "PEXPIREAT",
            &k("str:int"),
            &(at + 86_400_000 * 365).to_string(),
        ],
    );
    keys
}

// ---------------------------------------------------------------------------
// Routing client: follows -ASK, retries -TRYAGAIN
// ---------------------------------------------------------------------------

/// Where a command was finally served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Source,
    Target,
}

pub struct Router {
    pub src: Connection,
    pub dst: Connection,
    pub target_port: u16,
    pub asks: u64,
    pub tryagains: u64,
}

impl Router {
    pub fn new(src: &Server, dst: &Server, db: i64) -> Router {
        Router {
            src: src.conn_db(db),
            dst: dst.conn_db(db),
            target_port: dst.port,
            asks: 0,
            tryagains: 0,
        }
    }

    /// Like [`Router::exec`] but a `-TRYAGAIN` is returned, not retried.
    pub fn exec_once<A: redis::ToRedisArgs + std::fmt::Debug>(
        &mut self,
        args: &[A],
    ) -> (Served, RedisResult<Value>) {
        match run(&mut self.src, args) {
            Err(e) if e.kind() == ErrorKind::Ask => {
                self.asks += 1;
                (Served::Target, run(&mut self.dst, args))
            }
            Err(e) if e.kind() == ErrorKind::TryAgain => {
                self.tryagains += 1;
                (Served::Source, Err(e))
            }
            other => (Served::Source, other),
        }
    }

    /// Run on the source; on `-ASK slot host:port` run on the target; on
    /// `-TRYAGAIN` sleep a little and retry (up to 60 s). Other errors are
    /// returned.
    pub fn exec<A: redis::ToRedisArgs + std::fmt::Debug>(
        &mut self,
        args: &[A],
    ) -> (Served, RedisResult<Value>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match run(&mut self.src, args) {
                Err(e) if e.kind() == ErrorKind::Ask => {
                    self.asks += 1;
                    let detail = e.detail().unwrap_or("").to_string();
                    let want = format!("{HOST}:{}", self.target_port);
                    assert!(
                        detail.ends_with(&want) && detail.split(' ').count() == 2,
                        "ASK reply must be `ASK <slot> {want}`, got `ASK {detail}` for {args:?}"
                    );
                    let r = run(&mut self.dst, args);
                    if let Err(e) = &r {
                        if e.kind() == ErrorKind::TryAgain {
                            panic!("the target answered -TRYAGAIN to {args:?}");
                        }
                    }
                    return (Served::Target, r);
                }
                Err(e) if e.kind() == ErrorKind::TryAgain => {
                    self.tryagains += 1;
                    if Instant::now() > deadline {
                        panic!("{args:?}: -TRYAGAIN for 60 s");
                    }
                    sleep(Duration::from_millis(2));
                }
                other => return (Served::Source, other),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// SLOTS.RESTORE batches and DUMP payloads
// ---------------------------------------------------------------------------

/// Redis' CRC64 (Jones polynomial, reflected, init 0), as in DUMP payloads.
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0x95AC_9329_AC4B_C9B5; // 0xad93d23594c935a9 reflected
    let mut crc: u64 = 0;
    for &b in data {
        crc ^= b as u64;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Recompute the trailing CRC64 of a DUMP payload after editing it.
pub fn fix_dump_crc(p: &mut [u8]) {
    let n = p.len();
    let crc = crc64(&p[..n - 8]);
    p[n - 8..].copy_from_slice(&crc.to_le_bytes());
}

/// `DUMP key` on a (helper) server.
pub fn dump(c: &mut Connection, key: &str) -> Vec<u8> {
    as_bytes(&ok(c, &["DUMP", key]))
}

/// `SLOTS.RESTORE 1 <source-id> <n> <records...>` as arguments.
pub fn restore_args(version: &str, source_id: &str, records: &[Vec<Vec<u8>>]) -> Vec<Vec<u8>> {
    let mut a: Vec<Vec<u8>> = vec![
        b"SLOTS.RESTORE".to_vec(),
        version.as_bytes().to_vec(),
        source_id.as_bytes().to_vec(),
        records.len().to_string().into_bytes(),
    ];
    for r in records {
        a.extend(r.iter().cloned());
    }
    a
}

/// A record from text and binary parts.
pub fn rec(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    parts.iter().map(|p| p.to_vec()).collect()
}

/// Send a batch; returns the per-record integers (panics on an error reply).
pub fn restore_ok(c: &mut Connection, source_id: &str, records: &[Vec<Vec<u8>>]) -> Vec<i64> {
    let a = restore_args("1", source_id, records);
    match run(c, &a) {
        Ok(v) => as_array(&v).iter().map(as_int).collect(),
        Err(e) => panic!(
            "SLOTS.RESTORE failed: {}\nbatch: {:?}",
            err_text(&e),
            printable(&a)
        ),
    }
}

pub fn printable(a: &[Vec<u8>]) -> Vec<String> {
    a.iter()
        .map(|x| {
            let s = String::from_utf8_lossy(x);
            if s.len() > 60 {
                format!("{}...({} bytes)", &s[..40], x.len())
            } else {
                s.into_owned()
            }
        })
        .collect()
}
