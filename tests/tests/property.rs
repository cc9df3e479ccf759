//! Random workloads over a small key space with hash tags; after each batch
//! the index must pass SLOTS.CHECK and match the model computed from the
//! keyspace.  The seed is printed; rerun with SLOTFORK_SEED=<seed>.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use slotfork_tests::*;

fn key_space() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = Vec::new();
    for t in ["a", "b", "c", "user1000", ""] {
        for n in ["x", "y", "z", "w"] {
            v.push(format!("{{{t}}}{n}").into_bytes());
        }
    }
    for i in 0..12 {
        v.push(format!("plain{i}").into_bytes());
    }
    v.push(b"{\0}bin".to_vec());
    v.push(b"\0{".to_vec());
    v.push(b"foo{}{bar}".to_vec());
    v.push(b"".to_vec());
    v
}

struct Workload {
    rng: StdRng,
    keys: Vec<Vec<u8>>,
    log: VecDeque<String>,
    db: i64,
    hash: HashFn,
}

impl Workload {
    fn key(&mut self) -> Vec<u8> {
        let i = self.rng.gen_range(0..self.keys.len());
        self.keys[i].clone()
    }

    /// One random command; returns its arguments.
    fn next_cmd(&mut self) -> Vec<Vec<u8>> {
        let k = self.key();
        let r = self.rng.gen_range(0..1000);
        let s = |x: &str| x.as_bytes().to_vec();
        let n = self.rng.gen_range(0..5).to_string();
        match r {
            0..=199 => vec![s("SET"), k, s("v")],
            200..=279 => vec![s("DEL"), k],
            280..=309 => vec![s("UNLINK"), k, self.key()],
            310..=369 => vec![s("RENAME"), k, self.key()],
            370..=389 => vec![s("RENAMENX"), k, self.key()],
            390..=449 => vec![
                s("PEXPIRE"),
                k,
                self.rng.gen_range(1..40).to_string().into_bytes(),
            ],
            450..=469 => vec![
                s("SET"),
                k,
                s("v"),
                s("PX"),
                self.rng.gen_range(1..30).to_string().into_bytes(),
            ],
            470..=509 => vec![s("MOVE"), k, s(if self.db == 0 { "1" } else { "0" })],
            510..=569 => vec![s("LPUSH"), k, n.into_bytes()],
            570..=619 => vec![s("LPOP"), k],
            620..=659 => vec![s("HSET"), k, n.into_bytes(), s("v")],
            660..=699 => vec![s("HDEL"), k, n.into_bytes()],
            700..=739 => vec![s("SADD"), k, n.into_bytes()],
            740..=779 => vec![s("SREM"), k, n.into_bytes()],
            780..=799 => vec![s("ZADD"), k, s("1"), n.into_bytes()],
            800..=814 => vec![s("ZPOPMIN"), k],
            815..=834 => vec![s("COPY"), k, self.key(), s("REPLACE")],
            835..=849 => vec![s("GETDEL"), k],
            850..=864 => vec![s("SINTERSTORE"), k, self.key(), self.key()],
            865..=879 => vec![s("EXPIRE"), k, s("-1")],
            880..=899 => vec![s("PERSIST"), k],
            900..=929 => vec![s("SELECT"), s(if self.db == 0 { "1" } else { "0" })],
            930..=944 => vec![
                s("COPY"),
                k,
                self.key(),
                s("DB"),
                s(if self.db == 0 { "1" } else { "0" }),
            ],
            945..=959 => vec![
                s("EVAL"),
                s("redis.call('SET', KEYS[1], 1); redis.call('DEL', KEYS[2]); return 1"),
                s("2"),
                k,
                self.key(),
            ],
            960..=974 => vec![s("GET"), k],
            975..=979 => vec![s("SLOTS.DEL"), self.hash.slot(&k).to_string().into_bytes()],
            980..=987 => vec![s("SWAPDB"), s("0"), s("1")],
            988..=993 => vec![s("FLUSHDB")],
            _ => vec![s("FLUSHDB"), s("ASYNC")],
        }
    }

