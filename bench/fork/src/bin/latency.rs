//! Client latency of stock vs patched redis-server around BGSAVE.
//!
//! For each dataset size, one run measures both servers, one after the other
//! (so both fit in memory): start the server, fill it with `DEBUG POPULATE`,
//! drive a GET/SET mix on random keys from several connections, trigger
//! `--saves` BGSAVEs (`--gap-secs` apart, each after the previous save and,
//! for the patched server, its fold-back ended), and record every request's
//! start time and latency. Reported per server: TP50/TP99/TP99.9/TP100 during
//! the save windows (BGSAVE sent .. save and fold ended) and outside them
//! (the baseline of this machine), fork stall (`latest_fork_usec`), save
//! duration, and memory during the saves (parent + child). Writes a JSON
//! file and an SVG plot (per-bucket max and p99 latency over time, forks and
//! save ends marked, one panel per server) for each size.
//!
//! cargo run --release -p forkpatch-bench --bin latency -- --gib 1,4,8
//! (see --help; bench/README.md has the recorded runs)

#[path = "../../../common/child.rs"]
mod child;
#[path = "../../../common/noise.rs"]
mod noise;
#[path = "../../../common/sched.rs"]
mod sched;
use clap::Parser;
use hdrhistogram::Histogram;
use plotters::prelude::*;
use sched::{online_cpus, pin_current_thread, set_fifo};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VALUE: usize = 1000;
/// Bytes of server memory per key of `DEBUG POPULATE <n> key 1000`
/// (value, key, dict entry, robj, allocator rounding): sizes the key count.
const BYTES_PER_KEY: usize = VALUE + 100;

