//! The migration wire format (MIGRATION.md, "Wire protocol"): a batch of
//! records sent as one `SLOTS.RESTORE 1 <source-id> <count> <record>...`
//! command. The source encodes batches straight into RESP bytes
//! ([`BatchBuilder`]); the target parses and validates a whole batch
//! ([`parse_batch`]) before applying any record of it, so a bad batch
//! changes nothing.
//!
//! Records are self-delimiting (every variable part carries its count), so a
//! parser never guesses, and a truncated or padded batch is an error.

use std::fmt;

pub const VERSION: &[u8] = b"1";
pub const COMMAND: &[u8] = b"SLOTS.RESTORE";

/// Values that carry elements in chunks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    String,
    List,
    Set,
    Zset,
    Hash,
    Stream,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::List => "list",
            Kind::Set => "set",
            Kind::Zset => "zset",
            Kind::Hash => "hash",
            Kind::Stream => "stream",
        }
    }
    fn parse(b: &[u8]) -> Option<Kind> {
        Some(match b {
            b"string" => Kind::String,
            b"list" => Kind::List,
            b"set" => Kind::Set,
            b"zset" => Kind::Zset,
            b"hash" => Kind::Hash,
            b"stream" => Kind::Stream,
            _ => return None,
        })
    }
    /// Arguments per element in a CHUNK (streams are variable: see parse).
    fn width(self) -> usize {
        match self {
            Kind::Zset | Kind::Hash => 2,
            _ => 1,
        }
    }
}

/// LRU/LFU information carried next to a value (DUMP payloads do not hold
/// it; RESTORE takes it as IDLETIME or FREQ).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Lru {
    None,
    /// Idle time in seconds.
    Idle(u64),
    /// LFU logarithmic counter, 0..=255.
    Freq(u8),
}

/// A stream entry id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(b: &[u8]) -> Option<StreamId> {
        let s = std::str::from_utf8(b).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// One pending entry of a consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending<'a> {
    pub id: StreamId,
    pub consumer: &'a [u8],
    pub idle_ms: u64,
    pub deliveries: u64,
}

/// A parsed record; byte slices borrow the command's arguments.
#[derive(Debug, PartialEq)]
pub enum Record<'a> {
    Dump {
        key: &'a [u8],
        expire_ms: i64,
        lru: Lru,
        payload: &'a [u8],
    },
    Chunk {
        key: &'a [u8],
        kind: Kind,
        offset: u64,
        /// Number of elements (bytes for strings, entries for streams).
        count: u64,
        /// The element arguments, flat (pairs for hash/zset; for streams
        /// `id nfields f v ...` per entry).
        args: &'a [&'a [u8]],
    },
    Group {
        key: &'a [u8],
        group: &'a [u8],
        last_id: StreamId,
        entries_read: i64,
    },
    Consumer {
        key: &'a [u8],
        group: &'a [u8],
        consumer: &'a [u8],
    },
    Pending {
        key: &'a [u8],
        group: &'a [u8],
        entries: Vec<Pending<'a>>,
    },
    StreamMeta {
        key: &'a [u8],
        last_id: StreamId,
        entries_added: u64,
        max_deleted: StreamId,
    },
    Commit {
        key: &'a [u8],
        kind: Kind,
        length: u64,
        expire_ms: i64,
        lru: Lru,
    },
    Abort {
        key: &'a [u8],
    },
    Del {
        key: &'a [u8],
    },
    XDel {
        key: &'a [u8],
        ids: Vec<StreamId>,
    },
    /// Expiry times (unix ms) of fields of the staging hash: the fields of
    /// the chunk before it that have one (Redis 7.4+ hash field expiry).
    FieldTtl {
        key: &'a [u8],
        fields: Vec<(&'a [u8], i64)>,
    },
}

impl Record<'_> {
    pub fn key(&self) -> &[u8] {
        match self {
            Record::Dump { key, .. }
            | Record::Chunk { key, .. }
            | Record::Group { key, .. }
            | Record::Consumer { key, .. }
            | Record::Pending { key, .. }
            | Record::StreamMeta { key, .. }
            | Record::Commit { key, .. }
            | Record::Abort { key }
            | Record::Del { key }
            | Record::XDel { key, .. }
            | Record::FieldTtl { key, .. } => key,
        }
    }
}

/// A parsed batch.
pub struct Batch<'a> {
    pub source: &'a [u8],
    pub records: Vec<Record<'a>>,
}

