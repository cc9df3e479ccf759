//! Async slot migration (`SLOTS.MIGRATE`, module/MIGRATION.md) against the
//! loops a user writes today with stock `MIGRATE`, on stock redis-server with
//! `libslots.so` loaded on source and target.
//!
//! Scenarios (each variant on a fresh pair of servers holding the same data):
//!
//! - `small`: N keys of mixed types and sizes in the migrated slots; variants
//!   `async` (`SLOTS.MIGRATE ... SLOTS <slots>`), `batched` (per slot:
//!   `SLOTS.KEYS slot 100` then `MIGRATE host port "" 0 timeout KEYS k1..k100`
//!   until the slot is empty) and `serial` (the same with 1 key per MIGRATE).
//! - `bighash`: one hash of F fields; variants `async`
//!   (`SLOTS.MIGRATE.KEYS ... KEYS bighash`) and `migrate`
//!   (`MIGRATE ... KEYS bighash`, which blocks the source for the whole
//!   DUMP/RESTORE/DEL).
//!
//! During every migration, client connections run GET/SET (one request in
//! flight each) on keys of slots that are not migrated, and every request's
//! latency goes into HDR histograms (before / during / after the migration
//! window) and a max-per-100-ms series.
//!
//! cargo run --release -p slotfork-migrate-bench --bin migrate -- small --keys 1000000
//! cargo run --release -p slotfork-migrate-bench --bin migrate -- bighash --fields 5000000

// The per-run JSON record is one `json!` literal with many fields.
#![recursion_limit = "256"]

#[path = "../../common/child.rs"]
mod child;
#[path = "../../common/noise.rs"]
mod noise;
#[path = "../../common/sched.rs"]
mod sched;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use redis::Value;
use sched::set_fifo;
use serde_json::{json, Value as Json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const NSLOTS: u32 = 1024;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Scenario {
    /// many small keys in many slots
    Small,
    /// one hash with many fields
    Bighash,
}

#[derive(Parser, Debug)]
#[command(about = "SLOTS.MIGRATE vs MIGRATE loops: throughput and source client latency")]
struct Args {
    #[arg(value_enum)]
    scenario: Scenario,
    /// small: keys loaded into the migrated slots
    #[arg(long, default_value_t = 1_000_000)]
    keys: usize,
    /// small: the serial baseline (1 key per MIGRATE) stops after this many
    /// keys and its rate is reported for that subset (default: all keys)
    #[arg(long)]
    baseline_keys: Option<usize>,
    /// small: migrated slots, e.g. `0-1019` or `1,5-9`; client load uses keys
    /// of the other slots
    #[arg(long, default_value = "0-1019")]
    slots: String,
    /// small: keys per MIGRATE in the batched baseline
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// bighash: fields of the hash
    #[arg(long, default_value_t = 5_000_000)]
    fields: usize,
    /// variants to run, comma separated (small: async,batched,serial;
    /// bighash: async,migrate); default all
    #[arg(long)]
    variants: Option<String>,
    /// client load connections
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// client load: requests per second over all connections (0: as fast as
    /// the server answers, one request in flight per connection)
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// client load: keys (100-byte strings, 25% SET / 75% GET)
    #[arg(long, default_value_t = 10_000)]
    client_keys: usize,
    /// seconds of client load recorded before and after the migration window
    #[arg(long, default_value_t = 3.0)]
    idle_secs: f64,
    /// extra options for SLOTS.MIGRATE / SLOTS.MIGRATE.KEYS, e.g. "PARALLEL 2"
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    async_options: String,
    /// TIMEOUT argument of the baseline's MIGRATE (ms)
    #[arg(long, default_value_t = 120_000)]
    migrate_timeout_ms: u64,
    /// give up (and SLOTS.MIGRATE.CANCEL) after this many seconds
    #[arg(long, default_value_t = 3600)]
    max_secs: u64,
    /// JSON output (default target/bench-migrate/<scenario>.json)
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value = "/usr/bin/redis-server")]
    redis_server: PathBuf,
    /// the module (default <workspace>/target/release/libslots.so)
    #[arg(long)]
    module: Option<PathBuf>,
    /// before each measured migration, wait until the 1-minute load average is
    /// below this (0: don't wait) ...
    #[arg(long, default_value_t = 1.2)]
    max_load: f64,
    /// ... for at most this many seconds
    #[arg(long, default_value_t = 600)]
    load_wait_secs: u64,
    /// keys whose DEBUG DIGEST-VALUE (and TTL) is compared source vs target
    #[arg(long, default_value_t = 2000)]
    verify_sample: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// `CONFIG SET name value` on both servers after start, e.g.
    /// `--config-set slots.step-budget-us=1000` (repeatable)
    #[arg(long)]
    config_set: Vec<String>,
    /// CPU list for the source's main thread (Redis' `server_cpulist`),
    /// e.g. "0"; the module's connection threads, the bio threads
    /// (`bio_cpulist`) and jemalloc's purge thread go to
    /// --migrate-thread-cpus
    #[arg(long)]
    source_cpus: Option<String>,
    /// CPU list for the target's main thread (`server_cpulist`) and its
    /// background threads, e.g. "1"
    #[arg(long)]
    target_cpus: Option<String>,
    /// CPU list for the source's migration connection threads
    /// (`slots-migrate`, pinned with taskset once the job started; they
    /// inherit the main thread's otherwise), e.g. "1". Run the harness itself
    /// (clients) under `taskset -c 1` for the full layout.
    #[arg(long)]
    migrate_thread_cpus: Option<String>,
    /// Run the client threads SCHED_FIFO at this priority (1-99; 0 = normal
    /// scheduling; needs root or CAP_SYS_NICE). On 2 cores the clients share
    /// a CPU with the target and the connection threads; as normal tasks a
    /// woken client may wait milliseconds for another task's time slice to
    /// end, a wait that belongs to the harness, not to the source.
    #[arg(long, default_value_t = 0)]
    client_rt_priority: i32,
    /// CPU availability probe period in milliseconds (0 = off): a
    /// real-time thread on each CPU records how late it wakes (see
    /// bench/common/noise.rs). Requests of the migration window that
    /// overlapped a probe stall of at least 1 ms are also summarised apart
    /// (`client_during_clear`), so a stall of the machine is not read as one
    /// of the source.
    #[arg(long, default_value_t = 1.0)]
    noise_probe_ms: f64,
}