#[derive(Parser, Debug, Serialize, Clone)]
#[command(
    about = "BGSAVE latency, fork stall, save time and memory: stock vs patched redis-server"
)]
struct Args {
    /// Dataset sizes in GiB (comma separated); each size is one JSON + SVG.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    gib: Vec<usize>,
    /// BGSAVEs per server.
    #[arg(long, default_value_t = 3)]
    saves: usize,
    /// Seconds of load before the first save, between saves and after the last.
    #[arg(long, default_value_t = 3.0)]
    gap_secs: f64,
    /// Client connections, one thread each, one request in flight each.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Total request rate over all clients (req/s); 0 = closed loop (each
    /// client sends its next request as soon as the reply arrives). With a
    /// rate, latency is counted from the scheduled send time, so a stall
    /// also counts for the requests that could not be sent during it.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Percentage of SETs (the rest are GETs).
    #[arg(long, default_value_t = 25)]
    set_percent: u64,
    /// CPU list for the server's main thread (Redis' `server_cpulist`),
    /// e.g. "0".
    #[arg(long)]
    server_cpus: Option<String>,
    /// CPU list for the save child (Redis' `bgsave_cpulist`), e.g. "1".
    #[arg(long)]
    save_cpus: Option<String>,
    /// CPU list for background threads (Redis' `bio_cpulist`; the patched
    /// server's engine threads follow it too). Default: --save-cpus.
    #[arg(long)]
    bio_cpus: Option<String>,
    /// CPU list for the client threads and the harness itself, e.g. "1".
    #[arg(long)]
    client_cpus: Option<String>,
    /// JSON output; "{gib}" is replaced by the size.
    #[arg(long, default_value = "target/bench-fork/latency-{gib}g.json")]
    json: String,
    /// SVG plot output; "{gib}" is replaced by the size.
    #[arg(long, default_value = "target/bench-fork/latency-{gib}g.svg")]
    svg: String,
    /// Plot bucket width in milliseconds.
    #[arg(long, default_value_t = 100)]
    bucket_ms: u64,
    /// Stock redis-server (default: .build/redis/stock/redis-server).
    #[arg(long)]
    stock: Option<PathBuf>,
    /// Patched redis-server (default: .build/redis/patched/redis-server).
    #[arg(long)]
    patched: Option<PathBuf>,
    /// Before each server, wait until the 1-minute load average is below this.
    #[arg(long, default_value_t = 1.0)]
    max_load: f64,
    /// Give up waiting for the load after this many seconds (and record it).
    #[arg(long, default_value_t = 600)]
    load_wait_secs: u64,
    /// Also read the server's /proc/<pid>/smaps_rollup every this many
    /// milliseconds for the whole run, as a memory monitor might (0 = off).
    /// Each read walks the heap's page tables holding the address-space
    /// lock for reading: this shows what such a monitor costs each server.
    #[arg(long, default_value_t = 0)]
    smaps_monitor_ms: u64,
    /// Run the client threads SCHED_FIFO at this priority (1-99; 0 = normal
    /// scheduling; needs root or CAP_SYS_NICE). On a 2-core machine the
    /// clients share a CPU with the save child; as normal tasks a woken
    /// client may wait milliseconds for the child's time slice to end, and
    /// that wait is the harness', not the server's. Real-time clients take
    /// the CPU as soon as their reply arrives. Combine with --rate, or
    /// closed-loop clients leave the save child little CPU.
    #[arg(long, default_value_t = 0)]
    client_rt_priority: i32,
    /// The patched server's `async-fork-rt-priority` (SCHED_FIFO priority
    /// of its fault handler). Default: one above --client-rt-priority when
    /// the clients are real-time (on a production host the clients live on
    /// other machines and never get ahead of the handler; here they share its
    /// CPUs), else the server's default (1).
    #[arg(long)]
    rt_priority: Option<i32>,
    /// CPU availability probe period in milliseconds (0 = off): a
    /// real-time thread on each CPU records how late it wakes (see
    /// bench/common/noise.rs). Requests that overlapped a probe stall of
    /// at least 1 ms are also summarised apart ("clear" figures), so a stall
    /// of the machine is not read as one of the server.
    #[arg(long, default_value_t = 1.0)]
    noise_probe_ms: f64,
    /// Which servers to run (comma separated): the targets are only checked
    /// when both ran.
    #[arg(long, value_delimiter = ',', default_value = "stock,patched")]
    servers: Vec<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Server {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(bin: &Path, patched: bool, a: &Args) -> Server {
    let port = free_port();
    // On disk, not in /tmp: an 8 GiB RDB must not land in a tmpfs.
    let dir = root().join(format!("target/bench-fork/server-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    // The harness may be pinned to the clients' CPUs (--client-cpus) and a
    // child inherits that mask: give the server every CPU back (taskset
    // execs it, so the pid stays the server's).
    let mut cmd = Command::new("taskset");
    child::die_with_parent(&mut cmd);
    cmd.args(["-c", &format!("0-{}", online_cpus() - 1)])
        .arg(bin);
    // Redis' own affinity settings (7.0), the same for both servers.
    if let Some(c) = &a.server_cpus {
        cmd.args(["--server_cpulist", c]);
    }
    if let Some(c) = &a.save_cpus {
        cmd.args(["--bgsave_cpulist", c]);
    }
    if let Some(c) = a.bio_cpus.as_ref().or(a.save_cpus.as_ref()) {
        cmd.args(["--bio_cpulist", c]);
    }
    if patched {
        let prio = a
            .rt_priority
            .or((a.client_rt_priority > 0).then(|| (a.client_rt_priority + 1).min(99)));
        if let Some(p) = prio {
            cmd.args(["--async-fork-rt-priority", &p.to_string()]);
        }
    }
    let child = cmd
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--enable-debug-command", "yes", "--logfile", "server.log"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server { child, port, dir };
    let t = Instant::now();
    while conn(&s)
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn conn(s: &Server) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{}/", s.port))?.get_connection()
}

fn field(c: &mut redis::Connection, section: &str, name: &str) -> Option<String> {
    let info: String = redis::cmd("INFO").arg(section).query(c).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::to_string))
}

fn num(c: &mut redis::Connection, section: &str, name: &str) -> u64 {
    field(c, section, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Other work on this 2-core machine shows up directly in the maxima, so a
/// measurement starts only once the machine is quiet (or the wait timed out,
/// which the JSON then says).
fn wait_for_quiet(max: f64, limit: Duration) -> (f64, String) {
    let t = Instant::now();
    while load1() >= max && t.elapsed() < limit {
        std::thread::sleep(Duration::from_secs(5));
    }
    (t.elapsed().as_secs_f64(), loadavg())
}

/// "0", "0-1", "0,1" -> CPU numbers.
fn parse_cpus(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => v.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => v.push(part.parse().unwrap()),
        }
    }
    v
}

/// Fields of a /proc file of `key: <n> kB` lines, in bytes.
fn kb_fields(s: &str, name: &str) -> u64 {
    s.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The server itself, from /proc/<pid>/status: plain counters, read without
/// the address-space lock. Not smaps_rollup: that walks every page table of
/// the heap (~15 ms per GiB here) holding the lock for reading, and the
/// patched server's fold-back takes the lock for writing while it parks
/// heap accesses; the walk then showed up as a client stall (final steps of
/// 6-42 ms at 1 GiB with a reader, 0.15-0.5 ms without).
#[derive(Default, Clone, Copy)]
struct ParentMem {
    rss: u64,
    anon: u64,
}

fn parent_mem(pid: u32) -> Option<ParentMem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ParentMem {
        rss: kb_fields(&s, "VmRSS:"),
        anon: kb_fields(&s, "RssAnon:"),
    })
}

/// The save child, from its smaps_rollup (it walks the child's tables under
/// the child's lock, which the server never needs).
#[derive(Default, Clone, Copy)]
struct ChildMem {
    rss: u64,
    /// Anonymous pages only the child maps. A copy-on-write page still
    /// shared with the parent is mapped twice and counts half in PSS, a
    /// private one fully: private = 2 * Pss_Anon - Anonymous.
    private_anon: u64,
}

fn child_mem(pid: u32) -> Option<ChildMem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(ChildMem {
        rss: kb_fields(&s, "Rss:"),
        private_anon: (2 * kb_fields(&s, "Pss_Anon:")).saturating_sub(kb_fields(&s, "Anonymous:")),
    })
}

