//! `index-mode counts-only`: exact counts, keys found by filtering the keyspace.

use std::collections::BTreeSet;
use std::time::Duration;

use slotfork_tests::*;

const H: HashFn = HashFn::Crc32;

fn server() -> Server {
    Server::builder().counts_only().start()
}

fn slot(k: &str) -> u32 {
    H.slot(k.as_bytes())
}

#[test]
fn info_and_config() {
    let s = server();
    let mut c = s.conn();
    assert_eq!(slots_info_field(&mut c, "slots_index_mode"), "counts-only");
    assert_eq!(slots_info_field(&mut c, "slots_hash_function"), "crc32");
    let v: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("slots.index-mode")
        .query(&mut c)
        .unwrap();
    assert_eq!(v[1], "counts-only");
    set_many(&mut c, &tagged_keys("a", 10));
    assert_eq!(slots_info_num(&mut c, "slots_keys_indexed"), 10);
    assert_eq!(slots_info_num(&mut c, "slots_nonempty_slots"), 1);
    assert_eq!(hashkey(&mut c, b"123456789"), 294);
}

#[test]
fn counts_keys_scan() {
    let s = server();
    let mut c = s.conn();
    let keys: Vec<String> = (0..4000).map(|i| format!("k{i}")).collect();
    set_many(&mut c, &keys);
    set_many(&mut c, &tagged_keys("t", 300));
    let ts = slot("t");
    assert_exact(&mut c, H);
    let want: BTreeSet<Vec<u8>> = keys
        .iter()
        .chain(tagged_keys("t", 300).iter())
        .filter(|k| slot(k) == ts)
        .map(|k| k.as_bytes().to_vec())
        .collect();
    assert_eq!(slots_count(&mut c, ts), want.len() as u64);

    // SLOTS.KEYS: only keys of the slot, limited by count.
    let got: BTreeSet<Vec<u8>> = slots_keys(&mut c, ts, 100_000).into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(slots_keys(&mut c, ts, 5).len(), 5);
    assert_eq!(slots_keys(&mut c, ts, 0).len(), 0);
    let other = slot("k0");
    let got: Vec<Vec<u8>> = slots_keys(&mut c, other, 100);
    assert!(got.iter().all(|k| H.slot(k) == other));
    assert_eq!(got.len() as u64, slots_count(&mut c, other).min(100));
    // Empty slot.
    // Empty a slot (sequential keys may fill all 1024 slots).
    let info_now = slots_info(&mut c);
    let empty = match (0..1024u32).find(|s| !info_now.contains_key(s)) {
        Some(e) => e,
        None => {
            let e = slot("k1");
            let victims: Vec<String> = keys.iter().filter(|k| slot(k) == e).cloned().collect();
            let mut del = vec!["DEL".to_string()];
            del.extend(victims);
            ok(&mut c, &del);
            e
        }
    };
    assert_eq!(slots_count(&mut c, empty), 0);
    assert!(slots_keys(&mut c, empty, 10).is_empty());
    assert!(slots_scan_all(&mut c, empty, None).is_empty());

    // SLOTS.SCAN: full iteration returns exactly the slot's keys.
    for count in [None, Some(3), Some(1000)] {
        let got = slots_scan_all(&mut c, ts, count);
        assert!(got.iter().all(|k| H.slot(k) == ts));
        let set: BTreeSet<Vec<u8>> = got.into_iter().collect();
        assert_eq!(set, want, "COUNT {count:?}");
    }
    check(&mut c);
}

