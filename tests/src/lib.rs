//! Integration-test harness for the `slots` Redis module (libslots.so).
//!
//! Every test starts its own real `redis-server` (binary from `$REDIS_SERVER`,
//! default `redis-server` on PATH) on a random loopback port in a fresh temp
//! directory, with `loadmodule $SLOTS_MODULE` (default
//! `<workspace>/target/debug/libslots.so`).  Servers are SIGKILLed on drop.
//!
//! The helpers here also carry a reference implementation of both slot
//! functions so tests can compute the expected per-slot counts ("the model")
//! independently of the module.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

pub use redis;
use redis::{Connection, RedisError, Value};
pub mod migrate;

// ---------------------------------------------------------------------------
// Slot functions (reference implementation)
// ---------------------------------------------------------------------------

/// Which slot function the module was started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashFn {
    /// CRC-32/IEEE of the Codis hash tag, `& 1023` (default).
    Crc32,
    /// Redis Cluster: CRC16/XMODEM of the cluster hash tag, `& 16383`.
    Crc16,
}

impl HashFn {
    pub fn slot_count(self) -> u32 {
        match self {
            HashFn::Crc32 => 1024,
            HashFn::Crc16 => 16384,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HashFn::Crc32 => "crc32",
            HashFn::Crc16 => "crc16",
        }
    }

    pub fn slot(self, key: &[u8]) -> u32 {
        match self {
            HashFn::Crc32 => crc32fast::hash(codis_tag(key)) & 1023,
            HashFn::Crc16 => crc16_xmodem(cluster_tag(key)) as u32 & 16383,
        }
    }
}

/// Codis rule: text between the first `{` and the next `}` after it when
/// both exist (possibly empty); otherwise the whole key.
pub fn codis_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            return &key[open + 1..open + 1 + len];
        }
    }
    key
}

/// Redis Cluster rule: like Codis, but an empty `{}` means "hash the whole key".
pub fn cluster_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// CRC16/XMODEM (poly 0x1021, init 0, no reflection) as used by Redis Cluster.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Find a hash tag (`t<N>`) whose slot is `slot`; keys `{tag}...` then all
/// live in that slot.
pub fn tag_for_slot(hash: HashFn, slot: u32) -> String {
    for i in 0u64.. {
        let t = format!("t{i}");
        if hash.slot(t.as_bytes()) == slot {
            return t;
        }
    }
    unreachable!()
}

/// `n` distinct plain keys (no hash tag) that all hash to `slot`.
pub fn plain_keys_in_slot(hash: HashFn, slot: u32, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        let k = format!("{prefix}{i}");
        if hash.slot(k.as_bytes()) == slot {
            out.push(k);
        }
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------
// Locating binaries
// ---------------------------------------------------------------------------

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent dir")
        .to_path_buf()
}