/// The save child: the server forks from its main thread.
fn child_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes the patched server's heap memfd holds (0 for stock). The memfd
/// pages are shared by parent and child and, after a fold-back, mostly not
/// mapped by either, so RSS/PSS do not show them; st_blocks does.
fn memfd_bytes(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("/memfd:"))
                .unwrap_or(false)
        })
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// One memory sample during a save. `unique` counts every page once: the
/// server's anonymous pages (copy-on-write pages it still shares with the
/// child included), the anonymous pages only the child has, and the memfd's
/// pages. `rss_sum` is the plain parent + child RSS, which double-counts
/// shared pages (for the patched server every memfd page both map).
#[derive(Default, Clone, Copy, Serialize)]
struct MemSample {
    t_ms: u64,
    parent_rss: u64,
    child_rss: u64,
    rss_sum: u64,
    unique: u64,
}

fn mem_sample(pid: u32, t0: Instant) -> MemSample {
    let p = parent_mem(pid).unwrap_or_default();
    let c = child_of(pid).and_then(child_mem).unwrap_or_default();
    MemSample {
        t_ms: t0.elapsed().as_millis() as u64,
        parent_rss: p.rss,
        child_rss: c.rss,
        rss_sum: p.rss + c.rss,
        unique: p.anon + c.private_anon + memfd_bytes(pid),
    }
}

#[derive(Serialize, Clone, Default)]
struct Percentiles {
    requests: u64,
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
}

fn percentiles(h: &Histogram<u64>, secs: f64) -> Percentiles {
    Percentiles {
        requests: h.len(),
        per_sec: h.len() as f64 / secs.max(1e-9),
        p50_us: h.value_at_quantile(0.5),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
    }
}

#[derive(Serialize, Clone, Default)]
struct Save {
    /// Milliseconds since the load started.
    bgsave_sent_ms: f64,
    /// BGSAVE reply received (the fork returned in the parent).
    fork_end_ms: f64,
    /// `latest_fork_usec`: the server's whole fork stall.
    fork_usec: u64,
    /// Patched: `async_fork_last_switch_usec`, the part of `fork_usec` spent
    /// switching the heap to a private mapping (the rest is `fork()` itself
    /// and jemalloc's fork handlers).
    switch_usec: u64,
    /// `rdb_bgsave_in_progress` back to 0.
    save_end_ms: f64,
    save_ms: f64,
    /// Patched: `async_fork_state` back to idle (fold-back done).
    fold_end_ms: f64,
    fold_usec: u64,
    fold_final_usec: u64,
    /// Patched: CPU time the fold thread used in that final step, and the
    /// pages it copied there (wall far above CPU: it waited for a CPU).
    fold_final_cpu_usec: u64,
    fold_final_pages: u64,
    /// Patched: the fold's wait for a free address-space lock before its
    /// final step (nobody parked meanwhile).
    fold_lock_wait_usec: u64,
    overlay_bytes: u64,
    peak_rss_sum: u64,
    peak_unique: u64,
}

#[derive(Serialize, Clone, Default)]
struct Series {
    t_ms: Vec<u64>,
    p99_us: Vec<u64>,
    max_us: Vec<u64>,
}

