//! Redis-level tests against the patched redis-server built by
//! `scripts/build-redis.sh` (`.build/redis/patched/redis-server`; override
//! with FORKPATCH_REDIS_SERVER). Skipped, with a message, when the binary is
//! missing unless FORKPATCH_REQUIRE_REDIS=1.
//!
//! A single client writes `MSET k:<i> v<i> seq <i>` for i = 1, 2, ... while
//! snapshots are taken. Redis executes commands one at a time, so a correct
//! snapshot holds exactly a prefix: seq = S, every k:j for j <= S with its
//! value, nothing above S. The primary must hold every acknowledged write.

mod proc_threads;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn server_bin() -> Option<PathBuf> {
    let p = std::env::var_os("FORKPATCH_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.build/redis/patched/redis-server")
        });
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("FORKPATCH_REQUIRE_REDIS").is_none(),
        "{} missing: run scripts/build-redis.sh",
        p.display()
    );
    eprintln!(
        "skipped: {} missing (run scripts/build-redis.sh)",
        p.display()
    );
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(bin: &Path, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(bin, dir, extra)
    }

    fn start_in(bin: &Path, dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::start_wrapped(&[], bin, dir, extra)
    }

    /// Starts the server through `wrapper` (e.g. `setpriv ... --`, which
    /// execs it, so killing the child kills the server), or directly.
    fn start_wrapped(
        wrapper: &[&str],
        bin: &Path,
        dir: tempfile::TempDir,
        extra: &[&str],
    ) -> Server {
        let port = free_port();
        let mut cmd = match wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--logfile", "server.log"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let s = Server { child, port, dir };
        let t = Instant::now();
        loop {
            if let Ok(mut c) = s.try_conn() {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    break;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "server did not start: {}",
                s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))?.get_connection()
    }

    fn conn(&self) -> redis::Connection {
        self.try_conn().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn info(&self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query(&mut self.conn())
            .unwrap()
    }

    fn field(&self, section: &str, name: &str) -> String {
        let info = self.info(section);
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {name} in INFO {section}"))
    }

    fn wait_field(&self, section: &str, name: &str, want: &str) {
        let t = Instant::now();
        while self.field(section, name) != want {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{name} never became {want}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the background save and the fold after it.
    fn wait_bgsave(&self) {
        self.wait_field("persistence", "rdb_bgsave_in_progress", "0");
        assert_eq!(
            self.field("persistence", "rdb_last_bgsave_status"),
            "ok",
            "{}",
            self.log()
        );
        self.wait_not_folding();
    }

    fn wait_not_folding(&self) {
        let t = Instant::now();
        while ["folding", "snapshot"]
            .contains(&self.field("persistence", "async_fork_state").as_str())
        {
            assert!(t.elapsed() < Duration::from_secs(120));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn shutdown(mut self) -> tempfile::TempDir {
        let _ = redis::cmd("SHUTDOWN")
            .arg("NOSAVE")
            .query::<()>(&mut self.conn());
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn val(i: u64) -> String {
    format!("v{i}-{}", "x".repeat((i % 64) as usize))
}

/// Background writer: `MSET k:i v(i) seq i`; `acked` is the last reply seen.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    t: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(s: &Server) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut c = s.conn();
        let (st, ak) = (stop.clone(), acked.clone());
        let t = std::thread::spawn(move || {
            let mut i = 0;
            while !st.load(Acquire) {
                i += 1;
                let _: () = redis::cmd("MSET")
                    .arg(format!("k:{i}"))
                    .arg(val(i))
                    .arg("seq")
                    .arg(i)
                    .query(&mut c)
                    .expect("write failed");
                ak.store(i, Release);
            }
        });
        Writer {
            stop,
            acked,
            t: Some(t),
        }
    }

    fn wait_for(&self, n: u64) {
        let base = self.acked.load(Acquire);
        while self.acked.load(Acquire) < base + n {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Release);
        self.t.take().unwrap().join().unwrap();
        self.acked.load(Acquire)
    }
}

/// Checks that db 0 of `c` holds exactly the prefix 1..=S of the writer's
/// keys plus `base` other keys; returns S.
fn check_prefix(c: &mut redis::Connection, base: u64) -> u64 {
    let s: u64 = redis::cmd("GET")
        .arg("seq")
        .query::<Option<u64>>(c)
        .unwrap()
        .unwrap_or(0);
    let mut j = 1;
    while j <= s {
        let hi = (j + 999).min(s);
        let keys: Vec<String> = (j..=hi).map(|k| format!("k:{k}")).collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(c).unwrap();
        for (k, v) in (j..=hi).zip(vals) {
            assert_eq!(v.as_deref(), Some(val(k).as_str()), "k:{k} wrong (seq {s})");
        }
        j = hi + 1;
    }
    let above: Option<String> = redis::cmd("GET")
        .arg(format!("k:{}", s + 1))
        .query(c)
        .unwrap();
    assert!(above.is_none(), "k:{} present although seq is {s}", s + 1);
    let size: u64 = redis::cmd("DBSIZE").query(c).unwrap();
    assert_eq!(
        size,
        base + s + u64::from(s > 0),
        "extra or missing keys (seq {s})"
    );
    s
}

/// Loads an RDB file into a fresh server and checks it is an exact prefix.
fn check_rdb(bin: &Path, rdb: &Path, base: u64) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(rdb, dir.path().join("dump.rdb")).unwrap();
    let s = Server::start_in(bin, dir, &["--async-fork", "no"]);
    s.wait_field("persistence", "loading", "0");
    check_prefix(&mut s.conn(), base)
}

const BASE_KEYS: u64 = 200_000;

fn populate(s: &Server) {
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(BASE_KEYS)
        .arg("key")
        .arg(100)
        .query(&mut s.conn())
        .unwrap();
}

#[test]
fn bgsave_holds_exactly_the_dataset_at_the_fork() {
    let Some(bin) = server_bin() else { return };
    let s = Server::start(&bin, &[]);
    assert_eq!(
        s.field("persistence", "async_fork_active"),
        "1",
        "{}",
        s.info("persistence")
    );
    populate(&s);
    let w = Writer::start(&s);
    let mut rdbs = Vec::new();
    for n in 0..4 {
        w.wait_for(2000);
        let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
        s.wait_bgsave();
        let copy = s.dir.path().join(format!("snap{n}.rdb"));
        std::fs::copy(s.dir.path().join("dump.rdb"), &copy).unwrap();
        rdbs.push(copy);
        // Toggle async fork off and on between saves (stock fork in between).
        if n == 1 {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("async-fork")
                .arg("no")
                .query(&mut s.conn())
                .unwrap();
            assert_eq!(s.field("persistence", "async_fork_active"), "0");
        }
        if n == 2 {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("async-fork")
                .arg("yes")
                .query(&mut s.conn())
                .unwrap();
            s.wait_not_folding();
            assert_eq!(s.field("persistence", "async_fork_active"), "1");
        }
    }
    let last = w.stop();
    s.wait_not_folding();
    assert_eq!(
        check_prefix(&mut s.conn(), BASE_KEYS),
        last,
        "primary lost acknowledged writes"
    );
    let mut prev = 0;
    for r in &rdbs {
        let seq = check_rdb(&bin, r, BASE_KEYS);
        assert!(seq >= prev && seq > 0);
        prev = seq;
    }
    let folds: u64 = s.field("persistence", "async_fork_folds").parse().unwrap();
    assert!(folds >= 3, "{}", s.info("persistence"));
    // The last fold's final step: its CPU time within its wall time, and
    // the pages it copied, reported.
    let field = |n: &str| -> u64 { s.field("persistence", n).parse().unwrap() };
    let (wall, cpu) = (
        field("async_fork_last_fold_final_usec"),
        field("async_fork_last_fold_final_cpu_usec"),
    );
    assert!(cpu > 0 && cpu <= wall, "{}", s.info("persistence"));
    field("async_fork_last_fold_final_pages");
    eprintln!(
        "latest_fork_usec {} last_fold_usec {} overlay {}",
        s.field("stats", "latest_fork_usec"),
        s.field("persistence", "async_fork_last_fold_usec"),
        s.field("persistence", "async_fork_last_overlay_bytes")
    );
}

#[test]
fn aof_rewrite_and_restart_keep_every_acknowledged_write() {
    let Some(bin) = server_bin() else { return };
    let s = Server::start(&bin, &["--appendonly", "yes", "--appendfsync", "always"]);
    populate(&s);
    let w = Writer::start(&s);
    for _ in 0..3 {
        w.wait_for(2000);
        let _: String = redis::cmd("BGREWRITEAOF").query(&mut s.conn()).unwrap();
        s.wait_field("persistence", "aof_rewrite_in_progress", "0");
        assert_eq!(s.field("persistence", "aof_last_bgrewrite_status"), "ok");
        s.wait_not_folding();
    }
    w.wait_for(1000);
    let last = w.stop();
    assert_eq!(check_prefix(&mut s.conn(), BASE_KEYS), last);
    let dir = s.shutdown();
    let s = Server::start_in(&bin, dir, &["--appendonly", "yes"]);
    s.wait_field("persistence", "loading", "0");
    assert_eq!(
        check_prefix(&mut s.conn(), BASE_KEYS),
        last,
        "AOF lost writes"
    );
}

/// serverCron's own forks do not block the main thread on a running fold
/// (`fpForkDeferred`): a BGSAVE SCHEDULEd during an AOF rewrite starts only
/// after the rewrite's fold-back, and the server answers meanwhile (with a
/// blocking wait, the main thread would sit in fork() for the whole fold and
/// no INFO could show "folding" with no child). The save is still exact.
#[test]
fn scheduled_bgsave_waits_for_the_fold_on_a_later_cron_tick() {
    let Some(bin) = server_bin() else { return };
    // -10: the rewrite child sleeps ~50 us after one key in ten (~1 s).
    let s = Server::start(
        &bin,
        &["--appendonly", "yes", "--rdb-key-save-delay", "-10"],
    );
    populate(&s);
    s.wait_field("persistence", "aof_rewrite_in_progress", "0");
    s.wait_not_folding();
    let w = Writer::start(&s);
    w.wait_for(1000);
    let mut c = s.conn();
    let _: String = redis::cmd("BGREWRITEAOF").query(&mut c).unwrap();
    // The child has its copy of the delay; the BGSAVE child runs at speed.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("rdb-key-save-delay")
        .arg(0)
        .query(&mut c)
        .unwrap();
    let r: String = redis::cmd("BGSAVE").arg("SCHEDULE").query(&mut c).unwrap();
    assert_eq!(r, "Background saving scheduled");
    // Overwrite random populated keys while the rewrite child lives: every
    // page written becomes overlay, which makes the fold long enough to see.
    // Writing on during the fold keeps its rounds going (up to 16).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut overwrite = |c: &mut redis::Connection, n: usize| {
        let mut p = redis::pipe();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            p.cmd("SET")
                .arg(format!("key:{}", x % BASE_KEYS))
                .arg("y".repeat(100))
                .ignore();
        }
        let _: () = p.query(c).unwrap();
    };
    while s.field("persistence", "aof_rewrite_in_progress") == "1" {
        overwrite(&mut c, 2000);
    }
    let mut deferred_seen = false;
    let mut started = false;
    let mut rewrite_fold_us = 0u64;
    let t = Instant::now();
    loop {
        if !started {
            overwrite(&mut c, 1000);
        }
        let info = s.info("persistence");
        let has = |f: &str| info.lines().any(|l| l.trim_end() == f);
        if has("rdb_bgsave_in_progress:1") {
            if !started {
                started = true;
                // Until this save folds, the last fold is the rewrite's.
                rewrite_fold_us = s
                    .field("persistence", "async_fork_last_fold_usec")
                    .parse()
                    .unwrap();
            }
        } else if started {
            break;
        } else if has("async_fork_state:folding") && has("aof_rewrite_in_progress:0") {
            deferred_seen = true;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{}", s.log());
    }
    assert_eq!(s.field("persistence", "rdb_last_bgsave_status"), "ok");
    let fork_us: u64 = s.field("stats", "latest_fork_usec").parse().unwrap();
    let last = w.stop();
    s.wait_not_folding();
    eprintln!(
        "rewrite fold {rewrite_fold_us} us, BGSAVE fork {fork_us} us, saw the deferral: {deferred_seen}"
    );
    // A fork that waited for the fold stalls about as long as the fold.
    assert!(
        rewrite_fold_us < 20_000 || fork_us * 2 < rewrite_fold_us,
        "the scheduled BGSAVE's fork waited for the fold"
    );
    if !deferred_seen && rewrite_fold_us < 20_000 {
        eprintln!("inconclusive: the fold was too short to observe");
    }
    let rdb = s.dir.path().join("dump.rdb");
    assert_eq!(check_prefix(&mut s.conn(), BASE_KEYS), last);
    let seq = check_rdb(&bin, &rdb, BASE_KEYS);
    assert!(seq > 0 && seq <= last);
}

#[test]
fn replica_full_sync_while_writing() {
    let Some(bin) = server_bin() else { return };
    let p = Server::start(&bin, &["--repl-diskless-sync", "no"]);
    populate(&p);
    let w = Writer::start(&p);
    w.wait_for(2000);
    let r = Server::start(&bin, &["--replicaof", "127.0.0.1", &p.port.to_string()]);
    r.wait_field("replication", "master_link_status", "up");
    w.wait_for(2000);
    let last = w.stop();
    // WAIT on a fresh connection would not wait (it has written nothing):
    // poll the replica until it has applied the last acknowledged write.
    let mut rc = r.conn();
    let t = Instant::now();
    while redis::cmd("GET")
        .arg("seq")
        .query::<Option<u64>>(&mut rc)
        .unwrap()
        != Some(last)
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "replica never caught up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(check_prefix(&mut p.conn(), BASE_KEYS), last);
    assert_eq!(
        check_prefix(&mut r.conn(), BASE_KEYS),
        last,
        "replica differs"
    );
    assert!(p.field("stats", "total_forks").parse::<u64>().unwrap() >= 1);
}

#[test]
fn killed_child_toggling_and_debug_reload() {
    let Some(bin) = server_bin() else { return };
    let s = Server::start(&bin, &["--rdb-key-save-delay", "50"]);
    populate(&s);
    let w = Writer::start(&s);
    w.wait_for(1000);
    let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Toggle while the child runs, then kill it mid-save.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("async-fork")
        .arg("no")
        .query(&mut s.conn())
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("async-fork")
        .arg("yes")
        .query(&mut s.conn())
        .unwrap();
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", s.child.id())).unwrap();
    let pid: i32 = children
        .split_whitespace()
        .next()
        .expect("a save child")
        .parse()
        .unwrap();
    // SAFETY: kills the server's save child.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    s.wait_field("persistence", "rdb_bgsave_in_progress", "0");
    assert_eq!(s.field("persistence", "rdb_last_bgsave_status"), "err");
    s.wait_not_folding();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("rdb-key-save-delay")
        .arg(0)
        .query(&mut s.conn())
        .unwrap();
    w.wait_for(1000);
    let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
    s.wait_bgsave();
    let last = w.stop();
    assert_eq!(check_prefix(&mut s.conn(), BASE_KEYS), last);
    check_rdb(&bin, &s.dir.path().join("dump.rdb"), BASE_KEYS);
    let _: String = redis::cmd("DEBUG")
        .arg("RELOAD")
        .query(&mut s.conn())
        .unwrap();
    assert_eq!(check_prefix(&mut s.conn(), BASE_KEYS), last);
    assert_eq!(s.field("persistence", "async_fork_active"), "1");
}

/// Weaker check where keys may be evicted: every k:j present holds its
/// value, and nothing above `seq` exists when `seq` is present.
fn check_values(c: &mut redis::Connection) -> usize {
    let seq: Option<u64> = redis::cmd("GET").arg("seq").query(c).unwrap();
    let mut cursor = 0u64;
    let mut n = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("k:*")
            .arg("COUNT")
            .arg(1000)
            .query(c)
            .unwrap();
        if !keys.is_empty() {
            let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(c).unwrap();
            for (k, v) in keys.iter().zip(vals) {
                let j: u64 = k[2..].parse().unwrap();
                if let Some(v) = v {
                    assert_eq!(v, val(j), "{k} wrong");
                    if let Some(s) = seq {
                        assert!(j <= s, "{k} present although seq is {s}");
                    }
                    n += 1;
                }
            }
        }
        cursor = next;
        if cursor == 0 {
            return n;
        }
    }
}

#[test]
fn eviction_lazyfree_and_io_threads_during_snapshots() {
    let Some(bin) = server_bin() else { return };
    let s = Server::start(
        &bin,
        &[
            "--maxmemory",
            "30mb",
            "--maxmemory-policy",
            "allkeys-lru",
            "--lazyfree-lazy-eviction",
            "yes",
            "--lazyfree-lazy-user-del",
            "yes",
            "--io-threads",
            "2",
            "--io-threads-do-reads",
            "yes",
        ],
    );
    populate(&s);
    let w = Writer::start(&s);
    let mut c = s.conn();
    for n in 0..3u64 {
        w.wait_for(3000);
        let _: String = redis::cmd("BGSAVE").query(&mut c).unwrap();
        // Free memory in the background (lazyfree) while the child lives.
        let keys: Vec<String> = (n * 5000..(n + 1) * 5000)
            .map(|k| format!("key:{k}"))
            .collect();
        let _: i64 = redis::cmd("UNLINK").arg(&keys).query(&mut c).unwrap();
        s.wait_bgsave();
        check_rdb_values(&bin, &s.dir.path().join("dump.rdb"));
    }
    w.stop();
    s.wait_not_folding();
    assert!(check_values(&mut c) > 0);
    let evicted: u64 = s.field("stats", "evicted_keys").parse().unwrap();
    assert!(evicted > 0, "test did not evict");
    let used: u64 = s.field("memory", "used_memory").parse().unwrap();
    assert!(used < 40 << 20, "used_memory {used} above maxmemory");
    assert_eq!(s.field("persistence", "async_fork_active"), "1");
}

fn check_rdb_values(bin: &Path, rdb: &Path) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(rdb, dir.path().join("dump.rdb")).unwrap();
    let s = Server::start_in(bin, dir, &["--async-fork", "no"]);
    s.wait_field("persistence", "loading", "0");
    check_values(&mut s.conn());
}