    fn record(&mut self, args: &[Vec<u8>]) {
        let shown: Vec<String> = args
            .iter()
            .map(|a| format!("{:?}", String::from_utf8_lossy(a)))
            .collect();
        self.log
            .push_back(format!("[db{}] {}", self.db, shown.join(" ")));
        if self.log.len() > 40 {
            self.log.pop_front();
        }
    }
}

fn run_workload(name: &str, server: &Server, hash: HashFn, ops: usize, lazy_only: bool) {
    let seed = seed(name);
    let mut w = Workload {
        rng: StdRng::seed_from_u64(seed),
        keys: key_space(),
        log: VecDeque::new(),
        db: 0,
        hash,
    };
    let mut c = server.conn();
    if lazy_only {
        ok(&mut c, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    }
    let verify = |c: &mut redis::Connection, w: &Workload, at: usize| {
        let r = catch_unwind(AssertUnwindSafe(|| {
            // SLOTS.CHECK is valid at any moment, also mid-deletion.
            check(c);
            wait_del_done(c);
            assert_exact_dbs(c, hash, &[0, 1]);
        }));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{name}: index wrong after {at} ops (SLOTFORK_SEED={seed}):\n{msg}\nlast commands:\n  {}",
                w.log.iter().cloned().collect::<Vec<_>>().join("\n  ")
            );
        }
        // assert_exact_dbs leaves db 0 selected; restore the workload's db.
        ok(c, &["SELECT".to_string(), w.db.to_string()]);
    };
    for i in 0..ops {
        let args = w.next_cmd();
        w.record(&args);
        match run(&mut c, &args) {
            Ok(_) => {
                if args[0] == b"SELECT" {
                    w.db = String::from_utf8_lossy(&args[1]).parse().unwrap();
                }
            }
            Err(e) => {
                assert!(
                    !e.is_io_error() && !e.is_connection_dropped(),
                    "{name}: connection lost at op {i} (SLOTFORK_SEED={seed}), last commands:\n  {}\n{}",
                    w.log.iter().cloned().collect::<Vec<_>>().join("\n  "),
                    server.log_tail(30)
                );
            }
        }
        if i % 200 == 199 {
            verify(&mut c, &w, i + 1);
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(60));
    verify(&mut c, &w, ops);
}

#[test]
fn random_workload_crc32_full() {
    let s = Server::start();
    run_workload("crc32_full", &s, HashFn::Crc32, 4000, false);
}

#[test]
fn random_workload_crc32_full_lazy_expiry() {
    let s = Server::start();
    run_workload("crc32_full_lazy", &s, HashFn::Crc32, 2000, true);
}

#[test]
fn random_workload_crc16_full() {
    let s = Server::builder().crc16().start();
    run_workload("crc16_full", &s, HashFn::Crc16, 3000, false);
}

#[test]
fn random_workload_counts_only() {
    let s = Server::builder().counts_only().start();
    run_workload("crc32_counts_only", &s, HashFn::Crc32, 3000, false);
}

#[test]
fn random_workload_with_replica() {
    let p = Server::start();
    let r = Server::builder().replica_of(&p).start();
    run_workload("with_replica", &p, HashFn::Crc32, 2000, false);
    // Let the remaining short TTLs fire on the primary, then compare.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut pc = p.conn();
    // No active expiry on the primary while the two sides are compared: it
    // would delete keys between reading the primary and the replica.
    ok(&mut pc, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]);
    for db in [0, 1] {
        ok(&mut pc, &["SELECT".to_string(), db.to_string()]);
        all_keys(&mut pc);
    }
    wait_replica_sync(&p, &r);
    for db in [0, 1] {
        let a = slots_info(&mut p.conn_db(db));
        let b = slots_info(&mut r.conn_db(db));
        assert!(
            a == b,
            "db {db}: replica differs from primary\n{}",
            diff_counts(&a, &b)
        );
    }
    check(&mut r.conn());
}