#[derive(Serialize, Clone, Default)]
struct ServerReport {
    flavour: String,
    binary: String,
    load_wait_secs: f64,
    loadavg_before: String,
    loadavg_after: String,
    keys: usize,
    populate_secs: f64,
    /// Patched: `async_fork_rt_priority` as the server applied it.
    rt_priority: u64,
    used_memory: u64,
    used_memory_rss: u64,
    /// Memory (unique, as in `MemSample`) just before the first save.
    memory_before_saves: u64,
    load_secs: f64,
    all: Percentiles,
    during_saves: Percentiles,
    outside_saves: Percentiles,
    saves: Vec<Save>,
    fork_usec_median: u64,
    fork_usec_max: u64,
    save_ms_median: f64,
    peak_rss_sum: u64,
    peak_unique: u64,
    memory_samples: Vec<MemSample>,
    series: Series,
    /// Probe: per CPU, the longest time a real-time thread could not get
    /// that CPU back, during the save windows and outside them (us).
    cpu_unavailable_max_us_during: Vec<u64>,
    cpu_unavailable_max_us_outside: Vec<u64>,
    /// Probe stalls of >= 1 ms (any CPU).
    cpu_stalls_over_1ms: Vec<noise::CpuStall>,
    /// Requests that did not overlap a probe stall of >= 1 ms.
    during_saves_clear: Percentiles,
    outside_saves_clear: Percentiles,
    /// CPU time of the host's DAMON scanner (kdamond) during this run (ms).
    kdamond_cpu_ms: f64,
}

/// A request: start time in microseconds since t0 (high 40 bits) and its
/// latency in microseconds (low 24 bits, saturating at ~16.7 s).
fn pack(start_us: u64, lat_us: u64) -> u64 {
    (start_us << 24) | lat_us.min((1 << 24) - 1)
}

fn unpack(x: u64) -> (u64, u64) {
    (x >> 24, x & ((1 << 24) - 1))
}