#[test]
fn module_fork_runs_through_the_engine() {
    let Some(bin) = server_bin() else { return };
    let module = bin.parent().unwrap().join("../modules/fork.so");
    if !module.exists() {
        eprintln!(
            "skipped: {} missing (run scripts/build-redis.sh)",
            module.display()
        );
        return;
    }
    let s = Server::start(&bin, &["--loadmodule", module.to_str().unwrap()]);
    let mut c = s.conn();
    populate(&s);
    let folds0: u64 = s.field("persistence", "async_fork_folds").parse().unwrap();
    // A module child that exits with code 3; the done handler records it.
    let _: i64 = redis::cmd("FORK.CREATE")
        .arg(3)
        .arg(100_000)
        .query(&mut c)
        .unwrap();
    let t = Instant::now();
    while redis::cmd("FORK.EXITCODE").query::<i64>(&mut c).unwrap() != 3 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "module child never reported"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    s.wait_not_folding();
    // A long-running module child killed through the API (which waits for it).
    let _: i64 = redis::cmd("FORK.CREATE")
        .arg(0)
        .arg(30_000_000)
        .query(&mut c)
        .unwrap();
    let _: i64 = redis::cmd("FORK.KILL").query(&mut c).unwrap();
    s.wait_not_folding();
    let folds: u64 = s.field("persistence", "async_fork_folds").parse().unwrap();
    assert_eq!(folds, folds0 + 2, "{}", s.info("persistence"));
    // The engine is usable afterwards: an exact BGSAVE under writes.
    let w = Writer::start(&s);
    w.wait_for(2000);
    let _: String = redis::cmd("BGSAVE").query(&mut c).unwrap();
    s.wait_bgsave();
    let last = w.stop();
    assert_eq!(check_prefix(&mut c, BASE_KEYS), last);
    check_rdb(&bin, &s.dir.path().join("dump.rdb"), BASE_KEYS);
}