#[test]
fn keyspace_changes_keep_counts_exact() {
    let s = server();
    let mut c = s.conn();
    set_many(
        &mut c,
        &(0..2000).map(|i| format!("k{i}")).collect::<Vec<_>>(),
    );
    ok(&mut c, &["DEL", "k1", "k2", "k3"]);
    ok(&mut c, &["UNLINK", "k4"]);
    ok(&mut c, &["RENAME", "k5", "{x}k5"]);
    ok(&mut c, &["RENAME", "k6", "k7"]);
    ok(&mut c, &["RENAMENX", "k8", "k9"]);
    ok(&mut c, &["MOVE", "k10", "1"]);
    ok(&mut c, &["COPY", "k11", "k11", "DB", "2"]);
    ok(&mut c, &["RPUSH", "{l}l", "a"]);
    ok(&mut c, &["LPOP", "{l}l"]);
    ok(&mut c, &["SADD", "{s}s", "a"]);
    ok(&mut c, &["SINTERSTORE", "k12", "{s}s", "{s}none"]);
    ok(&mut c, &["GETDEL", "k13"]);
    ok(&mut c, &["EXPIRE", "k14", "-1"]);
    ok(&mut c, &["SET", "k15", "v", "PX", "10"]);
    let dump = as_bytes(&ok(&mut c, &["DUMP", "k16"]));
    run(
        &mut c,
        &[
            b"RESTORE".to_vec(),
            b"{r}k".to_vec(),
            b"0".to_vec(),
            dump.clone(),
        ],
    )
    .unwrap();
    run(
        &mut c,
        &[
            b"RESTORE".to_vec(),
            b"k17".to_vec(),
            b"1".to_vec(),
            dump,
            b"ABSTTL".to_vec(),
            b"REPLACE".to_vec(),
        ],
    )
    .unwrap();
    ok(
        &mut c,
        &[
            "EVAL",
            "redis.call('SET', KEYS[1], 1); redis.call('DEL', KEYS[2]); return 1",
            "2",
            "{e}1",
            "k18",
        ],
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_exact_dbs(&mut c, H, &[0, 1, 2]);
    ok(&mut c, &["SWAPDB", "0", "2"]);
    assert_exact_dbs(&mut c, H, &[0, 1, 2]);
    ok(&mut c, &["SELECT", "1"]);
    ok(&mut c, &["FLUSHDB"]);
    ok(&mut c, &["SELECT", "0"]);
    ok(&mut c, &["DEBUG", "RELOAD"]);
    assert_exact_dbs(&mut c, H, &[0, 1, 2]);
    ok(&mut c, &["FLUSHALL", "ASYNC"]);
    assert_eq!(slots_info(&mut c).len(), 0);
    check(&mut c);
}

#[test]
fn expiry_and_eviction() {
    let s = Server::builder()
        .counts_only()
        .config("maxmemory-policy allkeys-random")
        .start();
    let mut c = s.conn();
    let mut p = redis::pipe();
    for i in 0..200 {
        p.cmd("SET")
            .arg(format!("v{i}"))
            .arg("x")
            .arg("PX")
            .arg(30)
            .ignore();
    }
    let _: () = p.query(&mut c).unwrap();
    wait_until(Duration::from_secs(15), "active expiry", || {
        dbsize(&mut c) == 0
    });
    assert_eq!(slots_info(&mut c).len(), 0);
    check(&mut c);
    let used: u64 = info(&mut c, "memory")["used_memory"].parse().unwrap();
    ok(
        &mut c,
        &[
            "CONFIG",
            "SET",
            "maxmemory",
            &(used + 2 * 1024 * 1024).to_string(),
        ],
    );
    let val = "x".repeat(1000);
    for b in 0..10 {
        let mut p = redis::pipe();
        for i in 0..500 {
            p.cmd("SET").arg(format!("e{b}:{i}")).arg(&val).ignore();
        }
        let _: () = p.query(&mut c).unwrap();
    }
    assert!(
        info(&mut c, "stats")["evicted_keys"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    ok(&mut c, &["CONFIG", "SET", "maxmemory", "0"]);
    assert_exact(&mut c, H);
}

#[test]
fn slots_del_counts_only() {
    let s = server();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("d", 5000));
    set_many(&mut c, &tagged_keys("keep", 10));
    set_many(
        &mut c,
        &(0..1000).map(|i| format!("p{i}")).collect::<Vec<_>>(),
    );
    let ds = slot("d");
    let n = slots_count(&mut c, ds);
    let v = ok(&mut c, &["SLOTS.DEL".to_string(), ds.to_string()]);
    let e = as_array(&as_array(&v)[0]).clone();
    assert_eq!(as_int(&e[0]) as u32, ds);
    assert_eq!(as_int(&e[1]) as u64, n);
    wait_del_done(&mut c);
    assert_eq!(slots_count(&mut c, ds), 0);
    assert_eq!(slots_count(&mut c, slot("keep")), 10);
    assert!(slots_keys(&mut c, ds, 10).is_empty());
    assert_exact(&mut c, H);
}

#[test]
fn persistence_and_replication() {
    let mut p = Server::builder().counts_only().appendonly(true).start();
    let mut pc = p.conn();
    set_many(
        &mut pc,
        &(0..3000).map(|i| format!("k{i}")).collect::<Vec<_>>(),
    );
    let r = Server::builder().counts_only().replica_of(&p).start();
    wait_replica_sync(&p, &r);
    let mut rc = r.conn();
    assert_eq!(slots_info(&mut rc), slots_info(&mut pc));
    check(&mut rc);
    ok(&mut pc, &["DEL", "k1", "k2"]);
    ok(&mut pc, &["SLOTS.DEL".to_string(), slot("k3").to_string()]);
    wait_del_done(&mut pc);
    wait_replica_sync(&p, &r);
    assert_eq!(slots_info(&mut rc), slots_info(&mut pc));
    assert_exact(&mut rc, H);
    let before = slots_info(&mut pc);
    drop(pc);
    p.restart(Stop::ShutdownNoSave);
    let mut pc = p.conn();
    assert_eq!(slots_info(&mut pc), before);
    assert_exact(&mut pc, H);
    drop(pc);
    p.restart(Stop::ShutdownSave);
    let mut pc = p.conn();
    assert_eq!(slots_info(&mut pc), before);
}

#[test]
fn crc16_counts_only() {
    let s = Server::builder().crc16().counts_only().start();
    let mut c = s.conn();
    set_many(&mut c, &tagged_keys("user1000", 20));
    set_many(
        &mut c,
        &(0..1000).map(|i| format!("k{i}")).collect::<Vec<_>>(),
    );
    assert_eq!(
        slots_count(&mut c, 3443),
        20 + (0..1000)
            .filter(|i| HashFn::Crc16.slot(format!("k{i}").as_bytes()) == 3443)
            .count() as u64
    );
    let k = slots_keys(&mut c, 3443, 100);
    assert!(k.len() >= 20 && k.iter().all(|x| HashFn::Crc16.slot(x) == 3443));
    assert_exact(&mut c, HashFn::Crc16);
}

#[test]
fn debug_populate_and_overwrites() {
    let s = server();
    let mut c = s.conn();
    ok(&mut c, &["DEBUG", "POPULATE", "10000", "pop", "4"]);
    assert_exact(&mut c, H);
    // Overwrites of every kind must not change the counts.
    ok(&mut c, &["SET", "pop:1", "x"]);
    ok(
        &mut c,
        &["MSET", "pop:2", "x", "pop:3", "y", "brand:new", "z"],
    );
    ok(&mut c, &["COPY", "pop:4", "pop:5", "REPLACE"]);
    ok(&mut c, &["RENAME", "pop:6", "pop:7"]);
    let dump = as_bytes(&ok(&mut c, &["DUMP", "pop:8"]));
    run(
        &mut c,
        &[
            b"RESTORE".to_vec(),
            b"pop:9".to_vec(),
            b"0".to_vec(),
            dump,
            b"REPLACE".to_vec(),
        ],
    )
    .unwrap();
    ok(&mut c, &["SETRANGE", "pop:10", "0", "abc"]);
    ok(&mut c, &["INCR", "pop:counter"]);
    ok(&mut c, &["INCR", "pop:counter"]);
    assert_eq!(dbsize(&mut c), 10_001);
    assert_exact(&mut c, H);
}