fn worker(
    s: &Server,
    w: usize,
    a: &Args,
    keys: usize,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    let mut cc = conn(s).unwrap();
    let interval = (a.rate > 0).then(|| Duration::from_secs_f64(a.clients as f64 / a.rate as f64));
    let set_percent = a.set_percent;
    let clients = a.clients.max(1) as f64;
    let rt = a.client_rt_priority;
    std::thread::spawn(move || {
        if rt > 0 {
            set_fifo(rt);
        }
        let mut out = Vec::with_capacity(1 << 20);
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
        let value = "v".repeat(VALUE);
        // Paced clients start staggered so their requests interleave.
        let mut next =
            t0.elapsed() + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / clients));
        while !stop.load(Acquire) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = format!("key:{}", x % keys as u64);
            let start = match interval {
                Some(i) => {
                    let now = t0.elapsed();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let s = next;
                    next += i;
                    s
                }
                None => t0.elapsed(),
            };
            if (x >> 32) % 100 < set_percent {
                let _: () = redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .query(&mut cc)
                    .unwrap();
            } else {
                let _: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut cc).unwrap();
            }
            let lat = t0.elapsed().saturating_sub(start);
            out.push(pack(start.as_micros() as u64, lat.as_micros() as u64));
        }
        out
    })
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn run(flavour: &str, bin: &Path, gib: usize, a: &Args) -> ServerReport {
    let (waited, load_before) = wait_for_quiet(a.max_load, Duration::from_secs(a.load_wait_secs));
    println!("[{flavour} {gib} GiB] load {load_before} (waited {waited:.0} s); populating");
    let s = start(bin, flavour == "patched", a);
    let pid = s.pid();
    let mut c = conn(&s).unwrap();
    // 0 GiB: 1000 keys, the floor of a fork of this process.
    let keys = (gib * (1 << 30) / BYTES_PER_KEY).max(1000);
    let tp = Instant::now();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(keys)
        .arg("key")
        .arg(VALUE)
        .query(&mut c)
        .unwrap();
    let populate_secs = tp.elapsed().as_secs_f64();
    let mut r = ServerReport {
        flavour: flavour.to_string(),
        binary: bin.display().to_string(),
        load_wait_secs: waited,
        loadavg_before: load_before,
        keys,
        populate_secs,
        used_memory: num(&mut c, "memory", "used_memory"),
        rt_priority: num(&mut c, "persistence", "async_fork_rt_priority"),
        ..ServerReport::default()
    };
    let t0 = Instant::now();
    let kdamond_before = noise::kdamond_cpu_ms();
    let probe = (a.noise_probe_ms > 0.0).then(|| {
        noise::NoiseProbe::start(
            &(0..online_cpus()).collect::<Vec<_>>(),
            Duration::from_secs_f64(a.noise_probe_ms / 1e3),
            (a.client_rt_priority + 1).clamp(2, 99),
            200,
            t0,
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..a.clients)
        .map(|w| worker(&s, w, a, keys, t0, stop.clone()))
        .collect();

    // Memory sampler: every 250 ms while `sampling` (from the BGSAVE reply
    // to 300 ms after the fold). The child's smaps_rollup costs CPU, so it
    // is not run continuously.
    let sampling = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::<MemSample>::new()));
    let sampler = {
        let (sampling, samples, stop) = (sampling.clone(), samples.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Acquire) {
                if sampling.load(Acquire) {
                    let m = mem_sample(pid, t0);
                    samples.lock().unwrap().push(m);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let monitor = (a.smaps_monitor_ms > 0).then(|| {
        let (stop, every) = (stop.clone(), Duration::from_millis(a.smaps_monitor_ms));
        std::thread::spawn(move || {
            while !stop.load(Acquire) {
                let _ = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"));
                std::thread::sleep(every);
            }
        })
    });
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let gap = Duration::from_secs_f64(a.gap_secs);
    std::thread::sleep(gap);
    r.memory_before_saves = mem_sample(pid, t0).unique;
    r.used_memory_rss = num(&mut c, "memory", "used_memory_rss");
    for i in 0..a.saves {
        let sent = Instant::now();
        let _: String = redis::cmd("BGSAVE").query(&mut c).unwrap();
        let fork_end = Instant::now();
        sampling.store(true, Release);
        while num(&mut c, "persistence", "rdb_bgsave_in_progress") == 1 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let save_end = Instant::now();
        // The patched server folds the snapshot back after the child exits.
        while matches!(
            field(&mut c, "persistence", "async_fork_state").as_deref(),
            Some("folding" | "snapshot")
        ) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let fold_end = Instant::now();
        // One more sample after the fold: the old page tables of the flip
        // are torn down in the background for a while.
        std::thread::sleep(Duration::from_millis(300));
        sampling.store(false, Release);
        let mut save = Save {
            bgsave_sent_ms: ms(sent),
            fork_end_ms: ms(fork_end),
            fork_usec: num(&mut c, "stats", "latest_fork_usec"),
            switch_usec: num(&mut c, "persistence", "async_fork_last_switch_usec"),
            save_end_ms: ms(save_end),
            save_ms: save_end.duration_since(sent).as_secs_f64() * 1e3,
            fold_end_ms: ms(fold_end),
            fold_usec: num(&mut c, "persistence", "async_fork_last_fold_usec"),
            fold_final_usec: num(&mut c, "persistence", "async_fork_last_fold_final_usec"),
            fold_final_cpu_usec: num(&mut c, "persistence", "async_fork_last_fold_final_cpu_usec"),
            fold_final_pages: num(&mut c, "persistence", "async_fork_last_fold_final_pages"),
            fold_lock_wait_usec: num(&mut c, "persistence", "async_fork_last_fold_lock_wait_usec"),
            overlay_bytes: num(&mut c, "persistence", "async_fork_last_overlay_bytes"),
            ..Save::default()
        };
        for m in samples.lock().unwrap().iter() {
            if m.t_ms as f64 >= save.bgsave_sent_ms {
                save.peak_rss_sum = save.peak_rss_sum.max(m.rss_sum);
                save.peak_unique = save.peak_unique.max(m.unique);
            }
        }
        println!(
            "[{flavour} {gib} GiB] save {}: fork {} us (switch {} us), save {:.0} ms, fold {:.0} ms (final step {} us, CPU {} us, {} pages; lock wait {} us), peak memory {:.3} GB",
            i + 1,
            save.fork_usec,
            save.switch_usec,
            save.save_ms,
            save.fold_end_ms - save.save_end_ms,
            save.fold_final_usec,
            save.fold_final_cpu_usec,
            save.fold_final_pages,
            save.fold_lock_wait_usec,
            save.peak_unique as f64 / 1e9
        );
        r.saves.push(save);
        std::thread::sleep(gap);
    }
    stop.store(true, Release);
    r.load_secs = t0.elapsed().as_secs_f64();
    let stalls = probe.map(|p| p.finish()).unwrap_or_default();
    r.kdamond_cpu_ms = noise::kdamond_cpu_ms() - kdamond_before;
    let mut reqs: Vec<u64> = Vec::new();
    for w in workers {
        reqs.extend(w.join().unwrap());
    }
    sampler.join().unwrap();
    if let Some(m) = monitor {
        m.join().unwrap();
    }
    r.loadavg_after = loadavg();
    r.memory_samples = std::mem::take(&mut *samples.lock().unwrap());
    summarise(&mut r, reqs, &stalls, a.bucket_ms);
    r
}

fn summarise(r: &mut ServerReport, mut reqs: Vec<u64>, stalls: &[noise::CpuStall], bucket_ms: u64) {
    let hist = || Histogram::<u64>::new_with_bounds(1, 1 << 24, 3).unwrap();
    let (mut all, mut during, mut outside) = (hist(), hist(), hist());
    let (mut during_clear, mut outside_clear) = (hist(), hist());
    // Save windows in microseconds: BGSAVE sent .. save and fold ended. A
    // request overlapping a window counts as during it.
    let windows: Vec<(u64, u64)> = r
        .saves
        .iter()
        .map(|s| {
            (
                (s.bgsave_sent_ms * 1e3) as u64,
                (s.fold_end_ms.max(s.save_end_ms) * 1e3) as u64,
            )
        })
        .collect();
    let during_secs: f64 = windows.iter().map(|w| (w.1 - w.0) as f64 / 1e6).sum();
    reqs.sort_unstable();
    for &x in &reqs {
        let (st, lat) = unpack(x);
        let lat = lat.max(1);
        all.record(lat).unwrap();
        let clear = !noise::overlaps_stall(stalls, st, lat, noise::STALL_US);
        if windows.iter().any(|&(a, b)| st <= b && st + lat >= a) {
            during.record(lat).unwrap();
            if clear {
                during_clear.record(lat).unwrap();
            }
        } else {
            outside.record(lat).unwrap();
            if clear {
                outside_clear.record(lat).unwrap();
            }
        }
    }
    r.all = percentiles(&all, r.load_secs);
    r.during_saves = percentiles(&during, during_secs);
    r.outside_saves = percentiles(&outside, r.load_secs - during_secs);
    r.during_saves_clear = percentiles(&during_clear, during_secs);
    r.outside_saves_clear = percentiles(&outside_clear, r.load_secs - during_secs);
    let ncpu = online_cpus();
    r.cpu_unavailable_max_us_during = vec![0; ncpu];
    for &(a, b) in &windows {
        let m = noise::max_stall_per_cpu(stalls, ncpu, a, b);
        for (x, y) in r.cpu_unavailable_max_us_during.iter_mut().zip(m) {
            *x = (*x).max(y);
        }
    }
    r.cpu_unavailable_max_us_outside = vec![0; ncpu];
    for s in stalls {
        let inside = windows
            .iter()
            .any(|&(a, b)| s.start_us < b && s.start_us + s.late_us > a);
        if !inside && s.cpu < ncpu {
            let m = &mut r.cpu_unavailable_max_us_outside[s.cpu];
            *m = (*m).max(s.late_us);
        }
    }
    r.cpu_stalls_over_1ms = stalls
        .iter()
        .filter(|s| s.late_us >= noise::STALL_US)
        .copied()
        .collect();
    // Per-bucket p99 and max, by request start time.
    let b_us = bucket_ms * 1000;
    let mut i = 0;
    let mut lats = Vec::new();
    while i < reqs.len() {
        let b = unpack(reqs[i]).0 / b_us;
        lats.clear();
        while i < reqs.len() && unpack(reqs[i]).0 / b_us == b {
            lats.push(unpack(reqs[i]).1.max(1));
            i += 1;
        }
        lats.sort_unstable();
        r.series.t_ms.push(b * bucket_ms);
        r.series.max_us.push(*lats.last().unwrap());
        r.series
            .p99_us
            .push(lats[(lats.len() * 99).div_ceil(100) - 1]);
    }
    let forks: Vec<u64> = r.saves.iter().map(|s| s.fork_usec).collect();
    r.fork_usec_median = median_u64(&forks);
    r.fork_usec_max = forks.iter().copied().max().unwrap_or(0);
    r.save_ms_median = median_f64(&r.saves.iter().map(|s| s.save_ms).collect::<Vec<_>>());
    r.peak_rss_sum = r.saves.iter().map(|s| s.peak_rss_sum).max().unwrap_or(0);
    r.peak_unique = r.saves.iter().map(|s| s.peak_unique).max().unwrap_or(0);
}

#[derive(Serialize)]
struct Target {
    what: String,
    value: f64,
    limit: f64,
    met: bool,
}

#[derive(Serialize)]
struct SizeReport {
    gib: usize,
    unix_time: u64,
    cpus: usize,
    mem_total_bytes: u64,
    kernel: String,
    args: Args,
    servers: Vec<ServerReport>,
    targets: Vec<Target>,
}

fn targets(gib: usize, s: &ServerReport, p: &ServerReport) -> Vec<Target> {
    let t = |what: &str, value: f64, limit: f64| Target {
        what: what.to_string(),
        value,
        limit,
        met: value <= limit,
    };
    let mut v = vec![
        t("patched fork stall max (us)", p.fork_usec_max as f64, 500.0),
        t(
            "memory during a save, patched/stock (peak unique bytes)",
            p.peak_unique as f64 / s.peak_unique.max(1) as f64,
            1.05,
        ),
        t(
            "save duration, patched/stock (median)",
            p.save_ms_median / s.save_ms_median.max(1e-9),
            1.2,
        ),
    ];
    if gib >= 8 {
        v.push(t(
            "patched TP100 during BGSAVE (us)",
            p.during_saves.max_us as f64,
            2000.0,
        ));
    }
    v
}

fn plot(path: &Path, gib: usize, reports: &[ServerReport], bucket_ms: u64) {
    let t_max = reports
        .iter()
        .filter_map(|r| r.series.t_ms.last())
        .max()
        .copied()
        .unwrap_or(1) as f64
        / 1e3
        + 0.5;
    let y_max = reports
        .iter()
        .flat_map(|r| r.series.max_us.iter())
        .max()
        .copied()
        .unwrap_or(1000)
        .max(3000) as f64
        * 2.0;
    let root = SVGBackend::new(path, (1200, 760)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let root = root
        .titled(
            &format!(
                "redis-server 7.0.15, {gib} GiB, BGSAVE under GET/SET load: per-{bucket_ms} ms latency"
            ),
            ("sans-serif", 20),
        )
        .unwrap();
    let panels = root.split_evenly((reports.len(), 1));
    for (area, r) in panels.iter().zip(reports) {
        let title = format!(
            "{}: fork stall median {} us, max {} us; during saves p99 {} us, max {} us; outside saves max {} us",
            r.flavour,
            r.fork_usec_median,
            r.fork_usec_max,
            r.during_saves.p99_us,
            r.during_saves.max_us,
            r.outside_saves.max_us
        );
        let mut ch = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..t_max, (10f64..y_max).log_scale())
            .unwrap();
        ch.configure_mesh()
            .x_desc("seconds since load start")
            .y_desc("latency (us)")
            .light_line_style(WHITE)
            .draw()
            .unwrap();
        let xy = |v: &[u64]| -> Vec<(f64, f64)> {
            r.series
                .t_ms
                .iter()
                .zip(v)
                .map(|(&t, &l)| (t as f64 / 1e3, (l as f64).max(10.0)))
                .collect()
        };
        let mark = |ch: &mut ChartContext<_, _>, x: f64, color: RGBColor, label: Option<&str>| {
            let s = ch
                .draw_series(LineSeries::new(
                    [(x, 10.0), (x, y_max)],
                    color.stroke_width(1),
                ))
                .unwrap();
            if let Some(l) = label {
                s.label(l).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            }
        };
        ch.draw_series(LineSeries::new(
            [(0.0, 2000.0), (t_max, 2000.0)],
            RGBColor(150, 150, 150).stroke_width(1),
        ))
        .unwrap()
        .label("2 ms")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RGBColor(150, 150, 150)));
        ch.draw_series(LineSeries::new(xy(&r.series.max_us), RED.stroke_width(1)))
            .unwrap()
            .label("max")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED.stroke_width(2)));
        ch.draw_series(LineSeries::new(xy(&r.series.p99_us), BLUE.stroke_width(1)))
            .unwrap()
            .label("p99")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
        let orange = RGBColor(230, 140, 0);
        ch.draw_series(r.cpu_stalls_over_1ms.iter().map(|st| {
            Circle::new(
                (st.start_us as f64 / 1e6, st.late_us as f64),
                3,
                orange.filled(),
            )
        }))
        .unwrap()
        .label("CPU unavailable >= 1 ms (probe)")
        .legend(move |(x, y)| Circle::new((x + 8, y), 3, orange.filled()));
        for (i, s) in r.saves.iter().enumerate() {
            let first = i == 0;
            let fork_start = s.fork_end_ms - s.fork_usec as f64 / 1e3;
            mark(
                &mut ch,
                fork_start / 1e3,
                BLACK,
                first.then_some("fork start"),
            );
            mark(
                &mut ch,
                s.fork_end_ms / 1e3,
                RGBColor(120, 120, 120),
                first.then_some("fork end"),
            );
            mark(
                &mut ch,
                s.save_end_ms / 1e3,
                GREEN,
                first.then_some("save end"),
            );
            if s.fold_end_ms > s.save_end_ms + 1.0 {
                mark(
                    &mut ch,
                    s.fold_end_ms / 1e3,
                    MAGENTA,
                    first.then_some("fold-back end"),
                );
            }
        }
        ch.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .unwrap();
    }
    root.present().unwrap();
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let a = Args::parse();
    // Threads spawned later (clients, sampler) inherit this.
    if let Some(c) = &a.client_cpus {
        pin_current_thread(&parse_cpus(c));
    }
    let bins = [
        (
            "stock",
            a.stock
                .clone()
                .unwrap_or_else(|| root().join(".build/redis/stock/redis-server")),
        ),
        (
            "patched",
            a.patched
                .clone()
                .unwrap_or_else(|| root().join(".build/redis/patched/redis-server")),
        ),
    ];
    for (_, b) in &bins {
        assert!(
            b.exists(),
            "{} missing: run scripts/build-redis.sh",
            b.display()
        );
    }
    for &gib in &a.gib {
        // One server at a time: the dataset, a worst-case copy-on-write of
        // it during a save, and room for the rest of the machine.
        let need = (gib as u64 * (1 << 30)) * 2 + (2 << 30);
        let avail = forkpatch_bench::mem_available() as u64;
        if avail < need {
            println!(
                "skipping {gib} GiB: MemAvailable {:.1} GiB < {:.1} GiB needed",
                avail as f64 / (1u64 << 30) as f64,
                need as f64 / (1u64 << 30) as f64
            );
            continue;
        }
        let servers: Vec<ServerReport> = bins
            .iter()
            .filter(|(f, _)| a.servers.iter().any(|s| s == f))
            .map(|(f, b)| run(f, b, gib, &a))
            .collect();
        for r in &servers {
            println!(
                "{:8} {gib} GiB: CPU unavailable to a real-time probe: max per CPU {:?} us during saves, {:?} us outside; {} stalls >= 1 ms; kdamond CPU {:.0} ms | requests clear of them: during saves p99.9 {} max {} us ({} reqs), outside p99.9 {} max {} us",
                r.flavour,
                r.cpu_unavailable_max_us_during,
                r.cpu_unavailable_max_us_outside,
                r.cpu_stalls_over_1ms.len(),
                r.kdamond_cpu_ms,
                r.during_saves_clear.p999_us,
                r.during_saves_clear.max_us,
                r.during_saves_clear.requests,
                r.outside_saves_clear.p999_us,
                r.outside_saves_clear.max_us,
            );
            println!(
                "{:8} {gib} GiB: during saves p50 {} p99 {} p99.9 {} max {} us ({} reqs) | outside p50 {} p99 {} p99.9 {} max {} us | fork median {} max {} us | save median {:.0} ms | peak memory {:.3} GB (rss sum {:.3} GB) | load {} -> {}",
                r.flavour,
                r.during_saves.p50_us,
                r.during_saves.p99_us,
                r.during_saves.p999_us,
                r.during_saves.max_us,
                r.during_saves.requests,
                r.outside_saves.p50_us,
                r.outside_saves.p99_us,
                r.outside_saves.p999_us,
                r.outside_saves.max_us,
                r.fork_usec_median,
                r.fork_usec_max,
                r.save_ms_median,
                r.peak_unique as f64 / 1e9,
                r.peak_rss_sum as f64 / 1e9,
                r.loadavg_before,
                r.loadavg_after
            );
        }
        let targets = match servers.as_slice() {
            [s, p] => targets(gib, s, p),
            _ => Vec::new(),
        };
        for t in &targets {
            println!(
                "  {}: {:.3} (limit {}) {}",
                t.what,
                t.value,
                t.limit,
                if t.met { "met" } else { "MISSED" }
            );
        }
        let json = PathBuf::from(a.json.replace("{gib}", &gib.to_string()));
        let svg = PathBuf::from(a.svg.replace("{gib}", &gib.to_string()));
        for p in [&json, &svg] {
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).unwrap();
            }
        }
        plot(&svg, gib, &servers, a.bucket_ms);
        let report = SizeReport {
            gib,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            cpus: online_cpus(),
            mem_total_bytes: mem_total(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            args: a.clone(),
            servers,
            targets,
        };
        std::fs::write(&json, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("wrote {} and {}", json.display(), svg.display());
    }
}