#[test]
fn unprivileged_server_falls_back_to_stock_fork() {
    let Some(bin) = server_bin() else { return };
    // Needs root to drop to uid 65534, which cannot get a userfaultfd that sees
    // kernel-mode faults when vm.unprivileged_userfaultfd=0.
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let unpriv =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if !root || unpriv.trim() != "0" || Command::new("setpriv").arg("--help").output().is_err() {
        eprintln!("skipped: needs root, setpriv and vm.unprivileged_userfaultfd=0");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let s = Server::start_wrapped(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        &bin,
        dir,
        &[],
    );
    assert_eq!(s.field("persistence", "async_fork_active"), "0");
    assert!(s
        .field("persistence", "async_fork_status")
        .contains("user-mode"));
    assert_eq!(
        s.log().matches("async-fork: unavailable").count(),
        1,
        "{}",
        s.log()
    );
    populate(&s);
    let w = Writer::start(&s);
    w.wait_for(1000);
    let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
    s.wait_field("persistence", "rdb_bgsave_in_progress", "0");
    assert_eq!(s.field("persistence", "rdb_last_bgsave_status"), "ok");
    let last = w.stop();
    assert_eq!(check_prefix(&mut s.conn(), BASE_KEYS), last);
    check_rdb(&bin, &s.dir.path().join("dump.rdb"), BASE_KEYS);
}

/// The server's engine threads (named `forkpatch-*`): (name, tid), sorted.
fn engine_threads(pid: u32) -> Vec<(String, libc::pid_t)> {
    proc_threads::named(&pid.to_string(), "forkpatch-")
}

#[test]
fn fold_thread_runs_on_bio_cpulist() {
    let Some(bin) = server_bin() else { return };
    let s = Server::start(&bin, &["--bio_cpulist", "0"]);
    assert_eq!(s.field("persistence", "async_fork_active"), "1");
    let pid = s.child.id();
    let seen: Vec<(String, String)> = engine_threads(pid)
        .into_iter()
        .map(|(comm, tid)| (comm, proc_threads::cpu_list(&pid.to_string(), tid).unwrap()))
        .collect();
    // The fold thread follows bio_cpulist; the fault handler stays where the
    // server started it (all CPUs here), see Engine::set_thread_cpus.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "forkpatch-fold");
    assert_eq!(seen[0].1, "0", "{seen:?}");
    assert_eq!(seen[1].0, "forkpatch-uffd");
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        assert_ne!(seen[1].1, "0", "{seen:?}");
    }
    assert!(
        s.log().contains("fold thread on bio_cpulist 0"),
        "{}",
        s.log()
    );
    // The fold reports its wait for a free address-space lock.
    populate(&s);
    let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
    s.wait_bgsave();
    s.field("persistence", "async_fork_last_fold_lock_wait_usec")
        .parse::<u64>()
        .unwrap();
}