/// What the target's server can load, for payload validation.
#[derive(Clone, Copy)]
pub struct Target {
    pub rdb_version: u16,
    /// Versions refused although not above `rdb_version`: Valkey 9 writes
    /// RDB 80 and refuses 12-79, the range Redis 7.4+ uses for formats
    /// Valkey cannot read.
    pub refused: Option<(u16, u16)>,
    /// Whether the server has hash field expiry (Redis 7.4+, Valkey 9+).
    pub field_ttl: bool,
}

impl Target {
    /// RDB version by server and version (0x00MMmmpp). Redis: 7.0 -> 10,
    /// 7.2 -> 11, 7.4 and 8.x -> 12. Valkey reports its own version: 7.2
    /// and 8.x load up to 11 and refuse 12 and above (Valkey 8.1's
    /// `verifyDumpPayload`), 9.0 writes 80 and refuses 12-79.
    pub fn for_server(version: u32, valkey: bool) -> Target {
        let (major, minor) = (version >> 16, (version >> 8) & 0xff);
        if valkey {
            return match major {
                0..=8 => Target {
                    rdb_version: 11,
                    refused: None,
                    field_ttl: false,
                },
                _ => Target {
                    rdb_version: 80,
                    refused: Some((12, 79)),
                    field_ttl: true,
                },
            };
        }
        let rdb_version = match (major, minor) {
            (0..=6, _) => 9,
            (7, 0..=1) => 10,
            (7, 2..=3) => 11,
            _ => 12,
        };
        Target {
            rdb_version,
            refused: None,
            field_ttl: rdb_version >= 12,
        }
    }

    /// Highest RDB object type byte that RDB version knows.
    fn max_type(&self) -> u8 {
        match self.rdb_version {
            0..=9 => 15,
            10 => 19,
            // 20: set listpack, 21: stream listpacks v3 (Redis 7.2, Valkey).
            11 => 21,
            _ => 25,
        }
    }
}

/// Slice-by-16 tables: every payload is checked on the target and every
/// string payload is built on the source, ~4x the byte-wise table's speed.
const CRC64: crc::Crc<u64, crc::Table<16>> =
    crc::Crc::<u64, crc::Table<16>>::new(&crc::CRC_64_REDIS);