pub fn module_path() -> PathBuf {
    if let Ok(p) = std::env::var("SLOTS_MODULE") {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("debug").join("libslots.so")
}

/// The test helper module (tests/helper-module: deletes keys without
/// keyspace events, as other modules may), built next to libslots.so.
pub fn helper_module_path() -> PathBuf {
    let p = module_path().with_file_name("libslotfork_test_helper.so");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p slotfork-test-helper` (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn redis_server_bin() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

/// Major version of the redis-server binary (0 if unknown).
pub fn server_major_version() -> u32 {
    static V: OnceLock<u32> = OnceLock::new();
    *V.get_or_init(|| {
        let out = Command::new(redis_server_bin()).arg("--version").output();
        let Ok(out) = out else { return 0 };
        let s = String::from_utf8_lossy(&out.stdout);
        // "Redis server v=7.0.15 sha=..."
        s.split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or(0)
    })
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// How `Server::restart` stops the running server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// `SHUTDOWN SAVE`: writes the RDB (and flushes the AOF) first.
    ShutdownSave,
    /// `SHUTDOWN NOSAVE`: no RDB; the AOF (if on) is still flushed.
    ShutdownNoSave,
    /// SIGKILL: nothing is written.
    Kill,
}

#[derive(Clone, Debug)]
pub struct ServerBuilder {
    module: bool,
    module_args: Vec<String>,
    config: Vec<String>,
    appendonly: bool,
    replicaof: Option<u16>,
    hash: HashFn,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            module: true,
            module_args: Vec::new(),
            config: Vec::new(),
            appendonly: false,
            replicaof: None,
            hash: HashFn::Crc32,
        }
    }
}

impl ServerBuilder {
    /// Add a module argument pair (`hash-function crc16`, `index-mode counts-only`, ...).
    pub fn module_arg(mut self, name: &str, value: &str) -> Self {
        if name == "hash-function" {
            if value == "crc16" {
                self.hash = HashFn::Crc16;
            } else if value == "crc32" {
                self.hash = HashFn::Crc32;
            }
        }
        self.module_args.push(name.to_string());
        self.module_args.push(value.to_string());
        self
    }
    /// Raw module argument(s), no interpretation.
    pub fn raw_module_arg(mut self, arg: &str) -> Self {
        self.module_args.push(arg.to_string());
        self
    }
    pub fn crc16(self) -> Self {
        self.module_arg("hash-function", "crc16")
    }
    pub fn counts_only(self) -> Self {
        self.module_arg("index-mode", "counts-only")
    }
    /// Extra redis.conf line, e.g. `"maxmemory-policy allkeys-random"`.
    pub fn config(mut self, line: &str) -> Self {
        self.config.push(line.to_string());
        self
    }
    /// Loads the test helper module too (`helper_module_path`).
    pub fn with_helper_module(self) -> Self {
        let line = format!("loadmodule {}", helper_module_path().display());
        self.config(&line)
    }
    pub fn appendonly(mut self, on: bool) -> Self {
        self.appendonly = on;
        self
    }
    pub fn replica_of(mut self, primary: &Server) -> Self {
        self.replicaof = Some(primary.port);
        self
    }
    /// Start a server without loading the module (for comparisons).
    pub fn without_module(mut self) -> Self {
        self.module = false;
        self
    }

    pub fn start(self) -> Server {
        match self.try_start() {
            Ok(s) => s,
            Err(e) => panic!("redis-server failed to start:\n{e}"),
        }
    }

    /// Start; on failure return the reason and the server log tail.
    pub fn try_start(self) -> Result<Server, String> {
        if self.module {
            let mp = module_path();
            if !mp.exists() {
                return Err(format!(
                    "module {} not found: build it with `cargo build -p slots` or set SLOTS_MODULE",
                    mp.display()
                ));
            }
        }
        let mut dir = tempfile::Builder::new()
            .prefix("slotfork-test-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let mut last_err = String::new();
        // Retry with another port if we lost the race for the one we picked.
        for _attempt in 0..5 {
            let port = free_port();
            let mut s = Server {
                child: None,
                dir: Some(dir),
                port,
                hash: self.hash,
                builder: self.clone(),
            };
            s.write_conf();
            match s.spawn_and_wait() {
                Ok(()) => return Ok(s),
                Err(e) => {
                    let in_use = e.contains("Address already in use");
                    last_err = e;
                    dir = s.dir.take().unwrap();
                    if !in_use {
                        break;
                    }
                }
            }
        }
        Err(last_err)
    }
}

pub struct Server {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    pub port: u16,
    pub hash: HashFn,
    builder: ServerBuilder,
}

impl Server {
    /// Default server: module loaded with default args (crc32, full index).
    pub fn start() -> Server {
        Server::builder().start()
    }

    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join("redis.log")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn write_conf(&self) {
        let d = self.dir().display().to_string();
        let mut c = String::new();
        c += &format!(
            "port {}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\n",
            self.port
        );
        c += &format!("dir \"{d}\"\nlogfile \"{d}/redis.log\"\n");
        c += "dbfilename dump.rdb\nappendfilename appendonly.aof\nsave \"\"\n";
        // Full syncs start at once (7.0 waits 5 s by default for more replicas).
        c += "repl-diskless-sync-delay 0\n";
        c += &format!(
            "appendonly {}\n",
            if self.builder.appendonly { "yes" } else { "no" }
        );
        if server_major_version() >= 7 {
            c += "enable-debug-command yes\nenable-module-command yes\n";
        }
        if self.builder.module {
            c += &format!("loadmodule {}", module_path().display());
            for a in &self.builder.module_args {
                c += &format!(" {a}");
            }
            c += "\n";
        }
        if let Some(p) = self.builder.replicaof {
            c += &format!("replicaof 127.0.0.1 {p}\n");
        }
        for l in &self.builder.config {
            c += l;
            c += "\n";
        }
        fs::write(self.dir().join("redis.conf"), c).expect("write redis.conf");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let child = Command::new(redis_server_bin())
            .arg(self.dir().join("redis.conf"))
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", redis_server_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.as_mut().unwrap().stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                self.child = None;
                return Err(format!(
                    "redis-server exited during startup ({status}); stderr: {stderr}\n--- log tail ---\n{}",
                    self.log_tail(40)
                ));
            }
            if let Ok(mut c) = self.try_conn() {
                // While loading, PING answers -LOADING; wait for a real PONG.
                if let Ok(r) = redis::cmd("PING").query::<String>(&mut c) {
                    if r == "PONG" {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within 20s\n--- log tail ---\n{}",
                    self.port,
                    self.log_tail(40)
                ));
            }
            sleep(Duration::from_millis(20));
        }
    }

    fn try_conn(&self) -> redis::RedisResult<Connection> {
        let client = redis::Client::open(self.url())?;
        let c = client.get_connection_with_timeout(Duration::from_secs(5))?;
        c.set_read_timeout(Some(Duration::from_secs(60)))?;
        c.set_write_timeout(Some(Duration::from_secs(60)))?;
        Ok(c)
    }

    /// A new connection (db 0) with 60 s read/write timeouts.
    pub fn conn(&self) -> Connection {
        self.try_conn().unwrap_or_else(|e| {
            panic!(
                "connect to port {}: {e}\n--- log tail ---\n{}",
                self.port,
                self.log_tail(40)
            )
        })
    }

    /// A new connection that has SELECTed `db`.
    pub fn conn_db(&self, db: i64) -> Connection {
        let mut c = self.conn();
        let _: () = redis::cmd("SELECT").arg(db).query(&mut c).unwrap();
        c
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let Some(dir) = self.dir.as_ref() else {
            return String::new();
        };
        let mut f = match fs::File::open(dir.path().join("redis.log")) {
            Ok(f) => f,
            Err(_) => return "(no log)".into(),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut s = Vec::new();
        let _ = f.read_to_end(&mut s);
        let s = String::from_utf8_lossy(&s);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the server process is still running.
    pub fn is_alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// Panic (with the log tail) unless the server is alive and answers PING.
    pub fn assert_alive(&mut self, context: &str) {
        let alive = self.is_alive();
        let pong = alive
            && self
                .try_conn()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .map(|r| r == "PONG")
                .unwrap_or(false);
        if !pong {
            panic!(
                "server died or stopped answering PING after: {context}\n--- log tail ---\n{}",
                self.log_tail(60)
            );
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Under the leak check (scripts/leak-check.sh) the server must
            // exit on its own so valgrind can write its leak report: SIGTERM
            // makes redis-server shut down cleanly.
            if std::env::var_os("SLOTS_TEST_GRACEFUL").is_some() {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(c.id().to_string())
                    .status();
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.child.as_mut() {
                None => return true,
                Some(c) => {
                    if c.try_wait().unwrap().is_some() {
                        self.child = None;
                        return true;
                    }
                }
            }
            sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stop the server (see [`Stop`]) and start it again on the same dir and
    /// port (so it loads the RDB / AOF it left behind).
    pub fn restart(&mut self, how: Stop) {
        match how {
            Stop::Kill => self.kill(),
            Stop::ShutdownSave | Stop::ShutdownNoSave => {
                let arg = if how == Stop::ShutdownSave {
                    "SAVE"
                } else {
                    "NOSAVE"
                };
                let mut c = self.conn();
                // The connection is closed by the server: an IO error is expected.
                let r = redis::cmd("SHUTDOWN").arg(arg).query::<Value>(&mut c);
                if let Err(e) = &r {
                    if !e.is_io_error() && !e.is_connection_dropped() && !e.is_unrecoverable_error()
                    {
                        panic!("SHUTDOWN {arg} failed: {e}\n{}", self.log_tail(30));
                    }
                }
                if !self.wait_exit(Duration::from_secs(30)) {
                    panic!(
                        "server did not exit after SHUTDOWN {arg}\n{}",
                        self.log_tail(30)
                    );
                }
            }
        }
        self.write_conf();
        if let Err(e) = self.spawn_and_wait() {
            panic!("restart failed: {e}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(d) = self.dir.as_ref() {
                let log = self.log_tail(30);
                eprintln!(
                    "--- redis-server :{} log tail ({}) ---\n{log}",
                    self.port,
                    d.path().display()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Command helpers
// ---------------------------------------------------------------------------

/// Run a command given as a list of (binary-safe) arguments.
pub fn run<A: redis::ToRedisArgs>(conn: &mut Connection, args: &[A]) -> redis::RedisResult<Value> {
    let mut c = redis::Cmd::new();
    for a in args {
        c.arg(a);
    }
    c.query(conn)
}

/// Run a command that must succeed; panics with the error otherwise.
pub fn ok<A: redis::ToRedisArgs + std::fmt::Debug>(conn: &mut Connection, args: &[A]) -> Value {
    match run(conn, args) {
        Ok(v) => v,
        Err(e) => panic!("command {args:?} failed: {}", err_text(&e)),
    }
}

/// Full text of a server error: "CODE detail".
pub fn err_text(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(c), Some(d)) => format!("{c} {d}"),
        (Some(c), None) => c.to_string(),
        _ => e.to_string(),
    }
}

/// Run a command that must fail; returns the error text.
pub fn expect_err<A: redis::ToRedisArgs + std::fmt::Debug>(
    conn: &mut Connection,
    args: &[A],
) -> String {
    match run(conn, args) {
        Ok(v) => panic!("command {args:?} should have failed, got {v:?}"),
        Err(e) => {
            assert!(
                !e.is_io_error() && !e.is_connection_dropped(),
                "command {args:?}: connection error (server crash?): {e}"
            );
            err_text(&e)
        }
    }
}

pub fn as_int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::BulkString(b) => std::str::from_utf8(b).unwrap().parse().unwrap(),
        Value::SimpleString(s) => s.parse().unwrap(),
        other => panic!("expected integer, got {other:?}"),
    }
}

pub fn as_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.as_bytes().to_vec(),
        Value::Okay => b"OK".to_vec(),
        Value::Int(i) => i.to_string().into_bytes(),
        other => panic!("expected string, got {other:?}"),
    }
}

pub fn as_string(v: &Value) -> String {
    String::from_utf8_lossy(&as_bytes(v)).into_owned()
}

pub fn as_array(v: &Value) -> &Vec<Value> {
    match v {
        Value::Array(a) => a,
        Value::Set(a) => a,
        other => panic!("expected array, got {other:?}"),
    }
}

/// One `SLOTS.INFO` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotEntry {
    pub slot: u32,
    pub keys: u64,
    pub deleting: bool,
}

/// Parse a `SLOTS.INFO` reply strictly (shape, ascending slots, non-zero counts).
pub fn parse_slots_info(v: &Value) -> Vec<SlotEntry> {
    let mut out: Vec<SlotEntry> = Vec::new();
    for e in as_array(v) {
        let a = as_array(e);
        assert!(
            a.len() == 2 || a.len() == 3,
            "SLOTS.INFO entry must be [slot, keys] or [slot, keys, \"deleting\"], got {e:?}"
        );
        assert!(
            matches!(a[0], Value::Int(_)),
            "slot must be an integer: {e:?}"
        );
        assert!(
            matches!(a[1], Value::Int(_)),
            "keys must be an integer: {e:?}"
        );
        let deleting = if a.len() == 3 {
            assert_eq!(as_string(&a[2]), "deleting", "third element of {e:?}");
            true
        } else {
            false
        };
        let ent = SlotEntry {
            slot: as_int(&a[0]) as u32,
            keys: as_int(&a[1]) as u64,
            deleting,
        };
        if let Some(prev) = out.last() {
            assert!(
                prev.slot < ent.slot,
                "SLOTS.INFO not strictly ascending: {v:?}"
            );
        }
        out.push(ent);
    }
    out
}

pub fn slots_info_entries(conn: &mut Connection) -> Vec<SlotEntry> {
    parse_slots_info(&ok(conn, &["SLOTS.INFO"]))
}

/// `SLOTS.INFO` of the current db as slot -> keys (non-empty slots only).
pub fn slots_info(conn: &mut Connection) -> BTreeMap<u32, u64> {
    let entries = slots_info_entries(conn);
    let mut m = BTreeMap::new();
    for e in entries {
        assert!(
            e.keys > 0 || e.deleting,
            "SLOTS.INFO lists an empty slot {}: {e:?}",
            e.slot
        );
        if e.keys > 0 {
            m.insert(e.slot, e.keys);
        }
    }
    m
}

pub fn slots_count(conn: &mut Connection, slot: u32) -> u64 {
    as_int(&ok(conn, &["SLOTS.COUNT".to_string(), slot.to_string()])) as u64
}

pub fn slots_keys(conn: &mut Connection, slot: u32, count: u64) -> Vec<Vec<u8>> {
    let v = ok(
        conn,
        &[
            "SLOTS.KEYS".to_string(),
            slot.to_string(),
            count.to_string(),
        ],
    );
    as_array(&v).iter().map(as_bytes).collect()
}

pub fn hashkey(conn: &mut Connection, key: &[u8]) -> u32 {
    let v = ok(conn, &[b"SLOTS.HASHKEY".as_slice(), key]);
    let a = as_array(&v);
    assert_eq!(a.len(), 1, "SLOTS.HASHKEY one key -> one slot: {v:?}");
    as_int(&a[0]) as u32
}

/// One `SLOTS.SCAN slot cursor COUNT n` call -> (next cursor, keys).
pub fn slots_scan_once(
    conn: &mut Connection,
    slot: u32,
    cursor: &str,
    count: Option<u64>,
) -> (String, Vec<Vec<u8>>) {
    let mut args = vec![
        "SLOTS.SCAN".to_string(),
        slot.to_string(),
        cursor.to_string(),
    ];
    if let Some(n) = count {
        args.push("COUNT".into());
        args.push(n.to_string());
    }
    let v = ok(conn, &args);
    let a = as_array(&v);
    assert_eq!(a.len(), 2, "SLOTS.SCAN reply must be [cursor, keys]: {v:?}");
    assert!(
        matches!(a[0], Value::BulkString(_)),
        "SLOTS.SCAN cursor must be a bulk string: {v:?}"
    );
    let cur = as_string(&a[0]);
    let keys = as_array(&a[1]).iter().map(as_bytes).collect();
    (cur, keys)
}

/// Full `SLOTS.SCAN` of one slot (bounded number of iterations).
pub fn slots_scan_all(conn: &mut Connection, slot: u32, count: Option<u64>) -> Vec<Vec<u8>> {
    let mut cur = "0".to_string();
    let mut all = Vec::new();
    for _ in 0..1_000_000 {
        let (next, keys) = slots_scan_once(conn, slot, &cur, count);
        all.extend(keys);
        if next == "0" {
            return all;
        }
        cur = next;
    }
    panic!("SLOTS.SCAN of slot {slot} did not terminate");
}

/// `INFO <section>` as a map.
pub fn info(conn: &mut Connection, section: &str) -> HashMap<String, String> {
    let s: String = redis::cmd("INFO").arg(section).query(conn).unwrap();
    s.lines()
        .filter(|l| !l.starts_with('#') && l.contains(':'))
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.to_string(), v.trim().to_string())
        })
        .collect()
}

/// `INFO slots` as a map (asserting the field is there).
pub fn slots_info_field(conn: &mut Connection, field: &str) -> String {
    let m = info(conn, "slots");
    match m.get(field) {
        Some(v) => v.clone(),
        None => panic!("INFO slots has no field {field}; got {m:?}"),
    }
}

pub fn slots_info_num(conn: &mut Connection, field: &str) -> u64 {
    let v = slots_info_field(conn, field);
    v.parse()
        .unwrap_or_else(|_| panic!("INFO slots {field}:{v} is not an unsigned integer"))
}

pub fn dbsize(conn: &mut Connection) -> u64 {
    redis::cmd("DBSIZE").query(conn).unwrap()
}

/// `SLOTS.CHECK` must answer +OK.
pub fn check(conn: &mut Connection) {
    match redis::cmd("SLOTS.CHECK").query::<Value>(conn) {
        Ok(Value::Okay) => {}
        Ok(Value::SimpleString(s)) if s == "OK" => {}
        Ok(other) => panic!("SLOTS.CHECK returned {other:?}, expected +OK"),
        Err(e) => panic!("SLOTS.CHECK failed: {}", err_text(&e)),
    }
}

/// All keys of the current db (via SCAN, which also reclaims expired keys on a primary).
pub fn all_keys(conn: &mut Connection) -> Vec<Vec<u8>> {
    let mut cur: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cur)
            .arg("COUNT")
            .arg(1000)
            .query(conn)
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

/// Per-slot counts computed from the keyspace with the reference slot function.
pub fn model_counts(conn: &mut Connection, hash: HashFn) -> BTreeMap<u32, u64> {
    let mut m = BTreeMap::new();
    for k in all_keys(conn) {
        *m.entry(hash.slot(&k)).or_insert(0) += 1;
    }
    m
}

/// Compare SLOTS.INFO (current db) against the model from the keyspace, and
/// the sum of counts against DBSIZE.  Retries briefly, because keys with a
/// TTL can expire between reading the keyspace and reading SLOTS.INFO.
pub fn assert_model(conn: &mut Connection, hash: HashFn) {
    let mut last = String::new();
    for attempt in 0..20 {
        if attempt > 0 {
            sleep(Duration::from_millis(50));
        }
        let model = model_counts(conn, hash);
        let got = slots_info(conn);
        let size = dbsize(conn);
        let sum: u64 = got.values().sum();
        if model == got && sum == size {
            return;
        }
        last = format!(
            "SLOTS.INFO differs from model (dbsize {size}, SLOTS.INFO sum {sum}, model sum {})\n{}",
            model.values().sum::<u64>(),
            diff_counts(&model, &got)
        );
    }
    panic!("{last}");
}

/// `check` + `assert_model` on the current db + SLOTS.COUNT spot checks.
pub fn assert_exact(conn: &mut Connection, hash: HashFn) {
    check(conn);
    assert_no_resync(conn);
    assert_model(conn, hash);
    // SLOTS.INFO and SLOTS.COUNT in one transaction, so that active expiry
    // cannot delete a key between the two reads.
    let got = slots_info(conn);
    let slots: Vec<u32> = got.keys().take(50).copied().collect();
    let mut p = redis::pipe();
    p.atomic().cmd("SLOTS.INFO");
    for &slot in &slots {
        p.cmd("SLOTS.COUNT").arg(slot);
    }
    let v: Vec<Value> = p.query(conn).expect("MULTI SLOTS.INFO + SLOTS.COUNT");
    let info: BTreeMap<u32, u64> = parse_slots_info(&v[0])
        .into_iter()
        .map(|e| (e.slot, e.keys))
        .collect();
    for (i, &slot) in slots.iter().enumerate() {
        assert_eq!(
            as_int(&v[i + 1]) as u64,
            info.get(&slot).copied().unwrap_or(0),
            "SLOTS.COUNT {slot} vs SLOTS.INFO"
        );
    }
}

/// The module repairs its index from the keyspace when it notices it missed a
/// change (`slots_index_resyncs`, an extra INFO field beyond the documented
/// ones).  Nothing in these tests changes keys behind the server's back, so a
/// repair means the event path was wrong for a while, which SLOTS.CHECK run
/// after the repair would not show.  Set SLOTFORK_ALLOW_RESYNC=1 to skip.
pub fn assert_no_resync(conn: &mut Connection) {
    if std::env::var("SLOTFORK_ALLOW_RESYNC").is_ok() {
        return;
    }
    let i = info(conn, "slots");
    if let Some(v) = i.get("slots_index_resyncs") {
        assert_eq!(
            v, "0",
            "the module had to rebuild a db index because it disagreed with the keyspace \
             (slots_index_resyncs:{v}); see the server log for the triggering event"
        );
    }
}

/// `assert_exact` on each of the given dbs (restores db 0 selection at the end).
pub fn assert_exact_dbs(conn: &mut Connection, hash: HashFn, dbs: &[i64]) {
    for &db in dbs {
        let _: () = redis::cmd("SELECT").arg(db).query(conn).unwrap();
        assert_exact(conn, hash);
    }
    let _: () = redis::cmd("SELECT").arg(0).query(conn).unwrap();
}

pub fn diff_counts(model: &BTreeMap<u32, u64>, got: &BTreeMap<u32, u64>) -> String {
    let mut s = String::new();
    let mut n = 0;
    let slots: std::collections::BTreeSet<u32> = model.keys().chain(got.keys()).copied().collect();
    for slot in slots {
        let a = model.get(&slot).copied().unwrap_or(0);
        let b = got.get(&slot).copied().unwrap_or(0);
        if a != b {
            s += &format!("  slot {slot}: model {a}, SLOTS.INFO {b}\n");
            n += 1;
            if n >= 20 {
                s += "  ...\n";
                break;
            }
        }
    }
    s
}

/// Poll `cond` until it is true or `timeout` passes (then panic with `what`).
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        sleep(Duration::from_millis(20));
    }
}

/// Wait until no SLOTS.DEL is pending (`slots_del_pending_slots:0`).
pub fn wait_del_done(conn: &mut Connection) {
    wait_until(Duration::from_secs(60), "slots_del_pending_slots:0", || {
        slots_info_num(conn, "slots_del_pending_slots") == 0
    });
}

/// Wait until `replica` is connected to `primary` and has its replication offset.
pub fn wait_replica_sync(primary: &Server, replica: &Server) {
    let mut p = primary.conn();
    let mut r = replica.conn();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ri = info(&mut r, "replication");
        let pi = info(&mut p, "replication");
        let up = ri
            .get("master_link_status")
            .map(|s| s == "up")
            .unwrap_or(false);
        let loading = info(&mut r, "persistence")
            .get("loading")
            .map(|s| s == "1")
            .unwrap_or(false);
        let poff = pi.get("master_repl_offset").cloned().unwrap_or_default();
        let roff = ri.get("master_repl_offset").cloned().unwrap_or_default();
        if up && !loading && poff == roff && !poff.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "replica :{} did not sync with :{} (link up {up}, primary offset {poff}, replica offset {roff})\n--- replica log ---\n{}",
                replica.port,
                primary.port,
                replica.log_tail(30)
            );
        }
        sleep(Duration::from_millis(20));
    }
}

/// SET many keys quickly (pipelined, in batches).
pub fn set_many<K: AsRef<[u8]>>(conn: &mut Connection, keys: &[K]) {
    for chunk in keys.chunks(1000) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("SET").arg(k.as_ref()).arg("v").ignore();
        }
        let _: () = p.query(conn).unwrap();
    }
}

/// Keys `{tag}:0 .. {tag}:n-1` (all in slot(tag)).
pub fn tagged_keys(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{{{tag}}}:{i}")).collect()
}

/// The seed of a random workload: `SLOTFORK_SEED` to replay one, else the
/// clock. Printed so that a failure can be replayed.
pub fn seed(name: &str) -> u64 {
    let s = std::env::var("SLOTFORK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{name}: SLOTFORK_SEED={s}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vectors() {
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF43926);
        assert_eq!(HashFn::Crc32.slot(b"123456789"), 294);
        assert_eq!(HashFn::Crc32.slot(b"a{}b"), 0);
        assert_eq!(HashFn::Crc16.slot(b"foo"), 12182);
        assert_eq!(HashFn::Crc16.slot(b"{user1000}.following"), 3443);
        assert_eq!(HashFn::Crc16.slot(b"user1000"), 3443);
        assert_eq!(
            HashFn::Crc16.slot(b"foo{}{bar}"),
            crc16_xmodem(b"foo{}{bar}") as u32 & 16383
        );
        assert_eq!(codis_tag(b"foo{}{bar}"), b"");
        assert_eq!(codis_tag(b"a{b}c{d}"), b"b");
        assert_eq!(codis_tag(b"a{b"), b"a{b");
        assert_eq!(codis_tag(b"a}b{c"), b"a}b{c");
        assert_eq!(codis_tag(b"}{x}"), b"x");
        assert_eq!(codis_tag(b"{{x}}"), b"{x");
        assert_eq!(cluster_tag(b"{}x"), b"{}x");
        let t = tag_for_slot(HashFn::Crc32, 7);
        assert_eq!(HashFn::Crc32.slot(format!("{{{t}}}:1").as_bytes()), 7);
    }
}