/// Scheduling policy of the patched server's fault-handler thread.
fn fault_handler_policy(pid: u32) -> i32 {
    let (_, tid) = engine_threads(pid)
        .into_iter()
        .find(|(comm, _)| comm == "forkpatch-uffd")
        .unwrap_or_else(|| panic!("no forkpatch-uffd thread in {pid}"));
    // SAFETY: a query with no memory arguments.
    unsafe { libc::sched_getscheduler(tid) }
}

#[test]
fn rt_priority_config() {
    let Some(bin) = server_bin() else { return };
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root for SCHED_FIFO");
        return;
    }
    let s = Server::start(&bin, &[]);
    let pid = s.child.id();
    let mut c = s.conn();
    let get = |c: &mut redis::Connection| -> Vec<String> {
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("async-fork-rt-priority")
            .query(c)
            .unwrap()
    };
    assert_eq!(get(&mut c), ["async-fork-rt-priority", "1"]);
    assert_eq!(s.field("persistence", "async_fork_rt_priority"), "1");
    assert_eq!(fault_handler_policy(pid), libc::SCHED_FIFO);
    assert!(
        s.log()
            .contains("fault handler runs SCHED_FIFO at priority 1"),
        "{}",
        s.log()
    );
    let set = |c: &mut redis::Connection, v: &str| -> redis::RedisResult<()> {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("async-fork-rt-priority")
            .arg(v)
            .query(c)
    };
    assert!(set(&mut c, "100").is_err());
    assert!(set(&mut c, "-1").is_err());
    assert_eq!(s.field("persistence", "async_fork_rt_priority"), "1");
    set(&mut c, "0").unwrap();
    assert_eq!(s.field("persistence", "async_fork_rt_priority"), "0");
    assert_eq!(fault_handler_policy(pid), libc::SCHED_OTHER);
    set(&mut c, "7").unwrap();
    assert_eq!(s.field("persistence", "async_fork_rt_priority"), "7");
    assert_eq!(fault_handler_policy(pid), libc::SCHED_FIFO);
    // Snapshots stay exact with the real-time handler serving the fold.
    populate(&s);
    let w = Writer::start(&s);
    w.wait_for(1000);
    for _ in 0..2 {
        let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
        s.wait_bgsave();
        check_rdb(&bin, &s.dir.path().join("dump.rdb"), BASE_KEYS);
    }
    let last = w.stop();
    assert_eq!(check_prefix(&mut s.conn(), BASE_KEYS), last);
    // The handler's policy is its own: the main thread stays normal.
    // SAFETY: a query with no memory arguments.
    assert_eq!(
        unsafe { libc::sched_getscheduler(pid as libc::pid_t) },
        libc::SCHED_OTHER
    );
    drop(s);

    // Without CAP_SYS_NICE (dropped from the bounding set, so root does not
    // regain it at exec) the engine still works, the handler stays normal,
    // the log says why, and CONFIG SET fails without changing anything.
    if Command::new("setpriv").arg("--help").output().is_err() {
        eprintln!("skipped the CAP_SYS_NICE part: no setpriv");
        return;
    }
    let s = Server::start_wrapped(
        &[
            "setpriv",
            "--bounding-set=-sys_nice",
            "--inh-caps=-sys_nice",
            "--",
        ],
        &bin,
        tempfile::tempdir().unwrap(),
        &["--async-fork-rt-priority", "5"],
    );
    assert_eq!(s.field("persistence", "async_fork_active"), "1");
    assert_eq!(s.field("persistence", "async_fork_rt_priority"), "0");
    assert_eq!(fault_handler_policy(s.child.id()), libc::SCHED_OTHER);
    assert!(
        s.log()
            .contains("fault handler stays at normal priority (async-fork-rt-priority 5"),
        "{}",
        s.log()
    );
    let mut c = s.conn();
    let err = set(&mut c, "3").unwrap_err();
    assert!(err.to_string().contains("CAP_SYS_NICE"), "{err}");
    assert_eq!(get(&mut c), ["async-fork-rt-priority", "5"]);
    assert_eq!(s.field("persistence", "async_fork_rt_priority"), "0");
    populate(&s);
    let _: String = redis::cmd("BGSAVE").query(&mut s.conn()).unwrap();
    s.wait_bgsave();
    check_rdb(&bin, &s.dir.path().join("dump.rdb"), BASE_KEYS);
}
