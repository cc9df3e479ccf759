//! Client latency of stock vs patched redis-server during BGSAVE.
//!
//! For each server (from `scripts/build-redis.sh`): start it, fill it with
//! `DEBUG POPULATE` to the requested size, run client threads issuing
//! SET/GET on random keys (one request in flight per client) and record
//! every request's latency in HDR histograms, split by whether a BGSAVE (and,
//! for the patched server, its fold) was in progress; trigger BGSAVE
//! periodically. Prints per-server percentiles, fork stall, save duration
//! and memory, then the patched/stock ratios against the targets.
//!
//! cargo run --release -p forkpatch-bench --bin latency -- [GiB] [seconds] [clients]
//! (defaults 1 GiB, 30 s, 4 clients)

use hdrhistogram::Histogram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: usize = 1000;

struct Server {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(bin: &Path) -> Server {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("forkpatch-latency-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(bin)
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
    let s = Server {
        child,
        port,
        _dir: dir,
    };
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

#[derive(Default)]
struct Report {
    all: Option<Histogram<u64>>,
    during: Option<Histogram<u64>>,
    fork_usec: Vec<u64>,
    save_ms: Vec<u64>,
    used_memory: u64,
    rss: u64,
}

fn run(bin: &Path, gib: usize, secs: u64, clients: usize) -> Report {
    let s = start(bin);
    let mut c = conn(&s).unwrap();
    let keys = gib * (1 << 30) / (VALUE + 100);
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(keys)
        .arg("key")
        .arg(VALUE)
        .query(&mut c)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let saving = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..clients {
        let (stop, saving) = (stop.clone(), saving.clone());
        let mut cc = conn(&s).unwrap();
        workers.push(std::thread::spawn(move || {
            let mut all = Histogram::<u64>::new(3).unwrap();
            let mut during = Histogram::<u64>::new(3).unwrap();
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1);
            let value = "v".repeat(VALUE);
            while !stop.load(Acquire) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let key = format!("key:{}", x % keys as u64);
                let in_save = saving.load(Acquire);
                let t = Instant::now();
                if x.is_multiple_of(4) {
                    let _: () = redis::cmd("SET")
                        .arg(&key)
                        .arg(&value)
                        .query(&mut cc)
                        .unwrap();
                } else {
                    let _: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut cc).unwrap();
                }
                let us = t.elapsed().as_micros() as u64;
                all.record(us.max(1)).unwrap();
                if in_save || saving.load(Acquire) {
                    during.record(us.max(1)).unwrap();
                }
            }
            (all, during)
        }));
    }
    let mut r = Report {
        used_memory: num(&mut c, "memory", "used_memory"),
        rss: num(&mut c, "memory", "used_memory_rss"),
        ..Report::default()
    };
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    while t0.elapsed() < Duration::from_secs(secs) {
        saving.store(true, Release);
        let ts = Instant::now();
        let _: String = redis::cmd("BGSAVE").query(&mut c).unwrap();
        while num(&mut c, "persistence", "rdb_bgsave_in_progress") == 1 {
            std::thread::sleep(Duration::from_millis(5));
        }
        r.save_ms.push(ts.elapsed().as_millis() as u64);
        // The patched server keeps folding after the child exits.
        while matches!(
            field(&mut c, "persistence", "async_fork_state").as_deref(),
            Some("folding" | "snapshot")
        ) {
            std::thread::sleep(Duration::from_millis(5));
        }
        saving.store(false, Release);
        r.fork_usec.push(num(&mut c, "stats", "latest_fork_usec"));
        std::thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Release);
    for w in workers {
        let (a, d) = w.join().unwrap();
        match (&mut r.all, &mut r.during) {
            (Some(ra), Some(rd)) => {
                ra.add(&a).unwrap();
                rd.add(&d).unwrap();
            }
            _ => {
                r.all = Some(a);
                r.during = Some(d);
            }
        }
    }
    r
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let gib: usize = args.first().map_or(1, |a| a.parse().expect("GiB"));
    let secs: u64 = args.get(1).map_or(30, |a| a.parse().expect("seconds"));
    let clients: usize = args.get(2).map_or(4, |a| a.parse().expect("clients"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.build/redis");
    let mut reports = Vec::new();
    for flavour in ["stock", "patched"] {
        let bin = root.join(flavour).join("redis-server");
        assert!(
            bin.exists(),
            "{} missing: run scripts/build-redis.sh",
            bin.display()
        );
        let r = run(&bin, gib, secs, clients);
        let (a, d) = (r.all.as_ref().unwrap(), r.during.as_ref().unwrap());
        println!(
            "{flavour:8} {gib} GiB: all p50 {} p99 {} p99.9 {} max {} us | during BGSAVE p99 {} max {} us ({} reqs) | fork median {} max {} us | save median {} ms | used_memory {} rss {}",
            a.value_at_quantile(0.5),
            a.value_at_quantile(0.99),
            a.value_at_quantile(0.999),
            a.max(),
            d.value_at_quantile(0.99),
            d.max(),
            d.len(),
            median(&r.fork_usec),
            r.fork_usec.iter().max().unwrap_or(&0),
            median(&r.save_ms),
            r.used_memory,
            r.rss
        );
        reports.push(r);
    }
    let (s, p) = (&reports[0], &reports[1]);
    println!(
        "patched vs stock: TP100 during BGSAVE {} vs {} us (target <= 2000), fork stall max {} vs {} us (target <= 500), rss ratio {:.3} (target <= 1.05), save duration ratio {:.2} (target <= 1.2)",
        p.during.as_ref().unwrap().max(),
        s.during.as_ref().unwrap().max(),
        p.fork_usec.iter().max().unwrap_or(&0),
        s.fork_usec.iter().max().unwrap_or(&0),
        p.rss as f64 / s.rss.max(1) as f64,
        median(&p.save_ms) as f64 / median(&s.save_ms).max(1) as f64
    );
}