/// The start of a DUMP payload holding a string stored raw: the object type
/// (RDB_TYPE_STRING = 0) then the length as the RDB encodes it (rdbSaveLen:
/// 6-bit, 14-bit, 32-bit or 64-bit big-endian forms).
fn string_payload_header(len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0;
    if len < 1 << 6 {
        out[1] = len as u8;
        2
    } else if len < 1 << 14 {
        out[1] = 0x40 | (len >> 8) as u8;
        out[2] = len as u8;
        3
    } else if len <= u32::MAX as usize {
        out[1] = 0x80;
        out[2..6].copy_from_slice(&(len as u32).to_be_bytes());
        6
    } else {
        out[1] = 0x81;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The footer DUMP appends: RDB version (2 bytes LE) then CRC64 (8 bytes LE)
/// of everything before the CRC.
pub fn check_dump_payload(p: &[u8], target: Target) -> Result<(), String> {
    if p.len() < 11 {
        return Err(format!("DUMP payload of {} bytes is truncated", p.len()));
    }
    let n = p.len();
    let version = u16::from_le_bytes([p[n - 10], p[n - 9]]);
    let crc = u64::from_le_bytes(p[n - 8..].try_into().unwrap());
    if CRC64.checksum(&p[..n - 8]) != crc {
        return Err("DUMP payload checksum mismatch".into());
    }
    if version > target.rdb_version {
        return Err(format!(
            "DUMP payload RDB version {version} is newer than this server's {}",
            target.rdb_version
        ));
    }
    if let Some((lo, hi)) = target
        .refused
        .filter(|&(lo, hi)| (lo..=hi).contains(&version))
    {
        return Err(format!(
            "DUMP payload RDB version {version} is a format this server cannot load ({lo}-{hi})"
        ));
    }
    let t = p[0];
    if t == 8 || t > target.max_type() {
        return Err(format!("DUMP payload has unknown value type {t}"));
    }
    Ok(())
}

/// Appends the CRC footer; used by tests to build payloads.
pub fn crc64(data: &[u8]) -> u64 {
    CRC64.checksum(data)
}

pub fn valid_source_id(s: &[u8]) -> bool {
    (1..=64).contains(&s.len())
        && s.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

struct Reader<'a> {
    args: &'a [&'a [u8]],
    pos: usize,
    record: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl fmt::Display) -> String {
        format!("record {}: {msg}", self.record)
    }
    fn next(&mut self, what: &str) -> Result<&'a [u8], String> {
        let a = self
            .args
            .get(self.pos)
            .ok_or_else(|| self.err(format!("missing {what}")))?;
        self.pos += 1;
        Ok(a)
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [&'a [u8]], String> {
        if self.args.len() - self.pos < n {
            return Err(self.err(format!("{what}: batch is truncated")));
        }
        let s = &self.args[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn int(&mut self, what: &str) -> Result<i64, String> {
        let a = self.next(what)?;
        std::str::from_utf8(a)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| self.err(format!("{what} is not an integer")))
    }
    fn uint(&mut self, what: &str) -> Result<u64, String> {
        let v = self.int(what)?;
        u64::try_from(v).map_err(|_| self.err(format!("{what} must be >= 0")))
    }
    fn id(&mut self, what: &str) -> Result<StreamId, String> {
        let a = self.next(what)?;
        StreamId::parse(a).ok_or_else(|| self.err(format!("{what} is not a stream id")))
    }
    fn kind(&mut self) -> Result<Kind, String> {
        let a = self.next("type")?;
        Kind::parse(a)
            .ok_or_else(|| self.err(format!("unknown type '{}'", String::from_utf8_lossy(a))))
    }
    fn lru(&mut self) -> Result<Lru, String> {
        let kind = self.next("lru kind")?;
        let v = self.uint("lru value")?;
        match kind {
            b"-" => Ok(Lru::None),
            b"IDLE" => Ok(Lru::Idle(v)),
            b"FREQ" if v <= 255 => Ok(Lru::Freq(v as u8)),
            b"FREQ" => Err(self.err("FREQ must be 0..255")),
            _ => Err(self.err("lru kind must be -, IDLE or FREQ")),
        }
    }
    fn expire(&mut self) -> Result<i64, String> {
        let v = self.int("expire")?;
        if v < 0 {
            return Err(self.err("expire must be 0 (none) or an absolute unix time in ms"));
        }
        Ok(v)
    }
}

/// Parses and validates a whole `SLOTS.RESTORE` argument list (without the
/// command name). Nothing is applied here; any error names the record.
pub fn parse_batch<'a>(args: &'a [&'a [u8]], target: Target) -> Result<Batch<'a>, String> {
    if args.len() < 3 {
        return Err("wrong number of arguments".into());
    }
    if args[0] != VERSION {
        return Err(format!(
            "unsupported protocol version '{}' (this server speaks 1)",
            String::from_utf8_lossy(args[0])
        ));
    }
    let source = args[1];
    if !valid_source_id(source) {
        return Err("source id must be 1-64 characters of [A-Za-z0-9_.-]".into());
    }
    let count: usize = std::str::from_utf8(args[2])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("record count is not a non-negative integer")?;
    let mut r = Reader {
        args,
        pos: 3,
        record: 0,
    };
    let mut records = Vec::with_capacity(count.min(args.len()));
    for i in 0..count {
        r.record = i;
        let op = r.next("opcode")?;
        let key = r.next("key")?;
        let rec = match op {
            b"DUMP" => {
                let expire_ms = r.expire()?;
                let lru = r.lru()?;
                let payload = r.next("payload")?;
                check_dump_payload(payload, target).map_err(|e| r.err(e))?;
                Record::Dump {
                    key,
                    expire_ms,
                    lru,
                    payload,
                }
            }
            b"CHUNK" => {
                let kind = r.kind()?;
                let offset = r.uint("offset")?;
                let count = r.uint("count")?;
                let start = r.pos;
                match kind {
                    Kind::String => {
                        if count != 1 {
                            return Err(r.err("a string chunk has count 1"));
                        }
                        r.take(1, "string chunk")?;
                    }
                    Kind::Stream => {
                        for _ in 0..count {
                            r.id("entry id")?;
                            let fields = r.uint("field count")? as usize;
                            r.take(fields.saturating_mul(2), "stream entry")?;
                        }
                    }
                    Kind::Zset => {
                        for _ in 0..count {
                            let score = r.next("score")?;
                            let ok = std::str::from_utf8(score)
                                .ok()
                                .and_then(|s| s.parse::<f64>().ok())
                                .is_some_and(|f| !f.is_nan());
                            if !ok {
                                return Err(r.err("score is not a number"));
                            }
                            r.next("member")?;
                        }
                    }
                    _ => {
                        let n = (count as usize).saturating_mul(kind.width());
                        r.take(n, "chunk elements")?;
                    }
                }
                Record::Chunk {
                    key,
                    kind,
                    offset,
                    count,
                    args: &args[start..r.pos],
                }
            }
            b"GROUP" => {
                let group = r.next("group")?;
                let last_id = r.id("last id")?;
                let entries_read = r.int("entries read")?;
                if entries_read < -1 {
                    return Err(r.err("entries read must be >= -1"));
                }
                Record::Group {
                    key,
                    group,
                    last_id,
                    entries_read,
                }
            }
            b"CONSUMER" => Record::Consumer {
                key,
                group: r.next("group")?,
                consumer: r.next("consumer")?,
            },
            b"PENDING" => {
                let group = r.next("group")?;
                let n = r.uint("pending count")?;
                let mut entries = Vec::with_capacity((n as usize).min(args.len()));
                for _ in 0..n {
                    entries.push(Pending {
                        id: r.id("pending id")?,
                        consumer: r.next("consumer")?,
                        idle_ms: r.uint("idle")?,
                        deliveries: r.uint("deliveries")?,
                    });
                }
                Record::Pending {
                    key,
                    group,
                    entries,
                }
            }
            b"STREAMMETA" => Record::StreamMeta {
                key,
                last_id: r.id("last id")?,
                entries_added: r.uint("entries added")?,
                max_deleted: r.id("max deleted id")?,
            },
            b"COMMIT" => Record::Commit {
                key,
                kind: r.kind()?,
                length: r.uint("length")?,
                expire_ms: r.expire()?,
                lru: r.lru()?,
            },
            b"ABORT" => Record::Abort { key },
            b"DEL" => Record::Del { key },
            b"XDEL" => {
                let n = r.uint("id count")?;
                let mut ids = Vec::with_capacity((n as usize).min(args.len()));
                for _ in 0..n {
                    ids.push(r.id("entry id")?);
                }
                Record::XDel { key, ids }
            }
            b"FIELDTTL" => {
                if !target.field_ttl {
                    return Err(
                        r.err("hash field expiry needs Redis 7.4+ or Valkey 9+ on the target")
                    );
                }
                let n = r.uint("field count")?;
                let mut fields = Vec::with_capacity((n as usize).min(args.len()));
                for _ in 0..n {
                    let field = r.next("field")?;
                    let at = r.int("expiry")?;
                    if at <= 0 {
                        return Err(r.err("field expiry must be a positive unix time in ms"));
                    }
                    fields.push((field, at));
                }
                Record::FieldTtl { key, fields }
            }
            _ => return Err(r.err(format!("unknown opcode '{}'", String::from_utf8_lossy(op)))),
        };
        records.push(rec);
    }
    if r.pos != args.len() {
        return Err(format!(
            "{} arguments after the last record",
            args.len() - r.pos
        ));
    }
    Ok(Batch { source, records })
}

/// Builds one batch as RESP bytes. The header (command, version, source,
/// record count) is only known at the end, so the records go to `body` and
/// the header is written by [`BatchBuilder::finish`].
pub struct BatchBuilder {
    body: Vec<u8>,
    args: usize,
    records: usize,
}

/// A finished batch: RESP bytes ready to write.
pub struct Encoded {
    pub header: Vec<u8>,
    pub body: Vec<u8>,
    pub records: usize,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.header.len() + self.body.len()
    }
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

/// A RESP command (array of bulk strings), as a client sends it.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        put_bulk(&mut out, a);
    }
    out
}