// ---------------------------------------------------------------- servers

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // SLOTFORK_BENCH_KEEP_LOGS=1 keeps each server's log (e.g. with
        // `--config-set loglevel=verbose`, the module's step-overrun lines).
        if std::env::var_os("SLOTFORK_BENCH_KEEP_LOGS").is_some() {
            let log = self.dir.join("server.log");
            let keep = std::env::temp_dir().join(format!("slotfork-bench-{}.log", self.port));
            if std::fs::copy(&log, &keep).is_ok() {
                eprintln!("  server log kept: {}", keep.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cpus`: the main thread's CPUs; `bg_cpus`: where the server's background
/// threads go (`bio_cpulist`, and jemalloc's purge thread once started), so
/// that with a pinned main thread nothing of the server's own competes for
/// its CPU.
fn start(bin: &Path, module: &Path, cpus: Option<&str>, bg_cpus: Option<&str>) -> Server {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("slotfork-migrate-bench-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(bin);
    child::die_with_parent(&mut cmd);
    if let Some(c) = cpus {
        cmd.args(["--server_cpulist", c]);
    }
    if let Some(c) = bg_cpus {
        cmd.args(["--bio_cpulist", c]);
    }
    let child = cmd
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--enable-debug-command", "yes", "--logfile", "server.log"])
        .arg("--dir")
        .arg(&dir)
        .arg("--loadmodule")
        .arg(module)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die(&format!("cannot start {}: {e}", bin.display())));
    let mut s = Server { child, port, dir };
    let t = Instant::now();
    while conn(&s)
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err()
    {
        if let Ok(Some(st)) = s.child.try_wait() {
            let log = std::fs::read_to_string(s.dir.join("server.log")).unwrap_or_default();
            die(&format!("redis-server exited ({st}); log:\n{log}"));
        }
        if t.elapsed() > Duration::from_secs(20) {
            die("redis-server did not answer PING within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(c) = bg_cpus {
        pin_threads(s.child.id(), "jemalloc_bg_thd", c);
    }
    s
}

fn conn(s: &Server) -> redis::RedisResult<redis::Connection> {
    conn_port(s.port)
}

fn conn_port(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()
}

fn die(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

fn info_num(c: &mut redis::Connection, section: &str, name: &str) -> u64 {
    let info: String = redis::cmd("INFO").arg(section).query(c).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields 14 and 15 of stat; `rest` starts at field 3
    (ticks(11) + ticks(12)) / 100.0
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn wait_for_quiet(max_load: f64, max_secs: u64) -> (f64, f64) {
    let t = Instant::now();
    let first = loadavg();
    if max_load > 0.0 && first >= max_load {
        eprint!("  waiting for load < {max_load} (now {first:.2})");
        while loadavg() >= max_load && t.elapsed() < Duration::from_secs(max_secs) {
            std::thread::sleep(Duration::from_secs(5));
        }
        eprintln!(
            " -> {:.2} after {:.0} s",
            loadavg(),
            t.elapsed().as_secs_f64()
        );
    }
    (loadavg(), t.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- data

/// CRC-32/IEEE of the key's hash tag & 1023: the module's default slot rule.
fn slot_of(key: &[u8]) -> u32 {
    let tag = match key.iter().position(|&b| b == b'{') {
        Some(o) => match key[o + 1..].iter().position(|&b| b == b'}') {
            Some(c) => &key[o + 1..o + 1 + c],
            None => key,
        },
        None => key,
    };
    let mut crc = !0u32;
    for &b in tag {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc & (NSLOTS - 1)
}

fn parse_slots(s: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (
            a.trim().parse().unwrap_or_else(|_| die("bad --slots")),
            b.trim().parse().unwrap_or_else(|_| die("bad --slots")),
        );
        if a > b || b >= NSLOTS {
            die("bad --slots range");
        }
        v.extend(a..=b);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Rng(u64);
impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut s = seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407);
        splitmix(&mut s);
        Rng(s)
    }
    fn next(&mut self) -> u64 {
        splitmix(&mut self.0)
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        const A: &[u8; 64] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let mut x = self.next();
            for _ in 0..10 {
                if v.len() == n {
                    break;
                }
                v.push(A[(x & 63) as usize]);
                x >>= 6;
            }
        }
        v
    }
}

/// Names of `n` keys whose slots are in `want` (sorted, zero-padded, so a
/// binary search finds a key's index).
fn key_names(prefix: &str, n: usize, want: impl Fn(u32) -> bool) -> Vec<String> {
    let mut v = Vec::with_capacity(n);
    let mut j = 0u64;
    while v.len() < n {
        let k = format!("{prefix}{j:010}");
        if want(slot_of(k.as_bytes())) {
            v.push(k);
        }
        j += 1;
    }
    v
}

/// Adds the commands creating key `i` (`name`) of the small scenario.
/// 70% strings of 16-200 B, 10% hashes, 10% lists/sets/zsets (5-20 small
/// elements), 10% strings of 1-4 KiB; 5% of all keys get a TTL of one hour.
fn add_small_key(p: &mut redis::Pipeline, seed: u64, i: usize, name: &str) {
    let mut r = Rng::new(seed, i as u64);
    let kind = r.next() % 100;
    match kind {
        0..=69 => {
            let n = r.range(16, 200);
            p.cmd("SET").arg(name).arg(r.bytes(n)).ignore();
        }
        70..=79 => {
            let c = p.cmd("HSET").arg(name);
            for f in 0..r.range(5, 20) {
                let n = r.range(8, 32);
                c.arg(format!("f{f}")).arg(r.bytes(n));
            }
            c.ignore();
        }
        80..=89 => {
            let t = kind % 3;
            let c = p.cmd(["RPUSH", "SADD", "ZADD"][t as usize]).arg(name);
            for e in 0..r.range(5, 20) {
                if t == 2 {
                    c.arg((r.next() % 1_000_000) as f64 / 7.0);
                }
                let n = r.range(8, 32);
                let mut m = r.bytes(n);
                m.extend_from_slice(format!(":{e}").as_bytes());
                c.arg(m);
            }
            c.ignore();
        }
        _ => {
            let n = r.range(1024, 4096);
            p.cmd("SET").arg(name).arg(r.bytes(n)).ignore();
        }
    }
    if r.next().is_multiple_of(20) {
        p.cmd("PEXPIRE").arg(name).arg(3_600_000).ignore();
    }
}

fn load_small(s: &Server, keys: &[String], seed: u64) {
    let mut c = conn(s).unwrap();
    for (b, chunk) in keys.chunks(1000).enumerate() {
        let mut p = redis::pipe();
        for (o, k) in chunk.iter().enumerate() {
            add_small_key(&mut p, seed, b * 1000 + o, k);
        }
        p.query::<()>(&mut c).unwrap();
    }
}

fn load_client_keys(s: &Server, keys: &[String], seed: u64) {
    let mut c = conn(s).unwrap();
    let mut r = Rng::new(seed, u64::MAX);
    for chunk in keys.chunks(1000) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("SET").arg(k).arg(r.bytes(100)).ignore();
        }
        p.query::<()>(&mut c).unwrap();
    }
}

fn load_bighash(s: &Server, fields: usize, seed: u64) {
    let mut c = conn(s).unwrap();
    let mut r = Rng::new(seed, 7);
    let mut i = 0;
    while i < fields {
        let mut p = redis::pipe();
        for _ in 0..10 {
            if i >= fields {
                break;
            }
            let c = p.cmd("HSET").arg("bighash");
            for _ in 0..1000.min(fields - i) {
                let n = r.range(8, 24);
                c.arg(format!("field:{i:09}")).arg(r.bytes(n));
                i += 1;
            }
            c.ignore();
        }
        p.query::<()>(&mut c).unwrap();
    }
}

/// DUMP payload size of every key (pipelined).
fn dump_sizes(s: &Server, keys: &[String]) -> Vec<u32> {
    let mut c = conn(s).unwrap();
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("DUMP").arg(k);
        }
        let v: Vec<Option<Vec<u8>>> = p.query(&mut c).unwrap();
        out.extend(v.iter().map(|d| d.as_ref().map_or(0, |d| d.len() as u32)));
    }
    out
}

/// (DEBUG DIGEST-VALUE, PTTL) of each key.
fn digests(port: u16, keys: &[String]) -> Vec<(String, i64)> {
    let mut c = conn_port(port).unwrap();
    let mut out = Vec::new();
    for chunk in keys.chunks(500) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("DEBUG").arg("DIGEST-VALUE").arg(k);
            p.cmd("PTTL").arg(k);
        }
        let v: Vec<Value> = p.query(&mut c).unwrap();
        for pair in v.chunks(2) {
            let d = match &pair[0] {
                Value::Array(a) => a.first().map(text).unwrap_or_default(),
                x => text(x),
            };
            let t = match &pair[1] {
                Value::Int(i) => *i,
                _ => -3,
            };
            out.push((d, t));
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Nil => "(nil)".into(),
        Value::VerbatimString { text, .. } => text.clone(),
        x => format!("{x:?}"),
    }
}

// ---------------------------------------------------------------- client load

const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

struct LoadOut {
    hist: [Histogram<u64>; 3],
    /// Requests of the DURING phase: (start in us since t0, latency in us).
    during: Vec<(u64, u64)>,
    series: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

struct ClientLoad {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU8>,
    t0: Instant,
    workers: Vec<JoinHandle<LoadOut>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap()
}

impl ClientLoad {
    fn start(
        port: u16,
        keys: Arc<Vec<String>>,
        clients: usize,
        rate: u64,
        seed: u64,
        rt_priority: i32,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicU8::new(BEFORE));
        let t0 = Instant::now();
        let interval = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(clients as f64 / rate as f64)
        };
        let workers = (0..clients)
            .map(|w| {
                let (stop, phase, keys) = (stop.clone(), phase.clone(), keys.clone());
                let mut c = conn_port(port).unwrap();
                std::thread::spawn(move || {
                    if rt_priority > 0 {
                        set_fifo(rt_priority);
                    }
                    let mut out = LoadOut {
                        hist: [hist(), hist(), hist()],
                        during: Vec::new(),
                        series: Vec::new(),
                        errors: 0,
                        first_error: None,
                    };
                    let mut r = Rng::new(seed, 1000 + w as u64);
                    let value = r.bytes(100);
                    let mut next = Instant::now();
                    while !stop.load(Acquire) {
                        if !interval.is_zero() {
                            let now = Instant::now();
                            if next > now {
                                std::thread::sleep(next - now);
                            }
                            // behind schedule (e.g. the server blocked): no burst
                            next = (next + interval).max(now);
                        }
                        let x = r.next();
                        let key = &keys[(x % keys.len() as u64) as usize];
                        let p0 = phase.load(Acquire);
                        let t = Instant::now();
                        let res = if x >> 60 < 4 {
                            redis::cmd("SET")
                                .arg(key)
                                .arg(&value)
                                .query::<Value>(&mut c)
                        } else {
                            redis::cmd("GET").arg(key).query::<Value>(&mut c)
                        };
                        let us = (t.elapsed().as_micros() as u64).max(1);
                        let p1 = phase.load(Acquire);
                        if let Err(e) = res {
                            out.errors += 1;
                            out.first_error.get_or_insert_with(|| e.to_string());
                        }
                        let p = if p0 == DURING || p1 == DURING || p0 != p1 {
                            DURING
                        } else {
                            p0
                        };
                        out.hist[p as usize].saturating_record(us);
                        if p == DURING {
                            out.during.push(((t - t0).as_micros() as u64, us));
                        }
                        let b = (t - t0).as_millis() as usize / 100;
                        if out.series.len() <= b {
                            out.series.resize(b + 1, 0);
                        }
                        out.series[b] = out.series[b].max(us);
                    }
                    out
                })
            })
            .collect();
        ClientLoad {
            stop,
            phase,
            t0,
            workers,
        }
    }

    fn set(&self, p: u8) -> f64 {
        self.phase.store(p, Release);
        self.t0.elapsed().as_secs_f64()
    }

    fn finish(self) -> LoadOut {
        self.stop.store(true, Release);
        let mut all: Option<LoadOut> = None;
        for w in self.workers {
            let o = w.join().unwrap();
            match &mut all {
                None => all = Some(o),
                Some(a) => {
                    for i in 0..3 {
                        a.hist[i].add(&o.hist[i]).unwrap();
                    }
                    a.during.extend(o.during);
                    if a.series.len() < o.series.len() {
                        a.series.resize(o.series.len(), 0);
                    }
                    for (x, y) in a.series.iter_mut().zip(&o.series) {
                        *x = (*x).max(*y);
                    }
                    a.errors += o.errors;
                    if a.first_error.is_none() {
                        a.first_error = o.first_error;
                    }
                }
            }
        }
        all.unwrap()
    }
}

fn pct(h: &Histogram<u64>) -> Json {
    json!({
        "requests": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "over_1ms": h.count_between(1001, u64::MAX),
        "over_5ms": h.count_between(5001, u64::MAX),
    })
}

// ---------------------------------------------------------------- migrations

struct Moved {
    keys: u64,
    bytes: u64,
    calls: u64,
    max_call_us: u64,
    status: BTreeMap<String, String>,
    snapshots: Vec<Json>,
    error: Option<String>,
}

fn status_map(v: &Value) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let items: Vec<Value> = match v {
        Value::Array(a) => a.clone(),
        Value::Map(kv) => kv
            .iter()
            .flat_map(|(k, v)| [k.clone(), v.clone()])
            .collect(),
        _ => vec![],
    };
    for p in items.chunks(2) {
        if p.len() == 2 {
            m.insert(text(&p[0]), text(&p[1]));
        }
    }
    m
}

/// Pins the threads of `pid` named `name` to `cpus` (taskset -p).
fn pin_threads(pid: u32, name: &str, cpus: &str) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let tid = t.file_name().to_string_lossy().into_owned();
            let ok = Command::new("taskset")
                .args(["-p", "-c", cpus, &tid])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|st| st.success());
            eprintln!("  pinned thread {tid} ({name}) to CPUs {cpus}: {ok}");
        }
    }
}

fn run_async(
    src: &Server,
    dst: &Server,
    what: &[String],
    by_key: bool,
    options: &str,
    max_secs: u64,
    migrate_thread_cpus: Option<&str>,
) -> Moved {
    let mut c = conn(src).unwrap();
    let mut cmd = redis::cmd(if by_key {
        "SLOTS.MIGRATE.KEYS"
    } else {
        "SLOTS.MIGRATE"
    });
    cmd.arg("127.0.0.1").arg(dst.port);
    for o in options.split_whitespace() {
        cmd.arg(o);
    }
    cmd.arg(if by_key { "KEYS" } else { "SLOTS" });
    for w in what {
        cmd.arg(w);
    }
    let mut out = Moved {
        keys: 0,
        bytes: 0,
        calls: 1,
        max_call_us: 0,
        status: BTreeMap::new(),
        snapshots: Vec::new(),
        error: None,
    };
    let t = Instant::now();
    let id: i64 = match cmd.query(&mut c) {
        Ok(id) => id,
        Err(e) => {
            out.error = Some(format!("SLOTS.MIGRATE: {e}"));
            return out;
        }
    };
    out.max_call_us = t.elapsed().as_micros() as u64;
    if let Some(cpus) = migrate_thread_cpus {
        pin_threads(src.child.id(), "slots-migrate", cpus);
    }
    let mut poll = conn(src).unwrap();
    loop {
        let st: redis::RedisResult<Value> = redis::cmd("SLOTS.MIGRATE.WAIT")
            .arg(id)
            .arg(200)
            .query(&mut c);
        let state = match st {
            Ok(v) => text(&v),
            Err(e) => {
                out.error = Some(format!("SLOTS.MIGRATE.WAIT: {e}"));
                break;
            }
        };
        let at = t.elapsed().as_secs_f64();
        match redis::cmd("SLOTS.MIGRATE.STATUS")
            .arg(id)
            .query::<Value>(&mut poll)
        {
            Ok(v) => {
                let m = status_map(&v);
                let g = |k: &str| m.get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1);
                out.snapshots.push(json!({
                    "t_s": at, "keys_moved": g("keys_moved"), "bytes_moved": g("bytes_moved"),
                    "keys_remaining": g("keys_remaining"), "keys_in_flight": g("keys_in_flight"),
                    "max_step_usec": g("max_step_usec"), "errors": g("errors"),
                }));
                out.status = m;
            }
            Err(e) => {
                out.error = Some(format!("SLOTS.MIGRATE.STATUS: {e}"));
                break;
            }
        }
        if state != "running" {
            if state != "done" {
                out.error = Some(format!(
                    "job ended {state}: last_error {}",
                    out.status.get("last_error").cloned().unwrap_or_default()
                ));
            }
            break;
        }
        if t.elapsed() > Duration::from_secs(max_secs) {
            let _ = redis::cmd("SLOTS.MIGRATE.CANCEL")
                .arg(id)
                .query::<Value>(&mut poll);
            out.error = Some(format!("not done after {max_secs} s: cancelled"));
            break;
        }
    }
    let g = |k: &str| out.status.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    out.keys = g("keys_moved");
    out.bytes = g("bytes_moved");
    out
}

/// The loop a user writes today: per slot, SLOTS.KEYS then MIGRATE of those
/// keys, until the slot is empty (or `limit` keys moved).
fn run_baseline(
    src: &Server,
    dst: &Server,
    slots: &[u32],
    per_call: usize,
    limit: usize,
    timeout_ms: u64,
    key_bytes: &dyn Fn(&str) -> u64,
) -> Moved {
    let mut c = conn(src).unwrap();
    let mut out = Moved {
        keys: 0,
        bytes: 0,
        calls: 0,
        max_call_us: 0,
        status: BTreeMap::new(),
        snapshots: Vec::new(),
        error: None,
    };
    'slots: for &slot in slots {
        loop {
            let keys: Vec<String> = match redis::cmd("SLOTS.KEYS")
                .arg(slot)
                .arg(per_call)
                .query(&mut c)
            {
                Ok(k) => k,
                Err(e) => {
                    out.error = Some(format!("SLOTS.KEYS {slot}: {e}"));
                    break 'slots;
                }
            };
            if keys.is_empty() {
                break;
            }
            let t = Instant::now();
            let r: redis::RedisResult<Value> = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(dst.port)
                .arg("")
                .arg(0)
                .arg(timeout_ms)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut c);
            out.max_call_us = out.max_call_us.max(t.elapsed().as_micros() as u64);
            out.calls += 1;
            if let Err(e) = r {
                out.error = Some(format!("MIGRATE: {e}"));
                break 'slots;
            }
            out.keys += keys.len() as u64;
            out.bytes += keys.iter().map(|k| key_bytes(k)).sum::<u64>();
            if out.keys as usize >= limit {
                break 'slots;
            }
        }
    }
    out
}

fn migrate_bighash_baseline(src: &Server, dst: &Server, timeout_ms: u64, bytes: u64) -> Moved {
    let mut c = conn(src).unwrap();
    let t = Instant::now();
    let r: redis::RedisResult<Value> = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(dst.port)
        .arg("")
        .arg(0)
        .arg(timeout_ms)
        .arg("KEYS")
        .arg("bighash")
        .query(&mut c);
    Moved {
        keys: r.is_ok() as u64,
        bytes: if r.is_ok() { bytes } else { 0 },
        calls: 1,
        max_call_us: t.elapsed().as_micros() as u64,
        status: BTreeMap::new(),
        snapshots: Vec::new(),
        error: r.err().map(|e| format!("MIGRATE: {e}")),
    }
}

// ---------------------------------------------------------------- runs

struct Ctx {
    args: Args,
    module: PathBuf,
    migrate_slots: Vec<u32>,
    keys: Vec<String>,
    client_keys: Arc<Vec<String>>,
    sizes: Vec<u32>,
    sample: Vec<String>,
    sample_digests: Vec<(String, i64)>,
}

fn run_variant(ctx: &mut Ctx, variant: &str) -> Json {
    let a = &ctx.args;
    let big = a.scenario == Scenario::Bighash;
    eprintln!("== {:?} / {variant}: starting servers", a.scenario);
    // With a pinned source, its background threads go where its connection
    // threads go; the target's stay with its main thread.
    let src_bg = a.source_cpus.as_ref().and(a.migrate_thread_cpus.as_deref());
    let src = start(
        &a.redis_server,
        &ctx.module,
        a.source_cpus.as_deref(),
        src_bg,
    );
    let dst = start(
        &a.redis_server,
        &ctx.module,
        a.target_cpus.as_deref(),
        a.target_cpus.as_deref(),
    );
    let mut c = conn(&src).unwrap();
    for s in [&src, &dst] {
        let mut cc = conn(s).unwrap();
        for kv in &a.config_set {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| die("--config-set takes name=value"));
            if let Err(e) = redis::cmd("CONFIG")
                .arg("SET")
                .arg(k)
                .arg(v)
                .query::<Value>(&mut cc)
            {
                die(&format!("CONFIG SET {k} {v}: {e}"));
            }
        }
    }
    // The harness's slot rule must match the module's.
    for k in ctx
        .keys
        .iter()
        .take(50)
        .chain(ctx.client_keys.iter().take(50))
    {
        let s: Vec<i64> = redis::cmd("SLOTS.HASHKEY").arg(k).query(&mut c).unwrap();
        if s[0] != slot_of(k.as_bytes()) as i64 {
            die(&format!(
                "slot of {k}: module {} harness {}",
                s[0],
                slot_of(k.as_bytes())
            ));
        }
    }
    let tl = Instant::now();
    if big {
        load_bighash(&src, a.fields, a.seed);
    } else {
        load_small(&src, &ctx.keys, a.seed);
    }
    load_client_keys(&src, &ctx.client_keys, a.seed);
    let load_s = tl.elapsed().as_secs_f64();
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut c).unwrap();
    eprintln!("  loaded {dbsize} keys in {load_s:.1} s");
    if ctx.sizes.is_empty() {
        let t = Instant::now();
        ctx.sizes = dump_sizes(&src, &ctx.keys);
        ctx.sample_digests = digests(src.port, &ctx.sample);
        eprintln!(
            "  DUMP payloads: {} bytes in {} keys ({:.1} s)",
            ctx.sizes.iter().map(|&s| s as u64).sum::<u64>(),
            ctx.keys.len(),
            t.elapsed().as_secs_f64()
        );
    }
    let total_bytes: u64 = ctx.sizes.iter().map(|&s| s as u64).sum();
    let mem_src0 = info_num(&mut c, "memory", "used_memory");
    let mut cd = conn(&dst).unwrap();
    let mem_dst0 = info_num(&mut cd, "memory", "used_memory");

    let (load_before, waited) = wait_for_quiet(a.max_load, a.load_wait_secs);
    let cl = ClientLoad::start(
        src.port,
        ctx.client_keys.clone(),
        a.clients,
        a.rate,
        a.seed,
        a.client_rt_priority,
    );
    let probe = (a.noise_probe_ms > 0.0).then(|| {
        noise::NoiseProbe::start(
            &(0..sched::online_cpus()).collect::<Vec<_>>(),
            Duration::from_secs_f64(a.noise_probe_ms / 1e3),
            (a.client_rt_priority + 1).clamp(2, 99),
            200,
            cl.t0,
        )
    });
    std::thread::sleep(Duration::from_secs_f64(a.idle_secs));
    let (cpu_s0, cpu_d0) = (cpu_secs(src.child.id()), cpu_secs(dst.child.id()));
    let kdamond0 = noise::kdamond_cpu_ms();
    let window_start = cl.set(DURING);
    let t = Instant::now();
    let keys = &ctx.keys;
    let sizes = &ctx.sizes;
    let key_bytes = |k: &str| -> u64 {
        keys.binary_search_by(|x| x.as_str().cmp(k))
            .map_or(0, |i| sizes[i] as u64)
    };
    let limit = match variant {
        "serial" => a.baseline_keys.unwrap_or(usize::MAX),
        _ => usize::MAX,
    };
    let slot_args: Vec<String> = ctx.migrate_slots.iter().map(u32::to_string).collect();
    let m = match (big, variant) {
        (false, "async") => run_async(
            &src,
            &dst,
            &slot_args,
            false,
            &a.async_options,
            a.max_secs,
            a.migrate_thread_cpus.as_deref(),
        ),
        (false, "batched") => run_baseline(
            &src,
            &dst,
            &ctx.migrate_slots,
            a.batch,
            limit,
            a.migrate_timeout_ms,
            &key_bytes,
        ),
        (false, "serial") => run_baseline(
            &src,
            &dst,
            &ctx.migrate_slots,
            1,
            limit,
            a.migrate_timeout_ms,
            &key_bytes,
        ),
        (true, "async") => run_async(
            &src,
            &dst,
            &["bighash".to_string()],
            true,
            &a.async_options,
            a.max_secs,
            a.migrate_thread_cpus.as_deref(),
        ),
        (true, "migrate") => {
            migrate_bighash_baseline(&src, &dst, a.migrate_timeout_ms, total_bytes)
        }
        _ => die(&format!("unknown variant {variant}")),
    };
    let wall = t.elapsed().as_secs_f64();
    let window_end = cl.set(AFTER);
    let (cpu_s1, cpu_d1) = (cpu_secs(src.child.id()), cpu_secs(dst.child.id()));
    let kdamond_ms = noise::kdamond_cpu_ms() - kdamond0;
    std::thread::sleep(Duration::from_secs_f64(a.idle_secs));
    let lo = cl.finish();
    let stalls = probe.map(|p| p.finish()).unwrap_or_default();
    let (w0_us, w1_us) = ((window_start * 1e6) as u64, (window_end * 1e6) as u64);
    let cpu_unavailable = noise::max_stall_per_cpu(&stalls, sched::online_cpus(), w0_us, w1_us);
    let window_stalls: Vec<_> = stalls
        .iter()
        .filter(|s| {
            s.late_us >= noise::STALL_US && s.start_us < w1_us && s.start_us + s.late_us > w0_us
        })
        .copied()
        .collect();
    let mut during_clear = hist();
    for &(st, us) in &lo.during {
        if !noise::overlaps_stall(&stalls, st, us, noise::STALL_US) {
            during_clear.saturating_record(us);
        }
    }
    let load_after = loadavg();
    if let Some(e) = &m.error {
        eprintln!("  ERROR: {e}");
    }

    // Verification.
    let mut problems: Vec<String> = Vec::new();
    let src_db: u64 = redis::cmd("DBSIZE").query(&mut c).unwrap_or(0);
    let dst_db: u64 = redis::cmd("DBSIZE").query(&mut cd).unwrap_or(0);
    let n_client = ctx.client_keys.len() as u64;
    let n_total = ctx.keys.len() as u64;
    let moved_keys = if variant == "async" {
        n_total - (src_db - n_client).min(n_total)
    } else {
        m.keys
    };
    if src_db + dst_db != n_total + n_client {
        problems.push(format!(
            "key count: source {src_db} + target {dst_db} != {} loaded",
            n_total + n_client
        ));
    }
    if dst_db != moved_keys {
        problems.push(format!(
            "target holds {dst_db} keys, {moved_keys} reported moved"
        ));
    }
    let complete = limit == usize::MAX && m.error.is_none();
    if complete && src_db != n_client {
        problems.push(format!(
            "source still holds {} migrated keys",
            src_db - n_client
        ));
    }
    let after = digests(dst.port, &ctx.sample);
    let mut checked = 0;
    for ((k, (d0, t0)), (d1, t1)) in ctx.sample.iter().zip(&ctx.sample_digests).zip(&after) {
        let on_target = d1.chars().any(|ch| ch != '0');
        if !on_target {
            if complete {
                problems.push(format!("{k} missing on target"));
            }
            continue;
        }
        checked += 1;
        if d0 != d1 {
            problems.push(format!("{k}: digest {d1} on target, {d0} on source before"));
        }
        if (*t0 > 0) != (*t1 > 0) || (*t0 > 0 && (t1 - t0).abs() > 600_000) {
            problems.push(format!("{k}: pttl {t1} on target, {t0} on source before"));
        }
    }
    for (name, cc) in [("source", &mut c), ("target", &mut cd)] {
        match redis::cmd("SLOTS.CHECK").query::<Value>(cc) {
            Ok(Value::Okay) => {}
            Ok(Value::SimpleString(s)) if s == "OK" => {}
            Ok(v) => problems.push(format!("SLOTS.CHECK on {name}: {}", text(&v))),
            Err(e) => problems.push(format!("SLOTS.CHECK on {name}: {e}")),
        }
    }
    problems.truncate(20);
    let mem_src1 = info_num(&mut c, "memory", "used_memory");
    let mem_dst1 = info_num(&mut cd, "memory", "used_memory");
    let bytes = if variant == "async" && complete {
        total_bytes
    } else {
        m.bytes
    };

    let during = &lo.hist[DURING as usize];
    let mut outside = lo.hist[BEFORE as usize].clone();
    outside.add(&lo.hist[AFTER as usize]).unwrap();
    let step_us: Option<u64> = m.status.get("max_step_usec").and_then(|v| v.parse().ok());
    eprintln!(
        "  {variant}: {moved_keys} keys in {wall:.2} s, client max during {} us (clear of CPU stalls: {} us), outside {} us; CPU unavailable to a real-time probe during the window: max {:?} us per CPU, {} stalls >= 1 ms, kdamond CPU {:.0} ms; verify: {} sampled keys checked, {} problems",
        during.max(),
        during_clear.max(),
        outside.max(),
        cpu_unavailable,
        window_stalls.len(),
        kdamond_ms,
        checked,
        problems.len()
    );
    for p in &problems {
        eprintln!("  PROBLEM: {p}");
    }
    let b0 = (window_start * 10.0) as usize;
    let b1 = ((window_end * 10.0) as usize + 1).min(lo.series.len());
    json!({
        "variant": variant,
        "command": match (big, variant) {
            (false, "async") => format!("SLOTS.MIGRATE 127.0.0.1 <port> {} SLOTS <{} slots>", a.async_options, ctx.migrate_slots.len()),
            (false, "batched") => format!("per slot: SLOTS.KEYS slot {0}; MIGRATE 127.0.0.1 <port> \"\" 0 {1} KEYS <{0} keys>", a.batch, a.migrate_timeout_ms),
            (false, _) => format!("per slot: SLOTS.KEYS slot 1; MIGRATE 127.0.0.1 <port> \"\" 0 {} KEYS <key>", a.migrate_timeout_ms),
            (true, "async") => format!("SLOTS.MIGRATE.KEYS 127.0.0.1 <port> {} KEYS bighash", a.async_options),
            (true, _) => format!("MIGRATE 127.0.0.1 <port> \"\" 0 {} KEYS bighash", a.migrate_timeout_ms),
        },
        "error": m.error,
        "keys_total": n_total,
        "keys_moved": moved_keys,
        "subset": limit != usize::MAX,
        "wall_s": wall,
        "keys_per_s": moved_keys as f64 / wall,
        "fields_per_s": if big && moved_keys == 1 { Some(a.fields as f64 / wall) } else { None },
        "dump_bytes": bytes,
        "mb_per_s": bytes as f64 / wall / 1e6,
        "bytes_moved_status": m.bytes,
        "calls": m.calls,
        "max_call_us": m.max_call_us,
        "max_step_usec": step_us,
        "max_step_cpu_usec": m.status.get("max_step_cpu_usec").and_then(|v| v.parse::<u64>().ok()),
        "steps": m.status.get("steps").and_then(|v| v.parse::<u64>().ok()),
        "steps_over_1ms": m.status.get("steps_over_1ms").and_then(|v| v.parse::<u64>().ok()),
        "steps_over_1ms_cpu": m.status.get("steps_over_1ms_cpu").and_then(|v| v.parse::<u64>().ok()),
        "status": m.status,
        "status_series": m.snapshots,
        "client_during": pct(during),
        "client_during_clear": pct(&during_clear),
        "cpu_unavailable_max_us_during": cpu_unavailable,
        "cpu_stalls_over_1ms_during": window_stalls,
        "kdamond_cpu_ms_during": kdamond_ms,
        "client_outside": pct(&outside),
        "client_before": pct(&lo.hist[BEFORE as usize]),
        "client_after": pct(&lo.hist[AFTER as usize]),
        "client_errors": lo.errors,
        "client_first_error": lo.first_error,
        "max_per_100ms_us": lo.series,
        "window_s": [window_start, window_end],
        "window_max_per_100ms_us": lo.series.get(b0.min(b1)..b1).map(|s| s.to_vec()),
        "cpu_s": {"source": cpu_s1 - cpu_s0, "target": cpu_d1 - cpu_d0},
        "used_memory": {"source_before": mem_src0, "source_after": mem_src1,
                         "target_before": mem_dst0, "target_after": mem_dst1},
        "load_s": load_s,
        "loadavg_before": load_before, "loadavg_after": load_after, "load_wait_s": waited,
        "verify": {"sampled_keys_checked": checked, "problems": problems},
    })
}

fn fmt_us(v: &Json) -> String {
    format!(
        "{}/{}/{}/{}",
        v["p50_us"], v["p99_us"], v["p999_us"], v["max_us"]
    )
}

fn main() {
    let args = Args::parse();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().unwrap_or(root);
    let module = args
        .module
        .clone()
        .unwrap_or_else(|| root.join("target/release/libslots.so"));
    if !module.exists() {
        die(&format!(
            "{} missing: build the module first with `cargo build --release -p slots`",
            module.display()
        ));
    }
    if !args.redis_server.exists() {
        die(&format!(
            "{} missing (apt-get install redis-server)",
            args.redis_server.display()
        ));
    }
    let big = args.scenario == Scenario::Bighash;
    let variants: Vec<String> = args
        .variants
        .clone()
        .unwrap_or_else(|| {
            if big {
                "async,migrate"
            } else {
                "async,batched,serial"
            }
            .into()
        })
        .split(',')
        .map(str::to_string)
        .collect();
    let migrate_slots = if big {
        vec![slot_of(b"bighash")]
    } else {
        parse_slots(&args.slots)
    };
    let mut in_set = vec![false; NSLOTS as usize];
    for &s in &migrate_slots {
        in_set[s as usize] = true;
    }
    if migrate_slots.len() == NSLOTS as usize {
        die(
            "the client load needs slots that are not migrated: give --slots fewer than 1024 slots",
        );
    }
    let keys = if big {
        vec!["bighash".to_string()]
    } else {
        key_names("m:", args.keys, |s| in_set[s as usize])
    };
    let client_keys = Arc::new(key_names("c:", args.client_keys, |s| !in_set[s as usize]));
    let step = (keys.len() / args.verify_sample.max(1)).max(1);
    let sample: Vec<String> = keys.iter().step_by(step).cloned().collect();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cmdline: Vec<String> = std::env::args().collect();
    let json_path = args.json.clone().unwrap_or_else(|| {
        root.join("target/bench-migrate")
            .join(format!("{}.json", if big { "bighash" } else { "small" }))
    });
    let mut ctx = Ctx {
        args,
        module,
        migrate_slots,
        keys,
        client_keys,
        sizes: Vec::new(),
        sample,
        sample_digests: Vec::new(),
    };
    let start_load = loadavg();
    let mut runs = Vec::new();
    for v in &variants {
        runs.push(run_variant(&mut ctx, v));
    }
    let a = &ctx.args;

    // Table.
    println!();
    println!(
        "scenario {:?}: {} {}, client load {} connections at {} req/s total{}{}, date {date}",
        a.scenario,
        if big { a.fields } else { ctx.keys.len() },
        if big { "hash fields" } else { "keys" },
        a.clients,
        if a.rate == 0 {
            "unthrottled".to_string()
        } else {
            a.rate.to_string()
        },
        if a.config_set.is_empty() {
            String::new()
        } else {
            format!(", config {}", a.config_set.join(" "))
        },
        if a.async_options.is_empty() {
            String::new()
        } else {
            format!(", async options '{}'", a.async_options)
        },
    );
    println!(
        "{:<8} {:>9} {:>8} {:>10} {:>7} {:>25} {:>25} {:>14} {:>8} {:>6}",
        "variant",
        "keys",
        "wall s",
        if big { "fields/s" } else { "keys/s" },
        "MB/s",
        "during p50/99/99.9/max us",
        "outside p50/99/99.9/max",
        "step us",
        "src CPU",
        "load"
    );
    for r in &runs {
        let step = match r["max_step_usec"].as_u64() {
            Some(s) => match r["max_step_cpu_usec"].as_u64() {
                Some(c) => format!("{s}/{c}"),
                None => s.to_string(),
            },
            None => format!("{}*", r["max_call_us"]),
        };
        println!(
            "{:<8} {:>9} {:>8.2} {:>10.0} {:>7.1} {:>25} {:>25} {:>14} {:>7.1}s {:>6.2}{}{}",
            r["variant"].as_str().unwrap(),
            r["keys_moved"].as_u64().unwrap(),
            r["wall_s"].as_f64().unwrap(),
            r[if big { "fields_per_s" } else { "keys_per_s" }]
                .as_f64()
                .unwrap_or(0.0),
            r["mb_per_s"].as_f64().unwrap(),
            fmt_us(&r["client_during"]),
            fmt_us(&r["client_outside"]),
            step,
            r["cpu_s"]["source"].as_f64().unwrap(),
            r["loadavg_before"].as_f64().unwrap(),
            if r["subset"].as_bool().unwrap() {
                "  (subset)"
            } else {
                ""
            },
            match r["error"].as_str() {
                Some(e) => format!("  ERROR: {}", e.chars().take(120).collect::<String>()),
                None => String::new(),
            },
        );
    }
    for r in &runs {
        let d = &r["client_during"];
        println!(
            "{}: client requests during the migration window {}, over 1 ms {}, over 5 ms {}; errors {}",
            r["variant"].as_str().unwrap(),
            d["requests"],
            d["over_1ms"],
            d["over_5ms"],
            r["client_errors"]
        );
    }
    println!("MB = sum of DUMP payload sizes of the moved keys; step us: the module's max_step_usec/max_step_cpu_usec (async: wall/CPU time of its longest step) or, *, the longest MIGRATE call seen by the harness");
    let find = |v: &str| {
        runs.iter()
            .find(|r| r["variant"] == v && r["error"].is_null())
    };
    let mut summary = json!({});
    if let Some(asy) = find("async") {
        let k = asy["keys_per_s"].as_f64().unwrap();
        for base in ["serial", "batched", "migrate"] {
            if let Some(b) = find(base) {
                let ratio = k / b["keys_per_s"].as_f64().unwrap();
                let mb = asy["mb_per_s"].as_f64().unwrap() / b["mb_per_s"].as_f64().unwrap();
                println!("async / {base}: keys/s {ratio:.2}x, MB/s {mb:.2}x, client max during {} vs {} us", asy["client_during"]["max_us"], b["client_during"]["max_us"]);
                summary[format!("async_vs_{base}_keys_per_s")] = json!(ratio);
            }
        }
        let tp100 = asy["client_during"]["max_us"].as_u64().unwrap();
        println!(
            "targets: source TP100 during async migration {tp100} us (target <= 5000: {}; {} us for requests clear of CPU stalls); max_step_usec {} (CPU {}), steps over 1 ms {} of {} (CPU: {}){}",
            if tp100 <= 5000 { "met" } else { "NOT met" },
            asy["client_during_clear"]["max_us"],
            asy["max_step_usec"],
            asy["max_step_cpu_usec"],
            asy["steps_over_1ms"],
            asy["steps"],
            asy["steps_over_1ms_cpu"],
            if big { String::new() } else {
                match summary.get("async_vs_serial_keys_per_s").and_then(Json::as_f64) {
                    Some(r) => format!("; keys/s vs the 1-key MIGRATE loop {r:.1}x (target >= 10x: {})", if r >= 10.0 { "met" } else { "NOT met" }),
                    None => String::new(),
                }
            }
        );
    }
    let out = json!({
        "scenario": format!("{:?}", a.scenario).to_lowercase(),
        "date": date,
        "command": cmdline.join(" "),
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_at_start": start_load,
        "redis_server": a.redis_server,
        "module": ctx.module,
        "params": {
            "keys": ctx.keys.len(), "fields": a.fields, "slots": a.slots, "migrated_slots": ctx.migrate_slots.len(),
            "clients": a.clients, "rate": a.rate, "client_keys": a.client_keys, "idle_secs": a.idle_secs,
            "batch": a.batch, "baseline_keys": a.baseline_keys, "async_options": a.async_options, "seed": a.seed,
            "config_set": a.config_set,
            "source_cpus": a.source_cpus,
            "target_cpus": a.target_cpus,
            "migrate_thread_cpus": a.migrate_thread_cpus,
            "client_rt_priority": a.client_rt_priority,
        },
        "summary": summary,
        "runs": runs,
    });
    if let Some(d) = json_path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("json: {}", json_path.display());
}