fn put_bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(itoa(b.len() as i64).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

fn itoa(v: i64) -> String {
    v.to_string()
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        BatchBuilder {
            body: Vec::new(),
            args: 0,
            records: 0,
        }
    }

    pub fn records(&self) -> usize {
        self.records
    }

    pub fn bytes(&self) -> usize {
        self.body.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    fn arg(&mut self, b: &[u8]) {
        put_bulk(&mut self.body, b);
        self.args += 1;
    }

    fn int(&mut self, v: i64) {
        self.arg(itoa(v).as_bytes());
    }

    fn lru(&mut self, lru: Lru) {
        match lru {
            Lru::None => {
                self.arg(b"-");
                self.int(0)
            }
            Lru::Idle(s) => {
                self.arg(b"IDLE");
                self.int(s as i64)
            }
            Lru::Freq(f) => {
                self.arg(b"FREQ");
                self.int(f as i64)
            }
        }
    }

    fn begin(&mut self, op: &[u8], key: &[u8]) {
        self.records += 1;
        self.arg(op);
        self.arg(key);
    }

    pub fn dump(&mut self, key: &[u8], expire_ms: i64, lru: Lru, payload: &[u8]) {
        self.begin(b"DUMP", key);
        self.int(expire_ms);
        self.lru(lru);
        self.arg(payload);
    }

    /// A DUMP record for a string value whose payload is built here rather
    /// than by the server's DUMP: the same format, with the value stored raw
    /// (DUMP would try LZF on every value over 20 bytes, a third of a job's
    /// time on incompressible values, and integer-encode short numbers).
    /// RESTORE loads it to the same value and re-encodes it as it does any
    /// loaded string. `rdb_version` is stamped in the footer.
    pub fn dump_string(
        &mut self,
        key: &[u8],
        expire_ms: i64,
        lru: Lru,
        value: &[u8],
        rdb_version: u16,
    ) {
        self.begin(b"DUMP", key);
        self.int(expire_ms);
        self.lru(lru);
        let mut header = [0u8; 10];
        let h = string_payload_header(value.len(), &mut header);
        let total = h + value.len() + 2 + 8;
        self.body.reserve(total + 24);
        self.body.push(b'$');
        self.body.extend_from_slice(itoa(total as i64).as_bytes());
        self.body.extend_from_slice(b"\r\n");
        let start = self.body.len();
        self.body.extend_from_slice(&header[..h]);
        self.body.extend_from_slice(value);
        self.body.extend_from_slice(&rdb_version.to_le_bytes());
        let crc = CRC64.checksum(&self.body[start..]);
        self.body.extend_from_slice(&crc.to_le_bytes());
        self.body.extend_from_slice(b"\r\n");
        self.args += 1;
    }

    /// A chunk whose element arguments are already encoded (see
    /// [`ChunkArgs`]).
    pub fn chunk(&mut self, key: &[u8], kind: Kind, offset: u64, elems: &ChunkArgs) {
        self.begin(b"CHUNK", key);
        self.arg(kind.name().as_bytes());
        self.int(offset as i64);
        self.int(elems.count as i64);
        self.body.extend_from_slice(&elems.body);
        self.args += elems.args;
    }

    pub fn group(&mut self, key: &[u8], group: &[u8], last_id: StreamId, entries_read: i64) {
        self.begin(b"GROUP", key);
        self.arg(group);
        self.arg(last_id.to_string().as_bytes());
        self.int(entries_read);
    }

    pub fn consumer(&mut self, key: &[u8], group: &[u8], consumer: &[u8]) {
        self.begin(b"CONSUMER", key);
        self.arg(group);
        self.arg(consumer);
    }

    pub fn pending(&mut self, key: &[u8], group: &[u8], entries: &[(StreamId, Vec<u8>, u64, u64)]) {
        self.begin(b"PENDING", key);
        self.arg(group);
        self.int(entries.len() as i64);
        for (id, consumer, idle, deliveries) in entries {
            self.arg(id.to_string().as_bytes());
            self.arg(consumer);
            self.int(*idle as i64);
            self.int(*deliveries as i64);
        }
    }

    pub fn stream_meta(&mut self, key: &[u8], last: StreamId, added: u64, max_deleted: StreamId) {
        self.begin(b"STREAMMETA", key);
        self.arg(last.to_string().as_bytes());
        self.int(added as i64);
        self.arg(max_deleted.to_string().as_bytes());
    }

    pub fn commit(&mut self, key: &[u8], kind: Kind, length: u64, expire_ms: i64, lru: Lru) {
        self.begin(b"COMMIT", key);
        self.arg(kind.name().as_bytes());
        self.int(length as i64);
        self.int(expire_ms);
        self.lru(lru);
    }

    pub fn abort(&mut self, key: &[u8]) {
        self.begin(b"ABORT", key);
    }

    pub fn del(&mut self, key: &[u8]) {
        self.begin(b"DEL", key);
    }

    pub fn field_ttl(&mut self, key: &[u8], fields: &[(Vec<u8>, i64)]) {
        self.begin(b"FIELDTTL", key);
        self.int(fields.len() as i64);
        for (f, at) in fields {
            self.arg(f);
            self.int(*at);
        }
    }

    pub fn xdel(&mut self, key: &[u8], ids: &[StreamId]) {
        self.begin(b"XDEL", key);
        self.int(ids.len() as i64);
        for id in ids {
            self.arg(id.to_string().as_bytes());
        }
    }

    /// The finished batch; the builder is left empty for the next one.
    pub fn finish(&mut self, source: &[u8]) -> Encoded {
        let mut header = Vec::with_capacity(64);
        header.push(b'*');
        header.extend_from_slice(itoa(self.args as i64 + 4).as_bytes());
        header.extend_from_slice(b"\r\n");
        put_bulk(&mut header, COMMAND);
        put_bulk(&mut header, VERSION);
        put_bulk(&mut header, source);
        put_bulk(&mut header, itoa(self.records as i64).as_bytes());
        let e = Encoded {
            header,
            body: std::mem::take(&mut self.body),
            records: self.records,
        };
        self.args = 0;
        self.records = 0;
        e
    }
}

/// The element arguments of one chunk, encoded as they are read from the
/// key (the count is only known at the end).
#[derive(Default)]
pub struct ChunkArgs {
    body: Vec<u8>,
    args: usize,
    /// Elements (pairs for hash/zset, entries for streams, 1 for strings).
    pub count: u64,
    /// For a string chunk: its length in bytes (the next offset's step).
    pub string_len: u64,
}

impl ChunkArgs {
    pub fn push(&mut self, b: &[u8]) {
        put_bulk(&mut self.body, b);
        self.args += 1;
    }
    pub fn bytes(&self) -> usize {
        self.body.len()
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits RESP produced by the builder back into arguments.
    fn split(e: &Encoded) -> Vec<Vec<u8>> {
        let mut all = e.header.clone();
        all.extend_from_slice(&e.body);
        let mut out = Vec::new();
        let mut i = all.iter().position(|&c| c == b'\n').unwrap() + 1;
        while i < all.len() {
            assert_eq!(all[i], b'$');
            let nl = i + all[i..].iter().position(|&c| c == b'\r').unwrap();
            let len: usize = std::str::from_utf8(&all[i + 1..nl])
                .unwrap()
                .parse()
                .unwrap();
            out.push(all[nl + 2..nl + 2 + len].to_vec());
            i = nl + 2 + len + 2;
        }
        out
    }

    fn payload(body: &[u8], version: u16) -> Vec<u8> {
        let mut p = body.to_vec();
        p.extend_from_slice(&version.to_le_bytes());
        let c = crc64(&p);
        p.extend_from_slice(&c.to_le_bytes());
        p
    }

    const T: Target = Target {
        rdb_version: 10,
        refused: None,
        field_ttl: false,
    };

    /// Payloads built for strings have DUMP's format: each RDB length form,
    /// a CRC the target's check accepts, the value intact after the header.
    #[test]
    fn built_string_payloads() {
        for (len, header) in [
            (0usize, &b"\x00\x00"[..]),
            (63, b"\x00\x3f"),
            (64, b"\x00\x40\x40"),
            (16383, b"\x00\x7f\xff"),
            (16384, b"\x00\x80\x00\x00\x40\x00"),
            (70000, b"\x00\x80\x00\x01\x11\x70"),
        ] {
            let value: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let mut b = BatchBuilder::new();
            b.dump_string(b"k", 0, Lru::Idle(3), &value, 10);
            let args = split(&b.finish(b"src"));
            let batch: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
            let parsed = parse_batch(&batch, T).expect("built payload accepted");
            let Record::Dump { payload, lru, .. } = &parsed.records[0] else {
                panic!("not a DUMP record");
            };
            assert_eq!(*lru, Lru::Idle(3));
            assert_eq!(&payload[..header.len()], header, "length {len}");
            assert_eq!(&payload[header.len()..payload.len() - 10], &value[..]);
            assert_eq!(&payload[payload.len() - 10..payload.len() - 8], b"\x0a\x00");
        }
        // A newer stamp than the target's is refused like a real DUMP's.
        let mut b = BatchBuilder::new();
        b.dump_string(b"k", 0, Lru::None, b"v", 11);
        let args = split(&b.finish(b"src"));
        let batch: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
        let err = parse_batch(&batch, T)
            .err()
            .expect("newer RDB version refused");
        assert!(err.contains("newer than this server"), "{err}");
    }

    #[test]
    fn round_trip_every_record() {
        let p = payload(b"\x00\x03abc", 10);
        let mut b = BatchBuilder::new();
        b.dump(b"k1", 0, Lru::Idle(5), &p);
        let mut c = ChunkArgs::default();
        for (f, v) in [(b"f1", b"v1"), (b"f2", b"v2")] {
            c.push(f);
            c.push(v);
            c.count += 1;
        }
        b.chunk(b"h", Kind::Hash, 0, &c);
        let mut s = ChunkArgs::default();
        s.push(b"1-1");
        s.push(b"1");
        s.push(b"a");
        s.push(b"b");
        s.count = 1;
        b.chunk(b"s", Kind::Stream, 3, &s);
        b.group(b"s", b"g", StreamId { ms: 1, seq: 1 }, -1);
        b.consumer(b"s", b"g", b"alice");
        b.pending(
            b"s",
            b"g",
            &[(StreamId { ms: 1, seq: 1 }, b"alice".to_vec(), 10, 2)],
        );
        b.stream_meta(b"s", StreamId { ms: 9, seq: 0 }, 4, StreamId::default());
        b.commit(b"h", Kind::Hash, 2, 1_700_000_000_000, Lru::Freq(7));
        b.abort(b"x");
        b.del(b"y");
        b.xdel(b"s", &[StreamId { ms: 0, seq: 5 }]);
        let e = b.finish(b"src-1");
        assert_eq!(e.records, 11);
        let args = split(&e);
        assert_eq!(args[0], COMMAND);
        let refs: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
        let batch = parse_batch(&refs, T).unwrap();
        assert_eq!(batch.source, b"src-1");
        assert_eq!(batch.records.len(), 11);
        assert!(matches!(
            batch.records[0],
            Record::Dump {
                lru: Lru::Idle(5),
                ..
            }
        ));
        assert!(matches!(
            batch.records[1],
            Record::Chunk {
                kind: Kind::Hash,
                count: 2,
                ..
            }
        ));
        assert!(matches!(
            batch.records[2],
            Record::Chunk {
                kind: Kind::Stream,
                offset: 3,
                count: 1,
                ..
            }
        ));
        match &batch.records[4] {
            Record::Consumer { consumer, .. } => assert_eq!(*consumer, b"alice"),
            r => panic!("{r:?}"),
        }
        match &batch.records[5] {
            Record::Pending { entries, .. } => assert_eq!(entries[0].deliveries, 2),
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            batch.records[7],
            Record::Commit {
                lru: Lru::Freq(7),
                length: 2,
                ..
            }
        ));
        assert_eq!(batch.records[8], Record::Abort { key: b"x" });
        assert_eq!(batch.records[9], Record::Del { key: b"y" });
        assert_eq!(
            batch.records[10],
            Record::XDel {
                key: b"s",
                ids: vec![StreamId { ms: 0, seq: 5 }]
            }
        );
    }

    /// FIELDTTL: built and parsed back for a target with hash field expiry;
    /// refused, naming the requirement, by one without; expiry times must
    /// be positive.
    #[test]
    fn field_ttl_records() {
        let mut b = BatchBuilder::new();
        b.field_ttl(
            b"h",
            &[(b"f1".to_vec(), 1_800_000_000_000), (b"f2".to_vec(), 1)],
        );
        let args = split(&b.finish(b"src"));
        let refs: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
        let with = Target::for_server(0x00080002, false);
        assert!(with.field_ttl && !Target::for_server(0x00070400 - 1, false).field_ttl);
        let batch = parse_batch(&refs, with).unwrap();
        assert_eq!(
            batch.records[0],
            Record::FieldTtl {
                key: b"h",
                fields: vec![(&b"f1"[..], 1_800_000_000_000), (&b"f2"[..], 1)]
            }
        );
        let err = parse_batch(&refs, T)
            .err()
            .expect("refused without field expiry");
        assert!(err.contains("needs Redis 7.4+"), "{err}");
        assert!(!Target::for_server(0x00080101, true).field_ttl, "Valkey 8");
        assert!(Target::for_server(0x00090000, true).field_ttl, "Valkey 9");
        for bad in [&b"0"[..], b"-5", b"x"] {
            let a: Vec<&[u8]> = vec![b"1", b"s", b"1", b"FIELDTTL", b"h", b"1", b"f", bad];
            assert!(parse_batch(&a, with).is_err(), "{bad:?}");
        }
        let short: Vec<&[u8]> = vec![b"1", b"s", b"1", b"FIELDTTL", b"h", b"2", b"f", b"5"];
        assert!(parse_batch(&short, with).is_err());
    }

    #[test]
    fn rejects_bad_payloads_and_shapes() {
        let good = payload(b"\x00\x03abc", 10);
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 1] ^= 1;
        let newer = payload(b"\x00\x03abc", 11);
        let badtype = payload(b"\x08\x03abc", 10);
        for (p, want) in [
            (&good[..5], "truncated"),
            (&flipped[..], "checksum"),
            (&newer[..], "newer"),
            (&badtype[..], "unknown value type"),
        ] {
            let args: Vec<&[u8]> = vec![b"1", b"s", b"1", b"DUMP", b"k", b"0", b"-", b"0", p];
            let e = parse_batch(&args, T).err().unwrap();
            assert!(e.contains(want), "{e}");
        }
        let cases: Vec<(Vec<&[u8]>, &str)> = vec![
            (vec![b"2", b"s", b"0"], "version"),
            (vec![b"1", b"bad id!", b"0"], "source id"),
            (vec![b"1", b"s", b"x"], "record count"),
            (vec![b"1", b"s", b"1", b"NOPE", b"k"], "unknown opcode"),
            (
                vec![
                    b"1", b"s", b"1", b"CHUNK", b"k", b"hash", b"0", b"2", b"f", b"v",
                ],
                "truncated",
            ),
            (
                vec![
                    b"1", b"s", b"1", b"CHUNK", b"k", b"zset", b"0", b"1", b"nan", b"m",
                ],
                "score",
            ),
            (
                vec![b"1", b"s", b"1", b"CHUNK", b"k", b"blob", b"0", b"0"],
                "unknown type",
            ),
            (
                vec![b"1", b"s", b"1", b"ABORT", b"k", b"extra"],
                "after the last record",
            ),
            (vec![b"1", b"s", b"2", b"ABORT", b"k"], "missing opcode"),
            (
                vec![b"1", b"s", b"1", b"GROUP", b"k", b"g", b"1-x", b"0"],
                "stream id",
            ),
            (
                vec![
                    b"1", b"s", b"1", b"COMMIT", b"k", b"set", b"-1", b"0", b"-", b"0",
                ],
                ">= 0",
            ),
        ];
        for (args, want) in cases {
            let e = parse_batch(&args, T).err().unwrap();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn rdb_versions() {
        assert_eq!(Target::for_server(0x0007000f, false).rdb_version, 10);
        assert_eq!(Target::for_server(0x00070204, false).rdb_version, 11);
        assert_eq!(Target::for_server(0x00080002, false).rdb_version, 12);
        // Valkey reports its own version.
        let v8 = Target::for_server(0x00080101, true);
        assert_eq!(v8.rdb_version, 11);
        let v9 = Target::for_server(0x00090000, true);
        assert_eq!(v9.rdb_version, 80);
        let stamped = |v: u16| {
            let mut p = vec![0u8, 1, b'x'];
            p.extend_from_slice(&v.to_le_bytes());
            let c = crc64(&p);
            p.extend_from_slice(&c.to_le_bytes());
            p
        };
        assert!(check_dump_payload(&stamped(11), v8).is_ok());
        assert!(check_dump_payload(&stamped(12), v8).is_err());
        assert!(check_dump_payload(&stamped(11), v9).is_ok());
        assert!(check_dump_payload(&stamped(12), v9).is_err());
        assert!(check_dump_payload(&stamped(80), v9).is_ok());
        // A stream of RDB 11 (type 21) loads on Valkey 8.
        let mut stream = vec![21u8, 0];
        stream.extend_from_slice(&11u16.to_le_bytes());
        let c = crc64(&stream);
        stream.extend_from_slice(&c.to_le_bytes());
        assert!(check_dump_payload(&stream, v8).is_ok());
        assert!(check_dump_payload(&stream, Target::for_server(0x0007000f, false)).is_err());
    }
}
